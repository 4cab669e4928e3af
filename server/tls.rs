//! The listener's TLS: a certificate and key (or a lineage stately itself issues), an optional
//! client CA for mTLS, and a reload that swaps them in when their files change or on SIGHUP,
//! without touching open connections (each connection takes the configuration current when it
//! arrived). tonic's own TLS cannot be reloaded, so the accept loop in `listen` runs the
//! handshake over tokio-rustls.

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

/// `[tls]` in the configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The certificate chain (PEM), leaf first.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// Instead of cert and key: a lineage under the certificate root that stately issues and
    /// renews (`live/<lineage>/fullchain.pem` and `privkey.pem`).
    pub lineage: Option<String>,
    /// CA certificates (PEM) client certificates must chain to: mTLS.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: `required` (a client without a certificate is refused in the
    /// handshake) or `optional` (it may still authenticate with a token).
    pub client_auth: ClientAuth,
}

/// Whether a client certificate is required.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Refused without one.
    #[default]
    Required,
    /// Tokens still work without one.
    Optional,
}

impl TlsConfig {
    /// Whether TLS is configured at all.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.lineage.is_some()
    }

    /// Checks the shape: cert with key, or a lineage, not both.
    pub(crate) fn check(&self) -> Result<(), String> {
        match (&self.cert, &self.key, &self.lineage) {
            (None, None, None) if self.client_ca.is_some() => Err(
                "[tls] client_ca needs a server certificate: give cert and key, or lineage".into(),
            ),
            (None, None, None) => Ok(()),
            (Some(_), Some(_), None) | (None, None, Some(_)) => Ok(()),
            (_, _, Some(_)) => Err("[tls] give either lineage or cert and key, not both".into()),
            _ => Err("[tls] cert and key go together".into()),
        }
    }

    /// The files the listener's TLS is built from: certificate, key, client CA.
    pub(crate) fn files(&self, cert_root: &Path) -> Option<Files> {
        let (cert, key) = match (&self.cert, &self.key, &self.lineage) {
            (Some(c), Some(k), _) => (c.clone(), k.clone()),
            (_, _, Some(l)) => {
                let live = cert_root.join("live").join(l);
                (live.join("fullchain.pem"), live.join("privkey.pem"))
            }
            _ => return None,
        };
        Some(Files {
            cert,
            key,
            client_ca: self.client_ca.clone(),
            client_auth: self.client_auth,
        })
    }
}

/// Where the listener's TLS comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Files {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) client_ca: Option<PathBuf>,
    pub(crate) client_auth: ClientAuth,
}

/// What a file looked like when last read: a change of any of these means read it again
/// (renewal renames a new file into place, so the inode changes even within one second).
type Stamp = Vec<Option<(u64, u64, SystemTime, u64)>>;

fn stamp(files: &Files) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| {
        std::fs::metadata(p).ok().map(|m| {
            (
                m.dev(),
                m.ino(),
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                m.len(),
            )
        })
    })
    .collect()
}

/// The current server configuration, swapped whole on reload.
pub(crate) struct Tls {
    current: RwLock<(Arc<ServerConfig>, u64)>,
    /// The files and how they looked just before `current` was built from them (a change
    /// after that is seen at the next look).
    source: Mutex<(Files, Stamp)>,
    /// Counts changes of the client CA: a connection verified against an older one is asked
    /// to reconnect (see `auth`), so a CA taken out of the file stops its certificates.
    ca_generation: Arc<std::sync::atomic::AtomicU64>,
}

/// A configuration built from files, ready to swap in.
pub(crate) struct Prepared {
    files: Files,
    stamp: Stamp,
    config: ServerConfig,
}

