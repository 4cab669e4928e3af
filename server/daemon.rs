//! Runs statelyd: the engine, the gRPC services (jobs, health, reflection) on TCP (with TLS
//! when configured) and an optional unix socket, a configuration reload on SIGHUP, and an
//! orderly stop when `shutdown` resolves.

use crate::api::{CertsApi, HaproxyApi, InputErrorsLayer, JobsApi, StatsApi};
use crate::auth::Auth;
use crate::config::Config;
use crate::engine::Engine;
use crate::pb;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Tokens could not be loaded or generated.
    #[error("tokens: {0}")]
    Auth(String),
    /// The listener's certificate, key or client CA do not load.
    #[error("{0}")]
    Tls(String),
    /// The engine could not start.
    #[error("{0}")]
    Engine(#[from] crate::engine::Error),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Where.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Reflection could not be built from the descriptor set.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The gRPC server failed.
    #[error("server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// This node may not write the job ledger any more: another statelyd took its name, or
    /// its lease lapsed.
    #[error(
        "this statelyd lost its claim on the job ledger ({0}); it stopped without touching anything more"
    )]
    LedgerLost(String),
}

impl Error {
    /// Whether the configuration is at fault (statelyd exits 64, as for a bad file): tokens,
    /// TLS material, the store's settings, or a ledger newer than this binary.
    pub fn is_configuration(&self) -> bool {
        match self {
            Error::Tls(_) | Error::Auth(_) => true,
            Error::Engine(crate::step::Error::Store(e)) => e.is_configuration(),
            _ => false,
        }
    }
}

