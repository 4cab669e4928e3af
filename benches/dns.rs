//! A wildcard and its apex (`*.example.test`, `example.test`) by DNS-01 through RFC 2136 +
//! TSIG, against one real BIND 9 and one Pebble resolving through it, fresh account each run:
//! stately (CLI command to the job's success) beside certbot (`--dns-rfc2136`) and lego
//! (`--dns rfc2136`), each peer at its default waits and at the lowest it accepts,
//! interleaved in one run. Wall seconds.
//!
//! lego's complete propagation check asks the zone's NS hosts on port 53 and its resolvers,
//! which cannot both be the loopback BIND here (it would ask the machine's own resolver): lego
//! runs with `--dns.disable-cp` in both settings, its other settings as named.
//!
//! `cargo bench --bench dns` (needs the Debian packages pebble, bind9, certbot,
//! python3-certbot-dns-rfc2136 and lego).

mod support;
use support::{free_port, median, spawn_statelyd};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

#[path = "../tests/support/pebble.rs"]
#[allow(dead_code)]
mod pebble;

#[path = "../tests/support/bind.rs"]
#[allow(dead_code)]
mod bind;

const TOKEN: &str = "bench-operator-token-000000";
const NAMES: [&str; 2] = ["*.example.test", "example.test"];

fn run(cmd: &mut Command, what: &str) -> f64 {
    let t = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed().as_secs_f64()
}

fn secret(b: &bind::Bind) -> String {
    let k = std::fs::read_to_string(&b.key_file).unwrap();
    k.split("secret \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned()
}

fn stately(dir: &Path, p: &pebble::Pebble, b: &bind::Bind) -> f64 {
    let cfg = dir.join("statelyd.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[certificates]\nroot = \"{}\"\ndefault_acme = \"pebble\"\nrenew_check = \"0s\"\n{}{}[[token]]\nname = \"b\"\nrole = \"operator\"\nvalue = \"{TOKEN}\"\n",
            dir.join("data").display(),
            dir.join("le").display(),
            p.config(),
            b.config("")
        ),
    )
    .unwrap();
    let (mut child, addr) = spawn_statelyd(&cfg);
    let wall = run(
        Command::new(env!("CARGO_BIN_EXE_stately"))
            .env("STATELY_SERVER", &addr)
            .env("STATELY_TOKEN", TOKEN)
            .args(["cert", "issue", NAMES[0], NAMES[1], "--dns"]),
        "stately",
    );
    assert!(dir.join("le/live/example.test/fullchain.pem").exists());
    let _ = child.kill();
    let _ = child.wait();
    wall
}

fn certbot(dir: &Path, p: &pebble::Pebble, b: &bind::Bind, propagation: Option<u32>) -> f64 {
    let creds = dir.join("rfc2136.ini");
    std::fs::write(
        &creds,
        format!(
            "dns_rfc2136_server = 127.0.0.1\ndns_rfc2136_port = {}\ndns_rfc2136_name = stately-test\ndns_rfc2136_secret = {}\ndns_rfc2136_algorithm = HMAC-SHA256\n",
            b.port,
            secret(b)
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut cmd = Command::new("certbot");
    cmd.args(["certonly", "--non-interactive", "--agree-tos"])
        .args(["--register-unsafely-without-email", "--dns-rfc2136"])
        .arg("--dns-rfc2136-credentials")
        .arg(&creds)
        .args(["--server", &p.directory()])
        .arg("--config-dir")
        .arg(dir.join("cb/config"))
        .arg("--work-dir")
        .arg(dir.join("cb/work"))
        .arg("--logs-dir")
        .arg(dir.join("cb/logs"))
        .args(["-d", NAMES[0], "-d", NAMES[1]])
        .env("REQUESTS_CA_BUNDLE", &p.ca_file);
    if let Some(s) = propagation {
        cmd.args(["--dns-rfc2136-propagation-seconds", &s.to_string()]);
    }
    run(&mut cmd, "certbot")
}

fn lego(dir: &Path, p: &pebble::Pebble, b: &bind::Bind, lowest: bool) -> f64 {
    let mut cmd = Command::new("lego");
    cmd.args(["--server", &p.directory(), "--accept-tos"])
        .args(["--email", "ops@example.test", "--dns", "rfc2136"])
        .args(["--dns.resolvers", &b.addr().to_string(), "--dns.disable-cp"])
        .arg("--path")
        .arg(dir.join("lego"))
        .args(["-d", NAMES[0], "-d", NAMES[1], "run"])
        .env("LEGO_CA_CERTIFICATES", &p.ca_file)
        .env("RFC2136_NAMESERVER", b.addr().to_string())
        .env("RFC2136_TSIG_KEY", "stately-test.")
        .env("RFC2136_TSIG_SECRET", secret(b))
        .env("RFC2136_TSIG_ALGORITHM", "hmac-sha256.");
    if lowest {
        cmd.env("RFC2136_POLLING_INTERVAL", "0")
            .env("RFC2136_SEQUENCE_INTERVAL", "0");
    }
    run(&mut cmd, "lego")
}

fn spread(v: &[f64]) -> String {
    let min = v.iter().cloned().fold(f64::MAX, f64::min);
    let max = v.iter().cloned().fold(0.0, f64::max);
    format!(
        "median {:.3} s (min {min:.3}, max {max:.3})",
        median(v.to_vec())
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let b = bind::Bind::start("example.test");
    let p = pebble::Pebble::start_dns(free_port(), b.addr());
    let rounds_low = 5;
    let rounds_default = 3;
    let (mut ours, mut cb_low, mut lg_low, mut cb_def, mut lg_def) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds_low {
        let dir = tempfile::tempdir().unwrap();
        ours.push(stately(dir.path(), &p, &b));
        cb_low.push(certbot(dir.path(), &p, &b, Some(0)));
        lg_low.push(lego(dir.path(), &p, &b, true));
        eprintln!(
            "round {round}: stately {:.3} s, certbot (0 s) {:.3} s, lego (0 s) {:.3} s",
            ours[round], cb_low[round], lg_low[round]
        );
        if round < rounds_default {
            let dir = tempfile::tempdir().unwrap();
            cb_def.push(certbot(dir.path(), &p, &b, None));
            lg_def.push(lego(dir.path(), &p, &b, false));
            eprintln!(
                "round {round}: certbot (defaults) {:.3} s, lego (defaults) {:.3} s",
                cb_def[round], lg_def[round]
            );
        }
    }
    let s = median(ours.clone());
    let fastest_default = median(cb_def.clone()).min(median(lg_def.clone()));
    println!(
        "wildcard + apex by DNS-01 (RFC 2136 + TSIG, BIND 9, Pebble resolving through it), fresh account:\n  \
         stately:                          {}\n  \
         certbot, 60 s propagation (default): {}\n  \
         lego, default sequence/polling:   {}\n  \
         certbot, --dns-rfc2136-propagation-seconds 0: {}\n  \
         lego, sequence and polling 0:     {}\n  \
         → {:.0}× faster than the faster peer at its defaults; {:.1}× certbot and {:.1}× lego at their lowest",
        spread(&ours),
        spread(&cb_def),
        spread(&lg_def),
        spread(&cb_low),
        spread(&lg_low),
        fastest_default / s,
        median(cb_low.clone()) / s,
        median(lg_low.clone()) / s,
    );
}
