//! `/metrics`: what Prometheus scrapes, after a job ran and with a stats watcher on a real
//! HAProxy (the server status series come from the shared poller's latest poll).

use crate::support::*;
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
