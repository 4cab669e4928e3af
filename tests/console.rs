//! The web console (`console_listen`): in a real headless Chromium driven by playwright-core
//! (tests/console/console.mjs) against a real statelyd and haproxy, and the JSON API and its
//! guards over plain HTTP.

use crate::support::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long the whole browser run may take; it takes ~15 s.
const BROWSER_DEADLINE: Duration = Duration::from_secs(240);

/// The node_modules scripts/test.sh installs playwright-core into.
fn node_modules() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap().to_path_buf();
    let m = target.join("console-node/node_modules");
    assert!(
        m.join("playwright-core").exists(),
        "{} is missing: scripts/test.sh installs it (npm install playwright-core)",
        m.display()
    );
    m
}

/// statelyd with its console on `port`, a target "edge" on a haproxy with backend "web"
/// (s1, s2), and a lineage to list.
struct Edge {
    d: Daemon,
    h: Haproxy,
    backends: Vec<Backend>,
    console: String,
    _dir: tempfile::TempDir,
}

async fn edge() -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let backends = vec![Backend::start(0).await, Backend::start(0).await];
    let h = Haproxy::start(
        dir.path(),
        &[(
            "web",
            vec![("s1", backends[0].port), ("s2", backends[1].port)],
        )],
    );
    let port = free_port();
    let mut d = Daemon::configure(
        &format!(
            "node = \"edge-7\"\nconsole_listen = \"127.0.0.1:{port}\"\nconsole_hosts = [\"console.test\"]\n\
             [[haproxy]]\nname = \"edge\"\nconfig = \"{}\"\nstats_socket = \"{}\"\nmaster_socket = \"{}\"\n",
            h.config.display(),
            h.stats.display(),
            h.dir.join("master.sock").display()
        ),
        &[],
    );
    // A port kept across restarts, so the page's calls find the daemon again.
    d.args = vec!["--listen".into(), format!("127.0.0.1:{}", free_port())];
    d.spawn();
    Edge {
        d,
        h,
        backends,
        console: format!("http://127.0.0.1:{port}/"),
        _dir: dir,
    }
}

