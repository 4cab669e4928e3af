//! A typed client of statelyd for Rust programs; the `stately` CLI is built on it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), stately::client::Error> {
//! use stately::client::{Client, Connect};
//! let client = Client::connect(&Connect::new("127.0.0.1:50051").token("…")).await?;
//! let mut run = client.run(stately::client::runbook("motd", [("text", "hi")])).await?;
//! while let Some(event) = run.next().await? {
//!     println!("{event:?}");
//! }
//! # Ok(()) }
//! ```
//!
//! - [`Client::connect`] reaches `host:port` or `http://` (plaintext: with a token, loopback
//!   only), `https://` (TLS, the system's CAs and [`Connect::cacert`], a client certificate
//!   with [`Connect::identity`]) or `unix:/path`.
//! - [`Client::run`] submits a job attached: the job lives as long as the call, so dropping the
//!   [`Attached`] (or the program ending) cancels the job and unwinds it — the guard is the
//!   call itself, which the daemon watches.
//! - [`Client::watch`] follows a job's events from a sequence number and, when the daemon
//!   restarts, reconnects and resumes after the last event it returned: nothing missed,
//!   nothing repeated.
//! - [`Client::jobs`] lists jobs as a stream over pages.
//! - Every failure is an [`Error`], one variant per gRPC code a caller acts on.

use crate::pb;
use crate::pb::jobs_client::JobsClient;
use futures_util::Stream;
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

/// What went wrong, by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address or token cannot be used that way (nothing was sent).
    #[error("{0}")]
    Usage(String),
    /// A CA, certificate or key file cannot be read or used.
    #[error("{0}")]
    Files(String),
    /// statelyd could not be reached, or stopped answering.
    #[error("statelyd is unavailable: {0}")]
    Unavailable(String),
    /// The request is malformed: fix it.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// No such job, runbook, target or lineage.
    #[error("not found: {0}")]
    NotFound(String),
    /// A request id already used for another spec.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The world is not as the request needs it (a job already ended, a base version moved).
    #[error("refused: {0}")]
    FailedPrecondition(String),
    /// The caller's role does not allow it.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// No credentials, or ones the daemon does not know.
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    /// Too large, or too many.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The call's deadline passed.
    #[error("timed out: {0}")]
    DeadlineExceeded(String),
    /// Any other status.
    #[error("{code:?}: {message}")]
    Other {
        /// The gRPC code.
        code: tonic::Code,
        /// The daemon's message.
        message: String,
    },
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Error {
        use tonic::Code;
        let m = s.message().to_owned();
        if broke(&s) {
            return Error::Unavailable(m);
        }
        match s.code() {
            Code::Unavailable => Error::Unavailable(m),
            Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument(m),
            Code::NotFound => Error::NotFound(m),
            Code::AlreadyExists => Error::AlreadyExists(m),
            Code::FailedPrecondition => Error::FailedPrecondition(m),
            Code::PermissionDenied => Error::PermissionDenied(m),
            Code::Unauthenticated => Error::Unauthenticated(m),
            Code::ResourceExhausted => Error::ResourceExhausted(m),
            Code::DeadlineExceeded => Error::DeadlineExceeded(m),
            code => Error::Other { code, message: m },
        }
    }
}

/// How to reach statelyd.
#[derive(Clone, Debug, Default)]
pub struct Connect {
    server: String,
    token: Option<String>,
    cacert: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
}

impl Connect {
    /// `host:port`, `http://host:port`, `https://host:port` or `unix:/path`.
    pub fn new(server: impl Into<String>) -> Connect {
        Connect {
            server: server.into(),
            ..Connect::default()
        }
    }

    /// The bearer token sent with every call.
    pub fn token(mut self, token: impl Into<String>) -> Connect {
        self.token = Some(token.into());
        self
    }

    /// With https://: CA certificates (PEM) to trust beside the system's.
    pub fn cacert(mut self, path: impl Into<PathBuf>) -> Connect {
        self.cacert = Some(path.into());
        self
    }

