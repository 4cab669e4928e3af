//! The README's walkthrough, run as a reader would: its configuration, its `stately` commands
//! (Ctrl-C where it says "press Ctrl-C here") and its grpcurl calls (made by a client that
//! knows the API only by reflection, as grpcurl does), against a real statelyd. Where the
//! README shows output, each line it shows must appear, in order, in what the command printed
//! (job ids, times, ports and the demo directory made comparable). A README change that breaks
//! an example fails this test.

use crate::cli::shell_words;
use crate::reflection::Generic;
use crate::support::{free_port, show_stat};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The fenced blocks of a section (from its heading to the next of the same level), with
/// their info string.
fn blocks(text: &str, heading: &str) -> Vec<(String, Vec<String>)> {
    // The heading as a whole line ("## Walkthrough" is not "### Walkthrough notes").
    let start = text
        .find(&format!("\n{heading}\n"))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("README has {heading}"));
    let level = heading.chars().take_while(|c| *c == '#').count();
    let mut out = Vec::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for line in text[start + heading.len()..].lines() {
        if let Some(info) = line.strip_prefix("```") {
            match current.take() {
                Some(b) => out.push(b),
                None => current = Some((info.to_owned(), Vec::new())),
            }
        } else if let Some((_, lines)) = &mut current {
            lines.push(line.to_owned());
        } else {
            let hashes = line.chars().take_while(|c| *c == '#').count();
            if hashes > 0 && hashes <= level && line.chars().nth(hashes) == Some(' ') {
                break;
            }
        }
    }
    out
}

/// How lines are made comparable: what the test's machine prints in place of what the README
/// shows (its temp directories, its ports), and whether versions and ages are wildcards (a
/// section whose files live elsewhere than the README's paths hashes to other versions).
#[derive(Clone, Default)]
struct Norm {
    replace: Vec<(String, String)>,
    loose: bool,
    /// Patterns of what the test prints, and what the README shows in their place (a client's
    /// address and port).
    patterns: Vec<(String, String)>,
}

