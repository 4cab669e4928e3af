//! HAProxy's log stream heard by statelyd (`log_socket`): a real haproxy logs to statelyd's
//! socket and to this test's own ("the tap", which tells when HAProxy said it). With the poll
//! interval at 10 s, only the event path can explain a change seen within a fraction of it.

use crate::support::*;
use stately::pb;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tonic::Code;

struct Edge {
    d: Daemon,
    h: Haproxy,
    smtp: SmtpSink,
    s1: Backend,
    tap: UnixDatagram,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

async fn edge() -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.sock");
    let tap_path = dir.path().join("tap.sock");
    let tap = UnixDatagram::bind(&tap_path).unwrap();
    let s1 = Backend::start(0).await;
    let h = Haproxy::start_full(
        dir.path(),
        &[("app", vec![("s1", s1.port)])],
        false,
        &format!(
            "  log {} local0 notice\n  log {} local0 notice\n",
            log.display(),
            tap_path.display()
        ),
        "  log global\n  default-server check inter 100ms fall 1 rise 1\n",
    );
    let smtp = SmtpSink::start(&dir.path().join("mail"));
    let d = Daemon::start(&format!(
        "metrics_listen = \"127.0.0.1:0\"\n[[haproxy]]\nname = \"edge\"\nstats_socket = \"{}\"\nlog_socket = \"{}\"\n{}",
        h.stats.display(),
        log.display(),
        smtp.config()
    ));
    // s1 UP and checked.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !show_stat(&h.stats).iter().any(|r| {
        r.server == "s1" && r.status.raw == "UP" && r.check_status.as_deref() != Some("INI")
    }) {
        assert!(Instant::now() < deadline, "s1 never came UP");
        std::thread::sleep(Duration::from_millis(20));
    }
    Edge {
        d,
        h,
        smtp,
        s1,
        tap,
        log,
        _dir: dir,
    }
}

/// Reads the tap until HAProxy says `what`; when it said it.
fn heard(tap: &UnixDatagram, what: &str) -> Instant {
    tap.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let n = tap.recv(&mut buf).expect("haproxy logs to the tap");
        if String::from_utf8_lossy(&buf[..n]).contains(what) {
            return Instant::now();
        }
    }
}

