//! The Python examples (`examples/python/`), run as their README says: stubs generated from
//! `proto/` with grpcio-tools, the scripts run with grpcio against a real statelyd — an
//! attached run and its Ctrl-C, and a job followed across a daemon restart with every event
//! once.

use crate::support::*;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a script may run in these tests: a few seconds is normal, so one still running
/// after this is stuck.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(60);

/// The venv scripts/test.sh makes (grpcio, grpcio-tools).
fn python() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap();
    let py = target.join("pyvenv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: scripts/test.sh makes it (python3 -m venv, pip install grpcio grpcio-tools)",
        py.display()
    );
    py
}

/// Generates the stubs from proto/ into `dir`, as the examples' README says.
fn stubs(dir: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let protos: Vec<PathBuf> = std::fs::read_dir(root.join("proto/stately/v1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    let out = Command::new(python())
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", root.join("proto").display()))
        .arg(format!("--python_out={}", dir.display()))
        .arg(format!("--grpc_python_out={}", dir.display()))
        .args(&protos)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn script(name: &str, stubs_dir: &Path, d: &Daemon) -> Command {
    let mut c = Command::new(python());
    c.arg(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/python")
            .join(name),
    )
    .env("PYTHONPATH", stubs_dir)
    // A stuck script, sent SIGABRT at the deadline, prints every thread's Python stack.
    .env("PYTHONFAULTHANDLER", "1")
    .env("STATELY_SERVER", &d.addr)
    .env("STATELY_TOKEN", OPERATOR)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

/// A running script whose output lines arrive with a deadline: a script stuck past
/// `SCRIPT_DEADLINE` fails the test with what it printed and its Python stacks, instead of
/// holding the suite until CI gives up.
struct Script {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::thread::JoinHandle<String>,
    deadline: Instant,
    printed: String,
}

impl Script {
    fn spawn(c: &mut Command) -> Script {
        let mut child = c.spawn().unwrap();
        let (tx, lines) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines() {
                if tx.send(line.unwrap()).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Script {
            child,
            lines,
            stderr,
            deadline: Instant::now() + SCRIPT_DEADLINE,
            printed: String::new(),
        }
    }

    /// The next line the script prints, or None at its end.
    fn line(&mut self) -> Option<String> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                self.printed.push_str(&line);
                self.printed.push('\n');
                Some(line)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => self.stuck(),
        }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    fn stuck(&mut self) -> ! {
        self.signal(nix::sys::signal::Signal::SIGABRT);
        let _ = self.child.wait();
        let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
        panic!(
            "the script was still running after {SCRIPT_DEADLINE:?}; it printed:\n{}\nstderr:\n{}",
            self.printed,
            stderr.join().unwrap()
        );
    }

    /// Reads to the end, and returns the exit code, what it printed and its stderr.
    fn finish(mut self) -> (Option<i32>, String, String) {
        while self.line().is_some() {}
        let code = self.child.wait().unwrap().code();
        (code, self.printed, self.stderr.join().unwrap())
    }
}

#[test]
fn the_python_example_runs_a_runbook_attached_and_ctrl_c_cancels_it() {
    let stubs_dir = tempfile::tempdir().unwrap();
    stubs(stubs_dir.path());
    let d = Daemon::start("");
    let (code, said, stderr) =
        Script::spawn(script("run_runbook.py", stubs_dir.path(), &d).args(["chatty", "lines=3"]))
            .finish();
    assert_eq!(code, Some(0), "{said}{stderr}");
    assert!(
        said.contains("log: line 3") && said.contains("JOB_STATE_SUCCEEDED"),
        "{said}"
    );

    let mut run = Script::spawn(
        script("run_runbook.py", stubs_dir.path(), &d).args(["write-then-block", "name=py"]),
    );
    while let Some(line) = run.line() {
        if line.contains("log: ready") {
            run.signal(nix::sys::signal::Signal::SIGINT);
            break;
        }
    }
    let (code, printed, stderr) = run.finish();
    assert_eq!(code, Some(1), "{printed}{stderr}");
    assert!(
        printed.contains("interrupted") && printed.contains("JOB_STATE_CANCELLED"),
        "{printed}{stderr}"
    );
    assert!(!d.root().join("py.txt").exists(), "the write was undone");
}

#[tokio::test]
async fn the_python_example_follows_a_job_across_a_restart_with_every_event_once() {
    let stubs_dir = tempfile::tempdir().unwrap();
    stubs(stubs_dir.path());
    let mut d = Daemon::configure("", &[]);
    d.args = vec!["--listen".into(), format!("127.0.0.1:{}", free_port())];
    d.spawn();
    let mut c = d.client().await;
    let job = c
        .submit_job(runbook("chatty", &[("lines", "150")]))
        .await
        .unwrap()
        .into_inner();
    let mut follow = Script::spawn(script("follow_job.py", stubs_dir.path(), &d).arg(&job.id));
    let mut restarted = false;
    let mut count = 0;
    while follow.line().is_some() {
        count += 1;
        if !restarted && count == 20 {
            d.terminate();
            d.spawn();
            restarted = true;
        }
    }
    let (code, printed, stderr) = follow.finish();
    assert_eq!(code, Some(0), "{printed}{stderr}");
    assert!(restarted);
    let seen: Vec<u64> = printed
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    let mut c = d.client().await;
    let mut all = c
        .watch_job(stately::pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut recorded = Vec::new();
    while let Some(e) = all.message().await.unwrap() {
        recorded.push(e.seq);
    }
    assert_eq!(seen, recorded, "every recorded event, once, in order");
}
