//! DNS-01 against a real BIND 9 primary (RFC 2136 updates signed with TSIG) with Pebble
//! resolving and validating through it: a wildcard and its apex issued and renewed, a cancel
//! while the record is published, kill -9 at seeded random moments, a bad key, bad input.

use crate::support::bind::Bind;
use crate::support::pebble::{Pebble, verify_chain};
use crate::support::*;
use stately::pb;
use std::time::Duration;
use tonic::Code;

const RECORD: &str = "_acme-challenge.example.test";

struct Dns {
    p: Pebble,
    bind: Bind,
    /// A second authoritative server that never gets the updates: a job waits on it.
    _lag: Option<Bind>,
    d: Daemon,
    dir: tempfile::TempDir,
}

impl Dns {
    fn live(&self, file: &str) -> std::path::PathBuf {
        self.dir
            .path()
            .join("le/live/example.test")
            .join(format!("{file}.pem"))
    }
}

/// BIND for example.test, Pebble resolving through it, statelyd with a `[[dns]]` zone (its
/// authoritative servers found from the zone's NS records, or the primary and a lagging
/// secondary when `lagging`).
fn setup(lagging: bool, dns_more: &str) -> Dns {
    let bind = Bind::start("example.test");
    let lag = lagging.then(|| Bind::start_with("example.test", false));
    let p = Pebble::start_dns(free_port(), bind.addr());
    let dir = tempfile::tempdir().unwrap();
    let mut more = dns_more.to_owned();
    if let Some(l) = &lag {
        more.push_str(&format!(
            "nameservers = [\"{}\", \"{}\"]\n",
            bind.addr(),
            l.addr()
        ));
    }
    let d = Daemon::start(&config(&p, &bind, dir.path(), &more));
    Dns {
        p,
        bind,
        _lag: lag,
        d,
        dir,
    }
}

/// The daemon's certificates, ACME and DNS configuration.
fn config(p: &Pebble, bind: &Bind, dir: &std::path::Path, more: &str) -> String {
    format!(
        "[certificates]\nroot = \"{}\"\nhaproxy_dir = \"{}\"\ndefault_acme = \"pebble\"\nrenew_check = \"0s\"\n{}{}",
        dir.join("le").display(),
        dir.join("haproxy-certs").display(),
        p.config(),
        bind.config(more)
    )
}

fn issue(names: &[&str], challenge: &str) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::CertificateIssue(
                pb::CertificateIssueJob {
                    names: names.iter().map(|s| s.to_string()).collect(),
                    challenge: challenge.into(),
                    ..Default::default()
                },
            )),
        }),
        ..Default::default()
    }
}

