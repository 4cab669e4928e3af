//! Adopting what certbot left: lineages made by Debian's real certbot against Pebble (a
//! `-0001` made as certbot makes it, an update interrupted as certbot would leave it), taken
//! over by `stately cert adopt`, renewed by statelyd, rolled back to exactly what certbot had,
//! and killed with SIGKILL at seeded random moments.

use crate::support::pebble::Pebble;
use crate::support::*;
use stately::pb;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tonic::Code;

const CERTBOT: &str = "/usr/bin/certbot";

/// Files and links (path → content or link target), and directories.
#[derive(PartialEq)]
struct World(std::collections::BTreeMap<PathBuf, String>, Vec<PathBuf>);

/// Only what differs, so a failure is readable.
impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} files, {} dirs", self.0.len(), self.1.len())
    }
}

fn same(a: &World, b: &World, what: &str) {
    let mut diff = Vec::new();
    for (k, v) in &a.0 {
        match b.0.get(k) {
            None => diff.push(format!("only now: {}", k.display())),
            Some(w) if w != v => diff.push(format!(
                "differs: {} ({} / {})",
                k.display(),
                &v[..v.len().min(60)],
                &w[..w.len().min(60)]
            )),
            _ => {}
        }
    }
    for k in b.0.keys().filter(|k| !a.0.contains_key(*k)) {
        diff.push(format!("only before: {}", k.display()));
    }
    for d in a.1.iter().filter(|d| !b.1.contains(d)) {
        diff.push(format!("dir only now: {}", d.display()));
    }
    for d in b.1.iter().filter(|d| !a.1.contains(d)) {
        diff.push(format!("dir only before: {}", d.display()));
    }
    assert!(diff.is_empty(), "{what}:\n{}", diff.join("\n"));
}

struct Adopt {
    p: Pebble,
    d: Daemon,
    dir: tempfile::TempDir,
}

impl Adopt {
    fn le(&self) -> PathBuf {
        self.dir.path().join("le")
    }
    fn link(&self, lineage: &str, file: &str) -> String {
        std::fs::read_link(
            self.le()
                .join("live")
                .join(lineage)
                .join(format!("{file}.pem")),
        )
        .map(|t| t.display().to_string())
        .unwrap_or_default()
    }
    /// Every file and link that certbot and statelyd keep for lineages, and the directories.
    fn world(&self) -> World {
        let roots = [
            self.le(),
            self.dir.path().join("haproxy-certs"),
            self.d.data().join("renewal"),
        ];
        let mut dirs = Vec::new();
        let mut todo: Vec<PathBuf> = roots.to_vec();
        while let Some(p) = todo.pop() {
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                dirs.push(p.clone());
                todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            }
        }
        dirs.sort();
        // statelyd's own data directory may stay once made.
        dirs.retain(|d| !d.starts_with(self.d.data()));
        // certbot's lock file, empty, which certbot too leaves behind when it is killed.
        let mut files = tree(&roots);
        files.remove(&self.le().join(".certbot.lock"));
        World(files, dirs)
    }
}

