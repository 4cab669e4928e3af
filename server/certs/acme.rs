//! ACME plumbing over instant-acme: an HTTP client with TCP_NODELAY (the stock one waits on
//! delayed ACKs, ~44 ms a request on loopback) trusting the system roots plus a configured CA,
//! accounts created once per directory and kept 0600, keys, CSRs, and CA problems in words.

use crate::certs::config::AcmeServer;
use instant_acme::{Account, AccountCredentials, ExternalAccountKey, HttpClient, NewAccount};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The HTTP client instant-acme talks through.
pub(crate) fn http_client(ca_file: Option<&Path>) -> Result<Box<dyn HttpClient>, String> {
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
        for c in CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let client: Client<_, instant_acme::BodyWrapper<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build(https);
    Ok(Box::new(client))
}

/// Where an ACME directory's account lives.
pub(crate) fn account_file(data_dir: &Path, server: &AcmeServer) -> PathBuf {
    let digest = crate::fsops::sha256_hex(server.directory.as_bytes());
    data_dir
        .join("acme")
        .join(format!("{}-{}", server.name, &digest[..16]))
        .join("account.json")
}

/// The account for a directory: the stored one, or a new one (stored 0600). `fresh` forces a
/// new registration (the CA forgot the stored account).
pub(crate) async fn account(
    data_dir: &Path,
    server: &AcmeServer,
    fresh: bool,
) -> Result<(Account, bool), String> {
    // One registration at a time, so two jobs do not both create an account.
    static REGISTERING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = REGISTERING.lock().await;
    let file = account_file(data_dir, server);
    let http = || http_client(server.ca_file.as_deref());
    let stored = match tokio::fs::read_to_string(&file).await {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("the stored account {}: {e}", file.display())),
    };
    if !fresh && let Some(text) = stored {
        let creds: AccountCredentials = serde_json::from_str(&text)
            .map_err(|e| format!("the stored account {}: {e}", file.display()))?;
        let account = Account::builder_with_http(http()?)
            .from_credentials(creds)
            .await
            .map_err(|e| describe(&e))?;
        return Ok((account, false));
    }
    let contact: Vec<&str> = server.contact.iter().map(String::as_str).collect();
    let eab = match (&server.eab_kid, &server.eab_hmac_file) {
        (Some(kid), Some(f)) => {
            use base64::Engine;
            let text = tokio::fs::read_to_string(f)
                .await
                .map_err(|e| format!("eab_hmac_file {}: {e}", f.display()))?;
            let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(text.trim().trim_end_matches('='))
                .map_err(|e| format!("eab_hmac_file {}: not base64url: {e}", f.display()))?;
            Some(ExternalAccountKey::new(kid.clone(), &key))
        }
        _ => None,
    };
    let (account, creds) = Account::builder_with_http(http()?)
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            server.directory.clone(),
            eab.as_ref(),
        )
        .await
        .map_err(|e| describe(&e))?;
    let json = serde_json::to_vec(&creds).map_err(|e| e.to_string())?;
    let path = file.clone();
    tokio::task::spawn_blocking(move || crate::fsops::write_atomic(&path, &json, 0o600, None))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot store the account in {}: {e}", file.display()))?;
    Ok((account, true))
}

/// Whether the CA says it does not know the account (e.g. a test CA restarted).
pub(crate) fn account_unknown(e: &instant_acme::Error) -> bool {
    matches!(e, instant_acme::Error::Api(p)
        if p.r#type.as_deref().is_some_and(|t| t.ends_with(":accountDoesNotExist")))
}

/// A CA problem in words: its detail and type, and each subproblem with its name.
pub(crate) fn describe(e: &instant_acme::Error) -> String {
    match e {
        instant_acme::Error::Api(p) => problem(p),
        instant_acme::Error::Timeout(_) => {
            "the CA did not finish in time (the order is still pending)".into()
        }
        instant_acme::Error::Hyper(h) => format!("cannot reach the ACME server: {h}"),
        other => {
            let mut s = other.to_string();
            let mut src = std::error::Error::source(other);
            while let Some(e) = src {
                s.push_str(&format!(": {e}"));
                src = e.source();
            }
            if s.contains("client error (Connect)") || s.contains("Connection refused") {
                format!("cannot reach the ACME server: {s}")
            } else {
                s
            }
        }
    }
}

/// An ACME problem document in words.
pub(crate) fn problem(p: &instant_acme::Problem) -> String {
    let mut s = format!(
        "the CA said: {} ({})",
        p.detail.as_deref().unwrap_or("no detail"),
        p.r#type.as_deref().unwrap_or("no type")
    );
    for sub in &p.subproblems {
        let who = match &sub.identifier {
            Some(instant_acme::Identifier::Dns(d)) => d.clone(),
            Some(other) => format!("{other:?}"),
            None => "?".into(),
        };
        s.push_str(&format!(
            "; for {who}: {} ({})",
            sub.detail.as_deref().unwrap_or("no detail"),
            sub.r#type.as_deref().unwrap_or("no type")
        ));
    }
    s
}

/// A new private key of the given type, as rcgen uses it, with its PKCS#8 PEM.
pub(crate) fn new_key(key_type: &str) -> Result<rcgen::KeyPair, String> {
    let bits = match key_type {
        "ec256" => {
            return rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| e.to_string());
        }
        "ec384" => {
            return rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
                .map_err(|e| e.to_string());
        }
        "rsa2048" => 2048,
        "rsa3072" => 3072,
        "rsa4096" => 4096,
        other => return Err(format!("unknown key type '{other}'")),
    };
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
        .map_err(|e| format!("RSA key generation: {e}"))?;
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| format!("RSA key encoding: {e}"))?;
    rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256)
        .map_err(|e| e.to_string())
}

/// Reads a stored private key (PKCS#8 PEM) for reuse.
pub(crate) fn load_key(pem: &str) -> Result<rcgen::KeyPair, String> {
    rcgen::KeyPair::from_pem(pem).map_err(|e| format!("the lineage's key cannot be reused: {e}"))
}

/// A CSR for `names` signed by `key`, DER.
pub(crate) fn csr(names: &[String], key: &rcgen::KeyPair) -> Result<Vec<u8>, String> {
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(|e| e.to_string())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(key).map_err(|e| e.to_string())?;
    Ok(csr.der().to_vec())
}
