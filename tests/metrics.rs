//! `/metrics`: what Prometheus scrapes, after a job ran and with a stats watcher on a real
//! HAProxy (the server status series come from the shared poller's latest poll).

use crate::support::*;
use stately::pb;
use std::time::Duration;

fn metrics_addr(d: &Daemon) -> String {
    d.log()
        .lines()
        .find_map(|l| l.split("metrics on http://").nth(1))
        .and_then(|rest| rest.split('/').next())
        .expect("the metrics line")
        .to_owned()
}

async fn scrape(d: &Daemon) -> String {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let log = d.log();
    let at = log
        .lines()
        .find_map(|l| l.split("metrics on http://").nth(1))
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no metrics line: {log}"))
        .to_owned();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = client
        .get(format!("http://{at}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{:?}",
        r.headers()
    );
    r.text().await.unwrap()
}

#[tokio::test]
async fn metrics_count_jobs_and_show_server_status_from_the_shared_poller() {
    let dir = tempfile::tempdir().unwrap();
    let up = Backend::start(0).await;
    let h = Haproxy::start(
        dir.path(),
        &[("app", vec![("s1", up.port), ("s2", free_port())])],
    );
    let d = Daemon::start(&format!(
        "metrics_listen = \"127.0.0.1:0\"\n[[haproxy]]\nname = \"edge\"\nstats_socket = \"{}\"\n",
        h.stats.display()
    ));
    let mut c = d.client().await;
    let job = c
        .submit_job(runbook("noop", &[]))
        .await
        .unwrap()
        .into_inner();
    wait_end(&mut c, &job.id).await;
    let failed = c
        .submit_job(runbook("write-then-fail", &[("name", "m")]))
        .await
        .unwrap()
        .into_inner();
    wait_end(&mut c, &failed.id).await;
    // A watcher keeps the target's poller running; metrics read its latest poll.
    let mut stats = stately::pb::stats_client::StatsClient::with_interceptor(
        d.channel().await,
        bearer(Some(OPERATOR)),
    );
    let mut watch = stats
        .watch_stats(stately::pb::WatchStatsRequest {
            target: "edge".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let text = loop {
        let text = scrape(&d).await;
        if text.contains(r#"server="s2",state="DOWN"} 1"#) {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for want in [
        r#"stately_jobs_finished_total{kind="runbook",outcome="succeeded"} 1"#,
        r#"stately_jobs_finished_total{kind="runbook",outcome="failed"} 1"#,
        r#"stately_jobs{kind="runbook",state="SUCCEEDED"} 1"#,
        "stately_job_duration_seconds_count{kind=\"runbook\"} 2",
        r#"stately_haproxy_server_status{target="edge",proxy="app",server="s1",state="UP"} 1"#,
        r#"stately_haproxy_server_status{target="edge",proxy="app",server="s1",state="DOWN"} 0"#,
        r#"stately_build_info{version=""#,
        "stately_unwinds_incomplete 0",
        r#"stately_stats_poll_duration_seconds_count{target="edge"} "#,
        "process_resident_memory_bytes ",
        "# TYPE stately_jobs_finished counter",
    ] {
        assert!(text.contains(want), "no {want} in:\n{text}");
    }
    // HAProxy's exporter's five states, no others.
    let s1_states = text
        .lines()
        .filter(|l| {
            l.starts_with(r#"stately_haproxy_server_status{target="edge",proxy="app",server="s1","#)
        })
        .count();
    assert_eq!(s1_states, 5, "{text}");
    // promtool's lint of what Prometheus would scrape.
    let mut lint = std::process::Command::new("/usr/bin/promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus) is installed");
    {
        use std::io::Write;
        lint.stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = lint.wait_with_output().unwrap();
    // The output is OpenMetrics (prometheus-client's encoder): a counter's HELP names the
    // family (stately_jobs_finished) and its sample adds _total. Debian's promtool lints the
    // older text format and reads that as "no help text" for the _total name; anything else
    // it says is a problem.
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = said
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            let Some(name) = l.strip_suffix(" no help text") else {
                return true;
            };
            let Some(family) = name.strip_suffix("_total") else {
                return true;
            };
            !text.contains(&format!("# HELP {family} "))
        })
        .collect();
    assert!(problems.is_empty(), "promtool check metrics: {said}");

    // A real Prometheus scrapes it, and its queries see the job and the server state.
    let prom_port = free_port();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: stately\n    scrape_interval: 500ms\n    static_configs:\n      - targets: ['{at}']\n",
            at = metrics_addr(&d)
        ),
    )
    .unwrap();
    let mut prom = std::process::Command::new("/usr/bin/prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let query = |q: &'static str| {
        let client = client.clone();
        async move {
            let url = reqwest::Url::parse_with_params(
                &format!("http://127.0.0.1:{prom_port}/api/v1/query"),
                &[("query", q)],
            )
            .ok()?;
            let r = client.get(url).send().await.ok()?;
            let v: serde_json::Value = serde_json::from_str(&r.text().await.ok()?).ok()?;
            v["data"]["result"][0]["value"][1]
                .as_str()
                .map(str::to_owned)
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let jobs =
            query(r#"stately_jobs_finished_total{kind="runbook",outcome="succeeded"}"#).await;
        let down = query(r#"stately_haproxy_server_status{server="s2",state="DOWN"}"#).await;
        if jobs.as_deref() == Some("1") && down.as_deref() == Some("1") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus sees jobs {jobs:?}, s2 DOWN {down:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = prom.kill();
    let _ = prom.wait();

    // Anything but GET /metrics is not there.
    let at = d
        .log()
        .lines()
        .find_map(|l| {
            l.split("metrics on http://")
                .nth(1)
                .map(|r| r.split('/').next().unwrap().to_owned())
        })
        .unwrap();
    let r = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{at}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// The value of the sample `series` (name and labels, exactly as scraped).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next()?.parse().ok())
}

#[tokio::test]
async fn metrics_time_steps_queues_cancels_and_count_watchers_transitions_renewals_and_the_outbox()
{
    let dir = tempfile::tempdir().unwrap();
    let mut s1 = Backend::start(0).await;
    let h = Haproxy::start_full(
        dir.path(),
        &[("app", vec![("s1", s1.port)])],
        false,
        "",
        "default-server check inter 100ms fall 2 rise 1\n",
    );
    std::fs::create_dir_all(dir.path().join("www")).unwrap();
    // The relay stops once the watch started, so the alert mail waits in the outbox; the ACME
    // directory is a closed port, so the renewal fails.
    let mut smtp = SmtpSink::start(&dir.path().join("mail"));
    let d = Daemon::start(&format!(
        "metrics_listen = \"127.0.0.1:0\"\n[[haproxy]]\nname = \"edge\"\nstats_socket = \"{}\"\n{}\
         [certificates]\nroot = \"{}\"\nwebroots = [\"{}\"]\nrenew_check = \"0s\"\ndefault_acme = \"ca\"\n\
         [[acme]]\nname = \"ca\"\ndirectory = \"https://127.0.0.1:{}/dir\"\n",
        h.stats.display(),
        smtp.config(),
        dir.path().join("le").display(),
        dir.path().join("www").display(),
        free_port(),
    ));
    let mut c = d.client().await;

    // One job blocks in its second step; a second on the same resource queues behind it.
    let first = c
        .submit_job(runbook("write-then-block", &[("name", "q")]))
        .await
        .unwrap()
        .into_inner();
    let mut events = c
        .watch_job(pb::WatchJobRequest {
            job_id: first.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    until_log_with(&mut events, "ready").await;
    let second = c
        .submit_job(runbook("write-then-block", &[("name", "q")]))
        .await
        .unwrap()
        .into_inner();
    // The stats watcher and the job watcher are open now.
    let mut stats = stately::pb::stats_client::StatsClient::with_interceptor(
        d.channel().await,
        bearer(Some(OPERATOR)),
    );
    let mut watch = stats
        .watch_stats(stately::pb::WatchStatsRequest {
            target: "edge".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap();
    let text = scrape(&d).await;
    assert_eq!(
        sample(&text, r#"stately_watchers{stream="stats"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"stately_watchers{stream="job"}"#),
        Some(1.0),
        "{text}"
    );
    for id in [&first.id, &second.id] {
        if *id == second.id {
            // Its turn came when the first ended; cancelled in its blocking step too.
            let mut events = c
                .watch_job(pb::WatchJobRequest {
                    job_id: id.clone(),
                    after_seq: 0,
                })
                .await
                .unwrap()
                .into_inner();
            until_log_with(&mut events, "ready").await;
        }
        let j = c
            .cancel_job(pb::CancelJobRequest {
                job_id: id.clone(),
                reason: "enough".into(),
                wait: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(state(&j), pb::JobState::Cancelled, "{j:?}");
    }

    // A renewal (an issuance submitted as one) that fails.
    let mut renew = pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::CertificateIssue(
                pb::CertificateIssueJob {
                    names: vec!["renew.example.test".into()],
                    webroot: dir.path().join("www").display().to_string(),
                    ..Default::default()
                },
            )),
        }),
        ..Default::default()
    };
    renew.labels.insert("trigger".into(), "renew".into());
    let job = c.submit_job(renew).await.unwrap().into_inner();
    assert_eq!(
        state(&wait_end(&mut c, &job.id).await),
        pb::JobState::Failed
    );

    // An alert watch sees s1 go DOWN; its mail cannot be delivered.
    let (_, wevents) = start_alert_watch(&mut c, 100).await;
    smtp.stop();
    s1.stop().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let text = loop {
        let text = scrape(&d).await;
        if sample(&text, "stately_alert_outbox_oldest_age_seconds").is_some_and(|v| v > 0.0) {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(events);
    drop(wevents);
    drop(watch);

    let count =
        |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    // The blocked step and the write before it, by kind, step and end.
    assert!(
        count(
            r#"stately_step_duration_seconds_count{kind="runbook",step="write q.txt",state="succeeded"}"#
        ) >= 1.0
    );
    assert_eq!(
        count(
            r#"stately_step_duration_seconds_count{kind="runbook",step="block",state="cancelled"}"#
        ),
        2.0
    );
    // Both cancels unwound; the second job waited for the first on file:q.
    assert_eq!(
        count(r#"stately_cancel_to_unwound_seconds_count{kind="runbook"}"#),
        2.0
    );
    assert!(count(r#"stately_queue_wait_seconds_count{resource="file:q"}"#) >= 2.0);
    assert!(count(r#"stately_queue_wait_seconds_sum{resource="file:q"}"#) > 0.0);
    assert_eq!(
        count(r#"stately_certificate_renewals_total{trigger="renew",result="failed"}"#),
        1.0
    );
    assert_eq!(
        count(r#"stately_alert_transitions_total{target="edge",severity="warning",tag="DOWN"}"#),
        1.0
    );
    assert_eq!(count("stately_alert_outbox_pending"), 1.0);

    // The streams closed: the gauges come back down.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(&d).await;
        if sample(&text, r#"stately_watchers{stream="job"}"#) == Some(0.0)
            && sample(&text, r#"stately_watchers{stream="stats"}"#) == Some(0.0)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn label_values_a_client_chooses_are_bounded() {
    // Runbook parameters become resources; a client sending thousands of distinct ones must
    // not grow a scrape without bound.
    let d = Daemon::start("metrics_listen = \"127.0.0.1:0\"\n");
    let mut c = d.client().await;
    for i in 0..260 {
        let job = c
            .submit_job(runbook(
                "write",
                &[("name", &format!("n{i}")), ("content", "x")],
            ))
            .await
            .unwrap()
            .into_inner();
        if i % 50 == 49 {
            wait_end(&mut c, &job.id).await;
        }
    }
    let text = scrape(&d).await;
    let resources = text
        .lines()
        .filter(|l| l.starts_with("stately_queue_wait_seconds_count{"))
        .count();
    assert!(resources <= 201, "{resources} resource series");
    assert!(
        text.contains(r#"stately_queue_wait_seconds_count{resource="other"}"#),
        "{text}"
    );
}
