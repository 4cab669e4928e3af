//! Reaching statelyd: the server address (`host:port` and `http://` in plaintext, `https://`
//! over TLS, `unix:/path`), a client certificate for mTLS, and the bearer token, found in the
//! flags, the environment, or the token file the daemon generated on this machine. A token is
//! never sent in plaintext beyond loopback.

use anyhow::{Result, anyhow};
use hyper_util::rt::TokioIo;
use stately::pb::jobs_client::JobsClient;
use std::path::PathBuf;
use std::sync::Arc;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint, Uri};

/// Adds the bearer token, when there is one, to every call.
#[derive(Clone)]
pub(crate) struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

/// TLS material for `https://`: CA certificates beside the system's, and a client
/// certificate for mTLS.
#[derive(Clone, Debug, Default)]
pub(crate) struct TlsFiles {
    pub(crate) cacert: Option<PathBuf>,
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
}

/// A channel that authenticates every call.
pub(crate) type Authed = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

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
    match url.parse::<Uri>() {
        Ok(uri) if uri.host().is_some_and(is_loopback) => Generated::Local { unix: false },
        _ => Generated::Remote,
    }
}

/// Whether a host is this machine's loopback (a token may cross it in plaintext).
fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The innermost cause of a connection error, which names what went wrong (tonic's own
/// message is "transport error").
fn cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut e = e;
    while let Some(next) = e.source() {
        e = next;
    }
    e.to_string()
}

fn client_tls(files: &TlsFiles) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if let Some(ca) = &files.cacert {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .and_then(|i| i.collect())
            .map_err(|e| anyhow!("--cacert {}: {e}", ca.display()))?;
        if certs.is_empty() {
            return Err(anyhow!("--cacert {}: no certificate in it", ca.display()));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| anyhow!("--cacert {}: {e}", ca.display()))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let mut config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect())
                .map_err(|e| anyhow!("--cert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| anyhow!("--key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| anyhow!("--cert and --key: {e}"))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(anyhow!("--cert and --key go together")),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Connects to `server`: `host:port` or `http://host:port` (plaintext), `https://host:port`
/// (TLS, verified against the system's CAs and `--cacert`), or `unix:/path`. A token goes in
/// plaintext only to loopback or a unix socket.
pub(crate) async fn connect(server: &str, token: Option<&str>, tls: &TlsFiles) -> Result<Authed> {
    let header = match token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| anyhow!("the token holds characters a header cannot carry"))?,
        ),
        None => None,
    };
    let channel = if let Some(path) = server.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        Endpoint::try_from("http://localhost")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(|e| anyhow!("cannot reach statelyd at {server}: {}", cause(&e)))?
    } else if server.starts_with("https://") {
        let uri: Uri = server
            .parse()
            .map_err(|e| anyhow!("bad server address '{server}': {e}"))?;
        let host = uri
            .host()
            .ok_or_else(|| anyhow!("bad server address '{server}': no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| anyhow!("bad server address '{server}': {e}"))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(tls)?));
        let shown = server.to_owned();
        Endpoint::from_shared(server.to_owned())
            .map_err(|e| anyhow!("bad server address '{server}': {e}"))?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let (connector, name, host, shown) =
                    (connector.clone(), name.clone(), host.clone(), shown.clone());
                async move {
                    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                    let _ = tcp.set_nodelay(true);
                    let tls = connector.connect(name, tcp).await.map_err(|e| {
                        let why = e.to_string();
                        let hint = if why.contains("InvalidContentType") || why.contains("corrupt message") {
                            " — it does not speak TLS (a plaintext listener is host:port or http://)"
                        } else {
                            ""
                        };
                        std::io::Error::other(format!("TLS with {shown}: {why}{hint}"))
                    })?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
            .await
            .map_err(|e| anyhow!("cannot reach statelyd at {server}: {}", cause(&e)))?
    } else {
        let url = if server.contains("://") {
            server.to_owned()
        } else {
            format!("http://{server}")
        };
        let uri: Uri = url
            .parse()
            .map_err(|e| anyhow!("bad server address '{server}': {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(anyhow!(
                "bad server address '{server}': the scheme is http://, https:// or unix:"
            ));
        }
        if header.is_some() && !uri.host().is_some_and(is_loopback) {
            return Err(crate::cli::Usage(format!(
                "refusing to send the token in plaintext to {server}: use https:// (statelyd with [tls]), a unix socket, or a tunnel to its loopback"
            ))
            .into());
        }
        Endpoint::from_shared(url.clone())
            .map_err(|e| anyhow!("bad server address '{server}': {e}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| {
                anyhow!(
                    "cannot reach statelyd at {url}: {} (is it running? --server/STATELY_SERVER)",
                    cause(&e)
                )
            })?
    };
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel,
        Bearer(header),
    ))
}
