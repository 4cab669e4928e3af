//! HAProxy targets, live configurations and dry-run validation against a real haproxy binary
//! (and a running master-worker haproxy whose config file is the live one).

use crate::support::*;
use stately::pb;
use tonic::Code;

type HaproxyClient = pb::haproxy_client::HaproxyClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

struct Edge {
    d: Daemon,
    h: Haproxy,
    _backend: Backend,
    _dir: tempfile::TempDir,
}

async fn edge() -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(0).await;
    let h = Haproxy::start(dir.path(), &[("web", vec![("s1", backend.port)])]);
    let d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nconfig = \"{}\"\nstats_socket = \"{}\"\n[[haproxy]]\nname = \"statsonly\"\nstats_socket = \"{}\"\n",
        h.config.display(),
        h.stats.display(),
        h.stats.display()
    ));
    Edge {
        d,
        h,
        _backend: backend,
        _dir: dir,
    }
}

async fn client(d: &Daemon, token: &str) -> HaproxyClient {
    pb::haproxy_client::HaproxyClient::with_interceptor(d.channel().await, bearer(Some(token)))
}

#[tokio::test]
async fn targets_and_the_live_config_with_its_version() {
    let e = edge().await;
    let mut c = client(&e.d, VIEWER).await;
    let targets = c
        .list_targets(pb::ListTargetsRequest {})
        .await
        .unwrap()
        .into_inner()
        .targets;
    let edge = targets.iter().find(|t| t.name == "edge").unwrap();
    assert!(edge.has_config && edge.has_stats);
    assert!(
        !targets
            .iter()
            .find(|t| t.name == "statsonly")
            .unwrap()
            .has_config
    );

    let cfg = c
        .get_config(pb::GetConfigRequest {
            target: "edge".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let on_disk = std::fs::read(&e.h.config).unwrap();
    assert_eq!(cfg.text.as_bytes(), on_disk.as_slice());
    assert_eq!(cfg.version, stately::haproxy::version(&on_disk));
    assert!(cfg.version.starts_with("sha256:") && cfg.version.len() == 7 + 64);
}

#[tokio::test]
async fn a_valid_candidate_is_accepted_and_nothing_changes() {
    let e = edge().await;
    let before = std::fs::read_to_string(&e.h.config).unwrap();
    let candidate = format!(
        "{before}frontend extra\n  bind 127.0.0.1:{}\n  default_backend web\n",
        free_port()
    );
    let mut c = client(&e.d, OPERATOR).await;
    let v = c
        .validate_config(pb::ValidateConfigRequest {
            target: "edge".into(),
            text: candidate.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.valid, "{v:?}");
    assert_eq!(v.version, stately::haproxy::version(candidate.as_bytes()));
    assert_eq!(
        std::fs::read_to_string(&e.h.config).unwrap(),
        before,
        "the live file is untouched"
    );
    assert_eq!(
        std::fs::read_dir(e.h.config.parent().unwrap())
            .unwrap()
            .filter(|f| f
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("stately"))
            .count(),
        0,
        "no candidate left behind"
    );
}

/// `haproxy -c` is run with the HTTP client's CA store off (its load is most of a check's
/// start-up), except for a candidate that configures the HTTP client: its CA file must load.
#[tokio::test]
async fn a_missing_http_client_ca_file_is_still_caught() {
    let e = edge().await;
    let before = std::fs::read_to_string(&e.h.config).unwrap();
    assert!(before.starts_with("global\n"), "{before}");
    let candidate = before.replacen(
        "global\n",
        &format!(
            "global\n  httpclient.ssl.ca-file {}\n",
            e.h.dir.join("missing-ca.pem").display()
        ),
        1,
    );
    let mut c = client(&e.d, OPERATOR).await;
    let v = c
        .validate_config(pb::ValidateConfigRequest {
            target: "edge".into(),
            text: candidate,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid, "{v:?}");
    assert!(
        v.diagnostics.iter().any(|d| d.message.contains("ca-file")),
        "{v:?}"
    );
}

#[tokio::test]
async fn an_invalid_candidate_shows_the_failing_line_and_changes_nothing() {
    let e = edge().await;
    let before = std::fs::read_to_string(&e.h.config).unwrap();
    let mut lines: Vec<&str> = before.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("frontend fe"))
        .unwrap()
        + 1;
    lines.insert(at, "  bogus_keyword on");
    let candidate = lines.join("\n") + "\n";
    let mut c = client(&e.d, OPERATOR).await;
    let v = c
        .validate_config(pb::ValidateConfigRequest {
            target: "edge".into(),
            text: candidate,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
    let alert = v
        .diagnostics
        .iter()
        .find(|d| d.level == pb::diagnostic::Level::Alert as i32)
        .expect("an alert");
    assert_eq!(alert.line, Some(at as u32 + 1), "{alert:?}");
    assert_eq!(alert.source, "  bogus_keyword on");
    assert!(alert.message.contains("bogus_keyword"), "{}", alert.message);
    assert!(
        alert.message.contains(&e.h.config.display().to_string()),
        "names the live file: {}",
        alert.message
    );
    assert_eq!(std::fs::read_to_string(&e.h.config).unwrap(), before);
}

#[tokio::test]
async fn bad_haproxy_requests_get_clear_statuses() {
    let e = edge().await;
    let mut op = client(&e.d, OPERATOR).await;
    let err = op
        .get_config(pb::GetConfigRequest {
            target: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("edge"), "{}", err.message());
    let err = op
        .get_config(pb::GetConfigRequest {
            target: "statsonly".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = op
        .validate_config(pb::ValidateConfigRequest {
            target: "edge".into(),
            text: " ".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut viewer = client(&e.d, VIEWER).await;
    let err = viewer
        .validate_config(pb::ValidateConfigRequest {
            target: "edge".into(),
            text: "global\n".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn the_cli_prints_the_config_and_shows_a_dry_runs_failing_line() {
    let e = edge().await;
    let out =
        e.d.cli()
            .args(["haproxy", "config", "edge"])
            .output()
            .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, std::fs::read(&e.h.config).unwrap());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sha256:"));

    let bad = e.h.dir.join("new.cfg");
    std::fs::write(
        &bad,
        "global\ndefaults\n  mode http\nfrontend x\n  nonsense here\n",
    )
    .unwrap();
    let out =
        e.d.cli()
            .args(["haproxy", "apply", "edge", "--dry-run", "-f"])
            .arg(&bad)
            .output()
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(":5:")
            && text.contains("nonsense here")
            && text.contains("nothing was changed"),
        "{text}"
    );

    let out =
        e.d.cli()
            .args(["haproxy", "apply", "edge", "-f"])
            .arg(&bad)
            .output()
            .unwrap();
    // This target has no master socket, so applying for real is refused up front.
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("master_socket"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_cli_applies_attached_and_shows_each_step() {
    let e = managed().await;
    let live = std::fs::read_to_string(&e.h.config).unwrap();
    let port = free_port();
    let file = e.h.dir.join("next.cfg");
    std::fs::write(&file, with_frontend(&live, "cli", port)).unwrap();
    let out =
        e.d.cli()
            .args(["haproxy", "apply", "edge", "-f"])
            .arg(&file)
            .output()
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps = [
        "check the base version",
        "validate with haproxy -c",
        "swap the configuration",
        "reload",
        "verify",
    ];
    for (i, step) in steps.iter().enumerate() {
        assert!(
            text.contains(&format!("✓ step {}: {step}", i + 1)),
            "{step}: {text}"
        );
    }
    assert!(answers(port, "cli"));
}

/// statelyd managing a real master-worker haproxy: config, master socket and stats socket.
async fn managed() -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(0).await;
    let h = Haproxy::start(dir.path(), &[("web", vec![("s1", backend.port)])]);
    let d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nconfig = \"{}\"\nmaster_socket = \"{}\"\nstats_socket = \"{}\"\n",
        h.config.display(),
        h.dir.join("master.sock").display(),
        h.stats.display()
    ));
    Edge {
        d,
        h,
        _backend: backend,
        _dir: dir,
    }
}

fn apply(config: &str, base_version: &str) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::HaproxyApply(pb::HaproxyApplyJob {
                target: "edge".into(),
                config: config.into(),
                base_version: base_version.into(),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

/// The live config plus a frontend on `port` that answers 200 itself.
fn with_frontend(live: &str, name: &str, port: u16) -> String {
    format!(
        "{live}frontend {name}\n  bind 127.0.0.1:{port}\n  http-request return status 200 content-type text/plain string ok-{name}\n"
    )
}

fn answers(port: u16, name: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains(&format!("ok-{name}"))
}

#[tokio::test]
async fn an_applied_change_is_live_and_a_rollback_takes_it_back() {
    let e = managed().await;
    let live = std::fs::read_to_string(&e.h.config).unwrap();
    let port = free_port();
    let new = with_frontend(&live, "extra", port);
    let mut c = e.d.client().await;
    let job = c
        .submit_job(apply(&new, &stately::haproxy::version(live.as_bytes())))
        .await
        .unwrap()
        .into_inner();
    let job = wait_end(&mut c, &job.id).await;
    assert_eq!(
        state(&job),
        pb::JobState::Succeeded,
        "{job:?}\n{}",
        e.d.log()
    );
    assert_eq!(std::fs::read_to_string(&e.h.config).unwrap(), new);
    assert!(answers(port, "extra"), "the new frontend answers");

    let rb = rollback(&mut c, &job.id, false).await;
    assert_eq!(state(&rb), pb::JobState::Succeeded, "{rb:?}");
    assert_eq!(std::fs::read_to_string(&e.h.config).unwrap(), live);
    assert!(
        !answers(port, "extra"),
        "after the rollback's reload the frontend is gone"
    );
}

#[tokio::test]
async fn an_invalid_change_fails_with_its_line_and_the_old_config_stays_live() {
    let e = managed().await;
    let live = std::fs::read_to_string(&e.h.config).unwrap();
    let bad = format!(
        "{live}frontend broken\n  bind 127.0.0.1:{}\n  no_such_keyword 1\n",
        free_port()
    );
    let mut c = e.d.client().await;
    let job = c.submit_job(apply(&bad, "")).await.unwrap().into_inner();
    let job = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&job), pb::JobState::Failed);
    assert_eq!(job.failed_step, "validate with haproxy -c");
    let line = bad.lines().count();
    assert!(
        job.error.contains(&format!("line {line}")) && job.error.contains("no_such_keyword"),
        "{}",
        job.error
    );
    assert_eq!(std::fs::read_to_string(&e.h.config).unwrap(), live);
}

#[tokio::test]
async fn a_port_clash_that_passes_the_check_fails_the_reload_and_is_unwound() {
    let e = managed().await;
    let live = std::fs::read_to_string(&e.h.config).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let clash = with_frontend(&live, "clash", port);
    let mut c = e.d.client().await;
    let job = c.submit_job(apply(&clash, "")).await.unwrap().into_inner();
    let job = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&job), pb::JobState::Failed, "{job:?}");
    assert_eq!(job.failed_step, "reload", "{job:?}");
    assert_eq!(
        std::fs::read_to_string(&e.h.config).unwrap(),
        live,
        "the old file is back"
    );
    let rows = show_stat(&e.h.stats);
    assert!(
        rows.iter().any(|r| r.proxy == "web") && !rows.iter().any(|r| r.proxy == "clash"),
        "the old config serves"
    );
    assert!(
        job.error.contains(&format!(
            "binds 127.0.0.1:{port}, which another process holds"
        )) && job.error.contains("Address already in use"),
        "HAProxy's reason is surfaced: {}",
        job.error
    );
    drop(taken);
}

#[tokio::test]
async fn an_unwind_that_cannot_reload_stays_incomplete_holds_the_target_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(0).await;
    let h = Haproxy::start(dir.path(), &[("web", vec![("s1", backend.port)])]);
    // The reload works only while the flag file exists: without it, the apply's reload and
    // then its unwind's reload both fail. A signal is fire-and-forget, and a second USR2 that
    // lands while the master re-execs is lost: the command gives the re-exec time.
    let flag = dir.path().join("reload-works");
    let mut d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nconfig = \"{}\"\nreload_command = [\"/bin/sh\", \"-c\", \"test -e {} && kill -USR2 {} && sleep 0.5\"]\nstats_socket = \"{}\"\n",
        h.config.display(),
        flag.display(),
        h.pid(),
        h.stats.display()
    ));
    let live = std::fs::read_to_string(&h.config).unwrap();
    let mut c = d.client().await;
    let first = c
        .submit_job(apply(&with_frontend(&live, "one", free_port()), ""))
        .await
        .unwrap()
        .into_inner();
    let first = wait_end(&mut c, &first.id).await;
    assert_eq!(state(&first), pb::JobState::Failed, "{first:?}");
    assert!(first.unwind_incomplete, "{first:?}");
    assert!(
        first.error.contains("its unwind is incomplete") && first.error.contains("reload"),
        "{}",
        first.error
    );
    assert_eq!(
        std::fs::read_to_string(&h.config).unwrap(),
        live,
        "the file is back"
    );

    // A later job on the target waits: it must not build on a half-restored HAProxy.
    let port = free_port();
    let second = c
        .submit_job(apply(&with_frontend(&live, "two", port), ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.waiting_for, ["haproxy:edge"], "{second:?}");

    // The state survives a crash: still incomplete, still holding the target.
    d.kill9();
    d.spawn();
    let mut c = d.client().await;
    let shown = d.cli().args(["jobs", "show", &first.id]).output().unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("FAILED (unwind incomplete)"), "{text}");
    // The status says so, counted by the daemon over the whole ledger.
    let status = c
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.unwind_incomplete_job_ids,
        std::slice::from_ref(&first.id)
    );
    let out = d.cli().args(["status"]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("job {} could not finish its unwind", first.id)),
        "{said}"
    );
    let waiting = c
        .get_job(pb::GetJobRequest {
            job_id: second.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&waiting), pb::JobState::Pending, "{waiting:?}");

    // HAProxy can be reloaded again: an operator retries the unwind now.
    std::fs::write(&flag, "").unwrap();
    let out = d
        .cli()
        .args(["jobs", "unwind", &first.id])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("its unwind is complete"), "{said}");
    let first = c
        .get_job(pb::GetJobRequest {
            job_id: first.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.unwind_incomplete, "{first:?}");
    assert!(
        first.error.contains("completed on a retry"),
        "{}",
        first.error
    );
    let second = wait_end(&mut c, &second.id).await;
    assert_eq!(state(&second), pb::JobState::Succeeded, "{second:?}");
    assert!(answers(port, "two"));

    // Nothing left to retry now.
    let err = c
        .unwind_job(pb::UnwindJobRequest {
            job_id: first.id.clone(),
            abandon: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn a_stale_base_version_is_refused_and_nothing_is_touched() {
    let e = managed().await;
    let live = std::fs::read_to_string(&e.h.config).unwrap();
    let mut c = e.d.client().await;
    let job = c
        .submit_job(apply(
            &with_frontend(&live, "x", free_port()),
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ))
        .await
        .unwrap()
        .into_inner();
    let job = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&job), pb::JobState::Failed);
    assert_eq!(job.failed_step, "check the base version");
    assert!(
        job.error
            .contains(&stately::haproxy::version(live.as_bytes())),
        "{}",
        job.error
    );
    assert_eq!(std::fs::read_to_string(&e.h.config).unwrap(), live);
}

#[tokio::test]
async fn applies_to_one_target_run_one_after_the_other_and_a_rollback_over_a_later_one_is_refused()
{
    let e = managed().await;
    let live = std::fs::read_to_string(&e.h.config).unwrap();
    let (p1, p2) = (free_port(), free_port());
    let first = with_frontend(&live, "one", p1);
    let second = with_frontend(&first, "two", p2);
    let mut c = e.d.client().await;
    let a = c.submit_job(apply(&first, "")).await.unwrap().into_inner();
    let b = c.submit_job(apply(&second, "")).await.unwrap().into_inner();
    assert_eq!(
        b.waiting_for,
        vec!["haproxy:edge".to_owned()],
        "the second waits for the first"
    );
    let a = wait_end(&mut c, &a.id).await;
    let b = wait_end(&mut c, &b.id).await;
    assert_eq!(
        (state(&a), state(&b)),
        (pb::JobState::Succeeded, pb::JobState::Succeeded),
        "{a:?} {b:?}"
    );
    assert!(answers(p1, "one") && answers(p2, "two"));

    let err = c
        .rollback_job(pb::RollbackJobRequest {
            job_id: a.id.clone(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains(&e.h.config.display().to_string()),
        "{}",
        err.message()
    );
    let rb = rollback(&mut c, &a.id, true).await;
    assert_eq!(state(&rb), pb::JobState::Succeeded, "{rb:?}");
    assert_eq!(std::fs::read_to_string(&e.h.config).unwrap(), live);
}

#[tokio::test]
async fn cancelling_during_verify_restores_the_old_config() {
    let e = managed().await;
    let live = std::fs::read_to_string(&e.h.config).unwrap();
    // Without its stats socket the new worker can never be verified: the job waits in verify.
    let stats_line = live.lines().find(|l| l.contains("stats socket")).unwrap();
    let blind = with_frontend(&live.replace(stats_line, ""), "blind", free_port());
    let mut c = e.d.client().await;
    let job = c.submit_job(apply(&blind, "")).await.unwrap().into_inner();
    let mut s = c
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let ev = s.message().await.unwrap().unwrap();
        if let Some(pb::job_event::Event::StepStarted(st)) = ev.event
            && st.name == "verify"
        {
            break;
        }
    }
    let job = c
        .cancel_job(pb::CancelJobRequest {
            job_id: job.id,
            reason: "wrong file".into(),
            wait: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&job), pb::JobState::Cancelled, "{job:?}");
    assert_eq!(std::fs::read_to_string(&e.h.config).unwrap(), live);
    assert!(
        std::os::unix::net::UnixStream::connect(&e.h.stats).is_ok(),
        "reloaded on the old config: its stats socket is back"
    );
}

fn server_state(target: &str, backend: &str, server: &str, state: &str) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::HaproxyServerState(
                pb::HaproxyServerStateJob {
                    target: target.into(),
                    backend: backend.into(),
                    server: server.into(),
                    state: state.into(),
                },
            )),
        }),
        ..Default::default()
    }
}

