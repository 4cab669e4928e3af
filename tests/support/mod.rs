//! Test support: a real statelyd process on a loopback port with its own data directory,
//! clients for it, and small real servers (HTTP) the runbooks talk to.
#![allow(dead_code)]

use stately::pb;
use stately::pb::jobs_client::JobsClient;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const OPERATOR: &str = "operator-token-0123456789";
pub const VIEWER: &str = "viewer-token-0123456789ab";

pub type Client = JobsClient<InterceptedService<Channel, Bearer>>;

#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub fn bearer(token: Option<&str>) -> Bearer {
    Bearer(token.map(|t| format!("Bearer {t}").parse().unwrap()))
}

/// A statelyd process. Killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    /// Extra environment for the process.
    pub env: Vec<(String, String)>,
    pub addr: String,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// The open-file limit (soft and hard) the process starts with, when set.
    pub nofile: Option<u64>,
    /// More flags for statelyd (e.g. `--listen` on a fixed port, kept across restarts).
    pub args: Vec<String>,
}

/// The runbooks most tests use; `{root}` is the test's file root.
pub fn test_runbooks(root: &Path) -> String {
    let root = root.display();
    format!(
        r#"
[[runbook]]
name = "write"
roots = ["{root}"]
resources = ["file:{{name}}"]
[runbook.params.name]
pattern = "[a-z0-9-]+"
[runbook.params.content]
default = "new\n"
[[runbook.step]]
type = "write_file"
path = "{root}/{{name}}.txt"
content = "{{content}}"

[[runbook]]
name = "write-then-block"
roots = ["{root}"]
resources = ["file:{{name}}"]
[runbook.params.name]
pattern = "[a-z0-9-]+"
[[runbook.step]]
name = "write {{name}}.txt"
type = "write_file"
path = "{root}/{{name}}.txt"
content = "new\n"
[[runbook.step]]
name = "block"
type = "command"
argv = ["/bin/sh", "-c", "echo $$ > {root}/{{name}}.pid; echo ready; exec sleep 300"]
[[runbook.step]]
name = "never reached"
type = "write_file"
path = "{root}/{{name}}.after"
content = "x"

[[runbook]]
name = "write-then-fail"
roots = ["{root}"]
[runbook.params.name]
pattern = "[a-z0-9-]+"
[[runbook.step]]
type = "write_file"
path = "{root}/{{name}}.txt"
content = "new\n"
[[runbook.step]]
name = "fail"
type = "check"
argv = ["/bin/sh", "-c", "echo 'the check says no' >&2; exit 3"]

[[runbook]]
name = "chatty"
resources = []
[runbook.params.lines]
default = "30"
pattern = "[0-9]+"
[[runbook.step]]
name = "count"
type = "command"
argv = ["/bin/sh", "-c", "i=1; while [ $i -le {{lines}} ]; do echo line $i; i=$((i+1)); sleep 0.01; done"]

[[runbook]]
name = "noop"
resources = []
[[runbook.step]]
type = "check"
argv = ["/bin/true"]

[[runbook]]
name = "put"
roots = ["{root}"]
[runbook.params.path]
[[runbook.step]]
type = "write_file"
path = "{{path}}"
content = "x"

[[runbook]]
name = "fetch"
roots = ["{root}"]
[runbook.params.url]
[[runbook.step]]
type = "download"
url = "{{url}}"
path = "{root}/fetched"
max_bytes = 1000
"#
    )
}

impl Daemon {
    /// Starts statelyd with the standard tokens, the test runbooks and `extra` config.
    pub fn start(extra: &str) -> Daemon {
        Self::start_env(extra, &[])
    }

    /// Like `start`, with environment variables for the process.
    pub fn start_env(extra: &str, env: &[(&str, &str)]) -> Daemon {
        let mut d = Self::configure(extra, env);
        d.spawn();
        d
    }