fn said(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test]
async fn the_cli_issues_a_wildcard_and_its_apex_by_dns01_and_renews_it_the_same_way() {
    let t = setup(false, "");
    let out =
        t.d.cli()
            .args(["cert", "issue", "*.example.test", "example.test", "--dns"])
            .output()
            .unwrap();
    let text = said(&out);
    assert!(out.status.success(), "{text}");
    // One lineage, named for the base name, serving both.
    let fullchain = std::fs::read_to_string(t.live("fullchain")).unwrap();
    let root = t.p.root().await;
    for name in ["example.test", "www.example.test", "anything.example.test"] {
        verify_chain(&fullchain, &root, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(verify_chain(&fullchain, &root, "a.b.example.test").is_err());
    // The authoritative servers came from the zone's NS records; nothing is left published.
    assert!(
        text.contains(&format!(
            "all 1 authoritative server(s) ({})",
            t.bind.addr()
        )),
        "{text}"
    );
    assert_eq!(t.bind.txt(RECORD), Vec::<String>::new());
    let log = t.bind.log();
    assert!(
        log.contains("adding an RR at '_acme-challenge.example.test' TXT")
            && log.contains("deleting an RR at _acme-challenge.example.test TXT"),
        "{log}"
    );

    // Shown as dns-01, and renewed the same way.
    let out =
        t.d.cli()
            .args(["-o", "json", "cert", "show", "example.test"])
            .output()
            .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["method"], "dns-01", "{shown}");
    let out =
        t.d.cli()
            .args(["cert", "renew", "example.test"])
            .output()
            .unwrap();
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(
        std::fs::read_link(t.live("cert"))
            .unwrap()
            .display()
            .to_string(),
        "../../archive/example.test/cert2.pem"
    );
    assert_eq!(t.bind.txt(RECORD), Vec::<String>::new());
}

#[tokio::test]
async fn a_cancel_while_the_record_is_published_removes_it_and_installs_nothing() {
    let t = setup(true, "");
    let mut c = t.d.client().await;
    let job = c
        .submit_job(issue(&["*.example.test", "example.test"], "dns-01"))
        .await
        .unwrap()
        .into_inner();
    let mut s = events(&mut c, &job.id).await;
    until_log_with(&mut s, "example.test: published TXT").await;
    // The wildcard's and the apex's values share one name; the lagging server holds the job.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while t.bind.txt(RECORD).len() < 2 {
        assert!(std::time::Instant::now() < deadline, "two values published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ended = cancel_wait(&mut c, &job.id).await;
    assert_eq!(state(&ended), pb::JobState::Cancelled, "{ended:#?}");
    assert_eq!(t.bind.txt(RECORD), Vec::<String>::new());
    assert!(!t.live("cert").exists());
    let logs = job_logs(&mut c, &job.id).await;
    assert!(
        logs.iter()
            .any(|l| l.contains("remove the challenge record TXT _acme-challenge.example.test")),
        "{logs:?}"
    );
}

#[tokio::test]
async fn kill_9_at_random_moments_leaves_no_record_and_the_lineage_all_or_nothing() {
    let mut t = setup(true, "");
    let mut c = t.d.client().await;
    // First at a known moment: published, waiting on the lagging server.
    let job = c
        .submit_job(issue(&["*.example.test", "example.test"], "dns-01"))
        .await
        .unwrap()
        .into_inner();
    let mut s = events(&mut c, &job.id).await;
    until_log_with(&mut s, "published TXT").await;
    assert!(!t.bind.txt(RECORD).is_empty());
    t.d.kill9();
    t.d.spawn();
    let mut c = t.d.client().await;
    let ended = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&ended), pb::JobState::Failed, "{ended:#?}");
    assert!(
        ended.error.contains("interrupted by restart"),
        "{}",
        ended.error
    );
    assert_eq!(t.bind.txt(RECORD), Vec::<String>::new());

    // Then at seeded random moments of a job that can finish (no lagging server).
    drop((c, t));
    let mut t = setup(false, "");
    let seed = crash_seed("dns-01 issue");
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut versions = 0;
    for trial in 0..6 {
        let mut c = t.d.client().await;
        let job = c
            .submit_job(issue(&["*.example.test", "example.test"], "dns-01"))
            .await
            .unwrap()
            .into_inner();
        let delay = rng.random_range(0..250u64);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        t.d.kill9();
        t.d.spawn();
        let mut c = t.d.client().await;
        let ended = wait_end(&mut c, &job.id).await;
        let at = format!("seed {seed}, trial {trial}, kill after {delay} ms");
        match state(&ended) {
            pb::JobState::Succeeded => versions += 1,
            pb::JobState::Failed => {
                assert!(
                    ended.error.contains("interrupted by restart")
                        && !ended.error.contains("unwind is incomplete"),
                    "{at}: {}",
                    ended.error
                )
            }
            other => panic!("{at}: {other:?}"),
        }
        eprintln!("{at}: {:?}", state(&ended));
        assert_eq!(
            t.bind.txt(RECORD),
            Vec::<String>::new(),
            "{at}: a record left"
        );
        // All old or all new: the live links point at the newest complete version, or there
        // is no lineage yet.
        if versions == 0 {
            assert!(
                !t.live("cert").exists(),
                "{at}: a lineage from a failed job"
            );
        } else {
            for f in ["cert", "chain", "fullchain", "privkey"] {
                assert_eq!(
                    std::fs::read_link(t.live(f)).unwrap().display().to_string(),
                    format!("../../archive/example.test/{f}{versions}.pem"),
                    "{at}"
                );
            }
        }
        let archive = t.dir.path().join("le/archive/example.test");
        let files = std::fs::read_dir(&archive).map(|d| d.count()).unwrap_or(0);
        assert_eq!(
            files,
            versions * 4,
            "{at}: archive files of failed jobs left"
        );
    }
}

