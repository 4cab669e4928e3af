//! The job ledger on PostgreSQL beside SQLite, in one run: two real statelyd processes alike
//! but for `[store]`, one on its SQLite file, one on a throwaway PostgreSQL cluster on
//! loopback (scripts/pg-test-cluster.sh, `fsync=off` as the tests run it, so the figure is the
//! ledger's protocol and CPU, not the disk), taking turns: 64 concurrent clients running jobs
//! whose one step writes a small file, as in the spine bench. Per round: jobs/s, statelyd's
//! CPU per job, and PostgreSQL's (its server processes').
//!
//! `cargo bench --bench ledger` (BENCH_JOBS per round, default 5000; 3 rounds each).

mod support;
use support::spine::{start, throughput};
use support::{cpu_secs, median};

use std::path::Path;
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
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg-test-cluster.sh");
    let pg_dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(pg_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(&script)
        .arg("start")
        .arg(pg_dir.path().join("pg"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let postmaster: u32 = std::fs::read_to_string(pg_dir.path().join("pg/data/postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();

    let sqlite_dir = tempfile::tempdir().unwrap();
    let postgres_dir = tempfile::tempdir().unwrap();
    let (mut sqlite, sqlite_addr) = start(sqlite_dir.path(), "");
    let (mut postgres, postgres_addr) =
        start(postgres_dir.path(), &format!("[store]\nurl = \"{url}\"\n"));
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
        let (s, p) = (median(s_rates), median(p_rates));
        let (sc, pc) = (median(s_cpu), median(p_cpu));
        println!(
            "median of 3 ({jobs} jobs a round, 64 clients): SQLite {s:.0} jobs/s, PostgreSQL {p:.0} jobs/s (ratio {:.2}); statelyd CPU/job SQLite {sc:.0} µs, PostgreSQL {pc:.0} µs (ratio {:.2}); PostgreSQL's own {:.0} µs/job",
            p / s,
            pc / sc,
            median(pg_cpu)
        );
    });
    let _ = sqlite.kill();
    let _ = postgres.kill();
    let _ = std::process::Command::new(&script)
        .arg("stop")
        .arg(pg_dir.path().join("pg"))
        .status();
}
