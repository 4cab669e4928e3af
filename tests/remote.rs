//! Remote access: TLS and mTLS on the listener, roles by client certificate and by unix peer,
//! certificate rotation under open streams, SIGHUP reloads, the CLI over https://, and
//! `statelyd --check-config`.

use crate::reflection::Generic;
use crate::support::pki::{self, Ca, Leaf};
use crate::support::*;
use stately::pb;
use std::path::Path;
use std::time::Duration;
use tonic::Code;

/// A daemon serving TLS with a certificate from a fresh CA; `more` goes after `[tls]`'s keys.
struct TlsDaemon {
    d: Daemon,
    ca: std::path::PathBuf,
    _pki: tempfile::TempDir,
}

fn tls_daemon(tls_more: &str, tables: &str) -> TlsDaemon {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("stately test server CA");
    let ca_file = ca.write(&pki.path().join("ca.pem"));
    let server = ca.server(pki.path(), "server");
    let d = Daemon::start(&format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n{tls_more}\n{tables}\n",
        server.cert.display(),
        server.key.display()
    ));
    TlsDaemon {
        d,
        ca: ca_file,
        _pki: pki,
    }
}

async fn jobs_over(
    addr: &str,
    config: rustls::ClientConfig,
    token: Option<&str>,
) -> Result<Client, tonic::transport::Error> {
    let ch = pki::channel(addr, config).await?;
    Ok(pb::jobs_client::JobsClient::with_interceptor(
        ch,
        bearer(token),
    ))
}

/// Whether a GetStatus call gets through with this TLS client configuration and token.
async fn status_with(
    addr: &str,
    config: rustls::ClientConfig,
    token: Option<&str>,
) -> Result<(), String> {
    let mut c = jobs_over(addr, config, token)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    c.get_status(pb::GetStatusRequest {})
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[tokio::test]
async fn a_reflection_only_client_lists_describes_and_calls_over_tls() {
    let t = tls_daemon("", "");
    let ch = pki::channel(&t.d.addr, pki::client_config(&t.ca, None))
        .await
        .unwrap();
    // grpcurl -cacert ca.pem ADDR list / describe: no token needed to discover.
    let mut g = Generic::over(ch.clone(), None);
    let services = g.services().await;
    assert!(services.contains("stately.v1.Jobs"), "{services:?}");
    assert!(services.contains("grpc.health.v1.Health"), "{services:?}");
    let methods = g.methods("stately.v1.Jobs").await;
    assert!(methods.iter().any(|m| m == "WhoAmI"), "{methods:?}");
    // The health check answers without a token too.
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "stately.v1.Jobs".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status, 1, "SERVING");
    // Calls need the token; with it, a job runs and records who submitted it.
    let mut g = Generic::over(ch, Some(OPERATOR));
    let job = g
        .call(
            "stately.v1.Jobs",
            "SubmitJob",
            r#"{"spec": {"runbook": {"runbook": "noop"}}}"#,
        )
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["submittedBy"], "token:op", "{job}");
    let me = g.call("stately.v1.Jobs", "WhoAmI", "{}").await.unwrap();
    assert_eq!(me["identity"], "token:op", "{me}");
    assert_eq!(me["tls"], true, "{me}");
    assert!(
        me["peer"].as_str().unwrap().starts_with("tls:127.0.0.1:"),
        "{me}"
    );
    // Plaintext is not served: the listener speaks TLS only.
    let plain = tonic::transport::Channel::from_shared(format!("http://{}", t.d.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        let mut c = pb::jobs_client::JobsClient::with_interceptor(ch, bearer(Some(OPERATOR)));
        assert!(c.get_status(pb::GetStatusRequest {}).await.is_err());
    }
    let mut tls = jobs_over(&t.d.addr, pki::client_config(&t.ca, None), Some(OPERATOR))
        .await
        .unwrap();
    let job = wait_end(&mut tls, &id).await;
    assert_eq!(state(&job), pb::JobState::Succeeded);
    // The audit line names who did it and from where.
    assert!(
        t.d.log()
            .contains("token:op calls SubmitJob from tls:127.0.0.1:"),
        "{}",
        t.d.log()
    );
}

