//! Listening sockets that an idle or hostile crowd cannot exhaust. tonic serves whatever its
//! incoming stream yields and never closes an idle connection, so the accept loop is ours:
//! - a cap on open connections per listener (the unix socket has its own, so a crowd on TCP
//!   cannot lock the local administrator out); at the cap, a connection quiet for at least a
//!   second with no call in flight makes room for the new one — one that has not finished its
//!   handshake and HTTP/2 preface first, else the one quiet the longest; a connection with a
//!   call in flight (a RunJob stream, a CancelJob waiting; not a health or reflection stream,
//!   which anyone may open) is never closed; when none can go, the new one is closed at once;
//! - a deadline for a connection's TLS handshake and HTTP/2 preface together (one that never
//!   finishes them is closed); handshakes run in the connection's own task, so a slow one
//!   holds up no other;
//! - a pause, not a spin, when accept fails (out of file descriptors);
//! - and, at start, the soft open-file limit raised to the hard one.
//!
//! HTTP/2 keepalive (set on the server) closes connections whose peer stopped answering.

use crate::auth::Peer;
use futures_util::task::AtomicWaker;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// How connections are bounded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Open connections at most (per listener).
    pub(crate) max_connections: usize,
    /// A connection that has not finished its TLS handshake and HTTP/2 preface this long
    /// after it opened is closed.
    pub(crate) first_bytes_within: Duration,
}

/// File descriptors kept for everything but client connections (store, sockets to HAProxy,
/// child processes, files).
const RESERVED_FDS: u64 = 128;

/// Raises the soft limit on open files to the hard limit (systemd's default soft limit is
/// 1024), and returns the soft limit now in force.
pub(crate) fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

impl Limits {
    /// The configured cap, lowered to fit in the open-file limit with room to spare.
    pub(crate) fn fitted(
        max_connections: usize,
        first_bytes_within: Duration,
        nofile: u64,
    ) -> Self {
        let fits = nofile.saturating_sub(RESERVED_FDS).max(16) as usize;
        if max_connections > fits {
            tracing::info!(
                "at most {fits} connections per listener (open-file limit {nofile}), not {max_connections}"
            );
        }
        Limits {
            max_connections: max_connections.min(fits),
            first_bytes_within,
        }
    }
}

/// The open connections of one listener.
#[derive(Debug)]
struct Registry {
    epoch: Instant,
    next: AtomicU64,
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
}

#[derive(Debug)]
pub(crate) struct Slot {
    /// Milliseconds since the registry's epoch of the last byte read or written.
    last: AtomicU64,
    /// Bytes read, counted up to the length of the HTTP/2 preface.
    read: AtomicU64,
    /// Calls in flight (requests whose response, body included, has not ended).
    calls: AtomicU64,
    closed: AtomicBool,
    /// Woken when the connection is closed from outside, so its reader sees it.
    waker: AtomicWaker,
}

/// The length of a client's HTTP/2 connection preface (`PRI * HTTP/2.0` and the rest).
const PREFACE_LEN: u64 = 24;

impl Slot {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    fn greeted(&self) -> bool {
        self.read.load(Ordering::Relaxed) >= PREFACE_LEN
    }
}

impl Registry {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn len(&self) -> usize {
        self.slots.lock().expect("registry lock").len()
    }

    /// Makes room for a new connection: closes one with no call in flight — one that has not
    /// finished its handshake and HTTP/2 preface and is at least `MIN_AGE_SILENT` old first,
    /// else the one quiet the longest if quiet for `min_quiet`. False when none may go. A
    /// connection is never closed for a newcomer in its first `MIN_AGE_SILENT`, so a flood of
    /// connects cannot push out a client in the middle of its TLS handshake: the flood's own
    /// newcomers are refused meanwhile.
    fn evict_quietest(&self, min_quiet: Duration) -> bool {
        let now = self.now();
        let min = min_quiet.as_millis() as u64;
        let young = MIN_AGE_SILENT.as_millis() as u64;
        let slots = self.slots.lock().expect("registry lock");
        let quietest = slots
            .values()
            .filter(|s| {
                let quiet = now.saturating_sub(s.last.load(Ordering::Relaxed));
                !s.closed.load(Ordering::SeqCst)
                    && s.calls.load(Ordering::SeqCst) == 0
                    && quiet >= if s.greeted() { min } else { young }
            })
            .min_by_key(|s| (s.greeted(), s.last.load(Ordering::Relaxed)));
        match quietest {
            Some(s) => {
                s.close();
                true
            }
            None => false,
        }
    }
}

