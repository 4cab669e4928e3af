//! Stats figures against a real haproxy on loopback, side by side in one run:
//! - CPU per poll (fetch + parse + diff) of a 5000-server `show stat` (100 backends × 50
//!   servers), by stately's shared poller, beside `prometheus-haproxy-exporter` scraping the
//!   same socket (CPU per scrape);
//! - statelyd CPU per tick with 1 watcher and with 1000 watchers, and memory per watcher;
//! - latency from a server's status change (seen by a tight 2 ms poll of the socket) to the
//!   change arriving at a WatchStats client polling every 100 ms.
//!
//! `cargo bench --bench stats` (needs the Debian packages haproxy and
//! prometheus-haproxy-exporter; scripts/test.sh installs the first).

mod support;
use support::{
    Auth, cpu_secs, free_port, haproxy_5000, http_get, median, rss_kib, show_stat, spawn_statelyd,
    start_exporter, start_haproxy_sock,
};

use stately::pb;
use stately::stats::{StatsHub, parse};
use std::collections::HashMap;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-viewer-token-0000000";

fn statelyd(dir: &Path, sock: &Path) -> (Child, String) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("statelyd.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[haproxy]]\nname = \"edge\"\nstats_socket = \"{}\"\n\
             [[token]]\nname = \"bench\"\nrole = \"viewer\"\nvalue = \"{TOKEN}\"\n",
            dir.join("data").display(),
            sock.display()
        ),
    )
    .unwrap();
    spawn_statelyd(&cfg)
}

type Client = pb::stats_client::StatsClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Auth>,
>;

async fn clients(addr: &str, n: usize) -> Vec<Client> {
    let mut out = Vec::new();
    for _ in 0..n {
        let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        out.push(pb::stats_client::StatsClient::with_interceptor(
            ch,
            Auth(TOKEN),
        ));
    }
    out
}