    /// Writes the config and data directory of a daemon without starting it.
    pub fn configure(extra: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let config = dir.path().join("statelyd.toml");
        let mut text = format!(
            r#"listen = "127.0.0.1:0"
data_dir = "{data}"
shutdown_grace = "2s"
{extra}
[[token]]
name = "op"
role = "operator"
value = "{OPERATOR}"
[[token]]
name = "watcher"
role = "viewer"
value = "{VIEWER}"
{runbooks}"#,
            data = dir.path().join("data").display(),
            runbooks = test_runbooks(&root),
        );
        // The suites run again with the ledger on PostgreSQL (scripts/test.sh): each daemon
        // gets a schema of its own in the run's cluster.
        if std::env::var("STATELY_TEST_STORE").as_deref() == Ok("postgres")
            && !extra.contains("[store]")
        {
            text.push_str(&format!(
                "\n[store]\nurl = \"{}\"\n",
                postgres::TestPostgres::schema_blocking()
            ));
        }
        std::fs::write(&config, text).unwrap();
        Daemon {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            addr: String::new(),
            dir,
            config,
            nofile: None,
            args: Vec::new(),
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// (Re)starts the process on the same config and data.
    pub fn spawn(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("statelyd.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_statelyd"));
        cmd.arg("--config")
            .arg(&self.config)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(n) = self.nofile {
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
            .unwrap_or_else(|| {
                panic!(
                    "statelyd did not start: {}",
                    std::fs::read_to_string(self.dir.path().join("statelyd.log"))
                        .unwrap_or_default()
                )
            });
        self.addr = addr.to_owned();
        self.child = Some(child);
    }

    /// Sets (or, with "", clears) an environment variable for the next spawn.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        if !value.is_empty() {
            self.env.push((key.into(), value.into()));
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        c.wait().unwrap()
    }

    /// Waits for the process to exit (after a signal sent some other way).
    pub fn terminate_wait(&mut self) -> std::process::ExitStatus {
        self.child.take().unwrap().wait().unwrap()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn client_as(&self, token: Option<&str>) -> Client {
        JobsClient::with_interceptor(self.channel().await, bearer(token))
    }

    pub async fn client(&self) -> Client {
        self.client_as(Some(OPERATOR)).await
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("statelyd.log")).unwrap_or_default()
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_stately"));
        c.env("STATELY_SERVER", &self.addr)
            .env("STATELY_TOKEN", OPERATOR);
        c
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn runbook(name: &str, params: &[(&str, &str)]) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::Runbook(pb::RunbookJob {
                runbook: name.into(),
                params: params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            })),
        }),
        request_id: String::new(),
        labels: Default::default(),
    }
}

pub fn state(job: &pb::Job) -> pb::JobState {
    pb::JobState::try_from(job.state).unwrap()
}