/// A line made comparable: job ids, times and the loopback port replaced, the test's paths
/// put back as the README has them, whitespace runs collapsed.
fn normal(line: &str, norm: &Norm) -> String {
    let ids = regex::Regex::new(
        r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|019[0-9a-f]…",
    )
    .unwrap();
    let times = regex::Regex::new(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d\d:\d\d").unwrap();
    let mut l = line.to_owned();
    for (pattern, shown) in &norm.patterns {
        l = regex::Regex::new(pattern)
            .unwrap()
            .replace_all(&l, shown.as_str())
            .into_owned();
    }
    for (actual, shown) in &norm.replace {
        l = l.replace(actual, shown);
    }
    let l = ids.replace_all(&l, "<id>");
    let l = times.replace_all(&l, "<time>");
    let mut l = l.into_owned();
    if norm.loose {
        let dates = regex::Regex::new(r"\d{4}-\d\d-\d\d(T\d\d:\d\d:\d\dZ)?").unwrap();
        l = dates.replace_all(&l, "<date>").into_owned();
        let versions = regex::Regex::new(r"sha256:[0-9a-f]{64}").unwrap();
        let ages = regex::Regex::new(r"\b\d+s\b").unwrap();
        l = versions.replace_all(&l, "sha256:<v>").into_owned();
        l = ages.replace_all(&l, "<age>").into_owned();
    } else {
        let port = regex::Regex::new(r"127\.0\.0\.1:\d+").unwrap();
        l = port.replace_all(&l, "127.0.0.1:<port>").into_owned();
    }
    l.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Each line the README shows appears, in order, among what was printed ("…" in the README
/// stands for lines it leaves out).
fn shows(expected: &[String], printed: &str, norm: &Norm, cmd: &str) {
    let got: Vec<String> = printed.lines().map(|l| normal(l, norm)).collect();
    let mut at = 0;
    let annotation = regex::Regex::new(r"\s{2,}# .*$").unwrap();
    // "^C" is where the reader presses Ctrl-C; the terminal echoes it, a pipe does not.
    for e in expected
        .iter()
        .filter(|e| e.trim() != "…" && e.trim() != "^C")
    {
        // "  # what it is" after an output line is the README's note, not output.
        let e = annotation.replace(e, "").into_owned();
        let e = &e;
        let want = normal(e, norm);
        // "…" within a line stands for what varies (a serial, an order's URL).
        let parts: Vec<&str> = want.split('…').collect();
        let matches = |g: &String| {
            if parts.len() == 1 {
                return *g == want;
            }
            let mut rest = g.as_str();
            for (k, p) in parts.iter().enumerate() {
                if k == 0 {
                    let Some(r) = rest.strip_prefix(p) else {
                        return false;
                    };
                    rest = r;
                } else if k == parts.len() - 1 {
                    return rest.ends_with(p);
                } else {
                    let Some(at) = rest.find(p) else { return false };
                    rest = &rest[at + p.len()..];
                }
            }
            true
        };
        match got[at..].iter().position(matches) {
            Some(i) => at += i + 1,
            None => panic!(
                "README: `{cmd}` shows\n  {e}\nbut printed (from line {at} on):\n{}",
                got[at..].join("\n")
            ),
        }
    }
}

struct Walk {
    dir: tempfile::TempDir,
    demo: PathBuf,
    addr: String,
    child: std::process::Child,
    norm: Norm,
}

impl Drop for Walk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Walk {
    fn cli(&self, args: &[String]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_stately"));
        c.args(args)
            .env("STATELY_SERVER", &self.addr)
            .env("STATELY_DATA_DIR", self.dir.path().join("data"))
            .env_remove("STATELY_TOKEN")
            .env("TZ", "UTC");
        c
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("data/operator.token"))
            .unwrap()
            .trim()
            .to_owned()
    }
}

/// The README's configuration with the demo directory in a temp dir, on a free port, with its
/// own data directory (the generated token, as the README has it); `more` replaces the
/// README's paths and ports with the test's.
fn start(toml: &str) -> Walk {
    start_with(toml, tempfile::tempdir().unwrap(), Norm::default())
}

fn start_with(toml: &str, dir: tempfile::TempDir, mut norm: Norm) -> Walk {
    let demo = dir.path().join("demo");
    norm.replace
        .push((demo.display().to_string(), "/tmp/demo".into()));
    norm.replace.push((
        dir.path().join("data").display().to_string(),
        "/var/lib/stately".into(),
    ));
    let mut toml = toml.replace("/tmp/demo", &demo.display().to_string());
    for (actual, shown) in &norm.replace {
        toml = toml.replace(shown.as_str(), actual);
    }
    let config = dir.path().join("stately.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{}",
            dir.path().join("data").display(),
            toml
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_statelyd"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("statelyd.log")).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    Walk {
        dir,
        demo,
        addr,
        child,
        norm,
    }
}

/// Runs a command with stdout and stderr on one pipe (in the order a terminal shows them);
/// with `interrupt`, sends SIGINT once its output has a line containing it.
fn run(w: &Walk, args: &[String], interrupt: Option<&str>) -> (Option<i32>, String) {
    let (read, write) = nix::unistd::pipe().unwrap();
    let mut cmd = w.cli(args);
    cmd.stdout(Stdio::from(write.try_clone().unwrap()))
        .stderr(Stdio::from(write));
    let mut child = cmd.spawn().unwrap();
    drop(cmd); // the parent's copies of the write end, so the pipe ends with the child
    let mut reader = BufReader::new(std::fs::File::from(read));
    let mut printed = String::new();
    if let Some(marker) = interrupt {
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap() > 0 {
            let found = line.contains(marker);
            printed.push_str(&line);
            line.clear();
            if found {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGINT,
                )
                .unwrap();
                break;
            }
        }
    }
    reader.read_to_string(&mut printed).unwrap();
    let status = child.wait().unwrap();
    (status.code(), printed)
}

/// The newest job that is not a rollback: what the README's `0192…` stands for.
fn newest_job(w: &Walk) -> String {
    let (_, out) = run(
        w,
        &["-o".into(), "json".into(), "jobs".into(), "list".into()],
        None,
    );
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|j| j["kind"] != "rollback")
        .and_then(|j| j["id"].as_str().map(str::to_owned))
        .expect("a job")
}

