//! Hostile and malformed input, sent the ways a client can: each case gets the right status, a
//! short message a person can act on, and changes nothing — not the target's files, not the
//! running HAProxy, not a canary file outside every root.

use crate::support::*;
use stately::pb;
use std::path::PathBuf;
use tonic::Code;

type HaproxyClient = pb::haproxy_client::HaproxyClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// A daemon managing a real haproxy, with a secret in its environment and a canary file
/// outside every root the daemon knows.
struct Edge {
    d: Daemon,
    h: Haproxy,
    _backend: Backend,
    dir: tempfile::TempDir,
    canary: PathBuf,
}

const SECRET: &str = "s3cret-canary-value-0123";

impl Edge {
    async fn start() -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let hdir = dir.path().join("haproxy");
        std::fs::create_dir_all(&hdir).unwrap();
        let canary_dir = dir.path().join("outside");
        std::fs::create_dir_all(&canary_dir).unwrap();
        let canary = canary_dir.join("canary.txt");
        std::fs::write(&canary, "untouched\n").unwrap();
        let backend = Backend::start(0).await;
        let h = Haproxy::start(&hdir, &[("web", vec![("s1", backend.port)])]);
        let d = Daemon::start_env(
            &format!(
                "[[haproxy]]\nname = \"edge\"\nconfig = \"{}\"\nmaster_socket = \"{}\"\nstats_socket = \"{}\"\n",
                h.config.display(),
                h.dir.join("master.sock").display(),
                h.stats.display()
            ),
            &[("STATELY_CANARY_SECRET", SECRET)],
        );
        Edge {
            d,
            h,
            _backend: backend,
            dir,
            canary,
        }
    }

    async fn haproxy(&self, token: &str) -> HaproxyClient {
        pb::haproxy_client::HaproxyClient::with_interceptor(
            self.d.channel().await,
            bearer(Some(token)),
        )
    }

    fn live(&self) -> String {
        std::fs::read_to_string(&self.h.config).unwrap()
    }

    /// Nothing changed: the live file, the worker serving it, the canary, no temp files.
    fn assert_unchanged(&self, live: &str, worker: Vec<String>) {
        assert_eq!(self.live(), live, "the live file is untouched");
        assert_eq!(proxies(&self.h), worker, "HAProxy serves what it served");
        assert_eq!(
            std::fs::read_to_string(&self.canary).unwrap(),
            "untouched\n"
        );
        let left: Vec<_> = std::fs::read_dir(self.canary.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "nothing new beside the canary: {left:?}");
        let temps: Vec<_> = std::fs::read_dir(&self.h.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".stately-"))
            .collect();
        assert!(temps.is_empty(), "no candidate left: {temps:?}");
        assert!(
            !self.d.log().contains("ERROR"),
            "no error in the daemon's log:\n{}",
            self.d.log()
        );
    }
}

