//! Runs statelyd: the engine, the gRPC services (jobs, health, reflection) on TCP and an
//! optional unix socket, and an orderly stop when `shutdown` resolves.

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
    let mut listeners = vec![format!("tcp:{addr}")];
    if let Some(path) = &config.listen_unix {
        listeners.push(format!("unix:{}", path.display()));
    }
    let jobs = JobsApi {
        engine: engine.clone(),
        stopping: stopping.clone(),
        started_at: crate::job::now_ms(),
        listeners,
    };
    let haproxy = HaproxyApi {
        targets: crate::haproxy::Targets::new(&config.haproxy, config.bundle_dir()),
        edits: crate::haproxy::edits::Context {
            bundle_dir: config.bundle_dir(),
            responder: config.certificates.responder,
            replace: false,
        },
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
    let router = || {
        Server::builder()
            .layer(crate::listen::CallsLayer)
            .layer(InputErrorsLayer)
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .add_service(health.clone())
            .add_service(InterceptedService::new(reflection_v1.clone(), auth.clone()))
            .add_service(InterceptedService::new(
                reflection_v1alpha.clone(),
                auth.clone(),
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
            ))
    };

    let mut servers = tokio::task::JoinSet::new();
    let stop = stopping.clone();
    let incoming = crate::listen::incoming(tcp, &connections, stopping.clone());
    let tcp_server =
        router().serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await });
    servers.spawn(tcp_server);
    if let Some(path) = &config.listen_unix {
        let _ = std::fs::remove_file(path);
        let uds = tokio::net::UnixListener::bind(path).map_err(|source| Error::Bind {
            addr: path.display().to_string(),
            source,
        })?;
        let stop = stopping.clone();
        let incoming = crate::listen::incoming(uds, &connections, stopping.clone());
        servers.spawn(
            router().serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }),
        );
        tracing::info!("listening on unix:{}", path.display());
    }
    tracing::info!("listening on {addr}");
    on_listen(addr);

    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        Some(r) = servers.join_next() => {
            stopping.cancel();
            engine.shutdown(config.shutdown_grace).await;
            return match r {
                Ok(r) => r.map_err(Error::from),
                Err(e) => Err(Error::Reflection(format!("server task: {e}"))),
            };
        }
    }
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
