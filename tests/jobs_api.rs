//! The job spine against a real statelyd over gRPC: submit, watch, cancel, roll back,
//! attached runs, crash recovery, auth and bad input.

use crate::support::*;
use stately::pb;
use tonic::Code;

fn write(name: &str) -> pb::SubmitJobRequest {
    runbook("write", &[("name", name)])
}

#[tokio::test]
async fn a_repeated_request_id_returns_the_same_job() {
    let d = Daemon::start("");
    let mut c = d.client().await;
    let mut req = write("a");
    req.request_id = "deploy-42".into();
    let first = c.submit_job(req.clone()).await.unwrap().into_inner();
    let second = c.submit_job(req.clone()).await.unwrap().into_inner();
    assert_eq!(first.id, second.id);
    let all = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.jobs.len(), 1, "a repeat must not start a second job");

    req.spec = write("b").spec;
    let err = c.submit_job(req).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
}

#[tokio::test]
async fn a_job_writes_its_file_and_succeeds() {
    let d = Daemon::start("");
    let mut c = d.client().await;
    let job = c
        .submit_job(runbook("write", &[("name", "a"), ("content", "hello\n")]))
        .await
        .unwrap()
        .into_inner();
    let job = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:?}");
    assert_eq!(
        std::fs::read_to_string(d.root().join("a.txt")).unwrap(),
        "hello\n"
    );
    assert_eq!(job.undo_entries, 1);
    assert_eq!(
        pb::StepState::try_from(job.steps[0].state).unwrap(),
        pb::StepState::Succeeded
    );
}

