//! HAProxy's master CLI (master-worker mode, `-S <socket>`): reload, and `show proc` to see
//! that the reload happened and did not fail. One connection per command: the master re-execs
//! on reload, and an answer ends with a blank line while the connection stays open.

use super::command;
use std::path::Path;
use std::time::Duration;

/// What `show proc` says about the master and its workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Procs {
    /// The master's reload count.
    pub(crate) reloads: u64,
    /// How many reloads failed (`[failed: N]`).
    pub(crate) failed: u64,
    /// The current workers' pids.
    pub(crate) workers: Vec<u32>,
}

/// Reads `show proc`.
pub(crate) async fn show_proc(socket: &Path) -> Result<Procs, String> {
    let text = command(socket, "show proc").await?;
    parse_show_proc(&text).ok_or_else(|| format!("unexpected `show proc` answer: {}", text.trim()))
}

fn parse_show_proc(text: &str) -> Option<Procs> {
    let mut master = None;
    let mut workers = Vec::new();
    let mut section = "";
    for line in text.lines() {
        if line.starts_with("# workers") {
            section = "workers";
            continue;
        }
        if line.starts_with('#') {
            section = if line.starts_with("#<PID>") {
                ""
            } else {
                "other"
            };
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        match (section, cols.as_slice()) {
            ("", [_, "master", reloads, "[failed:", failed, ..]) => {
                master = Some((
                    reloads.parse().ok()?,
                    failed.trim_end_matches(']').parse().ok()?,
                ));
            }
            ("workers", [pid, "worker", ..]) => workers.push(pid.parse().ok()?),
            _ => {}
        }
    }
    let (reloads, failed) = master?;
    Some(Procs {
        reloads,
        failed,
        workers,
    })
}

/// Reads `show proc`, waiting up to `within` for a master that does not answer yet: right
/// after a reload the master re-execs and refuses connections for a moment (and a recovery
/// after a crash can land in that moment).
pub(crate) async fn show_proc_within(socket: &Path, within: Duration) -> Result<Procs, String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match show_proc(socket).await {
            Ok(p) => return Ok(p),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "the master CLI did not answer within {within:?}: {e}"
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Reloads through the master and waits until `show proc` shows the outcome: Ok when the
/// reload count grew with no new failure and a new worker is there; Err with what HAProxy
/// shows otherwise (e.g. a port clash that `haproxy -c` could not see). A master that does not
/// answer at first is waited for, within the same bound.
pub(crate) async fn reload(socket: &Path, within: Duration) -> Result<Procs, String> {
    let r = reload_once(socket, within).await;
    crate::metrics::haproxy_reloaded(r.is_ok());
    r
}

async fn reload_once(socket: &Path, within: Duration) -> Result<Procs, String> {
    let before = show_proc_within(socket, within).await?;
    // The master re-execs and closes the connection; there is no answer to read. A socket
    // that cannot even be reached is a failure now, not a timeout later.
    if let Err(e) = tokio::net::UnixStream::connect(socket).await {
        return Err(format!(
            "cannot reach the master CLI at {}: {e}",
            socket.display()
        ));
    }
    let _ = command(socket, "reload").await;
    let sent = tokio::time::Instant::now();
    let deadline = sent + within;
    loop {
        // HAProxy 2.6 says nothing when a reload is done: `show proc` is asked again, every
        // 5 ms while a reload usually finishes (tens of ms, a few hundred on a large
        // config), then every 20 ms. A `show proc` costs the master well under a millisecond.
        let step = if sent.elapsed() < Duration::from_millis(500) {
            5
        } else {
            20
        };
        tokio::time::sleep(Duration::from_millis(step)).await;
        // While the master re-execs, its socket may refuse connections for a moment.
        if let Ok(now) = show_proc(socket).await {
            if now.failed > before.failed {
                return Err(format!(
                    "HAProxy refused the new configuration (reload failed; {} failed reload(s) in all); the old worker keeps serving",
                    now.failed
                ));
            }
            if now.reloads > before.reloads
                && now.workers.iter().any(|w| !before.workers.contains(w))
            {
                return Ok(now);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("no new worker within {within:?} of the reload"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_proc_of_haproxy_2_6_parses() {
        let text = "#<PID>          <type>          <reloads>       <uptime>        <version>      \n\
                    1240            master          1 [failed: 0]   0d00h00m04s     2.6.12-1+deb12u4\n\
                    # workers\n\
                    1290            worker          0               0d00h00m01s     2.6.12-1+deb12u4\n\
                    # programs\n\n";
        let p = parse_show_proc(text).unwrap();
        assert_eq!(
            p,
            Procs {
                reloads: 1,
                failed: 0,
                workers: vec![1290]
            }
        );
        assert!(parse_show_proc("Unknown command\n\n").is_none());
    }
}
