//! `/metrics`: what Prometheus scrapes, after a job ran and with a stats watcher on a real
//! HAProxy (the server status series come from the shared poller's latest poll).

use crate::support::*;
use std::time::Duration;

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
            .starts_with("text/plain"),
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
        "process_resident_memory_bytes ",
        "# TYPE stately_jobs_finished counter",
    ] {
        assert!(text.contains(want), "no {want} in:\n{text}");
    }
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
