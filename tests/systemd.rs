//! statelyd under systemd: the sd_notify messages a service manager sees (READY once it
//! listens, RELOADING and READY around a SIGHUP, WATCHDOG pings, STOPPING), read by this test
//! on its own NOTIFY_SOCKET; and the shipped unit file passes `systemd-analyze verify`.

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
