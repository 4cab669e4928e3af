//! A real ACME server for the tests: Debian's `pebble`, with `pebble-challtestsrv` as its DNS
//! (every name resolves to 127.0.0.1), on free loopback ports, with a test CA made here for
//! Pebble's own HTTPS listener (the package ships none).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const PEBBLE: &str = "/usr/bin/pebble";
pub const CHALLTESTSRV: &str = "/usr/bin/pebble-challtestsrv";

pub struct Pebble {
    pebble: Child,
    chall: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub mgmt: u16,
    /// Where Pebble connects to validate HTTP-01 (127.0.0.1:http_port).
    pub http_port: u16,
    /// The CA of Pebble's HTTPS listener (for the ACME client).
    pub ca_file: PathBuf,
    pub ca_pem: String,
}

impl Pebble {
    /// Pebble for repeatable runs: no validation sleep, no nonce rejection, no authz reuse.
    pub fn start(http_port: u16) -> Pebble {
        Self::start_with(http_port, true)
    }

    /// With `quiet` false, Pebble's upstream defaults: 5% of nonces rejected, authorizations
    /// reused half the time.
    pub fn start_with(http_port: u16, quiet: bool) -> Pebble {
        Self::start_full(http_port, quiet, &[])
    }

    /// With names Pebble refuses to issue for (its domain blocklist).
    pub fn start_full(http_port: u16, quiet: bool, blocked: &[&str]) -> Pebble {
        Self::start_config(
            http_port,
            quiet,
            serde_json::json!({ "domainBlocklist": blocked }),
        )
    }

    /// With more keys in Pebble's configuration.
    pub fn start_config(http_port: u16, quiet: bool, more: serde_json::Value) -> Pebble {
        Self::start_inner(http_port, quiet, more, None)
    }

    /// Resolving every name (and validating DNS-01) through this DNS server instead of
    /// pebble-challtestsrv: a real authoritative server for the test's zone.
    pub fn start_dns(http_port: u16, dns: std::net::SocketAddr) -> Pebble {
        Self::start_inner(http_port, true, serde_json::json!({}), Some(dns))
    }

    fn start_inner(
        http_port: u16,
        quiet: bool,
        more: serde_json::Value,
        dns_server: Option<std::net::SocketAddr>,
    ) -> Pebble {
        for bin in [PEBBLE, CHALLTESTSRV] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is not installed; scripts/test.sh installs the Debian package pebble"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "stately test minica");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let ca_file = dir.path().join("minica.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem()).unwrap();
        let mut attempt = 0;
        let (pebble, chall, port, mgmt) = loop {
            attempt += 1;
            let (port, mgmt, dns, chall_mgmt, tls) = (
                super::free_port(),
                super::free_port(),
                super::free_port(),
                super::free_port(),
                super::free_port(),
            );
            let cfg = serde_json::json!({"pebble": {
                "listenAddress": format!("127.0.0.1:{port}"),
                "managementListenAddress": format!("127.0.0.1:{mgmt}"),
                "certificate": dir.path().join("cert.pem"),
                "privateKey": dir.path().join("key.pem"),
                "httpPort": http_port,
                "tlsPort": tls,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }});
            let mut cfg = cfg;
            if let (Some(p), Some(more)) = (cfg["pebble"].as_object_mut(), more.as_object()) {
                p.extend(more.clone());
            }
            std::fs::write(dir.path().join("pebble.json"), cfg.to_string()).unwrap();
            let (mut chall, dns) = match dns_server {
                Some(d) => (None, d.to_string()),
                None => (
                    Some(
                        Command::new(CHALLTESTSRV)
                            .args(["-management", &format!("127.0.0.1:{chall_mgmt}")])
                            .args(["-dns01", &format!("127.0.0.1:{dns}")])
                            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()
                            .expect("pebble-challtestsrv starts"),
                    ),
                    format!("127.0.0.1:{dns}"),
                ),
            };
            let mut cmd = Command::new(PEBBLE);
            cmd.arg("-config")
                .arg(dir.path().join("pebble.json"))
                .args(["-dnsserver", &dns])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            if quiet {
                cmd.env("PEBBLE_WFE_NONCEREJECT", "0")
                    .env("PEBBLE_AUTHZREUSE", "0");
            }
            let mut pebble = cmd.spawn().expect("pebble starts");
            // Pebble logs "Listening on: ..." once it serves; read its output until then.
            let out = pebble.stdout.take().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut ready = Some(tx);
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if (line.contains("Listening on") || line.contains("ACME directory available"))
                        && let Some(tx) = ready.take()
                    {
                        let _ = tx.send(());
                    }
                }
            });
            rx.recv_timeout(Duration::from_secs(20))
                .expect("pebble started listening");
            // Pebble logs before it binds, and a free port may be taken by another test
            // between `free_port` and the bind: a Pebble that exits (its bind failed) is
            // started again on other ports, lest the port answer for someone else.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let mut listening = false;
            while std::time::Instant::now() < deadline {
                if pebble.try_wait().ok().flatten().is_some() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    std::thread::sleep(Duration::from_millis(100));
                    listening = pebble.try_wait().ok().flatten().is_none();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if !listening {
                let _ = pebble.kill();
                let _ = pebble.wait();
                if let Some(c) = chall.as_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                assert!(attempt < 5, "pebble never listened");
                continue;
            }
            break (pebble, chall, port, mgmt);
        };
        let ca_pem = ca_cert.pem();
        Pebble {
            pebble,
            chall,
            dir,
            port,
            mgmt,
            http_port,
            ca_file,
            ca_pem,
        }
    }

    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// The `[[acme]]` table naming this Pebble "pebble" (and the default).
    pub fn config(&self) -> String {
        format!(
            "[[acme]]\nname = \"pebble\"\ndirectory = \"{}\"\nca_file = \"{}\"\ncontact = [\"mailto:ops@example.test\"]\n",
            self.directory(),
            self.ca_file.display()
        )
    }

    /// The root that signs this run's certificates (random per start).
    pub async fn root(&self) -> String {
        https_get(self.mgmt, "/roots/0", &self.ca_pem).await
    }

    pub async fn intermediate(&self) -> String {
        https_get(self.mgmt, "/intermediates/0", &self.ca_pem).await
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.pebble.kill();
        let _ = self.pebble.wait();
        if let Some(c) = self.chall.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// GET over HTTPS on 127.0.0.1 (HTTP/1.0, so the body ends with the connection).
pub async fn https_get(port: u16, path: &str, ca_pem: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut b = Vec::new();
    let _ = s.read_to_end(&mut b).await;
    let text = String::from_utf8_lossy(&b).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// Connects with TLS to 127.0.0.1:port asking for `sni`, and returns the certificate the
/// server presented (DER), whatever it is.
pub async fn served_cert(port: u16, sni: &str) -> Vec<u8> {
    #[derive(Debug)]
    struct Any(std::sync::Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(Any(provider())))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let s = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Verifies a PEM chain (leaf first) for `name` against `root_pem`, as a TLS client would.
pub fn verify_chain(fullchain: &str, root_pem: &str, name: &str) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(c.unwrap()).map_err(|e| e.to_string())?;
    }
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(fullchain.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        provider(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    use rustls::client::danger::ServerCertVerifier;
    verifier
        .verify_server_cert(
            &certs[0],
            &certs[1..],
            &rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            rustls_pki_types::UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

use rustls_pki_types::pem::PemObject;