/// A connection's place under the cap, from accept (before its handshake) until it closes.
#[derive(Debug)]
struct Place {
    id: u64,
    registry: Arc<Registry>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.registry
            .slots
            .lock()
            .expect("registry lock")
            .remove(&self.id);
    }
}

/// A connection that can be closed from outside and knows when it last spoke.
#[derive(Debug)]
pub(crate) struct Conn<IO> {
    io: IO,
    slot: Arc<Slot>,
    peer: Arc<Peer>,
    place: Place,
}

impl<IO> Conn<IO> {
    fn touch(&self) {
        self.slot
            .last
            .store(self.place.registry.now(), Ordering::Relaxed);
    }
}

fn aborted() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "closed by statelyd")
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.slot.waker.register(cx.waker());
        if self.slot.closed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(aborted()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if matches!(r, Poll::Ready(Ok(()))) && n > 0 {
            if !self.slot.greeted() {
                self.slot.read.fetch_add(n as u64, Ordering::Relaxed);
            }
            self.touch();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.slot.closed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(aborted()));
        }
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    // Vectored writes pass through: hyper then hands a response's frames to the socket (or
    // to rustls, as one TLS record) in one call instead of one per frame.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.slot.closed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(aborted()));
        }
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A connection's handle, in each request's extensions (tonic puts a connection's
/// `ConnectInfo` there), so the [`CallsLayer`] can count its calls in flight and the
/// authentication knows the peer.
#[derive(Debug, Clone)]
pub(crate) struct Activity {
    slot: Arc<Slot>,
    pub(crate) peer: Arc<Peer>,
}

impl<IO> tonic::transport::server::Connected for Conn<IO> {
    type ConnectInfo = Activity;
    fn connect_info(&self) -> Activity {
        Activity {
            slot: self.slot.clone(),
            peer: self.peer.clone(),
        }
    }
}

/// Counts a connection's calls in flight from the request until its response body ends.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CallsLayer;

impl<S> tower::Layer<S> for CallsLayer {
    type Service = Calls<S>;
    fn layer(&self, inner: S) -> Calls<S> {
        Calls { inner }
    }
}

/// The service [`CallsLayer`] wraps around the routes.
#[derive(Debug, Clone)]
pub(crate) struct Calls<S> {
    inner: S,
}

/// One call in flight; dropped with the response body.
#[derive(Debug)]
struct Call(Arc<Slot>);

impl Drop for Call {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::SeqCst);
    }
}

type CallFuture<R, E> =
    Pin<Box<dyn std::future::Future<Output = Result<http::Response<CallBody<R>>, E>> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Calls<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<CallBody<R>>;
    type Error = S::Error;
    type Future = CallFuture<R, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // Discovery answers without credentials and its streams (health Watch, reflection)
        // last as long as the client likes: they do not keep a connection from eviction,
        // or an anonymous crowd could hold every slot.
        let path = req.uri().path();
        let discovery =
            path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.");
        let call = req
            .extensions()
            .get::<Activity>()
            .filter(|_| !discovery)
            .map(|a| {
                a.slot.calls.fetch_add(1, Ordering::SeqCst);
                Call(a.slot.clone())
            });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|body| CallBody { body, _call: call }))
        })
    }
}

/// A response body that keeps its call counted until it ends or is dropped.
#[derive(Debug)]
pub(crate) struct CallBody<B> {
    body: B,
    _call: Option<Call>,
}