/// Follows a job until it ends and returns its final record.
pub async fn wait_end(client: &mut Client, id: &str) -> pb::Job {
    let mut s = client
        .watch_job(pb::WatchJobRequest {
            job_id: id.into(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(_e) = tokio::time::timeout(Duration::from_secs(60), s.message())
        .await
        .expect("job ends in time")
        .unwrap()
    {}
    client
        .get_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Reads events until one log line equals `text`.
pub async fn until_log(s: &mut tonic::Streaming<pb::JobEvent>, text: &str) -> Vec<pb::JobEvent> {
    let mut seen = Vec::new();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(30), s.message())
            .await
            .expect("event in time")
            .unwrap()
            .expect("stream open");
        let hit = matches!(&e.event, Some(pb::job_event::Event::Log(l)) if l.message == text);
        seen.push(e);
        if hit {
            return seen;
        }
    }
}

pub fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(false)
}

pub fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A loopback HTTP/1.1 server answering every GET with `body` (status 200), or 404 for
/// paths ending in /missing. Returns its base URL.
pub async fn http_server(body: &'static [u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let missing = req.lines().next().unwrap_or("").contains("/missing ");
                let head = if missing {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_owned()
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    )
                };
                let _ = s.write_all(head.as_bytes()).await;
                if !missing {
                    let _ = s.write_all(body).await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

/// A TCP server standing in for a backend web server: it accepts and closes connections,
/// which is all a layer-4 health check needs. Dropping it (or `stop`) makes checks fail.
pub struct Backend {
    pub port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Backend {
    pub async fn start(port: u16) -> Backend {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket
            .bind(format!("127.0.0.1:{port}").parse().unwrap())
            .unwrap();
        let listener = socket.listen(128).unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                drop(s);
            }
        });
        Backend {
            port,
            task: Some(task),
        }
    }

    pub async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A free loopback TCP port (bound, then released).
/// A loopback port no other test process holds, free for TCP and UDP when returned.
///
/// Not `bind(0)`: that hands out ports from the ephemeral range (32768-60999), where every
/// outgoing connection of every parallel test takes its source port, so a port found free
/// there can be taken before the daemon binds it (a CI run failed so: "the HTTP-01 responder
/// cannot listen ... Address already in use"). These come from below that range, each claimed
/// across test processes by a lock on a file held until this process exits.
pub fn free_port() -> u16 {
    static CLAIMS: std::sync::Mutex<Vec<nix::fcntl::Flock<std::fs::File>>> =
        std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("stately-test-ports");
    std::fs::create_dir_all(&dir).unwrap();
    for _ in 0..10_000 {
        let port: u16 = rand::random_range(10_000..32_000);
        let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
        else {
            continue;
        };
        let Ok(claim) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        else {
            continue;
        };
        let free = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if free {
            CLAIMS.lock().unwrap().push(claim);
            return port;
        }
    }
    panic!("no free loopback port below the ephemeral range");
}

/// A real haproxy in master-worker mode, on loopback, with its admin socket in `dir`.
pub struct Haproxy {
    child: Option<Child>,
    pub dir: PathBuf,
    pub stats: PathBuf,
    pub config: PathBuf,
}

pub const HAPROXY: &str = "/usr/sbin/haproxy";

impl Haproxy {
    /// Starts haproxy with one frontend and the given backends of servers (name, port), each
    /// server health-checked every 100 ms.
    pub fn start(dir: &Path, backends: &[(&str, Vec<(&str, u16)>)]) -> Haproxy {
        Self::start_with(dir, backends, true)
    }

    /// Like `start`, with or without health checks.
    pub fn start_with(dir: &Path, backends: &[(&str, Vec<(&str, u16)>)], checks: bool) -> Haproxy {
        Self::start_full(dir, backends, checks, "", "")
    }

    /// Like `start_with`, adding lines to the global and defaults sections.
    pub fn start_full(
        dir: &Path,
        backends: &[(&str, Vec<(&str, u16)>)],
        checks: bool,
        global: &str,
        defaults: &str,
    ) -> Haproxy {
        assert!(
            Path::new(HAPROXY).exists(),
            "haproxy is not installed ({HAPROXY}); scripts/test.sh installs the Debian package"
        );
        let stats = dir.join("admin.sock");
        let mut cfg = format!(
            "global\n  stats socket {} mode 600 level admin expose-fd listeners\n{global}\
             defaults\n  mode http\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n\
             {}{defaults}frontend fe\n  bind 127.0.0.1:{}\n  default_backend {}\n",
            stats.display(),
            if checks {
                "default-server check inter 100ms fall 2 rise 1\n"
            } else {
                ""
            },
            free_port(),
            backends[0].0
        );
        for (name, servers) in backends {
            cfg.push_str(&format!("backend {name}\n"));
            for (s, port) in servers {
                cfg.push_str(&format!("  server {s} 127.0.0.1:{port}\n"));
            }
        }
        let config = dir.join("haproxy.cfg");
        std::fs::write(&config, cfg).unwrap();
        let mut h = Haproxy {
            child: None,
            dir: dir.to_owned(),
            stats,
            config,
        };
        h.spawn();
        h
    }

    /// Starts haproxy on a configuration of the caller's; `global` gets the admin socket
    /// (`{stats}` in `cfg` is replaced by its path).
    pub fn from_config(dir: &Path, cfg: &str) -> Haproxy {
        let stats = dir.join("admin.sock");
        let config = dir.join("haproxy.cfg");
        std::fs::write(
            &config,
            cfg.replace("{stats}", &stats.display().to_string()),
        )
        .unwrap();
        let mut h = Haproxy {
            child: None,
            dir: dir.to_owned(),
            stats,
            config,
        };
        h.spawn();
        h
    }

    pub fn spawn(&mut self) {
        let child = Command::new(HAPROXY)
            .arg("-W")
            .arg("-S")
            .arg(self.dir.join("master.sock"))
            .arg("-f")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy starts");
        self.child = Some(child);
        // Ready when the admin socket answers.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&self.stats).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "haproxy did not open its stats socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.stats);
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a rollback of `id` and follows it to its end.
pub async fn rollback(client: &mut Client, id: &str, force: bool) -> pb::Job {
    let rb = client
        .rollback_job(pb::RollbackJobRequest {
            job_id: id.into(),
            force,
        })
        .await
        .unwrap()
        .into_inner();
    wait_end(client, &rb.id).await
}

/// The rows of a haproxy's `show stat`, read directly from its admin socket.
pub fn show_stat(stats: &Path) -> Vec<stately::stats::parse::Row> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(stats)
        .expect("haproxy answers on its stats socket");
    s.write_all(b"show stat\n").unwrap();
    let mut b = Vec::new();
    s.read_to_end(&mut b).unwrap();
    stately::stats::parse::parse(&b).unwrap()
}

/// Every file and link under `paths`, as (path, "link:TARGET" or the content).
pub fn tree(paths: &[PathBuf]) -> std::collections::BTreeMap<PathBuf, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo: Vec<PathBuf> = paths.to_vec();
    while let Some(p) = todo.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.file_type().is_symlink() {
            out.insert(
                p.clone(),
                format!("link:{}", std::fs::read_link(&p).unwrap().display()),
            );
        } else if m.is_dir() {
            todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            out.insert(
                p.clone(),
                String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned(),
            );
        }
    }
    out
}