pub(crate) fn certbot(p: &Pebble, le: &Path, args: &[&str]) {
    assert!(
        Path::new(CERTBOT).exists(),
        "{CERTBOT} is not installed; scripts/test.sh installs the Debian package certbot"
    );
    let work = le.parent().unwrap();
    let out = Command::new(CERTBOT)
        .arg("--config-dir")
        .arg(le)
        .arg("--work-dir")
        .arg(work.join("certbot-work"))
        .arg("--logs-dir")
        .arg(work.join("certbot-logs"))
        .args(["--server", &p.directory()])
        .args([
            "--non-interactive",
            "--agree-tos",
            "--register-unsafely-without-email",
        ])
        .args(args)
        .env("REQUESTS_CA_BUNDLE", &p.ca_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "certbot {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn standalone(p: &Pebble) -> Vec<String> {
    vec![
        "--standalone".into(),
        "--http-01-address".into(),
        "127.0.0.1".into(),
        "--http-01-port".into(),
        p.http_port.to_string(),
    ]
}

/// Pebble, certbot's lineages made by `make`, then statelyd on certbot's root, its responder
/// on the port certbot's standalone server used.
fn setup(make: impl FnOnce(&Pebble, &Path)) -> Adopt {
    setup_in(tempfile::tempdir().unwrap(), "", make)
}

/// As `setup`, in `dir`, with `extra` daemon configuration.
fn setup_in(dir: tempfile::TempDir, extra: &str, make: impl FnOnce(&Pebble, &Path)) -> Adopt {
    let port = free_port();
    let p = Pebble::start(port);
    make(&p, &dir.path().join("le"));
    let config = format!(
        "{extra}[certificates]\nroot = \"{}\"\nhaproxy_dir = \"{}\"\ndefault_acme = \"pebble\"\nrenew_check = \"0s\"\nresponder = \"127.0.0.1:{port}\"\nchallenge_probe = \"127.0.0.1:{port}\"\n{}",
        dir.path().join("le").display(),
        dir.path().join("haproxy-certs").display(),
        p.config()
    );
    let d = Daemon::start(&config);
    Adopt { p, d, dir }
}

/// example.test, then (with --duplicate, as a control panel asks) example.test-0001 for the
/// apex and www.
fn with_side_lineage() -> Adopt {
    setup(make_side_lineage)
}

/// certbot makes example.test, then example.test-0001 for the apex and www.
fn make_side_lineage(p: &Pebble, le: &Path) {
    let s = standalone(p);
    let s: Vec<&str> = s.iter().map(String::as_str).collect();
    certbot(
        p,
        le,
        &[&["certonly"], &s[..], &["-d", "example.test"]].concat(),
    );
    certbot(
        p,
        le,
        &[
            &["certonly"],
            &s[..],
            &[
                "--duplicate",
                "-d",
                "example.test",
                "-d",
                "www.example.test",
            ],
        ]
        .concat(),
    );
}

fn adopt_req(
    lineages: &[&str],
    f: impl FnOnce(&mut pb::CertificateAdoptJob),
) -> pb::SubmitJobRequest {
    let mut a = pb::CertificateAdoptJob {
        lineages: lineages.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    f(&mut a);
    pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::CertificateAdopt(a)),
        }),
        ..Default::default()
    }
}