#[tokio::test]
async fn the_walkthrough_runs_as_the_readme_shows() {
    let text = readme();
    let walk = blocks(&text, "## Walkthrough");
    let toml = &walk.iter().find(|(info, _)| info == "toml").unwrap().1;
    let w = start(&toml.join("\n"));
    std::fs::create_dir_all(&w.demo).unwrap();
    let consoles: Vec<&Vec<String>> = walk
        .iter()
        .filter(|(info, _)| info == "console")
        .map(|(_, l)| l)
        .collect();

    // The first console block: the CLI.
    let mut commands = 0;
    let lines = consoles[0];
    let mut i = 0;
    let step = regex::Regex::new(r"step \d+").unwrap();
    while i < lines.len() {
        let Some(cmd) = lines[i].strip_prefix("$ ") else {
            panic!("README: output before a command: {}", lines[i])
        };
        let mut shown = Vec::new();
        i += 1;
        while i < lines.len() && !lines[i].starts_with("$ ") {
            shown.push(lines[i].clone());
            i += 1;
        }
        if cmd.starts_with("cargo run --release --bin statelyd") {
            // Started above on the same configuration; its first line is what the README says.
            shows(&shown, &format!("listening on {}", w.addr), &w.norm, cmd);
            continue;
        }
        let Some(rest) = cmd.strip_prefix("stately ") else {
            continue; // mkdir, alias
        };
        let rest = if rest.contains("0192…") {
            rest.replace("0192…", &newest_job(&w))
        } else {
            rest.to_owned()
        };
        let args = shell_words(&rest);
        // "press Ctrl-C here" on a line the README shows: interrupt when that step starts.
        let interrupt = shown
            .iter()
            .find(|l| l.contains("# press Ctrl-C here"))
            .map(|l| step.find(l).unwrap().as_str().to_owned());
        let expected: Vec<String> = shown
            .iter()
            .filter(|l| !l.contains("# press Ctrl-C here"))
            .cloned()
            .collect();
        let (code, printed) = run(&w, &args, interrupt.as_deref());
        let ok = if interrupt.is_some() {
            Some(1)
        } else {
            Some(0)
        };
        assert_eq!(code, ok, "README: `{cmd}` exits {code:?}:\n{printed}");
        shows(&expected, &printed, &w.norm, cmd);
        if let Some((_, claim)) = cmd.split_once("# \"") {
            // A comment quoting what the command says.
            let claim = normal(claim.trim_end_matches('"'), &w.norm);
            assert!(
                printed.lines().any(|l| normal(l, &w.norm).contains(&claim)),
                "README: `{cmd}` says it prints {claim}:\n{printed}"
            );
        }
        commands += 1;
    }
    assert!(commands >= 5, "{commands} commands of the walkthrough ran");
    assert_eq!(
        std::fs::read_to_string(w.demo.join("motd")).ok(),
        None,
        "after the rollback the motd file is gone again, as before the job"
    );

    // The second: grpcurl, made by a reflection-only client.
    let grpcurl: Vec<String> = consoles[1]
        .join("\n")
        .replace("\\\n", " ")
        .lines()
        .map(str::to_owned)
        .collect();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", w.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut anonymous = Generic::over(channel.clone(), None);
    let mut with_token = Generic::over(channel, Some(&w.token()));
    let mut calls = 0;
    for line in &grpcurl {
        let Some(cmd) = line.strip_prefix("$ grpcurl ") else {
            continue;
        };
        let args = shell_words(cmd);
        let mut body = "{}".to_owned();
        let mut authed = false;
        let mut rest = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "-plaintext" => {}
                "-H" => authed = it.next().unwrap().starts_with("authorization: Bearer"),
                "-d" => body = it.next().unwrap().clone(),
                _ => rest.push(a.clone()),
            }
        }
        assert!(rest[0].starts_with("127.0.0.1:"), "{cmd}");
        let g = if authed {
            &mut with_token
        } else {
            &mut anonymous
        };
        let body = body.replace("0192…", &newest_job(&w));
        match rest[1].as_str() {
            "list" => assert!(g.services().await.contains("stately.v1.Jobs"), "{cmd}"),
            "describe" => assert!(g.methods(&rest[2]).await.iter().any(|m| m == "SubmitJob")),
            method => {
                let (service, method) = method.split_once('/').unwrap();
                if method == "WatchJob" {
                    let events = g
                        .stream(service, method, &body)
                        .await
                        .unwrap_or_else(|e| panic!("{cmd}: {e:?}"));
                    let last = events.last().map(|e| e.to_string()).unwrap_or_default();
                    // "every event, to its CANCELLED"
                    assert!(last.contains("JOB_STATE_CANCELLED"), "{cmd}: {last}");
                } else {
                    let r = g
                        .call(service, method, &body)
                        .await
                        .unwrap_or_else(|e| panic!("{cmd}: {e:?}"));
                    match method {
                        "Check" => assert_eq!(r["status"], "SERVING", "{cmd}: {r}"),
                        "CancelJob" => assert_eq!(r["state"], "JOB_STATE_CANCELLED", "{cmd}: {r}"),
                        _ => {}
                    }
                }
            }
        }
        calls += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(calls >= 6, "{calls} grpcurl calls of the README ran");
}

/// Reads a command's first line of output, then stops it (for `--watch`, which runs until
/// interrupted).
fn first_line(w: &Walk, args: &[String]) -> String {
    let mut child = w.cli(args).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    line
}

/// A HAProxy process, stopped when dropped.
struct Haproxy(std::process::Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

/// The README's HAProxy (its haproxy.cfg, with the README's paths and ports mapped to the
/// test's) running, s1 UP and s2 DOWN as the README has them.
struct Edge {
    dir: tempfile::TempDir,
    norm: Norm,
    web: u16,
    _haproxy: Haproxy,
    /// With `stoppable`: s1 as a TCP server that can be stopped (for the alert's DOWN).
    s1: Option<crate::support::Backend>,
}

fn section(text: &str, heading: &str, info: &str, n: usize) -> Vec<String> {
    blocks(text, heading)
        .into_iter()
        .filter(|(i, _)| i == info)
        .nth(n)
        .unwrap_or_else(|| panic!("README: {heading} has a {info} block"))
        .1
}

fn sha(t: &str) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(t.as_bytes())))
}

async fn edge(text: &str) -> Edge {
    edge_with(text, false).await
}