fn status_of(stats: &std::path::Path, backend: &str, server: &str) -> String {
    show_stat(stats)
        .into_iter()
        .find(|r| r.proxy == backend && r.server == server)
        .unwrap()
        .status
        .raw
        .to_string()
}

#[tokio::test]
async fn draining_a_server_is_a_job_a_rollback_undoes() {
    let e = managed().await;
    let mut c = e.d.client().await;
    let job = c
        .submit_job(server_state("edge", "web", "s1", "drain"))
        .await
        .unwrap()
        .into_inner();
    let job = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:?}");
    assert_eq!(status_of(&e.h.stats, "web", "s1"), "DRAIN");

    let rb = rollback(&mut c, &job.id, false).await;
    assert_eq!(state(&rb), pb::JobState::Succeeded, "{rb:?}");
    assert_ne!(status_of(&e.h.stats, "web", "s1"), "DRAIN", "back to ready");

    let out =
        e.d.cli()
            .args(["haproxy", "server", "edge", "web/s1", "maint"])
            .output()
            .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(status_of(&e.h.stats, "web", "s1").starts_with("MAINT"));
}

#[tokio::test]
async fn an_unknown_backend_or_server_is_not_found_with_the_names_that_exist() {
    let e = managed().await;
    let mut c = e.d.client().await;
    let err = c
        .submit_job(server_state("edge", "web", "nope", "drain"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("s1"), "{}", err.message());
    let err = c
        .submit_job(server_state("edge", "nobackend", "s1", "drain"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("web"), "{}", err.message());
    let err = c
        .submit_job(server_state("edge", "web", "s1", "sleep"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .submit_job(server_state(
            "edge",
            "web",
            "s1 state maint\nshutdown sessions server web",
            "ready",
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "no second runtime command can ride in a name"
    );
}

#[tokio::test]
async fn a_down_server_stays_down_across_an_applys_reload_with_a_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut backend = Backend::start(0).await;
    let state_file = dir.path().join("server-state");
    let h = Haproxy::start_full(
        dir.path(),
        &[("web", vec![("s1", backend.port)])],
        true,
        &format!("  server-state-file {}\n", state_file.display()),
        // Slow checks, so a server the new worker wrongly assumed UP would show it for ~1 s.
        "  load-server-state-from-file global\n  default-server inter 1s fall 1 rise 1\n",
    );
    let d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nconfig = \"{}\"\nmaster_socket = \"{}\"\nstats_socket = \"{}\"\nserver_state_file = \"{}\"\n",
        h.config.display(),
        h.dir.join("master.sock").display(),
        h.stats.display(),
        state_file.display()
    ));
    backend.stop().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while status_of(&h.stats, "web", "s1") != "DOWN" {
        assert!(std::time::Instant::now() < deadline, "s1 never went DOWN");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let live = std::fs::read_to_string(&h.config).unwrap();
    let mut c = d.client().await;
    let job = c
        .submit_job(apply(&with_frontend(&live, "more", free_port()), ""))
        .await
        .unwrap()
        .into_inner();
    let job = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:?}");
    assert!(
        state_file.exists(),
        "the state was dumped before the reload"
    );
    // (On the machines measured so far haproxy 2.6 kept s1 DOWN across this reload even
    // without the dump, so this sampling guards the behaviour; the file proves the dump.)
    for _ in 0..20 {
        let s = status_of(&h.stats, "web", "s1");
        assert!(s.starts_with("DOWN"), "s1 is {s} right after the reload");
        tokio::time::sleep(std::time::Duration::from_millis(15)).await;
    }
}

#[tokio::test]
async fn a_target_without_a_master_socket_reloads_with_its_reload_command() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(0).await;
    let h = Haproxy::start(dir.path(), &[("web", vec![("s1", backend.port)])]);
    let d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nconfig = \"{}\"\nreload_command = [\"/bin/kill\", \"-USR2\", \"{}\"]\nstats_socket = \"{}\"\n",
        h.config.display(),
        h.pid(),
        h.stats.display()
    ));
    let live = std::fs::read_to_string(&h.config).unwrap();
    let port = free_port();
    let mut c = d.client().await;
    let job = c
        .submit_job(apply(&with_frontend(&live, "signalled", port), ""))
        .await
        .unwrap()
        .into_inner();
    let job = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:?}");
    assert!(answers(port, "signalled"));
}