impl<B: http_body::Body + Unpin> http_body::Body for CallBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Something that accepts connections: a TCP listener, the same with TLS, a unix listener.
pub(crate) trait Accept: Send + Sync + 'static {
    /// What accept returns.
    type Raw: Send + 'static;
    /// The connection once open.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Waits for the next connection.
    fn accept(&self) -> impl std::future::Future<Output = io::Result<Self::Raw>> + Send;
    /// Opens it (the TLS handshake), in its own task, and says who the peer is.
    fn open(
        &self,
        raw: Self::Raw,
    ) -> impl std::future::Future<Output = io::Result<(Self::Io, Peer)>> + Send;
}

async fn accept_tcp(listener: &tokio::net::TcpListener) -> io::Result<tokio::net::TcpStream> {
    let (s, _) = listener.accept().await?;
    // Without TCP_NODELAY, streamed events meet delayed ACKs and a reply can wait 40 ms.
    let _ = s.set_nodelay(true);
    Ok(s)
}

fn address_of(s: &tokio::net::TcpStream, scheme: &str) -> String {
    s.peer_addr()
        .map(|a| format!("{scheme}:{a}"))
        .unwrap_or_else(|_| scheme.into())
}

impl Accept for tokio::net::TcpListener {
    type Raw = tokio::net::TcpStream;
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<tokio::net::TcpStream> {
        accept_tcp(self).await
    }
    async fn open(&self, s: tokio::net::TcpStream) -> io::Result<(tokio::net::TcpStream, Peer)> {
        let peer = Peer {
            address: address_of(&s, "tcp"),
            ..Peer::default()
        };
        Ok((s, peer))
    }
}

/// A TCP listener whose connections speak TLS, with the configuration current when each
/// arrives.
pub(crate) struct TlsListener {
    pub(crate) tcp: tokio::net::TcpListener,
    pub(crate) tls: Arc<crate::tls::Tls>,
    /// Handshakes computed at once; the rest wait their turn (still under the deadline), so
    /// a flood of ClientHellos cannot take both cores from the calls being served.
    pub(crate) handshakes: tokio::sync::Semaphore,
}

/// Concurrent TLS handshakes at most.
pub(crate) const MAX_HANDSHAKES: usize = 64;

impl Accept for TlsListener {
    type Raw = tokio::net::TcpStream;
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    async fn accept(&self) -> io::Result<tokio::net::TcpStream> {
        accept_tcp(&self.tcp).await
    }
    async fn open(&self, s: tokio::net::TcpStream) -> io::Result<(Self::Io, Peer)> {
        let address = address_of(&s, "tls");
        let _turn = self
            .handshakes
            .acquire()
            .await
            .map_err(|_| io::Error::other("the listener is closing"))?;
        let (config, generation) = self.tls.current_with_generation();
        let stream = tokio_rustls::TlsAcceptor::from(config).accept(s).await?;
        let cert = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| crate::tls::CertIdentity::of(c));
        let peer = Peer {
            address,
            tls: true,
            cert,
            uid: None,
            gid: None,
            ca_generation: generation,
        };
        Ok((stream, peer))
    }
}

impl Accept for tokio::net::UnixListener {
    type Raw = tokio::net::UnixStream;
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<tokio::net::UnixStream> {
        tokio::net::UnixListener::accept(self).await.map(|(s, _)| s)
    }
    async fn open(&self, s: tokio::net::UnixStream) -> io::Result<(tokio::net::UnixStream, Peer)> {
        let cred = s.peer_cred().ok();
        let peer = Peer {
            address: "unix".into(),
            uid: cred.map(|c| c.uid()),
            gid: cred.map(|c| c.gid()),
            ..Peer::default()
        };
        Ok((s, peer))
    }
}