pub mod bind;
pub mod pebble;
pub mod pki;
pub mod postgres;

pub const PYTHON: &str = "/usr/bin/python3";

/// A real SMTP server (aiosmtpd) on a loopback port, saving each message it accepts into a
/// directory. Stopping and starting it again keeps the port and the directory.
pub struct SmtpSink {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    /// A certificate and key: the sink offers STARTTLS and requires it.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl SmtpSink {
    pub fn start(dir: &Path) -> SmtpSink {
        let mut s = SmtpSink {
            child: None,
            port: free_port(),
            dir: dir.to_owned(),
            tls: None,
        };
        s.spawn();
        s
    }

    /// A sink that requires STARTTLS, with this certificate and key.
    pub fn start_tls(dir: &Path, cert: &Path, key: &Path) -> SmtpSink {
        let mut s = SmtpSink {
            child: None,
            port: free_port(),
            dir: dir.to_owned(),
            tls: Some((cert.to_owned(), key.to_owned())),
        };
        s.spawn();
        s
    }

    pub fn spawn(&mut self) {
        let ok = Command::new(PYTHON)
            .args(["-c", "import aiosmtpd"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "{PYTHON} cannot import aiosmtpd; scripts/test.sh installs the Debian package python3-aiosmtpd"
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/smtp_sink.py");
        let mut child = Command::new(PYTHON)
            .arg(script)
            .arg(&self.dir)
            .arg(self.port.to_string())
            .args(self.tls.iter().flat_map(|(c, k)| [c, k]))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the SMTP sink starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the SMTP sink did not start");
        self.child = Some(child);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The messages accepted so far, oldest first.
    pub fn mails(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".eml") && !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        names.sort_by_key(|n| n.split('-').next().and_then(|t| t.parse::<u128>().ok()));
        names
            .iter()
            .map(|n| std::fs::read_to_string(self.dir.join(n)).unwrap())
            .collect()
    }

    /// Waits until at least `n` messages were accepted, and returns them all.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let m = self.mails();
            if m.len() >= n {
                return m;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected {n} mail(s) within {within:?}, got {}: {m:#?}",
                m.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `[smtp]` section for statelyd.
    pub fn config(&self) -> String {
        format!(
            "[smtp]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nfrom = \"stately <stately@example.test>\"\nretry_max = \"300ms\"\ntimeout = \"2s\"\n",
            self.port
        )
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A header's value in a raw mail.
/// A header of a mail, unfolded (a long one continues on lines that start with a blank).
pub fn header(mail: &str, name: &str) -> Option<String> {
    let lines: Vec<&str> = mail.lines().take_while(|l| !l.is_empty()).collect();
    let at = lines
        .iter()
        .position(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(": ")))?;
    let mut value = lines[at][name.len() + 2..].to_owned();
    for more in lines[at + 1..]
        .iter()
        .take_while(|l| l.starts_with([' ', '\t']))
    {
        value.push_str(more);
    }
    Some(value)
}

/// Reads events until a log line contains `text`.
/// Starts an alert watch of target `edge` mailing ops@example.test (no hold) every
/// `interval_ms`, and waits until it watches: its id, and its event stream.
pub async fn start_alert_watch(
    c: &mut Client,
    interval_ms: u32,
) -> (String, tonic::Streaming<pb::JobEvent>) {
    let job = c
        .submit_job(pb::SubmitJobRequest {
            node: String::new(),
            spec: Some(pb::JobSpec {
                kind: Some(pb::job_spec::Kind::AlertWatch(pb::AlertWatchJob {
                    target: "edge".into(),
                    to: vec!["ops@example.test".into()],
                    interval_ms,
                    hold_ms: Some(0),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = c
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    until_log_with(&mut events, "watching 'edge'").await;
    (job.id, events)
}

pub async fn until_log_with(
    s: &mut tonic::Streaming<pb::JobEvent>,
    text: &str,
) -> Vec<pb::JobEvent> {
    let mut seen = Vec::new();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(30), s.message())
            .await
            .unwrap_or_else(|_| panic!("no log line with '{text}' in time; saw {seen:#?}"))
            .unwrap()
            .unwrap_or_else(|| panic!("the job ended before a log line with '{text}': {seen:#?}"));
        let hit =
            matches!(&e.event, Some(pb::job_event::Event::Log(l)) if l.message.contains(text));
        seen.push(e);
        if hit {
            return seen;
        }
    }
}

/// A static HTTP server for a webroot, on a loopback port: answers GET with the file under
/// the root, 404 otherwise; `refuse` names hosts it answers 404 for; `delay` holds every
/// answer that long (a validation that takes time).
pub struct Webroot {
    pub port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Webroot {
    pub async fn start(port: u16, root: &Path, refuse: &[&str], delay: Duration) -> Webroot {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let root = root.to_owned();
        let refuse: Vec<String> = refuse.iter().map(|s| s.to_string()).collect();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (root, refuse) = (root.clone(), refuse.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 2048];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).into_owned();
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let host = head
                        .lines()
                        .find_map(|l| {
                            l.split_once(':')
                                .filter(|(k, _)| k.eq_ignore_ascii_case("host"))
                                .map(|(_, v)| v.trim().split(':').next().unwrap_or("").to_owned())
                        })
                        .unwrap_or_default();
                    tokio::time::sleep(delay).await;
                    let file = root.join(path.trim_start_matches('/'));
                    let body = (!refuse.contains(&host) && !path.contains(".."))
                        .then(|| std::fs::read(&file).ok())
                        .flatten();
                    let reply = match body {
                        Some(b) => {
                            let mut r = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                b.len()
                            )
                            .into_bytes();
                            r.extend(b);
                            r
                        }
                        None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                    };
                    let _ = s.write_all(&reply).await;
                });
            }
        });
        Webroot {
            port,
            task: Some(task),
        }
    }

    /// Stops listening (the port is free once this returns).
    pub async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Webroot {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A finished job's log lines.
pub async fn job_logs(client: &mut Client, id: &str) -> Vec<String> {
    let mut s = client
        .watch_job(pb::WatchJobRequest {
            job_id: id.into(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Ok(Ok(Some(e))) = tokio::time::timeout(Duration::from_secs(5), s.message()).await {
        if let Some(pb::job_event::Event::Log(l)) = e.event {
            out.push(l.message);
        }
    }
    out
}

/// A job's event stream from the start.
pub async fn events(client: &mut Client, id: &str) -> tonic::Streaming<pb::JobEvent> {
    client
        .watch_job(pb::WatchJobRequest {
            job_id: id.into(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Cancels a job and waits until it has ended.
pub async fn cancel_wait(client: &mut Client, id: &str) -> pb::Job {
    client
        .cancel_job(pb::CancelJobRequest {
            job_id: id.into(),
            reason: "test".into(),
            wait: true,
        })
        .await
        .unwrap()
        .into_inner()
}

/// A real nginx (Debian's), in the foreground as this process's child, serving TLS on a free
/// loopback port from the files its configuration names.
pub struct Nginx {
    child: Option<std::process::Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub config: PathBuf,
}

pub const NGINX: &str = "/usr/sbin/nginx";

impl Nginx {
    /// `servers` is the text of the `server` blocks; `{port}` in it is the free port.
    pub fn start(servers: &str) -> Nginx {
        assert!(
            Path::new(NGINX).exists(),
            "{NGINX} is not installed; scripts/test.sh installs the Debian package nginx"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("nginx.conf");
        let d = dir.path().display();
        std::fs::write(
            &config,
            format!(
                "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\nevents {{ worker_connections 64; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{}\n}}\n",
                servers.replace("{port}", &port.to_string())
            ),
        )
        .unwrap();
        let mut n = Nginx {
            child: None,
            dir,
            port,
            config,
        };
        n.spawn();
        n
    }

    pub fn spawn(&mut self) {
        let child = Command::new(NGINX)
            .arg("-e")
            .arg(self.dir.path().join("error.log"))
            .arg("-c")
            .arg(&self.config)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nginx never listened: {}",
                self.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid_file(&self) -> PathBuf {
        self.dir.path().join("nginx.pid")
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The seed of a kind's SIGKILL trials: `STATELY_CRASH_SEED`, else a fresh one (printed, so a
/// failing trial can be replayed).
pub fn crash_seed(kind: &str) -> u64 {
    let seed = std::env::var("STATELY_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash trials of {kind}: seed {seed} (STATELY_CRASH_SEED={seed} replays them)");
    seed
}