/// Answers what the browser script asks for.
async fn answer(e: &mut Edge, ask: &str) -> Result<String, String> {
    let (what, arg) = ask.split_once(' ').unwrap_or((ask, ""));
    let mut c = e.d.client().await;
    match what {
        "submit-block" => {
            std::fs::write(e.d.root().join(format!("{arg}.txt")), "old\n").unwrap();
            let job = c
                .submit_job(runbook("write-then-block", &[("name", arg)]))
                .await
                .map_err(|s| s.to_string())?
                .into_inner();
            Ok(job.id)
        }
        "submit-write" => {
            std::fs::write(e.d.root().join(format!("{arg}.txt")), "old\n").unwrap();
            let job = c
                .submit_job(runbook("write", &[("name", arg), ("content", "new\n")]))
                .await
                .map_err(|s| s.to_string())?
                .into_inner();
            let done = wait_end(&mut c, &job.id).await;
            if state(&done) != stately::pb::JobState::Succeeded {
                return Err(format!("the write job ended {:?}", state(&done)));
            }
            Ok(job.id)
        }
        "submit-chatty" => {
            let job = c
                .submit_job(runbook("chatty", &[("lines", arg)]))
                .await
                .map_err(|s| s.to_string())?
                .into_inner();
            Ok(job.id)
        }
        "restored" => {
            let path = e.d.root().join(format!("{arg}.txt"));
            match std::fs::read_to_string(&path) {
                Ok(s) if s == "old\n" => Ok(String::new()),
                other => Err(format!(
                    "{} holds {other:?}, not the old text",
                    path.display()
                )),
            }
        }
        "backend-down" => {
            let i = if arg == "s1" { 0 } else { 1 };
            e.backends[i].stop().await;
            Ok(String::new())
        }
        "restart" => {
            e.d.terminate();
            e.d.spawn();
            Ok(String::new())
        }
        "last-seq" => {
            let job = c
                .get_job(stately::pb::GetJobRequest { job_id: arg.into() })
                .await
                .map_err(|s| s.to_string())?
                .into_inner();
            Ok(job.last_seq.to_string())
        }
        "cancel" => {
            cancel_wait(&mut c, arg).await;
            Ok(String::new())
        }
        "config-has-not" => {
            let text = std::fs::read_to_string(&e.h.config).unwrap();
            if text.lines().any(|l| l.trim() == arg) {
                Err(format!("{} already has {arg:?}", e.h.config.display()))
            } else {
                Ok(String::new())
            }
        }
        "config-has" => {
            let text = std::fs::read_to_string(&e.h.config).unwrap();
            if text.lines().any(|l| l.trim() == arg) {
                Ok(String::new())
            } else {
                Err(format!("{} has no line {arg:?}", e.h.config.display()))
            }
        }
        _ => Err(format!("no such request: {ask}")),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_in_a_real_browser_shows_and_steers_jobs_servers_and_certificates() {
    let mut e = edge().await;
    let shots = screenshots();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/console.mjs");
    let mut child = Command::new("node")
        .arg(&script)
        .env("NODE_MODULES", node_modules())
        .env("CONSOLE_URL", &e.console)
        .env("OPERATOR_TOKEN", OPERATOR)
        .env("VIEWER_TOKEN", VIEWER)
        .env("SCREENSHOTS", &shots)
        .current_dir(node_modules().parent().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs (Debian's nodejs)");
    let mut stdin = child.stdin.take().unwrap();
    let (tx, lines) = mpsc::channel();
    let out = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in out.lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + BROWSER_DEADLINE;
    let mut printed = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(left) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!(
                    "the browser run was still going after {BROWSER_DEADLINE:?}:\n{printed}\n{}",
                    e.d.log()
                );
            }
        };
        printed.push_str(&line);
        printed.push('\n');
        if let Some(ask) = line.strip_prefix("ask: ") {
            let reply = match answer(&mut e, ask).await {
                Ok(v) => format!("ok {v}\n"),
                Err(why) => format!("fail {why}\n"),
            };
            stdin.write_all(reply.as_bytes()).unwrap();
        }
    }
    let status = child.wait().unwrap();
    let stderr = stderr.join().unwrap();
    assert!(
        status.success() && printed.ends_with("passed\n"),
        "{printed}\nstderr:\n{stderr}\nstatelyd:\n{}",
        e.d.log()
    );
    for shot in ["jobs", "job-running", "haproxy", "certificates"] {
        assert!(
            Path::new(&shots).join(format!("{shot}.png")).exists(),
            "screenshot {shot}"
        );
    }
    drop(e.h);
}

/// Where the screenshots go: target/console-screenshots, kept as the run's artefacts.
fn screenshots() -> String {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.ancestors().nth(3).unwrap().join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir.display().to_string()
}

/// One HTTP/1.1 request on a fresh connection; the status and the whole answer.
fn http(addr: &str, request: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

fn post(addr: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    http(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_json_api_is_the_grpc_api_with_its_roles_and_errors() {
    let port = free_port();
    let d = Daemon::start(&format!("console_listen = \"127.0.0.1:{port}\"\n"));
    let addr = format!("127.0.0.1:{port}");
    let op = format!("Authorization: Bearer {OPERATOR}\r\n");
    let viewer = format!("Authorization: Bearer {VIEWER}\r\n");

    // A job run attached streams its events as lines, the last one its end.
    let (status, answer) = post(
        &addr,
        "/api/stately.v1.Jobs/RunJob",
        &op,
        r#"{"spec": {"runbook": {"runbook": "chatty", "params": {"lines": "3"}}}}"#,
    );
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("application/x-ndjson"), "{answer}");
    assert!(answer.contains(r#""message":"line 3""#), "{answer}");
    assert!(answer.contains("JOB_STATE_SUCCEEDED"), "{answer}");
    let id = answer
        .split(r#""jobId":""#)
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_string();
    // The same job, read over gRPC.
    let mut c = d.client().await;
    let job = c
        .get_job(stately::pb::GetJobRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&job), stately::pb::JobState::Succeeded);
    assert_eq!(job.submitted_by, "token:op");

    // Errors keep their gRPC status, mapped to HTTP as grpc-gateway does.
    for (headers, path, body, want, code) in [
        (
            "",
            "/api/stately.v1.Jobs/ListJobs",
            "{}",
            401,
            "UNAUTHENTICATED",
        ),
        (
            viewer.as_str(),
            "/api/stately.v1.Jobs/RollbackJob",
            &format!(r#"{{"jobId": "{id}"}}"#) as &str,
            403,
            "PERMISSION_DENIED",
        ),
        (
            op.as_str(),
            "/api/stately.v1.Jobs/GetJob",
            r#"{"jobId": "0192d6c0-0000-7000-8000-000000000000"}"#,
            404,
            "NOT_FOUND",
        ),
        (
            op.as_str(),
            "/api/stately.v1.Jobs/GetJob",
            r#"{"jobId": 5, "x": 1}"#,
            400,
            "INVALID_ARGUMENT",
        ),
        (
            op.as_str(),
            "/api/stately.v1.Jobs/Nope",
            "{}",
            404,
            "NOT_FOUND",
        ),
        (
            op.as_str(),
            "/api/grpc.health.v1.Health/Check",
            "{}",
            404,
            "NOT_FOUND",
        ),
    ] {
        let (status, answer) = post(&addr, path, headers, body);
        assert_eq!(status, want, "{path}: {answer}");
        assert!(
            answer.contains(&format!(r#""status":"{code}""#)),
            "{answer}"
        );
    }
    // A hostile body is refused briefly, not echoed.
    let huge = format!(r#"{{"jobId": "{}"}}"#, "x".repeat(100_000));
    let (status, answer) = post(&addr, "/api/stately.v1.Jobs/GetJob", &op, &huge);
    assert_eq!(status, 400, "{}", &answer[..200]);
    assert!(
        answer.len() < 2000,
        "a short answer: {} bytes",
        answer.len()
    );
    let deep = "[".repeat(10_000);
    let (status, answer) = post(&addr, "/api/stately.v1.Jobs/GetJob", &op, &deep);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("INVALID_ARGUMENT"), "{answer}");

    // The page and its guards.
    let (status, page) = http(
        &addr,
        &format!("GET / HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 200);
    let headers = page.to_ascii_lowercase();
    assert!(
        headers.contains("content-security-policy: default-src 'none'"),
        "{page}"
    );
    assert!(headers.contains("frame-ancestors 'none'"), "{page}");
    assert!(headers.contains("x-frame-options: deny"), "{page}");
    assert!(!headers.contains("set-cookie"), "{page}");
    // DNS rebinding: a name the console does not know is refused, the API included.
    let (status, _) = http(
        &addr,
        "GET / HTTP/1.1\r\nHost: rebound.attacker.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 421);
    let (status, _) = http(
        &addr,
        &format!(
            "POST /api/stately.v1.Jobs/WhoAmI HTTP/1.1\r\nHost: rebound.attacker.example:{port}\r\n{op}Connection: close\r\nContent-Length: 2\r\n\r\n{{}}"
        ),
    );
    assert_eq!(status, 421);
    // Another site's page (a form, a fetch) is refused even with ambient credentials.
    let (status, answer) = post(
        &addr,
        "/api/stately.v1.Jobs/CancelJob",
        &format!("{op}Origin: http://attacker.example\r\n"),
        &format!(r#"{{"jobId": "{id}"}}"#),
    );
    assert_eq!(status, 403, "{answer}");
    let (status, _) = post(
        &addr,
        "/api/stately.v1.Jobs/WhoAmI",
        &format!("{op}Origin: http://{addr}\r\n"),
        "{}",
    );
    assert_eq!(status, 200);
}

#[test]
fn a_console_beyond_loopback_without_tls_is_refused_at_start() {
    let d = Daemon::configure("console_listen = \"0.0.0.0:8086\"\n", &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_statelyd"))
        .arg("--config")
        .arg(&d.config)
        .arg("--check-config")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("console_listen") && said.contains("[tls]"),
        "{said}"
    );
}
