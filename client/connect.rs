//! Reaching statelyd: the server address (TCP or unix socket) and the bearer token, found in
//! the flags, the environment, or the token file the daemon generated on this machine.

use anyhow::{Context, Result, anyhow};
use hyper_util::rt::TokioIo;
use stately::pb::jobs_client::JobsClient;
use std::path::PathBuf;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint, Uri};

/// Adds the bearer token to every call.
#[derive(Clone)]
pub(crate) struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// A channel that authenticates every call.
pub(crate) type Authed = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

pub(crate) type Client = JobsClient<Authed>;

/// Where the token came from when it was the one statelyd generates (so a refusal can say
/// that it may be stale: a daemon with `[[token]]`s configured no longer takes it).
pub(crate) static GENERATED_TOKEN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Finds the token: the flag or STATELY_TOKEN, then --token-file, then the generated token.
pub(crate) fn token(flag: Option<String>, file: Option<PathBuf>) -> Result<String> {
    if let Some(t) = flag.filter(|t| !t.is_empty()) {
        return Ok(t);
    }
    if let Some(path) = file {
        // A file named on purpose: say why it cannot be used.
        return match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
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
    let path = stately::config::default_data_dir().join("operator.token");
    let _ = GENERATED_TOKEN.set(path.clone());
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_owned())
        .with_context(|| {
            format!(
                "no token: pass --token or STATELY_TOKEN, or --token-file; the token statelyd \
                 generates (when no [[token]] is configured) is not readable at {}",
                path.display()
            )
        })
}

/// Connects to `server`: `host:port`, `http://host:port` or `unix:/path`.
pub(crate) async fn connect(server: &str, token: &str) -> Result<Authed> {
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
            .with_context(|| format!("cannot reach statelyd at {server}"))?
    } else {
        let url = if server.contains("://") {
            server.to_owned()
        } else {
            format!("http://{server}")
        };
        Endpoint::from_shared(url.clone())
            .map_err(|e| anyhow!("bad server address '{server}': {e}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| {
                format!("cannot reach statelyd at {url} (is it running? --server/STATELY_SERVER)")
            })?
    };
    let header: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .map_err(|_| anyhow!("the token holds characters a header cannot carry"))?;
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel,
        Bearer(header),
    ))
}
