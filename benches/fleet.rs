//! Two statelyd nodes on one PostgreSQL ledger (a throwaway cluster on loopback, `fsync=off`),
//! in one run, each figure beside its single-node peer:
//! - cancel: a job blocked in its command on node B, cancelled (and waited for to its unwind)
//!   from B itself, then from node A through the ledger — p50/p99 of each;
//! - events: a job on B printing a line every 10 ms, watched from B and from A at once —
//!   each event's delay from its timestamp to its arrival, p50/p99 at each watcher;
//! - idle: both nodes left alone — the database's transactions per second per node, and
//!   each daemon's CPU and RSS.
//!
//! `cargo bench --bench fleet` (BENCH_CANCELS, default 100; BENCH_LINES, default 500;
//! BENCH_IDLE_SECS, default 30).

mod support;
use support::spine::{Client, client, job, start};
use support::{Postgres, cpu_secs, rss_kib};

use stately::pb;
use std::time::{Duration, Instant};

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Submits a blocking job on `on` and waits until its command runs.
async fn blocked(on: &mut Client, n: usize) -> String {
    let id = on
        .submit_job(job("block", n))
        .await
        .unwrap()
        .into_inner()
        .id;
    let mut s = on
        .watch_job(pb::WatchJobRequest {
            job_id: id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(e) = s.message().await.unwrap() {
        if matches!(e.event, Some(pb::job_event::Event::StepStarted(ref st)) if st.index == 1) {
            return id;
        }
    }
    panic!("the job ended before its command ran");
}

async fn cancel(from: &mut Client, id: &str) -> f64 {
    let t = Instant::now();
    let job = from
        .cancel_job(pb::CancelJobRequest {
            job_id: id.into(),
            reason: "bench".into(),
            wait: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, pb::JobState::Cancelled as i32, "{job:?}");
    t.elapsed().as_secs_f64() * 1e3
}

/// Each log event's delay (ms) from its timestamp to its arrival at a watcher on `on`.
async fn delays(mut on: Client, id: String) -> Vec<f64> {
    let mut s = on
        .watch_job(pb::WatchJobRequest {
            job_id: id,
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    let mut last = 0;
    while let Some(e) = s.message().await.unwrap() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        assert_eq!(e.seq, last + 1, "gap-free");
        last = e.seq;
        if let (Some(pb::job_event::Event::Log(_)), Some(at)) = (&e.event, &e.at) {
            let at = Duration::new(at.seconds as u64, at.nanos as u32);
            out.push((now.as_secs_f64() - at.as_secs_f64()) * 1e3);
        }
    }
    out
}

fn main() {
    let cancels: usize = std::env::var("BENCH_CANCELS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let lines: usize = std::env::var("BENCH_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let pg = Postgres::start();
    let lines_runbook = format!(
        r#"
[[runbook]]
name = "lines"
[[runbook.step]]
type = "command"
argv = ["/bin/sh", "-c", "i=0; while [ $i -lt {lines} ]; do i=$((i+1)); echo line $i; sleep 0.01; done"]
"#
    );
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut a, a_addr) = start(
        a_dir.path(),
        &format!("node = \"a\"\n[store]\nurl = \"{}\"\n", pg.url),
    );
    let (mut b, b_addr) = start(
        b_dir.path(),
        &format!(
            "node = \"b\"\n[store]\nurl = \"{}\"\n{lines_runbook}",
            pg.url
        ),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (mut ca, mut cb) = (client(&a_addr).await, client(&b_addr).await);
        let (mut local, mut remote) = (Vec::new(), Vec::new());
        for n in 0..cancels {
            // Taking turns, so a busy moment of the machine falls on both.
            let id = blocked(&mut cb, 2 * n).await;
            local.push(cancel(&mut cb, &id).await);
            let id = blocked(&mut cb, 2 * n + 1).await;
            remote.push(cancel(&mut ca, &id).await);
        }
        let (l50, l99) = (percentile(&mut local, 0.5), percentile(&mut local, 0.99));
        let (r50, r99) = (percentile(&mut remote, 0.5), percentile(&mut remote, 0.99));
        println!(
            "cancel to unwound, {cancels} each: on the job's node p50 {l50:.1} ms p99 {l99:.1} ms; from the other node p50 {r50:.1} ms p99 {r99:.1} ms (ratio p50 {:.2}, p99 {:.2})",
            r50 / l50,
            r99 / l99
        );

        for round in 1..=3 {
            let id = cb
                .submit_job(pb::SubmitJobRequest {
                    spec: Some(pb::JobSpec {
                        kind: Some(pb::job_spec::Kind::Runbook(pb::RunbookJob {
                            runbook: "lines".into(),
                            params: Default::default(),
                        })),
                    }),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .id;
            let here = tokio::spawn(delays(cb.clone(), id.clone()));
            let there = tokio::spawn(delays(ca.clone(), id));
            let (mut here, mut there) = (here.await.unwrap(), there.await.unwrap());
            assert_eq!(here.len(), lines);
            assert_eq!(there.len(), lines);
            println!(
                "events round {round}, {lines} lines: watcher on the job's node p50 {:.1} ms p99 {:.1} ms; on the other node p50 {:.1} ms p99 {:.1} ms",
                percentile(&mut here, 0.5),
                percentile(&mut here, 0.99),
                percentile(&mut there, 0.5),
                percentile(&mut there, 0.99)
            );
        }

        // The cost of a node at idle: the database's transactions (every statement of a node
        // at idle is one: heartbeat, the reconciling reads) and each daemon's CPU and RSS.
        let idle: u64 = std::env::var("BENCH_IDLE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (admin, conn) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let xacts = async || -> i64 {
            admin
                .query_one(
                    "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = current_database()",
                    &[],
                )
                .await
                .unwrap()
                .get(0)
        };
        // The statistics are flushed at most once a second: read after a pause each time.
        let before = xacts().await;
        let cpu = (cpu_secs(a.id()), cpu_secs(b.id()));
        let t = std::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(idle)).await;
        let after = xacts().await;
        let secs = t.elapsed().as_secs_f64();
        let cpu = (cpu_secs(a.id()) - cpu.0, cpu_secs(b.id()) - cpu.1);
        // Less this bench's own reading transaction.
        let per_node = (after - before - 1) as f64 / 2.0 / secs;
        println!(
            "idle {secs:.0} s, 2 nodes: {per_node:.2} database transactions/s per node; statelyd CPU a {:.2} % b {:.2} %; RSS a {:.1} MiB b {:.1} MiB",
            cpu.0 / secs * 100.0,
            cpu.1 / secs * 100.0,
            rss_kib(a.id()) / 1024.0,
            rss_kib(b.id()) / 1024.0
        );
    });
    let _ = a.kill();
    let _ = b.kill();
    drop(pg);
}
