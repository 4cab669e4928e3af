//! Issuing the same two-name certificate from the same local Pebble, fresh account each run:
//! stately (timed from the CLI command to the job's success, certificate installed) beside
//! certbot and lego in standalone HTTP-01 mode on the same validation port, interleaved in one
//! run. Wall time, the peers' peak RSS, and statelyd's RSS growth during the issuance.
//!
//! `cargo bench --bench acme` (needs the Debian packages pebble, certbot and lego).

mod support;
use support::{free_port, median, spawn_statelyd};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/support/pebble.rs"]
#[allow(dead_code)]
mod pebble;

const ROUNDS: usize = 7;
const TOKEN: &str = "bench-operator-token-000000";

/// Runs a command to its end; wall seconds and peak RSS (KiB) from wait4.
// wait4 reaps the child (Child::wait would not give its rusage).
#[allow(clippy::zombie_processes)]
fn timed(cmd: &mut Command) -> (f64, i64, bool) {
    let t = Instant::now();
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child, with valid pointers to locals.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert!(r > 0, "wait4 failed");
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    (t.elapsed().as_secs_f64(), ru.ru_maxrss, ok)
}

fn kib(pid: u32, field: &str) -> i64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Daemon {
    child: std::process::Child,
    addr: String,
}

fn start_daemon(dir: &Path, p: &pebble::Pebble) -> Daemon {
    let cfg = dir.join("statelyd.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[certificates]\nroot = \"{}\"\ndefault_acme = \"pebble\"\n\
             responder = \"127.0.0.1:{}\"\nchallenge_probe = \"127.0.0.1:{}\"\nrenew_check = \"0s\"\n{}[[token]]\nname = \"b\"\nrole = \"operator\"\nvalue = \"{TOKEN}\"\n",
            dir.join("data").display(),
            dir.join("le").display(),
            p.http_port,
            p.http_port,
            p.config()
        ),
    )
    .unwrap();
    let (child, addr) = spawn_statelyd(&cfg);
    Daemon { child, addr }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = free_port();
    let p = pebble::Pebble::start(port);
    let names = ["example.test", "www.example.test"];
    let (mut ours, mut growth, mut cb, mut cb_rss, mut lg, mut lg_rss) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        // stately: a fresh data directory is a fresh account.
        let mut d = start_daemon(dir.path(), &p);
        let pid = d.child.id();
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        let before = kib(pid, "VmRSS:");
        let (wall, _, ok) = timed(
            Command::new(env!("CARGO_BIN_EXE_stately"))
                .env("STATELY_SERVER", &d.addr)
                .env("STATELY_TOKEN", TOKEN)
                .args(["cert", "issue", names[0], names[1]]),
        );
        assert!(ok, "stately failed in round {round}");
        assert!(
            dir.path()
                .join("le/live/example.test/fullchain.pem")
                .exists()
        );
        ours.push(wall);
        growth.push(kib(pid, "VmHWM:") - before);
        let _ = d.child.kill();
        let _ = d.child.wait();

        let (wall, rss, ok) = timed(
            Command::new("certbot")
                .args([
                    "certonly",
                    "--standalone",
                    "--non-interactive",
                    "--agree-tos",
                ])
                .args(["--register-unsafely-without-email", "--no-verify-ssl"])
                .args([
                    "--http-01-address",
                    "127.0.0.1",
                    "--http-01-port",
                    &port.to_string(),
                ])
                .args(["--server", &p.directory()])
                .arg("--config-dir")
                .arg(dir.path().join("cb/config"))
                .arg("--work-dir")
                .arg(dir.path().join("cb/work"))
                .arg("--logs-dir")
                .arg(dir.path().join("cb/logs"))
                .args(["-d", names[0], "-d", names[1]])
                .env("REQUESTS_CA_BUNDLE", &p.ca_file),
        );
        assert!(ok, "certbot failed in round {round}");
        cb.push(wall);
        cb_rss.push(rss);

        let (wall, rss, ok) = timed(
            Command::new("lego")
                .args([
                    "--server",
                    &p.directory(),
                    "--accept-tos",
                    "--email",
                    "ops@example.test",
                ])
                .args(["--http", "--http.port", &format!("127.0.0.1:{port}")])
                .arg("--path")
                .arg(dir.path().join("lego"))
                .args(["-d", names[0], "-d", names[1], "run"])
                .env("LEGO_CA_CERTIFICATES", &p.ca_file),
        );
        assert!(ok, "lego failed in round {round}");
        lg.push(wall);
        lg_rss.push(rss);
        eprintln!(
            "round {round}: stately {:.3} s, certbot {:.3} s, lego {:.3} s",
            ours[round], cb[round], lg[round]
        );
    }
    let (s, c, l) = (median(ours.clone()), median(cb), median(lg));
    let med = |v: Vec<i64>| median(v.into_iter().map(|x| x as f64).collect()) / 1024.0;
    println!(
        "two-name certificate from Pebble, fresh account, {ROUNDS} rounds interleaved:\n  \
         stately CLI → installed: median {s:.3} s (min {:.3}, max {:.3}); statelyd RSS growth median {:.1} MiB (max {:.1})\n  \
         certbot standalone: median {c:.3} s, peak RSS median {:.1} MiB  → stately is {:.1}× faster\n  \
         lego standalone:    median {l:.3} s, peak RSS median {:.1} MiB  → stately is {:.1}× faster",
        ours.iter().cloned().fold(f64::MAX, f64::min),
        ours.iter().cloned().fold(0.0, f64::max),
        med(growth.clone()),
        growth.iter().max().copied().unwrap_or(0) as f64 / 1024.0,
        med(cb_rss),
        c / s,
        med(lg_rss),
        l / s
    );
    let _ = Duration::ZERO;
}
