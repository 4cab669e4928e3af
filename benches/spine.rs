//! The spine's figures, measured against a real statelyd (release build) on loopback:
//! - cancel latency: CancelJob(wait) for a job blocked in a step (a child process to kill and a
//!   file to restore), p50/p99, beside a unary GetJob measured in the same run;
//! - durable throughput: 64 concurrent clients running jobs whose one step writes a small
//!   file (journal synced before each reply), jobs/s;
//! - idle RSS of the daemon, fresh and after the load.
//!
//! `cargo bench --bench spine` (set BENCH_CANCELS / BENCH_JOBS to change the counts).

mod support;
use support::spine::{client, job, start, throughput};
use support::{cpu_secs, rss_kib};

use stately::pb;
use std::time::{Duration, Instant};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

async fn cancel_latency(addr: &str, count: usize) -> (Vec<Duration>, Vec<Duration>) {
    let mut c = client(addr).await;
    let (mut cancels, mut gets) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for n in 0..count {
        // Run attached, so the job's events say when the blocking step has started.
        let mut s = c.run_job(job("block", n)).await.unwrap().into_inner();
        let id = loop {
            let e = s.message().await.unwrap().unwrap();
            if let Some(pb::job_event::Event::StepStarted(st)) = &e.event
                && st.index == 1
            {
                break e.job_id;
            }
        };
        let t = Instant::now();
        c.get_job(pb::GetJobRequest { job_id: id.clone() })
            .await
            .unwrap();
        gets.push(t.elapsed());
        let t = Instant::now();
        let j = c
            .cancel_job(pb::CancelJobRequest {
                job_id: id,
                reason: String::new(),
                wait: true,
            })
            .await
            .unwrap()
            .into_inner();
        cancels.push(t.elapsed());
        assert_eq!(j.state, pb::JobState::Cancelled as i32);
        while s.message().await.unwrap().is_some() {}
    }
    cancels.sort();
    gets.sort();
    (cancels, gets)
}

/// Runs `total` jobs writing files `write-{first}`… (new files, as the bare writes make).
/// The same side effect without stately: 64 workers each replacing small files atomically
/// (temp file, fsync, rename, fsync the directory), as a script would.
async fn bare_writes(dir: &std::path::Path, workers: usize, total: usize) -> Duration {
    use std::io::Write;
    let dir = dir.join("bare");
    std::fs::create_dir_all(&dir).unwrap();
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..workers {
        let dir = dir.clone();
        tasks.spawn_blocking(move || {
            let mut n = k;
            while n < total {
                let tmp = dir.join(format!(".w{n}.tmp"));
                let mut f = std::fs::File::create_new(&tmp).unwrap();
                f.write_all(b"hello\n").unwrap();
                f.sync_all().unwrap();
                std::fs::rename(&tmp, dir.join(format!("w{n}"))).unwrap();
                std::fs::File::open(&dir).unwrap().sync_all().unwrap();
                n += workers;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    t.elapsed()
}

fn main() {
    let cancels: usize = std::env::var("BENCH_CANCELS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let jobs: usize = std::env::var("BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, addr) = start(dir.path(), "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = rss_kib(daemon.id());

        let mut rates = Vec::new();
        for round in 1..=3 {
            let me = cpu_secs(std::process::id());
            let bare = bare_writes(&dir.path().join(format!("round{round}")), 64, jobs).await;
            let bare_cpu = (cpu_secs(std::process::id()) - me) * 1e6 / jobs as f64;
            // The same writes by 4 threads, as many as statelyd runs file steps on: 64
            // threads creating files in one directory spend CPU waiting on each other.
            let me = cpu_secs(std::process::id());
            let four = bare_writes(&dir.path().join(format!("round{round}-4")), 4, jobs).await;
            let four_cpu = (cpu_secs(std::process::id()) - me) * 1e6 / jobs as f64;
            let four_rate = jobs as f64 / four.as_secs_f64();
            let cpu = cpu_secs(daemon.id());
            let (done, wall) = throughput(&addr, 64, jobs, round * jobs).await;
            let cpu = cpu_secs(daemon.id()) - cpu;
            let rate = done as f64 / wall.as_secs_f64();
            let bare_rate = jobs as f64 / bare.as_secs_f64();
            println!(
                "durable throughput, round {round}: {done} jobs (RunJob, one write_file step) by 64 clients in {:.2} s = {rate:.0} jobs/s; \
                 statelyd CPU {:.0} µs/job; the same writes without stately: {bare_rate:.0} writes/s (ratio {:.2}), {bare_cpu:.0} µs CPU each \
                 ; by 4 threads: {four_rate:.0} writes/s (ratio {:.2}), {four_cpu:.0} µs CPU each (stately's CPU beyond the write: {:.0} µs/job)",
                wall.as_secs_f64(),
                cpu * 1e6 / done as f64,
                rate / bare_rate,
                rate / four_rate,
                cpu * 1e6 / done as f64 - four_cpu
            );
            rates.push(rate);
            println!("  statelyd RSS right after round {round}: {:.1} MiB", rss_kib(daemon.id()) / 1024.0);
        }
        rates.sort_by(f64::total_cmp);
        println!("durable throughput, median of 3: {:.0} jobs/s", rates[1]);

        let (c, g) = cancel_latency(&addr, cancels).await;
        println!("cancel latency over {} jobs (CancelJob wait=true, child killed, file restored):", c.len());
        println!("  CancelJob  p50 {}  p99 {}", ms(percentile(&c, 0.5)), ms(percentile(&c, 0.99)));
        println!("  GetJob     p50 {}  p99 {}", ms(percentile(&g, 0.5)), ms(percentile(&g, 0.99)));
        println!(
            "  ratio      p50 {:.1}x  p99 {:.1}x",
            percentile(&c, 0.5).as_secs_f64() / percentile(&g, 0.5).as_secs_f64(),
            percentile(&c, 0.99).as_secs_f64() / percentile(&g, 0.99).as_secs_f64()
        );

        // statelyd hands freed memory back every 10 s.
        tokio::time::sleep(Duration::from_secs(12)).await;
        println!("idle RSS: {:.1} MiB fresh, {:.1} MiB after the load", idle / 1024.0, rss_kib(daemon.id()) / 1024.0);
    });
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}
