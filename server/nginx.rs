//! nginx as a deploy target of certificates (`[[nginx]]`): which lineages its configuration
//! serves, `nginx -t`, a reload (SIGHUP to the master) confirmed by new worker processes, and
//! the served certificate checked over TLS when an address to check is configured.
//!
//! nginx answers `-s reload` before it has tried the new configuration, and a reload that fails
//! (a port taken, a file unreadable by then) leaves the old workers serving with only a line in
//! its error log; so a reload here counts only once workers newer than it run.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An nginx that serves certificates from the lineages.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NginxTarget {
    /// What deploys name it (unique among [[haproxy]] and [[nginx]] names).
    pub name: String,
    /// Its main configuration file.
    #[serde(default = "default_config")]
    pub config: PathBuf,
    /// The nginx binary.
    #[serde(default = "default_binary")]
    pub binary: PathBuf,
    /// The master's pid file (the `pid` directive of its configuration).
    #[serde(default = "default_pid")]
    pub pid_file: PathBuf,
    /// Where a deploy checks over TLS that the new certificate is served (`IP:port`).
    #[serde(default)]
    pub verify: Option<SocketAddr>,
    /// How long new workers may take to appear after a reload.
    #[serde(default = "default_reload_timeout", with = "crate::human_time")]
    pub reload_timeout: Duration,
}

fn default_config() -> PathBuf {
    "/etc/nginx/nginx.conf".into()
}
fn default_binary() -> PathBuf {
    "/usr/sbin/nginx".into()
}
fn default_pid() -> PathBuf {
    "/run/nginx.pid".into()
}
fn default_reload_timeout() -> Duration {
    Duration::from_secs(10)
}

/// How an nginx is reloaded, as an undo entry keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Reload {
    pub(crate) binary: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) pid_file: PathBuf,
    pub(crate) timeout_ms: u64,
}

impl NginxTarget {
    pub(crate) fn reload(&self) -> Reload {
        Reload {
            binary: self.binary.clone(),
            config: self.config.clone(),
            pid_file: self.pid_file.clone(),
            timeout_ms: self.reload_timeout.as_millis() as u64,
        }
    }
}

/// Checks names and paths; `taken` are the [[haproxy]] names.
pub(crate) fn check(targets: &[NginxTarget], taken: &[&str]) -> Result<(), String> {
    let mut seen: std::collections::HashSet<&str> = taken.iter().copied().collect();
    for t in targets {
        if !crate::fsops::is_safe_name(&t.name) {
            return Err(format!(
                "nginx '{}': a name of letters, digits, '-', '_', '.'",
                t.name
            ));
        }
        if !seen.insert(&t.name) {
            return Err(format!(
                "nginx '{}': the name is taken by another [[haproxy]] or [[nginx]] target",
                t.name
            ));
        }
        for (what, p) in [
            ("config", &t.config),
            ("binary", &t.binary),
            ("pid_file", &t.pid_file),
        ] {
            if !p.is_absolute() {
                return Err(format!(
                    "nginx '{}': {what} must be an absolute path",
                    t.name
                ));
            }
        }
    }
    Ok(())
}

