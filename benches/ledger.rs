//! The job ledger on PostgreSQL beside SQLite, in one run: two real statelyd processes alike
//! but for `[store]`, one on its SQLite file, one on a throwaway PostgreSQL cluster on
//! loopback (scripts/pg-test-cluster.sh, `fsync=off` as the tests run it, so the figure is the
//! ledger's protocol and CPU, not the disk), taking turns: 64 concurrent clients running jobs
//! whose one step writes a small file, as in the spine bench. Per round: jobs/s, statelyd's
//! CPU per job, and PostgreSQL's (its server processes'). Then a fleet: three statelyd nodes
//! on that one ledger, the 64 clients split among them, their jobs/s together beside the
//! SQLite node's of the same run.
//!
//! `cargo bench --bench ledger` (BENCH_JOBS per round, default 5000; 3 rounds each).

mod support;
use support::spine::{start, throughput};
use support::{Postgres, cpu_secs, median};

use std::time::Duration;

/// CPU seconds of the cluster's server processes (the postmaster and its children).
fn postgres_cpu(postmaster: u32) -> f64 {
    let mut total = cpu_secs(postmaster) + children_cpu(postmaster);
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid: u32 = stat
            .rsplit_once(") ")
            .unwrap()
            .1
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        if ppid == postmaster {
            total += cpu_secs(pid);
        }
    }
    total
}

/// CPU of the postmaster's children that have exited (backends of closed connections).
fn children_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat
        .rsplit_once(") ")
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    (f[13].parse::<f64>().unwrap() + f[14].parse::<f64>().unwrap()) / 100.0
}

fn main() {
    let jobs: usize = std::env::var("BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let pg = Postgres::start();
    let (url, postmaster) = (pg.url.clone(), pg.postmaster);

    let sqlite_dir = tempfile::tempdir().unwrap();
    let postgres_dir = tempfile::tempdir().unwrap();
    let (mut sqlite, sqlite_addr) = start(sqlite_dir.path(), "");
    let (mut postgres, postgres_addr) =
        start(postgres_dir.path(), &format!("[store]\nurl = \"{url}\"\n"));
    let fleet_dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (fleet, fleet_addrs): (Vec<_>, Vec<_>) = fleet_dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            start(
                d.path(),
                &format!("node = \"fleet-{i}\"\n[store]\nurl = \"{url}\"\n"),
            )
        })
        .unzip();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (mut s_rates, mut p_rates, mut s_cpu, mut p_cpu, mut pg_cpu) =
            (vec![], vec![], vec![], vec![], vec![]);
        for round in 0..3 {
            let cpu = cpu_secs(sqlite.id());
            let (_, wall) = throughput(&sqlite_addr, 64, jobs, round * jobs).await;
            let cpu = cpu_secs(sqlite.id()) - cpu;
            s_rates.push(jobs as f64 / wall.as_secs_f64());
            s_cpu.push(cpu * 1e6 / jobs as f64);

            let (cpu, db) = (cpu_secs(postgres.id()), postgres_cpu(postmaster));
            let (_, wall) = throughput(&postgres_addr, 64, jobs, round * jobs).await;
            let (cpu, db) = (
                cpu_secs(postgres.id()) - cpu,
                postgres_cpu(postmaster) - db,
            );
            p_rates.push(jobs as f64 / wall.as_secs_f64());
            p_cpu.push(cpu * 1e6 / jobs as f64);
            pg_cpu.push(db * 1e6 / jobs as f64);
            println!(
                "round {}: SQLite {:.0} jobs/s, statelyd {:.0} µs CPU/job; PostgreSQL {:.0} jobs/s, statelyd {:.0} µs CPU/job, PostgreSQL's processes {:.0} µs CPU/job",
                round + 1,
                s_rates[round],
                s_cpu[round],
                p_rates[round],
                p_cpu[round],
                pg_cpu[round]
            );
        }
        // The fleet, after the single nodes (which are idle meanwhile).
        let mut fleet_rates = vec![];
        for round in 0..3 {
            let mut runs = tokio::task::JoinSet::new();
            for (i, addr) in fleet_addrs.iter().enumerate() {
                let addr = addr.clone();
                let (clients, share) = (if i == 0 { 22 } else { 21 }, jobs / 3);
                runs.spawn(async move {
                    throughput(&addr, clients, share, (3 + round) * jobs + i * share).await
                });
            }
            let t = std::time::Instant::now();
            let mut done = 0;
            while let Some(r) = runs.join_next().await {
                done += r.unwrap().0;
            }
            fleet_rates.push(done as f64 / t.elapsed().as_secs_f64());
            println!(
                "fleet round {}: 3 PostgreSQL nodes {:.0} jobs/s together",
                round + 1,
                fleet_rates[round]
            );
        }
        let f = median(fleet_rates);
        let (s, p) = (median(s_rates), median(p_rates));
        let (sc, pc) = (median(s_cpu), median(p_cpu));
        println!(
            "median of 3 ({jobs} jobs a round, 64 clients): SQLite {s:.0} jobs/s, PostgreSQL {p:.0} jobs/s (ratio {:.2}); statelyd CPU/job SQLite {sc:.0} µs, PostgreSQL {pc:.0} µs (ratio {:.2}); PostgreSQL's own {:.0} µs/job",
            p / s,
            pc / sc,
            median(pg_cpu)
        );
        println!(
            "median of 3: 3 PostgreSQL nodes {f:.0} jobs/s together beside one SQLite node's {s:.0} (ratio {:.2})",
            f / s
        );
    });
    for mut n in fleet {
        let _ = n.kill();
    }
    let _ = sqlite.kill();
    let _ = postgres.kill();
    drop(pg);
}