/// Says why a connection could not open (a TLS handshake refused: an unknown CA, an expired
/// certificate, no certificate), at most once every ten seconds, so a flood of bad handshakes
/// cannot flood the log.
fn opening_failed(e: &io::Error) {
    static LAST: std::sync::Mutex<Option<(Instant, u64)>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().expect("log lock");
    match &mut *last {
        Some((at, skipped)) if at.elapsed() < Duration::from_secs(10) => *skipped += 1,
        _ => {
            let skipped = last.map_or(0, |(_, n)| n);
            let more = if skipped > 0 {
                format!(" ({skipped} more since the last such line)")
            } else {
                String::new()
            };
            tracing::info!("a connection failed to open: {e}{more}");
            *last = Some((Instant::now(), 0));
        }
    }
}

/// A connection at the cap gets room only from one quiet at least this long.
const EVICT_QUIET: Duration = Duration::from_secs(1);
/// A connection that has not finished its handshake and preface gets this long before a
/// newcomer may take its place: long enough for a TLS handshake across a continent, short
/// enough that a crowd of silent connections locks nobody out for long.
const MIN_AGE_SILENT: Duration = Duration::from_millis(250);
/// How long to pause when accept fails (e.g. EMFILE), instead of spinning on it.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// The connections of one listener, under one cap.
#[derive(Debug, Clone)]
pub(crate) struct Connections {
    registry: Arc<Registry>,
    limits: Limits,
}

impl Connections {
    /// The limits it enforces.
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    pub(crate) fn new(limits: Limits) -> Self {
        Connections {
            registry: Arc::new(Registry {
                epoch: Instant::now(),
                next: AtomicU64::new(0),
                slots: Mutex::new(HashMap::new()),
            }),
            limits,
        }
    }
}

/// Accepts connections until `stop`, bounded by the shared cap, as a stream for tonic.
pub(crate) fn incoming<L: Accept>(
    listener: L,
    connections: &Connections,
    stop: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn<L::Io>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let registry = connections.registry.clone();
    let limits = connections.limits;
    let listener = Arc::new(listener);
    tokio::spawn(async move {
        let mut warned: Option<Instant> = None;
        loop {
            let raw = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => r,
            };
            let raw = match raw {
                Ok(raw) => raw,
                Err(e) => {
                    if warned.is_none_or(|w| w.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!("accepting a connection failed: {e}; pausing");
                        warned = Some(Instant::now());
                    }
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            };
            if registry.len() >= limits.max_connections && !registry.evict_quietest(EVICT_QUIET) {
                // Every connection is busy: this one is refused (closed at once).
                drop(raw);
                continue;
            }
            let id = registry.next.fetch_add(1, Ordering::Relaxed);
            let slot = Arc::new(Slot {
                last: AtomicU64::new(registry.now()),
                read: AtomicU64::new(0),
                calls: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                waker: AtomicWaker::new(),
            });
            registry
                .slots
                .lock()
                .expect("registry lock")
                .insert(id, slot.clone());
            let place = Place {
                id,
                registry: registry.clone(),
            };
            let watched = Arc::downgrade(&slot);
            let within = limits.first_bytes_within;
            tokio::spawn(async move {
                tokio::time::sleep(within).await;
                if let Some(s) = watched.upgrade()
                    && !s.greeted()
                {
                    s.close();
                }
            });
            let (listener, tx) = (listener.clone(), tx.clone());
            tokio::spawn(async move {
                // The handshake ends when it finishes, fails, or the slot is closed (the
                // deadline, or eviction to make room).
                let closed = std::future::poll_fn(|cx| {
                    slot.waker.register(cx.waker());
                    if slot.closed.load(Ordering::SeqCst) {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                });
                let opened = tokio::select! {
                    r = listener.open(raw) => r,
                    () = closed => return,
                };
                let (io, peer) = match opened {
                    Ok(o) => o,
                    Err(e) => {
                        opening_failed(&e);
                        return;
                    }
                };
                let conn = Conn {
                    io,
                    slot,
                    peer: Arc::new(peer),
                    place,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
