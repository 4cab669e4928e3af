//! Structured HAProxy edits against a real master-worker haproxy, seen from real HTTP clients:
//! the redirect answers, the path is denied from outside the allow list, sessions stick, TLS
//! is served by SNI from the bundle directory, a health check with the right Host brings a
//! picky backend UP; re-applied edits change nothing; a failed check unwinds.

use crate::support::*;
use stately::pb;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

type HaproxyClient = pb::haproxy_client::HaproxyClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// A web server answering `200 <name>` to every request — or, with `host`, 404 to those whose
/// Host is not that one (as OpenLiteSpeed answers a health check that sends none).
async fn web(name: &'static str, host: Option<&'static str>) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                let ok = host.is_none_or(|h| req.contains(&format!("\r\nhost: {h}\r\n")));
                let (status, body) = if ok {
                    ("200 OK", name)
                } else {
                    ("404 Not Found", "no such site")
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

/// What a plain HTTP/1.0 GET got: the status, the head, the body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

async fn get(port: u16, path: &str, host: &str, from: IpAddr, cookie: Option<&str>) -> Answer {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let mut s = tokio::time::timeout(
        Duration::from_secs(5),
        socket.connect(SocketAddr::from(([127, 0, 0, 1], port))),
    )
    .await
    .expect("connects in time")
    .expect("haproxy listens");
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n{cookie}\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("answers in time")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Answer {
        status: head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

struct Edge {
    d: Daemon,
    h: Haproxy,
    port: u16,
    _dir: tempfile::TempDir,
}

/// statelyd managing a master-worker haproxy whose frontend `web` on `port` routes to
/// backend `app`: `backend` is the backend section's body.
fn edge(backend: &str, extra: &str) -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let h = Haproxy::from_config(
        dir.path(),
        &format!(
            "# the edge, by hand\nglobal\n  stats socket {{stats}} mode 600 level admin expose-fd listeners\n\n\
             defaults\n  mode http\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n\n\
             frontend web\n  bind 127.0.0.1:{port}\n  default_backend app # everything\n\n\
             backend app\n{backend}"
        ),
    );
    let d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nconfig = \"{}\"\nmaster_socket = \"{}\"\nstats_socket = \"{}\"\n{extra}",
        h.config.display(),
        h.dir.join("master.sock").display(),
        h.stats.display()
    ));
    Edge {
        d,
        h,
        port,
        _dir: dir,
    }
}

fn op(o: pb::haproxy_edit::Op) -> pb::HaproxyEdit {
    pb::HaproxyEdit { op: Some(o) }
}

fn force_https() -> pb::HaproxyEdit {
    op(pb::haproxy_edit::Op::ForceHttps(pb::ForceHttpsEdit {
        frontend: "web".into(),
        ..Default::default()
    }))
}

/// `/admin` on frontend web allowed from 127.0.0.1 only.
fn restrict_admin() -> pb::HaproxyEdit {
    op(pb::haproxy_edit::Op::RestrictPath(pb::RestrictPathEdit {
        frontend: "web".into(),
        path: "/admin".into(),
        allow: vec!["127.0.0.1".into()],
        status: 0,
    }))
}

fn job(edits: Vec<pb::HaproxyEdit>, replace: bool, base: &str) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::HaproxyEdit(pb::HaproxyEditJob {
                target: "edge".into(),
                edits,
                base_version: base.into(),
                replace,
                allow_servers_down: false,
            })),
        }),
        ..Default::default()
    }
}

async fn run(c: &mut Client, req: pb::SubmitJobRequest) -> pb::Job {
    let j = c.submit_job(req).await.unwrap().into_inner();
    wait_end(c, &j.id).await
}

async fn logs(c: &mut Client, id: &str) -> Vec<String> {
    job_logs(c, id).await
}

async fn haproxy_client(d: &Daemon) -> HaproxyClient {
    pb::haproxy_client::HaproxyClient::with_interceptor(d.channel().await, bearer(Some(OPERATOR)))
}

fn file_id(path: &std::path::Path) -> (u64, i64, i64) {
    let m = std::fs::metadata(path).unwrap();
    (m.ino(), m.mtime(), m.mtime_nsec())
}

