//! HAProxy targets: reading a target's live configuration with its version, and validating a
//! candidate with `haproxy -c` the way an apply will (written beside the live file, so
//! relative paths resolve the same; removed afterwards), with HAProxy's ALERT and WARNING lines
//! mapped back to the candidate's own line numbers.

pub(crate) mod cfg;
pub mod edits;
pub(crate) mod master;
pub mod policy;
pub(crate) mod runtime;
pub mod target;

pub use target::HaproxyTarget;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long `haproxy -c` may take (a 5000-server config takes ~75 ms).
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// Sends one command on a HAProxy CLI socket (master or admin) and reads the answer, up to the
/// blank line that ends it or the close: the master CLI keeps the connection open after an
/// answer, the admin socket closes it.
pub(crate) async fn command(socket: &Path, cmd: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let talk = async {
        let mut s = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("{}: {e}", socket.display()))?;
        s.write_all(format!("{cmd}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.ends_with(b"\n\n") {
                break;
            }
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), talk)
        .await
        .map_err(|_| format!("{} did not answer `{cmd}`", socket.display()))?
}

/// Candidate configurations larger than this are refused.
pub const MAX_CONFIG_BYTES: usize = 16 << 20;

/// Why a target's configuration could not be read or checked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such target.
    #[error("{0}")]
    UnknownTarget(String),
    /// The target has no configuration file configured.
    #[error("HAProxy target '{0}' has no `config` file configured")]
    NoConfig(String),
    /// The candidate is unusable before HAProxy even sees it.
    #[error("{0}")]
    BadCandidate(String),
    /// The candidate uses what the target's policy does not allow (code, files outside the
    /// allowed directories).
    #[error("{0}")]
    Refused(String),
    /// The candidate is larger than a configuration may be.
    #[error("{0}")]
    TooLarge(String),
    /// A backend or server the target does not have; the message names those it has.
    #[error("{0}")]
    NotFound(String),
    /// Reading, writing or running failed.
    #[error("{0}")]
    Io(String),
}

/// The configured targets, by name.
#[derive(Debug, Clone)]
pub struct Targets {
    targets: Vec<HaproxyTarget>,
    /// Where certificate bundles are written (allowed to every target's configuration).
    bundle_dir: PathBuf,
}

/// A live configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveConfig {
    /// The file's text.
    pub text: String,
    /// "sha256:<hex>" of its bytes.
    pub version: String,
}

/// How serious a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The configuration is refused.
    Alert,
    /// Accepted, but worth a look.
    Warning,
}

/// One thing `haproxy -c` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// How serious.
    pub level: Level,
    /// The candidate's line it points at.
    pub line: Option<u32>,
    /// What HAProxy said, with the temp file's name replaced by the live file's.
    pub message: String,
    /// That line of the candidate.
    pub source: Option<String>,
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    /// Whether HAProxy accepted it.
    pub valid: bool,
    /// What it said.
    pub diagnostics: Vec<Diagnostic>,
    /// The candidate's version.
    pub version: String,
}

/// The version of a configuration: "sha256:" and the hex digest of its bytes.
pub fn version(bytes: &[u8]) -> String {
    format!("sha256:{}", crate::fsops::sha256_hex(bytes))
}

