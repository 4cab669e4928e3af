//! The cost of a `/metrics` scrape at scale, side by side in one run: statelyd with a
//! 5000-server HAProxy target (its shared poller running for a watcher) and 10,000 jobs in its
//! ledger, beside prometheus-haproxy-exporter scraping the same HAProxy. CPU per scrape of
//! each process (statelyd's background poll subtracted), bytes, and wall time.
//!
//! `cargo bench --bench metrics` (needs the Debian packages haproxy and
//! prometheus-haproxy-exporter).

mod support;
use support::{
    Auth, cpu_secs, free_port, haproxy_5000, http_get, median, spawn_statelyd, start_exporter,
};

use stately::pb;
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-operator-token-00000";
const JOBS: usize = 10_000;
const SCRAPES: usize = 20;

/// CPU per scrape of `pid` at `port`, over `SCRAPES` scrapes, less `background` CPU seconds
/// per second of wall time; and the median wall time of one scrape, and its size.
fn per_scrape(pid: u32, port: u16, path: &str, background: f64) -> (f64, f64, usize) {
    http_get(port, path);
    let mut walls = Vec::new();
    let mut bytes = 0;
    let (c0, t0) = (cpu_secs(pid), Instant::now());
    for _ in 0..SCRAPES {
        let t = Instant::now();
        bytes = http_get(port, path);
        walls.push(t.elapsed().as_secs_f64());
    }
    let cpu = cpu_secs(pid) - c0 - background * t0.elapsed().as_secs_f64();
    (cpu.max(0.0) / SCRAPES as f64, median(walls), bytes)
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hdir = dir.path().join("haproxy");
    std::fs::create_dir_all(&hdir).unwrap();
    let (mut haproxy, sock) = haproxy_5000(&hdir);

    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let metrics_port = free_port();
    let cfg = dir.path().join("statelyd.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nsync = \"normal\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n\
             [history]\nkeep_total = 20000\nkeep_per_resource = 20000\n\
             [[haproxy]]\nname = \"edge\"\nstats_socket = \"{}\"\n\
             [[token]]\nname = \"bench\"\nrole = \"operator\"\nvalue = \"{TOKEN}\"\n\
             [[runbook]]\nname = \"touch\"\nresources = []\nroots = [\"{root}\"]\n\
             [runbook.params.n]\npattern = \"[0-9]+\"\n\
             [[runbook.step]]\ntype = \"write_file\"\npath = \"{root}/{{n}}\"\ncontent = \"x\"\n",
            dir.path().join("data").display(),
            sock.display(),
            root = root.display(),
        ),
    )
    .unwrap();
    let (mut daemon, addr) = spawn_statelyd(&cfg);
    let pid = daemon.id();

    let _watch = rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        // 10,000 finished jobs in the ledger.
        let t = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..8 {
            let ch = ch.clone();
            tasks.spawn(async move {
                let mut c = pb::jobs_client::JobsClient::with_interceptor(ch, Auth(TOKEN));
                for i in (w..JOBS).step_by(8) {
                    let mut p = std::collections::HashMap::new();
                    p.insert("n".to_owned(), i.to_string());
                    c.submit_job(pb::SubmitJobRequest {
                        node: String::new(),
                        spec: Some(pb::JobSpec {
                            kind: Some(pb::job_spec::Kind::Runbook(pb::RunbookJob {
                                runbook: "touch".into(),
                                params: p,
                            })),
                        }),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                }
            });
        }
        tasks.join_all().await;
        let mut c = pb::jobs_client::JobsClient::with_interceptor(ch.clone(), Auth(TOKEN));
        loop {
            let busy = c
                .list_jobs(pb::ListJobsRequest {
                    states: vec![pb::JobState::Pending as i32, pb::JobState::Running as i32],
                    page_size: 1,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            if busy.jobs.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "{JOBS} jobs in the ledger ({:.1} s to run them)",
            t.elapsed().as_secs_f64()
        );
        // A watcher keeps the target's shared poller running (1 s); a scrape reads its latest
        // poll.
        let mut stats = pb::stats_client::StatsClient::with_interceptor(ch, Auth(TOKEN));
        let mut s = stats
            .watch_stats(pb::WatchStatsRequest {
                target: "edge".into(),
                changes_only: true,
                interval: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        s.message().await.unwrap();
        s
    });
    std::thread::sleep(Duration::from_secs(2));
    let text_len = http_get(metrics_port, "/metrics");
    // statelyd's own CPU with only the poller running, per second.
    let (c0, t0) = (cpu_secs(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(5));
    let background = (cpu_secs(pid) - c0) / t0.elapsed().as_secs_f64();

    let (mut exporter, exporter_port) = start_exporter(&sock);

    // Alternate the two, three rounds each, so a busy moment of the machine hits both.
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..3 {
        ours.push(per_scrape(pid, metrics_port, "/metrics", background));
        theirs.push(per_scrape(exporter.id(), exporter_port, "/metrics", 0.0));
    }
    let cpu = |v: &[(f64, f64, usize)]| v.iter().map(|r| r.0 * 1e3).collect::<Vec<_>>();
    let (o, t) = (cpu(&ours), cpu(&theirs));
    let ratios: Vec<f64> = t.iter().zip(&o).map(|(t, o)| t / o).collect();
    println!(
        "statelyd /metrics (5000 servers, {JOBS} jobs; {:.2} MB): CPU per scrape {} ms, wall {:.1} ms (background poller {:.1} ms/s subtracted)",
        text_len as f64 / 1e6,
        o.iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(" / "),
        median(ours.iter().map(|r| r.1 * 1e3).collect()),
        background * 1e3
    );
    println!(
        "prometheus-haproxy-exporter /metrics ({:.2} MB): CPU per scrape {} ms, wall {:.1} ms",
        theirs[0].2 as f64 / 1e6,
        t.iter()
            .map(|v| format!("{v:.1}"))
            .collect::<Vec<_>>()
            .join(" / "),
        median(theirs.iter().map(|r| r.1 * 1e3).collect())
    );
    println!(
        "ratio (exporter / statelyd CPU per scrape): 1/{:.0} median, rounds {} (goal ≥ 100)",
        median(ratios.clone()),
        ratios
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    exporter.kill().unwrap();
    exporter.wait().unwrap();
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    haproxy.kill().unwrap();
    haproxy.wait().unwrap();
}