fn said(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn names_of(pem_path: &Path) -> Vec<String> {
    let pem = std::fs::read(pem_path).unwrap();
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let c = p.parse_x509().unwrap();
    let mut v: Vec<String> = c
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
    v.sort();
    v
}

#[tokio::test]
async fn adopt_merges_a_0001_that_covers_the_lineage_renews_it_and_a_rollback_puts_both_back() {
    let a = with_side_lineage();
    let before = a.world();
    let side_cert = std::fs::read(a.le().join("archive/example.test-0001/cert1.pem")).unwrap();

    // A dry run says what it would do and changes nothing.
    let out =
        a.d.cli()
            .args(["cert", "adopt", "--dry-run"])
            .output()
            .unwrap();
    let text = said(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("example.test-0001 covers its names (example.test, www.example.test): would merge its 1 version(s) into archive/example.test/"),
        "{text}"
    );
    assert!(
        text.contains("would renew by responder (certbot used standalone)"),
        "{text}"
    );
    same(&a.world(), &before, "a dry run changed something");

    // Adopted: the side lineage's version is the lineage's next, live/ follows, the side
    // lineage and both renewal configs are gone, statelyd's settings and bundle are there.
    let out =
        a.d.cli()
            .args(["cert", "adopt", "--detach", "--root"])
            .arg(a.le())
            .output()
            .unwrap();
    assert!(out.status.success(), "{}", said(&out));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut c = a.d.client().await;
    let ended = wait_end(&mut c, &id).await;
    assert_eq!(state(&ended), pb::JobState::Succeeded, "{ended:#?}");
    for f in ["cert", "chain", "fullchain", "privkey"] {
        assert_eq!(
            a.link("example.test", f),
            format!("../../archive/example.test/{f}2.pem")
        );
    }
    assert_eq!(
        std::fs::read(a.le().join("archive/example.test/cert2.pem")).unwrap(),
        side_cert
    );
    assert_eq!(
        names_of(&a.le().join("live/example.test/cert.pem")),
        ["example.test", "www.example.test"]
    );
    for gone in [
        "live/example.test-0001",
        "archive/example.test-0001",
        "renewal/example.test-0001.conf",
        "renewal/example.test.conf",
    ] {
        assert!(
            std::fs::symlink_metadata(a.le().join(gone)).is_err(),
            "{gone} left"
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(a.d.data().join("renewal/example.test.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        meta["names"],
        serde_json::json!(["example.test", "www.example.test"])
    );
    assert_eq!(meta["acme"], "pebble");
    let bundle =
        std::fs::read_to_string(a.dir.path().join("haproxy-certs/example.test.pem")).unwrap();
    assert!(bundle.contains("PRIVATE KEY") && bundle.contains("BEGIN CERTIFICATE"));
    // certbot itself no longer sees a lineage to renew.
    let out = Command::new(CERTBOT)
        .arg("--config-dir")
        .arg(a.le())
        .arg("--work-dir")
        .arg(a.dir.path().join("certbot-work"))
        .arg("--logs-dir")
        .arg(a.dir.path().join("certbot-logs"))
        .arg("certificates")
        .output()
        .unwrap();
    assert!(
        said(&out).contains("No certificates found"),
        "{}",
        said(&out)
    );

    // The rollback puts both lineages and certbot's configs back exactly.
    let rb = rollback(&mut c, &id, false).await;
    assert_eq!(state(&rb), pb::JobState::Succeeded, "{rb:#?}");
    same(
        &a.world(),
        &before,
        "the rollback did not put certbot's state back",
    );

    // Adopted again, statelyd renews it as certbot had it (responder, both names).
    let job = c
        .submit_job(adopt_req(&["example.test"], |_| {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        state(&wait_end(&mut c, &job.id).await),
        pb::JobState::Succeeded
    );
    let out =
        a.d.cli()
            .args(["cert", "renew", "example.test"])
            .output()
            .unwrap();
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(
        a.link("example.test", "cert"),
        "../../archive/example.test/cert3.pem"
    );
    assert_eq!(
        names_of(&a.le().join("live/example.test/cert.pem")),
        ["example.test", "www.example.test"]
    );
}

#[tokio::test]
async fn a_0001_that_does_not_cover_the_lineage_is_adopted_beside_it() {
    let a = setup(|p, le| {
        let s = standalone(p);
        let s: Vec<&str> = s.iter().map(String::as_str).collect();
        certbot(
            p,
            le,
            &[
                &["certonly"],
                &s[..],
                &["-d", "example.test", "-d", "www.example.test"],
            ]
            .concat(),
        );
        // Not a superset: certbot makes example.test-0001 without being asked.
        certbot(
            p,
            le,
            &[
                &["certonly"],
                &s[..],
                &["-d", "example.test", "-d", "mail.example.test"],
            ]
            .concat(),
        );
    });
    assert!(a.le().join("live/example.test-0001").exists());
    let mut c = a.d.client().await;
    let job = c
        .submit_job(adopt_req(&[], |_| {}))
        .await
        .unwrap()
        .into_inner();
    let ended = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&ended), pb::JobState::Succeeded, "{ended:#?}");
    for l in ["example.test", "example.test-0001"] {
        assert_eq!(a.link(l, "cert"), format!("../../archive/{l}/cert1.pem"));
        assert!(a.d.data().join(format!("renewal/{l}.json")).exists(), "{l}");
    }
    let mut certs = pb::certificates_client::CertificatesClient::with_interceptor(
        a.d.channel().await,
        bearer(Some(OPERATOR)),
    );
    let listed = certs
        .list_certificates(pb::ListCertificatesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.certificates.len(), 2, "{listed:#?}");
}

#[tokio::test]
async fn adopt_repairs_an_interrupted_certbot_update_as_certbot_would_and_a_rollback_restores_it() {
    let a = setup(|p, le| {
        let s = standalone(p);
        let s: Vec<&str> = s.iter().map(String::as_str).collect();
        certbot(
            p,
            le,
            &[&["certonly"], &s[..], &["-d", "example.test"]].concat(),
        );
        certbot(
            p,
            le,
            &["renew", "--force-renewal", "--no-random-sleep-on-renew"],
        );
        // Interrupted switching from 1 to 2 after two links, as certbot's
        // update_all_links_to leaves it: previous_*.pem at 1 (absolute, as certbot writes
        // them), cert and privkey at 2.
        let live = le.join("live/example.test");
        for f in ["cert", "privkey", "chain", "fullchain"] {
            let old = format!("../../archive/example.test/{f}1.pem");
            let absolute = le.join(format!("archive/example.test/{f}1.pem"));
            std::os::unix::fs::symlink(&absolute, live.join(format!("previous_{f}.pem"))).unwrap();
            if f == "chain" || f == "fullchain" {
                std::fs::remove_file(live.join(format!("{f}.pem"))).unwrap();
                std::os::unix::fs::symlink(&old, live.join(format!("{f}.pem"))).unwrap();
            }
        }
    });
    assert_eq!(
        a.link("example.test", "cert"),
        "../../archive/example.test/cert2.pem"
    );
    let before = a.world();
    let mut c = a.d.client().await;
    let job = c
        .submit_job(adopt_req(&["example.test"], |_| {}))
        .await
        .unwrap()
        .into_inner();
    let ended = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&ended), pb::JobState::Succeeded, "{ended:#?}");
    let logs = job_logs(&mut c, &job.id).await;
    assert!(
        logs.iter().any(|l| l.contains("certbot's update was interrupted: will point live/cert.pem back at ../../archive/example.test/cert1.pem")),
        "{logs:?}"
    );
    for f in ["cert", "privkey", "chain", "fullchain"] {
        assert_eq!(
            a.link("example.test", f),
            format!("../../archive/example.test/{f}1.pem")
        );
        assert!(
            !a.le()
                .join(format!("live/example.test/previous_{f}.pem"))
                .exists()
        );
    }
    let rb = rollback(&mut c, &job.id, false).await;
    assert_eq!(state(&rb), pb::JobState::Succeeded, "{rb:#?}");
    same(&a.world(), &before, "the world");

    // Mixed versions with no previous links: certbot would refuse it, and so does adopt.
    for f in [
        "previous_cert",
        "previous_privkey",
        "previous_chain",
        "previous_fullchain",
    ] {
        std::fs::remove_file(a.le().join(format!("live/example.test/{f}.pem"))).unwrap();
    }
    let e = c
        .submit_job(adopt_req(&["example.test"], |_| {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("different versions"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn bad_adoptions_are_refused_with_the_right_code_and_change_nothing() {
    let a = setup(|p, le| {
        let s = standalone(p);
        let s: Vec<&str> = s.iter().map(String::as_str).collect();
        certbot(
            p,
            le,
            &[&["certonly"], &s[..], &["-d", "example.test"]].concat(),
        );
    });
    let before = a.world();
    let mut c = a.d.client().await;
    let conf = a.le().join("renewal/example.test.conf");
    let original = std::fs::read_to_string(&conf).unwrap();
    for (req, edit, code, says) in [
        (
            adopt_req(&[], |r| r.root = "/etc/letsencrypt".into()),
            None,
            Code::FailedPrecondition,
            "is not the daemon's certificate root",
        ),
        (
            adopt_req(&["nope.test"], |_| {}),
            None,
            Code::NotFound,
            "no certbot lineage 'nope.test'",
        ),
        (
            adopt_req(&["../x"], |_| {}),
            None,
            Code::InvalidArgument,
            "is not a lineage name",
        ),
        (
            adopt_req(&[], |r| r.deploy = vec!["edge".into()]),
            None,
            Code::NotFound,
            "no HAProxy target 'edge'",
        ),
        (
            adopt_req(&[], |_| {}),
            Some(original.replace(
                "authenticator = standalone",
                "authenticator = webroot\nwebroot_path = /srv/elsewhere,",
            )),
            Code::FailedPrecondition,
            "its webroot /srv/elsewhere is not one of the daemon's [certificates] webroots",
        ),
        (
            adopt_req(&[], |_| {}),
            Some(original.replace(
                "authenticator = standalone",
                "authenticator = standalone\nrenew_hook = systemctl reload postfix",
            )),
            Code::FailedPrecondition,
            "certbot runs its renew_hook 'systemctl reload postfix' after renewals, which stately does not run",
        ),
        (
            adopt_req(&[], |_| {}),
            Some(original.replace("authenticator = standalone", "authenticator = manual")),
            Code::FailedPrecondition,
            "manual authenticator cannot be renewed unattended",
        ),
        (
            adopt_req(&[], |_| {}),
            Some(original.replace("authenticator = standalone", "authenticator = dns-rfc2136")),
            Code::FailedPrecondition,
            "certbot proved it by DNS (dns-rfc2136); no [[dns]] zone of the daemon holds _acme-challenge.example.test",
        ),
        (
            adopt_req(&[], |_| {}),
            Some(original.replace(&a.p.directory(), "https://acme.example.net/directory")),
            Code::FailedPrecondition,
            "none of the daemon's ACME servers",
        ),
    ] {
        if let Some(text) = &edit {
            std::fs::write(&conf, text).unwrap();
        }
        let e = c.submit_job(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().contains(says), "{}", e.message());
        assert!(e.message().len() < 400, "{}", e.message());
        std::fs::write(&conf, &original).unwrap();
    }
    same(&a.world(), &before, "the world");
    let jobs = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(jobs.jobs.is_empty(), "{jobs:#?}");

    // certbot's lock held (as a running certbot holds it): the job stops before any change.
    // (Read before the lock: closing any descriptor of the file would release it.)
    let before = a.world();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(a.le().join(".certbot.lock"))
        .unwrap();
    let whole = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    nix::fcntl::fcntl(&lock, nix::fcntl::FcntlArg::F_SETLK(&whole)).unwrap();
    let job = c
        .submit_job(adopt_req(&[], |_| {}))
        .await
        .unwrap()
        .into_inner();
    let ended = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&ended), pb::JobState::Failed, "{ended:#?}");
    assert!(
        ended.error.contains("it is running on this root"),
        "{}",
        ended.error
    );
    same(
        &a.world(),
        &before,
        "adopt changed something under certbot's lock",
    );
    drop(lock);
}

#[tokio::test]
async fn kill_9_at_random_moments_of_an_adoption_leaves_certbots_state_or_the_adopted_one() {
    let mut a = with_side_lineage();
    let before = a.world();
    let mut c = a.d.client().await;
    // What an adoption leaves, then back.
    let job = c
        .submit_job(adopt_req(&[], |_| {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        state(&wait_end(&mut c, &job.id).await),
        pb::JobState::Succeeded
    );
    let after = a.world();
    assert_eq!(
        state(&rollback(&mut c, &job.id, false).await),
        pb::JobState::Succeeded
    );
    same(&a.world(), &before, "the world");

    let seed = crash_seed("adopt");
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for trial in 0..6 {
        let mut c = a.d.client().await;
        let job = c
            .submit_job(adopt_req(&[], |_| {}))
            .await
            .unwrap()
            .into_inner();
        let delay = rng.random_range(0..40u64);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        a.d.kill9();
        a.d.spawn();
        let mut c = a.d.client().await;
        let ended = wait_end(&mut c, &job.id).await;
        let at = format!("seed {seed}, trial {trial}, kill after {delay} ms");
        eprintln!("{at}: {:?}", state(&ended));
        match state(&ended) {
            pb::JobState::Succeeded => {
                same(&a.world(), &after, &format!("{at}: not all adopted"));
                let rb = rollback(&mut c, &job.id, false).await;
                assert_eq!(state(&rb), pb::JobState::Succeeded, "{at}: {rb:#?}");
            }
            pb::JobState::Failed => {
                assert!(
                    ended.error.contains("interrupted by restart"),
                    "{at}: {}",
                    ended.error
                );
            }
            other => panic!("{at}: {other:?}"),
        }
        same(
            &a.world(),
            &before,
            &format!("{at}: certbot's state not back"),
        );
    }
}

#[tokio::test]
async fn a_generic_client_adopts_knowing_the_api_only_by_reflection() {
    let a = with_side_lineage();
    let mut g = crate::reflection::Generic::new(&a.d).await;
    let job = g
        .call(
            "stately.v1.Jobs",
            "SubmitJob",
            r#"{"spec": {"certificateAdopt": {"lineages": ["example.test-0001"]}}}"#,
        )
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    let mut c = a.d.client().await;
    let ended = wait_end(&mut c, &id).await;
    assert_eq!(state(&ended), pb::JobState::Succeeded, "{ended:#?}");
    // Asked for the side lineage, adopt merged it into the lineage it covers.
    assert_eq!(
        a.link("example.test", "cert"),
        "../../archive/example.test/cert2.pem"
    );
    assert!(!a.le().join("live/example.test-0001").exists());
    let e = g
        .call(
            "stately.v1.Jobs",
            "SubmitJob",
            r#"{"spec": {"certificateAdopt": {"root": "/somewhere/else"}}}"#,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
}

#[tokio::test]
async fn an_adopted_merge_is_deployed_to_haproxy_and_its_rollback_serves_the_old_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let hdir = dir.path().join("haproxy");
    std::fs::create_dir_all(&hdir).unwrap();
    let bundles = dir.path().join("haproxy-certs");
    let extra = format!(
        "[[haproxy]]\nname = \"edge\"\nstats_socket = \"{}\"\nmaster_socket = \"{}\"\n",
        hdir.join("admin.sock").display(),
        hdir.join("master.sock").display()
    );
    let a = setup_in(dir, &extra, |p, le| {
        make_side_lineage(p, le);
        // The shell way: the lineage's files cat'ed into HAProxy's bundle.
        std::fs::create_dir_all(le.parent().unwrap().join("haproxy-certs")).unwrap();
        let live = le.join("live/example.test");
        let bundle = std::fs::read_to_string(live.join("fullchain.pem")).unwrap()
            + &std::fs::read_to_string(live.join("privkey.pem")).unwrap();
        std::fs::write(
            le.parent().unwrap().join("haproxy-certs/example.test.pem"),
            bundle,
        )
        .unwrap();
    });
    let tls_port = free_port();
    let _h = Haproxy::from_config(
        &hdir,
        &format!(
            "global\n  stats socket {{stats}} mode 600 level admin expose-fd listeners\ndefaults\n  mode http\n  \
             timeout connect 1s\n  timeout client 5s\n  timeout server 5s\nfrontend tls\n  bind 127.0.0.1:{tls_port} ssl crt {}\n  \
             http-request return status 200\n",
            bundles.display()
        ),
    );
    let serial = |pem: &Path| {
        let bytes = std::fs::read(pem).unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(&bytes).unwrap();
        hex::encode(p.parse_x509().unwrap().raw_serial())
    };
    let served = || async {
        let der = crate::support::pebble::served_cert(tls_port, "example.test").await;
        let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
        hex::encode(c.raw_serial())
    };
    let old = serial(&a.le().join("live/example.test/cert.pem"));
    let side = serial(&a.le().join("live/example.test-0001/cert.pem"));
    assert_eq!(served().await, old);

    let mut c = a.d.client().await;
    let job = c
        .submit_job(adopt_req(&[], |r| r.deploy = vec!["edge".into()]))
        .await
        .unwrap()
        .into_inner();
    let ended = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&ended), pb::JobState::Succeeded, "{ended:#?}");
    assert_eq!(
        served().await,
        side,
        "HAProxy serves the merged lineage's certificate"
    );
    let rb = rollback(&mut c, &job.id, false).await;
    assert_eq!(state(&rb), pb::JobState::Succeeded, "{rb:#?}");
    assert_eq!(served().await, old, "and the old one after the rollback");
}
