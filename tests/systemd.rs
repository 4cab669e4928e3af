//! statelyd under systemd: the sd_notify messages a service manager sees (READY once it
//! listens, RELOADING and READY around a SIGHUP, WATCHDOG pings, STOPPING), read by this test
//! on its own NOTIFY_SOCKET; the shipped unit file passes `systemd-analyze verify`; and logs
//! reach a real journald with the job's fields.

use crate::support::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Reads datagrams until one contains `what` (or the deadline), returning all read.
fn until(sock: &std::os::unix::net::UnixDatagram, what: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 4096];
    loop {
        if seen.iter().any(|m| m.contains(what)) {
            return;
        }
        assert!(Instant::now() < deadline, "no {what} among {seen:?}");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

#[test]
fn statelyd_tells_systemd_ready_reloading_stopping_and_pings_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    let mut d = Daemon::start_env(
        "",
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut seen = Vec::new();
    until(&sock, "READY=1", &mut seen);
    let ready = seen.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(
        ready.contains(&format!("STATUS=listening on {}", d.addr)),
        "{ready}"
    );
    // The watchdog, at half of WATCHDOG_USEC.
    seen.clear();
    until(&sock, "WATCHDOG=1", &mut seen);
    until(&sock, "WATCHDOG=1", &mut Vec::new());

    // systemctl reload: RELOADING=1 with MONOTONIC_USEC, then READY=1.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid().unwrap() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let mut seen = Vec::new();
    until(&sock, "RELOADING=1", &mut seen);
    let reloading = seen.iter().find(|m| m.contains("RELOADING=1")).unwrap();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let mut after = Vec::new();
    until(&sock, "READY=1", &mut after);

    // systemctl stop: STOPPING=1, then a clean exit.
    let pid = d.pid().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut seen = Vec::new();
    until(&sock, "STOPPING=1", &mut seen);
    assert!(d.terminate_wait().success());
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("packaging/statelyd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/statelyd "), "{unit}");
    // The binary it names is the one just built (verify checks it exists).
    let dir = tempfile::tempdir().unwrap();
    let here = dir.path().join("statelyd.service");
    std::fs::write(
        &here,
        unit.replace("/usr/bin/statelyd", env!("CARGO_BIN_EXE_statelyd")),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&here)
        .output()
        .expect("systemd-analyze (Debian's systemd) is installed");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

/// Under systemd, logs go to journald natively: a job's lines carry JOB_ID and JOB_KIND as
/// fields. A real systemd-journald runs in a private mount namespace (its sockets and files
/// bound to this test's directories, so the machine's own journal is untouched); statelyd's
/// stderr is a journal stream (systemd-cat) named in JOURNAL_STREAM, as systemd sets it for a
/// service.
#[test]
fn under_systemd_a_jobs_log_lines_reach_journald_with_its_id_and_kind() {
    let mut d = Daemon::configure("", &[]);
    let port = free_port();
    d.addr = format!("127.0.0.1:{port}");
    let t = d.dir.path().to_owned();
    for sub in ["run", "var-log"] {
        std::fs::create_dir_all(t.join(sub)).unwrap();
    }
    let script = format!(
        r#"set -e
mount --bind {t}/run /run
mount --bind {t}/var-log /var/log
mkdir -p /run/systemd/journal /run/log /var/log/journal
/lib/systemd/systemd-journald &
while [ ! -S /run/systemd/journal/stdout ]; do sleep 0.05; done
exec systemd-cat -t statelyd-stderr sh -c 'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$0" "$@"' {bin} --config {config} --listen 127.0.0.1:{port}
"#,
        t = t.display(),
        bin = env!("CARGO_BIN_EXE_statelyd"),
        config = d.config.display(),
    );
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(t.join("unshare.log")).unwrap())
        .spawn()
        .expect("unshare (util-linux) runs");
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let stop = |child: &mut std::process::Child| {
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
        let _ = child.wait();
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            stop(&mut child);
            panic!(
                "statelyd under journald did not listen: {}",
                std::fs::read_to_string(t.join("unshare.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = d.cli().args(["run", "noop", "--detach"]).output().unwrap();
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(out.status.success() && !id.is_empty(), "{out:?}");

    // journalctl reads the files this journald wrote (volatile or persistent storage).
    let deadline = Instant::now() + Duration::from_secs(20);
    let entry = loop {
        let mut files = Vec::new();
        let mut dirs = vec![t.join("run"), t.join("var-log")];
        while let Some(dir) = dirs.pop() {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.is_file() && p.extension().is_some_and(|x| x == "journal") {
                    files.push(format!("--file={}", p.display()));
                }
            }
        }
        let out = std::process::Command::new("journalctl")
            .args(["--no-pager", "-o", "json"])
            .args(&files)
            .arg(format!("JOB_ID={id}"))
            .output()
            .unwrap();
        let found = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| {
                e["MESSAGE"]
                    .as_str()
                    .is_some_and(|m| m.contains("runbook job succeeded"))
            });
        if let Some(e) = found {
            break e;
        }
        if Instant::now() > deadline {
            stop(&mut child);
            panic!(
                "no journal entry of job {id}: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    stop(&mut child);
    assert_eq!(entry["JOB_KIND"], "runbook", "{entry}");
    assert_eq!(entry["SYSLOG_IDENTIFIER"], "statelyd", "{entry}");
    // Native protocol, not the stderr stream: the stream's identifier never appears on it.
    assert_ne!(entry["_TRANSPORT"], "stdout", "{entry}");
    assert_eq!(entry["PRIORITY"], "5", "info is journald's notice: {entry}");
}
