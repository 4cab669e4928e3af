//! Several statelyd on one PostgreSQL ledger, each its node: a job submitted on one node for
//! another runs there and is watched, cancelled and listed from the first; a job for a node
//! that cannot plan it fails saying so; a node killed mid-job unwinds it itself when it comes
//! back, and no other node ran it.

use crate::support::postgres::TestPostgres;
use crate::support::*;
use stately::pb;
use std::time::Duration;

fn node(name: &str, url: &str) -> Daemon {
    Daemon::start(&format!("node = \"{name}\"\n[store]\nurl = \"{url}\"\n"))
}

fn on(node: &str, mut req: pb::SubmitJobRequest) -> pb::SubmitJobRequest {
    req.node = node.into();
    req
}

/// Submits on `via` a write-then-block job named `name` for `node`, and follows it from `via`
/// until its command runs: the job, and the watch (to follow it on).
async fn blocked_on(
    via: &mut Client,
    node: &str,
    name: &str,
) -> (pb::Job, tonic::Streaming<pb::JobEvent>) {
    let job = via
        .submit_job(on(node, runbook("write-then-block", &[("name", name)])))
        .await
        .unwrap()
        .into_inner();
    let mut s = via
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    until_log(&mut s, "ready").await;
    (job, s)
}

/// What an attached CLI command said (stdout and stderr), asserting it ended well and said
/// its job succeeded.
fn succeeded(out: &std::process::Output) -> String {
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(said.contains("succeeded"), "{said}");
    said
}

