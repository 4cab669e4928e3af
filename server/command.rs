//! Runs a program for a step: no shell, a clean environment, its own process group (so a
//! cancel or a timeout kills it and everything it started), output streamed line by line.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// A program to run.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub(crate) struct Invocation {
    pub(crate) argv: Vec<String>,
    pub(crate) cwd: Option<PathBuf>,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) timeout_ms: u64,
}

/// Why a program did not succeed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} exited with {status}{}", tail_note(.tail))]
    Exit {
        program: String,
        status: String,
        tail: Vec<String>,
    },
    #[error("{program} timed out after {after:?} and was killed")]
    Timeout { program: String, after: Duration },
    #[error("cancelled; {program} was killed")]
    Cancelled { program: String },
}

fn tail_note(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!(": {}", tail.join(" | "))
    }
}

/// Which stream a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// What a running program reports.
#[derive(Debug)]
pub(crate) enum Output {
    /// It started, as this process group.
    Spawned(i32),
    /// A line of its output.
    Line(Stream, String),
}

/// Lines of output reported per run at most; the rest are counted.
const MAX_LINES: usize = 1000;

impl Invocation {
    /// Runs to completion, calling `on_line` for each output line. On `cancel` or timeout the
    /// whole process group is killed and reaped before this returns.
    pub(crate) async fn run(
        &self,
        cancel: &CancellationToken,
        mut on_line: impl FnMut(Stream, String),
    ) -> Result<(), Error> {
        self.run_tracked(cancel, |event| {
            if let Output::Line(stream, line) = event {
                on_line(stream, line)
            }
        })
        .await
    }

    /// Like `run`, also reporting the process group (the child's pid) once it exists, so a
    /// restart after a crash can find a command that outlived the daemon.
    pub(crate) async fn run_tracked(
        &self,
        cancel: &CancellationToken,
        mut on_event: impl FnMut(Output),
    ) -> Result<(), Error> {
        let program = self.argv.first().cloned().unwrap_or_default();
        let mut cmd = Command::new(&program);
        cmd.args(&self.argv[1..])
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .env("LANG", "C.UTF-8")
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(cwd) = &self.cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            program: program.clone(),
            source,
        })?;
        let pgid = child.id().map(|id| Pid::from_raw(id as i32));
        if let Some(p) = pgid {
            on_event(Output::Spawned(p.as_raw()));
        }
        // Kills the group if this future is dropped before the program ends.
        let mut group = GroupGuard(pgid);
        let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut err = BufReader::new(child.stderr.take().expect("piped")).lines();
        let (mut out_open, mut err_open) = (true, true);
        let mut seen = 0usize;
        let mut tail: Vec<String> = Vec::new();
        let timeout = Duration::from_millis(self.timeout_ms);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut line = |stream: Stream, l: String, tail: &mut Vec<String>| {
            seen += 1;
            if stream == Stream::Stderr {
                tail.push(l.clone());
                if tail.len() > 3 {
                    tail.remove(0);
                }
            }
            if seen <= MAX_LINES {
                on_event(Output::Line(stream, l));
            } else if seen == MAX_LINES + 1 {
                on_event(Output::Line(
                    Stream::Stderr,
                    format!("(output beyond {MAX_LINES} lines not shown)"),
                ));
            }
        };
        // A program that left a daemon holding its stdout would keep the pipes open for ever:
        // once it has exited, what is already in the pipes is read for a moment, then no more.
        let drain = tokio::time::sleep(Duration::from_secs(u64::from(u32::MAX)));
        tokio::pin!(drain);
        let mut status = None;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled(), if status.is_none() => {
                    kill_group(pgid);
                    let _ = child.wait().await;
                    return Err(Error::Cancelled { program });
                }
                _ = &mut deadline, if status.is_none() => {
                    kill_group(pgid);
                    let _ = child.wait().await;
                    return Err(Error::Timeout { program, after: timeout });
                }
                l = out.next_line(), if out_open => match l {
                    Ok(Some(l)) => line(Stream::Stdout, l, &mut tail),
                    _ => out_open = false,
                },
                l = err.next_line(), if err_open => match l {
                    Ok(Some(l)) => line(Stream::Stderr, l, &mut tail),
                    _ => err_open = false,
                },
                s = child.wait(), if status.is_none() => {
                    status = Some(s);
                    group.0 = None;
                    drain.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(200));
                }
                _ = &mut drain, if status.is_some() => break,
            }
            if status.is_some() && !out_open && !err_open {
                break;
            }
        }
        let status = status.expect("the loop ends after the program exits");
        match status {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(Error::Exit {
                program,
                status: s.to_string(),
                tail,
            }),
            Err(e) => Err(Error::Spawn { program, source: e }),
        }
    }
}

/// When a process started, in clock ticks since boot (field 22 of /proc/PID/stat); with the
/// pid it names one process for good, whatever pids are reused later.
pub(crate) fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Kills a process group left by a crashed daemon, if its leader is still the process that
/// was started (same pid and start time): a finished command's pid may belong to another now.
pub(crate) fn kill_orphan(pgid: i32, started: u64) -> bool {
    if pgid <= 1 || start_ticks(pgid) != Some(started) {
        return false;
    }
    killpg(Pid::from_raw(pgid), Signal::SIGKILL).is_ok()
}

fn kill_group(pgid: Option<Pid>) {
    if let Some(pgid) = pgid {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
}

/// Kills the process group when dropped: a dropped step leaves no process behind.
struct GroupGuard(Option<Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0);
    }
}

/// Where a program named in a configuration would be found: itself when it holds a '/', else
/// the first executable file of that name on PATH (as the commands run).
pub(crate) fn find_program(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = std::path::PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| executable(p))
}
