//! The Rust client API (`stately::client`) and its examples, against a real statelyd: a watch
//! that resumes across a restart (no event missed, none repeated), an attached run cancelled
//! by dropping it, a listing over pages, typed errors; and the examples run as a user runs
//! them.

use crate::support::*;
use futures_util::StreamExt;
use stately::client::{Client, Connect, Error, is_terminal, runbook};
use stately::pb;
use std::time::Duration;

async fn connect(d: &Daemon) -> Client {
    Client::connect(&Connect::new(d.addr.clone()).token(OPERATOR))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_across_a_restart_without_missing_or_repeating_an_event() {
    let mut d = Daemon::configure("", &[]);
    d.args = vec!["--listen".into(), format!("127.0.0.1:{}", free_port())];
    d.spawn();
    let client = connect(&d).await;
    // 60 lines, 10 ms apart: the restart falls in the middle, and the 40 after it fit in the
    // 2 s grace even on a busy machine (150 did not always).
    let job = client
        .submit(runbook("chatty", [("lines", "60")]))
        .await
        .unwrap();
    let mut events = std::pin::pin!(client.watch(&job.id, 0));
    let mut seen = Vec::new();
    while let Some(e) = events.next().await {
        let e = e.unwrap_or_else(|e| panic!("the watch failed after {} events: {e:?}", seen.len()));
        seen.push(e.seq);
        if seen.len() == 20 {
            // SIGTERM: the job finishes in the grace period; the stream ends before it does.
            d.terminate();
            d.spawn();
        }
        if is_terminal(&e) {
            break;
        }
    }
    let all = d
        .client()
        .await
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut recorded = Vec::new();
    let mut all = all;
    while let Some(e) = all.message().await.unwrap() {
        recorded.push(e.seq);
    }
    assert_eq!(seen, recorded, "every recorded event, once, in order");
    assert_eq!(
        state(&connect(&d).await.job(&job.id).await.unwrap()),
        pb::JobState::Succeeded
    );
}

#[tokio::test]
async fn dropping_an_attached_run_cancels_and_unwinds_its_job() {
    let d = Daemon::start("");
    let client = connect(&d).await;
    let mut run = client
        .run(runbook("write-then-block", [("name", "dropped")]))
        .await
        .unwrap();
    loop {
        let e = run.next().await.unwrap().expect("events until the block");
        if let Some(pb::job_event::Event::Log(l)) = &e.event
            && l.message.contains("ready")
        {
            break;
        }
    }
    let id = run.job_id.clone().unwrap();
    assert!(d.root().join("dropped.txt").exists());
    drop(run);
    let mut c = d.client().await;
    let job = wait_end(&mut c, &id).await;
    assert_eq!(state(&job), pb::JobState::Cancelled);
    assert!(
        !d.root().join("dropped.txt").exists(),
        "its write was undone"
    );
}

#[tokio::test]
async fn jobs_list_as_a_stream_over_pages_and_errors_are_typed() {
    let d = Daemon::start("");
    let client = connect(&d).await;
    for _ in 0..5 {
        client.submit(runbook("noop", [])).await.unwrap();
    }
    let all: Vec<pb::Job> = client
        .jobs(pb::ListJobsRequest {
            page_size: 2,
            ..Default::default()
        })
        .map(|j| j.unwrap())
        .collect()
        .await;
    assert_eq!(all.len(), 5, "three pages of two, two, one");
    // A watch from a finished job's last event has nothing left to say: it ends, at once.
    let done = wait_end(&mut d.client().await, &all[0].id).await;
    let rest: Vec<_> = tokio::time::timeout(
        Duration::from_secs(5),
        client.watch(&done.id, done.last_seq).collect::<Vec<_>>(),
    )
    .await
    .expect("the watch ends");
    assert!(rest.is_empty(), "{rest:?}");
    let e = client
        .submit(runbook("no-such-runbook", []))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    let e = client.cancel("not-a-job-id", "", false).await.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    let viewer = Client::connect(&Connect::new(d.addr.clone()).token(VIEWER))
        .await
        .unwrap();
    let e = viewer.submit(runbook("noop", [])).await.unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(_)), "{e:?}");
    let e = Client::connect(&Connect::new("http://192.0.2.1:50051").token(OPERATOR))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Usage(_)),
        "no token in clear beyond loopback: {e:?}"
    );
}

/// An example program built by `cargo build --examples` (scripts/test.sh does).
fn example(name: &str) -> std::process::Command {
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().unwrap().parent().unwrap();
    let path = target.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --examples` first (scripts/test.sh does)",
        path.display()
    );
    std::process::Command::new(path)
}

#[tokio::test]
async fn the_rust_examples_run_a_runbook_and_follow_a_job() {
    let d = Daemon::start("");
    let out = example("run_runbook")
        .args(["chatty", "lines=3"])
        .env("STATELY_SERVER", &d.addr)
        .env("STATELY_TOKEN", OPERATOR)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("log: line 3") && said.contains("state SUCCEEDED"),
        "{said}"
    );

    // Ctrl-C during the block: the job is cancelled and unwound, and the example says so.
    use std::io::{BufRead, BufReader};
    let mut child = example("run_runbook")
        .args(["write-then-block", "name=example"])
        .env("STATELY_SERVER", &d.addr)
        .env("STATELY_TOKEN", OPERATOR)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        printed.push_str(&line);
        if line.contains("ready") {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            )
            .unwrap();
        }
        line.clear();
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{printed}");
    assert!(
        printed.contains("interrupted") && printed.contains("state CANCELLED"),
        "{printed}"
    );
    assert!(!d.root().join("example.txt").exists());

    let mut c = d.client().await;
    let job = c
        .submit_job(runbook_req("noop"))
        .await
        .unwrap()
        .into_inner();
    wait_end(&mut c, &job.id).await;
    let out = example("follow_job")
        .arg(&job.id)
        .env("STATELY_SERVER", &d.addr)
        .env("STATELY_TOKEN", OPERATOR)
        .output()
        .unwrap();
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.lines().count() >= 4 && said.starts_with("seq 1 "),
        "{said}"
    );
    tokio::time::sleep(Duration::from_millis(1)).await;
}

fn runbook_req(name: &str) -> pb::SubmitJobRequest {
    crate::support::runbook(name, &[])
}