/// Cancels a job whose node is down: recorded, and UNAVAILABLE (its node has not taken it).
async fn cancel_while_down(via: &mut Client, id: &str, reason: &str) {
    let e = via
        .cancel_job(pb::CancelJobRequest {
            job_id: id.into(),
            reason: reason.into(),
            wait: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("it is recorded"), "{}", e.message());
}

/// Every event of a job, from the node `d` (to its end).
async fn events(d: &Daemon, id: &str) -> Vec<pb::JobEvent> {
    let s = d
        .client()
        .await
        .watch_job(pb::WatchJobRequest {
            job_id: id.into(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    to_end(s).await
}

/// The rest of a watch stream, to the job's end (within a minute).
async fn to_end(mut s: tonic::Streaming<pb::JobEvent>) -> Vec<pb::JobEvent> {
    let mut all = Vec::new();
    while let Some(e) = tokio::time::timeout(Duration::from_secs(60), s.message())
        .await
        .expect("the job ends in time")
        .unwrap()
    {
        all.push(e);
    }
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_submitted_on_a_for_b_runs_on_b_and_a_watches_and_lists_it() {
    let pg = TestPostgres::start().await;
    let (a, b) = (node("edge-a", &pg.url()), node("edge-b", &pg.url()));
    // From A's CLI, attached: the job runs on B (B's root), and A follows it to its end.
    let out = a
        .cli()
        .args(["--node", "edge-b", "run", "write", "-p", "name=fleet", "-p"])
        .arg("content=from a\n")
        .output()
        .unwrap();
    succeeded(&out);
    assert_eq!(
        std::fs::read_to_string(b.root().join("fleet.txt")).unwrap(),
        "from a\n"
    );
    assert!(!a.root().join("fleet.txt").exists(), "nothing ran on A");
    // Rolled back from A: a rollback job for B, planned and run there (B's file goes).
    let written = a
        .client()
        .await
        .list_jobs(pb::ListJobsRequest {
            node: "edge-b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs
        .remove(0);
    let out = a
        .cli()
        .args(["jobs", "rollback", &written.id])
        .output()
        .unwrap();
    let said = succeeded(&out);
    assert!(
        !b.root().join("fleet.txt").exists(),
        "B's file is gone: {said}"
    );
    // A second one is refused by B's planning, as a local one would be.
    let again = a
        .client()
        .await
        .rollback_job(pb::RollbackJobRequest {
            job_id: written.id.clone(),
            force: false,
        })
        .await;
    let again = match again {
        Ok(j) => wait_end(&mut a.client().await, &j.into_inner().id).await,
        Err(e) => panic!("recorded for B, refused there: {e:?}"),
    };
    assert_eq!(state(&again), pb::JobState::Failed);
    assert!(again.error.contains("already rolled back"), "{again:?}");

    // The same job through the API: submitted on A for B, watched from A, gap-free.
    let mut ca = a.client().await;
    let job = ca
        .submit_job(on("edge-b", runbook("chatty", &[("lines", "30")])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (job.node.as_str(), state(&job)),
        ("edge-b", pb::JobState::Pending)
    );
    let seen = events(&a, &job.id).await;
    let seqs: Vec<u64> = seen.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "gap-free from A"
    );
    let lines = seen
        .iter()
        .filter(|e| matches!(&e.event, Some(pb::job_event::Event::Log(l)) if l.message.starts_with("line ")))
        .count();
    assert_eq!(lines, 30);
    let done = ca
        .get_job(pb::GetJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&done), pb::JobState::Succeeded);
    assert!(!done.steps.is_empty(), "B planned its steps: {done:?}");
    assert_eq!(seen, events(&b, &job.id).await, "A and B see one log");

    // Listed from A, per node.
    let list = |node: &str| {
        let out = a
            .cli()
            .args(["-o", "json", "--node", node, "jobs", "list"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let on_b = list("edge-b");
    assert_eq!(on_b.len(), 4, "{on_b:?}");
    assert!(on_b.iter().all(|j| j["node"] == "edge-b"), "{on_b:?}");
    assert!(list("edge-a").is_empty());
    // With a job of A's own beside B's, the table says which node each is.
    let own = ca
        .submit_job(runbook("noop", &[]))
        .await
        .unwrap()
        .into_inner();
    wait_end(&mut ca, &own.id).await;
    let table = a.cli().args(["jobs", "list"]).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    let header = table.lines().next().unwrap_or_default();
    assert!(header.contains("  NODE  "), "{table}");
    assert!(
        table.contains("edge-a") && table.contains("edge-b"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_from_a_unwinds_a_job_on_b_even_with_bs_listener_cut() {
    let pg = TestPostgres::start().await;
    let (a, b) = (node("cut-a", &pg.url()), node("cut-b", &pg.url()));
    let mut ca = a.client().await;
    for (round, cut) in [("kept", false), ("cut", true)] {
        let (job, _) = blocked_on(&mut ca, "cut-b", round).await;
        assert!(b.root().join(format!("{round}.txt")).exists());
        if cut {
            // B's listening connection goes: the notice of the cancel is lost to it, and B
            // reads the ledger again when it is back. (Node names of this test alone: the
            // cluster is shared by the tests running beside it.)
            let admin = TestPostgres::connect(&pg.admin).await;
            let ended: i64 = admin
                .query_one(
                    "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = 'statelyd listener cut-b') t",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(ended, 1, "B has one listening connection");
        }
        let started = std::time::Instant::now();
        let cancelled = ca
            .cancel_job(pb::CancelJobRequest {
                job_id: job.id.clone(),
                reason: "from a".into(),
                wait: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(state(&cancelled), pb::JobState::Cancelled, "{round}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{round}: {:?}",
            started.elapsed()
        );
        assert!(
            cancelled.error.contains("cancelled on node cut-a: from a"),
            "{}",
            cancelled.error
        );
        // B unwound it: its file is gone, its command stopped.
        assert!(!b.root().join(format!("{round}.txt")).exists(), "{round}");
        let pid = read_pid(&b.root().join(format!("{round}.pid")));
        assert!(!pid_alive(pid), "{round}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_for_another_node_is_planned_there_and_unknown_nodes_are_refused() {
    let pg = TestPostgres::start().await;
    let (a, _b) = (node("edge-a", &pg.url()), node("edge-b", &pg.url()));
    let mut ca = a.client().await;
    // A runbook B does not have: B fails it, saying so; A could not have known.
    let job = ca
        .submit_job(on("edge-b", runbook("no-such-runbook", &[])))
        .await
        .unwrap()
        .into_inner();
    let end = wait_end(&mut ca, &job.id).await;
    assert_eq!(state(&end), pb::JobState::Failed);
    assert!(
        end.error.starts_with("node edge-b cannot run it:")
            && end.error.contains("no-such-runbook"),
        "{}",
        end.error
    );
    let e = ca
        .submit_job(on("edge-z", runbook("noop", &[])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert!(e.message().contains("edge-a, edge-b"), "{}", e.message());
    let e = ca
        .submit_job(on("bad name!", runbook("noop", &[])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // On a node's own SQLite ledger there is no other node.
    let alone = Daemon::start("[store]\n");
    let e = alone
        .client()
        .await
        .submit_job(on("edge-b", runbook("noop", &[])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn what_a_node_was_asked_while_it_was_down_is_done_when_it_returns() {
    let pg = TestPostgres::start().await;
    let (a, mut b) = (node("down-a", &pg.url()), node("down-b", &pg.url()));
    let mut ca = a.client().await;
    // One request id is one job, on one node.
    let mut once = on("down-b", runbook("noop", &[]));
    once.request_id = "deploy-42".into();
    let first = ca.submit_job(once.clone()).await.unwrap().into_inner();
    let again = ca.submit_job(once.clone()).await.unwrap().into_inner();
    assert_eq!(again.id, first.id, "a repeat is the same job");
    once.node = "down-a".into();
    let e = ca.submit_job(once.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("on node down-b"), "{}", e.message());
    // Naming no node, a retry (perhaps through a balancer) gets the job wherever it runs.
    once.node = String::new();
    let retried = ca.submit_job(once).await.unwrap().into_inner();
    assert_eq!(retried.id, first.id);
    wait_end(&mut ca, &first.id).await;

    b.terminate();
    // While B is down: a job for it, then its cancel (recorded; B is not there to take it).
    let cancelled = ca
        .submit_job(on(
            "down-b",
            runbook("write", &[("name", "never"), ("content", "x")]),
        ))
        .await
        .unwrap()
        .into_inner();
    cancel_while_down(&mut ca, &cancelled.id, "not now").await;
    // A job of a kind B cannot read (a newer version's, say), then one it can.
    let admin = TestPostgres::connect(&pg.url()).await;
    let unreadable = uuid::Uuid::now_v7().to_string();
    admin
        .batch_execute(&format!(
            "INSERT INTO jobs (id, kind, spec, state, steps, labels, resources, waiting_for, created_at, node, unplanned) \
             VALUES ('{unreadable}', 'from_the_future', '{{\"from_the_future\":{{}}}}', 'PENDING', '[]', '{{}}', '[]', '[]', 1, 'down-b', TRUE)"
        ))
        .await
        .unwrap();
    let later = ca
        .submit_job(on(
            "down-b",
            runbook("write", &[("name", "later"), ("content", "y")]),
        ))
        .await
        .unwrap()
        .into_inner();

    b.spawn();
    let end = wait_end(&mut ca, &cancelled.id).await;
    assert_eq!(state(&end), pb::JobState::Cancelled, "{end:?}");
    assert!(end.error.contains("not now"), "{end:?}");
    assert!(
        end.steps.is_empty() && !b.root().join("never.txt").exists(),
        "it never ran: {end:?}"
    );
    let end = wait_end(&mut ca, &later.id).await;
    assert_eq!(state(&end), pb::JobState::Succeeded, "{end:?}");
    assert_eq!(
        std::fs::read_to_string(b.root().join("later.txt")).unwrap(),
        "y"
    );
    // Listed, shown and watched from A like any job, its kind named; B refused to run it.
    let end = wait_end(&mut ca, &unreadable).await;
    assert_eq!(
        (state(&end), end.kind.as_str()),
        (pb::JobState::Failed, "from_the_future"),
        "{end:?}"
    );
    assert!(
        end.error.starts_with("node down-b cannot run it")
            && end.error.contains("does not know jobs of kind"),
        "{end:?}"
    );
    let listed = ca
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(listed.iter().any(|j| j.id == unreadable), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_planned_job_cancelled_while_its_node_was_dead_never_starts_when_it_returns() {
    let pg = TestPostgres::start().await;
    let (a, mut b) = (node("dead-a", &pg.url()), node("dead-b", &pg.url()));
    let mut ca = a.client().await;
    let (first, _) = blocked_on(&mut ca, "dead-b", "same").await;
    // The second needs the same file: planned by B, waiting for the first.
    let second = ca
        .submit_job(on(
            "dead-b",
            runbook("write-then-block", &[("name", "same")]),
        ))
        .await
        .unwrap()
        .into_inner();
    let get = async |c: &mut Client, id: &str| {
        c.get_job(pb::GetJobRequest { job_id: id.into() })
            .await
            .unwrap()
            .into_inner()
    };
    let t = std::time::Instant::now();
    while get(&mut ca, &second.id).await.steps.is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "B plans the second job"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.kill9();
    cancel_while_down(&mut ca, &second.id, "while b was dead").await;
    b.spawn();
    let end = wait_end(&mut ca, &first.id).await;
    assert_ne!(
        state(&end),
        pb::JobState::Succeeded,
        "interrupted, unwound: {end:?}"
    );
    let end = wait_end(&mut ca, &second.id).await;
    assert_eq!(state(&end), pb::JobState::Cancelled, "{end:?}");
    assert!(end.error.contains("while b was dead"), "{end:?}");
    assert!(
        end.steps.iter().all(|s| s.started_at.is_none()),
        "no step of it started: {end:?}"
    );
    assert!(!b.root().join("same.txt").exists(), "{end:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_killed_mid_job_unwinds_it_when_it_returns_and_no_other_node_ran_it() {
    let pg = TestPostgres::start().await;
    let (a, mut b) = (node("edge-a", &pg.url()), node("edge-b", &pg.url()));
    let mut ca = a.client().await;
    let (job, s) = blocked_on(&mut ca, "edge-b", "crash").await;
    b.kill9();
    // A's watcher waits on through B's absence; A does not take the job.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let now = ca
        .get_job(pb::GetJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&now), pb::JobState::Running);
    b.spawn();
    // The watch from A goes on to the job's end.
    to_end(s).await;
    let end = ca
        .get_job(pb::GetJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(state(&end), pb::JobState::Failed | pb::JobState::Cancelled),
        "{end:?}"
    );
    assert!(!b.root().join("crash.txt").exists(), "B unwound it");
    assert!(!a.root().join("crash.txt").exists());
    assert!(!a.log().contains("took a job submitted"), "{}", a.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_paused_past_its_lease_writes_nothing_when_it_resumes_and_stops() {
    let pg = TestPostgres::start().await;
    let socks = tempfile::tempdir().unwrap();
    let sock = |name: &str| socks.path().join(format!("{name}.sock"));
    let lease = |name: &str| {
        Daemon::start(&format!(
            "node = \"{name}\"\nlisten_unix = \"{}\"\n[store]\nurl = \"{}\"\nlease = \"3s\"\n",
            sock(name).display(),
            pg.url()
        ))
    };
    let (a, mut b) = (lease("pause-a"), lease("pause-b"));
    let mut ca = a.client().await;
    let (job, _) = blocked_on(&mut ca, "pause-b", "paused").await;
    let admin = TestPostgres::connect(&pg.url()).await;
    let events = || async {
        admin
            .query_one("SELECT COUNT(*) FROM events WHERE job_id = $1", &[&job.id])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let pid = b.pid().unwrap().to_string();
    let signal = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        )
    };
    signal("-STOP");
    // Past the lease, by the database's clock: A sees B lost.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let out = a
        .cli()
        .args(["-o", "json", "nodes", "list"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    let b_row = listed
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|n| n["name"] == "pause-b")
        .unwrap();
    assert_eq!(b_row["state"], "lost", "{listed}");
    let before = events().await;
    signal("-CONT");
    // B finds its lease lapsed and stops, exit 75, without a write.
    let (status, log, back) = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || {
            let status = b.terminate_wait();
            (status, b.log(), b)
        }),
    )
    .await
    .expect("B stops by itself")
    .unwrap();
    let mut b = back;
    assert_eq!(status.code(), Some(75), "{log}");
    assert!(log.contains("lease lapsed"), "{log}");
    assert!(!sock("pause-b").exists(), "its unix socket is removed");
    assert_eq!(events().await, before, "B wrote nothing after it resumed");
    let now = ca
        .get_job(pb::GetJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&now), pb::JobState::Running, "left for B to unwind");
    // Started again, B unwinds it.
    b.spawn();
    let end = wait_end(&mut ca, &job.id).await;
    assert!(
        matches!(state(&end), pb::JobState::Failed | pb::JobState::Cancelled),
        "{end:?}"
    );
    assert!(!b.root().join("paused.txt").exists(), "B unwound it");
}

#[tokio::test(flavor = "multi_thread")]
async fn many_watchers_on_one_node_of_a_job_on_another_share_one_read_of_the_ledger() {
    // A cluster of the test's own: its transaction count is this test's alone.
    let pg = TestPostgres::own_cluster().await;
    let a = node("many-a", &pg.url());
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let b = Daemon::start(&format!(
        "node = \"many-b\"\n[store]\nurl = \"{}\"\n\n[[runbook]]\nname = \"on-go\"\nresources = []\n\
         [[runbook.step]]\nname = \"lines\"\ntype = \"command\"\n\
         argv = [\"/bin/sh\", \"-c\", \"echo waiting; while [ ! -e {go} ]; do sleep 0.02; done; \
         i=1; while [ $i -le 40 ]; do echo line $i; i=$((i+1)); sleep 0.02; done\"]\n",
        pg.url(),
        go = go.display()
    ));
    let mut ca = a.client().await;
    let job = ca
        .submit_job(on("many-b", runbook("on-go", &[])))
        .await
        .unwrap()
        .into_inner();
    let mut first = ca
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    until_log(&mut first, "waiting").await;
    const WATCHERS: usize = 300;
    let mut streams = Vec::new();
    for i in 0..WATCHERS {
        // A few connections, each carrying many streams.
        if i % 75 == 0 {
            ca = a.client().await;
        }
        let s = ca
            .watch_job(pb::WatchJobRequest {
                job_id: job.id.clone(),
                after_seq: 0,
            })
            .await
            .unwrap()
            .into_inner();
        streams.push(s);
    }
    let admin = TestPostgres::connect(&pg.url()).await;
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
    let before = xacts().await;
    std::fs::write(&go, "").unwrap();
    let watchers: Vec<_> = streams
        .into_iter()
        .map(|s| tokio::spawn(to_end(s)))
        .collect();
    let mut logs = Vec::new();
    for w in watchers {
        logs.push(w.await.unwrap());
    }
    let whole = events(&b, &job.id).await;
    for seen in &logs {
        assert_eq!(seen, &whole, "every watcher: every event once, in order");
    }
    let lines = whole
        .iter()
        .filter(|e| matches!(&e.event, Some(pb::job_event::Event::Log(l)) if l.message.starts_with("line ")))
        .count();
    assert_eq!(lines, 40);
    // Backends report their counts within 10 s of going idle.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let spent = xacts().await - before;
    eprintln!("ledger transactions while {WATCHERS} watchers followed: {spent}");
    // One read per commit of B's for all 300, not one per watcher (that would be ~40 × 300).
    assert!(
        spent < 1500,
        "{spent} database transactions for {WATCHERS} watchers of a 40-line job"
    );
}