async fn edge_with(text: &str, stoppable: bool) -> Edge {
    let cfg = section(text, "### Watching HAProxy", "haproxy", 0).join("\n") + "\n";
    let dir = tempfile::tempdir().unwrap();
    let (etc, sockets) = (dir.path().join("etc"), dir.path().join("run"));
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&sockets).unwrap();
    // s1 answers HTTP (the README's "s1 answers"), or accepts TCP and can be stopped; nothing
    // listens for s2.
    let backend = if stoppable {
        Some(crate::support::Backend::start(0).await)
    } else {
        None
    };
    let s1: u16 = match &backend {
        Some(b) => b.port,
        None => crate::support::http_server(b"hello from s1\n")
            .await
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap(),
    };
    let (web, s2) = (free_port(), free_port());
    let norm = Norm {
        replace: vec![
            (etc.display().to_string(), "/etc/haproxy".into()),
            (sockets.display().to_string(), "/run/haproxy".into()),
            (format!("127.0.0.1:{web}"), "127.0.0.1:18080".into()),
            (format!("127.0.0.1:{s1}"), "127.0.0.1:18081".into()),
            (format!("127.0.0.1:{s2}"), "127.0.0.1:18082".into()),
        ],
        loose: true,
        patterns: Vec::new(),
    };
    let mut here = cfg.clone();
    for (actual, shown) in &norm.replace {
        here = here.replace(shown.as_str(), actual);
    }
    std::fs::write(etc.join("haproxy.cfg"), &here).unwrap();
    let haproxy = Haproxy(
        Command::new("/usr/sbin/haproxy")
            .arg("-W")
            .arg("-S")
            .arg(sockets.join("master.sock"))
            .arg("-f")
            .arg(etc.join("haproxy.cfg"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let settled = sockets.join("admin.sock").exists() && {
            let rows = show_stat(&sockets.join("admin.sock"));
            let st = |s: &str| {
                rows.iter()
                    .find(|r| r.proxy == "app" && r.server == s)
                    .map(|r| r.status.raw.clone())
            };
            st("s1").as_deref() == Some("UP") && st("s2").as_deref() == Some("DOWN")
        };
        if settled {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "HAProxy did not settle"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Edge {
        dir,
        norm,
        web,
        _haproxy: haproxy,
        s1: backend,
    }
}

/// Runs a console block's commands (`stately`, and grpcurl's WatchStats), checking the output
/// the README shows; `--watch` commands are read to their first line. Returns how many ran.
async fn console(w: &Walk, lines: &[String]) -> usize {
    let joined = lines.join("\n").replace("\\\n", " ");
    let lines: Vec<String> = joined.lines().map(str::to_owned).collect();
    let mut commands = 0;
    let mut i = 0;
    while i < lines.len() {
        let cmd = lines[i]
            .strip_prefix("$ ")
            .unwrap_or_else(|| panic!("README: output before a command: {}", lines[i]));
        let mut shown = Vec::new();
        i += 1;
        while i < lines.len() && !lines[i].starts_with("$ ") {
            shown.push(lines[i].clone());
            i += 1;
        }
        if let Some(rest) = cmd.strip_prefix("grpcurl ") {
            // WatchStats, as grpcurl would call it: its first update comes.
            let args = shell_words(rest);
            let body = args[args.iter().position(|a| a == "-d").unwrap() + 1].clone();
            let ch = tonic::transport::Channel::from_shared(format!("http://{}", w.addr))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut g = Generic::over(ch, Some(&w.token()));
            let (service, method) = args.last().unwrap().split_once('/').unwrap();
            let first = g.first(service, method, &body).await.unwrap();
            assert!(first.to_string().contains("s1"), "{cmd}: {first}");
            commands += 1;
            continue;
        }
        let rest = cmd.strip_prefix("stately ").expect("a stately command");
        let mut rest = if rest.contains("<job id>") {
            rest.replace("<job id>", &newest_job(w))
        } else {
            rest.to_owned()
        };
        // The README's paths and ports, as the test has them.
        for (actual, shown) in &w.norm.replace {
            rest = rest.replace(shown.as_str(), actual);
        }
        let args = shell_words(&rest);
        if args.iter().any(|a| a == "--watch") {
            let line = first_line(w, &args);
            if args.iter().any(|a| a == "json") {
                let v: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("README: `{cmd}`: {e}: {line}"));
                assert!(v.is_object(), "{cmd}: {line}");
            } else {
                assert!(!line.trim().is_empty(), "README: `{cmd}` printed nothing");
            }
            commands += 1;
            continue;
        }
        let (code, printed) = run(w, &args, None);
        if std::env::var_os("README_SHOW").is_some() {
            eprintln!("$ stately {cmd}");
            for l in printed.lines() {
                let mut l = l.to_owned();
                for (actual, shown) in &w.norm.replace {
                    l = l.replace(actual, shown);
                }
                eprintln!("{l}");
            }
        }
        assert_eq!(code, Some(0), "README: `{cmd}` exits {code:?}:\n{printed}");
        shows(&shown, &printed, &w.norm, cmd);
        commands += 1;
    }
    commands
}

// The commands block this thread while they run: s1's server needs a thread of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_haproxy_sections_run_as_the_readme_shows() {
    let text = readme();
    let cfg = section(&text, "### Watching HAProxy", "haproxy", 0).join("\n") + "\n";
    // The versions the README shows are those of its configuration.
    let dry = section(&text, "### Editing HAProxy", "console", 0);
    assert_eq!(
        dry[1],
        format!("--- edge {}", sha(&cfg)),
        "README: the version of its haproxy.cfg"
    );
    let e = edge(&text).await;
    let toml = section(&text, "### Watching HAProxy", "toml", 0).join("\n");
    let etc = e.dir.path().join("etc");
    let w = start_with(&toml, tempfile::tempdir().unwrap(), e.norm.clone());
    let mut commands = console(&w, &section(&text, "### Watching HAProxy", "console", 0)).await;
    commands += console(&w, &section(&text, "### Editing HAProxy", "console", 0)).await;
    commands += console(&w, &section(&text, "### Editing HAProxy", "console", 1)).await;
    assert!(
        commands >= 6,
        "{commands} commands of the HAProxy sections ran"
    );
    // The edit went live.
    let live = std::fs::read_to_string(etc.join("haproxy.cfg")).unwrap();
    assert!(
        live.contains("http-request redirect scheme https"),
        "{live}"
    );
    drop(e);
}

// The commands block this thread while they run: s1's server needs a thread of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificates_section_runs_as_the_readme_shows() {
    let text = readme();
    let mut e = edge(&text).await;
    // Pebble as "letsencrypt", validating through HAProxy's web frontend, 90-day certificates.
    let p = crate::support::pebble::Pebble::start_config(
        e.web,
        true,
        serde_json::json!({"certificateValidityPeriod": 7_776_000}),
    );
    let (responder, tls) = (free_port(), free_port());
    let le = e.dir.path().join("le");
    let www = e.dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let base = p.directory().trim_end_matches("/dir").to_owned();
    e.norm.replace.extend([
        (le.display().to_string(), "/etc/letsencrypt".into()),
        (www.display().to_string(), "/var/www".into()),
        (format!("127.0.0.1:{responder}"), "127.0.0.1:8402".into()),
        (format!("127.0.0.1:{tls}"), "127.0.0.1:18443".into()),
        (
            format!("{base}/my-order/"),
            "https://acme-v02.api.letsencrypt.org/acme/order/".into(),
        ),
        (
            p.directory(),
            "https://acme-v02.api.letsencrypt.org/directory".into(),
        ),
    ]);
    let toml = section(&text, "### Watching HAProxy", "toml", 0).join("\n")
        + "\n"
        + &section(&text, "### Certificates (ACME)", "toml", 0).join("\n")
        + "\nrenew_check = \"0s\"\n"
        + &p.config()
            .replace("name = \"pebble\"", "name = \"letsencrypt\"");
    let w = start_with(&toml, tempfile::tempdir().unwrap(), e.norm.clone());
    let commands = console(&w, &section(&text, "### Certificates (ACME)", "console", 0)).await;
    assert!(
        commands >= 9,
        "{commands} commands of the certificates section ran"
    );
    drop(e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alerts_section_runs_as_the_readme_shows() {
    let text = readme();
    let mut e = edge_with(&text, true).await;
    let dir = tempfile::tempdir().unwrap();
    let smtp = crate::support::SmtpSink::start(dir.path());
    // The README's relay is smtp.example.com with STARTTLS and a password; here a sink on
    // loopback stands in for it (its [smtp] table instead of the README's).
    e.norm
        .replace
        .push(("ops@example.test".into(), "ops@example.com".into()));
    let toml = section(&text, "### Watching HAProxy", "toml", 0).join("\n") + "\n" + &smtp.config();
    let w = start_with(&toml, tempfile::tempdir().unwrap(), e.norm.clone());
    let lines = section(&text, "### Alerts by mail", "console", 0);
    let mut commands = 0;
    let mut i = 0;
    while i < lines.len() {
        let cmd = lines[i]
            .strip_prefix("$ stately ")
            .expect("a stately command");
        let mut shown = Vec::new();
        i += 1;
        while i < lines.len() && !lines[i].starts_with("$ ") {
            shown.push(lines[i].clone());
            i += 1;
        }
        let mut rest = if cmd.contains("0192…") {
            cmd.replace("0192…", &newest_job(&w))
        } else {
            cmd.to_owned()
        };
        for (actual, shown) in &w.norm.replace {
            rest = rest.replace(shown.as_str(), actual);
        }
        let args = shell_words(&rest);
        let printed = if args.first().map(String::as_str) == Some("jobs")
            && args.get(1).map(String::as_str) == Some("watch")
        {
            // Watching as s1 goes down, until its mail is delivered; then Ctrl-C (which stops
            // the watching, not the job).
            let (read, write) = nix::unistd::pipe().unwrap();
            let mut c = w.cli(&args);
            c.stdout(Stdio::from(write.try_clone().unwrap()))
                .stderr(Stdio::from(write));
            let mut child = c.spawn().unwrap();
            drop(c);
            let mut reader = BufReader::new(std::fs::File::from(read));
            let mut printed = String::new();
            let mut line = String::new();
            let mut stopped = false;
            // s2 is down from the start (its alert comes first); then s1 goes down too.
            while reader.read_line(&mut line).unwrap() > 0 {
                printed.push_str(&line);
                if !stopped && line.contains("alert #1 delivered") {
                    e.s1.as_mut().unwrap().stop().await;
                    stopped = true;
                }
                let done = line.contains("alert #2 delivered");
                line.clear();
                if done {
                    break;
                }
            }
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            )
            .unwrap();
            reader.read_to_string(&mut printed).unwrap();
            child.wait().unwrap();
            printed
        } else {
            let (code, printed) = run(&w, &args, None);
            assert_eq!(code, Some(0), "README: `{cmd}` exits {code:?}:\n{printed}");
            printed
        };
        if std::env::var_os("README_SHOW").is_some() {
            eprintln!("$ stately {cmd}\n{printed}");
        }
        shows(&shown, &printed, &w.norm, cmd);
        commands += 1;
    }
    assert_eq!(commands, 4, "the alerts section's commands ran");
    let mails = smtp.wait_for(2, Duration::from_secs(10)).await;
    assert!(mails[1].contains("app/s1 DOWN"), "{}", mails[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remote_access_section_runs_as_the_readme_shows() {
    use crate::support::pki::Ca;
    let text = readme();
    let dir = tempfile::tempdir().unwrap();
    let (tls, cwd) = (dir.path().join("tls"), dir.path().join("cwd"));
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::create_dir_all(&cwd).unwrap();
    // The README's files: a server certificate for edge1.example.com (and, here, 127.0.0.1,
    // where edge1 is), a client CA, and the reader's certificate me.crt (CN=me, O=ops).
    let server_ca = Ca::new("edge CA");
    server_ca.write(&cwd.join("ca.pem"));
    let server = server_ca.server(&tls, "server");
    let clients = Ca::new("clients CA");
    clients.write(&tls.join("clients.pem"));
    let me = clients.client(&tls, "me", "me", "ops", false);
    std::fs::copy(&me.cert, cwd.join("me.crt")).unwrap();
    std::fs::copy(&me.key, cwd.join("me.key")).unwrap();
    std::fs::rename(&server.cert, tls.join("server.crt")).unwrap();
    std::fs::rename(&server.key, tls.join("server.key")).unwrap();

    // Its listen address is this machine's loopback here.
    let toml: Vec<String> = section(
        &text,
        "### Remote access: TLS, mTLS, roles by certificate",
        "toml",
        0,
    )
    .into_iter()
    .filter(|l| !l.starts_with("listen = "))
    .collect();
    let norm = Norm {
        replace: vec![
            (tls.display().to_string(), "/etc/stately/tls".into()),
            ("me.clients.test".into(), "me.clients.example.com".into()),
        ],
        loose: false,
        patterns: vec![(
            r"tls:127\.0\.0\.1:\d+".into(),
            "tls:198.51.100.7:51234".into(),
        )],
    };
    let w = start_with(&toml.join("\n"), dir, norm);
    let mut norm = w.norm.clone();
    norm.replace.extend([
        (w.addr.clone(), "edge1.example.com:50051".into()),
        (
            w.dir.path().join("stately.toml").display().to_string(),
            "/etc/stately/stately.toml".into(),
        ),
    ]);
    let lines = section(
        &text,
        "### Remote access: TLS, mTLS, roles by certificate",
        "console",
        0,
    );
    let mut env: Vec<(String, String)> = Vec::new();
    let mut commands = 0;
    let mut i = 0;
    while i < lines.len() {
        let cmd = lines[i].strip_prefix("$ ").expect("a command");
        let mut shown = Vec::new();
        i += 1;
        while i < lines.len() && !lines[i].starts_with("$ ") {
            shown.push(lines[i].clone());
            i += 1;
        }
        let mut here = cmd.to_owned();
        for (actual, shown) in &norm.replace {
            here = here.replace(shown.as_str(), actual);
        }
        let args = shell_words(&here);
        let (program, args) = args.split_first().unwrap();
        let printed = match program.as_str() {
            "export" => {
                for a in args {
                    let (k, v) = a.split_once('=').unwrap();
                    env.push((k.into(), v.into()));
                }
                continue;
            }
            "kill" => {
                // kill -HUP $(pidof statelyd): the reload takes, and status says so.
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(w.child.id() as i32),
                    nix::sys::signal::Signal::SIGHUP,
                )
                .unwrap();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let log = std::fs::read_to_string(w.dir.path().join("statelyd.log")).unwrap();
                    if log.contains("configuration reloaded") {
                        break;
                    }
                    assert!(tokio::time::Instant::now() < deadline, "{log}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                String::new()
            }
            "grpcurl" => {
                // grpcurl -cacert ca.pem -cert me.crt -key me.key ADDR list
                let leaf = crate::support::pki::Leaf {
                    cert: cwd.join("me.crt"),
                    key: cwd.join("me.key"),
                    pem: String::new(),
                };
                let config = crate::support::pki::client_config(&cwd.join("ca.pem"), Some(&leaf));
                let ch = crate::support::pki::channel(&w.addr, config).await.unwrap();
                let mut g = Generic::over(ch, None);
                assert_eq!(args.last().map(String::as_str), Some("list"), "{cmd}");
                assert!(g.services().await.contains("stately.v1.Jobs"), "{cmd}");
                String::new()
            }
            "statelyd" | "stately" => {
                let bin = if program == "statelyd" {
                    env!("CARGO_BIN_EXE_statelyd")
                } else {
                    env!("CARGO_BIN_EXE_stately")
                };
                let out = Command::new(bin)
                    .args(args)
                    .current_dir(&cwd)
                    .env("STATELY_DATA_DIR", w.dir.path().join("data"))
                    .env_remove("STATELY_TOKEN")
                    .env_remove("STATELY_SERVER")
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .output()
                    .unwrap();
                let printed = String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr);
                assert_eq!(out.status.code(), Some(0), "README: `{cmd}`:\n{printed}");
                printed
            }
            other => panic!("README: an unexpected command {other}"),
        };
        shows(&shown, &printed, &norm, cmd);
        commands += 1;
    }
    assert_eq!(commands, 5, "the remote access section's commands ran");
}

/// The web console's section: the walkthrough's runbook with the section's console settings,
/// and its curl commands run by bash as a reader would (the JSON API, a stream as NDJSON, the
/// refusals), against a real statelyd.
#[test]
fn the_console_section_runs_as_the_readme_shows() {
    let text = readme();
    let heading = "### The web console";
    let port = free_port();
    let runbook = section(&text, "## Walkthrough", "toml", 0)
        .join("\n")
        .replace("\"/bin/sleep\", \"5\"", "\"/bin/sleep\", \"1\"");
    let console = section(&text, heading, "toml", 0)
        .join("\n")
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    // The console settings are top-level keys: before the runbook's tables.
    let w = start(&format!("{console}\n{runbook}\n"));
    std::fs::create_dir_all(&w.demo).unwrap();
    let joined = section(&text, heading, "console", 0)
        .join("\n")
        .replace("\\\n", " ");
    let lines: Vec<&str> = joined.lines().collect();
    let assign = regex::Regex::new(r"^([A-Z_]+)=(.*)$").unwrap();
    let mut env: Vec<(String, String)> = Vec::new();
    let mut commands = 0;
    let mut i = 0;
    while i < lines.len() {
        let cmd = lines[i].strip_prefix("$ ").expect("a command");
        let mut shown = Vec::new();
        i += 1;
        while i < lines.len() && !lines[i].starts_with("$ ") {
            shown.push(lines[i].to_owned());
            i += 1;
        }
        let mut here = cmd.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
        for (actual, shown) in &w.norm.replace {
            here = here.replace(shown.as_str(), actual);
        }
        let script = match assign.captures(&here) {
            // NAME=$(...): kept for the commands after it, as the shell would.
            Some(c) => format!("printf %s {}", &c[2]),
            None => here.clone(),
        };
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.code(),
            Some(0),
            "README: `{cmd}`: {printed}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(c) = assign.captures(&here) {
            assert!(!printed.is_empty(), "README: `{cmd}` set nothing");
            env.push((c[1].to_owned(), printed));
        } else {
            assert!(!printed.is_empty(), "README: `{cmd}` printed nothing");
            shows(&shown, &printed, &w.norm, cmd);
        }
        commands += 1;
    }
    assert_eq!(commands, 5, "the console section's commands ran");
    // The stream ran the runbook to its end: the file it writes is there.
    assert_eq!(
        std::fs::read_to_string(w.demo.join("motd")).unwrap(),
        "hi\n"
    );
}

/// The sections the tests above run, with their console blocks: a console example added
/// elsewhere fails here until a test runs it.
#[test]
fn every_console_block_of_the_readme_is_run_by_a_test() {
    let text = readme();
    let run = [
        ("## Walkthrough", 2),
        ("### Watching HAProxy", 1),
        ("### Editing HAProxy", 2),
        ("### Certificates (ACME)", 1),
        ("### Wildcards by DNS-01 (RFC 2136)", 1),
        ("### Taking over certbot's lineages", 1),
        ("### nginx (or another server) behind HAProxy", 1),
        ("### Alerts by mail", 1),
        ("### Remote access: TLS, mTLS, roles by certificate", 1),
        ("### The web console", 1),
    ];
    // The walkthrough's own blocks, not those of its subsections.
    let own = |heading: &str| {
        blocks(&text, heading)
            .iter()
            .filter(|(i, _)| i == "console")
            .count()
    };
    let walkthrough_total = own("## Walkthrough");
    let sub: usize = run[1..].iter().map(|(_, n)| n).sum();
    assert_eq!(
        walkthrough_total,
        run[0].1 + sub,
        "console blocks under the walkthrough"
    );
    for (heading, n) in &run[1..] {
        assert_eq!(own(heading), *n, "console blocks in {heading}");
    }
    // Any fence of shell commands counts, however it is written.
    let shells = ["console", "sh", "shell", "bash", "shell-session"];
    let all = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("```"))
        .filter(|info| shells.contains(&info.trim()))
        .count();
    assert_eq!(
        all, walkthrough_total,
        "every console block is in a section a test runs"
    );
}

// The commands block this thread while they run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dns01_section_runs_as_the_readme_shows() {
    let text = readme();
    let heading = "### Wildcards by DNS-01 (RFC 2136)";
    let bind = crate::support::bind::Bind::start("example.com");
    let p = crate::support::pebble::Pebble::start_dns(free_port(), bind.addr());
    let dir = tempfile::tempdir().unwrap();
    let le = dir.path().join("le");
    let mut norm = Norm::default();
    norm.replace.extend([
        (bind.addr().to_string(), "192.0.2.53:53".into()),
        (
            bind.key_file.display().to_string(),
            "/etc/stately/tsig.key".into(),
        ),
    ]);
    // The README's zone, with the test's BIND: its NS host answers on BIND's port.
    let toml = format!(
        "[certificates]\nroot = \"{}\"\ndefault_acme = \"letsencrypt\"\nrenew_check = \"0s\"\n{}{}\nnameserver_port = {}\n",
        le.display(),
        p.config()
            .replace("name = \"pebble\"", "name = \"letsencrypt\""),
        section(&text, heading, "toml", 0).join("\n"),
        bind.port
    );
    let w = start_with(&toml, tempfile::tempdir().unwrap(), norm);
    let commands = console(&w, &section(&text, heading, "console", 0)).await;
    assert_eq!(commands, 1);
    assert!(le.join("live/example.com/fullchain.pem").exists());
    assert!(bind.txt("_acme-challenge.example.com").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adopt_section_runs_as_the_readme_shows() {
    let text = readme();
    let heading = "### Taking over certbot's lineages";
    let port = free_port();
    let p = crate::support::pebble::Pebble::start(port);
    let dir = tempfile::tempdir().unwrap();
    let le = dir.path().join("le");
    // What certbot left: example.com, then (--duplicate, as a control panel asks) its -0001
    // for the apex and www.
    let s = crate::adopt::standalone(&p);
    let s: Vec<&str> = s.iter().map(String::as_str).collect();
    crate::adopt::certbot(
        &p,
        &le,
        &[&["certonly"], &s[..], &["-d", "example.com"]].concat(),
    );
    crate::adopt::certbot(
        &p,
        &le,
        &[
            &["certonly"],
            &s[..],
            &["--duplicate", "-d", "example.com", "-d", "www.example.com"],
        ]
        .concat(),
    );
    let mut norm = Norm::default();
    norm.replace
        .push((le.display().to_string(), "/etc/letsencrypt".into()));
    let toml = format!(
        "[certificates]\nroot = \"{}\"\ndefault_acme = \"letsencrypt\"\nrenew_check = \"0s\"\nresponder = \"127.0.0.1:{port}\"\nchallenge_probe = \"127.0.0.1:{port}\"\n{}",
        le.display(),
        p.config()
            .replace("name = \"pebble\"", "name = \"letsencrypt\""),
    );
    let w = start_with(&toml, tempfile::tempdir().unwrap(), norm);
    let commands = console(&w, &section(&text, heading, "console", 0)).await;
    assert_eq!(commands, 2);
    assert!(!le.join("live/example.com-0001").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nginx_section_runs_as_the_readme_shows() {
    let text = readme();
    let heading = "### nginx (or another server) behind HAProxy";
    let port = free_port();
    let p = crate::support::pebble::Pebble::start(port);
    let dir = tempfile::tempdir().unwrap();
    let le = dir.path().join("le");
    let certificates = format!(
        "[certificates]\nroot = \"{}\"\ndefault_acme = \"letsencrypt\"\nrenew_check = \"0s\"\nresponder = \"127.0.0.1:{port}\"\nchallenge_probe = \"127.0.0.1:{port}\"\n{}",
        le.display(),
        p.config()
            .replace("name = \"pebble\"", "name = \"letsencrypt\""),
    );
    // A first version, for nginx to start on.
    {
        let w = start(&certificates);
        let (code, out) = run(
            &w,
            &[
                "cert".into(),
                "issue".into(),
                "example.com".into(),
                "www.example.com".into(),
            ],
            None,
        );
        assert_eq!(code, Some(0), "{out}");
    }
    let live = le.join("live/example.com");
    let nginx = crate::support::Nginx::start(&format!(
        "  server {{\n    listen 127.0.0.1:{{port}} ssl;\n    server_name example.com www.example.com;\n    ssl_certificate {0}/fullchain.pem;\n    ssl_certificate_key {0}/privkey.pem;\n  }}",
        live.display()
    ));
    let mut norm = Norm::default();
    norm.replace.extend([
        (
            nginx.config.display().to_string(),
            "/etc/nginx/nginx.conf".into(),
        ),
        (
            nginx.pid_file().display().to_string(),
            "/run/nginx.pid".into(),
        ),
        (format!("127.0.0.1:{}", nginx.port), "127.0.0.1:8443".into()),
    ]);
    let toml = certificates + "\n" + &section(&text, heading, "toml", 0).join("\n");
    let w = start_with(&toml, tempfile::tempdir().unwrap(), norm);
    let commands = console(&w, &section(&text, heading, "console", 0)).await;
    assert_eq!(commands, 1);
    drop(nginx);
}