#[tokio::test]
async fn mtls_refuses_strangers_and_maps_certificates_to_roles() {
    let pki_dir = tempfile::tempdir().unwrap();
    let dir = pki_dir.path();
    let clients = Ca::new("stately test client CA");
    let clients_file = clients.write(&dir.join("clients-ca.pem"));
    let t = tls_daemon(
        &format!("client_ca = \"{}\"", clients_file.display()),
        "[[client_cert]]\nrole = \"operator\"\no = \"ops\"\n[[client_cert]]\nrole = \"viewer\"\ncn = \"dash\"\n",
    );
    let addr = t.d.addr.clone();
    let ops = clients.client(dir, "ops", "ci", "ops", false);
    let dash = clients.client(dir, "dash", "dash", "viewers", false);
    let nobody = clients.client(dir, "nobody", "nobody", "elsewhere", false);
    let expired = clients.client(dir, "expired", "old-ci", "ops", true);
    let stranger = Ca::new("some other CA").client(dir, "stranger", "ci", "ops", false);

    // Refused in the handshake: no certificate, another CA's, an expired one — token or not.
    for (what, leaf) in [
        ("no certificate", None),
        ("another CA", Some(&stranger)),
        ("expired", Some(&expired)),
    ] {
        let r = status_with(&addr, pki::client_config(&t.ca, leaf), Some(OPERATOR)).await;
        assert!(r.is_err(), "{what}: the call got through");
    }
    assert!(
        t.d.log().contains("a connection failed to open"),
        "{}",
        t.d.log()
    );

    // A viewer certificate reads but cannot submit.
    let mut viewer = jobs_over(&addr, pki::client_config(&t.ca, Some(&dash)), None)
        .await
        .unwrap();
    viewer
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap();
    let err = viewer.submit_job(runbook("noop", &[])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("certificate 'dash' has role Viewer"),
        "{}",
        err.message()
    );

    // An operator certificate submits; the job records it.
    let mut op = jobs_over(&addr, pki::client_config(&t.ca, Some(&ops)), None)
        .await
        .unwrap();
    let job = op
        .submit_job(runbook("noop", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.submitted_by, "cert:ci");
    let me = op
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (me.identity.as_str(), me.role.as_str(), me.via.as_str()),
        ("cert:ci", "operator", "certificate")
    );
    assert_eq!(me.certificate_o, ["ops"]);
    assert_eq!(me.certificate_san, ["ci.clients.test"]);

    // A certificate of the right CA that no rule names: not authenticated, unless a token
    // comes beside it.
    let r = status_with(&addr, pki::client_config(&t.ca, Some(&nobody)), None).await;
    let e = r.unwrap_err();
    assert!(
        e.starts_with("Unauthenticated") && e.contains("matches no [[client_cert]] rule"),
        "{e}"
    );
    status_with(
        &addr,
        pki::client_config(&t.ca, Some(&nobody)),
        Some(VIEWER),
    )
    .await
    .unwrap();

    // The CLI with the certificate and no token at all: the token statelyd generated on
    // this machine is not sent beside it (it would win, and be refused).
    let generated = dir.join("generated");
    std::fs::create_dir_all(&generated).unwrap();
    std::fs::write(
        generated.join("operator.token"),
        "not-this-daemons-token-0123\n",
    )
    .unwrap();
    let out =
        t.d.cli()
            .env_remove("STATELY_TOKEN")
            .env("STATELY_DATA_DIR", &generated)
            .args([
                "--server",
                &format!("https://127.0.0.1:{}", addr.rsplit(':').next().unwrap()),
            ])
            .arg("--cacert")
            .arg(&t.ca)
            .arg("--cert")
            .arg(&ops.cert)
            .arg("--key")
            .arg(&ops.key)
            .args(["whoami"])
            .output()
            .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("cert:ci (operator, by certificate)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("certificate CN=ci, O=ops, SAN=ci.clients.test"),
        "{stdout}"
    );

    // The client CA is replaced (the old one withdrawn): an open connection verified against
    // the old one is asked to connect again, and a new one with the old certificate fails.
    let mut open = jobs_over(&addr, pki::client_config(&t.ca, Some(&ops)), None)
        .await
        .unwrap();
    open.get_status(pb::GetStatusRequest {}).await.unwrap();
    let replacement = Ca::new("replacement client CA");
    let tmp = dir.join("clients-ca.new");
    std::fs::write(&tmp, &replacement.pem).unwrap();
    std::fs::rename(&tmp, &clients_file).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match open.get_status(pb::GetStatusRequest {}).await {
            Err(e) if e.code() == Code::Unauthenticated => {
                assert!(e.message().contains("client CA changed"), "{}", e.message());
                break;
            }
            r => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still {r:?}: {}",
                    t.d.log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let r = status_with(&addr, pki::client_config(&t.ca, Some(&ops)), None).await;
    assert!(r.is_err(), "a certificate of the withdrawn CA got through");
    let fresh = replacement.client(dir, "fresh", "ci2", "ops", false);
    status_with(&addr, pki::client_config(&t.ca, Some(&fresh)), None)
        .await
        .unwrap();
}

fn rotate(to: &Leaf, cert: &Path, key: &Path) {
    // As a renewal does: new files renamed into place, key first.
    for (from, into) in [(&to.key, key), (&to.cert, cert)] {
        let tmp = into.with_extension("new");
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, into).unwrap();
    }
}