/// The largest request a service that takes whole configurations decodes (16 MiB and room
/// for the rest of the message).
const MAX_CONFIG_REQUEST: usize = crate::haproxy::MAX_CONFIG_BYTES + (64 << 10);
/// The largest request other services decode.
const MAX_REQUEST: usize = 1 << 20;
/// HTTP/2 pings on a quiet connection, and how long the peer has to answer before it is closed.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Concurrent calls on one connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Serves until `shutdown` resolves, then stops accepting, ends open streams, gives running
/// jobs the configured grace period and flushes the store. `on_listen` learns the bound TCP
/// address (the port may have been 0).
pub async fn run(
    config: Config,
    reload: Option<Loader>,
    on_listen: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    crate::fsops::create_private_dir(&config.data_dir).map_err(|e| Error::Bind {
        addr: config.data_dir.display().to_string(),
        source: e,
    })?;
    let nofile = crate::listen::raise_nofile();
    let connections = crate::listen::Connections::new(crate::listen::Limits::fitted(
        config.max_connections,
        config.first_bytes_timeout,
        nofile,
    ));
    let auth = Auth::load(&config).map_err(Error::Auth)?;
    let tls = match config.tls.files(&config.cert_root()) {
        Some(files) => Some(Arc::new(crate::tls::Tls::load(files).map_err(Error::Tls)?)),
        None => None,
    };
    if tls.is_none() && !config.listen.ip().is_loopback() {
        tracing::warn!(
            "listening on {} without TLS (insecure = true): tokens cross the network in clear",
            config.listen
        );
    }
    let config = Arc::new(config);
    // One tree of stop signals: cancelling it ends open streams, stops the listeners, and
    // (through the engine's child token) tells watch jobs and unwind retries to stand down.
    let stopping = CancellationToken::new();
    let engine = Engine::start(config.clone(), &stopping).await?;
    crate::renewals::spawn(&engine);

    let tcp = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.listen.to_string(),
            source,
        })?;
    let addr = tcp.local_addr().map_err(|source| Error::Bind {
        addr: config.listen.to_string(),
        source,
    })?;
    let mut listeners = vec![format!(
        "{}:{addr}",
        if tls.is_some() { "tls" } else { "tcp" }
    )];
    if let Some(path) = &config.listen_unix {
        listeners.push(format!("unix:{}", path.display()));
    }
    let loads = Arc::new(crate::config::Loads::new());
    let jobs = JobsApi {
        engine: engine.clone(),
        stopping: stopping.clone(),
        started_at: crate::job::now_ms(),
        listeners,
        loads: loads.clone(),
    };
    let haproxy = HaproxyApi {
        engine: engine.clone(),
    };
    let stats = StatsApi {
        hub: engine.stats(),
        stopping: stopping.clone(),
    };
    let certs = CertsApi {
        engine: engine.clone(),
    };
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::jobs_server::JobsServer<JobsApi>>()
        .await;
    health_reporter
        .set_serving::<pb::stats_server::StatsServer<StatsApi>>()
        .await;
    health_reporter
        .set_serving::<pb::haproxy_server::HaproxyServer<HaproxyApi>>()
        .await;
    health_reporter
        .set_serving::<pb::certificates_server::CertificatesServer<CertsApi>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::Reflection(e.to_string()))?;

    // Every service decodes requests up to its documented size: a whole configuration (16 MiB)
    // in SubmitJob/RunJob and ValidateConfig, 1 MiB elsewhere.
    let mut routes = tonic::service::Routes::builder();
    routes
        .add_service(health.clone())
        .add_service(InterceptedService::new(
            reflection_v1.clone(),
            auth.discovery(),
        ))
        .add_service(InterceptedService::new(
            reflection_v1alpha.clone(),
            auth.discovery(),
        ))
        .add_service(InterceptedService::new(
            pb::jobs_server::JobsServer::new(jobs.clone())
                .max_decoding_message_size(MAX_CONFIG_REQUEST),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            pb::stats_server::StatsServer::new(stats.clone())
                .max_decoding_message_size(MAX_REQUEST),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            pb::haproxy_server::HaproxyServer::new(haproxy.clone())
                .max_decoding_message_size(MAX_CONFIG_REQUEST),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            pb::certificates_server::CertificatesServer::new(certs.clone())
                .max_decoding_message_size(MAX_REQUEST),
            auth.clone(),
        ));
    // One set of routes for every listener, the console's JSON gateway included.
    let routes = routes.routes();
    let router = || {
        Server::builder()
            .layer(crate::listen::CallsLayer)
            .layer(InputErrorsLayer)
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .add_routes(routes.clone())
    };

    let mut servers = tokio::task::JoinSet::new();
    let stop = stopping.clone();
    match &tls {
        Some(tls) => {
            tls.watch(stopping.clone());
            auth.follow_ca(tls.ca_generation());
            let listener = crate::listen::TlsListener {
                tcp,
                tls: tls.clone(),
                handshakes: tokio::sync::Semaphore::new(crate::listen::MAX_HANDSHAKES),
            };
            let incoming = crate::listen::incoming(listener, &connections, stopping.clone());
            servers.spawn(
                router()
                    .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }),
            );
        }
        None => {
            let incoming = crate::listen::incoming(tcp, &connections, stopping.clone());
            servers.spawn(
                router()
                    .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }),
            );
        }
    }
    if let Some(path) = &config.listen_unix {
        let _ = std::fs::remove_file(path);
        let uds = tokio::net::UnixListener::bind(path).map_err(|source| Error::Bind {
            addr: path.display().to_string(),
            source,
        })?;
        if let Some(group) = &config.listen_unix_group {
            give_to_group(path, group).map_err(|source| Error::Bind {
                addr: path.display().to_string(),
                source,
            })?;
        }
        let stop = stopping.clone();
        // Its own cap: a crowd on TCP cannot lock the local administrator out.
        let local = crate::listen::Connections::new(connections.limits());
        let incoming = crate::listen::incoming(uds, &local, stopping.clone());
        servers.spawn(
            router().serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }),
        );
        tracing::info!("listening on unix:{}", path.display());
    }
    // HAProxy's log streams, bound before READY so a HAProxy started after statelyd finds
    // its log socket there.
    for t in &config.haproxy {
        let source = match (&t.log_socket, t.log_udp) {
            (Some(p), _) => crate::stats::logs::Source::Unix(p.clone()),
            (None, Some(a)) => crate::stats::logs::Source::Udp(a),
            (None, None) => continue,
        };
        crate::stats::logs::listen(&source, t.name.clone(), engine.stats(), stopping.clone())
            .await
            .map_err(|e| Error::Bind {
                addr: source.to_string(),
                source: e,
            })?;
        tracing::info!("hearing haproxy target '{}' log stream on {source}", t.name);
    }
    // Every listener is bound before the daemon says it listens (and systemd hears READY).
    if let Some(m) = config.metrics_listen {
        let l = tokio::net::TcpListener::bind(m)
            .await
            .map_err(|source| Error::Bind {
                addr: m.to_string(),
                source,
            })?;
        tracing::info!(
            "metrics on http://{}/metrics",
            l.local_addr().map(|a| a.to_string()).unwrap_or_default()
        );
        tokio::spawn(crate::metrics::serve(l, engine.clone(), stopping.clone()));
    }
    if let Some(c) = config.console_listen {
        let l = tokio::net::TcpListener::bind(c)
            .await
            .map_err(|source| Error::Bind {
                addr: c.to_string(),
                source,
            })?;
        let bound = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let grpc = tower::ServiceBuilder::new()
            .layer(crate::listen::CallsLayer)
            .layer(InputErrorsLayer)
            .service(routes.clone());
        let console = crate::console::Console::new(grpc, &config.console_hosts);
        // Its own cap, as the unix socket has: browsers cannot crowd gRPC clients out.
        let own = crate::listen::Connections::new(connections.limits());
        match &tls {
            Some(tls) => {
                let listener = crate::listen::TlsListener {
                    tcp: l,
                    tls: tls.clone(),
                    handshakes: tokio::sync::Semaphore::new(crate::listen::MAX_HANDSHAKES),
                };
                let incoming = crate::listen::incoming(listener, &own, stopping.clone());
                tokio::spawn(console.serve(incoming, stopping.clone()));
                tracing::info!("console on https://{bound}/");
            }
            None => {
                let incoming = crate::listen::incoming(l, &own, stopping.clone());
                tokio::spawn(console.serve(incoming, stopping.clone()));
                tracing::info!("console on http://{bound}/");
            }
        }
    }
    tracing::info!(
        "listening on {addr}{}",
        if tls.is_some() { " (TLS)" } else { "" }
    );
    on_listen(addr);
    // systemd (Type=notify): listening now; the watchdog, when WatchdogSec asks for one.
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("listening on {addr}")),
    ]);
    spawn_watchdog(stopping.clone());
    if let Some(loader) = reload {
        spawn_reloader(
            loader,
            Reloadable {
                engine: engine.clone(),
                auth: auth.clone(),
                tls: tls.clone(),
                loads,
            },
            stopping.clone(),
        );
    }

    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        why = engine.ledger_lost() => {
            // Fenced: whatever it did now could undo the other daemon's work.
            tracing::error!("{why}: stopping");
            notify(&[
                sd_notify::NotifyState::Stopping,
                sd_notify::NotifyState::Status(&format!("stopped: {why}")),
            ]);
            stopping.cancel();
            let _ = tokio::time::timeout(config.shutdown_grace, engine.shutdown(std::time::Duration::ZERO)).await;
            if let Some(path) = &config.listen_unix {
                let _ = std::fs::remove_file(path);
            }
            return Err(Error::LedgerLost(why));
        }
        Some(r) = servers.join_next() => {
            stopping.cancel();
            engine.shutdown(config.shutdown_grace).await;
            return match r {
                Ok(r) => r.map_err(Error::from),
                Err(e) => Err(Error::Reflection(format!("server task: {e}"))),
            };
        }
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    stopping.cancel();
    health_reporter
        .set_not_serving::<pb::jobs_server::JobsServer<JobsApi>>()
        .await;
    let grace = config.shutdown_grace;
    let drain = async { while servers.join_next().await.is_some() {} };
    let (_, ()) = tokio::join!(tokio::time::timeout(grace, drain), engine.shutdown(grace));
    if let Some(path) = &config.listen_unix {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Reads the configuration again, as at start (the file, then the flags over it).
pub type Loader = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// What a reload replaces.
struct Reloadable {
    engine: Engine,
    auth: Auth,
    tls: Option<Arc<crate::tls::Tls>>,
    loads: Arc<crate::config::Loads>,
}

/// Reloads the configuration on each SIGHUP until `stop`.
fn spawn_reloader(loader: Loader, r: Reloadable, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: the configuration cannot be reloaded");
        return;
    };
    let loader = Arc::new(loader);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                s = hup.recv() => if s.is_none() { return },
            }
            // systemd: reloading (MONOTONIC_USEC ties it to this SIGHUP), then ready again
            // whether the new configuration took or not.
            let mut reloading = vec![sd_notify::NotifyState::Reloading];
            if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
                reloading.push(now);
            }
            notify(&reloading);
            let l = loader.clone();
            let loaded = tokio::task::spawn_blocking(move || l())
                .await
                .unwrap_or_else(|e| Err(format!("the reload task failed: {e}")));
            let outcome = match loaded {
                Ok(new) => reload(new, &r).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(notes) => {
                    for n in &notes {
                        tracing::warn!("reload: {n}");
                    }
                    r.loads.loaded();
                    tracing::info!(
                        "SIGHUP: configuration reloaded; running jobs keep the one they started with"
                    );
                }
                Err(e) => {
                    tracing::error!(
                        "SIGHUP: the new configuration is refused, the old one stays: {e}"
                    );
                    r.loads.refused(e);
                }
            }
            notify(&[sd_notify::NotifyState::Ready]);
        }
    });
}

