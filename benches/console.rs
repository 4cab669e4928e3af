//! The web console in a real headless Chromium (benches/console/bench.mjs, playwright-core)
//! against a real statelyd and haproxy: page load to the first job row; a job submitted over
//! gRPC to its row in the open table; event latency from the engine to the page beside the
//! same events reaching a gRPC WatchJob client in the same run (a runbook step prints its
//! clock, `date +%s%N`, every 10 ms: both clients see each line as a log event, and the
//! latency is its arrival minus the time it carries); memory per open console (statelyd's
//! RSS, and the page's JS heap).
//!
//! `cargo bench --bench console` (needs haproxy, chromium, and playwright-core, which
//! scripts/test.sh installs under target/console-node).

mod support;
use support::{Auth, free_port, median, rss_kib, spawn_statelyd, start_haproxy_sock};

use stately::pb;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

const TOKEN: &str = "bench-operator-token-000000";
const TICKS: usize = 1000;
const CONSOLES: usize = 20;

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1e3
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Latencies (ms) of the lines carrying a clock: arrival minus the clock.
fn latencies(lines: &[(String, f64)]) -> Vec<f64> {
    lines
        .iter()
        .filter_map(|(text, at)| {
            let ns: f64 = text.trim().parse().ok()?;
            Some(at - ns / 1e6)
        })
        .collect()
}

type Jobs = pb::jobs_client::JobsClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Auth>,
>;

fn runbook(name: &str) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::Runbook(pb::RunbookJob {
                runbook: name.into(),
                params: Default::default(),
            })),
        }),
        ..Default::default()
    }
}