/// Whether `v` has the form of a version ("sha256:" and 64 lower-case hex digits).
pub fn is_version(v: &str) -> bool {
    v.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

impl Targets {
    /// The targets a configuration declares, certificate bundles written to `bundle_dir`.
    pub fn new(targets: &[HaproxyTarget], bundle_dir: PathBuf) -> Targets {
        Targets {
            targets: targets.to_vec(),
            bundle_dir,
        }
    }

    /// All of them.
    pub fn all(&self) -> &[HaproxyTarget] {
        &self.targets
    }

    /// One by name.
    pub fn get(&self, name: &str) -> Result<&HaproxyTarget, Error> {
        self.targets.iter().find(|t| t.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.targets.iter().map(|t| t.name.as_str()).collect();
            Error::UnknownTarget(format!(
                "no HAProxy target {} is configured{}",
                crate::quote::quote(name),
                if known.is_empty() {
                    " (none are)".to_owned()
                } else {
                    format!(" (targets: {})", known.join(", "))
                }
            ))
        })
    }

    fn config_path(&self, name: &str) -> Result<(&HaproxyTarget, &PathBuf), Error> {
        let t = self.get(name)?;
        let path = t
            .config
            .as_ref()
            .ok_or_else(|| Error::NoConfig(name.to_owned()))?;
        Ok((t, path))
    }

    /// A target's live configuration.
    pub async fn live(&self, name: &str) -> Result<LiveConfig, Error> {
        let (_, path) = self.config_path(name)?;
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
        let version = version(&bytes);
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::Io(format!("{} is not UTF-8", path.display())))?;
        Ok(LiveConfig { text, version })
    }

    /// Refuses a candidate that names files outside the target's allowed directories or runs
    /// code the target does not allow (before `haproxy -c` reads a byte of it).
    pub fn check_policy(&self, name: &str, text: &str) -> Result<(), Error> {
        let (target, live) = self.config_path(name)?;
        let dir = live.parent().unwrap_or(Path::new("/"));
        target
            .policy(&self.bundle_dir)
            .check(text, dir)
            .map_err(Error::Refused)
    }

    /// Like [`Targets::check_policy`] for an edit of `before`: only the lines it adds or
    /// changes are judged.
    pub fn check_policy_of_changes(
        &self,
        name: &str,
        text: &str,
        before: &str,
    ) -> Result<(), Error> {
        let (target, live) = self.config_path(name)?;
        let dir = live.parent().unwrap_or(Path::new("/"));
        target
            .policy(&self.bundle_dir)
            .check_changes(text, dir, Some(before))
            .map_err(Error::Refused)
    }

    /// Checks a candidate for a target with `haproxy -c`, changing nothing.
    pub async fn validate(&self, name: &str, text: &str) -> Result<Validation, Error> {
        let (target, live) = self.config_path(name)?;
        if text.len() > MAX_CONFIG_BYTES {
            return Err(Error::TooLarge(format!(
                "the candidate is larger than {} MiB",
                MAX_CONFIG_BYTES >> 20
            )));
        }
        if text.contains('\0') {
            return Err(Error::BadCandidate("the candidate holds a NUL byte".into()));
        }
        self.check_policy(name, text)?;
        let candidate = Candidate::write(live, text).await?;
        let dir = live.parent().unwrap_or(Path::new("/"));
        // Not for a candidate that configures the HTTP client itself: its CA file must load.
        let quick = match text.contains("httpclient.") {
            true => None,
            false => {
                let q = Candidate::write(live, QUICK_CHECK).await?;
                skips_system_ca(&target.binary, &q.0).await.then_some(q)
            }
        };
        let mut check = tokio::process::Command::new(&target.binary);
        check.arg("-c");
        if let Some(q) = &quick {
            check.arg("-f").arg(&q.0);
        }
        check
            .arg("-f")
            .arg(&candidate.0)
            // Nothing of statelyd's environment for `.warning "${VAR}"` to print; relative
            // paths read from the live file's directory, as the policy assumed.
            .env_clear()
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if target.allow_code
            && let Some(user) = &target.check_user
        {
            let user = nix::unistd::User::from_name(user)
                .ok()
                .flatten()
                .ok_or_else(|| {
                    Error::Io(format!("check_user '{user}' is not a user on this machine"))
                })?;
            check.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        let out = tokio::time::timeout(CHECK_TIMEOUT, check.output())
            .await
            .map_err(|_| Error::Io(format!("`haproxy -c` took longer than {CHECK_TIMEOUT:?}")))?
            .map_err(|e| Error::Io(format!("cannot run {}: {e}", target.binary.display())))?;
        let valid = match out.status.code() {
            Some(0) => true,
            Some(1) => false,
            _ => {
                return Err(Error::Io(format!(
                    "{} -c ended with {}: {}",
                    target.binary.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        };
        let mut said = String::from_utf8_lossy(&out.stderr).into_owned();
        said.push_str(&String::from_utf8_lossy(&out.stdout));
        let diagnostics = diagnostics(&said, &candidate.0, live, text);
        Ok(Validation {
            valid,
            diagnostics,
            version: version(text.as_bytes()),
        })
    }
}

/// Why a reload may have failed when `haproxy -c` could not tell: the `bind` addresses the new
/// configuration adds that another process already holds (HAProxy reports that only on the
/// master's stderr, which statelyd does not see). One line per address, naming its line.
pub(crate) fn busy_binds(new: &str, old: &str) -> Vec<String> {
    let binds = |text: &str| -> Vec<(usize, String)> {
        text.lines()
            .enumerate()
            .filter_map(|(i, l)| {
                let mut w = l.split_whitespace();
                (w.next() == Some("bind")).then(|| w.next().map(|a| (i + 1, a.to_owned())))?
            })
            .collect()
    };
    let old: Vec<String> = binds(old).into_iter().map(|(_, a)| a).collect();
    let mut out = Vec::new();
    for (line, addr) in binds(new) {
        if old.contains(&addr) {
            continue;
        }
        let Some(sock) = tcp_address(&addr) else {
            continue;
        };
        if let Err(e) = std::net::TcpListener::bind(sock)
            && e.kind() == std::io::ErrorKind::AddrInUse
        {
            out.push(format!(
                "line {line} binds {addr}, which another process holds ({e})"
            ));
        }
    }
    out
}

/// A `bind` address as a socket address, when it is a plain IP (or `*`) and one port.
fn tcp_address(addr: &str) -> Option<std::net::SocketAddr> {
    let addr = addr
        .strip_prefix("ipv4@")
        .or_else(|| addr.strip_prefix("ipv6@"))
        .unwrap_or(addr);
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = match host {
        "" | "*" => std::net::Ipv4Addr::UNSPECIFIED.into(),
        h => h.parse().ok()?,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

/// A candidate file beside the live one, removed when dropped.
struct Candidate(PathBuf);

/// Read before the candidate by `haproxy -c`: at start-up HAProxy 2.6's HTTP client loads
/// every certificate of the system's CA store to verify servers with (146 files here), which
/// is two thirds of a check's CPU on a small file (measured with `perf stat`: ~30 ms → ~10 ms).
/// The check is of the configuration, which this does not change; it is not used for a
/// candidate that sets any `httpclient.` keyword.
const QUICK_CHECK: &str = "global\n    httpclient.ssl.verify none\n";

/// Whether this HAProxy knows `httpclient.ssl.verify` (2.6 and later), asked once per binary
/// with `file` holding [`QUICK_CHECK`]: valid (exit 0, or 2 for "no listener"), not refused (1).
async fn skips_system_ca(binary: &Path, file: &Path) -> bool {
    static KNOWN: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<PathBuf, bool>>> =
        std::sync::LazyLock::new(Default::default);
    if let Some(k) = KNOWN.lock().expect("lock").get(binary) {
        return *k;
    }
    let out = tokio::process::Command::new(binary)
        .arg("-c")
        .arg("-q")
        .arg("-f")
        .arg(file)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    let known = matches!(
        tokio::time::timeout(CHECK_TIMEOUT, out).await,
        Ok(Ok(s)) if matches!(s.code(), Some(0 | 2))
    );
    KNOWN.lock().expect("lock").insert(binary.to_owned(), known);
    known
}

impl Candidate {
    async fn write(live: &Path, text: &str) -> Result<Candidate, Error> {
        let path = crate::fsops::temp_beside(live).with_extension("cfg");
        tokio::fs::write(&path, text)
            .await
            .map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
        Ok(Candidate(path))
    }
}

impl Drop for Candidate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// HAProxy's `[ALERT]` / `[WARNING]` lines (and their `|` continuations), with the candidate's
/// file name replaced by the live file's and `parsing [file:line]` mapped to a line number.
fn diagnostics(output: &str, candidate: &Path, live: &Path, text: &str) -> Vec<Diagnostic> {
    let cand = candidate.display().to_string();
    let live_name = live.display().to_string();
    let lines: Vec<&str> = text.lines().collect();
    let mut out: Vec<Diagnostic> = Vec::new();
    for raw in output.lines() {
        let level = if raw.starts_with("[ALERT]") {
            Level::Alert
        } else if raw.starts_with("[WARNING]") {
            Level::Warning
        } else if let Some(more) = raw.trim_start().strip_prefix("| ") {
            if let Some(last) = out.last_mut() {
                last.message.push(' ');
                last.message.push_str(more.trim());
            }
            continue;
        } else {
            continue;
        };
        // "[ALERT]    (29018) : config : parsing [f.cfg:10] : unknown keyword ..."
        let message = raw
            .split_once(") : ")
            .map_or(raw, |(_, m)| m)
            .replace(&cand, &live_name);
        if message.starts_with("config : Fatal errors found")
            || message.contains("Error(s) found in configuration file")
        {
            continue;
        }
        let line = message
            .split_once("parsing [")
            .and_then(|(_, rest)| rest.split_once(']'))
            .and_then(|(loc, _)| loc.rsplit_once(':'))
            .and_then(|(_, n)| n.parse::<u32>().ok());
        let source = line
            .and_then(|n| lines.get(n.checked_sub(1)? as usize))
            .map(|l| l.to_string());
        out.push(Diagnostic {
            level,
            line,
            message,
            source,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_name_the_callers_line_and_the_live_file() {
        let said = "[NOTICE]   (1) : haproxy version is 2.6.12\n\
                    [ALERT]    (1) : config : parsing [/etc/haproxy/.haproxy.cfg.stately-1.tmp.cfg:3] : unknown keyword 'bogus' in 'frontend' section\n\
                    [ALERT]    (1) : config : Error(s) found in configuration file : /etc/haproxy/.haproxy.cfg.stately-1.tmp.cfg\n\
                    [ALERT]    (1) : config : Fatal errors found in configuration.\n\
                    [WARNING]  (1) : config : missing timeouts for frontend 'fe'.\n   | While not properly invalid\n";
        let d = diagnostics(
            said,
            Path::new("/etc/haproxy/.haproxy.cfg.stately-1.tmp.cfg"),
            Path::new("/etc/haproxy/haproxy.cfg"),
            "global\nfrontend fe\n  bogus x\n",
        );
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d[0].level, Level::Alert);
        assert_eq!(d[0].line, Some(3));
        assert_eq!(d[0].source.as_deref(), Some("  bogus x"));
        assert!(
            d[0].message.contains("[/etc/haproxy/haproxy.cfg:3]"),
            "{}",
            d[0].message
        );
        assert_eq!(d[1].level, Level::Warning);
        assert!(
            d[1].message.ends_with("While not properly invalid"),
            "{}",
            d[1].message
        );
    }
}
