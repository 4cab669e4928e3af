//! Alert watches against a real haproxy (master-worker, loopback, real TCP backends) and a
//! real SMTP server (aiosmtpd): one mail per transition, grouped per poll, a durable outbox
//! that survives the SMTP server and the daemon going away, and no false alert on a reload.

use crate::support::*;
use stately::pb;
use std::time::Duration;
use tonic::Code;

struct Edge {
    d: Daemon,
    h: Haproxy,
    smtp: SmtpSink,
    servers: Vec<Backend>,
    _dir: tempfile::TempDir,
}

/// statelyd with target "edge" (stats + master socket) on a haproxy with backend "app" (s1,
/// s2) checked every 100 ms, and an SMTP sink.
async fn edge() -> Edge {
    edge_checked("check inter 100ms fall 2 rise 1").await
}

async fn edge_checked(checks: &str) -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let servers = vec![Backend::start(0).await, Backend::start(0).await];
    let h = Haproxy::start_full(
        dir.path(),
        &[(
            "app",
            vec![("s1", servers[0].port), ("s2", servers[1].port)],
        )],
        false,
        "",
        &format!("default-server {checks}\n"),
    );
    let smtp = SmtpSink::start(&dir.path().join("mail"));
    let d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nstats_socket = \"{}\"\nmaster_socket = \"{}\"\n{}",
        h.stats.display(),
        h.dir.join("master.sock").display(),
        smtp.config()
    ));
    wait_all_up(&h.stats).await;
    Edge {
        d,
        h,
        smtp,
        servers,
        _dir: dir,
    }
}

async fn wait_all_up(stats: &std::path::Path) {
    wait_stat(stats, |rows| {
        rows.iter()
            .filter(|r| r.kind == stately::stats::parse::RowType::Server)
            .all(|r| r.status.raw == "UP" && r.check_status.as_deref() != Some("INI"))
    })
    .await;
}