async fn watch(d: &Daemon, interval_s: i64) -> tonic::Streaming<pb::StatsUpdate> {
    let mut stats =
        pb::stats_client::StatsClient::with_interceptor(d.channel().await, bearer(Some(OPERATOR)));
    let mut s = stats
        .watch_stats(pb::WatchStatsRequest {
            target: "edge".into(),
            changes_only: true,
            interval: Some(prost_types::Duration {
                seconds: interval_s,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    s.message().await.unwrap();
    s
}

/// Waits for a delta that shows s1 in `status`; when it arrived.
async fn until_s1(
    s: &mut tonic::Streaming<pb::StatsUpdate>,
    status: &str,
    within: Duration,
) -> Instant {
    tokio::time::timeout(within, async {
        loop {
            let u = s.message().await.unwrap().unwrap();
            if let Some(pb::stats_update::Update::Delta(d)) = u.update
                && d.changed.iter().any(|c| {
                    c.row.as_ref().is_some_and(|r| {
                        r.server == "s1" && r.status.as_ref().is_some_and(|st| st.raw == status)
                    })
                })
            {
                return Instant::now();
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("s1 not {status} in the stream within {within:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_down_line_reaches_watchers_and_the_alert_mail_at_once_with_polls_10_s_apart() {
    let mut e = edge().await;
    let mut c = e.d.client().await;
    let (_watch, _events) = start_alert_watch(&mut c, 10_000).await;
    let mut s = watch(&e.d, 10).await;

    e.s1.stop().await;
    let tap = e.tap.try_clone().unwrap();
    let said = tokio::task::spawn_blocking(move || heard(&tap, "Server app/s1 is DOWN"))
        .await
        .unwrap();
    let seen = until_s1(&mut s, "DOWN", Duration::from_secs(5)).await;
    let to_watcher = seen.saturating_duration_since(said);
    assert!(
        to_watcher < Duration::from_millis(500),
        "WatchStats saw DOWN {to_watcher:?} after HAProxy's line (polls are 10 s apart)"
    );
    let mails = e.smtp.wait_for(1, Duration::from_secs(3)).await;
    let to_mail = said.elapsed();
    assert!(mails[0].contains("DOWN"), "{}", mails[0]);
    assert!(
        to_mail < Duration::from_secs(2),
        "the DOWN mail came {to_mail:?} after HAProxy's line"
    );

    // The restart of statelyd: the socket is bound again and the event path resumes.
    e.d.kill9();
    e.d.spawn();
    let mut s = watch(&e.d, 10).await;
    let _s1 = Backend::start(e.s1.port).await;
    let tap = e.tap.try_clone().unwrap();
    let said = tokio::task::spawn_blocking(move || heard(&tap, "Server app/s1 is UP"))
        .await
        .unwrap();
    let seen = until_s1(&mut s, "UP", Duration::from_secs(5)).await;
    let after_restart = seen.saturating_duration_since(said);
    assert!(
        after_restart < Duration::from_millis(500),
        "after a restart, WatchStats saw UP {after_restart:?} after HAProxy's line"
    );
    let _ = &e.h;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_junk_datagrams_leaves_statelyd_responsive_and_bounded() {
    let mut e = edge().await;
    let mut s = watch(&e.d, 2).await;
    let pid = e.d.pid().unwrap();
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    let before = rss(pid);
    let log = e.log.clone();
    let flood = std::thread::spawn(move || {
        let sock = UnixDatagram::unbound().unwrap();
        sock.set_nonblocking(true).unwrap();
        let junk = [b'x'; 1000];
        let lies = b"<129>Dec  1 19:44:20 haproxy[1]: Server app/s1 is DOWN, reason: forged";
        // As fast as it goes for 1.5 s: at least 100k attempts; the kernel refuses what
        // statelyd, reading at its limit, leaves in the socket buffer.
        let (mut tried, mut sent) = (0u64, 0u64);
        let t = Instant::now();
        while tried < 100_000 || t.elapsed() < Duration::from_millis(1500) {
            let msg: &[u8] = if tried % 10 == 0 { lies } else { &junk };
            tried += 1;
            if sock.send_to(msg, &log).is_ok() {
                sent += 1;
            }
        }
        (tried, sent, t.elapsed())
    });
    // Calls are answered meanwhile.
    let mut c = e.d.client().await;
    let mut worst = Duration::ZERO;
    while !flood.is_finished() {
        let t = Instant::now();
        c.list_jobs(pb::ListJobsRequest::default()).await.unwrap();
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (tried, sent, took) = flood.join().unwrap();
    assert!(tried >= 100_000);
    // Read at most 5,000 a second (and a burst, and what the socket buffer held).
    assert!(
        (sent as f64) < 5_000.0 * took.as_secs_f64() + 1_000.0 + 4_000.0,
        "{sent} of {tried} datagrams taken in {took:?}"
    );
    assert!(
        worst < Duration::from_millis(500),
        "a call took {worst:?} during the flood"
    );
    // The forged lines' wake-ups were coalesced: one poll per 2 ms at most (the tick's own
    // polls aside).
    let polls = scrape_polls(&e.d).await;
    let most = took.as_secs_f64() / 0.002 + 10.0;
    assert!(
        polls <= most,
        "{polls} polls in {took:?} for {} forged state lines (at most {most:.0})",
        sent / 10
    );
    let grown = rss(pid).saturating_sub(before);
    assert!(
        grown < 64 * 1024,
        "RSS grew {grown} KiB during the flood of {sent} datagrams"
    );
    // The forged DOWN lines woke polls that found s1 UP: nothing changed for the watcher.
    let quiet = tokio::time::timeout(Duration::from_millis(300), s.message()).await;
    if let Ok(Ok(Some(u))) = &quiet {
        assert!(
            !format!("{u:?}").contains("DOWN"),
            "a forged line invented a state: {u:?}"
        );
    }
    // The real transition is still seen (by the event path or, at worst, the 2 s poll).
    e.s1.stop().await;
    until_s1(&mut s, "DOWN", Duration::from_secs(4)).await;
}

/// `stately_stats_polls_total` of the target, from /metrics.
async fn scrape_polls(d: &Daemon) -> f64 {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let at = d
        .log()
        .lines()
        .find_map(|l| {
            l.split("metrics on http://")
                .nth(1)
                .map(|r| r.split('/').next().unwrap().to_owned())
        })
        .expect("the metrics line");
    let text = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{at}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(r#"stately_stats_polls_total{target="edge"} "#))
        .and_then(|v| v.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no polls counter in {text}"))
}

#[test]
fn a_log_stream_needs_a_stats_socket_and_udp_stays_on_loopback() {
    for (extra, says) in [
        ("log_socket = \"/tmp/x.sock\"\n", "needs stats_socket"),
        (
            "stats_socket = \"/tmp/s.sock\"\nlog_udp = \"192.0.2.1:5140\"\n",
            "log_udp must be a loopback address",
        ),
        (
            "stats_socket = \"/tmp/s.sock\"\nlog_socket = \"relative.sock\"\n",
            "log_socket must be an absolute path",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, format!("[[haproxy]]\nname = \"edge\"\n{extra}")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_statelyd"))
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{extra}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{extra}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_log_stream_edit_points_haproxy_at_statelyd_and_the_event_path_works() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.sock");
    let mut s1 = Backend::start(0).await;
    let h = Haproxy::from_config(
        dir.path(),
        &format!(
            "global\n  stats socket {{stats}} mode 600 level admin expose-fd listeners\n\n\
             defaults\n  mode http\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n\n\
             frontend web\n  bind 127.0.0.1:{}\n  default_backend app\n\n\
             backend app\n  server s1 127.0.0.1:{} check inter 100ms fall 1 rise 1\n",
            free_port(),
            s1.port
        ),
    );
    let d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nconfig = \"{}\"\nmaster_socket = \"{}\"\nstats_socket = \"{}\"\nlog_socket = \"{}\"\n",
        h.config.display(),
        h.dir.join("master.sock").display(),
        h.stats.display(),
        log.display()
    ));
    let out = d
        .cli()
        .args(["haproxy", "edit", "edge", "--log-stream", "defaults"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = std::fs::read_to_string(&h.config).unwrap();
    assert!(
        cfg.contains(&format!("  log {} local0 notice\n", log.display())),
        "{cfg}"
    );
    assert!(cfg.contains("  log global\n"), "{cfg}");
    // Again: nothing to change.
    let out = d
        .cli()
        .args([
            "haproxy",
            "edit",
            "edge",
            "--log-stream",
            "defaults",
            "--dry-run",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no change"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The reloaded HAProxy logs to statelyd: a change seen at once with polls 10 s apart.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !show_stat(&h.stats).iter().any(|r| {
        r.server == "s1" && r.status.raw == "UP" && r.check_status.as_deref() != Some("INI")
    }) {
        assert!(Instant::now() < deadline, "s1 never came UP");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut s = watch(&d, 10).await;
    let t = Instant::now();
    s1.stop().await;
    until_s1(&mut s, "DOWN", Duration::from_secs(3)).await;
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_bad_log_stream_edit_is_refused_with_the_right_code_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haproxy::from_config(
        dir.path(),
        &format!(
            "global\n  stats socket {{stats}} mode 600 level admin\n\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n\n\
             frontend web\n  bind 127.0.0.1:{}\n  default_backend app\n\nbackend app\n  server s1 127.0.0.1:{}\n",
            free_port(),
            free_port()
        ),
    );
    let target = |name: &str, log: bool| {
        format!(
            "[[haproxy]]\nname = \"{name}\"\nconfig = \"{}\"\nmaster_socket = \"{}\"\nstats_socket = \"{}\"\n{}",
            h.config.display(),
            h.dir.join("master.sock").display(),
            h.stats.display(),
            if log {
                format!(
                    "log_socket = \"{}\"\n",
                    dir.path().join("log.sock").display()
                )
            } else {
                String::new()
            }
        )
    };
    let d = Daemon::start(&(target("edge", true) + &target("plain", false)));
    let before = std::fs::read(&h.config).unwrap();
    let mut c = d.client().await;
    let edit = |target: &str, defaults: &str| pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::HaproxyEdit(pb::HaproxyEditJob {
                target: target.into(),
                edits: vec![pb::HaproxyEdit {
                    op: Some(pb::haproxy_edit::Op::LogStream(pb::LogStreamEdit {
                        defaults: defaults.into(),
                    })),
                }],
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    let long = "defaults ".to_owned() + &"x".repeat(5000);
    for (t, defaults, code) in [
        ("edge", "frontend web", Code::InvalidArgument),
        ("edge", "defaults\nglobal", Code::NotFound),
        ("edge", "defaults a b", Code::InvalidArgument),
        ("edge", long.as_str(), Code::InvalidArgument),
        ("edge", "defaults nosuch", Code::NotFound),
        ("plain", "defaults", Code::FailedPrecondition),
    ] {
        let e = c.submit_job(edit(t, defaults)).await.unwrap_err();
        assert_eq!(e.code(), code, "{t} {defaults:.40}: {e:?}");
        assert!(e.message().len() < 300, "{}", e.message());
    }
    assert_eq!(std::fs::read(&h.config).unwrap(), before);
    let jobs = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(jobs.jobs.is_empty(), "{:?}", jobs.jobs);
}
