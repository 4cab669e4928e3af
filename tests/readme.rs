//! The README's walkthrough, run as a reader would: its configuration, its `stately` commands
//! (Ctrl-C where it says "press Ctrl-C here") and its grpcurl calls (made by a client that
//! knows the API only by reflection, as grpcurl does), against a real statelyd. Where the
//! README shows output, each line it shows must appear, in order, in what the command printed
//! (job ids, times, ports and the demo directory made comparable). A README change that breaks
//! an example fails this test.

use crate::cli::shell_words;
use crate::reflection::Generic;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The fenced blocks of a section (from its heading to the next of the same level), with
/// their info string.
fn blocks(text: &str, heading: &str) -> Vec<(String, Vec<String>)> {
    let start = text
        .find(heading)
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

/// A line made comparable: job ids, times, the loopback port and the demo directory replaced,
/// whitespace runs collapsed.
fn normal(line: &str, demo: &Path) -> String {
    let ids = regex::Regex::new(
        r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|019[0-9a-f]…",
    )
    .unwrap();
    let times = regex::Regex::new(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d\d:\d\d").unwrap();
    let port = regex::Regex::new(r"127\.0\.0\.1:\d+").unwrap();
    let l = line.replace(&demo.display().to_string(), "/tmp/demo");
    let l = ids.replace_all(&l, "<id>");
    let l = times.replace_all(&l, "<time>");
    let l = port.replace_all(&l, "127.0.0.1:<port>");
    l.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Each line the README shows appears, in order, among what was printed.
fn shows(expected: &[String], printed: &str, demo: &Path, cmd: &str) {
    let got: Vec<String> = printed.lines().map(|l| normal(l, demo)).collect();
    let mut at = 0;
    for e in expected {
        let want = normal(e, demo);
        match got[at..].iter().position(|g| *g == want) {
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
/// own data directory (the generated token, as the README has it).
fn start(toml: &str) -> Walk {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let config = dir.path().join("stately.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{}",
            dir.path().join("data").display(),
            toml.replace("/tmp/demo", &demo.display().to_string())
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
            shows(&shown, &format!("listening on {}", w.addr), &w.demo, cmd);
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
        shows(&expected, &printed, &w.demo, cmd);
        if let Some((_, claim)) = cmd.split_once("# \"") {
            // A comment quoting what the command says.
            let claim = normal(claim.trim_end_matches('"'), &w.demo);
            assert!(
                printed.lines().any(|l| normal(l, &w.demo).contains(&claim)),
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
