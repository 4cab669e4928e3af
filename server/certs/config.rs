//! Certificates as the daemon's configuration declares them: where lineages live, how
//! challenges are answered, renewal (`[certificates]`), and the ACME servers (`[[acme]]`).

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where certificates live and how they are obtained.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Certificates {
    /// The certbot-style root (archive/, live/); default `<data_dir>/letsencrypt`.
    pub root: Option<PathBuf>,
    /// Where HAProxy bundles (`<name>.pem`: fullchain + key) are written; default
    /// `<root>/haproxy`.
    pub haproxy_dir: Option<PathBuf>,
    /// The ACME server used when a job names none.
    pub default_acme: String,
    /// The ACME server a dry run uses when it names none (a test CA).
    pub dry_run_acme: String,
    /// statelyd answers HTTP-01 challenges here (route `/.well-known/acme-challenge/` to it).
    pub responder: Option<SocketAddr>,
    /// Directories a job may name as its webroot (the directory itself or beneath it).
    pub webroots: Vec<PathBuf>,
    /// Where the CA's HTTP-01 request arrives on this machine (HAProxy's port-80 frontend, or
    /// the responder itself): before an order, a probe for each name goes there and must
    /// reach the responder, so a missing route fails here rather than at the CA (whose failed
    /// validations count against its rate limit). "" skips the probe.
    pub challenge_probe: String,
    /// Renew a lineage this long before it expires.
    #[serde(with = "crate::human_time")]
    pub renew_before: Duration,
    /// How often lineages are checked for renewal; "0s" turns automatic renewal off.
    #[serde(with = "crate::human_time")]
    pub renew_check: Duration,
}

impl Default for Certificates {
    fn default() -> Self {
        Certificates {
            root: None,
            haproxy_dir: None,
            default_acme: "letsencrypt".into(),
            dry_run_acme: "letsencrypt-staging".into(),
            responder: None,
            webroots: Vec::new(),
            challenge_probe: "127.0.0.1:80".into(),
            renew_before: Duration::from_secs(30 * 86400),
            renew_check: Duration::from_secs(12 * 3600),
        }
    }
}

/// Where a daemon's certificates live on disk.
#[derive(Debug, Clone)]
pub(crate) struct Places {
    /// The certbot-style root (archive/, live/).
    pub(crate) root: PathBuf,
    /// Where HAProxy bundles are written.
    pub(crate) bundles: PathBuf,
    /// The daemon's data directory (renewal settings of each lineage).
    pub(crate) data_dir: PathBuf,
}

/// An ACME server (directory) certificates can be ordered from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeServer {
    /// What jobs call it.
    pub name: String,
    /// The directory URL.
    pub directory: String,
    /// Contact addresses for the account (`mailto:...`).
    #[serde(default)]
    pub contact: Vec<String>,
    /// Extra CA certificates (PEM) for the directory's TLS (a private ACME server).
    pub ca_file: Option<PathBuf>,
    /// External Account Binding: the key id.
    pub eab_kid: Option<String>,
    /// External Account Binding: a file holding the base64url HMAC key.
    pub eab_hmac_file: Option<PathBuf>,
}

/// An ACME server by name: configured ones first, then the built-in Let's Encrypt ones.
pub(crate) fn acme_server(configured: &[AcmeServer], name: &str) -> Option<AcmeServer> {
    if let Some(a) = configured.iter().find(|a| a.name == name) {
        return Some(a.clone());
    }
    let directory = match name {
        "letsencrypt" => "https://acme-v02.api.letsencrypt.org/directory",
        "letsencrypt-staging" => "https://acme-staging-v02.api.letsencrypt.org/directory",
        _ => return None,
    };
    Some(AcmeServer {
        name: name.into(),
        directory: directory.into(),
        contact: Vec::new(),
        ca_file: None,
        eab_kid: None,
        eab_hmac_file: None,
    })
}

/// Checks what the schema alone cannot: ACME server names and URLs, the default server,
/// webroots.
pub(crate) fn check(acme: &[AcmeServer], certificates: &Certificates) -> Result<(), String> {
    for a in acme {
        if !crate::fsops::is_safe_name(&a.name) {
            return Err(format!(
                "acme '{}': a name of letters, digits, '-', '_', '.'",
                a.name
            ));
        }
        if !a.directory.starts_with("https://") {
            return Err(format!(
                "acme '{}': directory must be an https:// URL",
                a.name
            ));
        }
        if a.eab_kid.is_some() != a.eab_hmac_file.is_some() {
            return Err(format!(
                "acme '{}': eab_kid and eab_hmac_file go together",
                a.name
            ));
        }
    }
    if acme_server(acme, &certificates.default_acme).is_none() {
        return Err(format!(
            "certificates: default_acme '{}' is not an [[acme]] name nor letsencrypt / letsencrypt-staging",
            certificates.default_acme
        ));
    }
    if acme_server(acme, &certificates.dry_run_acme).is_none() {
        return Err(format!(
            "certificates: dry_run_acme '{}' is not an [[acme]] name nor letsencrypt / letsencrypt-staging",
            certificates.dry_run_acme
        ));
    }
    if !certificates.challenge_probe.is_empty()
        && certificates.challenge_probe.parse::<SocketAddr>().is_err()
    {
        return Err(format!(
            "certificates: challenge_probe '{}' is not an address like 127.0.0.1:80 (\"\" turns the probe off)",
            certificates.challenge_probe
        ));
    }
    for w in &certificates.webroots {
        if !w.is_absolute() {
            return Err(format!(
                "certificates: webroot {} must be an absolute path",
                w.display()
            ));
        }
    }
    Ok(())
}