    /// With https://: a client certificate and its key (PEM), for mTLS.
    pub fn identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Connect {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// The address as given.
    pub fn server(&self) -> &str {
        &self.server
    }
}

/// Adds the bearer token, when there is one, to every call.
#[derive(Clone, Debug)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

/// A channel that authenticates every call; each service's generated client takes it.
pub type Authed = InterceptedService<Channel, Bearer>;

/// Whether an address asks for TLS (`https://`, in any case, as URL schemes are).
pub fn is_https(server: &str) -> bool {
    server
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

/// Whether a host is this machine's loopback (a token may cross it in plaintext).
pub fn is_loopback(host: &str) -> bool {
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

fn tls_config(c: &Connect) -> Result<rustls::ClientConfig, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(ca) = &c.cacert {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .and_then(|i| i.collect())
            .map_err(|e| Error::Files(format!("--cacert {}: {e}", ca.display())))?;
        if certs.is_empty() {
            return Err(Error::Files(format!(
                "--cacert {}: no certificate in it",
                ca.display()
            )));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| Error::Files(format!("--cacert {}: {e}", ca.display())))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Files(format!("TLS: {e}")))?
    .with_root_certificates(roots);
    let mut config = match &c.identity {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect())
                .map_err(|e| Error::Files(format!("--cert {}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| Error::Files(format!("--key {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Files(format!("--cert and --key: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Opens a channel to `c`'s server; the token goes in plaintext only to loopback or a unix
/// socket.
pub async fn channel(c: &Connect) -> Result<Authed, Error> {
    let server = c.server.as_str();
    let header = match &c.token {
        Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
            Error::Usage("the token holds characters a header cannot carry".into())
        })?),
        None => None,
    };
    let unreachable = |url: &str, e: tonic::transport::Error| {
        Error::Unavailable(format!("cannot reach statelyd at {url}: {}", cause(&e)))
    };
    let channel = if let Some(path) = server.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(|e| unreachable(server, e))?
    } else if is_https(server) {
        let uri: Uri = server
            .parse()
            .map_err(|e| Error::Usage(format!("bad server address '{server}': {e}")))?;
        let host = uri
            .host()
            .ok_or_else(|| Error::Usage(format!("bad server address '{server}': no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| Error::Usage(format!("bad server address '{server}': {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(c)?));
        let shown = server.to_owned();
        Endpoint::from_shared(server.to_owned())
            .map_err(|e| Error::Usage(format!("bad server address '{server}': {e}")))?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let (connector, name, host, shown) =
                    (connector.clone(), name.clone(), host.clone(), shown.clone());
                async move {
                    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                    let _ = tcp.set_nodelay(true);
                    let tls = connector.connect(name, tcp).await.map_err(|e| {
                        let why = e.to_string();
                        let hint = if why.contains("InvalidContentType")
                            || why.contains("corrupt message")
                        {
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
            .map_err(|e| unreachable(server, e))?
    } else {
        if c.cacert.is_some() || c.identity.is_some() {
            return Err(Error::Usage(format!(
                "--cacert, --cert and --key are for an https:// server, not {server}"
            )));
        }
        let url = if server.contains("://") {
            server.to_owned()
        } else {
            format!("http://{server}")
        };
        let uri: Uri = url
            .parse()
            .map_err(|e| Error::Usage(format!("bad server address '{server}': {e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(Error::Usage(format!(
                "bad server address '{server}': the scheme is http://, https:// or unix:"
            )));
        }
        if header.is_some() && !uri.host().is_some_and(is_loopback) {
            return Err(Error::Usage(format!(
                "refusing to send the token in plaintext to {server}: use https:// (statelyd with [tls]), a unix socket, or a tunnel to its loopback"
            )));
        }
        Endpoint::from_shared(url.clone())
            .map_err(|e| Error::Usage(format!("bad server address '{server}': {e}")))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| {
                Error::Unavailable(format!(
                    "cannot reach statelyd at {url}: {} (is it running? --server/STATELY_SERVER)",
                    cause(&e)
                ))
            })?
    };
    Ok(InterceptedService::new(channel, Bearer(header)))
}

/// A runbook job's spec: its name and parameters.
pub fn runbook<'a>(
    name: &str,
    params: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::Runbook(pb::RunbookJob {
                runbook: name.to_owned(),
                params: params
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            })),
        }),
        ..Default::default()
    }
}

/// A connected client.
#[derive(Clone, Debug)]
pub struct Client {
    channel: Authed,
    /// How long [`Client::watch`] keeps trying to reach a restarting daemon.
    reconnect_within: Duration,
}

/// A job run attached: its events as they happen. Dropping it ends the call, and the daemon
/// cancels the job and unwinds it.
#[derive(Debug)]
pub struct Attached {
    stream: tonic::Streaming<pb::JobEvent>,
    /// The job's id, from its first event.
    pub job_id: Option<String>,
}

impl Attached {
    /// The next event, or None once the job has ended.
    pub async fn next(&mut self) -> Result<Option<pb::JobEvent>, Error> {
        let e = self.stream.message().await?;
        if let Some(e) = &e
            && self.job_id.is_none()
        {
            self.job_id = Some(e.job_id.clone());
        }
        Ok(e)
    }
}

/// Whether an event ends its job's stream (a terminal state).
pub fn is_terminal(e: &pb::JobEvent) -> bool {
    use pb::JobState as S;
    matches!(&e.event, Some(pb::job_event::Event::StateChanged(s))
        if [S::Succeeded, S::Failed, S::Cancelled].iter().any(|t| *t as i32 == s.to))
}

impl Client {
    /// Connects (see [`Connect`]).
    pub async fn connect(c: &Connect) -> Result<Client, Error> {
        Ok(Client {
            channel: channel(c).await?,
            reconnect_within: Duration::from_secs(60),
        })
    }

    /// The same client, trying this long to reach a restarting daemon in [`Client::watch`].
    pub fn reconnect_within(mut self, d: Duration) -> Client {
        self.reconnect_within = d;
        self
    }

    /// The channel, for the generated clients of the other services
    /// (`pb::stats_client::StatsClient::new(client.channel())`).
    pub fn channel(&self) -> Authed {
        self.channel.clone()
    }

    fn jobs_api(&self) -> JobsClient<Authed> {
        JobsClient::new(self.channel.clone())
    }

    /// Submits a job and returns it at once.
    pub async fn submit(&self, req: pb::SubmitJobRequest) -> Result<pb::Job, Error> {
        Ok(self.jobs_api().submit_job(req).await?.into_inner())
    }

    /// Submits a job attached (see [`Attached`]).
    pub async fn run(&self, req: pb::SubmitJobRequest) -> Result<Attached, Error> {
        let stream = self.jobs_api().run_job(req).await?.into_inner();
        Ok(Attached {
            stream,
            job_id: None,
        })
    }

    /// One job.
    pub async fn job(&self, id: &str) -> Result<pb::Job, Error> {
        Ok(self
            .jobs_api()
            .get_job(pb::GetJobRequest { job_id: id.into() })
            .await?
            .into_inner())
    }

    /// Cancels a job; with `wait`, returns once it has unwound.
    pub async fn cancel(&self, id: &str, reason: &str, wait: bool) -> Result<pb::Job, Error> {
        Ok(self
            .jobs_api()
            .cancel_job(pb::CancelJobRequest {
                job_id: id.into(),
                reason: reason.into(),
                wait,
            })
            .await?
            .into_inner())
    }

    /// Starts the rollback of a finished job (a job of its own).
    pub async fn rollback(&self, id: &str, force: bool) -> Result<pb::Job, Error> {
        Ok(self
            .jobs_api()
            .rollback_job(pb::RollbackJobRequest {
                job_id: id.into(),
                force,
            })
            .await?
            .into_inner())
    }

    /// A job's events after `after_seq`, to its end. When the daemon goes away (a restart),
    /// the stream reconnects — for up to [`Client::reconnect_within`], backing off from 50 ms —
    /// and resumes after the last event it yielded: none missed, none repeated.
    pub fn watch(
        &self,
        id: &str,
        after_seq: u64,
    ) -> impl Stream<Item = Result<pb::JobEvent, Error>> + Send + 'static {
        let (client, id, within) = (self.clone(), id.to_owned(), self.reconnect_within);
        async_stream(move |tx| async move {
            // The task ends when the stream is dropped, wherever it waits.
            let closed = tx.clone();
            tokio::select! {
                () = closed.closed() => {}
                () = follow(client, id, after_seq, within, tx) => {}
            }
        })
    }

    /// Jobs matching `filter`, newest first, page after page.
    pub fn jobs(
        &self,
        filter: pb::ListJobsRequest,
    ) -> impl Stream<Item = Result<pb::Job, Error>> + Send + 'static {
        let client = self.clone();
        async_stream(move |tx| async move {
            let mut req = filter;
            loop {
                let page = match client.jobs_api().list_jobs(req.clone()).await {
                    Ok(p) => p.into_inner(),
                    Err(e) => {
                        let _ = tx.send(Err(Error::from(e))).await;
                        return;
                    }
                };
                for j in page.jobs {
                    if tx.send(Ok(j)).await.is_err() {
                        return;
                    }
                }
                if page.next_page_token.is_empty() {
                    return;
                }
                req.page_token = page.next_page_token;
            }
        })
    }
}

/// Whether a status means the daemon is away: Unavailable, or what a connection broken
/// mid-call gives (Cancelled, Unknown, or any code tonic derived from the transport's error)
/// — statelyd itself answers neither Cancelled nor Unknown for a watch.
pub fn is_away(s: &tonic::Status) -> bool {
    broke(s)
        || matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
        )
}

/// Whether a status was made on this side from a broken connection rather than sent by
/// statelyd: tonic keeps the transport's error as the source (a connection closed mid-stream
/// by a restarting daemon comes as `Internal: h2 protocol error`, which is no answer of ours).
fn broke(s: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        if e.is::<hyper::Error>() || e.is::<std::io::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// [`Client::watch`]'s loop: follow, and when the stream breaks or ends before the job did,
/// back off and resume after the last event sent.
async fn follow(
    client: Client,
    id: String,
    after_seq: u64,
    within: Duration,
    tx: tokio::sync::mpsc::Sender<Result<pb::JobEvent, Error>>,
) {
    let mut last = after_seq;
    let mut lost_at: Option<tokio::time::Instant> = None;
    let mut pause = Duration::from_millis(50);
    loop {
        let opened = client
            .jobs_api()
            .watch_job(pb::WatchJobRequest {
                job_id: id.clone(),
                after_seq: last,
            })
            .await;
        match opened {
            Ok(s) => {
                let mut s = s.into_inner();
                loop {
                    match s.message().await {
                        Ok(Some(e)) => {
                            lost_at = None;
                            pause = Duration::from_millis(50);
                            if e.seq <= last {
                                continue; // seen before the reconnect
                            }
                            last = e.seq;
                            let end = is_terminal(&e);
                            if tx.send(Ok(e)).await.is_err() || end {
                                return;
                            }
                        }
                        // Ended without the job's end: the daemon is stopping — or the job
                        // ended at or before `last` (nothing left to send). Ask.
                        Ok(None) => {
                            match client.job(&id).await {
                                Ok(j) if is_terminal_state(j.state) && j.last_seq <= last => {
                                    return;
                                }
                                Ok(_) => {}
                                // Away too (restarting): resume as for the stream.
                                Err(Error::Unavailable(_))
                                | Err(Error::Other {
                                    code: tonic::Code::Cancelled | tonic::Code::Unknown,
                                    ..
                                }) => {}
                                Err(e) => {
                                    let _ = tx.send(Err(e)).await;
                                    return;
                                }
                            }
                            break;
                        }
                        Err(e) if is_away(&e) => break,
                        Err(e) => {
                            let _ = tx.send(Err(Error::from(e))).await;
                            return;
                        }
                    }
                }
            }
            Err(e) if is_away(&e) => {}
            Err(e) => {
                let _ = tx.send(Err(Error::from(e))).await;
                return;
            }
        }
        let since = *lost_at.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() > within {
            let _ = tx
                .send(Err(Error::Unavailable(format!(
                    "statelyd did not come back within {}s",
                    within.as_secs()
                ))))
                .await;
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

fn is_terminal_state(state: i32) -> bool {
    use pb::JobState as S;
    [S::Succeeded, S::Failed, S::Cancelled]
        .iter()
        .any(|t| *t as i32 == state)
}

/// A stream fed by a task (what async-stream does, in a dozen lines).
fn async_stream<T, F, Fut>(f: F) -> impl Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A "server" that breaks HTTP/2 at once: a SETTINGS frame one byte long (a frame size
    /// error), as a connection cut mid-call is seen — tonic makes that `Internal`.
    async fn breaking_server() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = conn.read(&mut buf).await;
                    let _ = conn.write_all(&[0, 0, 1, 4, 0, 0, 0, 0, 0, 0]).await;
                    let _ = conn.read(&mut buf).await;
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_broken_connection_is_unavailable_not_an_answer() {
        let client = Client::connect(&Connect::new(breaking_server().await))
            .await
            .unwrap();
        let status = client
            .jobs_api()
            .get_job(pb::GetJobRequest { job_id: "j".into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        assert!(is_away(&status), "{status:?}");
        let e = client.job("j").await.unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    }
}