/// Builds a configuration from `files`, stamping them first.
pub(crate) fn prepare(files: Files) -> Result<Prepared, String> {
    let stamp = stamp(&files);
    let config = build(&files)?;
    Ok(Prepared {
        files,
        stamp,
        config,
    })
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

/// How often the files are looked at for a change.
const WATCH_EVERY: Duration = Duration::from_secs(1);

impl Tls {
    /// Builds the configuration from the files, or says what is wrong with them.
    pub(crate) fn load(files: Files) -> Result<Tls, String> {
        let p = prepare(files)?;
        Ok(Tls {
            current: RwLock::new((Arc::new(p.config), 0)),
            source: Mutex::new((p.files, p.stamp)),
            ca_generation: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    /// The configuration a new connection gets, and the client CA generation it verifies
    /// against.
    pub(crate) fn current_with_generation(&self) -> (Arc<ServerConfig>, u64) {
        self.current.read().expect("tls lock").clone()
    }

    /// The client CA generation, shared with the authentication.
    pub(crate) fn ca_generation(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.ca_generation.clone()
    }

    /// Swaps `config` in; a changed client CA begins a new generation.
    fn swap(&self, source: &mut (Files, Stamp), p: Prepared) {
        let ca_changed = source.0.client_ca != p.files.client_ca
            || source.0.client_auth != p.files.client_auth
            || (source.0.client_ca.is_some() && source.1.last() != p.stamp.last());
        let generation = if ca_changed {
            self.ca_generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                + 1
        } else {
            self.ca_generation.load(std::sync::atomic::Ordering::SeqCst)
        };
        *source = (p.files, p.stamp);
        *self.current.write().expect("tls lock") = (Arc::new(p.config), generation);
    }

    /// Reads the files again if they changed since they were last read; a set that does not
    /// load leaves the old one serving and says why. True when swapped. (SIGHUP goes through
    /// [`prepare`] and [`Tls::install`], so it is checked with the rest of the configuration.)
    pub(crate) fn reload_if_changed(&self) -> Result<bool, String> {
        let mut source = self.source.lock().expect("tls source lock");
        let files = source.0.clone();
        if stamp(&files) == source.1 {
            return Ok(false);
        }
        match prepare(files.clone()) {
            Ok(p) => {
                self.swap(&mut source, p);
                Ok(true)
            }
            Err(e) => {
                // Remember what was tried, so a broken file is reported once, not every
                // second; the old configuration keeps serving.
                source.1 = stamp(&files);
                Err(e)
            }
        }
    }

    /// Swaps in what a reload prepared (and checked). The stamp is the one taken before it
    /// was built, so files renamed meanwhile are read again at the next look.
    pub(crate) fn install(&self, p: Prepared) {
        let mut source = self.source.lock().expect("tls source lock");
        self.swap(&mut source, p);
    }

    /// Looks at the files every second until `stop`, swapping in what changed.
    pub(crate) fn watch(self: &Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let tls = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(WATCH_EVERY) => {}
                }
                let Some(tls) = tls.upgrade() else { return };
                match tokio::task::spawn_blocking(move || tls.reload_if_changed()).await {
                    Ok(Ok(true)) => {
                        tracing::info!("TLS: certificate files changed; new connections get them")
                    }
                    Ok(Ok(false)) | Err(_) => {}
                    Ok(Err(e)) => tracing::error!(
                        "TLS: the changed files do not load, so the old ones still serve: {e}"
                    ),
                }
            }
        });
    }
}

pub(crate) fn read_pem_certs(
    path: &Path,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// The server configuration from the files: ALPN h2 only (this is a gRPC listener), the
/// client CA's verifier when there is one.
pub(crate) fn build(files: &Files) -> Result<ServerConfig, String> {
    use rustls::pki_types::pem::PemObject;
    let chain = read_pem_certs(&files.cert, "[tls] cert")?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("[tls] key {}: {e}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_pem_certs(ca, "[tls] client_ca")? {
                roots
                    .add(c)
                    .map_err(|e| format!("[tls] client_ca {}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = match files.client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            }
            .build()
            .map_err(|e| format!("[tls] client_ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "[tls] cert {} and key {}: {e}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// What a client certificate says about its holder, for role rules and audit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CertIdentity {
    /// The subject's common name.
    pub cn: Option<String>,
    /// The subject's organisations.
    pub o: Vec<String>,
    /// DNS names, e-mail addresses and URIs of the subject alternative names.
    pub sans: Vec<String>,
    /// The DNS names among them (the only ones a `*.` rule matches).
    pub dns: Vec<String>,
    /// When the certificate expires (unix seconds): a connection made before cannot use it
    /// after.
    pub not_after: i64,
}

/// A name from a certificate as logs and messages may carry it: control characters (a
/// forged newline in a CN) replaced, and at most 256 characters.
fn printable(s: &str) -> String {
    s.chars()
        .take(256)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

impl CertIdentity {
    /// Reads the leaf certificate a client presented.
    pub(crate) fn of(der: &[u8]) -> Option<CertIdentity> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let subject = cert.subject();
        let cn = subject
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .map(printable);
        let o = subject
            .iter_organization()
            .filter_map(|a| a.as_str().ok())
            .map(printable)
            .collect();
        let (mut sans, mut dns) = (Vec::new(), Vec::new());
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for n in &ext.value.general_names {
                match n {
                    GeneralName::DNSName(s) => {
                        dns.push(printable(s));
                        sans.push(printable(s));
                    }
                    GeneralName::RFC822Name(s) | GeneralName::URI(s) => sans.push(printable(s)),
                    _ => {}
                }
            }
        }
        Some(CertIdentity {
            cn,
            o,
            sans,
            dns,
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// How it is named in audit lines and `whoami`: the CN, else the first SAN.
    pub(crate) fn name(&self) -> String {
        let name = self
            .cn
            .clone()
            .or_else(|| self.sans.first().cloned())
            .unwrap_or_else(|| "(no subject name)".into());
        match name.char_indices().nth(80) {
            Some((i, _)) => format!("{}…", &name[..i]),
            None => name,
        }
    }
}