#[tokio::test]
async fn rolling_back_the_rollback_of_an_apply_brings_the_change_back_live() {
    let e = managed().await;
    let live = std::fs::read_to_string(&e.h.config).unwrap();
    let port = free_port();
    let new = with_frontend(&live, "again", port);
    let mut c = e.d.client().await;
    let job = c.submit_job(apply(&new, "")).await.unwrap().into_inner();
    wait_end(&mut c, &job.id).await;
    let rb = c
        .rollback_job(pb::RollbackJobRequest {
            job_id: job.id,
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    wait_end(&mut c, &rb.id).await;
    assert!(!answers(port, "again"));
    let rb2 = rollback(&mut c, &rb.id, false).await;
    assert_eq!(state(&rb2), pb::JobState::Succeeded, "{rb2:?}");
    assert_eq!(std::fs::read_to_string(&e.h.config).unwrap(), new);
    assert!(
        answers(port, "again"),
        "the file came back before the reload, so the change is live"
    );
}

#[tokio::test]
async fn the_cli_lists_targets_under_a_header() {
    let e = edge().await;
    let out = e.d.cli().args(["haproxy", "targets"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("TARGET") && lines[0].contains("CONFIG"),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["edge", "yes", "yes"]),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["statsonly", "-", "yes"]),
        "{text}"
    );
}
