//! Connections under a crowd: statelyd started at a 1024 open-file limit (systemd's default),
//! 1,100 idle TCP connections opened against it, then new clients (a fresh connection and a
//! health check each) timed, beside the same clients against an unloaded statelyd in the same
//! run. Reports the new client's latency p50/p99/max, and how many idle connections the
//! daemon holds meanwhile.
//!
//! `cargo bench --bench connections` (BENCH_IDLE=1100, BENCH_CLIENTS=200 by default).

mod support;

use std::process::Child;
use std::time::{Duration, Instant};

fn start(dir: &std::path::Path, nofile: u64) -> (Child, String) {
    let config = dir.join("statelyd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[token]]\nname = \"b\"\nrole = \"operator\"\nvalue = \"bench-operator-token-000000\"\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    support::spawn_statelyd_limited(&config, Some(nofile))
}

async fn new_client(addr: &str) -> Duration {
    let t = Instant::now();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connects");
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
    h.check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("answers");
    t.elapsed()
}

fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .map(|l| l.to_string_lossy().starts_with("socket:"))
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

fn quantiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let q = |p: f64| v[((v.len() - 1) as f64 * p) as usize].as_secs_f64() * 1000.0;
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        q(0.5),
        q(0.99),
        q(1.0)
    )
}

#[tokio::main]
async fn main() {
    let idle_n: usize = std::env::var("BENCH_IDLE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1100);
    let clients: usize = std::env::var("BENCH_CLIENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let (soft, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    if soft < 4096 {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
            .unwrap();
    }
    let _ = rustls::crypto::ring::default_provider().install_default();

    let quiet_dir = tempfile::tempdir().unwrap();
    let (mut quiet, quiet_addr) = start(quiet_dir.path(), 1024);
    let mut base = Vec::new();
    for _ in 0..clients {
        base.push(new_client(&quiet_addr).await);
    }
    let _ = quiet.kill();
    let _ = quiet.wait();

    let dir = tempfile::tempdir().unwrap();
    let (mut d, addr) = start(dir.path(), 1024);
    let idle: Vec<std::net::TcpStream> = (0..idle_n)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    // Let the daemon accept them all.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = sockets(d.id());
    let mut loaded = Vec::new();
    for _ in 0..clients {
        loaded.push(new_client(&addr).await);
    }
    let held_after = sockets(d.id());
    println!(
        "open-file limit 1024; {} idle connections opened; the daemon held {held} sockets before the clients, {held_after} after",
        idle.len()
    );
    println!(
        "new client beside the idle crowd ({clients}): {}",
        quantiles(loaded)
    );
    println!(
        "new client, unloaded daemon ({clients}):   {}",
        quantiles(base)
    );
    drop(idle);
    let _ = d.kill();
    let _ = d.wait();
}