#[tokio::test]
async fn force_https_redirects_plain_http_but_not_the_acme_path_and_reapplying_changes_nothing() {
    let s1 = web("s1", None).await;
    let e = edge(&format!("  server s1 127.0.0.1:{s1}\n"), "");
    let before = std::fs::read_to_string(&e.h.config).unwrap();
    let mut c = e.d.client().await;
    assert_eq!(
        get(e.port, "/", "example.test", LOCAL, None).await.status,
        200
    );

    let done = run(&mut c, job(vec![force_https()], false, "")).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{}", done.error);
    let a = get(e.port, "/shop", "example.test", LOCAL, None).await;
    assert_eq!(a.status, 301, "{}", a.head);
    assert!(
        a.head
            .to_ascii_lowercase()
            .contains("location: https://example.test/shop"),
        "{}",
        a.head
    );
    let acme = get(
        e.port,
        "/.well-known/acme-challenge/t",
        "example.test",
        LOCAL,
        None,
    )
    .await;
    assert_eq!((acme.status, acme.body.as_str()), (200, "s1"));
    // Only the one line was added; every other byte is as it was.
    let after = std::fs::read_to_string(&e.h.config).unwrap();
    assert_eq!(
        after.replacen(
            "  http-request redirect scheme https code 301 if !{ ssl_fc } !{ path_beg /.well-known/acme-challenge/ }\n",
            "",
            1
        ),
        before
    );
    let proved = logs(&mut c, &done.id).await;
    assert!(
        proved
            .iter()
            .any(|l| l.contains("answers 301") && l.contains("https://")),
        "{proved:?}"
    );

    // Again: already in effect, so no validation, no swap, no reload.
    let id = file_id(&e.h.config);
    let again = run(&mut c, job(vec![force_https()], false, "")).await;
    assert_eq!(state(&again), pb::JobState::Succeeded, "{}", again.error);
    assert_eq!(file_id(&e.h.config), id, "the file is untouched");
    let said = logs(&mut c, &again.id).await;
    assert!(said.iter().any(|l| l.starts_with("no change")), "{said:?}");
    assert!(!said.iter().any(|l| l.starts_with("reloaded")), "{said:?}");
    assert_eq!(again.undo_entries, 0);

    // A rollback of the first job takes the redirect away again.
    let back = rollback(&mut c, &done.id, false).await;
    assert_eq!(state(&back), pb::JobState::Succeeded, "{}", back.error);
    assert_eq!(std::fs::read_to_string(&e.h.config).unwrap(), before);
    assert_eq!(
        get(e.port, "/", "example.test", LOCAL, None).await.status,
        200
    );
}

/// A job queued behind another on the same target edits the file that job left, not the one
/// it was checked against at submission.
#[tokio::test]
async fn an_edit_queued_behind_another_keeps_the_first_ones_change() {
    let s1 = web("s1", None).await;
    let e = edge(&format!("  server s1 127.0.0.1:{s1}\n"), "");
    let mut c = e.d.client().await;
    let restrict = restrict_admin();
    let first = c
        .submit_job(job(vec![force_https()], false, ""))
        .await
        .unwrap()
        .into_inner();
    let second = c
        .submit_job(job(vec![restrict], false, ""))
        .await
        .unwrap()
        .into_inner();
    for id in [&first.id, &second.id] {
        let done = wait_end(&mut c, id).await;
        assert_eq!(state(&done), pb::JobState::Succeeded, "{}", done.error);
    }
    let text = std::fs::read_to_string(&e.h.config).unwrap();
    assert!(text.contains("redirect scheme https"), "{text}");
    assert!(text.contains("/admin"), "{text}");
}

#[tokio::test]
async fn a_restricted_path_is_denied_from_outside_the_allow_list_only() {
    let s1 = web("s1", None).await;
    let e = edge(&format!("  server s1 127.0.0.1:{s1}\n"), "");
    let mut c = e.d.client().await;
    let restrict = restrict_admin();
    let done = run(&mut c, job(vec![restrict], false, "")).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{}", done.error);
    assert_eq!(
        get(e.port, "/admin/x", "a.test", OTHER, None).await.status,
        403
    );
    assert_eq!(
        get(e.port, "/admin/x", "a.test", LOCAL, None).await.status,
        200
    );
    assert_eq!(
        get(e.port, "/public", "a.test", OTHER, None).await.status,
        200
    );
    let proved = logs(&mut c, &done.id).await;
    assert!(
        proved
            .iter()
            .any(|l| l.contains("from 127.0.0.2") && l.contains("403")),
        "{proved:?}"
    );
}