#[tokio::test]
async fn a_bad_tsig_key_fails_with_binds_answer_and_publishes_nothing() {
    let bad = tempfile::tempdir().unwrap();
    let key = bad.path().join("wrong.key");
    std::fs::write(
        &key,
        "key \"stately-test\" {\n\talgorithm hmac-sha256;\n\tsecret \"d3Jvbmcgc2VjcmV0IHdyb25nIHNlY3JldCB3cm9uZyE=\";\n};\n",
    )
    .unwrap();
    let t = setup(false, "");
    // The wrong secret under the right key name.
    let mut d = Daemon::start(&config(&t.p, &t.bind, t.dir.path(), "").replace(
        &t.bind.key_file.display().to_string(),
        &key.display().to_string(),
    ));
    let mut c = d.client().await;
    let job = c
        .submit_job(issue(&["example.test"], "dns-01"))
        .await
        .unwrap()
        .into_inner();
    let ended = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&ended), pb::JobState::Failed, "{ended:#?}");
    assert!(
        ended
            .error
            .contains("refused the update with key stately-test")
            && ended.error.contains("BadSig")
            && ended.error.contains("not the one the server has"),
        "{}",
        ended.error
    );
    assert!(t.bind.log().contains("BADSIG"), "{}", t.bind.log());
    assert_eq!(t.bind.txt(RECORD), Vec::<String>::new());
    d.kill9();
}

#[tokio::test]
async fn bad_dns01_requests_are_refused_with_the_right_code_and_no_job() {
    let t = setup(false, "");
    let mut c = t.d.client().await;
    for (req, code, says) in [
        (
            issue(&["*.example.test"], ""),
            Code::InvalidArgument,
            "need DNS-01",
        ),
        (
            issue(&["*.example.test"], "tls-alpn-01"),
            Code::InvalidArgument,
            "\"http-01\" (the default) or \"dns-01\"",
        ),
        (
            issue(&["*.*.example.test"], "dns-01"),
            Code::InvalidArgument,
            "not a valid DNS name",
        ),
        (
            issue(&["example.org"], "dns-01"),
            Code::FailedPrecondition,
            "no [[dns]] zone in the daemon's configuration holds _acme-challenge.example.org (zones: example.test)",
        ),
        (
            {
                let mut r = issue(&["example.test"], "dns-01");
                if let Some(pb::job_spec::Kind::CertificateIssue(c)) =
                    r.spec.as_mut().and_then(|s| s.kind.as_mut())
                {
                    c.webroot = "/var/www".into();
                }
                r
            },
            Code::InvalidArgument,
            "give one or the other",
        ),
    ] {
        let e = c.submit_job(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().contains(says), "{}", e.message());
        assert!(e.message().len() < 300, "{}", e.message());
    }
    let jobs = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(jobs.jobs.is_empty(), "{jobs:#?}");
}

#[tokio::test]
async fn a_generic_client_issues_a_wildcard_by_dns01_knowing_the_api_only_by_reflection() {
    let t = setup(false, "");
    let mut g = crate::reflection::Generic::new(&t.d).await;
    let job = g
        .call(
            "stately.v1.Jobs",
            "SubmitJob",
            r#"{"spec": {"certificateIssue": {"names": ["*.example.test", "example.test"], "challenge": "dns-01"}}}"#,
        )
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    let mut c = t.d.client().await;
    let ended = wait_end(&mut c, &id).await;
    assert_eq!(state(&ended), pb::JobState::Succeeded, "{ended:#?}");
    assert!(t.live("fullchain").exists());
    // A wildcard without dns-01, as grpcurl would send it: INVALID_ARGUMENT.
    let e = g
        .call(
            "stately.v1.Jobs",
            "SubmitJob",
            r#"{"spec": {"certificateIssue": {"names": ["*.example.test"]}}}"#,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
}
