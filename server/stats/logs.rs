//! HAProxy's log stream as a wake-up call for a target's stats poller. HAProxy logs a
//! server's state change the moment it happens ("Server app/s1 is DOWN, reason: ..."); a
//! listener on a unix datagram socket (or UDP on loopback) hears it and makes the shared
//! poller poll at once. The stats socket stays the source of truth: a forged or lost line can
//! hasten or delay a poll, never invent or hide a state. Polling at the configured interval
//! goes on as the backstop.
//!
//! Syslog framing is read by hand: only the message is needed, from RFC 3164 (what HAProxy
//! sends by default) or RFC 5424 (`log ... format rfc5424`), and the crates that parse
//! syslog build whole structured records per line, which a flood would pay for.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where a target's log stream arrives.
#[derive(Clone, Debug)]
pub enum Source {
    /// A unix datagram socket at this path.
    Unix(std::path::PathBuf),
    /// A UDP address on loopback.
    Udp(std::net::SocketAddr),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Unix(p) => write!(f, "unix:{}", p.display()),
            Source::Udp(a) => write!(f, "udp:{a}"),
        }
    }
}

/// The message of a syslog datagram: after `<PRI>`, an RFC 5424 header (`1 TIMESTAMP HOST APP
/// PROCID MSGID SD`) or an RFC 3164 one (`Mmm dd hh:mm:ss [HOST] TAG[PID]:`). None when the
/// datagram is not syslog.
pub fn message(datagram: &[u8]) -> Option<&str> {
    let rest = datagram.strip_prefix(b"<")?;
    let close = rest.iter().take(4).position(|b| *b == b'>')?;
    if close == 0 || !rest[..close].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let rest = &rest[close + 1..];
    let text = std::str::from_utf8(rest)
        .or_else(|e| std::str::from_utf8(&rest[..e.valid_up_to()]))
        .ok()?;
    let text = text.trim_end_matches(['\n', '\r', '\0']);
    if let Some(after) = text.strip_prefix("1 ") {
        // TIMESTAMP HOSTNAME APP-NAME PROCID MSGID, then the structured data.
        let mut rest = after;
        for _ in 0..5 {
            rest = rest.split_once(' ')?.1;
        }
        let msg = if let Some(r) = rest.strip_prefix("- ") {
            r
        } else if rest == "-" {
            ""
        } else if rest.starts_with('[') {
            // Structured data: elements up to the first "] " outside quotes (HAProxy sends
            // none; a value holding "] " is read past, which only affects this line).
            rest.split_once("] ").map_or("", |(_, m)| m)
        } else {
            return None;
        };
        return Some(msg.trim_start_matches('\u{feff}'));
    }
    // RFC 3164: a 15-character timestamp, then the tag's ": ".
    let after = text.get(16..)?;
    Some(after.split_once(": ").map_or(after, |(_, m)| m))
}

/// Whether a HAProxy message announces that a server, a backend or a proxy changed state (or
/// a check changed a server's health): the lines that wake the poller. Traffic logs and
/// anything else are not.
pub fn is_state_change(msg: &str) -> bool {
    msg.starts_with("Server ")
        || msg.starts_with("Health check for ")
        || msg.starts_with("Agent check for ")
        || msg.starts_with("Proxy ")
        || ((msg.starts_with("backend ") || msg.starts_with("Backend "))
            && msg.contains("no server available"))
}

/// Lines read per second at most, in bursts of up to `BURST`: beyond that a flood waits in the
/// kernel's socket buffer (and overflows it) rather than taking the daemon's CPU.
const RATE: f64 = 5_000.0;
const BURST: f64 = 1_000.0;
/// Datagrams longer than this are cut (HAProxy's default log line is 1024 bytes).
const MAX_DATAGRAM: usize = 4096;

