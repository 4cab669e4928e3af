//! A certbot-compatible lineage: `archive/<name>/{cert,chain,fullchain,privkey}N.pem` and
//! `live/<name>/*.pem` as relative symlinks to the current version; plus reading what is live.

use std::path::{Path, PathBuf};

/// The four files of a version, as certbot names them.
pub(crate) const FILES: [&str; 4] = ["cert", "chain", "fullchain", "privkey"];

/// A lineage under a certificate root.
#[derive(Clone, Debug)]
pub(crate) struct Lineage {
    pub(crate) root: PathBuf,
    pub(crate) name: String,
}

impl Lineage {
    pub(crate) fn new(root: &Path, name: &str) -> Lineage {
        Lineage {
            root: root.to_owned(),
            name: name.to_owned(),
        }
    }

    pub(crate) fn archive_dir(&self) -> PathBuf {
        self.root.join("archive").join(&self.name)
    }

    pub(crate) fn live_dir(&self) -> PathBuf {
        self.root.join("live").join(&self.name)
    }

    /// `archive/<name>/<file>N.pem`.
    pub(crate) fn archive_file(&self, file: &str, n: u32) -> PathBuf {
        self.archive_dir().join(format!("{file}{n}.pem"))
    }

    /// `live/<name>/<file>.pem`.
    pub(crate) fn live_file(&self, file: &str) -> PathBuf {
        self.live_dir().join(format!("{file}.pem"))
    }

    /// What a live link holds: `../../archive/<name>/<file>N.pem`.
    pub(crate) fn link_target(&self, file: &str, n: u32) -> PathBuf {
        PathBuf::from(format!("../../archive/{}/{file}{n}.pem", self.name))
    }

    /// The versions in the archive, ascending.
    pub(crate) fn versions(&self) -> Vec<u32> {
        let mut v: Vec<u32> = std::fs::read_dir(self.archive_dir())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.strip_prefix("cert")?.strip_suffix(".pem")?.parse().ok()
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// The version `live/<name>/cert.pem` points at.
    pub(crate) fn current(&self) -> Option<u32> {
        let target = std::fs::read_link(self.live_file("cert")).ok()?;
        let file = target.file_name()?.to_string_lossy().into_owned();
        file.strip_prefix("cert")?
            .strip_suffix(".pem")?
            .parse()
            .ok()
    }

    /// Whether it exists (a live cert.pem).
    pub(crate) fn exists(&self) -> bool {
        self.live_file("cert").exists()
    }
}

/// What a live certificate says about itself.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CertInfo {
    pub(crate) names: Vec<String>,
    /// Unix seconds.
    pub(crate) not_before: i64,
    /// Unix seconds.
    pub(crate) not_after: i64,
    /// Upper-case hex, no leading zero byte.
    pub(crate) serial: String,
    pub(crate) issuer: String,
    pub(crate) key_type: String,
}

/// Reads the first certificate of a PEM file.
pub(crate) fn read_cert(pem: &[u8]) -> Result<CertInfo, String> {
    use x509_parser::prelude::*;
    let (_, pem) = parse_x509_pem(pem).map_err(|e| format!("not a PEM certificate: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for g in &san.value.general_names {
            if let GeneralName::DNSName(d) = g {
                names.push(d.to_string());
            }
        }
    }
    let key_type = match cert.public_key().parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(r)) => format!("rsa{}", r.key_size()),
        Ok(x509_parser::public_key::PublicKey::EC(e)) => format!("ec{}", e.key_size()),
        _ => "unknown".into(),
    };
    let serial = cert.raw_serial();
    let serial = match serial {
        [0, rest @ ..] if !rest.is_empty() => rest,
        s => s,
    };
    Ok(CertInfo {
        names,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        serial: hex::encode_upper(serial),
        issuer: cert.issuer().to_string(),
        key_type,
    })
}

/// Whether the first certificate of `cert_pem` is for the public key of `key_pem`.
pub(crate) fn key_matches(cert_pem: &[u8], key_pem: &str) -> bool {
    use x509_parser::prelude::*;
    let Ok(key) = rcgen::KeyPair::from_pem(key_pem) else {
        return false;
    };
    let Ok((_, pem)) = parse_x509_pem(cert_pem) else {
        return false;
    };
    let Ok(cert) = pem.parse_x509() else {
        return false;
    };
    cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw()
}

/// Splits a PEM chain (leaf first) into the leaf and the rest.
pub(crate) fn split_chain(pem: &str) -> Result<(String, String), String> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut blocks = Vec::new();
    let mut rest = pem;
    while let Some(i) = rest.find(END) {
        let block = rest[..i + END.len()].trim();
        if let Some(start) = block.find("-----BEGIN CERTIFICATE-----") {
            blocks.push(format!("{}\n", &block[start..]));
        }
        rest = &rest[i + END.len()..];
    }
    match blocks.split_first() {
        Some((leaf, chain)) if !chain.is_empty() => Ok((leaf.clone(), chain.concat())),
        Some(_) => Err("the CA sent a certificate without its chain".into()),
        None => Err("the CA sent no certificate".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_current_come_from_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let l = Lineage::new(dir.path(), "example.com");
        assert!(l.versions().is_empty() && l.current().is_none() && !l.exists());
        std::fs::create_dir_all(l.archive_dir()).unwrap();
        for n in [1, 2, 10] {
            std::fs::write(l.archive_file("cert", n), "x").unwrap();
        }
        assert_eq!(l.versions(), [1, 2, 10]);
        std::fs::create_dir_all(l.live_dir()).unwrap();
        std::os::unix::fs::symlink(l.link_target("cert", 2), l.live_file("cert")).unwrap();
        assert_eq!(l.current(), Some(2));
        assert!(l.exists(), "the relative link resolves");
    }

    #[test]
    fn a_chain_splits_into_leaf_and_the_rest() {
        let c = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n\n-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        let (leaf, chain) = split_chain(c).unwrap();
        assert!(leaf.contains("AAA") && !leaf.contains("BBB"));
        assert!(chain.contains("BBB") && !chain.contains("AAA"));
        assert!(split_chain("nothing").is_err());
    }
}