#[tokio::test]
async fn sessions_stick_to_the_server_their_cookie_names() {
    let (s1, s2) = (web("s1", None).await, web("s2", None).await);
    let e = edge(
        &format!("  balance roundrobin\n  server s1 127.0.0.1:{s1}\n  server s2 127.0.0.1:{s2}\n"),
        "",
    );
    let mut c = e.d.client().await;
    let sticky = op(pb::haproxy_edit::Op::StickySessions(
        pb::StickySessionsEdit {
            backend: "app".into(),
            cookie: String::new(),
        },
    ));
    let done = run(&mut c, job(vec![sticky], false, "")).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{}", done.error);
    let first = get(e.port, "/", "a.test", LOCAL, None).await;
    let set = first
        .head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie: serverid="))
        .unwrap_or_else(|| panic!("no SERVERID cookie: {}", first.head))
        .to_owned();
    let value = set["set-cookie: ".len()..]
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(value, format!("SERVERID={}", first.body));
    for _ in 0..6 {
        let a = get(e.port, "/", "a.test", LOCAL, Some(&value)).await;
        assert_eq!(a.body, first.body, "the session sticks");
    }
}

#[tokio::test]
async fn a_health_check_with_the_right_host_brings_a_picky_backend_up() {
    let s1 = web("s1", Some("www.example.test")).await;
    // The check HAProxy sends has no Host, so the backend answers 404 and is DOWN.
    let e = edge(
        &format!(
            "  option httpchk\n  http-check send meth GET uri /\n  default-server check inter 100ms fall 1 rise 1\n  server s1 127.0.0.1:{s1}\n"
        ),
        "",
    );
    let mut c = e.d.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !show_stat(&e.h.stats)
        .iter()
        .any(|r| r.server == "s1" && r.status.raw.starts_with("DOWN"))
    {
        assert!(std::time::Instant::now() < deadline, "s1 goes DOWN first");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let check = op(pb::haproxy_edit::Op::HealthCheck(pb::HealthCheckEdit {
        backend: "app".into(),
        host: "www.example.test".into(),
        ..Default::default()
    }));
    // The existing send line says otherwise: refused, naming it, unless replaced.
    let err = c
        .submit_job(job(vec![check.clone()], false, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains("http-check send meth GET uri /") && err.message().contains("line"),
        "{}",
        err.message()
    );
    let done = run(&mut c, job(vec![check], true, "")).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{}", done.error);
    let proved = logs(&mut c, &done.id).await;
    assert!(
        proved
            .iter()
            .any(|l| l.contains("every server of backend app is UP")),
        "{proved:?}"
    );
    assert!(
        std::fs::read_to_string(&e.h.config)
            .unwrap()
            .contains("  http-check send meth GET uri / hdr Host www.example.test\n")
    );
}

#[tokio::test]
async fn a_check_that_fails_after_the_reload_unwinds_to_the_old_file() {
    let s1 = web("s1", Some("www.example.test")).await;
    let e = edge(
        &format!("  default-server check inter 100ms fall 1 rise 1\n  server s1 127.0.0.1:{s1}\n"),
        "",
    );
    let before = std::fs::read_to_string(&e.h.config).unwrap();
    let mut c = e.d.client().await;
    // A Host the backend does not serve: the check fails, the servers go DOWN.
    let wrong = op(pb::haproxy_edit::Op::HealthCheck(pb::HealthCheckEdit {
        backend: "app".into(),
        host: "wrong.example.test".into(),
        ..Default::default()
    }));
    let done = run(&mut c, job(vec![wrong], false, "")).await;
    assert_eq!(state(&done), pb::JobState::Failed);
    // Seen by the verify (a server UP before is DOWN after) or by the edit's own check.
    assert!(done.error.contains("app/s1"), "{}", done.error);
    assert!(
        ["verify", "check the edits work"].contains(&done.failed_step.as_str()),
        "{}",
        done.failed_step
    );
    assert_eq!(std::fs::read_to_string(&e.h.config).unwrap(), before);
}

#[tokio::test]
async fn tls_is_served_from_the_bundle_directory_and_sni_picks_the_certificate() {
    let s1 = web("s1", None).await;
    let certs = tempfile::tempdir().unwrap();
    for name in ["a.test", "b.test"] {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(
            certs.path().join(format!("{name}.pem")),
            format!("{}{}", cert.pem(), key.serialize_pem()),
        )
        .unwrap();
    }
    let tls = free_port();
    let e = edge(
        &format!("  server s1 127.0.0.1:{s1}\n"),
        &format!(
            "allow_dirs = [\"{}\", \"/tmp\"]\n[certificates]\nhaproxy_dir = \"{}\"\n",
            certs.path().display(),
            certs.path().display()
        ),
    );
    let mut c = e.d.client().await;
    let https = op(pb::haproxy_edit::Op::HttpsFrontend(pb::HttpsFrontendEdit {
        frontend: "web".into(),
        bind: format!("127.0.0.1:{tls}"),
        ..Default::default()
    }));
    let done = run(&mut c, job(vec![https], false, "")).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{}", done.error);
    for name in ["a.test", "b.test"] {
        let der = crate::support::pebble::served_cert(tls, name).await;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|g| g.to_string())
            .collect();
        assert!(sans.iter().any(|s| s.contains(name)), "{name}: {sans:?}");
    }
}

#[tokio::test]
async fn a_preview_shows_the_diff_and_changes_nothing_and_a_stale_base_is_refused() {
    let s1 = web("s1", None).await;
    let e = edge(&format!("  server s1 127.0.0.1:{s1}\n"), "");
    let before = std::fs::read_to_string(&e.h.config).unwrap();
    let id = file_id(&e.h.config);
    let mut h = haproxy_client(&e.d).await;
    let p = h
        .preview_edits(pb::PreviewEditsRequest {
            target: "edge".into(),
            edits: vec![force_https()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(p.changed && p.valid, "{p:?}");
    assert!(
        p.diff
            .contains("+  http-request redirect scheme https code 301"),
        "{}",
        p.diff
    );
    assert_eq!(p.goes_live_by, "reload");
    assert!(p.checks.iter().any(|c| c.contains("301")), "{:?}", p.checks);
    assert_ne!(p.version, p.current_version);
    assert_eq!(std::fs::read_to_string(&e.h.config).unwrap(), before);
    assert_eq!(file_id(&e.h.config), id);

    // Two jobs made from the same preview: exactly one wins.
    let mut c = e.d.client().await;
    let first = run(&mut c, job(vec![force_https()], false, &p.current_version)).await;
    assert_eq!(state(&first), pb::JobState::Succeeded, "{}", first.error);
    let restrict = restrict_admin();
    let err = c
        .submit_job(job(vec![restrict], false, &p.current_version))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains("preview them again"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn bad_edits_get_the_right_codes_and_change_nothing() {
    let s1 = web("s1", None).await;
    let e = edge(&format!("  server s1 127.0.0.1:{s1}\n"), "");
    let before = std::fs::read_to_string(&e.h.config).unwrap();
    let mut c = e.d.client().await;
    let cases = [
        (
            op(pb::haproxy_edit::Op::ForceHttps(pb::ForceHttpsEdit {
                frontend: "nope".into(),
                ..Default::default()
            })),
            Code::NotFound,
            "frontends: web",
        ),
        (
            op(pb::haproxy_edit::Op::ForceHttps(pb::ForceHttpsEdit {
                frontend: "web\n  lua-load /x.lua".into(),
                ..Default::default()
            })),
            Code::InvalidArgument,
            "frontend name",
        ),
        (
            op(pb::haproxy_edit::Op::SetLine(pb::SetLineEdit {
                section: "global".into(),
                line: "lua-load /tmp/evil.lua".into(),
                key: String::new(),
            })),
            Code::PermissionDenied,
            "lua-load",
        ),
        (
            op(pb::haproxy_edit::Op::RestrictPath(pb::RestrictPathEdit {
                frontend: "web".into(),
                path: "/admin".into(),
                allow: vec!["999.1.1.1/8".into()],
                status: 0,
            })),
            Code::InvalidArgument,
            "CIDR",
        ),
        (
            pb::HaproxyEdit { op: None },
            Code::InvalidArgument,
            "no operation",
        ),
    ];
    for (edit, code, says) in cases {
        let err = c.submit_job(job(vec![edit], false, "")).await.unwrap_err();
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(err.message().contains(says), "{}", err.message());
        assert!(err.message().len() < 400, "{}", err.message());
    }
    assert_eq!(std::fs::read_to_string(&e.h.config).unwrap(), before);
}

#[tokio::test]
async fn a_server_added_takes_traffic_and_one_removed_does_not() {
    let (s1, s2) = (web("s1", None).await, web("s2", None).await);
    let e = edge(&format!("  server s1 127.0.0.1:{s1}\n"), "");
    let mut c = e.d.client().await;
    let add = op(pb::haproxy_edit::Op::AddServer(pb::AddServerEdit {
        backend: "app".into(),
        name: "s2".into(),
        address: format!("127.0.0.1:{s2}"),
        options: vec![],
    }));
    let remove = op(pb::haproxy_edit::Op::RemoveServer(pb::RemoveServerEdit {
        backend: "app".into(),
        name: "s1".into(),
    }));
    let done = run(&mut c, job(vec![add, remove], false, "")).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{}", done.error);
    for _ in 0..4 {
        assert_eq!(get(e.port, "/", "a.test", LOCAL, None).await.body, "s2");
    }
}

#[tokio::test]
async fn the_cli_previews_a_diff_and_runs_the_edits_in_the_order_given() {
    let s1 = web("s1", None).await;
    let e = edge(&format!("  server s1 127.0.0.1:{s1}\n"), "");
    let before = std::fs::read_to_string(&e.h.config).unwrap();
    let out =
        e.d.cli()
            .args([
                "haproxy",
                "edit",
                "edge",
                "--restrict",
                "web",
                "/admin",
                "--allow",
                "127.0.0.1",
                "--force-https",
                "web",
                "--code",
                "308",
                "--dry-run",
            ])
            .output()
            .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "+  http-request deny deny_status 403 if { path_beg /admin } !{ src 127.0.0.1 }"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("code 308"), "{stdout}");
    assert!(stdout.contains("valid: sha256:"), "{stdout}");
    assert_eq!(std::fs::read_to_string(&e.h.config).unwrap(), before);

    // A modifier before any edit flag is a usage error.
    let out =
        e.d.cli()
            .args([
                "haproxy",
                "edit",
                "edge",
                "--allow",
                "127.0.0.1",
                "--force-https",
                "web",
            ])
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow belongs to an edit"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edits.toml");
    std::fs::write(
        &file,
        "[[edit]]\nop = \"force_https\"\nfrontend = \"web\"\n\n[[edit]]\nop = \"set_line\"\nsection = \"defaults\"\nline = \"timeout client 7s\"\n",
    )
    .unwrap();
    let out =
        e.d.cli()
            .args(["haproxy", "edit", "edge", "-f"])
            .arg(&file)
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = std::fs::read_to_string(&e.h.config).unwrap();
    assert!(after.contains("  timeout client 7s\n") && !after.contains("timeout client 5s"));
    assert_eq!(get(e.port, "/", "a.test", LOCAL, None).await.status, 301);
}

#[tokio::test]
async fn a_missing_acme_route_is_caught_before_the_ca_and_route_acme_makes_issuing_work() {
    let s1 = web("s1", None).await;
    // Pebble validates HTTP-01 on port `http`, where HAProxy's frontend `web` listens; the
    // responder is elsewhere, reachable only if HAProxy routes the challenge path to it.
    let http = free_port();
    let p = crate::support::pebble::Pebble::start(http);
    let dir = tempfile::tempdir().unwrap();
    let h = Haproxy::from_config(
        dir.path(),
        &format!(
            "global\n  stats socket {{stats}} mode 600 level admin expose-fd listeners\n\
             defaults\n  mode http\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n\
             frontend web\n  bind 127.0.0.1:{http}\n  default_backend app\n\
             backend app\n  server s1 127.0.0.1:{s1}\n"
        ),
    );
    let responder = free_port();
    let d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nconfig = \"{}\"\nmaster_socket = \"{}\"\nstats_socket = \"{}\"\n\
         [certificates]\nroot = \"{}\"\ndefault_acme = \"pebble\"\nrenew_check = \"0s\"\n\
         responder = \"127.0.0.1:{responder}\"\nchallenge_probe = \"127.0.0.1:{http}\"\n{}",
        h.config.display(),
        h.dir.join("master.sock").display(),
        h.stats.display(),
        dir.path().join("le").display(),
        p.config()
    ));
    let mut c = d.client().await;
    let issue = pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::CertificateIssue(
                pb::CertificateIssueJob {
                    names: vec!["example.test".into()],
                    ..Default::default()
                },
            )),
        }),
        ..Default::default()
    };
    let failed = run(&mut c, issue.clone()).await;
    assert_eq!(state(&failed), pb::JobState::Failed);
    assert_eq!(failed.failed_step, "check the challenge path");
    assert!(
        failed.error.contains("--route-acme")
            && failed.error.contains("Nothing was asked of the CA"),
        "{}",
        failed.error
    );

    let route = op(pb::haproxy_edit::Op::RouteAcme(pb::RouteAcmeEdit {
        frontend: "web".into(),
        responder: String::new(),
    }));
    let routed = run(&mut c, job(vec![route], false, "")).await;
    assert_eq!(state(&routed), pb::JobState::Succeeded, "{}", routed.error);
    let proved = logs(&mut c, &routed.id).await;
    assert!(
        proved
            .iter()
            .any(|l| l.contains("reaches statelyd's responder")),
        "{proved:?}"
    );

    let issued = run(&mut c, issue).await;
    assert_eq!(state(&issued), pb::JobState::Succeeded, "{}", issued.error);
    assert!(
        dir.path()
            .join("le/live/example.test/fullchain.pem")
            .exists()
    );
}