#[tokio::main]
async fn main() {
    let modules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-node/node_modules");
    assert!(
        modules.join("playwright-core").exists(),
        "{} has no playwright-core: run scripts/test.sh once (it installs it)",
        modules.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut haproxy, sock) = start_haproxy_sock(
        dir.path(),
        &format!(
            "backend web\n  server s1 {0} check inter 1s\n  server s2 {0} check inter 1s\n",
            web.local_addr().unwrap()
        ),
    );
    let port = free_port();
    let config = dir.path().join("stately.toml");
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:0"
data_dir = "{data}"
console_listen = "127.0.0.1:{port}"
[[token]]
name = "bench"
role = "operator"
value = "{TOKEN}"
[[haproxy]]
name = "edge"
stats_socket = "{sock}"
[[runbook]]
name = "quick"
roots = ["{root}"]
[[runbook.step]]
type = "command"
argv = ["/bin/true"]
[[runbook]]
name = "ticks"
roots = ["{root}"]
[[runbook.step]]
name = "ticks"
type = "command"
argv = ["/bin/sh", "-c", "sleep 2; i=0; while [ $i -lt {TICKS} ]; do date +%s%N; i=$((i+1)); sleep 0.01; done"]
"#,
            data = dir.path().join("data").display(),
            sock = sock.display(),
            root = dir.path().display(),
        ),
    )
    .unwrap();
    let (mut statelyd, addr) = spawn_statelyd(&config);
    let pid = statelyd.id();
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    let mut jobs: Jobs = pb::jobs_client::JobsClient::with_interceptor(ch, Auth(TOKEN));
    // A job for the table's first row.
    jobs.submit_job(runbook("quick")).await.unwrap();

    let mut node = Command::new("node")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/console/bench.mjs"
        ))
        .env("NODE_MODULES", &modules)
        .env("CONSOLE_URL", format!("http://127.0.0.1:{port}/"))
        .env("OPERATOR_TOKEN", TOKEN)
        .env("CONSOLES", CONSOLES.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("node runs");
    let mut to_node = node.stdin.take().unwrap();
    let from_node = BufReader::new(node.stdout.take().unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in from_node.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut grpc_lat: Vec<Vec<f64>> = Vec::new();
    let mut page_lat: Vec<Vec<f64>> = Vec::new();
    let mut watcher: Option<tokio::task::JoinHandle<Vec<(String, f64)>>> = None;
    let mut rss_before = 0.0;
    let mut rss_after = 0.0;
    let mut load = Vec::new();
    let mut row = Vec::new();
    let mut heaps: Vec<f64> = Vec::new();
    while let Some(line) = rx.recv().await {
        if let Some(what) = line.strip_prefix("ask: ") {
            let answer = match what {
                "submit" => {
                    let at = now_ms();
                    let j = jobs
                        .submit_job(runbook("quick"))
                        .await
                        .unwrap()
                        .into_inner();
                    format!("{} {at}", j.id)
                }
                "ticks" => {
                    let j = jobs
                        .submit_job(runbook("ticks"))
                        .await
                        .unwrap()
                        .into_inner();
                    let mut c = jobs.clone();
                    let id = j.id.clone();
                    let seen = Arc::new(Mutex::new(Vec::new()));
                    watcher = Some(tokio::spawn(async move {
                        let mut s = c
                            .watch_job(pb::WatchJobRequest {
                                job_id: id,
                                after_seq: 0,
                            })
                            .await
                            .unwrap()
                            .into_inner();
                        while let Some(e) = s.message().await.unwrap() {
                            let at = now_ms();
                            if let Some(pb::job_event::Event::Log(l)) = e.event {
                                seen.lock().unwrap().push((l.message, at));
                            }
                        }
                        std::mem::take(&mut *seen.lock().unwrap())
                    }));
                    j.id
                }
                "ticks-done" => {
                    let lines = watcher.take().unwrap().await.unwrap();
                    grpc_lat.push(latencies(&lines));
                    String::new()
                }
                "rss-before" => {
                    rss_before = rss_kib(pid);
                    String::new()
                }
                "rss-after" => {
                    rss_after = rss_kib(pid);
                    String::new()
                }
                other => panic!("the bench page asks for {other}"),
            };
            writeln!(to_node, "ok {answer}").unwrap();
        } else if let Some(r) = line.strip_prefix("result: ") {
            let (name, json) = r.split_once(' ').unwrap();
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            match name {
                "load_ms" => load = floats(&v),
                "row_ms" => row = floats(&v),
                "heap_bytes" => heaps = floats(&v),
                "events" => {
                    let lines: Vec<(String, f64)> = v
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| (p[0].as_str().unwrap().to_owned(), p[1].as_f64().unwrap()))
                        .collect();
                    page_lat.push(latencies(&lines));
                }
                _ => panic!("an unknown result {name}"),
            }
        } else if line.starts_with("FAILED") {
            panic!("{line}");
        }
    }
    assert!(node.wait().unwrap().success(), "the bench page failed");
    let _ = statelyd.kill();
    let _ = haproxy.kill();

    println!("console (statelyd + headless chromium, one machine)");
    println!(
        "  page load to first job row: median {:.0} ms, p90 {:.0} ms ({} loads)",
        median(load.clone()),
        pct(load.clone(), 0.9),
        load.len()
    );
    println!(
        "  job submitted over gRPC to its row in the open table: median {:.0} ms, max {:.0} ms ({} jobs; the table polls ListJobs every 1 s)",
        median(row.clone()),
        pct(row.clone(), 1.0),
        row.len()
    );
    println!("  event latency, a line printed by a step to its arrival (ms):");
    for (k, (p, g)) in page_lat.iter().zip(&grpc_lat).enumerate() {
        assert_eq!(p.len(), TICKS, "the page saw every line");
        assert_eq!(g.len(), TICKS, "the gRPC watcher saw every line");
        let (p50, p99) = (pct(p.clone(), 0.5), pct(p.clone(), 0.99));
        let (g50, g99) = (pct(g.clone(), 0.5), pct(g.clone(), 0.99));
        println!(
            "    run {}: page p50 {p50:.2} p99 {p99:.2}; gRPC WatchJob p50 {g50:.2} p99 {g99:.2}; ratio p50 {:.2}× p99 {:.2}×",
            k + 1,
            p50 / g50,
            p99 / g99
        );
    }
    let kib = (rss_after - rss_before) / CONSOLES as f64;
    println!(
        "  memory per open console on the HAProxy page ({CONSOLES} open): statelyd +{kib:.0} KiB RSS each ({rss_before:.0} → {rss_after:.0} KiB); page JS heap median {:.1} MiB",
        median(heaps) / 1048576.0
    );
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}
