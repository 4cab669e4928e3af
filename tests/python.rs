//! The Python examples (`examples/python/`), run as their README says: stubs generated from
//! `proto/` with grpcio-tools, the scripts run with grpcio against a real statelyd — an
//! attached run and its Ctrl-C, and a job followed across a daemon restart with every event
//! once.

use crate::support::*;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
    .env("STATELY_SERVER", &d.addr)
    .env("STATELY_TOKEN", OPERATOR);
    c
}

#[test]
fn the_python_example_runs_a_runbook_attached_and_ctrl_c_cancels_it() {
    let stubs_dir = tempfile::tempdir().unwrap();
    stubs(stubs_dir.path());
    let d = Daemon::start("");
    let out = script("run_runbook.py", stubs_dir.path(), &d)
        .args(["chatty", "lines=3"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("log: line 3") && said.contains("JOB_STATE_SUCCEEDED"),
        "{said}"
    );

    let mut child = script("run_runbook.py", stubs_dir.path(), &d)
        .args(["write-then-block", "name=py"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        printed.push_str(&line);
        if line.contains("log: ready") {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            )
            .unwrap();
        }
        line.clear();
    }
    assert_eq!(child.wait().unwrap().code(), Some(1), "{printed}");
    assert!(
        printed.contains("interrupted") && printed.contains("JOB_STATE_CANCELLED"),
        "{printed}"
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
    let mut child = script("follow_job.py", stubs_dir.path(), &d)
        .arg(&job.id)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let mut line = String::new();
    let mut restarted = false;
    while out.read_line(&mut line).unwrap() > 0 {
        printed.push_str(&line);
        if !restarted && printed.lines().count() == 20 {
            d.terminate();
            d.spawn();
            restarted = true;
        }
        line.clear();
    }
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "{printed}");
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