/// Swaps in a new configuration: what cannot change without a restart is kept as it was (and
/// said); the rest is checked whole (tokens readable, TLS files loading) before anything is
/// replaced, so a bad configuration changes nothing.
async fn reload(mut new: Config, r: &Reloadable) -> Result<Vec<String>, String> {
    let old = r.engine.config();
    let mut notes = Vec::new();
    macro_rules! keep {
        ($($field:ident).+, $name:literal) => {
            if new.$($field).+ != old.$($field).+ {
                notes.push(format!("{} changed: it takes effect at the next restart", $name));
                new.$($field).+ = old.$($field).+.clone();
            }
        };
    }
    keep!(listen, "listen");
    keep!(listen_unix, "listen_unix");
    keep!(listen_unix_group, "listen_unix_group");
    let logs = |c: &Config| -> Vec<_> {
        c.haproxy
            .iter()
            .filter(|t| t.log_socket.is_some() || t.log_udp.is_some())
            .map(|t| (t.name.clone(), t.log_socket.clone(), t.log_udp))
            .collect()
    };
    if logs(&new) != logs(&old) {
        notes.push(
            "[[haproxy]] log_socket, log_udp or a name beside them changed: log streams are bound at start, so this takes effect at the next restart".into(),
        );
    }
    keep!(data_dir, "data_dir");
    keep!(sync, "sync");
    keep!(store, "[store]");
    keep!(max_connections, "max_connections");
    keep!(first_bytes_timeout, "first_bytes_timeout");
    keep!(insecure, "insecure");
    keep!(metrics_listen, "metrics_listen");
    keep!(console_listen, "console_listen");
    keep!(console_hosts, "console_hosts");
    keep!(certificates.responder, "[certificates] responder");
    keep!(certificates.renew_check, "[certificates] renew_check");
    keep!(history.prune_interval, "[history] prune_interval");
    keep!(shutdown_grace, "shutdown_grace");
    let files = new.tls.files(&new.cert_root());
    let tls = match (&r.tls, files) {
        (Some(tls), Some(files)) => Some((tls, files)),
        (None, None) => None,
        (Some(_), None) => {
            return Err("[tls] is gone: a listener cannot drop TLS without a restart".into());
        }
        (None, Some(_)) => {
            return Err("[tls] is new: a listener takes up TLS at a restart, not a reload".into());
        }
    };
    let tls = match tls {
        Some((tls, files)) => {
            let prepared = tokio::task::spawn_blocking(move || crate::tls::prepare(files))
                .await
                .map_err(|e| format!("TLS: {e}"))??;
            Some((tls, prepared))
        }
        None => None,
    };
    let auth = Auth::prepare(&new)?;
    // Everything checked: swap it all in.
    r.auth.install(auth);
    if let Some((tls, prepared)) = tls {
        tls.install(prepared);
    }
    r.engine.set_config(Arc::new(new));
    Ok(notes)
}

/// Tells systemd (when NOTIFY_SOCKET is set; a no-op otherwise). A failure is logged, never
/// fatal: the daemon works without a service manager.
fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// Pings systemd's watchdog at half its interval (WATCHDOG_USEC), from the runtime that serves
/// calls: a daemon whose runtime is stuck stops pinging, and systemd restarts it.
fn spawn_watchdog(stop: CancellationToken) {
    let Some(every) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = every / 2;
    tokio::spawn(async move {
        loop {
            notify(&[sd_notify::NotifyState::Watchdog]);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
}

/// Gives the unix socket to `group`, read-write for it (connecting needs write permission).
fn give_to_group(path: &std::path::Path, group: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let gid = nix::unistd::Group::from_name(group)
        .ok()
        .flatten()
        .ok_or_else(|| std::io::Error::other(format!("no group '{group}'")))?
        .gid;
    nix::unistd::chown(path, None, Some(gid)).map_err(std::io::Error::from)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
}