/// Binds `source` for `target`'s log stream (a stale socket file from an earlier run is
/// replaced) and hears it until `stop`, waking the target's poller on each state change.
pub async fn listen(
    source: &Source,
    target: String,
    hub: Arc<super::StatsHub>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    enum Sock {
        Unix(tokio::net::UnixDatagram),
        Udp(tokio::net::UdpSocket),
    }
    let sock = match source {
        Source::Unix(path) => {
            only_root_writes(path)?;
            remove_stale(path)?;
            let s = tokio::net::UnixDatagram::bind(path)?;
            // HAProxy's workers may run as another user; a forged line can only hasten a poll
            // (see the wake's bound in the poller). The directory is root's alone (checked
            // above), so the name cannot be swapped for a symlink before the chmod.
            use std::os::unix::fs::{FileTypeExt, PermissionsExt};
            if !std::fs::symlink_metadata(path)?.file_type().is_socket() {
                return Err(std::io::Error::other("the socket just bound is not there"));
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
            Sock::Unix(s)
        }
        Source::Udp(addr) => Sock::Udp(tokio::net::UdpSocket::bind(addr).await?),
    };
    tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut tokens = BURST;
        let mut last = tokio::time::Instant::now();
        loop {
            let n = tokio::select! {
                _ = stop.cancelled() => return,
                r = async {
                    match &sock {
                        Sock::Unix(s) => s.recv(&mut buf).await,
                        Sock::Udp(s) => s.recv(&mut buf).await,
                    }
                } => match r {
                    Ok(n) => n,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let heard = message(&buf[..n]).is_some_and(is_state_change);
            crate::metrics::log_line(&target, heard);
            if heard {
                hub.wake(&target);
            }
            let now = tokio::time::Instant::now();
            tokens = (tokens + now.duration_since(last).as_secs_f64() * RATE).min(BURST) - 1.0;
            last = now;
            if tokens < 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(-tokens / RATE)).await;
            }
        }
    });
    Ok(())
}

/// Removes a socket file left by an earlier run: only a socket, and only one no process
/// listens on (a datagram sent to it is refused), so a live socket of anyone else's (HAProxy's
/// admin socket named by mistake) is never taken.
fn remove_stale(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !m.file_type().is_socket() {
        return Err(std::io::Error::other(
            "something other than a socket is there: statelyd will not replace it",
        ));
    }
    let probe = std::os::unix::net::UnixDatagram::unbound()?;
    match probe.connect(path) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Ok(()) => Err(std::io::Error::other(
            "a process listens on this socket already (another statelyd, or not a log socket)",
        )),
        Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => Err(std::io::Error::other(
            "a process listens on this socket already (another statelyd, or not a log socket)",
        )),
        Err(e) => Err(e),
    }
}

/// Refuses a socket whose directory others than root (or statelyd's user) may write: they
/// could swap the name for a symlink between bind and chmod.
fn only_root_writes(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let m = std::fs::metadata(dir)?;
    let me = nix::unistd::geteuid().as_raw();
    if (m.uid() != 0 && m.uid() != me) || m.mode() & 0o022 != 0 {
        return Err(std::io::Error::other(format!(
            "its directory {} may be written by others than root: put log_socket in a directory only root writes (e.g. /var/lib/haproxy on Debian, /run/stately)",
            dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_out_of_both_framings() {
        let down = "Server app/s1 is DOWN, reason: Layer4 connection problem, info: \"Connection refused\", check duration: 0ms. 0 active and 0 backup servers left.";
        let rfc3164 = format!("<129>Dec  1 19:44:20 haproxy[26267]: {down}\n");
        assert_eq!(message(rfc3164.as_bytes()), Some(down));
        let with_host = format!("<129>Dec  1 19:44:20 edge1 haproxy[26267]: {down}");
        assert_eq!(message(with_host.as_bytes()), Some(down));
        let rfc5424 =
            format!("<129>1 2026-12-01T19:44:20.123456+00:00 edge1 haproxy 26267 - - {down}");
        assert_eq!(message(rfc5424.as_bytes()), Some(down));
        let sd = format!("<129>1 2026-12-01T19:44:20Z edge1 haproxy 26267 - [x@1 a=\"b\"] {down}");
        assert_eq!(message(sd.as_bytes()), Some(down));
        for junk in [
            &b"hello"[..],
            b"<>x",
            b"<12345>x",
            b"<1a>x",
            b"",
            b"<129>short",
        ] {
            assert_eq!(message(junk), None, "{:?}", String::from_utf8_lossy(junk));
        }
        assert_eq!(message(b"<129>\xff\xfe"), None);
    }

    #[test]
    fn only_state_changes_wake_the_poller() {
        for yes in [
            "Server app/s1 is DOWN, reason: Layer4 connection problem",
            "Server app/s1 is UP, reason: Layer4 check passed",
            "Server app/s1 was DOWN and now enters maintenance.",
            "Server app/s1 is going DOWN for maintenance.",
            "Health check for server app/s1 failed, reason: Layer4 timeout, status: 1/2 UP.",
            "backend app has no server available!",
            "Proxy fe stopped (cumulated conns: FE: 0, BE: 0).",
        ] {
            assert!(is_state_change(yes), "{yes}");
        }
        for no in [
            "127.0.0.1:40000 [01/Dec/2026:19:44:20.123] fe app/s1 0/0/0/1/1 200 120 - - ---- 1/1/0/0/0 0/0 \"GET / HTTP/1.1\"",
            "Connect from 127.0.0.1:40000 to 127.0.0.1:80 (fe/HTTP)",
            "",
        ] {
            assert!(!is_state_change(no), "{no}");
        }
    }
}