/// The pid of the worker answering on the admin socket (`show info`).
fn worker_pid(stats: &std::path::Path) -> u32 {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(stats).unwrap();
    s.write_all(b"show info\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix("Pid: "))
        .and_then(|p| p.trim().parse().ok())
        .expect("show info names the pid")
}

/// A web server that takes `delay` to answer each request with `200 <name>`.
async fn slow_web(name: &'static str, delay: Duration) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                tokio::time::sleep(delay).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    name.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(name.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

fn add_server(name: &str, port: u16) -> pb::HaproxyEdit {
    op(pb::haproxy_edit::Op::AddServer(pb::AddServerEdit {
        backend: "app".into(),
        name: name.into(),
        address: format!("127.0.0.1:{port}"),
        options: vec![],
    }))
}

#[tokio::test]
async fn a_server_is_added_at_runtime_without_a_reload_and_stays_after_the_next_one() {
    let (s1, s2) = (web("s1", None).await, web("s2", None).await);
    let e = edge(
        &format!("  balance roundrobin\n  server s1 127.0.0.1:{s1}\n"),
        "",
    );
    let mut h = haproxy_client(&e.d).await;
    let p = h
        .preview_edits(pb::PreviewEditsRequest {
            target: "edge".into(),
            edits: vec![add_server("s2", s2)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.goes_live_by, "runtime", "{p:?}");
    let pid = worker_pid(&e.h.stats);
    let mut c = e.d.client().await;
    let done = run(&mut c, job(vec![add_server("s2", s2)], false, "")).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{}", done.error);
    let steps: Vec<&str> = done.steps.iter().map(|s| s.name.as_str()).collect();
    assert!(
        steps.contains(&"change servers at runtime") && !steps.contains(&"reload"),
        "{steps:?}"
    );
    assert_eq!(worker_pid(&e.h.stats), pid, "no reload");
    let said = logs(&mut c, &done.id).await;
    assert!(
        said.iter().any(|l| l
            .starts_with("haproxy -c accepts backend app with the global and defaults sections")),
        "{said:?}"
    );
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        seen.insert(get(e.port, "/", "a.test", LOCAL, None).await.body);
    }
    assert!(seen.contains("s2"), "{seen:?}");
    assert!(
        std::fs::read_to_string(&e.h.config)
            .unwrap()
            .contains(&format!("  server s2 127.0.0.1:{s2}\n"))
    );

    // A later reload keeps it: it is in the file.
    let reload = op(pb::haproxy_edit::Op::SetLine(pb::SetLineEdit {
        section: "defaults".into(),
        line: "timeout client 6s".into(),
        key: String::new(),
    }));
    let later = run(&mut c, job(vec![reload], false, "")).await;
    assert_eq!(state(&later), pb::JobState::Succeeded, "{}", later.error);
    assert_ne!(worker_pid(&e.h.stats), pid, "that one reloaded");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        seen.insert(get(e.port, "/", "a.test", LOCAL, None).await.body);
    }
    assert!(seen.contains("s2"), "{seen:?}");

    // Rolling back the addition (after the reload) takes it out at runtime again.
    let back = rollback(&mut c, &done.id, true).await;
    assert_eq!(state(&back), pb::JobState::Succeeded, "{}", back.error);
    assert!(
        !show_stat(&e.h.stats).iter().any(|r| r.server == "s2"),
        "s2 is gone"
    );
}

#[tokio::test]
async fn a_server_removed_at_runtime_is_drained_of_an_open_request_first() {
    let s1 = web("s1", None).await;
    let slow = slow_web("slow", Duration::from_millis(1500)).await;
    let e = edge(
        &format!("  balance first\n  server slow 127.0.0.1:{slow}\n  server s1 127.0.0.1:{s1}\n"),
        "",
    );
    let pid = worker_pid(&e.h.stats);
    // `balance first`: this request goes to `slow` and stays open for 1.5 s.
    let port = e.port;
    let open = tokio::spawn(async move { get(port, "/", "a.test", LOCAL, None).await });
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !show_stat(&e.h.stats)
        .iter()
        .any(|r| r.server == "slow" && r.current_sessions == Some(1))
    {
        assert!(std::time::Instant::now() < deadline, "the request is open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = e.d.client().await;
    let remove = op(pb::haproxy_edit::Op::RemoveServer(pb::RemoveServerEdit {
        backend: "app".into(),
        name: "slow".into(),
    }));
    let done = run(&mut c, job(vec![remove], false, "")).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{}", done.error);
    let answer = open.await.unwrap();
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, "slow"),
        "the open request finished"
    );
    assert_eq!(worker_pid(&e.h.stats), pid, "no reload");
    assert!(!show_stat(&e.h.stats).iter().any(|r| r.server == "slow"));
    assert_eq!(get(e.port, "/", "a.test", LOCAL, None).await.body, "s1");
    let said = logs(&mut c, &done.id).await;
    assert!(
        said.iter().any(|l| l.starts_with("draining app/slow")),
        "{said:?}"
    );
}

#[tokio::test]
async fn servers_go_live_by_reload_where_haproxy_cannot_take_them_at_runtime() {
    let (s1, s2) = (web("s1", None).await, web("s2", None).await);
    let e = edge(
        &format!("  balance static-rr\n  server s1 127.0.0.1:{s1}\n"),
        "",
    );
    let mut h = haproxy_client(&e.d).await;
    let p = h
        .preview_edits(pb::PreviewEditsRequest {
            target: "edge".into(),
            edits: vec![add_server("s2", s2)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.goes_live_by, "reload");
    assert!(
        p.notes.iter().any(|n| n.contains("static-rr")),
        "{:?}",
        p.notes
    );
    let mut c = e.d.client().await;
    let done = run(&mut c, job(vec![add_server("s2", s2)], false, "")).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{}", done.error);
    assert!(done.steps.iter().any(|s| s.name == "reload"));
}

#[tokio::test]
async fn a_deploy_to_a_target_whose_config_loads_no_bundle_is_refused_naming_the_edit() {
    let s1 = web("s1", None).await;
    let responder = free_port();
    let e = edge(
        &format!("  server s1 127.0.0.1:{s1}\n"),
        &format!("[certificates]\nresponder = \"127.0.0.1:{responder}\"\nchallenge_probe = \"\"\n"),
    );
    let mut c = e.d.client().await;
    let err = c
        .submit_job(pb::SubmitJobRequest {
            node: String::new(),
            spec: Some(pb::JobSpec {
                kind: Some(pb::job_spec::Kind::CertificateIssue(
                    pb::CertificateIssueJob {
                        names: vec!["example.test".into()],
                        deploy: vec!["edge".into()],
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains("--https-frontend") && err.message().contains("loads neither"),
        "{}",
        err.message()
    );
    let jobs = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(jobs.is_empty(), "nothing was started");
}
