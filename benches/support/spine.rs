//! What the spine and ledger benches share: a statelyd with the "block" and "write"
//! runbooks, clients with the bench's token, and the durable-throughput load.

use super::{Auth, spawn_statelyd};
use stately::pb;
use stately::pb::jobs_client::JobsClient;
use std::process::Child;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub const TOKEN: &str = "bench-operator-token-000000";

/// Starts statelyd in `dir` with the bench's runbooks, and `extra` configuration (top-level
/// keys, then tables) before them.
pub fn start(dir: &std::path::Path, extra: &str) -> (Child, String) {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let config = dir.join("statelyd.toml");
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:0"
data_dir = "{data}"
{extra}
[[token]]
name = "bench"
role = "operator"
value = "{TOKEN}"

[[runbook]]
name = "block"
roots = ["{root}"]
resources = ["block:{{n}}"]
[runbook.params.n]
pattern = "[0-9]+"
[[runbook.step]]
type = "write_file"
path = "{root}/block-{{n}}"
content = "changed\n"
[[runbook.step]]
type = "command"
argv = ["/bin/sleep", "300"]

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
"#,
            data = dir.join("data").display(),
            root = root.display()
        ),
    )
    .unwrap();
    spawn_statelyd(&config)
}

pub type Client = JobsClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>;

pub async fn client(addr: &str) -> Client {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    JobsClient::with_interceptor(ch, Auth(TOKEN))
}

pub fn job(runbook: &str, n: usize) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::Runbook(pb::RunbookJob {
                runbook: runbook.into(),
                params: [("n".to_owned(), n.to_string())].into_iter().collect(),
            })),
        }),
        ..Default::default()
    }
}

/// `total` jobs of the write runbook by `clients` clients, each attached (RunJob) until its
/// job succeeded: how many succeeded, and the wall time.
pub async fn throughput(
    addr: &str,
    clients: usize,
    total: usize,
    first: usize,
) -> (usize, Duration) {
    let mut tasks = tokio::task::JoinSet::new();
    let t = Instant::now();
    for k in 0..clients {
        let addr = addr.to_owned();
        tasks.spawn(async move {
            let mut c = client(&addr).await;
            let mut done = 0;
            let mut n = k;
            while n < total {
                let mut s = c
                    .run_job(job("write", first + n))
                    .await
                    .unwrap()
                    .into_inner();
                let mut last = None;
                while let Some(e) = s.message().await.unwrap() {
                    last = Some(e);
                }
                match last.and_then(|e| e.event) {
                    Some(pb::job_event::Event::StateChanged(sc))
                        if sc.to == pb::JobState::Succeeded as i32 =>
                    {
                        done += 1
                    }
                    other => panic!("job did not succeed: {other:?}"),
                }
                n += clients;
            }
            done
        });
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        done += r.unwrap();
    }
    (done, t.elapsed())
}
