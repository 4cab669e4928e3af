//! Certificates: names and keys, ACME accounts, the certbot-compatible lineage on disk, and
//! the HTTP-01 responder. The `certificate_issue` job kind (kinds/certificate_issue.rs) drives
//! them step by step.

pub(crate) mod acme;
pub(crate) mod certbot;
pub(crate) mod config;
pub(crate) mod dns;

pub(crate) use config::Places;
pub(crate) mod lineage;
pub(crate) mod responder;

use crate::quote::quote;
use serde::{Deserialize, Serialize};

/// Key types a certificate may have.
pub(crate) const KEY_TYPES: [&str; 5] = ["ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"];

/// At most this many names per certificate (Let's Encrypt's limit).
pub(crate) const MAX_NAMES: usize = 100;

/// How a lineage was issued, kept beside the store so renewals repeat it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub(crate) names: Vec<String>,
    pub(crate) webroot: Option<std::path::PathBuf>,
    pub(crate) key_type: String,
    pub(crate) reuse_key: bool,
    pub(crate) deploy: Vec<String>,
    pub(crate) acme: String,
    /// "dns-01", or empty for HTTP-01.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) challenge: String,
}

/// Checks the names of an order: DNS names only, each once, at most 100, wildcards only when
/// `wildcards` (DNS-01; HTTP-01 cannot prove one). The message names the culprit.
pub(crate) fn check_names(names: &[String], wildcards: bool) -> Result<(), String> {
    if names.is_empty() {
        return Err("at least one name is needed".into());
    }
    if names.len() > MAX_NAMES {
        return Err(format!(
            "{} names: a certificate has at most {MAX_NAMES}",
            names.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for n in names {
        if n.parse::<std::net::IpAddr>().is_ok()
            || n.trim_matches(|c| c == '[' || c == ']')
                .parse::<std::net::Ipv6Addr>()
                .is_ok()
        {
            return Err(format!(
                "{} is an IP address: only DNS names can be certified here",
                quote(n)
            ));
        }
        if n.starts_with("*.") && !wildcards {
            return Err(format!(
                "{} is a wildcard: HTTP-01 cannot validate wildcards (they need DNS-01: challenge \"dns-01\", --dns in the CLI)",
                quote(n)
            ));
        }
        check_dns_name(n.strip_prefix("*.").unwrap_or(n))
            .map_err(|why| format!("{} is not a valid DNS name: {why}", quote(n)))?;
        if !seen.insert(n.to_ascii_lowercase()) {
            return Err(format!("{} is given twice", quote(n)));
        }
    }
    Ok(())
}

fn check_dns_name(n: &str) -> Result<(), String> {
    if n.len() > 253 {
        return Err("longer than 253 characters".into());
    }
    if !n.contains('.') {
        return Err("it needs at least two labels (like example.com)".into());
    }
    for label in n.split('.') {
        if label.is_empty() {
            return Err("an empty label".into());
        }
        if label.len() > 63 {
            return Err(format!(
                "label {} is longer than 63 characters",
                quote(label)
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "label '{label}' has characters other than letters, digits and '-'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label '{label}' starts or ends with '-'"));
        }
    }
    if n.rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("the last label is all digits".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_are_checked_and_the_culprit_named() {
        assert!(check_names(&names(&["example.com", "www.example.com"]), false).is_ok());
        assert!(check_names(&names(&["*.example.com", "example.com"]), true).is_ok());
        assert!(check_names(&names(&["*.*.example.com"]), true).is_err());
        assert!(check_names(&names(&["a.*.example.com"]), true).is_err());
        for (bad, says) in [
            (vec!["10.0.0.1"], "IP address"),
            (vec!["::1"], "IP address"),
            (vec!["*.example.com"], "wildcard"),
            (vec!["a.com", "A.com"], "twice"),
            (vec!["exa_mple.com"], "'exa_mple.com'"),
            (vec!["-a.com"], "starts or ends"),
            (vec!["localhost"], "two labels"),
            (vec!["a..com"], "empty label"),
            (vec![], "at least one"),
        ] {
            let err = check_names(&names(&bad), false).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
        let many: Vec<String> = (0..101).map(|i| format!("n{i}.example.com")).collect();
        assert!(
            check_names(&many, false)
                .unwrap_err()
                .contains("at most 100")
        );
    }
}

/// A lineage as the Certificates API shows it.
#[derive(Clone, Debug)]
pub(crate) struct Listed {
    pub(crate) name: String,
    pub(crate) info: lineage::CertInfo,
    pub(crate) version: u32,
    pub(crate) versions: Vec<u32>,
    pub(crate) lineage: lineage::Lineage,
    pub(crate) bundle: Option<std::path::PathBuf>,
    pub(crate) meta: Option<Meta>,
}

/// Every lineage under the root with a readable live certificate, by name.
pub(crate) fn list(config: &Places) -> Vec<Listed> {
    let live = config.root.join("live");
    let mut names: Vec<String> = std::fs::read_dir(&live)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| crate::fsops::is_safe_name(n))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.iter().filter_map(|n| get(config, n)).collect()
}

/// One lineage, if it exists and its live certificate reads.
pub(crate) fn get(config: &Places, name: &str) -> Option<Listed> {
    if !crate::fsops::is_safe_name(name) {
        return None;
    }
    let l = lineage::Lineage::new(&config.root, name);
    if !l.exists() {
        return None;
    }
    let pem = std::fs::read(l.live_file("cert")).ok()?;
    let info = lineage::read_cert(&pem).ok()?;
    let bundle = config.bundles.join(format!("{name}.pem"));
    let meta = std::fs::read(meta_file(&config.data_dir, name))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    Some(Listed {
        name: name.to_owned(),
        info,
        version: l.current().unwrap_or(0),
        versions: l.versions(),
        bundle: bundle.exists().then_some(bundle),
        meta,
        lineage: l,
    })
}

/// The file that keeps how a lineage was issued.
pub(crate) fn meta_file(data_dir: &std::path::Path, lineage: &str) -> std::path::PathBuf {
    data_dir.join("renewal").join(format!("{lineage}.json"))
}