/// The text of a configuration and every file it includes (globs, relative to the main
/// file's directory, as nginx resolves them), comments removed; at most 200 files, 16 MiB.
pub(crate) fn read_all(main: &Path) -> Result<String, String> {
    let base = main.parent().unwrap_or(Path::new("/")).to_owned();
    let mut out = String::new();
    let mut todo = vec![main.to_owned()];
    let mut read = 0;
    let include =
        regex::Regex::new(r#"(?m)(?:^|[;{}\s])include\s+"?([^";\s]+)"?\s*;"#).expect("a pattern");
    while let Some(f) = todo.pop() {
        read += 1;
        if read > 200 || out.len() > 16 << 20 {
            return Err(format!(
                "{} includes too much (over 200 files or 16 MiB)",
                main.display()
            ));
        }
        let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        let text: String = text
            .lines()
            .map(|l| match l.find('#') {
                Some(i) => &l[..i],
                None => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        for c in include.captures_iter(&text) {
            let pat = &c[1];
            let pat = if Path::new(pat).is_absolute() {
                PathBuf::from(pat)
            } else {
                base.join(pat)
            };
            let mut found = glob_files(&pat);
            found.sort();
            found.reverse();
            todo.extend(found);
        }
        out.push_str(&text);
        out.push('\n');
    }
    Ok(out)
}

/// Files matching a pattern whose last component may hold `*` (nginx's includes are globs,
/// almost always `dir/*.conf` or `dir/*`).
fn glob_files(pat: &Path) -> Vec<PathBuf> {
    let name = pat
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains('*') && !name.contains('?') {
        return vec![pat.to_owned()];
    }
    let re = regex::Regex::new(&format!(
        "^{}$",
        regex::escape(&name)
            .replace(r"\*", ".*")
            .replace(r"\?", ".")
    ))
    .expect("a pattern");
    let dir = pat.parent().unwrap_or(Path::new("/"));
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| re.is_match(&e.file_name().to_string_lossy()))
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the configuration's `ssl_certificate` directives name a file of `live_dir`.
pub(crate) fn serves(config_text: &str, live_dir: &Path) -> bool {
    let re = regex::Regex::new(r#"ssl_certificate\s+"?([^";\s]+)"?\s*;"#).expect("a pattern");
    re.captures_iter(config_text)
        .any(|c| Path::new(&c[1]).parent() == Some(live_dir))
}

/// `nginx -t`: nginx's own words when it refuses.
pub(crate) async fn test(r: &Reload) -> Result<(), String> {
    let out = tokio::process::Command::new(&r.binary)
        .arg("-t")
        .arg("-q")
        .arg("-c")
        .arg(&r.config)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .map_err(|_| "nginx -t did not finish within 60s".to_owned())?
        .map_err(|e| format!("{}: {e}", r.binary.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let err: String = err.lines().take(4).collect::<Vec<_>>().join("; ");
    Err(format!(
        "nginx -t refused {}: {}",
        r.config.display(),
        short(&err, 400)
    ))
}

fn master(r: &Reload) -> Result<i32, String> {
    let text = std::fs::read_to_string(&r.pid_file).map_err(|e| {
        format!(
            "nginx's pid file {}: {e} (is it running?)",
            r.pid_file.display()
        )
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| format!("nginx's pid file {} holds no pid", r.pid_file.display()))?;
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(format!(
            "nginx's master {pid} (from {}) is not running",
            r.pid_file.display()
        ));
    }
    Ok(pid)
}

/// The children of `pid`, with their start times (clock ticks since boot).
fn children(pid: i32) -> Vec<(i32, u64)> {
    let mut out = Vec::new();
    let Ok(d) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in d.filter_map(|e| e.ok()) {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // After the command's closing parenthesis: state ppid ... starttime (field 22).
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.get(1).and_then(|v| v.parse::<i32>().ok()) == Some(pid)
            && let Some(start) = f.get(19).and_then(|v| v.parse::<u64>().ok())
        {
            out.push((p, start));
        }
    }
    out
}

/// Whether this nginx's master runs.
pub(crate) fn running(r: &Reload) -> bool {
    master(r).is_ok()
}

/// This nginx's worker processes now (empty when it is not running): what
/// [`reloaded_since`] compares with.
pub(crate) fn workers(r: &Reload) -> Vec<i32> {
    master(r)
        .map(|pid| children(pid).into_iter().map(|(p, _)| p).collect())
        .unwrap_or_default()
}

/// Whether a worker runs that is not one of `workers` (a reload happened since they were
/// read).
pub(crate) fn reloaded_since(r: &Reload, workers: &[i32]) -> Result<bool, String> {
    let pid = master(r)?;
    Ok(children(pid).iter().any(|(p, _)| !workers.contains(p)))
}

/// `nginx -t`, then a reload, confirmed by workers newer than it within the timeout.
pub(crate) async fn reload(r: &Reload) -> Result<(), String> {
    test(r).await?;
    let pid = master(r)?;
    let before: Vec<i32> = children(pid).into_iter().map(|(p, _)| p).collect();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .map_err(|e| format!("signalling nginx's master {pid}: {e}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(r.timeout_ms);
    loop {
        if children(pid).iter().any(|(p, _)| !before.contains(p)) {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "nginx's master {pid} started no new workers within {} ms of the reload: it kept the old configuration (see its error log)",
                r.timeout_ms
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The old workers accept connections until they have closed their listening sockets
    // (they finish open connections after that): only then is every new connection served by
    // the new configuration.
    loop {
        let listening = listening_inodes(pid);
        let accepting: Vec<i32> = before
            .iter()
            .copied()
            .filter(|p| holds_any(*p, &listening))
            .collect();
        if accepting.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "old nginx workers {accepting:?} still accept connections {} ms after the reload",
                r.timeout_ms
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The inodes of the listening TCP sockets in the network namespace of process `pid`.
fn listening_inodes(pid: i32) -> std::collections::HashSet<u64> {
    let mut out = std::collections::HashSet::new();
    for f in [
        format!("/proc/{pid}/net/tcp"),
        format!("/proc/{pid}/net/tcp6"),
    ] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if cols.get(3) == Some(&"0A")
                && let Some(inode) = cols.get(9).and_then(|i| i.parse().ok())
            {
                out.insert(inode);
            }
        }
    }
    out
}

/// Whether process `pid` (if it still runs) holds one of these sockets; one whose
/// descriptors cannot be read counts as holding them (nothing says it stopped accepting).
fn holds_any(pid: i32, inodes: &std::collections::HashSet<u64>) -> bool {
    let d = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(d) => d,
        Err(e) => return e.kind() != std::io::ErrorKind::NotFound,
    };
    d.filter_map(|e| e.ok()).any(|e| {
        std::fs::read_link(e.path())
            .ok()
            .and_then(|t| {
                t.to_string_lossy()
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse::<u64>()
                    .ok()
            })
            .is_some_and(|i| inodes.contains(&i))
    })
}

fn short(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Accepts whatever certificate the server shows: the check compares its serial with the one
/// just installed, it does not decide trust.
#[derive(Debug)]
struct AnyCert(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
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
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The leaf certificate (DER) a TLS server at `addr` presents for `sni`.
async fn peer_certificate(addr: SocketAddr, sni: &str) -> Result<Vec<u8>, String> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned())
        .map_err(|e| format!("{sni}: {e}"))?;
    let go = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let s = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {addr} for {sni}: {e}"))?;
        s.get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .ok_or_else(|| format!("{addr} presented no certificate"))
    };
    tokio::time::timeout(Duration::from_secs(5), go)
        .await
        .map_err(|_| format!("TLS with {addr}: no handshake within 5s"))?
}

/// The serial (upper-case hex) of the certificate served at `addr` for `sni`.
pub(crate) async fn served_serial(addr: SocketAddr, sni: &str) -> Result<String, String> {
    let der = peer_certificate(addr, sni).await?;
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(&der)
        }
    );
    crate::certs::lineage::read_cert(pem.as_bytes()).map(|i| i.serial)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includes_are_followed_and_the_live_files_found() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sites")).unwrap();
        std::fs::write(
            dir.path().join("nginx.conf"),
            "events {}\nhttp {\n  include sites/*.conf; # the sites\n}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("sites/a.conf"),
            "server { ssl_certificate /etc/letsencrypt/live/a.example/fullchain.pem; }\n# ssl_certificate /etc/letsencrypt/live/b.example/fullchain.pem;\n",
        )
        .unwrap();
        let text = read_all(&dir.path().join("nginx.conf")).unwrap();
        assert!(serves(&text, Path::new("/etc/letsencrypt/live/a.example")));
        assert!(
            !serves(&text, Path::new("/etc/letsencrypt/live/b.example")),
            "a comment"
        );
        assert!(!serves(&text, Path::new("/etc/letsencrypt/live/a")));
    }
}
