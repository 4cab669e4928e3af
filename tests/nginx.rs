//! Certificates deployed to a real nginx (Debian's) serving TLS on loopback: the client sees
//! the new serial after a deploy and the old one after a rollback; a deploy to an nginx whose
//! configuration does not use the lineage is refused; a failed `nginx -t` and a failed reload
//! unwind, and nginx keeps serving the old certificate.

use crate::support::pebble::{Pebble, served_cert};
use crate::support::*;
use stately::pb;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::Code;

struct Web {
    _p: Pebble,
    d: Daemon,
    dir: tempfile::TempDir,
    nginx: Nginx,
}

fn live(dir: &Path) -> PathBuf {
    dir.join("le/live/example.test")
}

fn serial_of_der(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let s = cert.raw_serial();
    let s = match s {
        [0, rest @ ..] if !rest.is_empty() => rest,
        s => s,
    };
    hex::encode_upper(s)
}

fn live_serial(dir: &Path) -> String {
    let pem = std::fs::read(live(dir).join("cert.pem")).unwrap();
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    serial_of_der(&p.contents)
}

impl Web {
    async fn served(&self) -> String {
        serial_of_der(&served_cert(self.nginx.port, "example.test").await)
    }
}

fn issue(deploy: &[&str]) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::CertificateIssue(
                pb::CertificateIssueJob {
                    names: vec!["example.test".into()],
                    deploy: deploy.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                },
            )),
        }),
        ..Default::default()
    }
}

/// A first certificate issued, then nginx serving it, and statelyd knowing nginx as "web"
/// (and "other", whose configuration serves nothing of the lineage).
async fn setup() -> Web {
    let port = free_port();
    let p = Pebble::start(port);
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.conf");
    std::fs::write(
        &other,
        "events {}\nhttp { server { listen 127.0.0.1:1; } }\n",
    )
    .unwrap();
    // The nginx's config is known before it starts: the same temp dir layout.
    let placeholder = "NGINX_DIR";
    let config = format!(
        "[certificates]\nroot = \"{}\"\nhaproxy_dir = \"{}\"\ndefault_acme = \"pebble\"\nrenew_check = \"0s\"\nresponder = \"127.0.0.1:{port}\"\nchallenge_probe = \"127.0.0.1:{port}\"\n{}\n\
         [[nginx]]\nname = \"web\"\nconfig = \"{placeholder}/nginx.conf\"\npid_file = \"{placeholder}/nginx.pid\"\nverify = \"127.0.0.1:NGINX_PORT\"\nreload_timeout = \"2s\"\n\
         [[nginx]]\nname = \"other\"\nconfig = \"{}\"\npid_file = \"{}/none.pid\"\n",
        dir.path().join("le").display(),
        dir.path().join("haproxy-certs").display(),
        p.config(),
        other.display(),
        dir.path().display(),
    );
    // Issue v1 with a daemon that knows no nginx yet, then start nginx on it.
    let first = Daemon::start(&format!(
        "[certificates]\nroot = \"{}\"\nhaproxy_dir = \"{}\"\ndefault_acme = \"pebble\"\nrenew_check = \"0s\"\nresponder = \"127.0.0.1:{port}\"\nchallenge_probe = \"127.0.0.1:{port}\"\n{}",
        dir.path().join("le").display(),
        dir.path().join("haproxy-certs").display(),
        p.config(),
    ));
    let mut c = first.client().await;
    let job = c.submit_job(issue(&[])).await.unwrap().into_inner();
    assert_eq!(
        state(&wait_end(&mut c, &job.id).await),
        pb::JobState::Succeeded
    );
    drop(c);
    drop(first);
    let l = live(dir.path());
    let nginx = Nginx::start(&format!(
        "  server {{\n    listen 127.0.0.1:{{port}} ssl;\n    server_name example.test;\n    ssl_certificate {}/fullchain.pem;\n    ssl_certificate_key {}/privkey.pem;\n    location / {{ return 200 \"ok\\n\"; }}\n  }}",
        l.display(),
        l.display()
    ));
    let config = config
        .replace(placeholder, &nginx.dir.path().display().to_string())
        .replace("NGINX_PORT", &nginx.port.to_string());
    let d = Daemon::start(&config);
    Web {
        _p: p,
        d,
        dir,
        nginx,
    }
}

