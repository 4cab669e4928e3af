//! What the benches share: free ports, medians, a bearer token, and a real statelyd.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

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
