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
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dry-run"));
}
