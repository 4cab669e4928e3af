//! The shipped example runbooks, run as written against stand-in scripts playing `lswsctrl`,
//! `lshttpd` and `openlitespeed`, and a loopback HTTP server playing the key server.
//! (LiteSpeed is not packaged here; the examples' /usr/local/lsws becomes a temp directory.)

use crate::support::*;
use stately::pb;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// A fake LiteSpeed install: lswsctrl records its calls and the server state; `lshttpd -t`
/// and `openlitespeed -t` pass only when the key / config says VALID.
fn fake_lsws(root: &Path) {
    for d in ["bin", "conf"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let script = |name: &str, body: &str| {
        let p = root.join("bin").join(name);
        std::fs::write(
            &p,
            format!("#!/bin/sh\nD=\"$(dirname \"$0\")/..\"\n{body}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    script(
        "lswsctrl",
        r#"echo "$1" >> "$D/calls.log"
case "$1" in
  stop) echo stopped > "$D/state" ;;
  start) echo running > "$D/state" ;;
  restart) echo running > "$D/state" ;;
  *) echo "usage: lswsctrl start|stop|restart" >&2; exit 2 ;;
esac"#,
    );
    script(
        "lshttpd",
        r#"[ "$1" = "-t" ] || exit 2
grep -q VALID "$D/conf/trial.key" || { echo "[ERROR] License key is invalid or expired" >&2; exit 1; }
echo "[OK] configuration and license are valid""#,
    );
    script(
        "openlitespeed",
        r#"[ "$1" = "-t" ] || exit 2
grep -q VALID "$D/conf/httpd_config.conf" || { echo "[ERROR] httpd_config.conf: syntax error" >&2; exit 1; }"#,
    );
    std::fs::write(root.join("conf/trial.key"), "OLD-VALID-KEY\n").unwrap();
    std::fs::set_permissions(
        root.join("conf/trial.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(root.join("state"), "running\n").unwrap();
}

/// Starts statelyd with an example runbook, its paths moved under the test's directory.
fn daemon_with_example(example: &str) -> (Daemon, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap().keep();
    let lsws = dir.join("lsws");
    fake_lsws(&lsws);
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(example),
    )
    .unwrap();
    let moved = dir.join(example);
    std::fs::write(
        &moved,
        text.replace("/usr/local/lsws", &lsws.display().to_string()),
    )
    .unwrap();
    let d = Daemon::start(&format!("include = [\"{}\"]\n", moved.display()));
    (d, lsws)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

#[tokio::test]
async fn litespeed_trial_key_renewal_installs_the_new_key() {
    let (d, lsws) = daemon_with_example("litespeed-trial-key.toml");
    let url = http_server(b"NEW-VALID-KEY-2027\n").await;
    let mut c = d.client().await;
    let key_url = format!("{url}/trial.key");
    let job = c
        .submit_job(runbook(
            "litespeed-trial-key",
            &[("key_url", &key_url), ("group", "nogroup")],
        ))
        .await
        .unwrap()
        .into_inner();
    let job = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:?}\n{}", d.log());
    assert_eq!(read(&lsws.join("conf/trial.key")), "NEW-VALID-KEY-2027\n");
    let meta = std::fs::metadata(lsws.join("conf/trial.key")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (
            0,
            nix::unistd::Group::from_name("nogroup")
                .unwrap()
                .unwrap()
                .gid
                .as_raw()
        )
    );
    assert_eq!(read(&lsws.join("calls.log")), "stop\nstart\n");
    assert_eq!(read(&lsws.join("state")), "running\n");

    let rb = rollback(&mut c, &job.id, false).await;
    assert_eq!(state(&rb), pb::JobState::Succeeded, "{rb:?}");
    assert_eq!(
        read(&lsws.join("conf/trial.key")),
        "OLD-VALID-KEY\n",
        "rollback puts the old key back"
    );
    assert_eq!(
        std::fs::metadata(lsws.join("conf/trial.key"))
            .unwrap()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        read(&lsws.join("state")),
        "running\n",
        "and leaves lsws running"
    );
}

#[tokio::test]
async fn litespeed_trial_key_rejected_by_lshttpd_is_unwound() {
    let (d, lsws) = daemon_with_example("litespeed-trial-key.toml");
    let url = http_server(b"EXPIRED\n").await;
    let mut c = d.client().await;
    let job = c
        .submit_job(runbook(
            "litespeed-trial-key",
            &[("key_url", &url), ("group", "nogroup")],
        ))
        .await
        .unwrap()
        .into_inner();
    let job = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&job), pb::JobState::Failed);
    assert_eq!(job.failed_step, "test the configuration (lshttpd -t)");
    assert!(
        job.error.contains("License key is invalid"),
        "{}",
        job.error
    );
    assert_eq!(
        read(&lsws.join("conf/trial.key")),
        "OLD-VALID-KEY\n",
        "the old key is back"
    );
    let meta = std::fs::metadata(lsws.join("conf/trial.key")).unwrap();
    assert_eq!(
        (meta.mode() & 0o777, meta.gid()),
        (0o600, 0),
        "with its mode and group"
    );
    assert_eq!(
        read(&lsws.join("calls.log")),
        "stop\nstart\nstop\nstart\n",
        "started, then stopped and started by the unwind"
    );
    assert_eq!(read(&lsws.join("state")), "running\n");
}

#[tokio::test]
async fn openlitespeed_restart_runs_only_after_the_config_test_passes() {
    let (d, lsws) = daemon_with_example("openlitespeed-restart.toml");
    let mut c = d.client().await;
    std::fs::write(lsws.join("conf/httpd_config.conf"), "broken\n").unwrap();
    let bad = c
        .submit_job(runbook("openlitespeed-graceful-restart", &[]))
        .await
        .unwrap()
        .into_inner();
    let bad = wait_end(&mut c, &bad.id).await;
    assert_eq!(state(&bad), pb::JobState::Failed);
    assert!(bad.error.contains("syntax error"), "{}", bad.error);
    assert!(
        !lsws.join("calls.log").exists(),
        "no restart after a failed test"
    );

    std::fs::write(lsws.join("conf/httpd_config.conf"), "VALID\n").unwrap();
    let good = c
        .submit_job(runbook("openlitespeed-graceful-restart", &[]))
        .await
        .unwrap()
        .into_inner();
    let good = wait_end(&mut c, &good.id).await;
    assert_eq!(state(&good), pb::JobState::Succeeded, "{good:?}");
    assert_eq!(read(&lsws.join("calls.log")), "restart\n");
}