fn watch_req(interval_ms: u64, servers: Vec<String>) -> pb::WatchStatsRequest {
    pb::WatchStatsRequest {
        target: "edge".into(),
        filter: Some(pb::StatsFilter {
            servers,
            ..Default::default()
        }),
        interval: Some(prost_types::Duration {
            seconds: (interval_ms / 1000) as i64,
            nanos: ((interval_ms % 1000) * 1_000_000) as i32,
        }),
        changes_only: true,
    }
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();

    // A 5000-server HAProxy.
    let big_dir = dir.path().join("big");
    std::fs::create_dir_all(&big_dir).unwrap();
    let (mut big, big_sock) = haproxy_5000(&big_dir);
    let sample = show_stat(&big_sock);
    println!(
        "5000-server show stat: {} lines, {:.2} MB, {} rows parsed",
        sample.iter().filter(|b| **b == b'\n').count(),
        sample.len() as f64 / 1e6,
        parse::parse(&sample).unwrap().len()
    );

    // Parsing alone: the best of 5 batches of 20 (this machine's neighbours make single
    // batches vary by 2×).
    let mut batches = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..20 {
            parse::parse(&sample).unwrap();
        }
        batches.push(t.elapsed().as_secs_f64() * 1e3 / 20.0);
    }
    println!(
        "  of which parsing alone: {:.2} ms (best of 5 batches; batches {})",
        batches.iter().cloned().fold(f64::MAX, f64::min),
        batches
            .iter()
            .map(|b| format!("{b:.2}"))
            .collect::<Vec<_>>()
            .join(" / ")
    );

    // Parsing as the poller does, remembering the poll before: the next answer of idle
    // servers (each line the same but `lastchg`) and one where a counter moved on every
    // server (every line parsed again).
    let bump = |column: &str| -> Vec<u8> {
        let text = std::str::from_utf8(&sample).unwrap();
        let names: Vec<&str> = text.lines().next().unwrap()[2..].split(',').collect();
        let col = names.iter().position(|n| *n == column).unwrap();
        let mut out = String::new();
        for (i, line) in text.split_inclusive('\n').enumerate() {
            let mut fields: Vec<String> = line.split(',').map(str::to_owned).collect();
            if i > 0
                && fields.len() > col
                && let Ok(v) = fields[col].parse::<i64>()
            {
                fields[col] = (v + 1).to_string();
            }
            out.push_str(&fields.join(","));
        }
        out.into_bytes()
    };
    let mut first = parse::Parser::remembering(None, parse::Memory::default());
    let used = first.feed(&sample).unwrap();
    let (before, memory) = first.finish_remembering(&sample[used..]).unwrap();
    let memory = memory.unwrap().memory;
    for (what, next) in [
        ("idle servers", bump("lastchg")),
        ("every server busy", bump("stot")),
    ] {
        let mut batches = Vec::new();
        for _ in 0..5 {
            let mut spare = parse::Memory::default();
            let t = Instant::now();
            for _ in 0..20 {
                let mut p = parse::Parser::remembering(Some((&memory, &before)), spare);
                let used = p.feed(&next).unwrap();
                let (rows, kept) = p.finish_remembering(&next[used..]).unwrap();
                assert_eq!(rows.len(), before.len());
                spare = kept.unwrap().memory;
            }
            batches.push(t.elapsed().as_secs_f64() * 1e3 / 20.0);
        }
        println!(
            "  parsing the next poll, remembering the last ({what}): {:.2} ms (best of 5 batches)",
            batches.iter().cloned().fold(f64::MAX, f64::min)
        );
    }

    // stately's poller, in this process: CPU per poll, 3 rounds of 100 polls at 50 ms (CPU is
    // read from /proc in 10 ms ticks: 100 polls keep that within a few percent).
    // HAProxy's worker (the master's child; these servers have no checks, so its CPU is the
    // polls' `show stat`).
    let worker: u32 = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", big.id()))
        .unwrap()
        .split_whitespace()
        .next()
        .expect("haproxy's worker")
        .parse()
        .unwrap();
    let (haproxy0, mut polls) = (cpu_secs(worker), 0u64);
    let rounds: Vec<f64> = rt.block_on(async {
        let hub = StatsHub::new(HashMap::from([("edge".to_owned(), big_sock.clone())]));
        let mut sub = hub.subscribe("edge", Duration::from_millis(50)).unwrap();
        sub.latest().await.unwrap();
        let me = std::process::id();
        let mut out = Vec::new();
        for _ in 0..3 {
            let (c0, p0) = (cpu_secs(me), hub.polls("edge"));
            for _ in 0..100 {
                let poll = sub.next().await.unwrap();
                assert!(poll.result.is_ok());
            }
            out.push((cpu_secs(me) - c0) / (hub.polls("edge") - p0) as f64);
            polls += hub.polls("edge") - p0;
        }
        out
    });
    let haproxy_per_poll = (cpu_secs(worker) - haproxy0) / polls as f64;
    let per_poll = median(rounds.clone());

    // The exporter scraping the same socket: CPU per scrape over 10 scrapes.
    let (mut exporter, port) = start_exporter(&big_sock);
    http_get(port, "/metrics");
    let c0 = cpu_secs(exporter.id());
    for _ in 0..10 {
        assert!(http_get(port, "/metrics") > 100_000);
    }
    let per_scrape = (cpu_secs(exporter.id()) - c0) / 10.0;
    let exporter_rss = rss_kib(exporter.id()) / 1024.0;
    exporter.kill().unwrap();
    exporter.wait().unwrap();
    println!(
        "CPU per poll of 5000 servers: stately {:.2} ms (fetch + parse + diff; rounds {}); prometheus-haproxy-exporter {:.0} ms per scrape \
         (RSS {exporter_rss:.0} MiB); ratio 1/{:.0}; HAProxy's worker {:.1} ms per `show stat` (stately's poll: {:.0}% of it)",
        per_poll * 1e3,
        rounds
            .iter()
            .map(|r| format!("{:.2}", r * 1e3))
            .collect::<Vec<_>>()
            .join(" / "),
        per_scrape * 1e3,
        per_scrape / per_poll,
        haproxy_per_poll * 1e3,
        100.0 * per_poll / haproxy_per_poll
    );

    // statelyd with 1 and with 1000 watchers (changes only, 1 s ticks) on the big socket.
    let (mut daemon, addr) = statelyd(dir.path(), &big_sock);
    rt.block_on(async {
        let pid = daemon.id();
        let mut cs = clients(&addr, 10).await;
        let mut streams = Vec::new();
        let mut s = cs[0].watch_stats(watch_req(1000, vec![])).await.unwrap().into_inner();
        s.message().await.unwrap();
        streams.push(s);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let measure = |secs: u64| async move {
            let (c0, t) = (cpu_secs(pid), Instant::now());
            tokio::time::sleep(Duration::from_secs(secs)).await;
            (cpu_secs(pid) - c0) / t.elapsed().as_secs_f64()
        };
        let one = measure(10).await;
        let rss_one = rss_kib(pid);
        for i in 1..1000 {
            // Watchers of single servers, so their first snapshots are small.
            let mut s = cs[i % 10].watch_stats(watch_req(1000, vec![format!("s{}", i % 50)])).await.unwrap().into_inner();
            s.message().await.unwrap();
            streams.push(s);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let many = measure(10).await;
        let rss_many = rss_kib(pid);
        println!(
            "statelyd CPU per 1 s tick on 5000 servers: {:.1} ms with 1 watcher, {:.1} ms with 1000 watchers (ratio {:.2}); \
             memory per watcher {:.1} KiB",
            one * 1e3,
            many * 1e3,
            many / one,
            (rss_many - rss_one) / 999.0
        );
        drop(streams);
    });
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    big.kill().unwrap();
    big.wait().unwrap();

    // Latency: a small HAProxy whose server s1 is a listener we stop and start.
    let small_dir = dir.path().join("small");
    std::fs::create_dir_all(&small_dir).unwrap();
    let backend_port = free_port();
    let (mut small, small_sock) = start_haproxy_sock(
        &small_dir,
        &format!(
            "frontend fe\n  bind 127.0.0.1:{}\n  default_backend be\nbackend be\n  server s1 127.0.0.1:{backend_port} check inter 50ms fall 1 rise 1\n",
            free_port()
        ),
    );
    let mut listener = Some(std::net::TcpListener::bind(("127.0.0.1", backend_port)).unwrap());
    let (mut daemon, addr) = statelyd(&dir.path().join("d2"), &small_sock);
    let mut lat = Vec::new();
    rt.block_on(async {
        let mut c = clients(&addr, 1).await.remove(0);
        let mut stream = c
            .watch_stats(watch_req(100, vec!["s1".into()]))
            .await
            .unwrap()
            .into_inner();
        // Wait until s1 is UP in the stream before the first change.
        loop {
            let u = stream.message().await.unwrap().unwrap();
            let rows = match u.update {
                Some(pb::stats_update::Update::Snapshot(s)) => s.rows,
                Some(pb::stats_update::Update::Delta(d)) => {
                    d.changed.into_iter().filter_map(|c| c.row).collect()
                }
                _ => Vec::new(),
            };
            if rows.iter().any(|r| r.status.as_ref().unwrap().raw == "UP") {
                break;
            }
        }
        for round in 0..20 {
            let want = if listener.is_some() { "DOWN" } else { "UP" };
            listener = match listener.take() {
                Some(l) => {
                    drop(l);
                    None
                }
                None => Some(std::net::TcpListener::bind(("127.0.0.1", backend_port)).unwrap()),
            };
            let sock = small_sock.clone();
            // The tight poll: the moment HAProxy reports the new status.
            let seen = std::thread::spawn(move || {
                loop {
                    let text = show_stat(&sock);
                    let rows = parse::parse(&text).unwrap();
                    if rows
                        .iter()
                        .any(|r| r.server == "s1" && r.status.raw == want)
                    {
                        return Instant::now();
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
            let arrived = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    let u = stream.message().await.unwrap().unwrap();
                    if let Some(pb::stats_update::Update::Delta(d)) = u.update
                        && d.changed
                            .iter()
                            .any(|ch| ch.row.as_ref().unwrap().status.as_ref().unwrap().raw == want)
                    {
                        break Instant::now();
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("round {round}: no change to {want} within 10 s"));
            let seen = seen.join().unwrap();
            lat.push(arrived.saturating_duration_since(seen).as_secs_f64() * 1e3);
        }
    });
    lat.sort_by(f64::total_cmp);
    println!(
        "status change → WatchStats client (100 ms interval), 20 changes: median {:.1} ms, max {:.1} ms (goal ≤ 105 ms)",
        median(lat.clone()),
        lat.last().unwrap()
    );
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    small.kill().unwrap();
    small.wait().unwrap();
}
