//! Certificates against a real ACME server (Debian's Pebble, with pebble-challtestsrv as its
//! DNS) and, for deploys, a real haproxy: issue by webroot and by statelyd's responder, verify
//! what was installed, re-issue into the same lineage, cancel during validation and during the
//! install, roll back, kill -9 mid-install, hot-swap into HAProxy.

use crate::support::pebble::{Pebble, served_cert, verify_chain};
use crate::support::*;
use stately::pb;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::Code;

struct Acme {
    p: Pebble,
    d: Daemon,
    dir: tempfile::TempDir,
}

impl Acme {
    fn root(&self) -> PathBuf {
        self.dir.path().join("le")
    }
    fn webroot(&self) -> PathBuf {
        self.dir.path().join("www")
    }
    fn bundles(&self) -> PathBuf {
        self.dir.path().join("haproxy-certs")
    }
    fn live(&self, lineage: &str, file: &str) -> PathBuf {
        self.root()
            .join("live")
            .join(lineage)
            .join(format!("{file}.pem"))
    }
    fn read(&self, lineage: &str, file: &str) -> String {
        std::fs::read_to_string(self.live(lineage, file)).unwrap()
    }
    fn link(&self, lineage: &str, file: &str) -> String {
        std::fs::read_link(self.live(lineage, file))
            .unwrap()
            .display()
            .to_string()
    }
    fn bundle(&self, lineage: &str) -> String {
        std::fs::read_to_string(self.bundles().join(format!("{lineage}.pem"))).unwrap()
    }
}

/// Pebble validating HTTP-01 on a fresh port, and statelyd whose responder listens there.
fn with_responder(extra: &str, daemon_env: &[(&str, &str)]) -> Acme {
    let port = free_port();
    let p = Pebble::start(port);
    setup(
        p,
        &format!("responder = \"127.0.0.1:{port}\"\nchallenge_probe = \"127.0.0.1:{port}\"\n"),
        extra,
        daemon_env,
    )
}

fn setup(p: Pebble, certificates: &str, extra: &str, daemon_env: &[(&str, &str)]) -> Acme {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("www")).unwrap();
    let config = format!(
        "{extra}[certificates]\nroot = \"{}\"\nhaproxy_dir = \"{}\"\ndefault_acme = \"pebble\"\nwebroots = [\"{}\"]\nrenew_check = \"0s\"\n{certificates}{}",
        dir.path().join("le").display(),
        dir.path().join("haproxy-certs").display(),
        dir.path().join("www").display(),
        p.config()
    );
    let d = if daemon_env.is_empty() {
        Daemon::start(&config)
    } else {
        Daemon::start_env(&config, daemon_env)
    };
    Acme { p, d, dir }
}

fn issue(names: &[&str]) -> pb::SubmitJobRequest {
    issue_with(names, |_| {})
}

fn issue_with(
    names: &[&str],
    f: impl FnOnce(&mut pb::CertificateIssueJob),
) -> pb::SubmitJobRequest {
    let mut c = pb::CertificateIssueJob {
        names: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    f(&mut c);
    pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::CertificateIssue(c)),
        }),
        ..Default::default()
    }
}

async fn run(c: &mut Client, req: pb::SubmitJobRequest) -> pb::Job {
    let job = c.submit_job(req).await.unwrap().into_inner();
    wait_end(c, &job.id).await
}

async fn run_ok(c: &mut Client, req: pb::SubmitJobRequest) -> pb::Job {
    let job = run(c, req).await;
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:#?}");
    job
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn serial_of(pem: &str) -> String {
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec())
        .unwrap();
    serial_of_der(&der)
}

fn serial_of_der(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    hex::encode(cert.raw_serial())
}

/// Checks a live lineage: chain to Pebble's root for every name, SANs, key matches, modes,
/// relative links to version `n`, the bundle = fullchain + key (0600).
async fn check_installed(a: &Acme, lineage: &str, names: &[&str], n: u32) {
    check_installed_mode(a, lineage, names, n, 0o600).await
}

