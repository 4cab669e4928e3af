//! The `stately` CLI and `statelyd`'s own flags, run as a user would run them.

use crate::support::*;
use stately::pb;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

fn output(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn run_exits_0_on_success_and_1_when_the_job_fails() {
    let d = Daemon::start("");
    let (code, out, err) =
        output(
            d.cli()
                .args(["run", "write", "-p", "name=cli", "-p", "content=hi"]),
        );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("SUCCEEDED"), "{out}");
    assert!(out.contains("✓ step 1"), "a line per step: {out}");
    assert_eq!(
        std::fs::read_to_string(d.root().join("cli.txt")).unwrap(),
        "hi"
    );

    let (code, out, _) = output(d.cli().args(["run", "write-then-fail", "-p", "name=f"]));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAILED") && out.contains("the check says no"),
        "{out}"
    );
}

#[tokio::test]
async fn errors_are_one_readable_line_with_their_own_exit_code() {
    let d = Daemon::start("");
    let (code, out, err) = output(d.cli().args(["run", "nope"]));
    assert_eq!(code, 3);
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not found") && err.contains("nope"), "{err}");

    let (code, _, err) = output(
        d.cli()
            .env("STATELY_TOKEN", VIEWER)
            .args(["run", "write", "-p", "name=v"]),
    );
    assert_eq!(code, 3);
    assert!(err.contains("permission denied"), "{err}");

    let (code, _, err) = output(d.cli().args(["jobs", "show", "not-an-id"]));
    assert_eq!(code, 3);
    assert!(err.contains("invalid request"), "{err}");
}

#[tokio::test]
async fn detach_prints_the_id_and_jobs_commands_show_it() {
    let d = Daemon::start("");
    let (code, out, _) = output(d.cli().args([
        "run",
        "write",
        "-p",
        "name=det",
        "--detach",
        "--label",
        "team=edge",
    ]));
    assert_eq!(code, 0);
    let id = out.trim().to_owned();
    assert_eq!(id.len(), 36, "{out}");
    let (code, out, _) = output(d.cli().args(["jobs", "watch", &id]));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("SUCCEEDED"));

    let (_, out, _) = output(d.cli().args(["jobs", "list"]));
    assert!(out.lines().next().unwrap().starts_with("ID"), "{out}");
    assert!(out.contains(&id) && out.contains("SUCCEEDED"), "{out}");

    let (_, out, _) = output(
        d.cli()
            .args(["-o", "json", "jobs", "list", "--label", "team=edge"]),
    );
    let jobs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["id"], id.as_str());
    assert_eq!(jobs[0]["state"], "SUCCEEDED");

    let (_, out, _) = output(d.cli().args(["jobs", "show", &id]));
    assert!(
        out.contains("write /") && out.contains("succeeded"),
        "{out}"
    );

    let (code, out, _) = output(d.cli().args(["-o", "json", "jobs", "watch", &id]));
    assert_eq!(code, 0);
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["state_changed"]["to"], "SUCCEEDED");

    let (code, out, _) = output(d.cli().args(["jobs", "rollback", &id]));
    assert_eq!(code, 0, "{out}");
    assert!(!d.root().join("det.txt").exists());
    // It says what came back, by kind.
    assert!(
        out.contains(&format!(
            "came back — files removed: {}",
            d.root().join("det.txt").display()
        )),
        "{out}"
    );
    let (code, _, err) = output(d.cli().args(["jobs", "rollback", &id]));
    assert_eq!(code, 3);
    assert!(
        err.contains("refused") && err.contains("already rolled back"),
        "{err}"
    );
}

#[tokio::test]
async fn cancel_from_the_cli_waits_for_the_unwind() {
    let d = Daemon::start("");
    std::fs::write(d.root().join("c.txt"), "old\n").unwrap();
    let mut c = d.client().await;
    let job = c
        .submit_job(runbook("write-then-block", &[("name", "c")]))
        .await
        .unwrap()
        .into_inner();
    let mut s = c
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    until_log(&mut s, "ready").await;
    let (code, out, _) = output(
        d.cli()
            .args(["jobs", "cancel", &job.id, "--reason", "wrong key"]),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("CANCELLED"), "{out}");
    assert_eq!(
        std::fs::read_to_string(d.root().join("c.txt")).unwrap(),
        "old\n"
    );
}

