//! A hundred lineages renewed, by certbot and by stately, from one Pebble: certbot makes the
//! hundred lineages (standalone HTTP-01), `certbot renew --force-renewal` renews them all
//! (it renews one after the other); then statelyd adopts the same hundred in place (`stately
//! cert adopt`) and its renewal scheduler, finding them all due, renews them side by side.
//! Wall seconds for each renewal of the hundred.
//!
//! `cargo bench --bench renewals` (needs the Debian packages pebble and certbot; the certbot
//! lineages take a few minutes to make).

mod support;
use support::{free_port, spawn_statelyd};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/support/pebble.rs"]
#[allow(dead_code)]
mod pebble;

const N: usize = 100;
const TOKEN: &str = "bench-operator-token-000000";

fn certbot(p: &pebble::Pebble, le: &Path, args: &[&str]) {
    let work = le.parent().unwrap();
    let out = Command::new("certbot")
        .arg("--config-dir")
        .arg(le)
        .arg("--work-dir")
        .arg(work.join("cb-work"))
        .arg("--logs-dir")
        .arg(work.join("cb-logs"))
        .args(["--server", &p.directory()])
        .args([
            "--non-interactive",
            "--agree-tos",
            "--register-unsafely-without-email",
        ])
        .args(args)
        .env("REQUESTS_CA_BUNDLE", &p.ca_file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "certbot {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn version(le: &Path, i: usize) -> String {
    std::fs::read_link(le.join(format!("live/n{i}.example.test/cert.pem")))
        .map(|t| t.display().to_string())
        .unwrap_or_default()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = free_port();
    let p = pebble::Pebble::start(port);
    let dir = tempfile::tempdir().unwrap();
    let le = dir.path().join("le");
    let port_s = port.to_string();
    let standalone = [
        "--standalone",
        "--http-01-address",
        "127.0.0.1",
        "--http-01-port",
        port_s.as_str(),
    ];
    let t = Instant::now();
    for i in 0..N {
        let name = format!("n{i}.example.test");
        certbot(
            &p,
            &le,
            &[&["certonly"], &standalone[..], &["-d", &name]].concat(),
        );
    }
    eprintln!(
        "certbot made {N} lineages in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    certbot(
        &p,
        &le,
        &["renew", "--force-renewal", "--no-random-sleep-on-renew"],
    );
    let certbot_wall = t.elapsed().as_secs_f64();
    for i in 0..N {
        assert!(
            version(&le, i).ends_with("cert2.pem"),
            "certbot renewed n{i}"
        );
    }
    eprintln!("certbot renewed {N} in {certbot_wall:.1} s");

    // statelyd on certbot's root: adopt, then restart with every lineage due.
    let cfg = dir.path().join("statelyd.toml");
    let write_cfg = |renew: &str| {
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[certificates]\nroot = \"{}\"\ndefault_acme = \"pebble\"\n\
                 responder = \"127.0.0.1:{port}\"\nchallenge_probe = \"127.0.0.1:{port}\"\n{renew}\n{}[[token]]\nname = \"b\"\nrole = \"operator\"\nvalue = \"{TOKEN}\"\n",
                dir.path().join("data").display(),
                le.display(),
                p.config()
            ),
        )
        .unwrap();
    };
    write_cfg("renew_check = \"0s\"");
    let (mut d, addr) = spawn_statelyd(&cfg);
    let out = Command::new(env!("CARGO_BIN_EXE_stately"))
        .env("STATELY_SERVER", &addr)
        .env("STATELY_TOKEN", TOKEN)
        .args(["cert", "adopt"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "adopt: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = d.kill();
    let _ = d.wait();
    write_cfg("renew_check = \"1h\"\nrenew_before = \"2500d\"");
    let t = Instant::now();
    let (mut d, _) = spawn_statelyd(&cfg);
    let deadline = Instant::now() + Duration::from_secs(600);
    while (0..N).any(|i| !version(&le, i).ends_with("cert3.pem")) {
        assert!(Instant::now() < deadline, "stately did not renew all {N}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let stately_wall = t.elapsed().as_secs_f64();
    let _ = d.kill();
    let _ = d.wait();
    println!(
        "{N} lineages renewed from one Pebble (HTTP-01):\n  \
         certbot renew --force-renewal: {certbot_wall:.2} s\n  \
         statelyd's scheduler (all due at start, adopted from certbot): {stately_wall:.2} s (from the daemon's start)\n  \
         → stately is {:.1}× faster",
        certbot_wall / stately_wall
    );
}