fn proxies(h: &Haproxy) -> Vec<String> {
    let mut p: Vec<String> = show_stat(&h.stats)
        .into_iter()
        .map(|r| r.proxy.to_string())
        .collect();
    p.dedup();
    p
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

/// A status a person can read: short, and not echoing what it was sent.
fn assert_short(s: &tonic::Status, code: Code) {
    assert_eq!(s.code(), code, "{s:?}");
    assert!(
        s.message().len() < 600,
        "a short message, not {} bytes: {}…",
        s.message().len(),
        &s.message()[..200.min(s.message().len())]
    );
    assert!(!s.message().is_empty());
}

#[tokio::test]
async fn a_config_that_would_run_lua_or_read_files_outside_the_target_is_refused() {
    let e = Edge::start().await;
    let live = e.live();
    let worker = proxies(&e.h);
    let pwned = e.canary.parent().unwrap().join("pwned");
    let lua = e.dir.path().join("evil.lua");
    std::fs::write(
        &lua,
        format!("io.open('{}', 'w'):write('ran')\n", pwned.display()),
    )
    .unwrap();
    let inject = |line: &str| live.replacen("global\n", &format!("global\n  {line}\n"), 1);
    let cases = [
        (inject(&format!("lua-load {}", lua.display())), "lua-load"),
        (inject("lua-load /etc/shadow"), "lua-load"),
        (inject("lua-prepend-path /tmp/?.lua"), "lua-prepend-path"),
        (inject("insecure-fork-wanted"), "insecure-fork-wanted"),
        (inject("setenv A b"), "setenv"),
        (
            format!(
                "{live}program p\n  command /bin/touch {}\n",
                pwned.display()
            ),
            "program",
        ),
        (
            format!(
                "{live}backend chk\n  option external-check\n  external-check command /bin/true\n"
            ),
            "external-check",
        ),
        (
            format!(
                "{live}frontend f2\n  bind 127.0.0.1:{}\n  http-request return status 200 file /etc/shadow\n",
                free_port()
            ),
            "/etc/shadow",
        ),
        (
            format!(
                "{live}frontend f3\n  bind 127.0.0.1:{}\n  acl a src -f /etc/shadow\n",
                free_port()
            ),
            "/etc/shadow",
        ),
        (
            format!(
                "{live}frontend f4\n  bind 127.0.0.1:{} ssl crt /etc/ssl/private\n",
                free_port()
            ),
            "/etc/ssl/private",
        ),
        (
            inject(&format!("pidfile {}", e.canary.display())),
            "pidfile",
        ),
    ];
    let mut h = e.haproxy(OPERATOR).await;
    let mut c = e.d.client().await;
    for (text, names) in &cases {
        let v = h
            .validate_config(pb::ValidateConfigRequest {
                target: "edge".into(),
                text: text.clone(),
            })
            .await
            .unwrap_err();
        assert_short(&v, Code::PermissionDenied);
        assert!(
            v.message().contains(names) && v.message().contains("line "),
            "names the line and what: {}",
            v.message()
        );
        assert!(!v.message().contains("root:"), "{}", v.message());
        let s = c.submit_job(apply(text, "")).await.unwrap_err();
        assert_short(&s, Code::PermissionDenied);
    }
    assert!(!pwned.exists(), "no Lua ran, no program started");
    let jobs = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(jobs.is_empty(), "no job was created: {jobs:?}");
    e.assert_unchanged(&live, worker);
}

#[tokio::test]
async fn haproxy_c_never_sees_the_daemons_environment() {
    let e = Edge::start().await;
    let live = e.live();
    let worker = proxies(&e.h);
    let text = live.replacen(
        "global\n",
        "global\n  .warning \"secret=${STATELY_CANARY_SECRET} path=${PATH}\"\n",
        1,
    );
    let v = e
        .haproxy(OPERATOR)
        .await
        .validate_config(pb::ValidateConfigRequest {
            target: "edge".into(),
            text,
        })
        .await
        .unwrap()
        .into_inner();
    let said: String = v
        .diagnostics
        .iter()
        .map(|d| d.message.clone())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(said.contains("secret="), "the warning is there: {said}");
    assert!(!said.contains(SECRET), "{said}");
    assert!(!said.contains("/usr/bin"), "{said}");
    e.assert_unchanged(&live, worker);
}

#[tokio::test]
async fn oversize_requests_are_resource_exhausted_and_the_documented_sizes_pass() {
    let e = Edge::start().await;
    let live = e.live();
    let worker = proxies(&e.h);
    let mut h = e.haproxy(OPERATOR).await;
    // Over the old 4 MiB default, under the documented 16 MiB: HAProxy gets to check it.
    let padded = format!("{live}{}", "# padding\n".repeat(600_000));
    assert!(padded.len() > 5 << 20);
    let v = h
        .validate_config(pb::ValidateConfigRequest {
            target: "edge".into(),
            text: padded.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.valid, "{:?}", v.diagnostics);
    // Over 16 MiB: refused by the decoder, RESOURCE_EXHAUSTED, not OUT_OF_RANGE.
    let huge = "#".repeat(17 << 20);
    let err = h
        .validate_config(pb::ValidateConfigRequest {
            target: "edge".into(),
            text: huge.clone(),
        })
        .await
        .unwrap_err();
    assert_short(&err, Code::ResourceExhausted);
    let mut c = e.d.client().await;
    let err = c.submit_job(apply(&huge, "")).await.unwrap_err();
    assert_short(&err, Code::ResourceExhausted);
    // Just over the limit the handler sees: still RESOURCE_EXHAUSTED.
    let over = format!("{live}{}", "#".repeat(16 << 20));
    let err = c.submit_job(apply(&over, "")).await.unwrap_err();
    assert_short(&err, Code::ResourceExhausted);
    // Other services take 1 MiB.
    let mut certs = pb::certificates_client::CertificatesClient::with_interceptor(
        e.d.channel().await,
        bearer(Some(OPERATOR)),
    );
    let err = certs
        .get_certificate(pb::GetCertificateRequest {
            name: "x".repeat(2 << 20),
        })
        .await
        .unwrap_err();
    assert_short(&err, Code::ResourceExhausted);
    e.assert_unchanged(&live, worker);
}

/// Sends raw bytes as a method's request, to see what malformed protobuf gets.
#[derive(Clone, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

#[tokio::test]
async fn malformed_protobuf_is_invalid_argument() {
    let e = Edge::start().await;
    let mut grpc = tonic::client::Grpc::new(e.d.channel().await);
    for (method, body) in [
        ("/stately.v1.Jobs/SubmitJob", vec![0xff, 0xff, 0xff, 0xff]),
        ("/stately.v1.Jobs/WatchJob", vec![0x0a, 0x7f, 0x01]),
        ("/stately.v1.Haproxy/GetConfig", vec![0x0a, 0x05]),
    ] {
        grpc.ready().await.unwrap();
        let mut req = tonic::Request::new(body);
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {OPERATOR}").parse().unwrap(),
        );
        let path = http::uri::PathAndQuery::from_static(method);
        let err = grpc.unary(req, path, Raw).await.unwrap_err();
        assert_short(&err, Code::InvalidArgument);
    }
}

#[tokio::test]
async fn huge_filters_names_and_sequence_numbers_get_clear_answers() {
    let e = Edge::start().await;
    let live = e.live();
    let worker = proxies(&e.h);
    let mut viewer = e.d.client_as(Some(VIEWER)).await;
    // 10,000 label filters: INVALID_ARGUMENT, never INTERNAL.
    let labels = (0..10_000)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    let err = viewer
        .list_jobs(pb::ListJobsRequest {
            labels,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_short(&err, Code::InvalidArgument);
    assert!(err.message().contains("at most 64"), "{}", err.message());

    // A 1 MB runbook name comes back as a short quote.
    let mut c = e.d.client().await;
    let name = "r".repeat(1 << 20);
    let err = c.submit_job(runbook(&name, &[])).await.unwrap_err();
    assert_short(&err, Code::NotFound);
    assert!(err.message().contains("1048576 bytes"), "{}", err.message());

    // A 1 MB parameter name, a 100 KB job id, a long page token and label key.
    let err = c
        .submit_job(runbook("write", &[(&"p".repeat(1 << 20), "x")]))
        .await
        .unwrap_err();
    assert_short(&err, Code::InvalidArgument);
    let err = c
        .get_job(pb::GetJobRequest {
            job_id: "z".repeat(100_000),
        })
        .await
        .unwrap_err();
    assert_short(&err, Code::InvalidArgument);
    let err = c
        .list_jobs(pb::ListJobsRequest {
            page_token: "t".repeat(100_000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_short(&err, Code::InvalidArgument);
    let mut req = runbook("noop", &[]);
    req.labels.insert("k".repeat(100_000), "v".into());
    let err = c.submit_job(req).await.unwrap_err();
    assert_short(&err, Code::InvalidArgument);
    // A NUL (or another control character) in a label value or an idempotency key: refused
    // alike on both ledgers (PostgreSQL's text would refuse it at the commit).
    let mut req = runbook("noop", &[]);
    req.labels.insert("k".into(), "a\0b".into());
    let err = c.submit_job(req).await.unwrap_err();
    assert_short(&err, Code::InvalidArgument);
    assert!(err.message().contains("control character"), "{err:?}");
    let mut req = runbook("noop", &[]);
    req.request_id = "once\0".into();
    let err = c.submit_job(req).await.unwrap_err();
    assert_short(&err, Code::InvalidArgument);

    // after_seq past i64::MAX does not wrap to "everything".
    let job = c
        .submit_job(runbook("noop", &[]))
        .await
        .unwrap()
        .into_inner();
    let done = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&done), pb::JobState::Succeeded);
    for after in [1u64 << 63, u64::MAX] {
        let mut s = c
            .watch_job(pb::WatchJobRequest {
                job_id: job.id.clone(),
                after_seq: after,
            })
            .await
            .unwrap()
            .into_inner();
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), s.message())
            .await
            .expect("the stream ends");
        assert!(
            matches!(first, Ok(None)),
            "nothing after {after}: {first:?}"
        );
    }

    // An empty target is INVALID_ARGUMENT from every service.
    let mut h = e.haproxy(VIEWER).await;
    let err = h
        .get_config(pb::GetConfigRequest {
            target: String::new(),
        })
        .await
        .unwrap_err();
    assert_short(&err, Code::InvalidArgument);
    let mut stats =
        pb::stats_client::StatsClient::with_interceptor(e.d.channel().await, bearer(Some(VIEWER)));
    let err = stats
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap_err();
    assert_short(&err, Code::InvalidArgument);
    // Many or huge stats patterns are bounded.
    let err = stats
        .get_stats(pb::GetStatsRequest {
            target: "edge".into(),
            filter: Some(pb::StatsFilter {
                proxies: (0..10_000).map(|i| format!("p{i}*")).collect(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_short(&err, Code::InvalidArgument);

    // A garbage base_version is refused at submission; no job is created.
    let before = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs
        .len();
    for garbage in [
        "latest",
        "sha256:xyz",
        &format!("sha256:{}", "A".repeat(64)),
    ] {
        let err = c.submit_job(apply(&live, garbage)).await.unwrap_err();
        assert_short(&err, Code::InvalidArgument);
        assert!(err.message().contains("base_version"), "{}", err.message());
    }
    let after = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs
        .len();
    assert_eq!(before, after);
    e.assert_unchanged(&live, worker);
}

#[tokio::test]
async fn the_health_service_names_every_service() {
    let e = Edge::start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(e.d.channel().await);
    for service in [
        "stately.v1.Jobs",
        "stately.v1.Stats",
        "stately.v1.Haproxy",
        "stately.v1.Certificates",
    ] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service}"
        );
    }
}

#[tokio::test]
async fn the_data_directory_and_the_ledger_are_private() {
    use std::os::unix::fs::PermissionsExt;
    // The SQLite ledger's files, also in the run with the ledger on PostgreSQL.
    let d = Daemon::start("[store]\n");
    let mut c = d.client().await;
    let job = c
        .submit_job(runbook("noop", &[]))
        .await
        .unwrap()
        .into_inner();
    wait_end(&mut c, &job.id).await;
    let mode = |p: PathBuf| std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(d.data()), 0o700);
    assert_eq!(mode(d.data().join("stately.db")), 0o600);
    assert_eq!(mode(d.data().join("stately.db-wal")), 0o600);
    assert_eq!(mode(d.data().join("blobs")), 0o700);

    // A data directory made with the umask by an earlier version is corrected at start.
    let mut d = d;
    d.kill9();
    std::fs::set_permissions(d.data(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        d.data().join("stately.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    d.spawn();
    assert_eq!(mode(d.data()), 0o700);
    assert_eq!(mode(d.data().join("stately.db")), 0o600);
}

#[test]
fn alerts_refuse_an_interval_that_would_silently_become_the_default() {
    let d = Daemon::start("");
    for bad in ["0s", "10ms", "2h"] {
        let out = d
            .cli()
            .args([
                "alerts",
                "start",
                "edge",
                "--to",
                "a@b.test",
                "--interval",
                bad,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("100ms and 1h"), "{err}");
    }
}

#[tokio::test]
async fn where_code_is_allowed_haproxy_c_runs_as_the_check_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    // The check user must reach the candidate and the Lua file, as it would under /etc/haproxy.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::set_permissions(&out_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let backend = Backend::start(0).await;
    let h = Haproxy::start(dir.path(), &[("web", vec![("s1", backend.port)])]);
    let probe = dir.path().join("probe.lua");
    let out = out_dir.join("ran");
    std::fs::write(
        &probe,
        format!(
            "local f = io.open('{}', 'w'); f:write('x'); f:close()\n",
            out.display()
        ),
    )
    .unwrap();
    let d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nconfig = \"{}\"\nstats_socket = \"{}\"\nallow_code = true\ncheck_user = \"nobody\"\n",
        h.config.display(),
        h.stats.display()
    ));
    let live = std::fs::read_to_string(&h.config).unwrap();
    let text = live.replacen(
        "global\n",
        &format!("global\n  lua-load {}\n", probe.display()),
        1,
    );
    let mut c = pb::haproxy_client::HaproxyClient::with_interceptor(
        d.channel().await,
        bearer(Some(OPERATOR)),
    );
    let v = c
        .validate_config(pb::ValidateConfigRequest {
            target: "edge".into(),
            text,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.valid, "{:?}", v.diagnostics);
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(
        std::fs::metadata(&out).unwrap().uid(),
        nobody.uid.as_raw(),
        "the Lua ran as nobody, not as statelyd's user"
    );
    // A Lua file outside the allowed directories is still refused.
    let err = c
        .validate_config(pb::ValidateConfigRequest {
            target: "edge".into(),
            text: live.replacen("global\n", "global\n  lua-load /tmp/x.lua\n", 1),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}