#[tokio::test]
async fn a_deploy_to_nginx_serves_the_new_serial_and_a_rollback_the_old_one() {
    let w = setup().await;
    let v1 = live_serial(w.dir.path());
    assert_eq!(w.served().await, v1);

    let out =
        w.d.cli()
            .args(["cert", "issue", "example.test", "--deploy", "web"])
            .output()
            .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let v2 = live_serial(w.dir.path());
    assert_ne!(v1, v2);
    assert_eq!(w.served().await, v2, "nginx serves the new certificate");
    assert!(
        said.contains(&format!("serves certificate {v2} for example.test")),
        "{said}"
    );

    let mut c = w.d.client().await;
    let jobs = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let rb = rollback(&mut c, &jobs.jobs[0].id, false).await;
    assert_eq!(state(&rb), pb::JobState::Succeeded, "{rb:#?}");
    assert_eq!(live_serial(w.dir.path()), v1);
    let logs = job_logs(&mut c, &rb.id).await;
    assert_eq!(
        w.served().await,
        v1,
        "nginx serves the old certificate again: {logs:?}"
    );
}

#[tokio::test]
async fn an_nginx_that_does_not_use_the_lineage_is_refused_at_submission() {
    let w = setup().await;
    let mut c = w.d.client().await;
    let e = c.submit_job(issue(&["other"])).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message()
            .contains("nginx target 'other' has no ssl_certificate in")
            && e.message().contains("live/example.test"),
        "{}",
        e.message()
    );
    let e = c.submit_job(issue(&["nowhere"])).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
}

#[tokio::test]
async fn a_failed_nginx_test_or_reload_unwinds_and_nginx_keeps_the_old_certificate() {
    let w = setup().await;
    let v1 = live_serial(w.dir.path());
    let conf = std::fs::read_to_string(&w.nginx.config).unwrap();
    let mut c = w.d.client().await;

    // nginx -t refuses the configuration: nothing is reloaded, the files come back.
    std::fs::write(
        &w.nginx.config,
        conf.replace(
            "access_log off;",
            "access_log off;\n  no_such_directive on;",
        ),
    )
    .unwrap();
    let job = c.submit_job(issue(&["web"])).await.unwrap().into_inner();
    let ended = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&ended), pb::JobState::Failed, "{ended:#?}");
    assert!(
        ended.error.contains("nginx -t refused") && ended.error.contains("no_such_directive"),
        "{}",
        ended.error
    );
    assert!(!ended.unwind_incomplete, "{ended:#?}");
    assert_eq!(live_serial(w.dir.path()), v1);
    assert_eq!(w.served().await, v1);

    // A reload nginx cannot make (a port already taken): no new workers, the job says so and
    // unwinds.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    std::fs::write(
        &w.nginx.config,
        conf.replace(
            "access_log off;",
            &format!("access_log off;\n  server {{ listen 127.0.0.1:{busy_port}; }}"),
        ),
    )
    .unwrap();
    let job = c.submit_job(issue(&["web"])).await.unwrap().into_inner();
    let ended = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&ended), pb::JobState::Failed, "{ended:#?}");
    assert!(
        ended.error.contains("started no new workers"),
        "{}",
        ended.error
    );
    assert!(!ended.unwind_incomplete, "{ended:#?}");
    assert_eq!(live_serial(w.dir.path()), v1);
    assert_eq!(w.served().await, v1);
    assert!(
        w.nginx.error_log().contains("Address already in use"),
        "{}",
        w.nginx.error_log()
    );
    drop(busy);
    tokio::time::sleep(Duration::from_millis(1)).await;
}