/// As `check_installed`, with the private key's and the bundle's mode.
async fn check_installed_mode(a: &Acme, lineage: &str, names: &[&str], n: u32, key_mode: u32) {
    let fullchain = a.read(lineage, "fullchain");
    let root = a.p.root().await;
    for name in names {
        verify_chain(&fullchain, &root, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let cert = a.read(lineage, "cert");
    let der: rustls_pki_types::CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::from_pem_slice(cert.as_bytes()).unwrap();
    let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
    let mut sans: Vec<String> = x
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|g| {
            g.to_string()
                .trim_start_matches("DNSName(")
                .trim_end_matches(')')
                .to_owned()
        })
        .collect();
    sans.sort();
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(sans, want);
    let key = rcgen::KeyPair::from_pem(&a.read(lineage, "privkey")).unwrap();
    assert_eq!(
        key.public_key_raw(),
        x.public_key().subject_public_key.data.as_ref(),
        "the private key matches the certificate"
    );
    assert_eq!(fullchain, format!("{cert}{}", a.read(lineage, "chain")));
    for f in ["cert", "chain", "fullchain", "privkey"] {
        assert_eq!(
            a.link(lineage, f),
            format!("../../archive/{lineage}/{f}{n}.pem"),
            "live/{f}.pem is a relative link to version {n}"
        );
    }
    assert_eq!(mode(&a.live(lineage, "privkey")), key_mode);
    let bundle = a.bundles().join(format!("{lineage}.pem"));
    assert_eq!(mode(&bundle), key_mode);
    assert_eq!(
        a.bundle(lineage),
        format!("{fullchain}{}", a.read(lineage, "privkey"))
    );
}

fn siblings(a: &Acme) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(a.root().join("live"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn the_cli_issues_a_two_name_certificate_through_the_responder() {
    let a = with_responder("", &[]);
    let out =
        a.d.cli()
            .args(["cert", "issue", "example.test", "www.example.test"])
            .output()
            .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    for step in [
        "account",
        "order",
        "provision challenges",
        "validate",
        "finalize",
        "download chain",
        "install",
    ] {
        assert!(said.contains(step), "a line for {step}: {said}");
    }
    check_installed(&a, "example.test", &["example.test", "www.example.test"], 1).await;

    // Listed, shown, and through the API.
    let out = a.d.cli().args(["cert", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("example.test") && listed.contains("www.example.test"),
        "{listed}"
    );
    let out =
        a.d.cli()
            .args(["-o", "json", "cert", "show", "example.test"])
            .output()
            .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["version"], 1);
    assert_eq!(shown["key_type"], "ec256");
    // How it was issued: by the responder, through the configured ACME server, by which job
    // (renew_check = "0s" here, so no automatic renewal date).
    assert_eq!(shown["method"], "responder", "{shown}");
    assert!(
        shown["issued_by_job"]
            .as_str()
            .is_some_and(|j| j.len() == 36),
        "{shown}"
    );
    assert!(shown["next_renewal"].is_null(), "{shown}");
    let text =
        a.d.cli()
            .args(["cert", "show", "example.test"])
            .output()
            .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("issued      by responder through pebble (job "),
        "{text}"
    );
    assert!(shown["days_left"].as_i64().unwrap() > 30, "{shown}");
    assert_eq!(
        shown["serial"].as_str().unwrap().to_lowercase(),
        serial_of(&a.read("example.test", "cert")).trim_start_matches("00")
    );
    let out =
        a.d.cli()
            .args(["cert", "show", "nope.test"])
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(3));
    // The account key was stored 0600 and is reused next time.
    let acme_dir = a.d.data().join("acme");
    let account = std::fs::read_dir(&acme_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("account.json");
    assert_eq!(mode(&account), 0o600);
}

#[tokio::test]
async fn a_webroot_issue_removes_its_token_files_and_a_reissue_updates_the_same_lineage() {
    let port = free_port();
    let p = Pebble::start(port);
    let a = setup(p, "", "", &[]);
    let _web = Webroot::start(port, &a.webroot(), &[], Duration::ZERO).await;
    let mut c = a.d.client().await;
    let wr = a.webroot().display().to_string();
    let req = || {
        issue_with(&["example.test", "www.example.test"], |j| {
            j.webroot = wr.clone()
        })
    };
    let first = run_ok(&mut c, req()).await;
    check_installed(&a, "example.test", &["example.test", "www.example.test"], 1).await;
    let tokens = a.webroot().join(".well-known/acme-challenge");
    assert_eq!(
        std::fs::read_dir(&tokens).unwrap().count(),
        0,
        "token files removed"
    );
    let serial1 = serial_of(&a.read("example.test", "cert"));

    let second = run_ok(&mut c, req()).await;
    check_installed(&a, "example.test", &["example.test", "www.example.test"], 2).await;
    assert_ne!(serial_of(&a.read("example.test", "cert")), serial1);
    assert_eq!(siblings(&a), ["example.test"], "no -0001 sibling");
    let archive = a.root().join("archive/example.test");
    for f in ["cert1.pem", "cert2.pem", "privkey1.pem", "privkey2.pem"] {
        assert!(archive.join(f).exists(), "{f} kept");
    }
    assert_ne!(first.id, second.id);

    // Changing the names is explicit.
    let err = c
        .submit_job(issue_with(
            &["example.test", "www.example.test", "api.example.test"],
            |j| j.webroot = wr.clone(),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("expand"), "{}", err.message());
    // An operator let a group read the key and the bundle: renewals keep that.
    for p in [
        a.live("example.test", "privkey"),
        a.bundles().join("example.test.pem"),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    }
    let third = run_ok(
        &mut c,
        issue_with(
            &["example.test", "www.example.test", "api.example.test"],
            |j| {
                j.webroot = wr.clone();
                j.expand = true;
                j.key_type = "rsa2048".into();
            },
        ),
    )
    .await;
    let out =
        a.d.cli()
            .args(["-o", "json", "cert", "show", "example.test"])
            .output()
            .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["key_type"], "rsa2048", "{shown}");
    assert_eq!(shown["versions"], serde_json::json!([1, 2, 3]));
    assert_eq!(shown["method"], format!("webroot {wr}"), "{shown}");
    assert_eq!(
        shown["issued_by_job"],
        third.id.as_str(),
        "the newest issue"
    );
    check_installed_mode(
        &a,
        "example.test",
        &["example.test", "www.example.test", "api.example.test"],
        3,
        0o640,
    )
    .await;
}

#[tokio::test]
async fn a_cancel_during_validation_leaves_no_token_and_no_change() {
    let port = free_port();
    let p = Pebble::start(port);
    let a = setup(p, "", "", &[]);
    let mut c = a.d.client().await;
    let wr = a.webroot().display().to_string();
    let mut web = Webroot::start(port, &a.webroot(), &[], Duration::ZERO).await;
    run_ok(
        &mut c,
        issue_with(&["example.test"], |j| j.webroot = wr.clone()),
    )
    .await;
    web.stop().await;
    let before = (a.link("example.test", "cert"), a.bundle("example.test"));
    // Now the web server takes its time: validation hangs until we cancel.
    let _slow = Webroot::start(port, &a.webroot(), &[], Duration::from_secs(30)).await;
    let job = c
        .submit_job(issue_with(&["example.test"], |j| j.webroot = wr.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut s = events(&mut c, &job.id).await;
    until_log_with(&mut s, "waiting for the CA to validate").await;
    let tokens = a.webroot().join(".well-known/acme-challenge");
    assert_eq!(
        std::fs::read_dir(&tokens).unwrap().count(),
        1,
        "the token is served meanwhile"
    );
    let t0 = std::time::Instant::now();
    let done = cancel_wait(&mut c, &job.id).await;
    assert_eq!(state(&done), pb::JobState::Cancelled);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the wait for validation is cancellable"
    );
    assert_eq!(
        std::fs::read_dir(&tokens).unwrap().count(),
        0,
        "no token file left"
    );
    assert_eq!(
        (a.link("example.test", "cert"), a.bundle("example.test")),
        before
    );
    assert_eq!(
        std::fs::read_dir(a.root().join("archive/example.test"))
            .unwrap()
            .count(),
        4,
        "nothing added to the archive"
    );
}

#[tokio::test]
async fn a_cancel_during_install_restores_the_previous_version() {
    let mut a = with_responder("", &[]);
    let mut c = a.d.client().await;
    run_ok(&mut c, issue(&["example.test", "www.example.test"])).await;
    let v1 = (a.read("example.test", "cert"), a.bundle("example.test"));
    // Again, with the install pausing halfway through the live links.
    a.d.terminate();
    a.d.set_env("STATELY_TEST_INSTALL_PAUSE_MS", "20000");
    a.d.spawn();
    let mut c = a.d.client().await;
    let job = c
        .submit_job(issue(&["example.test", "www.example.test"]))
        .await
        .unwrap()
        .into_inner();
    let mut s = events(&mut c, &job.id).await;
    until_log_with(&mut s, "test hook").await;
    assert_eq!(
        a.link("example.test", "chain"),
        "../../archive/example.test/chain2.pem",
        "mid-switch"
    );
    let done = cancel_wait(&mut c, &job.id).await;
    assert_eq!(state(&done), pb::JobState::Cancelled);
    assert_eq!(
        (a.read("example.test", "cert"), a.bundle("example.test")),
        v1
    );
    check_installed(&a, "example.test", &["example.test", "www.example.test"], 1).await;
    assert!(
        !a.root().join("archive/example.test/cert2.pem").exists(),
        "version 2 removed"
    );

    // A first issuance cancelled there leaves no lineage at all, not even its directories.
    let job = c
        .submit_job(issue(&["new.example.test"]))
        .await
        .unwrap()
        .into_inner();
    let mut s = events(&mut c, &job.id).await;
    until_log_with(&mut s, "test hook").await;
    assert!(a.live("new.example.test", "cert").exists());
    let done = cancel_wait(&mut c, &job.id).await;
    assert_eq!(state(&done), pb::JobState::Cancelled);
    assert!(!a.root().join("live/new.example.test").exists());
    assert!(!a.root().join("archive/new.example.test").exists());
    assert!(!a.bundles().join("new.example.test.pem").exists());
}

#[tokio::test]
async fn rollback_after_a_renewal_restores_the_previous_certificate_and_refuses_over_a_later_one() {
    let a = with_responder("", &[]);
    let mut c = a.d.client().await;
    run_ok(&mut c, issue(&["example.test"])).await;
    let v1 = (a.read("example.test", "cert"), a.bundle("example.test"));
    let renewal = run_ok(&mut c, issue(&["example.test"])).await;
    assert_ne!(a.read("example.test", "cert"), v1.0);

    let rb = rollback(&mut c, &renewal.id, false).await;
    assert_eq!(state(&rb), pb::JobState::Succeeded, "{rb:#?}");
    assert_eq!(
        (a.read("example.test", "cert"), a.bundle("example.test")),
        v1
    );
    assert_eq!(
        a.link("example.test", "fullchain"),
        "../../archive/example.test/fullchain1.pem"
    );
    check_installed(&a, "example.test", &["example.test"], 1).await;

    // Two more renewals: rolling back the first of them would undo the second.
    let r2 = run_ok(&mut c, issue(&["example.test"])).await;
    run_ok(&mut c, issue(&["example.test"])).await;
    let err = c
        .rollback_job(pb::RollbackJobRequest {
            job_id: r2.id.clone(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("live/example.test"),
        "{}",
        err.message()
    );
    let forced = rollback(&mut c, &r2.id, true).await;
    assert_eq!(state(&forced), pb::JobState::Succeeded);
    assert_eq!(
        (a.read("example.test", "cert"), a.bundle("example.test")),
        v1
    );
}

#[tokio::test]
async fn a_name_pebble_cannot_validate_fails_with_its_detail_and_changes_nothing() {
    let port = free_port();
    let p = Pebble::start(port);
    let a = setup(p, "", "", &[]);
    let _web = Webroot::start(port, &a.webroot(), &["bad.example.test"], Duration::ZERO).await;
    let mut c = a.d.client().await;
    let wr = a.webroot().display().to_string();
    let job = run(
        &mut c,
        issue_with(&["good.example.test", "bad.example.test"], |j| {
            j.webroot = wr.clone()
        }),
    )
    .await;
    assert_eq!(state(&job), pb::JobState::Failed);
    assert_eq!(job.failed_step, "validate");
    assert!(
        job.error.contains("bad.example.test")
            && job.error.contains("the CA said:")
            && job.error.contains("404"),
        "the CA's detail and the name: {}",
        job.error
    );
    assert!(!job.error.contains("good.example.test:"), "{}", job.error);
    assert!(!a.root().join("live/good.example.test").exists());
    assert!(
        !a.webroot().join(".well-known").exists(),
        "the challenge directories it created are removed"
    );
}

#[tokio::test]
async fn a_webroot_that_links_outside_the_allowed_ones_creates_nothing_there() {
    let port = free_port();
    let p = Pebble::start(port);
    let a = setup(p, "", "", &[]);
    let outside = a.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, a.webroot().join("site")).unwrap();
    let mut c = a.d.client().await;
    let wr = a.webroot().join("site").display().to_string();
    let job = run(
        &mut c,
        issue_with(&["example.test"], |j| j.webroot = wr.clone()),
    )
    .await;
    assert_eq!(state(&job), pb::JobState::Failed, "{job:?}");
    assert!(
        job.error.contains("outside the allowed webroots"),
        "{}",
        job.error
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "no directory was created outside the webroots"
    );
    assert!(!a.root().join("live/example.test").exists());
}

#[tokio::test]
async fn kill_9_during_install_leaves_the_lineage_all_old_after_the_restart() {
    let a = with_responder("", &[]);
    let mut c = a.d.client().await;
    run_ok(&mut c, issue(&["example.test"])).await;
    let v1 = (a.read("example.test", "cert"), a.bundle("example.test"));
    // Restart with the install pausing halfway, and kill it there.
    let mut a = a;
    a.d.kill9();
    a.d.set_env("STATELY_TEST_INSTALL_PAUSE_MS", "20000");
    a.d.spawn();
    let mut c = a.d.client().await;
    let job = c
        .submit_job(issue(&["example.test"]))
        .await
        .unwrap()
        .into_inner();
    let mut s = events(&mut c, &job.id).await;
    until_log_with(&mut s, "test hook").await;
    assert_eq!(
        a.link("example.test", "cert"),
        "../../archive/example.test/cert2.pem",
        "mid-switch"
    );
    assert_eq!(
        a.link("example.test", "fullchain"),
        "../../archive/example.test/fullchain1.pem"
    );
    a.d.kill9();
    a.d.set_env("STATELY_TEST_INSTALL_PAUSE_MS", "");
    a.d.spawn();
    let mut c = a.d.client().await;
    let ended = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&ended), pb::JobState::Failed);
    assert!(
        ended.error.contains("interrupted by restart"),
        "{}",
        ended.error
    );
    assert_eq!(
        (a.read("example.test", "cert"), a.bundle("example.test")),
        v1
    );
    check_installed(&a, "example.test", &["example.test"], 1).await;
}

#[tokio::test]
async fn deploy_hot_swaps_the_certificate_haproxy_serves_and_rollback_puts_the_old_one_back() {
    let port = free_port();
    let p = Pebble::start(port);
    let hdir = tempfile::tempdir().unwrap();
    let tls_port = free_port();
    let a = {
        // The target is configured before haproxy runs: it is only used by the deploy.
        let stats = hdir.path().join("admin.sock");
        setup(
            p,
            &format!("responder = \"127.0.0.1:{port}\"\nchallenge_probe = \"127.0.0.1:{port}\"\n"),
            &format!(
                "[[haproxy]]\nname = \"edge\"\nstats_socket = \"{}\"\nmaster_socket = \"{}\"\n\
                 [[haproxy]]\nname = \"edge-reload\"\nmaster_socket = \"{}\"\n",
                stats.display(),
                hdir.path().join("master.sock").display(),
                hdir.path().join("master.sock").display()
            ),
            &[],
        )
    };
    let mut c = a.d.client().await;
    run_ok(&mut c, issue(&["example.test", "www.example.test"])).await;
    let bundle = a.bundles().join("example.test.pem");
    let _h = Haproxy::from_config(
        hdir.path(),
        &format!(
            "global\n  stats socket {{stats}} mode 600 level admin expose-fd listeners\ndefaults\n  mode http\n  \
             timeout connect 1s\n  timeout client 5s\n  timeout server 5s\nfrontend tls\n  bind 127.0.0.1:{tls_port} ssl crt {}\n  \
             http-request return status 200\n",
            bundle.display()
        ),
    );
    let v1 = serial_of(&a.read("example.test", "cert"));
    assert_eq!(
        serial_of_der(&served_cert(tls_port, "www.example.test").await),
        v1
    );

    let job = run_ok(
        &mut c,
        issue_with(&["example.test", "www.example.test"], |j| {
            j.deploy = vec!["edge".into()]
        }),
    )
    .await;
    assert_eq!(job.steps.last().unwrap().name, "deploy");
    let v2 = serial_of(&a.read("example.test", "cert"));
    assert_ne!(v1, v2);
    assert_eq!(
        serial_of_der(&served_cert(tls_port, "www.example.test").await),
        v2,
        "HAProxy serves the new certificate"
    );
    let log = crate::support::job_logs(&mut c, &job.id).await;
    assert!(
        log.iter().any(|l| l.contains("no reload")),
        "hot-swapped: {log:#?}"
    );

    let rb = rollback(&mut c, &job.id, false).await;
    assert_eq!(state(&rb), pb::JobState::Succeeded, "{rb:#?}");
    assert_eq!(
        serial_of_der(&served_cert(tls_port, "www.example.test").await),
        v1,
        "and the old one after the rollback"
    );

    // A target known only by its master socket is reloaded instead.
    let job = run_ok(
        &mut c,
        issue_with(&["example.test", "www.example.test"], |j| {
            j.deploy = vec!["edge-reload".into()]
        }),
    )
    .await;
    let v3 = serial_of(&a.read("example.test", "cert"));
    let log = crate::support::job_logs(&mut c, &job.id).await;
    assert!(log.iter().any(|l| l.contains("reloaded")), "{log:#?}");
    assert_eq!(
        serial_of_der(&served_cert(tls_port, "example.test").await),
        v3
    );
    let rb = rollback(&mut c, &job.id, false).await;
    assert_eq!(state(&rb), pb::JobState::Succeeded, "{rb:#?}");
    assert_eq!(
        serial_of_der(&served_cert(tls_port, "example.test").await),
        v1
    );
}

#[tokio::test]
async fn bad_names_and_settings_are_refused_before_anything_starts() {
    let a = with_responder("", &[]);
    let mut c = a.d.client().await;
    let wr = a.webroot().display().to_string();
    for (req, code, says) in [
        (
            issue(&["exa mple.test"]),
            Code::InvalidArgument,
            "'exa mple.test'",
        ),
        (issue(&["10.0.0.1"]), Code::InvalidArgument, "IP address"),
        (
            issue(&["*.example.test"]),
            Code::InvalidArgument,
            "wildcard",
        ),
        (
            issue(&["a.example.test", "a.example.test"]),
            Code::InvalidArgument,
            "twice",
        ),
        (issue(&[]), Code::InvalidArgument, "at least one"),
        (
            issue_with(&["a.example.test"], |j| j.lineage = "../x".into()),
            Code::InvalidArgument,
            "'../x'",
        ),
        (
            issue_with(&["a.example.test"], |j| j.lineage = "/".into()),
            Code::InvalidArgument,
            "not a safe file name",
        ),
        (
            issue_with(&["a.example.test"], |j| j.key_type = "dsa".into()),
            Code::InvalidArgument,
            "dsa",
        ),
        (
            issue_with(&["a.example.test"], |j| j.webroot = "/etc".into()),
            Code::PermissionDenied,
            "webroots",
        ),
        (
            issue_with(&["a.example.test"], |j| j.webroot = format!("{wr}/../..")),
            Code::InvalidArgument,
            "..",
        ),
        (
            issue_with(&["a.example.test"], |j| j.deploy = vec!["nope".into()]),
            Code::NotFound,
            "nope",
        ),
        (
            issue_with(&["a.example.test"], |j| {
                j.deploy = vec!["edge".into(), "edge".into()]
            }),
            Code::InvalidArgument,
            "twice",
        ),
        (
            issue_with(&["a.example.test"], |j| j.acme = "nope".into()),
            Code::NotFound,
            "nope",
        ),
    ] {
        let err = c.submit_job(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(says), "{}", err.message());
    }
    let many: Vec<String> = (0..101).map(|i| format!("n{i}.example.test")).collect();
    let names: Vec<&str> = many.iter().map(String::as_str).collect();
    let err = c.submit_job(issue(&names)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most 100"));
    assert!(
        !a.root().exists()
            || std::fs::read_dir(a.root().join("live"))
                .map(|d| d.count())
                .unwrap_or(0)
                == 0
    );
    let jobs = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(jobs.is_empty(), "nothing was started");
}

#[tokio::test]
async fn a_name_the_ca_refuses_ends_the_job_with_its_problem() {
    let port = free_port();
    let p = Pebble::start_full(port, true, &["blocked.test"]);
    let a = setup(
        p,
        &format!("responder = \"127.0.0.1:{port}\"\nchallenge_probe = \"127.0.0.1:{port}\"\n"),
        "",
        &[],
    );
    let mut c = a.d.client().await;
    let job = run(&mut c, issue(&["ok.example.test", "www.blocked.test"])).await;
    assert_eq!(state(&job), pb::JobState::Failed);
    assert_eq!(job.failed_step, "order");
    assert!(
        job.error.contains("the CA said:")
            && job.error.contains("rejectedIdentifier")
            && job.error.contains("blocked.test"),
        "{}",
        job.error
    );
    assert!(!a.root().join("live/ok.example.test").exists());
}

#[tokio::test]
async fn external_account_binding_comes_from_the_config() {
    let port = free_port();
    // The HMAC key as a CA hands it out: base64url text.
    let key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let p = Pebble::start_config(
        port,
        true,
        serde_json::json!({
            "externalAccountBindingRequired": true,
            "externalAccountMACKeys": { "kid-1": key },
        }),
    );
    let dir = tempfile::tempdir().unwrap();
    let keyfile = dir.path().join("eab.key");
    std::fs::write(&keyfile, format!("{key}\n")).unwrap();
    let directory = p.directory();
    let ca = p.ca_file.display().to_string();
    let a = setup(
        p,
        &format!("responder = \"127.0.0.1:{port}\"\nchallenge_probe = \"127.0.0.1:{port}\"\n"),
        &format!(
            "[[acme]]\nname = \"eab\"\ndirectory = \"{directory}\"\nca_file = \"{ca}\"\n\
             eab_kid = \"kid-1\"\neab_hmac_file = \"{}\"\n",
            keyfile.display()
        ),
        &[],
    );
    let mut c = a.d.client().await;
    // Without the binding, this CA refuses to register an account.
    let job = run(&mut c, issue(&["example.test"])).await;
    assert_eq!(state(&job), pb::JobState::Failed);
    assert_eq!(job.failed_step, "account");
    assert!(job.error.contains("the CA said:"), "{}", job.error);
    // With it, the certificate is issued.
    run_ok(
        &mut c,
        issue_with(&["example.test"], |j| j.acme = "eab".into()),
    )
    .await;
    check_installed(&a, "example.test", &["example.test"], 1).await;
}

#[tokio::test]
async fn an_unreachable_acme_server_ends_the_job_saying_so() {
    let closed = free_port();
    let a = with_responder(
        &format!("[[acme]]\nname = \"down\"\ndirectory = \"https://127.0.0.1:{closed}/dir\"\n"),
        &[],
    );
    let mut c = a.d.client().await;
    let job = run(
        &mut c,
        issue_with(&["example.test"], |j| j.acme = "down".into()),
    )
    .await;
    assert_eq!(state(&job), pb::JobState::Failed);
    assert_eq!(job.failed_step, "account");
    assert!(
        job.error.contains("cannot reach the ACME server"),
        "{}",
        job.error
    );
    assert!(!a.root().join("live/example.test").exists());
}

#[tokio::test]
async fn bad_nonces_are_retried_and_cert_renew_repeats_the_issuance() {
    // Pebble's defaults: 5% of nonces rejected, authorizations reused.
    let port = free_port();
    let p = Pebble::start_with(port, false);
    let a = setup(
        p,
        &format!("responder = \"127.0.0.1:{port}\"\nchallenge_probe = \"127.0.0.1:{port}\"\n"),
        "",
        &[],
    );
    let mut c = a.d.client().await;
    for _ in 0..3 {
        run_ok(&mut c, issue(&["example.test", "www.example.test"])).await;
    }
    // `cert renew` repeats the issuance as it was.
    let out =
        a.d.cli()
            .args(["cert", "renew", "example.test"])
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_installed(&a, "example.test", &["example.test", "www.example.test"], 4).await;
}

/// (year, month, day) of a unix day number (Howard Hinnant's civil_from_days).
fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = (yoe + era * 400 + i64::from(m <= 2)) as i32;
    (y, m, d)
}

#[tokio::test]
async fn the_daemon_renews_a_lineage_near_expiry_once() {
    let port = free_port();
    let p = Pebble::start(port);
    let mut a = setup(
        p,
        &format!("responder = \"127.0.0.1:{port}\"\nchallenge_probe = \"127.0.0.1:{port}\"\n"),
        "",
        &[],
    );
    let mut c = a.d.client().await;
    run_ok(&mut c, issue(&["example.test"])).await;
    // Make the live certificate one issued 80 days ago that expires in 10.
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        / 86_400;
    let mut params = rcgen::CertificateParams::new(vec!["example.test".to_owned()]).unwrap();
    let (y, m, d) = civil(today - 80);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil(today + 10);
    params.not_after = rcgen::date_time_ymd(y, m, d);
    let key = rcgen::KeyPair::generate().unwrap();
    let old = params.self_signed(&key).unwrap().pem();
    std::fs::write(a.root().join("archive/example.test/cert1.pem"), &old).unwrap();
    let out =
        a.d.cli()
            .args(["-o", "json", "cert", "show", "example.test"])
            .output()
            .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(shown["days_left"].as_i64().unwrap() <= 10, "{shown}");

    // renew_check is read at start: restart with a short one.
    a.d.kill9();
    let cfg = std::fs::read_to_string(&a.d.config)
        .unwrap()
        .replace("renew_check = \"0s\"", "renew_check = \"200ms\"");
    std::fs::write(&a.d.config, cfg).unwrap();
    a.d.spawn();
    let mut c = a.d.client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let auto = loop {
        let jobs = c
            .list_jobs(pb::ListJobsRequest {
                labels: [("trigger".to_owned(), "auto-renew".to_owned())].into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .jobs;
        if let Some(j) = jobs.last() {
            break j.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no renewal was submitted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(auto.kind, "certificate_issue");
    let done = wait_end(&mut c, &auto.id).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{done:#?}");
    assert_ne!(a.read("example.test", "cert"), old);
    // The new certificate is not due: a few more checks submit nothing more.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let jobs = c
        .list_jobs(pb::ListJobsRequest {
            kind: "certificate_issue".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 2, "one issuance, one renewal: {jobs:#?}");
}

#[tokio::test]
async fn a_dry_run_issues_against_the_test_ca_and_installs_nothing() {
    let a = with_responder("", &[]);
    let out =
        a.d.cli()
            .args([
                "cert",
                "issue",
                "example.test",
                "--dry-run",
                "--acme",
                "pebble",
            ])
            .output()
            .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("dry run: pebble issued it; nothing was installed"),
        "{said}"
    );
    assert!(!said.contains("step 8: install"), "{said}");
    assert!(!a.root().join("live/example.test").exists(), "no lineage");
    assert!(!a.bundles().join("example.test.pem").exists(), "no bundle");
}

#[tokio::test]
async fn a_listener_on_a_lineage_serves_each_renewal_without_a_restart() {
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("s.sock");
    let mut a = with_responder(&format!("listen_unix = \"{}\"\n", sock.display()), &[]);
    let mut c = a.d.client().await;
    run_ok(&mut c, issue(&["api.example.test"])).await;
    // The listener takes up TLS from the lineage at the next start.
    a.d.terminate();
    let mut text = std::fs::read_to_string(&a.d.config).unwrap();
    text.push_str("\n[tls]\nlineage = \"api.example.test\"\n");
    std::fs::write(&a.d.config, text).unwrap();
    a.d.spawn();
    assert!(a.d.log().contains("(TLS)"), "{}", a.d.log());
    let port: u16 = a.d.addr.rsplit(':').next().unwrap().parse().unwrap();
    let leaf = |pem: &str| {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .to_vec()
    };
    let first = leaf(&a.read("api.example.test", "fullchain"));
    assert_eq!(served_cert(port, "api.example.test").await, first);

    // Renewed through the unix socket: the new version is served, no restart, no SIGHUP.
    let out =
        a.d.cli()
            .args(["--server", &format!("unix:{}", sock.display())])
            .args(["cert", "renew", "api.example.test"])
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = leaf(&a.read("api.example.test", "fullchain"));
    assert_ne!(first, second);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while served_cert(port, "api.example.test").await != second {
        assert!(tokio::time::Instant::now() < deadline, "{}", a.d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn cert_delete_removes_a_lineage_and_a_rollback_puts_it_back_as_it_was() {
    let a = with_responder("", &[]);
    let mut c = a.d.client().await;
    run_ok(&mut c, issue(&["gone.example.test"])).await;
    run_ok(&mut c, issue(&["gone.example.test"])).await;
    run_ok(&mut c, issue(&["kept.example.test"])).await;
    let places = [
        a.root().join("live").join("gone.example.test"),
        a.root().join("archive").join("gone.example.test"),
        a.bundles().join("gone.example.test.pem"),
        a.d.data().join("renewal").join("gone.example.test.json"),
    ];
    // A lineage directory with its own mode comes back with it.
    std::fs::set_permissions(&places[1], std::fs::Permissions::from_mode(0o750)).unwrap();
    let before = tree(&places);
    assert!(before.len() >= 4 + 8 + 2, "{:?}", before.keys());

    let out =
        a.d.cli()
            .args(["cert", "delete", "gone.example.test"])
            .output()
            .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(tree(&places).is_empty(), "left: {:?}", tree(&places).keys());
    let out = a.d.cli().args(["cert", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        !listed.contains("gone.example.test") && listed.contains("kept.example.test"),
        "{listed}"
    );
    let e = c
        .submit_job(pb::SubmitJobRequest {
            node: String::new(),
            spec: Some(pb::JobSpec {
                kind: Some(pb::job_spec::Kind::CertificateDelete(
                    pb::CertificateDeleteJob {
                        lineage: "gone.example.test".into(),
                    },
                )),
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let out =
        a.d.cli()
            .args(["jobs", "rollback", "@last"])
            .output()
            .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert_eq!(
        tree(&places),
        before,
        "the lineage is back byte for byte, links as they were"
    );
    assert_eq!(mode(&places[1]), 0o750, "the archive directory's mode too");
    let out =
        a.d.cli()
            .args(["cert", "show", "gone.example.test"])
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn cert_delete_takes_a_broken_lineage_too_and_its_rollback_puts_the_dangling_link_back() {
    let a = with_responder("", &[]);
    let mut c = a.d.client().await;
    run_ok(&mut c, issue(&["broken.example.test"])).await;
    // A half-done update: the version live/cert.pem points at is gone.
    let target = std::fs::read_link(a.live("broken.example.test", "cert")).unwrap();
    std::fs::remove_file(
        a.live("broken.example.test", "cert")
            .parent()
            .unwrap()
            .join(&target),
    )
    .unwrap();
    let out =
        a.d.cli()
            .args(["cert", "delete", "broken.example.test"])
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::symlink_metadata(a.live("broken.example.test", "cert")).is_err());
    let out =
        a.d.cli()
            .args(["jobs", "rollback", "@last"])
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_link(a.live("broken.example.test", "cert")).unwrap(),
        target
    );
}

#[tokio::test]
async fn cert_revoke_needs_yes_revokes_at_the_ca_and_refuses_a_rollback() {
    let a = with_responder("", &[]);
    let mut c = a.d.client().await;
    run_ok(&mut c, issue(&["revoked.example.test"])).await;
    let serial = serial_of(&a.read("revoked.example.test", "cert"));
    let out =
        a.d.cli()
            .args(["cert", "revoke", "revoked.example.test"])
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot be undone") && err.contains("--yes"),
        "{err}"
    );

    let out =
        a.d.cli()
            .args([
                "cert",
                "revoke",
                "revoked.example.test",
                "--yes",
                "--reason",
                "superseded",
            ])
            .output()
            .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("(cannot be undone)"),
        "the plan says so: {said}"
    );
    assert!(
        said.contains("stately cert renew revoked.example.test"),
        "{said}"
    );
    // The CA says so too.
    let status = crate::support::pebble::https_get(
        a.p.mgmt,
        &format!(
            "/cert-status-by-serial/{}",
            serial.to_ascii_lowercase().trim_start_matches('0')
        ),
        &a.p.ca_pem,
    )
    .await;
    assert!(status.contains("Revoked"), "{status}");

    let out =
        a.d.cli()
            .args(["jobs", "rollback", "@last"])
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a revocation cannot be undone"), "{err}");
    // A bad reason is refused before anything goes to the CA.
    let out =
        a.d.cli()
            .args([
                "cert",
                "revoke",
                "revoked.example.test",
                "--yes",
                "--reason",
                "bored",
            ])
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn revoke_and_delete_refuse_bad_input_with_a_short_message_and_change_nothing() {
    let a = with_responder("", &[]);
    let mut c = a.d.client().await;
    run_ok(&mut c, issue(&["kept.example.test"])).await;
    let before = tree(&[a.root(), a.bundles()]);
    let huge = "x".repeat(100_000);
    let revoke = |lineage: &str, reason: &str| pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::CertificateRevoke(
                pb::CertificateRevokeJob {
                    lineage: lineage.into(),
                    reason: reason.into(),
                },
            )),
        }),
        ..Default::default()
    };
    let delete = |lineage: &str| pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::CertificateDelete(
                pb::CertificateDeleteJob {
                    lineage: lineage.into(),
                },
            )),
        }),
        ..Default::default()
    };
    for (req, code) in [
        (revoke("kept.example.test", "bored"), Code::InvalidArgument),
        (revoke("../kept.example.test", ""), Code::InvalidArgument),
        (revoke(&huge, ""), Code::InvalidArgument),
        (revoke("no-such.example.test", ""), Code::NotFound),
        (delete("../../etc"), Code::InvalidArgument),
        (delete(&huge), Code::InvalidArgument),
        (delete(""), Code::InvalidArgument),
        (delete("no-such.example.test"), Code::NotFound),
    ] {
        let e = c.submit_job(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(
            e.message().len() < 300,
            "a short message: {} bytes",
            e.message().len()
        );
    }
    assert_eq!(tree(&[a.root(), a.bundles()]), before, "nothing changed");
    let jobs = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 1, "no job was created for any of them");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_lineages_due_at_once_are_renewed_concurrently() {
    const N: usize = 100;
    let mut a = with_responder("", &[]);
    let mut c = a.d.client().await;
    // A hundred lineages, submitted at once.
    let mut ids = Vec::new();
    for i in 0..N {
        let job = c
            .submit_job(issue(&[&format!("n{i}.example.test")]))
            .await
            .unwrap()
            .into_inner();
        ids.push(job.id);
    }
    for id in &ids {
        let j = wait_end(&mut c, id).await;
        assert_eq!(state(&j), pb::JobState::Succeeded, "{j:#?}");
    }
    // All due (Pebble's certificates last five years): renew_check is read at start, and a
    // check runs at once.
    a.d.kill9();
    let cfg = std::fs::read_to_string(&a.d.config).unwrap().replace(
        "renew_check = \"0s\"",
        "renew_check = \"1h\"\nrenew_before = \"2500d\"",
    );
    std::fs::write(&a.d.config, cfg).unwrap();
    let started = std::time::Instant::now();
    a.d.spawn();
    let mut c = a.d.client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let renewals = loop {
        let jobs = c
            .list_jobs(pb::ListJobsRequest {
                labels: [("trigger".to_owned(), "auto-renew".to_owned())].into(),
                page_size: 500,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .jobs;
        let done = jobs
            .iter()
            .filter(|j| state(j) == pb::JobState::Succeeded)
            .count();
        if done == N {
            break jobs;
        }
        assert!(
            !jobs.iter().any(|j| state(j) == pb::JobState::Failed),
            "a renewal failed: {jobs:#?}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "{done} of {N} renewed in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let wall = started.elapsed();
    assert_eq!(renewals.len(), N, "one renewal per lineage");
    for i in 0..N {
        assert_eq!(
            a.link(&format!("n{i}.example.test"), "cert"),
            format!("../../archive/n{i}.example.test/cert2.pem")
        );
    }
    // They ran side by side: the most running at one moment, from their start and end times.
    let ms = |t: &Option<prost_types::Timestamp>| {
        let t = t.as_ref().unwrap();
        t.seconds as i128 * 1000 + t.nanos as i128 / 1_000_000
    };
    let spans: Vec<(i128, i128)> = renewals
        .iter()
        .map(|j| (ms(&j.started_at), ms(&j.finished_at)))
        .collect();
    let most = spans
        .iter()
        .map(|(s, _)| spans.iter().filter(|(a, b)| a <= s && s < b).count())
        .max()
        .unwrap();
    let busy: i128 = spans.iter().map(|(s, e)| e - s).sum();
    eprintln!(
        "{N} renewals in {wall:?}; at most {most} at once; their durations add up to {busy} ms"
    );
    assert!(most >= 10, "at most {most} renewals ran at once");
}