#[tokio::test]
async fn ctrl_c_on_an_attached_run_cancels_the_job_and_shows_the_unwind() {
    let d = Daemon::start("");
    std::fs::write(d.root().join("i.txt"), "old\n").unwrap();
    let mut child = d
        .cli()
        .args(["run", "write-then-block", "-p", "name=i"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("ready") {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the run shows its output: {seen}"
        );
        seen.push_str(&line);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(status.code(), Some(1), "{seen}{rest}");
    assert!(
        rest.contains("CANCELLING") && rest.contains("undone") && rest.contains("CANCELLED"),
        "shows the unwind: {rest}"
    );
    assert_eq!(
        std::fs::read_to_string(d.root().join("i.txt")).unwrap(),
        "old\n"
    );
}

#[tokio::test]
async fn the_cli_reaches_the_daemon_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("stately.sock");
    let d = Daemon::start(&format!("listen_unix = \"{}\"\n", sock.display()));
    let (code, out, err) = output(
        d.cli()
            .env("STATELY_SERVER", format!("unix:{}", sock.display()))
            .args(["run", "noop"]),
    );
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn statelyd_with_no_config_writes_an_operator_token_the_cli_finds() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_statelyd"))
        .args(["--listen", "127.0.0.1:0"])
        .env("STATELY_DATA_DIR", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(daemon.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("it starts on embedded defaults")
        .to_owned();
    let token = dir.path().join("operator.token");
    let mode = std::fs::metadata(&token).unwrap().permissions().mode() & 0o777;
    let (code, out, err) = output(
        Command::new(env!("CARGO_BIN_EXE_stately"))
            .args(["jobs", "list"])
            .env("STATELY_SERVER", &addr)
            .env("STATELY_DATA_DIR", dir.path())
            .env_remove("STATELY_TOKEN"),
    );
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    assert_eq!(mode, 0o600);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.is_empty() && err.contains("no jobs yet"), "{out}{err}");
}

#[test]
fn a_bad_config_stops_statelyd_with_the_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\n\n[history]\nkeep_total = \"many\"\n",
    )
    .unwrap();
    let (code, _, err) = output(
        Command::new(env!("CARGO_BIN_EXE_statelyd"))
            .arg("--config")
            .arg(&file),
    );
    assert_eq!(code, 64);
    assert!(
        err.contains("bad.toml") && err.contains("line 4") && err.contains("keep_total"),
        "{err}"
    );

    std::fs::write(&file, "[[runbook]]\nname = \"r\"\n[[runbook.step]]\ntype = \"write_file\"\npath = \"/x/{nope}\"\ncontent = \"\"\nroots = 1\n").unwrap();
    let (code, _, err) = output(
        Command::new(env!("CARGO_BIN_EXE_statelyd"))
            .arg("--config")
            .arg(&file),
    );
    assert_eq!(code, 64, "{err}");
}

#[test]
fn print_config_prints_a_config_statelyd_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let (code, text, _) =
        output(Command::new(env!("CARGO_BIN_EXE_statelyd")).arg("--print-config"));
    assert_eq!(code, 0);
    assert!(
        text.lines().filter(|l| l.starts_with('#')).count() > 20,
        "every key is commented"
    );
    let file = dir.path().join("printed.toml");
    std::fs::write(&file, text).unwrap();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_statelyd"))
        .arg("--config")
        .arg(&file)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(daemon.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    assert!(line.starts_with("listening on 127.0.0.1:"), "{line}");
}

