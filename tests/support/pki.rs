//! A small PKI for TLS tests: CAs, a server certificate for localhost and 127.0.0.1, client
//! certificates with chosen subjects and validity, written as PEM files; and gRPC channels
//! over TLS that trust a CA file and may present a client certificate.

use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::transport::{Channel, Endpoint, Uri};

/// A certificate authority.
pub struct Ca {
    pub params: CertificateParams,
    pub key: KeyPair,
    pub pem: String,
}

/// A leaf certificate and its key, in PEM files.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, &self.pem).unwrap();
        path.to_owned()
    }

    fn sign(&self, mut params: CertificateParams, dir: &Path, name: &str) -> Leaf {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        Leaf {
            cert: c,
            key: k,
            pem: cert.pem(),
        }
    }

    /// A server certificate for localhost and 127.0.0.1.
    pub fn server(&self, dir: &Path, name: &str) -> Leaf {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, dir, name)
    }

    /// A client certificate with this CN and O; `expired` makes one that ended yesterday.
    pub fn client(&self, dir: &Path, name: &str, cn: &str, o: &str, expired: bool) -> Leaf {
        let mut params = CertificateParams::new(vec![format!("{cn}.clients.test")]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.distinguished_name.push(DnType::OrganizationName, o);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        self.sign(params, dir, name)
    }
}

/// A TLS client configuration trusting `ca` (a PEM file), presenting `client` if given.
pub fn client_config(ca: &Path, client: Option<&Leaf>) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        Some(l) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&l.cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(&l.key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// A TLS handshake with `addr` (host:port on loopback) as "localhost": the server's leaf
/// certificate (PEM-free DER), or the error.
pub async fn handshake(
    addr: &str,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = connector.connect(name, tcp).await?;
    // With TLS 1.3 a refused client certificate shows only on the first read.
    use tokio::io::AsyncWriteExt;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    s.flush().await?;
    Ok(s)
}

/// The DER of the certificate a TLS listener presents now.
pub async fn served_cert(addr: &str, ca: &Path) -> Vec<u8> {
    let s = handshake(addr, client_config(ca, None)).await.unwrap();
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A gRPC channel to `addr` over TLS (server name "localhost").
pub async fn channel(
    addr: &str,
    config: rustls::ClientConfig,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let addr = addr.to_owned();
    Endpoint::from_shared(format!(
        "https://localhost:{}",
        addr.rsplit(':').next().unwrap()
    ))
    .unwrap()
    .connect_with_connector(tower::service_fn(move |_: Uri| {
        let (connector, addr) = (connector.clone(), addr.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    }))
    .await
}
