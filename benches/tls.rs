//! TLS on the listener, beside plaintext in the same run: two statelyd processes alike but for
//! `[tls]`, each called over one established connection (unary ListRunbooks with a token,
//! one call each in turn so both see the same machine, three rounds); then fresh TLS handshakes per second
//! (sequential, and 8 at a time); then the daemon's memory per idle connection (1000 open
//! gRPC channels, RSS before and after), TLS and plaintext.
//!
//! `cargo bench --bench tls` (BENCH_CALLS=10000, BENCH_HANDSHAKES=1000, BENCH_IDLE=1000).

mod support;

use hyper_util::rt::TokioIo;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint, Uri};

const TOKEN: &str = "bench-operator-token-000000";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A CA and a server certificate for localhost, as PEM files in `dir`; returns the CA file.
fn pki(dir: &Path) -> std::path::PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "bench CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = leaf
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .unwrap();
    std::fs::write(dir.join("server.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    dir.join("ca.pem")
}

fn start(dir: &Path, tls: bool) -> (std::process::Child, String) {
    let data = dir.join(if tls { "tls-data" } else { "plain-data" });
    let config = dir.join(if tls { "tls.toml" } else { "plain.toml" });
    let tls_table = if tls {
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            dir.join("server.crt").display(),
            dir.join("server.key").display()
        )
    } else {
        String::new()
    };
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{tls_table}[[token]]\nname = \"b\"\nrole = \"operator\"\nvalue = \"{TOKEN}\"\n",
            data.display()
        ),
    )
    .unwrap();
    support::spawn_statelyd(&config)
}

fn client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(c)
}

async fn tls_channel(addr: &str, config: Arc<rustls::ClientConfig>) -> Channel {
    let connector = tokio_rustls::TlsConnector::from(config);
    let addr = addr.to_owned();
    Endpoint::from_static("https://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (connector, addr) = (connector.clone(), addr.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                let _ = tcp.set_nodelay(true);
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                Ok::<_, std::io::Error>(TokioIo::new(connector.connect(name, tcp).await?))
            }
        }))
        .await
        .expect("TLS channel")
}

async fn plain_channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("channel")
}

type Jobs = stately::pb::jobs_client::JobsClient<
    tonic::service::interceptor::InterceptedService<Channel, support::Auth>,
>;

async fn call(c: &mut Jobs) -> Duration {
    let t = Instant::now();
    c.list_runbooks(stately::pb::ListRunbooksRequest {})
        .await
        .expect("ListRunbooks");
    t.elapsed()
}

fn q(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    v[((v.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (soft, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    if soft < 8192 {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
            .unwrap();
    }
    let calls = env_or("BENCH_CALLS", 10000);
    let handshakes = env_or("BENCH_HANDSHAKES", 1000);
    let idle = env_or("BENCH_IDLE", 1000);
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path());
    let config = client_config(&ca);
    let (mut tls_d, tls_addr) = start(dir.path(), true);
    let (mut plain_d, plain_addr) = start(dir.path(), false);

    // Unary latency over one established connection each, alternating blocks of 100.
    let mut tls_c = stately::pb::jobs_client::JobsClient::with_interceptor(
        tls_channel(&tls_addr, config.clone()).await,
        support::Auth(TOKEN),
    );
    let mut plain_c = stately::pb::jobs_client::JobsClient::with_interceptor(
        plain_channel(&plain_addr).await,
        support::Auth(TOKEN),
    );
    for _ in 0..200 {
        call(&mut tls_c).await;
        call(&mut plain_c).await;
    }
    // Three rounds, each alternating one call over TLS and one in plaintext, so both see the
    // same moments of a noisy machine.
    for round in 1..=3 {
        let (mut t, mut p) = (Vec::new(), Vec::new());
        for _ in 0..calls {
            t.push(call(&mut tls_c).await);
            p.push(call(&mut plain_c).await);
        }
        let (tp50, tp99, pp50, pp99) = (
            q(&mut t, 0.5),
            q(&mut t, 0.99),
            q(&mut p, 0.5),
            q(&mut p, 0.99),
        );
        println!(
            "round {round}: unary ListRunbooks over one connection, {} calls each: TLS p50 {tp50:.0} µs p99 {tp99:.0} µs; plaintext p50 {pp50:.0} µs p99 {pp99:.0} µs; ratio p50 {:.2}, p99 {:.2}",
            t.len(),
            tp50 / pp50,
            tp99 / pp99
        );
    }

    // Fresh TLS handshakes (TCP connect + TLS 1.3 handshake + the first application bytes,
    // so the server has finished its side too), sequential and 8 at a time.
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let one = |connector: tokio_rustls::TlsConnector, addr: String| async move {
        use tokio::io::AsyncWriteExt;
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut s = connector.connect(name, tcp).await.expect("handshake");
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        s.flush().await.unwrap();
    };
    let t0 = Instant::now();
    for _ in 0..handshakes {
        one(connector.clone(), tls_addr.clone()).await;
    }
    let sequential = handshakes as f64 / t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let per = handshakes / 8;
    for _ in 0..8 {
        let (c, a) = (connector.clone(), tls_addr.clone());
        set.spawn(async move {
            for _ in 0..per {
                one(c.clone(), a.clone()).await;
            }
        });
    }
    while set.join_next().await.is_some() {}
    let parallel = (per * 8) as f64 / t0.elapsed().as_secs_f64();
    println!(
        "TLS handshakes: {sequential:.0}/s one at a time, {parallel:.0}/s 8 at a time (client and server on the same 2 cores)"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Memory per idle connection: RSS of each daemon before and after `idle` open channels.
    let measure = |pid: u32| rss_kib(pid);
    let before_tls = measure(tls_d.id());
    let mut keep = Vec::new();
    for _ in 0..idle {
        keep.push(tls_channel(&tls_addr, config.clone()).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_tls = measure(tls_d.id());
    drop(keep);
    let before_plain = measure(plain_d.id());
    let mut keep = Vec::new();
    for _ in 0..idle {
        keep.push(plain_channel(&plain_addr).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_plain = measure(plain_d.id());
    drop(keep);
    println!(
        "memory per idle connection ({idle} open): TLS {:.1} KiB, plaintext {:.1} KiB (RSS {before_tls}→{after_tls} KiB and {before_plain}→{after_plain} KiB)",
        (after_tls.saturating_sub(before_tls)) as f64 / idle as f64,
        (after_plain.saturating_sub(before_plain)) as f64 / idle as f64,
    );
    let _ = tls_d.kill();
    let _ = plain_d.kill();
}
