//! The job ledger on PostgreSQL (`[store] url`), against a real PostgreSQL: what is particular
//! to it. The engine and API suites also run whole with the ledger there (scripts/test.sh runs
//! them a second time with STATELY_TEST_STORE=postgres).

use crate::support::postgres::TestPostgres;
use crate::support::*;
use stately::pb;

fn store(url: &str) -> String {
    format!("[store]\nurl = \"{url}\"\n")
}

/// Starts statelyd with the test daemon's configuration and `extra`, expecting it to stop:
/// its exit code and what it said.
fn start_refused(extra: &str) -> (Option<i32>, String) {
    let d = Daemon::configure(extra, &[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_statelyd"))
        .arg("--config")
        .arg(&d.config)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The rows of a table in the test's schema.
async fn count(pg: &TestPostgres, table: &str) -> i64 {
    TestPostgres::connect(&pg.url())
        .await
        .query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_on_postgresql_runs_jobs_and_keeps_them_across_a_restart() {
    let pg = TestPostgres::start().await;
    let mut d = Daemon::start(&store(&pg.url()));
    let out = d
        .cli()
        .args([
            "run",
            "write",
            "-p",
            "name=pg",
            "-p",
            "content=on postgres\n",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(d.root().join("pg.txt")).unwrap(),
        "on postgres\n"
    );
    // The ledger is in PostgreSQL, not in the data directory.
    assert!(!d.data().join("stately.db").exists());
    assert_eq!(count(&pg, "jobs").await, 1);
    assert!(count(&pg, "events").await >= 4);
    let status = d.cli().args(["-o", "json", "status"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let at = v["server"]["store"].as_str().unwrap();
    assert!(
        at.starts_with("postgresql://127.0.0.1:") && at.ends_with("/postgres"),
        "{at}"
    );
    assert!(
        !at.contains("search_path"),
        "the store is named without its options: {at}"
    );

    // After a restart the history is there, events and all.
    let mut client = d.client().await;
    let before = client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    d.terminate();
    d.spawn();
    let mut client2 = d.client().await;
    let after = client2
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(before.len(), 1);
    assert_eq!(after, before);
    let job = wait_end(&mut client2, &after[0].id).await;
    assert_eq!(state(&job), pb::JobState::Succeeded);
    drop(client);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_survives_postgresql_restarting_under_it_and_its_watchers_miss_nothing() {
    let pg = TestPostgres::own_cluster().await;
    // The job's node, and another node whose watcher reads the job from the ledger.
    let d = Daemon::start(&format!("node = \"edge-b\"\n{}", store(&pg.url())));
    let other = Daemon::start(&format!("node = \"edge-a\"\n{}", store(&pg.url())));
    let mut client = d.client().await;
    for mode in ["fast", "immediate"] {
        let job = client
            .submit_job(runbook("chatty", &[("lines", "150")]))
            .await
            .unwrap()
            .into_inner();
        let watch = pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_seq: 0,
        };
        let mut s = client.watch_job(watch.clone()).await.unwrap().into_inner();
        let mut far = other
            .client()
            .await
            .watch_job(watch)
            .await
            .unwrap()
            .into_inner();
        let mut far_seen = until_log(&mut far, "line 20").await;
        until_log(&mut s, "line 20").await;
        // PostgreSQL goes away under the running job and comes back.
        pg.restart(mode);
        let mut seqs = Vec::new();
        let mut last_state = None;
        while let Some(e) = tokio::time::timeout(std::time::Duration::from_secs(60), s.message())
            .await
            .expect("the stream goes on")
            .unwrap()
        {
            seqs.push(e.seq);
            if let Some(pb::job_event::Event::StateChanged(c)) = e.event {
                last_state = Some(c.to);
            }
        }
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "-m {mode}: the watcher sees every event once, in order: {seqs:?}"
        );
        assert_eq!(
            last_state,
            Some(pb::JobState::Succeeded as i32),
            "-m {mode}"
        );
        // The other node's watcher too, from the first event to the last.
        while let Some(e) = tokio::time::timeout(std::time::Duration::from_secs(60), far.message())
            .await
            .expect("the other node's stream goes on")
            .unwrap()
        {
            far_seen.push(e);
        }
        let far_seqs: Vec<u64> = far_seen.iter().map(|e| e.seq).collect();
        assert_eq!(
            far_seqs,
            (1..=*seqs.last().unwrap()).collect::<Vec<_>>(),
            "-m {mode}: on the other node, every event once, in order"
        );
        let end = wait_end(&mut client, &job.id).await;
        assert_eq!(state(&end), pb::JobState::Succeeded);
        // Every line is in the ledger, once.
        let lines: i64 = TestPostgres::connect(&pg.url())
            .await
            .query_one(
                "SELECT COUNT(*) FROM events WHERE job_id = $1 AND body LIKE '%line %'",
                &[&job.id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(lines, 150, "-m {mode}");
    }
    assert!(
        d.log().contains("the writes wait and are retried"),
        "the outage was seen and ridden out: {}",
        d.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_statelyd_with_the_same_node_name_refuses_to_start() {
    let pg = TestPostgres::start().await;
    let _first = Daemon::start(&store(&pg.url()));
    let (code, said) = start_refused(&store(&pg.url()));
    assert_ne!(code, Some(0), "{said}");
    assert!(said.contains("another statelyd runs as node"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_store_configuration_is_refused_at_start_with_a_clear_message() {
    let pg = TestPostgres::start().await;
    let start = start_refused;
    let (code, said) = start("[store]\nurl = \"postgresql://stately:secret@127.0.0.1/x\"\n");
    assert_eq!(code, Some(64), "{said}");
    assert!(
        said.contains("password_file") && !said.contains("secret"),
        "{said}"
    );
    // Refused before any connection is tried: nothing leaves the machine.
    let (code, said) = start("[store]\nurl = \"postgresql://stately@192.0.2.1/x\"\n");
    assert_eq!(code, Some(64), "{said}");
    assert!(
        said.contains("beyond loopback") && said.contains("insecure"),
        "{said}"
    );
    let (code, said) = start("[store]\nurl = \"mysql://x\"\n");
    assert_eq!(code, Some(64), "{said}");
    assert!(said.contains("not a PostgreSQL URL"), "{said}");
    let (code, said) = start(&format!(
        "[store]\nurl = \"{}\"\npassword_file = \"/nonexistent/pw\"\n",
        pg.url()
    ));
    assert_eq!(code, Some(64), "{said}");
    assert!(said.contains("/nonexistent/pw"), "{said}");
    // Nothing listens there: the start fails, naming where it tried.
    let port = free_port();
    let (code, said) = start(&store(&format!(
        "postgresql://postgres@127.0.0.1:{port}/postgres"
    )));
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains(&format!("127.0.0.1:{port}")), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statelyd_that_lost_the_ledger_to_another_writes_nothing_more() {
    let pg = TestPostgres::start().await;
    let mut a = Daemon::start(&store(&pg.url()));
    let mut ca = a.client().await;
    let first = ca
        .submit_job(runbook("noop", &[]))
        .await
        .unwrap()
        .into_inner();
    wait_end(&mut ca, &first.id).await;
    // A's sessions end (a network cut, an administrator), so its lock goes with them, and
    // another statelyd takes the ledger before A is back.
    let admin = TestPostgres::connect(&pg.admin).await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'statelyd' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    let b = Daemon::start(&store(&pg.url()));
    let jobs_before = count(&pg, "jobs").await;
    // A finds the ledger taken: its writes fail, and nothing of them lands.
    let refused = ca.submit_job(runbook("noop", &[])).await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(count(&pg, "jobs").await, jobs_before, "A wrote nothing");
    // And A stops by itself, non-zero, saying why.
    let status = tokio::task::spawn_blocking(move || {
        let status = a.terminate_wait();
        (status, a.log())
    });
    let (status, log) = tokio::time::timeout(std::time::Duration::from_secs(20), status)
        .await
        .expect("A exits by itself")
        .unwrap();
    assert_eq!(status.code(), Some(75), "{status:?}");
    assert!(
        log.contains("another statelyd has taken this ledger"),
        "A says why it stopped: {log}"
    );
    // B goes on.
    let mut cb = b.client().await;
    let job = cb
        .submit_job(runbook("noop", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        state(&wait_end(&mut cb, &job.id).await),
        pb::JobState::Succeeded
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn over_tls_with_a_password_file_the_ledger_is_reached_and_its_certificate_verified() {
    let pg = TestPostgres::own_cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::support::pki::Ca::new("ledger test CA");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let leaf = ca.server(dir.path(), "pg");
    pg.enable_tls(&leaf.cert, &leaf.key, "s3cret-pw").await;
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret-pw\n").unwrap();
    let tls = |ca: &std::path::Path| {
        format!(
            "[store]\nurl = \"{}\"\npassword_file = \"{}\"\nca_file = \"{}\"\n",
            pg.tls_url(),
            pw.display(),
            ca.display()
        )
    };
    let d = Daemon::start(&tls(&ca_file));
    let mut c = d.client().await;
    let job = c
        .submit_job(runbook("noop", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        state(&wait_end(&mut c, &job.id).await),
        pb::JobState::Succeeded
    );
    // Every connection statelyd holds is TLS, as the role `stately`.
    let admin = TestPostgres::connect(&pg.admin).await;
    let row = admin
        .query_one(
            "SELECT COUNT(*), COALESCE(bool_and(s.ssl), false), COALESCE(bool_and(a.usename = 'stately'), false) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'statelyd'",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, i64>(0) >= 1);
    assert!(
        row.get::<_, bool>(1),
        "every connection of statelyd uses TLS"
    );
    assert!(row.get::<_, bool>(2), "as the role of the URL");
    drop(d);

    // A certificate from a CA statelyd was not told to trust: refused, saying why.
    let other = crate::support::pki::Ca::new("another CA");
    let other_file = other.write(&dir.path().join("other.pem"));
    let (code, said) = start_refused(&tls(&other_file));
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("certificate"), "{said}");
    assert!(
        !said.contains("s3cret-pw"),
        "the password is never shown: {said}"
    );
}

fn nodes(d: &Daemon) -> Vec<serde_json::Value> {
    let out = d
        .cli()
        .args(["-o", "json", "nodes", "list"])
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
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_heartbeat_on_the_database_clock_and_a_node_started_again_fences_the_old_one() {
    let pg = TestPostgres::start().await;
    let mut d = Daemon::start(&format!("node = \"edge-a\"\n{}", store(&pg.url())));
    let n = nodes(&d);
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(
        (
            n[0]["name"].as_str(),
            n[0]["state"].as_str(),
            n[0]["epoch"].as_u64(),
            n[0]["answering"].as_bool()
        ),
        (Some("edge-a"), Some("up"), Some(1), Some(true))
    );
    // A start of the node is a new epoch.
    d.terminate();
    d.spawn();
    assert_eq!(nodes(&d)[0]["epoch"], 2);
    // A node whose heartbeat stopped 20 s ago, by the database's clock, is lost.
    let admin = TestPostgres::connect(&pg.url()).await;
    admin
        .batch_execute(
            "INSERT INTO nodes VALUES ('edge-b', 3, now() - interval '1 hour', now() - interval '20 seconds', '0.1.0')",
        )
        .await
        .unwrap();
    let n = nodes(&d);
    let b = n.iter().find(|x| x["name"] == "edge-b").unwrap();
    assert_eq!(
        (b["state"].as_str(), b["answering"].as_bool()),
        (Some("lost"), Some(false))
    );
    // Its age on the database's clock, whatever the CLI's says.
    let age = b["heartbeat_age_s"].as_i64().unwrap();
    assert!((20..40).contains(&age), "{b}");
    let table = d.cli().args(["nodes", "list"]).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.starts_with("NODE"), "{table}");
    assert!(
        table.contains("edge-a  up") && table.contains("(this node)"),
        "{table}"
    );
    assert!(table.contains("edge-b  lost"), "{table}");

    // Another start of edge-a took its name (a new epoch): the old one's next heartbeat finds
    // its epoch over, and it stops, touching nothing more.
    admin
        .batch_execute("UPDATE nodes SET epoch = epoch + 1 WHERE name = 'edge-a'")
        .await
        .unwrap();
    let (status, log) = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tokio::task::spawn_blocking(move || (d.terminate_wait(), d.log())),
    )
    .await
    .expect("the old epoch stops by itself")
    .unwrap();
    assert_eq!(status.code(), Some(75), "{status:?}");
    assert!(log.contains("epoch 2 is over"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn on_sqlite_the_node_list_is_the_answering_node() {
    let d = Daemon::start("node = \"solo\"\n[store]\n");
    let n = nodes(&d);
    assert_eq!(n.len(), 1);
    assert_eq!(
        (
            n[0]["name"].as_str(),
            n[0]["state"].as_str(),
            n[0]["answering"].as_bool()
        ),
        (Some("solo"), Some("up"), Some(true))
    );
}
