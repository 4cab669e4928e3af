//! What the benches share: free ports, medians, a bearer token, and a real statelyd.
#![allow(dead_code)]

pub mod spine;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback TCP port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The median (the upper one for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Sends `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct Auth(pub &'static str);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.0).parse().unwrap(),
        );
        Ok(r)
    }
}

/// Starts the real statelyd on `config` (logging warnings only) and returns it with the
/// address it listens on.
pub fn spawn_statelyd(config: &Path) -> (Child, String) {
    spawn_statelyd_limited(config, None)
}

/// Like `spawn_statelyd`, with the open-file limit (soft and hard) set to `nofile` when given.
pub fn spawn_statelyd_limited(config: &Path, nofile: Option<u64>) -> (Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_statelyd"));
    cmd.arg("--config")
        .arg(config)
        .env("STATELY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(n) = nofile {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n)
                    .map_err(std::io::Error::from)
            });
        }
    }
    let mut child = cmd.spawn().expect("statelyd starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("statelyd starts")
        .to_owned();
    (child, addr)
}

/// A haproxy.cfg with an admin socket in `dir`, one frontend, and `backends` × `servers`
/// servers (no checks); with `extra_frontend`, one more frontend answering 200 itself.
pub fn haproxy_config(
    dir: &Path,
    backends: usize,
    servers: usize,
    extra_frontend: Option<u16>,
) -> String {
    let mut c = format!(
        "global\n  stats socket {}/admin.sock mode 600 level admin expose-fd listeners\ndefaults\n  mode http\n  \
         timeout connect 1s\n  timeout client 5s\n  timeout server 5s\nfrontend fe\n  bind 127.0.0.1:{}\n  default_backend b0\n",
        dir.display(),
        free_port()
    );
    if let Some(p) = extra_frontend {
        c.push_str(&format!(
            "frontend extra\n  bind 127.0.0.1:{p}\n  http-request return status 200\n"
        ));
    }
    for b in 0..backends {
        c.push_str(&format!("backend b{b}\n"));
        for s in 0..servers {
            c.push_str(&format!(
                "  server s{s} 127.0.0.{}:{}\n",
                2 + (s % 200),
                10000 + b * servers + s
            ));
        }
    }
    c
}

/// Starts a master-worker haproxy on `text` (written to `dir`/haproxy.cfg), ready when its
/// admin socket answers.
pub fn start_haproxy(dir: &Path, text: &str) -> Child {
    std::fs::write(dir.join("haproxy.cfg"), text).unwrap();
    let child = Command::new("/usr/sbin/haproxy")
        .args(["-W", "-S"])
        .arg(dir.join("master.sock"))
        .arg("-f")
        .arg(dir.join("haproxy.cfg"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy is installed");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(dir.join("admin.sock")).is_err() {
        assert!(Instant::now() < deadline, "haproxy did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// User and system CPU seconds of a process so far.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat
        .rsplit_once(") ")
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

/// A process's resident memory.
pub fn rss_kib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Starts haproxy -W with a stats socket (level admin) and `body` after its defaults;
/// returns it with the socket's path.
pub fn start_haproxy_sock(dir: &Path, body: &str) -> (Child, std::path::PathBuf) {
    let sock = dir.join("admin.sock");
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  stats socket {} mode 600 level admin\ndefaults\n  mode http\n  timeout connect 1s\n  \
             timeout client 5s\n  timeout server 5s\n{body}",
            sock.display()
        ),
    )
    .unwrap();
    let child = Command::new("/usr/sbin/haproxy")
        .args(["-W", "-S"])
        .arg(dir.join("master.sock"))
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy is installed");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "haproxy did not start; try `haproxy -c -f {}`",
            cfg.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, sock)
}

/// `show stat` on a stats socket.
pub fn show_stat(sock: &Path) -> Vec<u8> {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.write_all(b"show stat\n").unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    buf
}

/// An HTTP/1.0 GET to loopback; the bytes of the whole response.
pub fn http_get(port: u16, path: &str) -> usize {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    buf.len()
}

/// A HAProxy of 5000 servers (100 backends of 50, none answering), with its stats socket.
pub fn haproxy_5000(dir: &Path) -> (Child, std::path::PathBuf) {
    let mut body = String::from("frontend fe\n  bind 127.0.0.1:");
    body.push_str(&format!("{}\n  default_backend b0\n", free_port()));
    for b in 0..100 {
        body.push_str(&format!("backend b{b}\n"));
        for s in 0..50 {
            body.push_str(&format!(
                "  server s{s} 127.0.0.{}:{}\n",
                2 + (s % 200),
                10000 + b * 50 + s
            ));
        }
    }
    start_haproxy_sock(dir, &body)
}

/// Debian's prometheus-haproxy-exporter on the stats socket `sock`, listening on a free
/// loopback port (returned), once it answers.
pub fn start_exporter(sock: &Path) -> (Child, u16) {
    let port = free_port();
    let exporter = Command::new("prometheus-haproxy-exporter")
        .arg(format!("--haproxy.scrape-uri=unix:{}", sock.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus-haproxy-exporter is installed (Debian package)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the exporter did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (exporter, port)
}

/// A throwaway PostgreSQL cluster on loopback (scripts/pg-test-cluster.sh, `fsync=off` as the
/// tests run it), stopped when dropped.
pub struct Postgres {
    dir: tempfile::TempDir,
    /// A URL for its own fresh schema.
    pub url: String,
    /// The postmaster's pid.
    pub postmaster: u32,
}

impl Postgres {
    pub fn start() -> Postgres {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = Command::new(Self::script())
            .arg("start")
            .arg(dir.path().join("pg"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let postmaster = std::fs::read_to_string(dir.path().join("pg/data/postmaster.pid"))
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        Postgres {
            dir,
            url,
            postmaster,
        }
    }

    fn script() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg-test-cluster.sh")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new(Self::script())
            .arg("stop")
            .arg(self.dir.path().join("pg"))
            .status();
    }
}
