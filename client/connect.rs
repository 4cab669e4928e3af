//! Reaching statelyd: the server address (`host:port` and `http://` in plaintext, `https://`
//! over TLS, `unix:/path`), a client certificate for mTLS, and the bearer token, found in the
//! flags, the environment, or the token file the daemon generated on this machine. A token is
//! never sent in plaintext beyond loopback.

use anyhow::{Result, anyhow};
use stately::pb::jobs_client::JobsClient;
use std::path::PathBuf;

/// A channel that authenticates every call (the library's).
pub(crate) use stately::client::Authed;

/// TLS material for `https://`: CA certificates beside the system's, and a client
/// certificate for mTLS.
#[derive(Clone, Debug, Default)]
pub(crate) struct TlsFiles {
    pub(crate) cacert: Option<PathBuf>,
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
}

pub(crate) type Client = JobsClient<Authed>;

/// Where the token came from when it was the one statelyd generates (so a refusal can say
/// that it may be stale: a daemon with `[[token]]`s configured no longer takes it).
pub(crate) static GENERATED_TOKEN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Where a token may come from besides the flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Generated {
    /// The daemon of this machine (a unix socket or loopback): its generated token, read from
    /// the default data directory; none on a unix socket (the peer's uid may be known).
    Local { unix: bool },
    /// A client certificate identifies the caller: no token unless one is given.
    Certificate,
    /// Another machine: never this machine's generated token.
    Remote,
}

/// Finds the token: the flag or STATELY_TOKEN, then --token-file, then (for this machine's
/// daemon only) the generated token. None when there is no token and the caller proves itself
/// otherwise (a client certificate, a unix socket whose peer uid the daemon may know).
pub(crate) fn token(
    flag: Option<String>,
    file: Option<PathBuf>,
    generated: Generated,
) -> Result<Option<String>> {
    if let Some(t) = flag.filter(|t| !t.is_empty()) {
        return Ok(Some(t));
    }
    if let Some(path) = file {
        // A file named on purpose: say why it cannot be used.
        return match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_owned())),
            Ok(_) => Err(anyhow::anyhow!(
                "the token file {} (--token-file / STATELY_TOKEN_FILE) is empty",
                path.display()
            )),
            Err(e) => Err(anyhow::anyhow!(
                "the token file {} (--token-file / STATELY_TOKEN_FILE) cannot be read: {e}",
                path.display()
            )),
        };
    }
    let unix = match generated {
        Generated::Certificate => return Ok(None),
        Generated::Remote => {
            return Err(anyhow::anyhow!(
                "no token for a remote statelyd: pass --token / STATELY_TOKEN or --token-file, or a client certificate (--cert, --key); the token statelyd generated on this machine goes to this machine's daemon only"
            ));
        }
        Generated::Local { unix } => unix,
    };
    let path = stately::config::default_data_dir().join("operator.token");
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let _ = GENERATED_TOKEN.set(path.clone());
            Ok(Some(s.trim().to_owned()))
        }
        Err(_) if unix => Ok(None),
        Err(e) => Err(anyhow::anyhow!(
            "no token: pass --token or STATELY_TOKEN, or --token-file; the token statelyd generates (when no [[token]] is configured) is not readable at {}: {e}",
            path.display()
        )),
    }
}

/// Whether `server` is this machine's daemon: a unix socket, or a loopback host.
pub(crate) fn generated_for(server: &str, certificate: bool) -> Generated {
    if certificate {
        return Generated::Certificate;
    }
    if server.starts_with("unix:") {
        return Generated::Local { unix: true };
    }
    let url = if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    };
    match url.parse::<tonic::transport::Uri>() {
        Ok(uri) if uri.host().is_some_and(stately::client::is_loopback) => {
            Generated::Local { unix: false }
        }
        _ => Generated::Remote,
    }
}

/// Connects to `server` through the library's client: `host:port` or `http://host:port`
/// (plaintext), `https://host:port` (TLS), or `unix:/path`. A token goes in plaintext only to
/// loopback or a unix socket.
pub(crate) async fn connect(server: &str, token: Option<&str>, tls: &TlsFiles) -> Result<Authed> {
    let mut c = stately::client::Connect::new(server);
    if let Some(t) = token {
        c = c.token(t);
    }
    if let Some(ca) = &tls.cacert {
        c = c.cacert(ca);
    }
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        c = c.identity(cert, key);
    }
    stately::client::channel(&c).await.map_err(|e| match e {
        stately::client::Error::Usage(m) => crate::cli::Usage(m).into(),
        stately::client::Error::Unavailable(m) => anyhow!("{m}"),
        e => anyhow!("{e}"),
    })
}