#[test]
fn a_closed_pipe_neither_cancels_an_attached_job_nor_hides_its_outcome() {
    use std::io::{BufRead, BufReader};
    let d = Daemon::start("");
    // `stately run chatty | head -1`: the reader goes after one line while the job still runs.
    let mut cli = d
        .cli()
        .args(["run", "chatty", "-p", "lines=40"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(cli.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    drop(out);
    let status = cli.wait().unwrap();
    assert_eq!(status.code(), Some(0), "the job's status, not a cancel");
    let list = d
        .cli()
        .args(["-o", "json", "jobs", "list", "--kind", "runbook"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("\"state\":\"SUCCEEDED\"") && !text.contains("CANCELLED"),
        "the job ran to its end: {text}"
    );

    // A failing job still exits 1 through a closed pipe.
    let mut cli = d
        .cli()
        .args(["run", "write-then-fail", "-p", "name=piped"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    drop(cli.stdout.take());
    assert_eq!(cli.wait().unwrap().code(), Some(1));
}

#[test]
fn values_the_cli_can_check_itself_are_usage_errors_exit_2() {
    let d = Daemon::start("");
    for (args, names) in [
        (vec!["jobs", "list", "--state", "bogus"], "pending, running"),
        (vec!["jobs", "list", "--kind", "bogus"], "certificate_issue"),
        (
            vec!["stats", "edge", "--type", "bogus"],
            "frontend, backend",
        ),
        (
            vec!["cert", "issue", "a.example.test", "--key-type", "ed25519"],
            "ec256",
        ),
    ] {
        let out = d.cli().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(names), "{args:?} lists what it takes: {err}");
    }
    // An interval without --watch, or below the daemon's floor, is said, not ignored.
    for args in [
        vec!["stats", "edge", "--interval", "2s"],
        vec!["stats", "edge", "--watch", "--interval", "10ms"],
    ] {
        let out = d.cli().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    // Case does not matter where the server does not mind it.
    let out = d
        .cli()
        .args(["jobs", "list", "--state", "SUCCEEDED"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing matches on a fresh daemon: said, not a bare header.
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no jobs match"));
}

#[tokio::test]
async fn ctrl_c_while_watching_says_the_job_goes_on_and_how_to_follow_it() {
    let d = Daemon::start("");
    let mut c = d.client().await;
    let job = c
        .submit_job(runbook("write-then-block", &[("name", "watched")]))
        .await
        .unwrap()
        .into_inner();
    let mut s = events(&mut c, &job.id).await;
    until_log(&mut s, "ready").await;
    let mut cli = d
        .cli()
        .args(["jobs", "watch", &job.id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once it has shown the events so far (its Ctrl-C handler is set by then), interrupt it.
    let mut out = BufReader::new(cli.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("ready") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the watch shows the log"
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cli.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = cli.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("job {} goes on", job.id))
            && err.contains(&format!("stately jobs watch {} --after", job.id)),
        "{err}"
    );
    let still = c
        .get_job(pb::GetJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&still), pb::JobState::Running, "the job goes on");
    cancel_wait(&mut c, &job.id).await;
}

#[tokio::test]
async fn job_ids_may_be_given_by_an_unambiguous_prefix_or_at_last() {
    let d = Daemon::start("");
    let mut c = d.client().await;
    let first = c
        .submit_job(runbook("noop", &[]))
        .await
        .unwrap()
        .into_inner();
    wait_end(&mut c, &first.id).await;
    let second = c
        .submit_job(runbook("noop", &[]))
        .await
        .unwrap()
        .into_inner();
    wait_end(&mut c, &second.id).await;
    let show = |arg: &str| {
        d.cli()
            .args(["-o", "json", "jobs", "show", arg])
            .output()
            .unwrap()
    };
    let out = show("@last");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&second.id));
    let prefix = &first.id[..first.id.len() - 1];
    let out = show(prefix);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&first.id));
    // Both ids begin alike (UUIDv7 ids start with the time): a short prefix is ambiguous.
    let common: usize = first
        .id
        .chars()
        .zip(second.id.chars())
        .take_while(|(a, b)| a == b)
        .count();
    assert!(common >= 4, "{} / {}", first.id, second.id);
    let out = show(&first.id[..common]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ambiguous"));
    let out = show("ffffffff");
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job id starts with"));
}

#[test]
fn runbooks_list_and_show_their_parameters_and_steps() {
    let d = Daemon::start("");
    let out = d.cli().args(["runbooks", "list"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().next().unwrap().starts_with("RUNBOOK"),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("write ")), "{text}");
    let out = d
        .cli()
        .args(["runbooks", "show", "write"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("param      name (required) must match /[a-z0-9-]+/"),
        "{text}"
    );
    assert!(
        text.contains("param      content (default \"new\\n\")"),
        "{text}"
    );
    assert!(text.contains("step 1     write_file"), "{text}");
    let out = d.cli().args(["runbooks", "show", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("runbooks: "));
}

#[test]
fn an_attached_run_follows_its_job_across_a_daemon_restart() {
    use std::io::{BufRead, BufReader, Read};
    let mut d = Daemon::configure("", &[]);
    d.args = vec!["--listen".into(), format!("127.0.0.1:{}", free_port())];
    d.spawn();
    let mut cli = d
        .cli()
        .args(["run", "chatty", "-p", "lines=120"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(cli.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("line 5") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0);
    }
    // SIGTERM: the job finishes within the grace period; the stream ends before its end.
    d.terminate();
    d.spawn();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = cli.wait().unwrap();
    let mut err = String::new();
    cli.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("reconnecting to follow it"), "{err}");
    assert_eq!(
        status.code(),
        Some(0),
        "the job's own status: {err}\n{rest}"
    );
    assert!(rest.contains("SUCCEEDED"), "{rest}");
}

#[test]
fn completions_and_the_manual_come_from_the_flags_without_a_daemon() {
    let stately = env!("CARGO_BIN_EXE_stately");
    let out = Command::new("/bin/bash")
        .args([
            "-c",
            &format!("source <({stately} completions bash) && complete -p stately"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("_stately"));
    for shell in ["zsh", "fish"] {
        let out = Command::new(stately)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("runbooks"),
            "{shell}"
        );
    }
    let out = Command::new(stately).arg("man").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(
        man.contains(".TH stately 1") && man.contains("runbooks"),
        "{man}"
    );
}

#[tokio::test]
async fn jobs_show_lists_the_undo_entries_params_and_request_id() {
    let d = Daemon::start("");
    let mut c = d.client().await;
    let mut req = runbook("write", &[("name", "shown"), ("content", "x\n")]);
    req.request_id = "show-1".into();
    let job = c.submit_job(req).await.unwrap().into_inner();
    wait_end(&mut c, &job.id).await;
    let out = d.cli().args(["jobs", "show", &job.id]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("request id show-1"), "{text}");
    assert!(
        text.contains("params     content=\"x\\n\", name=\"shown\""),
        "{text}"
    );
    let file = d.root().join("shown.txt");
    assert!(
        text.contains(&format!("  1. remove {}", file.display())),
        "{text}"
    );
    let out = d
        .cli()
        .args(["-o", "json", "jobs", "show", &job.id])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["undo"][0]["applied"], false, "{v}");
}

#[tokio::test]
async fn tables_show_local_time_with_its_offset_and_json_keeps_utc() {
    let d = Daemon::start("");
    let mut c = d.client().await;
    let job = c
        .submit_job(runbook("noop", &[]))
        .await
        .unwrap()
        .into_inner();
    wait_end(&mut c, &job.id).await;
    let out = d
        .cli()
        .env("TZ", "Asia/Tokyo")
        .args(["jobs", "list"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" +09:00"), "{text}");
    let out = d
        .cli()
        .env("TZ", "Asia/Tokyo")
        .args(["-o", "json", "jobs", "show", &job.id])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["created_at"].as_str().unwrap().ends_with('Z'), "{v}");
}

#[tokio::test]
async fn json_has_one_convention_for_enums_and_absent_values() {
    let d = Daemon::start("");
    let mut c = d.client().await;
    let job = c
        .submit_job(runbook("chatty", &[("lines", "1")]))
        .await
        .unwrap()
        .into_inner();
    wait_end(&mut c, &job.id).await;
    let out = d
        .cli()
        .args(["-o", "json", "jobs", "watch", &job.id])
        .output()
        .unwrap();
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = &events[0]["state_changed"];
    assert!(
        first["from"].is_null(),
        "no state before the first: {first}"
    );
    assert_eq!(first["to"], "PENDING");
    let log = events.iter().find(|e| e.get("log").is_some()).unwrap();
    assert_eq!(log["log"]["level"], "INFO", "{log}");
    let step = events
        .iter()
        .find(|e| e.get("step_finished").is_some())
        .unwrap();
    assert_eq!(step["step_finished"]["state"], "SUCCEEDED", "{step}");
    let out = d
        .cli()
        .args(["-o", "json", "jobs", "show", &job.id])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "SUCCEEDED");
    assert_eq!(v["steps"][0]["state"], "SUCCEEDED");
}

#[test]
fn a_stale_generated_token_is_named_with_where_it_came_from() {
    let d = Daemon::start("");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("operator.token"),
        "stale-generated-token-0000\n",
    )
    .unwrap();
    let out = d
        .cli()
        .env_remove("STATELY_TOKEN")
        .env("STATELY_DATA_DIR", dir.path())
        .args(["jobs", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not authenticated")
            && err.contains(&dir.path().join("operator.token").display().to_string())
            && err.contains("--token"),
        "{err}"
    );
    // A token file named on purpose that cannot be read says so.
    let out = d
        .cli()
        .env_remove("STATELY_TOKEN")
        .args(["--token-file", "/nonexistent/token", "jobs", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the token file /nonexistent/token") && err.contains("cannot be read"),
        "{err}"
    );
}

#[tokio::test]
async fn status_shows_the_daemon_and_exits_1_when_something_needs_attention() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::start(0).await;
    let h = Haproxy::start(dir.path(), &[("web", vec![("s1", b.port)])]);
    let gone = dir.path().join("gone.sock");
    let d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nconfig = \"{}\"\nstats_socket = \"{}\"\n",
        h.config.display(),
        h.stats.display()
    ));
    let out = d.cli().args(["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    // With no `node` configured, the node is the machine's host name.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let host = host.trim();
    assert!(
        text.contains(&format!("statelyd   0.1.0 on node {host} "))
            && text.contains("listening tcp:"),
        "{text}"
    );
    assert!(
        text.contains(&format!("data       {}", d.data().display())),
        "{text}"
    );
    assert!(
        text.contains("target     edge: config ok, stats ok"),
        "{text}"
    );
    assert!(text.contains("all well"), "{text}");

    // A target whose stats socket does not answer needs attention.
    let d2 = Daemon::start(&format!(
        "node = \"edge-7\"\n[[haproxy]]\nname = \"dark\"\nstats_socket = \"{}\"\n",
        gone.display()
    ));
    let out = d2.cli().args(["-o", "json", "status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["targets"][0]["stats"]
            .as_str()
            .unwrap()
            .starts_with("UNREACHABLE"),
        "{v}"
    );
    assert!(!v["attention"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["server"]["node"], "edge-7", "{v}");
}

/// A console line's words as a POSIX shell splits them (quotes, no expansions), up to a
/// comment or a pipe.
pub(crate) fn shell_words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut in_word, mut quote) = (false, None::<char>);
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '#') if !in_word => break,
            (None, '|') => break,
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// Every `$ stately ...` line of the README's console examples is a command this CLI takes:
/// run against a daemon that is not there, none may be a usage error (exit 2) — so a renamed
/// or removed flag breaks this test, not a reader.
#[test]
fn every_stately_command_in_the_readme_parses() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut in_console = false;
    let mut checked = 0;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_console = line == "```console";
            continue;
        }
        let Some(cmd) = line.strip_prefix("$ stately ").filter(|_| in_console) else {
            continue;
        };
        // Placeholders the README writes for a job id.
        let cmd = cmd
            .replace("<job id>", "0190f6c2")
            .replace("0192…", "0190f6c2")
            .replace("0193…", "0190f6c2")
            // Nothing leaves loopback, not even a name lookup.
            .replace("edge1.example.com:50051", "127.0.0.1:1");
        let args = shell_words(&cmd);
        let out = Command::new(env!("CARGO_BIN_EXE_stately"))
            .args(&args)
            .env("STATELY_SERVER", "127.0.0.1:1")
            .env("STATELY_TOKEN", "not-a-real-token-0123456789")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(
            out.status.code(),
            Some(2),
            "README: `stately {cmd}` is not a command this CLI takes: {stderr}"
        );
        assert!(
            !stderr.contains("Usage:"),
            "README: `stately {cmd}`: {stderr}"
        );
        checked += 1;
    }
    assert!(
        checked >= 15,
        "the README's console examples were found ({checked})"
    );
}

/// With stderr a pipe whose reader has gone, an error is still an exit status, not a panic
/// (101, as `eprintln!` does on EPIPE).
#[test]
fn a_closed_stderr_is_not_a_panic() {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{} --server 127.0.0.1:1 jobs list 2>&1 >/dev/null | (exec 0<&-; sleep 0.5); exit ${{PIPESTATUS[0]}}",
            env!("CARGO_BIN_EXE_stately")
        ))
        .env("STATELY_TOKEN", "not-a-real-token-0123456789")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
}

/// A second Ctrl-C, pressed as the first one's cancel goes out, leaves at once (130) while the
/// job is still unwinding — it is not lost between two turns of the follow loop.
#[tokio::test]
async fn a_second_ctrl_c_during_the_unwind_leaves_at_once() {
    let d = Daemon::start(
        "[[runbook]]\nname = \"slow-undo\"\n[[runbook.step]]\ntype = \"command\"\nargv = [\"true\"]\nundo = [\"sleep\", \"5\"]\n\
         [[runbook.step]]\ntype = \"command\"\nargv = [\"/bin/sh\", \"-c\", \"echo ready; exec sleep 300\"]\n",
    );
    let mut child = d
        .cli()
        .args(["run", "slow-undo"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("ready") {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "{seen}");
        seen.push_str(&line);
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let mut said = String::new();
    while !said.contains("cancelling job") {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "{said}");
        said.push_str(&line);
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let t = std::time::Instant::now();
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert_eq!(status.code(), Some(130), "{said}{rest}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(4),
        "left before the 5 s unwind ended"
    );
    assert!(rest.contains("still being cancelled"), "{rest}");
}