#[tokio::test]
async fn watch_resumes_after_a_reconnect_without_gaps_or_repeats() {
    let d = Daemon::start("");
    let mut c = d.client().await;
    let job = c
        .submit_job(runbook("chatty", &[("lines", "40")]))
        .await
        .unwrap()
        .into_inner();
    let mut s = c
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    while seqs.len() < 8 {
        seqs.push(s.message().await.unwrap().unwrap().seq);
    }
    drop(s);
    let mut c2 = d.client().await;
    let mut s = c2
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_seq: *seqs.last().unwrap(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(e) = s.message().await.unwrap() {
        seqs.push(e.seq);
        last = Some(e);
    }
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "no gap, no repeat");
    assert!(seqs.len() > 40, "every output line was an event");
    match last.unwrap().event {
        Some(pb::job_event::Event::StateChanged(sc)) => {
            assert_eq!(sc.to, pb::JobState::Succeeded as i32)
        }
        e => panic!("the stream must end with the terminal state, not {e:?}"),
    }
    let full = c
        .get_job(pb::GetJobRequest { job_id: job.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(full.last_seq, seqs.len() as u64);
}

#[tokio::test]
async fn cancelling_a_pending_job_ends_it_at_once_and_it_never_runs() {
    let d = Daemon::start("");
    let mut c = d.client().await;
    let a = c
        .submit_job(runbook("write-then-block", &[("name", "x")]))
        .await
        .unwrap()
        .into_inner();
    let mut s = c
        .watch_job(pb::WatchJobRequest {
            job_id: a.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    until_log(&mut s, "ready").await;
    let b = c.submit_job(write("x")).await.unwrap().into_inner();
    assert_eq!(state(&b), pb::JobState::Pending);
    assert_eq!(
        b.waiting_for,
        vec!["file:x".to_owned()],
        "a queued job says what it waits for"
    );

    let t = std::time::Instant::now();
    let b = c
        .cancel_job(pb::CancelJobRequest {
            job_id: b.id,
            reason: "not now".into(),
            wait: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(t.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(state(&b), pb::JobState::Cancelled);
    assert!(b.error.contains("not now"), "{}", b.error);
    assert!(
        b.steps
            .iter()
            .all(|s| s.state == pb::StepState::Pending as i32),
        "it never ran: {:?}",
        b.steps
    );
    let a = c
        .get_job(pb::GetJobRequest { job_id: a.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        state(&a),
        pb::JobState::Running,
        "cancelling B leaves A alone"
    );
}

#[tokio::test]
async fn cancelling_a_running_job_kills_its_process_and_restores_its_files() {
    let d = Daemon::start("");
    std::fs::write(d.root().join("x.txt"), "old\n").unwrap();
    let mut c = d.client().await;
    let job = c
        .submit_job(runbook("write-then-block", &[("name", "x")]))
        .await
        .unwrap()
        .into_inner();
    let mut s = c
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    until_log(&mut s, "ready").await;
    assert_eq!(
        std::fs::read_to_string(d.root().join("x.txt")).unwrap(),
        "new\n"
    );
    let pid = read_pid(&d.root().join("x.pid"));
    assert!(pid_alive(pid));

    let job = c
        .cancel_job(pb::CancelJobRequest {
            job_id: job.id,
            reason: String::new(),
            wait: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&job), pb::JobState::Cancelled, "{job:?}");
    assert!(
        !pid_alive(pid),
        "the step's process is gone when the cancel returns"
    );
    assert_eq!(
        std::fs::read_to_string(d.root().join("x.txt")).unwrap(),
        "old\n",
        "the file is restored"
    );
    assert!(!d.root().join("x.after").exists(), "later steps never ran");
    assert_eq!(
        pb::StepState::try_from(job.steps[1].state).unwrap(),
        pb::StepState::Cancelled
    );

    let mut states = Vec::new();
    while let Some(e) = s.message().await.unwrap() {
        if let Some(pb::job_event::Event::StateChanged(sc)) = e.event {
            states.push(sc.to);
        }
    }
    assert_eq!(
        states,
        [
            pb::JobState::Cancelling as i32,
            pb::JobState::Cancelled as i32
        ]
    );
}

#[tokio::test]
async fn cancelling_a_finished_job_is_a_failed_precondition() {
    let d = Daemon::start("");
    let mut c = d.client().await;
    let job = c.submit_job(write("a")).await.unwrap().into_inner();
    wait_end(&mut c, &job.id).await;
    let err = c
        .cancel_job(pb::CancelJobRequest {
            job_id: job.id,
            reason: String::new(),
            wait: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("SUCCEEDED"), "{}", err.message());
}

#[tokio::test]
async fn a_failing_step_unwinds_the_journal_and_names_the_step() {
    let d = Daemon::start("");
    std::fs::write(d.root().join("f.txt"), "old\n").unwrap();
    let mut c = d.client().await;
    let job = c
        .submit_job(runbook("write-then-fail", &[("name", "f")]))
        .await
        .unwrap()
        .into_inner();
    let job = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&job), pb::JobState::Failed);
    assert_eq!(job.failed_step, "fail");
    assert!(
        job.error.contains("the check says no"),
        "the program's stderr is in the error: {}",
        job.error
    );
    assert_eq!(
        std::fs::read_to_string(d.root().join("f.txt")).unwrap(),
        "old\n"
    );
}

#[tokio::test]
async fn rollback_restores_the_file_and_cannot_be_repeated() {
    let d = Daemon::start("");
    let file = d.root().join("r.txt");
    std::fs::write(&file, "old\n").unwrap();
    let mut c = d.client().await;
    let job = c.submit_job(write("r")).await.unwrap().into_inner();
    wait_end(&mut c, &job.id).await;
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "new\n");

    let rb = c
        .rollback_job(pb::RollbackJobRequest {
            job_id: job.id.clone(),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rb.kind, "rollback");
    assert_eq!(rb.rollback_of, job.id);
    let rb = wait_end(&mut c, &rb.id).await;
    assert_eq!(state(&rb), pb::JobState::Succeeded, "{rb:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "old\n");
    let target = c
        .get_job(pb::GetJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(target.rolled_back_by, rb.id);

    let err = c
        .rollback_job(pb::RollbackJobRequest {
            job_id: job.id,
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("already rolled back"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn rolling_back_a_rollback_brings_the_change_back() {
    let d = Daemon::start("");
    let file = d.root().join("r.txt");
    let mut c = d.client().await;
    let job = c.submit_job(write("r")).await.unwrap().into_inner();
    wait_end(&mut c, &job.id).await;
    let rb = c
        .rollback_job(pb::RollbackJobRequest {
            job_id: job.id.clone(),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    wait_end(&mut c, &rb.id).await;
    assert!(
        !file.exists(),
        "the job created the file, so undoing it removes it"
    );
    let rb2 = rollback(&mut c, &rb.id, false).await;
    assert_eq!(state(&rb2), pb::JobState::Succeeded, "{rb2:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "new\n");
    let target = c
        .get_job(pb::GetJobRequest { job_id: job.id })
        .await
        .unwrap()
        .into_inner();
    assert!(
        target.rolled_back_by.is_empty(),
        "its change is back, so it can be rolled back again"
    );
}

#[tokio::test]
async fn rollback_is_refused_after_a_later_change_unless_forced() {
    let d = Daemon::start("");
    let file = d.root().join("r.txt");
    std::fs::write(&file, "old\n").unwrap();
    let mut c = d.client().await;
    let first = c.submit_job(write("r")).await.unwrap().into_inner();
    wait_end(&mut c, &first.id).await;
    let later = c
        .submit_job(runbook("write", &[("name", "r"), ("content", "later\n")]))
        .await
        .unwrap()
        .into_inner();
    wait_end(&mut c, &later.id).await;

    let err = c
        .rollback_job(pb::RollbackJobRequest {
            job_id: first.id.clone(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains(&file.display().to_string()),
        "names what changed: {}",
        err.message()
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "later\n",
        "nothing was touched"
    );

    let rb = rollback(&mut c, &first.id, true).await;
    assert_eq!(state(&rb), pb::JobState::Succeeded, "{rb:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "old\n");
}

#[tokio::test]
async fn rollback_of_a_job_with_nothing_to_undo_is_refused() {
    let d = Daemon::start("");
    let mut c = d.client().await;
    let job = c
        .submit_job(runbook("noop", &[]))
        .await
        .unwrap()
        .into_inner();
    wait_end(&mut c, &job.id).await;
    let err = c
        .rollback_job(pb::RollbackJobRequest {
            job_id: job.id,
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("nothing to roll back"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn an_attached_run_is_cancelled_and_unwound_when_the_call_goes_away() {
    let d = Daemon::start("");
    std::fs::write(d.root().join("x.txt"), "old\n").unwrap();
    let mut c = d.client().await;
    let mut s = c
        .run_job(runbook("write-then-block", &[("name", "x")]))
        .await
        .unwrap()
        .into_inner();
    let seen = until_log(&mut s, "ready").await;
    let id = seen[0].job_id.clone();
    let pid = read_pid(&d.root().join("x.pid"));
    drop(s);
    drop(c);

    let mut c = d.client().await;
    let job = wait_end(&mut c, &id).await;
    assert_eq!(state(&job), pb::JobState::Cancelled, "{job:?}");
    assert!(job.error.contains("attached call ended"), "{}", job.error);
    assert!(!pid_alive(pid));
    assert_eq!(
        std::fs::read_to_string(d.root().join("x.txt")).unwrap(),
        "old\n"
    );
}

#[tokio::test]
async fn an_attached_run_is_cancelled_when_its_deadline_passes() {
    let d = Daemon::start("");
    let mut c = d.client().await;
    let mut req = tonic::Request::new(runbook("write-then-block", &[("name", "d")]));
    req.set_timeout(std::time::Duration::from_millis(1500));
    let mut s = c.run_job(req).await.unwrap().into_inner();
    let first = s.message().await.unwrap().unwrap();
    while let Ok(Some(_)) = s.message().await {}
    let job = wait_end(&mut c, &first.job_id).await;
    assert_eq!(state(&job), pb::JobState::Cancelled, "{job:?}");
    assert!(!d.root().join("d.txt").exists());
}

#[tokio::test]
async fn kill_9_mid_runbook_then_restart_unwinds_the_journal() {
    let mut d = Daemon::start("");
    std::fs::write(d.root().join("k.txt"), "old\n").unwrap();
    let mut c = d.client().await;
    let job = c
        .submit_job(runbook("write-then-block", &[("name", "k")]))
        .await
        .unwrap()
        .into_inner();
    let mut s = c
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    until_log(&mut s, "ready").await;
    let orphan = read_pid(&d.root().join("k.pid"));
    assert_eq!(
        std::fs::read_to_string(d.root().join("k.txt")).unwrap(),
        "new\n"
    );
    d.kill9();
    assert!(
        pid_alive(orphan),
        "the step's process outlives a kill -9 of the daemon"
    );

    d.spawn();
    let mut c = d.client().await;
    let job = c
        .get_job(pb::GetJobRequest { job_id: job.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&job), pb::JobState::Failed, "{job:?}");
    assert!(
        job.error.contains("interrupted by restart"),
        "{}",
        job.error
    );
    assert!(
        !pid_alive(orphan),
        "recovery killed the command the crash left running"
    );
    assert_eq!(
        std::fs::read_to_string(d.root().join("k.txt")).unwrap(),
        "old\n",
        "the journal was unwound"
    );
}

#[tokio::test]
async fn pending_jobs_survive_a_restart_and_then_run() {
    let mut d = Daemon::start("");
    let mut c = d.client().await;
    let a = c
        .submit_job(runbook("write-then-block", &[("name", "p")]))
        .await
        .unwrap()
        .into_inner();
    let mut s = c
        .watch_job(pb::WatchJobRequest {
            job_id: a.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    until_log(&mut s, "ready").await;
    let b = c.submit_job(write("p")).await.unwrap().into_inner();
    let orphan = read_pid(&d.root().join("p.pid"));
    d.kill9();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(orphan),
        nix::sys::signal::Signal::SIGKILL,
    );
    d.spawn();
    let mut c = d.client().await;
    let b = wait_end(&mut c, &b.id).await;
    assert_eq!(state(&b), pb::JobState::Succeeded, "{b:?}");
}

#[tokio::test]
async fn jobs_sharing_a_resource_run_one_at_a_time_in_order() {
    let d = Daemon::start("");
    let mut c = d.client().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let content = format!("{i}\n");
        ids.push(
            c.submit_job(runbook("write", &[("name", "same"), ("content", &content)]))
                .await
                .unwrap()
                .into_inner()
                .id,
        );
    }
    let mut windows = Vec::new();
    for id in &ids {
        let j = wait_end(&mut c, id).await;
        assert_eq!(state(&j), pb::JobState::Succeeded);
        let t = |ts: &Option<prost_types::Timestamp>| {
            ts.as_ref().map(|t| (t.seconds, t.nanos)).unwrap()
        };
        windows.push((t(&j.started_at), t(&j.finished_at)));
    }
    for w in windows.windows(2) {
        assert!(
            w[0].1 <= w[1].0,
            "a job starts after the one before it ended: {windows:?}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(d.root().join("same.txt")).unwrap(),
        "4\n",
        "the last submitted ran last"
    );
}

#[tokio::test]
async fn a_download_over_its_limit_fails_and_leaves_nothing() {
    let d = Daemon::start("");
    let url = http_server(&[b'x'; 5000]).await;
    let mut c = d.client().await;
    let job = c
        .submit_job(runbook("fetch", &[("url", &url)]))
        .await
        .unwrap()
        .into_inner();
    let job = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&job), pb::JobState::Failed);
    assert!(job.error.contains("limit"), "{}", job.error);
    let left: Vec<_> = std::fs::read_dir(d.root()).unwrap().collect();
    assert!(left.is_empty(), "no file and no temp file: {left:?}");

    let missing = c
        .submit_job(runbook("fetch", &[("url", &format!("{url}/missing"))]))
        .await
        .unwrap()
        .into_inner();
    let missing = wait_end(&mut c, &missing.id).await;
    assert!(missing.error.contains("404"), "{}", missing.error);
}

#[tokio::test]
async fn tokens_are_required_and_roles_are_enforced() {
    let d = Daemon::start("");
    let err = d
        .client_as(None)
        .await
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = d
        .client_as(Some("not-a-real-token-at-all"))
        .await
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let job = d
        .client()
        .await
        .submit_job(write("a"))
        .await
        .unwrap()
        .into_inner();
    let mut viewer = d.client_as(Some(VIEWER)).await;
    viewer
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("a viewer may list");
    viewer
        .get_job(pb::GetJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .expect("a viewer may read");
    let err = viewer
        .cancel_job(pb::CancelJobRequest {
            job_id: job.id.clone(),
            reason: String::new(),
            wait: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = viewer.submit_job(write("b")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = viewer
        .rollback_job(pb::RollbackJobRequest {
            job_id: job.id,
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let mut health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health needs no token");
    assert_eq!(
        h.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert!(!d.log().contains(OPERATOR), "tokens never reach the log");
}

#[tokio::test]
async fn bad_input_gets_a_clear_status_and_changes_nothing() {
    let d = Daemon::start("");
    let mut c = d.client().await;
    let err = c.submit_job(runbook("nope", &[])).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("write-then-block"),
        "lists the runbooks: {}",
        err.message()
    );

    let err = c.submit_job(runbook("write", &[])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("'name'"), "{}", err.message());

    let err = c
        .submit_job(runbook("write", &[("name", "a"), ("colour", "red")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("colour"), "{}", err.message());

    let err = c
        .submit_job(runbook("write", &[("name", "../etc")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = c
        .submit_job(runbook("put", &[("path", "/etc/passwd")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("outside"), "{}", err.message());
    let escape = format!("{}/../escape", d.root().display());
    let err = c
        .submit_job(runbook("put", &[("path", &escape)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = c
        .submit_job(pb::SubmitJobRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = c
        .get_job(pb::GetJobRequest {
            job_id: "0190f6c2-7b1e-7c3a-9f00-2b8e4d1a5c77".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .get_job(pb::GetJobRequest {
            job_id: "not-an-id".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .watch_job(pb::WatchJobRequest {
            job_id: "../x".into(),
            after_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .list_jobs(pb::ListJobsRequest {
            page_token: "bogus".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let jobs = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(jobs.jobs.is_empty(), "nothing was created");
    assert_eq!(
        std::fs::read_dir(d.root()).unwrap().count(),
        0,
        "nothing was written"
    );
}

#[tokio::test]
async fn list_pages_newest_first_with_a_default_and_a_maximum_page_size() {
    let d = Daemon::start("");
    let mut c = d.client().await;
    let mut ids = Vec::new();
    for _ in 0..1003 {
        ids.push(
            c.submit_job(runbook("noop", &[]))
                .await
                .unwrap()
                .into_inner()
                .id,
        );
    }
    let page = c
        .list_jobs(pb::ListJobsRequest {
            page_size: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.jobs.len(), 50, "page_size 0 means 50");
    assert_eq!(page.jobs[0].id, *ids.last().unwrap(), "newest first");
    let big = c
        .list_jobs(pb::ListJobsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(big.jobs.len(), 1000, "page_size is clamped to 1000");
    let rest = c
        .list_jobs(pb::ListJobsRequest {
            page_size: 5000,
            page_token: big.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.jobs.len(), 3);
    assert!(rest.next_page_token.is_empty());
    assert_eq!(rest.jobs[2].id, ids[0]);

    let labelled = {
        let mut r = write("l");
        r.labels.insert("team".into(), "edge".into());
        c.submit_job(r).await.unwrap().into_inner()
    };
    let mut labels = std::collections::HashMap::new();
    labels.insert("team".to_owned(), "edge".to_owned());
    let only = c
        .list_jobs(pb::ListJobsRequest {
            labels,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        only.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
        [labelled.id]
    );
    let failed = c
        .list_jobs(pb::ListJobsRequest {
            states: vec![pb::JobState::Failed as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(failed.jobs.is_empty());
}

#[tokio::test]
async fn history_prunes_old_jobs_and_their_backups() {
    let d = Daemon::start(
        "[history]\nkeep_per_resource = 2\nkeep_total = 100\nprune_interval = \"100ms\"\n",
    );
    let file = d.root().join("h.txt");
    let mut c = d.client().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        std::fs::write(&file, format!("version {i}\n")).unwrap();
        let content = format!("job {i}\n");
        let j = c
            .submit_job(runbook("write", &[("name", "h"), ("content", &content)]))
            .await
            .unwrap()
            .into_inner();
        wait_end(&mut c, &j.id).await;
        ids.push(j.id);
    }
    let blobs = |d: &Daemon| walk(&d.data().join("blobs"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let listed = c
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .jobs
            .len();
        if listed == 2 && blobs(&d) == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pruned to 2 jobs and 2 backups: {listed} jobs, {} blobs",
            blobs(&d)
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let err = c
        .get_job(pb::GetJobRequest {
            job_id: ids[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    c.get_job(pb::GetJobRequest {
        job_id: ids[4].clone(),
    })
    .await
    .expect("the newest is kept");
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn sigterm_stops_the_daemon_cleanly() {
    let mut d = Daemon::start("");
    let mut c = d.client().await;
    let job = c.submit_job(write("t")).await.unwrap().into_inner();
    wait_end(&mut c, &job.id).await;
    let t = std::time::Instant::now();
    let status = d.terminate();
    assert!(status.success(), "{status:?}");
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    d.spawn();
    let mut c = d.client().await;
    let job = c
        .get_job(pb::GetJobRequest { job_id: job.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&job), pb::JobState::Succeeded);
}

#[tokio::test]
async fn a_symlink_out_of_the_roots_is_refused_when_the_step_runs() {
    let d = Daemon::start("");
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), d.root().join("link")).unwrap();
    let mut c = d.client().await;
    let path = format!("{}/link/escaped", d.root().display());
    let job = c
        .submit_job(runbook("put", &[("path", &path)]))
        .await
        .unwrap()
        .into_inner();
    let job = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&job), pb::JobState::Failed);
    assert!(
        job.error.contains("outside the runbook's roots"),
        "{}",
        job.error
    );
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "nothing was written outside"
    );
}

#[tokio::test]
async fn history_keeps_at_most_keep_total_finished_jobs() {
    let d = Daemon::start(
        "[history]\nkeep_per_resource = 100\nkeep_total = 3\nprune_interval = \"100ms\"\n",
    );
    let mut c = d.client().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let j = c
            .submit_job(runbook("noop", &[]))
            .await
            .unwrap()
            .into_inner();
        wait_end(&mut c, &j.id).await;
        ids.push(j.id);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let listed: Vec<String> = c
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .jobs
            .into_iter()
            .map(|j| j.id)
            .collect();
        if listed.len() == 3 {
            assert_eq!(
                listed,
                ids[2..].iter().rev().cloned().collect::<Vec<_>>(),
                "the newest three are kept"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pruned to 3: {listed:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
