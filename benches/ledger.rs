//! The job ledger on PostgreSQL beside SQLite, in one run: two real statelyd processes alike
//! but for `[store]`, one on its SQLite file, one on a throwaway PostgreSQL cluster on
//! loopback (scripts/pg-test-cluster.sh, `fsync=off` as the tests run it, so the figure is the
//! ledger's protocol and CPU, not the disk), taking turns: 64 concurrent clients running jobs
//! whose one step writes a small file, as in the spine bench. Per round: jobs/s, statelyd's
//! CPU per job, and PostgreSQL's (its server processes').
//!
//! `cargo bench --bench ledger` (BENCH_JOBS per round, default 5000; 3 rounds each).

mod support;
use support::{Auth, cpu_secs, median, spawn_statelyd};

use stately::pb;
use stately::pb::jobs_client::JobsClient;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const TOKEN: &str = "bench-operator-token-000000";

type Client = JobsClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>;

fn start(dir: &Path, store: &str) -> (Child, String) {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let config = dir.join("statelyd.toml");
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:0"
data_dir = "{data}"
[[token]]
name = "bench"
role = "operator"
value = "{TOKEN}"

[[runbook]]
name = "write"
roots = ["{root}"]
resources = ["write:{{n}}"]
[runbook.params.n]
pattern = "[0-9]+"
[[runbook.step]]
type = "write_file"
path = "{root}/write-{{n}}"
content = "hello\n"
{store}"#,
            data = dir.join("data").display(),
            root = root.display(),
        ),
    )
    .unwrap();
    spawn_statelyd(&config)
}

async fn client(addr: &str) -> Client {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    JobsClient::with_interceptor(ch, Auth(TOKEN))
}

fn job(n: usize) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::Runbook(pb::RunbookJob {
                runbook: "write".into(),
                params: [("n".to_owned(), n.to_string())].into_iter().collect(),
            })),
        }),
        ..Default::default()
    }
}

/// `total` jobs by `clients` clients, each attached (RunJob) until its job succeeded.
async fn throughput(addr: &str, clients: usize, total: usize, first: usize) -> Duration {
    let mut tasks = tokio::task::JoinSet::new();
    let t = Instant::now();
    for k in 0..clients {
        let addr = addr.to_owned();
        tasks.spawn(async move {
            let mut c = client(&addr).await;
            let mut n = k;
            while n < total {
                let mut s = c.run_job(job(first + n)).await.unwrap().into_inner();
                let mut last = None;
                while let Some(e) = s.message().await.unwrap() {
                    last = Some(e);
                }
                match last.and_then(|e| e.event) {
                    Some(pb::job_event::Event::StateChanged(sc))
                        if sc.to == pb::JobState::Succeeded as i32 => {}
                    other => panic!("job did not succeed: {other:?}"),
                }
                n += clients;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    t.elapsed()
}

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
            let wall = throughput(&sqlite_addr, 64, jobs, round * jobs).await;
            let cpu = cpu_secs(sqlite.id()) - cpu;
            s_rates.push(jobs as f64 / wall.as_secs_f64());
            s_cpu.push(cpu * 1e6 / jobs as f64);

            let (cpu, db) = (cpu_secs(postgres.id()), postgres_cpu(postmaster));
            let wall = throughput(&postgres_addr, 64, jobs, round * jobs).await;
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