async fn wait_stat(stats: &std::path::Path, ok: impl Fn(&[stately::stats::parse::Row]) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if ok(&show_stat(stats)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "haproxy never got there"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn watch_spec(to: &[&str], hold_ms: u32) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::AlertWatch(pb::AlertWatchJob {
                target: "edge".into(),
                to: to.iter().map(|s| s.to_string()).collect(),
                interval_ms: 100,
                hold_ms: Some(hold_ms),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

/// Starts a watch and waits until it is watching.
async fn start_watch(client: &mut Client, to: &[&str], hold_ms: u32) -> String {
    let job = client
        .submit_job(watch_spec(to, hold_ms))
        .await
        .unwrap()
        .into_inner();
    let mut s = client
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    until_log_with(&mut s, "watching 'edge'").await;
    job.id
}

/// Stops a watch; it ends CANCELLED.
async fn stop(client: &mut Client, id: &str) -> pb::Job {
    let job = client
        .cancel_job(pb::CancelJobRequest {
            job_id: id.into(),
            reason: "test over".into(),
            wait: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&job), pb::JobState::Cancelled, "{job:?}");
    job
}

fn subject(mail: &str) -> String {
    header(mail, "Subject").unwrap_or_default()
}

#[tokio::test]
async fn a_down_server_mails_once_and_its_recovery_once() {
    let mut e = edge().await;
    let mut c = e.d.client().await;
    let id = start_watch(&mut c, &["ops@example.test"], 2000).await;

    let port = e.servers[0].port;
    e.servers[0].stop().await;
    let mails = e.smtp.wait_for(1, Duration::from_secs(10)).await;
    let down = &mails[0];
    assert_eq!(subject(down), "[stately] edge: app/s1 DOWN", "{down}");
    assert!(
        down.contains("status DOWN, check L4CON"),
        "the reason: {down}"
    );
    assert!(
        down.contains("(Layer4 connection problem)"),
        "the check's description: {down}"
    );
    assert!(down.contains("seen at 20"), "the time: {down}");
    assert!(header(down, "To").unwrap().contains("ops@example.test"));
    assert!(header(down, "Message-ID").unwrap().contains(&id));

    e.servers[0] = Backend::start(port).await;
    let mails = e.smtp.wait_for(2, Duration::from_secs(10)).await;
    let up = &mails[1];
    assert_eq!(subject(up), "[stately] edge: app/s1 UP", "{up}");
    assert!(up.contains("was DOWN for"), "{up}");
    // Ten more polls: nothing more to say.
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // The CLI lists the watch, and `jobs watch` shows the alerts it sent.
    let out = e.d.cli().args(["alerts", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains(&id) && listed.contains("ops@example.test"),
        "{listed}"
    );
    let out = e.d.cli().args(["alerts", "stop", &id]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("CANCELLED"));
    let out = e.d.cli().args(["jobs", "watch", &id]).output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("alert #1: [stately] edge: app/s1 DOWN")
            && shown.contains("alert #2: [stately] edge: app/s1 UP")
            && shown.contains("alert #2 delivered"),
        "{shown}"
    );
    assert_eq!(e.smtp.mails().len(), 2, "one mail per transition");
    let out = e.d.cli().args(["alerts", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&id));
    drop(e.h);
}

#[tokio::test]
async fn a_mail_waits_for_the_smtp_server_and_arrives_once() {
    let mut e = edge().await;
    let mut c = e.d.client().await;
    let id = start_watch(&mut c, &["ops@example.test"], 2000).await;
    let mut events = events(&mut c, &id).await;

    e.smtp.stop();
    e.servers[1].stop().await;
    until_log_with(&mut events, "alert #1: [stately] edge: app/s2 DOWN").await;
    until_log_with(&mut events, "delivery attempt 2 failed").await;
    assert!(e.smtp.mails().is_empty());

    e.smtp.spawn();
    until_log_with(&mut events, "alert #1 delivered").await;
    let mails = e.smtp.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(subject(&mails[0]), "[stately] edge: app/s2 DOWN");
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop(&mut c, &id).await;
    assert_eq!(e.smtp.mails().len(), 1, "delivered once");
}

#[tokio::test]
async fn a_daemon_restart_mid_outage_neither_repeats_nor_loses_an_alert() {
    let mut e = edge().await;
    let mut c = e.d.client().await;
    let id = start_watch(&mut c, &["ops@example.test"], 2000).await;
    let (p0, p1) = (e.servers[0].port, e.servers[1].port);

    e.servers[0].stop().await;
    e.smtp.wait_for(1, Duration::from_secs(10)).await;

    // An orderly stop: the watch stays RUNNING and carries on after the start.
    assert!(e.d.terminate().success());
    // While the daemon is away, s2 goes down too: the backend has no server UP.
    e.servers[1].stop().await;
    wait_stat(&e.h.stats, |rows| {
        rows.iter()
            .any(|r| r.server == "s2" && r.status.raw == "DOWN")
    })
    .await;
    e.d.spawn();
    let mut c = e.d.client().await;
    let mails = e.smtp.wait_for(2, Duration::from_secs(10)).await;
    let second = &mails[1];
    assert_eq!(
        subject(second),
        "[stately] edge: backend app CRITICAL, app/s2 DOWN",
        "{second}"
    );
    assert!(
        second.contains("app/s2") && !second.contains("app/s1"),
        "{second}"
    );
    let job = c
        .get_job(pb::GetJobRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&job), pb::JobState::Running);
    // The relay has the mail; the kill waits until the watch has recorded that (a kill in
    // between would rightly send it again: delivery is at least once, with a stable
    // Message-ID for the receiver to drop the copy).
    let mut events = events(&mut c, &id).await;
    until_log_with(&mut events, "alert #2 delivered").await;

    // A crash this time: the watch still resumes, and the recovery is told once.
    e.d.kill9();
    e.servers[0] = Backend::start(p0).await;
    e.servers[1] = Backend::start(p1).await;
    wait_all_up(&e.h.stats).await;
    e.d.spawn();
    let mut c = e.d.client().await;
    let mails = e.smtp.wait_for(3, Duration::from_secs(10)).await;
    let third = &mails[2];
    assert_eq!(
        subject(third),
        "[stately] edge: app/s1 UP, app/s2 UP, backend app RESOLVED",
        "{third}"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop(&mut c, &id).await;
    assert_eq!(e.smtp.mails().len(), 3, "no alert repeated, none lost");
    let log = job_logs(&mut c, &id).await;
    assert_eq!(
        log.iter().filter(|l| l.contains("carries on")).count(),
        2,
        "{log:#?}"
    );
}

#[tokio::test]
async fn a_haproxy_reload_sends_no_false_alert() {
    // Slow checks, as in production: after a reload a DOWN server shows "UP 1/3" with its
    // first check "INI" for up to a second before it is DOWN again.
    let mut e = edge_checked("check inter 1s fall 3 rise 2").await;
    let mut c = e.d.client().await;
    let port = e.servers[1].port;
    e.servers[1].stop().await;
    wait_stat(&e.h.stats, |rows| {
        rows.iter()
            .any(|r| r.server == "s2" && r.status.raw == "DOWN")
    })
    .await;
    let id = start_watch(&mut c, &["ops@example.test"], 3000).await;
    // A control watch that believes every look at once: it must be fooled by the reload,
    // which shows the transient reached the poller.
    let control = start_watch(&mut c, &["control@example.test"], 0).await;
    let to = |who: &str| {
        let who = who.to_owned();
        move |m: &String| header(m, "To").is_some_and(|t| t.contains(&who))
    };
    let mails = e.smtp.wait_for(2, Duration::from_secs(10)).await;
    assert!(
        mails
            .iter()
            .filter(|m| to("ops@")(m))
            .all(|m| subject(m).contains("app/s2 DOWN")),
        "told at start: {mails:#?}"
    );

    // Reload without a server-state file: s2 comes back "UP 1/3" with its first check
    // pending (INI), then goes DOWN again.
    master(&e.h, "reload");
    let mails = e.smtp.wait_for(3, Duration::from_secs(10)).await;
    let fooled: Vec<_> = mails.iter().filter(|m| to("control@")(m)).collect();
    assert_eq!(
        subject(fooled[1]),
        "[stately] edge: app/s2 UP",
        "the control watch saw the transient: {fooled:#?}"
    );
    // Past the transient (one check interval), and past the hold time.
    e.smtp.wait_for(4, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(3200)).await;
    stop(&mut c, &control).await;

    // The real recovery is still told.
    e.servers[1] = Backend::start(port).await;
    let mails = e.smtp.wait_for(5, Duration::from_secs(10)).await;
    stop(&mut c, &id).await;
    let ops: Vec<String> = mails
        .iter()
        .filter(|m| to("ops@")(m))
        .map(|m| subject(m))
        .collect();
    assert_eq!(
        ops,
        ["[stately] edge: app/s2 DOWN", "[stately] edge: app/s2 UP"],
        "no false alert: {:#?}",
        e.smtp.mails()
    );
}

/// Sends one command to the haproxy master CLI.
fn master(h: &Haproxy, cmd: &str) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(h.dir.join("master.sock")).unwrap();
    s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    let mut b = Vec::new();
    let _ = s.read_to_end(&mut b);
}

#[tokio::test]
async fn a_backend_going_down_is_one_grouped_mail() {
    let dir = tempfile::tempdir().unwrap();
    let mut lead = Backend::start(0).await;
    // Twenty servers that follow one health check (`track`), so they change in one instant.
    let mut cfg = String::from(
        "global\n  stats socket {stats} mode 600 level admin\ndefaults\n  mode http\n  \
         timeout connect 1s\n  timeout client 5s\n  timeout server 5s\nbackend many\n",
    );
    cfg.push_str(&format!(
        "  server lead 127.0.0.1:{} check inter 100ms fall 2 rise 1\n",
        lead.port
    ));
    for i in 0..20 {
        cfg.push_str(&format!(
            "  server m{i} 127.0.0.1:{} track many/lead\n",
            lead.port
        ));
    }
    let h = Haproxy::from_config(dir.path(), &cfg);
    wait_all_up(&h.stats).await;
    let smtp = SmtpSink::start(&dir.path().join("mail"));
    let d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nstats_socket = \"{}\"\n{}",
        h.stats.display(),
        smtp.config()
    ));
    let mut c = d.client().await;
    let id = start_watch(&mut c, &["ops@example.test"], 2000).await;
    lead.stop().await;
    let mails = smtp.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop(&mut c, &id).await;
    let mails_now = smtp.mails();
    assert_eq!(mails_now.len(), 1, "one grouped mail: {mails_now:#?}");
    let m = &mails[0];
    assert_eq!(
        subject(m),
        "[stately] edge: backend many CRITICAL, many/lead DOWN, many/m0 DOWN and 19 more (1 CRITICAL, 21 DOWN in all)",
        "{m}"
    );
    for i in 0..20 {
        assert!(m.contains(&format!("many/m{i} ")), "m{i} listed: {m}");
    }
    assert!(
        m.contains("backend many") && m.contains("no server UP (0 of 21)"),
        "{m}"
    );
}

#[tokio::test]
async fn a_recipient_refused_for_good_is_reported_and_not_retried() {
    let mut e = edge().await;
    let mut c = e.d.client().await;
    let id = start_watch(&mut c, &["reject-me@example.test"], 2000).await;
    let mut events = events(&mut c, &id).await;
    e.servers[0].stop().await;
    let seen = until_log_with(&mut events, "refused for good").await;
    let line = seen
        .iter()
        .rev()
        .find_map(|e| match &e.event {
            Some(pb::job_event::Event::Log(l)) => Some(l.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(line.level, pb::LogLevel::Error as i32);
    assert!(
        line.message.contains("550"),
        "the relay's answer: {}",
        line.message
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop(&mut c, &id).await;
    let log = job_logs(&mut c, &id).await;
    assert!(
        !log.iter().any(|l| l.contains("delivery attempt")),
        "not retried: {log:#?}"
    );
    assert!(e.smtp.mails().is_empty());
}

#[tokio::test]
async fn bad_mail_settings_or_input_refuse_the_watch_and_start_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::start(0).await;
    let h = Haproxy::start(dir.path(), &[("app", vec![("s1", b.port)])]);
    let target = format!(
        "[[haproxy]]\nname = \"edge\"\nstats_socket = \"{}\"\n[[haproxy]]\nname = \"nostats\"\n",
        h.stats.display()
    );
    // Nobody listens on the relay's port.
    let closed = free_port();
    let d = Daemon::start(&format!(
        "{target}[smtp]\nhost = \"127.0.0.1\"\nport = {closed}\ntls = \"none\"\nfrom = \"s@example.test\"\n"
    ));
    let mut c = d.client().await;
    let err = c
        .submit_job(watch_spec(&["ops@example.test"], 1000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(&format!("127.0.0.1:{closed}")) && err.message().contains("refused"),
        "{}",
        err.message()
    );

    // Implicit TLS against a plain relay.
    let smtp = SmtpSink::start(&dir.path().join("mail"));
    let d2 = Daemon::start(&format!(
        "{target}[smtp]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"tls\"\nfrom = \"s@example.test\"\ntimeout = \"2s\"\n",
        smtp.port
    ));
    let mut c2 = d2.client().await;
    let err = c2
        .submit_job(watch_spec(&["ops@example.test"], 1000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("implicit TLS"), "{}", err.message());

    // No [smtp] at all; a password file that is not there.
    let d3 = Daemon::start(&target);
    let mut c3 = d3.client().await;
    let err = c3
        .submit_job(watch_spec(&["ops@example.test"], 1000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("[smtp]"), "{}", err.message());
    let d4 = Daemon::start(&format!(
        "{target}[smtp]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nfrom = \"s@example.test\"\nuser = \"u\"\npassword_file = \"/nonexistent/pw\"\n",
        smtp.port
    ));
    let err = d4
        .client()
        .await
        .submit_job(watch_spec(&["ops@example.test"], 1000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("/nonexistent/pw"),
        "{}",
        err.message()
    );

    // Bad input, with a working relay.
    let d5 = Daemon::start(&format!("{target}{}", smtp.config()));
    let mut c5 = d5.client().await;
    for (req, code, says) in [
        (
            watch_spec(&["not an address"], 1000),
            Code::InvalidArgument,
            "not an address",
        ),
        (watch_spec(&[], 1000), Code::InvalidArgument, "recipient"),
        (
            {
                let mut r = watch_spec(&["ops@example.test"], 1000);
                if let Some(pb::job_spec::Kind::AlertWatch(a)) =
                    r.spec.as_mut().and_then(|s| s.kind.as_mut())
                {
                    a.target = "nope".into();
                }
                r
            },
            Code::NotFound,
            "nope",
        ),
        (
            {
                let mut r = watch_spec(&["ops@example.test"], 1000);
                if let Some(pb::job_spec::Kind::AlertWatch(a)) =
                    r.spec.as_mut().and_then(|s| s.kind.as_mut())
                {
                    a.target = "nostats".into();
                }
                r
            },
            Code::FailedPrecondition,
            "stats_socket",
        ),
        (
            {
                let mut r = watch_spec(&["ops@example.test"], 1000);
                if let Some(pb::job_spec::Kind::AlertWatch(a)) =
                    r.spec.as_mut().and_then(|s| s.kind.as_mut())
                {
                    a.interval_ms = 5;
                }
                r
            },
            Code::InvalidArgument,
            "interval",
        ),
    ] {
        let err = c5.submit_job(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(says), "{}", err.message());
    }
    for client in [&mut c, &mut c2, &mut c3, &mut c5] {
        let jobs = client
            .list_jobs(pb::ListJobsRequest {
                kind: "alert_watch".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .jobs;
        assert!(jobs.is_empty(), "nothing was started: {jobs:?}");
    }
    // The CLI says why, and exits 3.
    let out = d
        .cli()
        .args(["alerts", "start", "edge", "--to", "ops@example.test"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused"));
}

#[tokio::test]
async fn a_mail_goes_through_a_relay_that_requires_starttls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::support::pki::Ca::new("relay CA");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let leaf = ca.server(dir.path(), "relay");
    let smtp = SmtpSink::start_tls(&dir.path().join("mail"), &leaf.cert, &leaf.key);
    let servers = [Backend::start(0).await];
    let h = Haproxy::start_full(
        dir.path(),
        &[("app", vec![("s1", servers[0].port)])],
        false,
        "",
        "default-server check inter 100ms fall 1 rise 1\n",
    );
    let d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nstats_socket = \"{}\"\n\
         [smtp]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"starttls\"\nca_file = \"{}\"\nfrom = \"stately <s@example.test>\"\nretry_max = \"300ms\"\n",
        h.stats.display(),
        smtp.port,
        ca_file.display()
    ));
    wait_all_up(&h.stats).await;
    let mut c = d.client().await;
    let (_, _events) = start_alert_watch(&mut c, 100).await;
    drop(servers);
    let mails = smtp.wait_for(1, Duration::from_secs(10)).await;
    assert!(subject(&mails[0]).contains("DOWN"), "{}", mails[0]);
}