#[tokio::test]
async fn a_rotated_certificate_serves_new_connections_and_open_streams_go_on() {
    let pki_dir = tempfile::tempdir().unwrap();
    let dir = pki_dir.path();
    let (one, two) = (Ca::new("first CA"), Ca::new("second CA"));
    let both = dir.join("both.pem");
    std::fs::write(&both, format!("{}{}", one.pem, two.pem)).unwrap();
    let first = one.server(dir, "first");
    let second = two.server(dir, "second");
    let (cert, key) = (dir.join("live.crt"), dir.join("live.key"));
    rotate(&first, &cert, &key);
    let d = Daemon::start(&format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    ));
    let der = |pem: &str| {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    };
    assert_eq!(pki::served_cert(&d.addr, &both).await, der(&first.pem));

    let mut c = jobs_over(&d.addr, pki::client_config(&both, None), Some(OPERATOR))
        .await
        .unwrap();
    let job = c
        .submit_job(runbook("write-then-block", &[("name", "rot")]))
        .await
        .unwrap()
        .into_inner();
    let mut stream = c
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    until_log(&mut stream, "ready").await;

    rotate(&second, &cert, &key);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while pki::served_cert(&d.addr, &both).await != der(&second.pem) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate is not served: {}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(d.log().contains("certificate files changed"), "{}", d.log());

    // The stream opened before the rotation still carries the job's events to its end.
    let mut other = jobs_over(&d.addr, pki::client_config(&both, None), Some(OPERATOR))
        .await
        .unwrap();
    other
        .cancel_job(pb::CancelJobRequest {
            job_id: job.id.clone(),
            reason: "rotation test".into(),
            wait: false,
        })
        .await
        .unwrap();
    let mut ended = None;
    while let Some(e) = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("the old stream goes on")
        .unwrap()
    {
        if let Some(pb::job_event::Event::StateChanged(s)) = e.event
            && s.to == pb::JobState::Cancelled as i32
        {
            ended = Some(s.to);
        }
    }
    assert_eq!(ended, Some(pb::JobState::Cancelled as i32));

    // A broken rotation (a key that does not match) keeps the working pair serving.
    std::fs::write(&key, std::fs::read(&first.key).unwrap()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !d.log().contains("the old ones still serve") {
        assert!(tokio::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pki::served_cert(&d.addr, &both).await, der(&second.pem));
}

async fn wait_status(c: &mut Client, f: impl Fn(&pb::ServerStatus) -> bool) -> pb::ServerStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let s = c
            .get_status(pb::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if f(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status never came: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hup(d: &Daemon) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid().unwrap() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
}

#[tokio::test]
async fn sighup_keeps_the_old_config_when_the_new_one_is_broken_and_takes_a_good_one() {
    let d = Daemon::start("");
    let good = std::fs::read_to_string(&d.config).unwrap();
    let mut c = d.client().await;
    let before = c
        .list_runbooks(pb::ListRunbooksRequest {})
        .await
        .unwrap()
        .into_inner();

    // A job started before the reload keeps the configuration it started with.
    let held = c
        .submit_job(runbook("write-then-block", &[("name", "held")]))
        .await
        .unwrap()
        .into_inner();
    let mut s = c
        .watch_job(pb::WatchJobRequest {
            job_id: held.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    until_log(&mut s, "ready").await;

    // A file that does not parse: the status says where, not the line (it may be a secret).
    std::fs::write(
        &d.config,
        format!("{good}\n[smtp]\nhost = \"hunter2-secret\n"),
    )
    .unwrap();
    hup(&d);
    let st = wait_status(&mut c, |s| !s.config_reload_error.is_empty()).await;
    assert!(
        st.config_reload_error.contains("line"),
        "{}",
        st.config_reload_error
    );
    assert!(
        !st.config_reload_error.contains("hunter2"),
        "{}",
        st.config_reload_error
    );

    std::fs::write(
        &d.config,
        format!("{good}\n[[runbook]]\nname = \"broken\"\n"),
    )
    .unwrap();
    hup(&d);
    let st = wait_status(&mut c, |s| s.config_reload_error.contains("has no steps")).await;
    assert!(
        st.config_reload_error.contains("has no steps"),
        "{}",
        st.config_reload_error
    );
    assert_eq!(st.config_reloads, 0);
    let still = c
        .list_runbooks(pb::ListRunbooksRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.runbooks.len(), before.runbooks.len());
    assert!(d.log().contains("the old one stays"), "{}", d.log());
    // The CLI's status says it needs attention.
    let out = d.cli().args(["status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("reload was refused"));

    // A good one: a new runbook runs at once, a new token works, the old ones still do.
    let fresh = "\n[[runbook]]\nname = \"fresh\"\n[[runbook.step]]\ntype = \"check\"\nargv = [\"/bin/true\"]\n\
                 [[token]]\nname = \"new-ci\"\nrole = \"operator\"\nvalue = \"new-ci-token-0123456789\"\n";
    std::fs::write(&d.config, format!("{good}{fresh}")).unwrap();
    hup(&d);
    let st = wait_status(&mut c, |s| s.config_reloads == 1).await;
    assert!(
        st.config_reload_error.is_empty(),
        "{}",
        st.config_reload_error
    );
    let mut ci = d.client_as(Some("new-ci-token-0123456789")).await;
    let job = ci
        .submit_job(runbook("fresh", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.submitted_by, "token:new-ci");
    assert_eq!(
        state(&wait_end(&mut ci, &job.id).await),
        pb::JobState::Succeeded
    );

    // Dropping the runbook the held job runs does not disturb it: it unwinds as planned.
    std::fs::write(
        &d.config,
        good.replace("name = \"write-then-block\"", "name = \"renamed\""),
    )
    .unwrap();
    hup(&d);
    wait_status(&mut c, |s| s.config_reloads == 2).await;
    let err = c
        .submit_job(runbook("write-then-block", &[("name", "late")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    c.cancel_job(pb::CancelJobRequest {
        job_id: held.id.clone(),
        reason: "done".into(),
        wait: true,
    })
    .await
    .unwrap();
    let held = wait_end(&mut c, &held.id).await;
    assert_eq!(state(&held), pb::JobState::Cancelled);
    assert!(
        !d.root().join("held.txt").exists(),
        "the held job's write was undone"
    );
}

#[tokio::test]
async fn a_unix_peer_gets_the_role_its_uid_maps_to() {
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("stately.sock");
    let uid = nix::unistd::getuid().as_raw();
    let d = Daemon::start(&format!(
        "listen_unix = \"{}\"\n[[unix_peer]]\nuid = {uid}\nrole = \"viewer\"\n",
        sock.display()
    ));
    let out = d
        .cli()
        .env_remove("STATELY_TOKEN")
        .env("STATELY_DATA_DIR", sock_dir.path().join("none"))
        .args(["--server", &format!("unix:{}", sock.display()), "whoami"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with(&format!("uid:{uid} (viewer, by unix peer)")),
        "{stdout}"
    );
    let out = d
        .cli()
        .env_remove("STATELY_TOKEN")
        .env("STATELY_DATA_DIR", sock_dir.path().join("none"))
        .args([
            "--server",
            &format!("unix:{}", sock.display()),
            "run",
            "noop",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("uid {uid} has role Viewer")), "{err}");
    // On TCP the uid means nothing.
    let mut anon = d.client_as(None).await;
    let e = anon
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn the_cli_speaks_tls_for_https_and_never_sends_a_token_in_clear_beyond_loopback() {
    let t = tls_daemon("", "");
    let port = t.d.addr.rsplit(':').next().unwrap().to_owned();
    let https = format!("https://127.0.0.1:{port}");
    let out =
        t.d.cli()
            .args(["--server", &https, "--cacert"])
            .arg(&t.ca)
            .args(["whoami"])
            .output()
            .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("token:op (operator, by token)"),
        "{stdout}"
    );
    assert!(stdout.contains(", TLS"), "{stdout}");
    // The scheme in any case, as URLs go.
    let out =
        t.d.cli()
            .args(["--server", &https.replace("https", "HTTPS"), "--cacert"])
            .arg(&t.ca)
            .args(["whoami"])
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // By name too, from the environment.
    let out =
        t.d.cli()
            .env("STATELY_SERVER", format!("https://localhost:{port}"))
            .env("STATELY_CACERT", &t.ca)
            .args(["jobs", "list"])
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A CA it does not know: refused, and said so.
    let out =
        t.d.cli()
            .args(["--server", &https, "whoami"])
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("UnknownIssuer"), "{err}");

    // https:// to a plaintext listener: no TLS, no token sent.
    let plain = Daemon::start("");
    let out = plain
        .cli()
        .args(["--server", &format!("https://{}", plain.addr), "whoami"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not speak TLS"), "{err}");

    // Plaintext with a token to an address beyond loopback is refused before any packet
    // (192.0.2.0/24 is TEST-NET-1: nothing answers there, and nothing is sent).
    for server in [
        "192.0.2.1:50051",
        "http://192.0.2.1:50051",
        "http://edge.example.com:50051",
    ] {
        let out = plain
            .cli()
            .args(["--server", server, "jobs", "list"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{server}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("refusing to send the token in plaintext"),
            "{err}"
        );
    }
    let out = plain
        .cli()
        .args(["--cacert", "/etc/hostname", "jobs", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // The token statelyd generated here never goes to another machine, TLS or not.
    let generated = t._pki.path().join("generated");
    std::fs::create_dir_all(&generated).unwrap();
    std::fs::write(
        generated.join("operator.token"),
        "this-machines-token-0123456\n",
    )
    .unwrap();
    let out = plain
        .cli()
        .env_remove("STATELY_TOKEN")
        .env("STATELY_DATA_DIR", &generated)
        .args(["--server", "https://192.0.2.1:50051", "jobs", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no token for a remote statelyd"), "{err}");
}

#[test]
fn the_listener_goes_beyond_loopback_only_with_tls_or_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("s.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"0.0.0.0:0\"\ndata_dir = \"{}\"\n",
            dir.path().join("d").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_statelyd"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("beyond loopback without [tls]") && err.contains("insecure = true"),
        "{err}"
    );
    // The flag is held to the same rule.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_statelyd"))
        .args(["--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // insecure = true is an explicit choice, and --check-config says what it means.
    std::fs::write(
        &config,
        format!(
            "listen = \"0.0.0.0:0\"\ninsecure = true\ndata_dir = \"{}\"\n",
            dir.path().join("d").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_statelyd"))
        .arg("--check-config")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("without TLS (insecure = true"), "{stdout}");
}

#[test]
fn check_config_says_what_it_found_and_exits_64_on_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca = Ca::new("check CA");
    let server = ca.server(root, "server");
    let dead_socket = root.join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead_socket).unwrap());
    let run = |text: &str| {
        let config = root.join("s.toml");
        std::fs::write(&config, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_statelyd"))
            .arg("--check-config")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let base = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
        root.join("data").display()
    );
    let good = format!(
        "{base}[tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[haproxy]]\nname = \"edge\"\nbinary = \"/usr/sbin/haproxy\"\nstats_socket = \"{}\"\n\
         [[runbook]]\nname = \"out\"\nroots = [\"{root}/srv\"]\n[[runbook.step]]\ntype = \"write_file\"\npath = \"/etc/elsewhere.txt\"\ncontent = \"x\"\n",
        server.cert.display(),
        server.key.display(),
        dead_socket.display(),
        root = root.display(),
    );
    let (code, out) = run(&good);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ok      [tls]"), "{out}");
    assert!(
        out.contains("ok      [[haproxy]] 'edge': binary /usr/sbin/haproxy is executable"),
        "{out}"
    );
    assert!(
        out.contains("warning [[haproxy]] 'edge': stats socket") && out.contains("does not answer"),
        "{out}"
    );
    assert!(out.contains("warning runbook 'out', step 1: the path /etc/elsewhere.txt is outside the runbook's roots"), "{out}");
    assert!(out.contains(": 0 errors, 2 warnings"), "{out}");

    // A key that is not there, a binary that is not there: errors, exit 64.
    let bad = good
        .replace(&server.key.display().to_string(), "/nonexistent/server.key")
        .replace("/usr/sbin/haproxy", "/nonexistent/haproxy");
    let (code, out) = run(&bad);
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("error   [tls] key /nonexistent/server.key"),
        "{out}"
    );
    assert!(
        out.contains("error   [[haproxy]] 'edge': binary /nonexistent/haproxy"),
        "{out}"
    );
    // A file that does not parse: the line, exit 64.
    let (code, out) = run(&format!("{base}sync = 3\n"));
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("line 3"), "{out}");
}

#[tokio::test]
async fn logs_have_no_colour_off_a_terminal_and_can_be_json() {
    let d = Daemon::start("");
    let mut c = d.client().await;
    let job = c
        .submit_job(runbook("noop", &[]))
        .await
        .unwrap()
        .into_inner();
    wait_end(&mut c, &job.id).await;
    let log = d.log();
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log file: {log:?}"
    );
    assert!(
        log.contains("token:op calls SubmitJob from tcp:127.0.0.1:"),
        "{log}"
    );

    let j = Daemon::start_env("", &[("STATELY_LOG_FORMAT", "json")]);
    let mut c = j.client().await;
    c.submit_job(runbook("noop", &[])).await.unwrap();
    let log = j.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["target"] == "stately::audit"
            && l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("token:op calls SubmitJob"))),
        "{log}"
    );
}

#[tokio::test]
async fn members_of_the_sockets_group_connect_and_get_its_role_others_cannot_connect() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    let sock_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(sock_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = sock_dir.path().join("stately.sock");
    // Debian's nobody runs with the group nogroup.
    let d = Daemon::start(&format!(
        "listen_unix = \"{}\"\nlisten_unix_group = \"nogroup\"\n[[unix_peer]]\ngroup = \"nogroup\"\nrole = \"operator\"\n",
        sock.display()
    ));
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534);
    let as_nobody = |gid: u32| {
        let mut c = d.cli();
        c.env_remove("STATELY_TOKEN")
            .env("STATELY_DATA_DIR", "/nonexistent")
            .env("HOME", "/nonexistent")
            .args(["--server", &format!("unix:{}", sock.display()), "whoami"])
            .gid(gid)
            .uid(65534);
        c.output().unwrap()
    };
    let out = as_nobody(65534);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("uid:65534 (operator, by unix peer)"),
        "{stdout}"
    );
    // The same user in another group (not a member of nogroup in the group database) is not
    // let in: the socket is the group's.
    let out = as_nobody(65533);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("permission denied"), "{err}");
}

#[test]
fn a_socket_group_that_does_not_exist_stops_the_daemon_with_exit_64() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_statelyd"))
        .arg("--config")
        .arg({
            let p = std::env::temp_dir().join(format!("stately-group-{}.toml", std::process::id()));
            std::fs::write(
                &p,
                "listen = \"127.0.0.1:0\"\nlisten_unix = \"/tmp/x.sock\"\nlisten_unix_group = \"no-such-group-here\"\n",
            )
            .unwrap();
            p
        })
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no group 'no-such-group-here'"), "{err}");
}
