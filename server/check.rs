//! `statelyd --check-config`: what `nginx -t` and `haproxy -c` do for their files. The
//! configuration has already parsed and validated; this looks at the world it names — files,
//! sockets, binaries, the TLS material — and says what it found. Errors are what would stop
//! the daemon or every job of a kind; warnings are what start-up accepts but will fail later
//! (a stats socket that does not answer, a runbook step that can never run).

use crate::config::Config;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Looked at and fine.
    Ok,
    /// Accepted, but something will fail until it is fixed.
    Warning,
    /// The daemon would not start, or what it names cannot work.
    Error,
}

/// What the check found, in order.
#[derive(Debug, Default)]
pub struct Report {
    /// Each finding.
    pub findings: Vec<(Level, String)>,
}

impl Report {
    fn ok(&mut self, s: String) {
        self.findings.push((Level::Ok, s));
    }
    fn warn(&mut self, s: String) {
        self.findings.push((Level::Warning, s));
    }
    fn error(&mut self, s: String) {
        self.findings.push((Level::Error, s));
    }

    /// Whether any finding is an error.
    pub fn failed(&self) -> bool {
        self.findings.iter().any(|(l, _)| *l == Level::Error)
    }

    fn file(&mut self, what: &str, path: &Path) {
        match std::fs::File::open(path) {
            Ok(_) => self.ok(format!("{what} {} is readable", path.display())),
            Err(e) => self.error(format!("{what} {}: {e}", path.display())),
        }
    }

    fn dir(&mut self, what: &str, path: &Path, missing_is_error: bool) {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => self.ok(format!("{what} {} exists", path.display())),
            Ok(_) => self.error(format!("{what} {} is not a directory", path.display())),
            Err(e) if missing_is_error => self.error(format!("{what} {}: {e}", path.display())),
            Err(_) => self.ok(format!(
                "{what} {} does not exist yet (it is created when needed)",
                path.display()
            )),
        }
    }

    /// A socket HAProxy serves: connect, send `command`, expect an answer.
    fn socket(&mut self, what: &str, path: &Path, command: &str, consequence: &str) {
        match ask(path, command) {
            Ok(n) if n > 0 => self.ok(format!("{what} {} answers", path.display())),
            Ok(_) => self.warn(format!(
                "{what} {} accepted `{}` but said nothing: {consequence}",
                path.display(),
                command.trim()
            )),
            Err(e) => self.warn(format!(
                "{what} {} does not answer ({e}): {consequence}",
                path.display()
            )),
        }
    }
}

/// Sends one command to a unix socket and reads the answer's first bytes.
fn ask(path: &Path, command: &str) -> std::io::Result<usize> {
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(command.as_bytes())?;
    let mut buf = [0u8; 256];
    s.read(&mut buf)
}

/// Looks at everything the configuration names.
pub fn check(config: &Config) -> Report {
    let mut r = Report::default();
    r.ok(format!(
        "listen {}{}",
        config.listen,
        match (config.tls.enabled(), config.insecure) {
            (true, _) => " with TLS",
            (false, true) if !config.listen.ip().is_loopback() => {
                " without TLS (insecure = true: tokens cross the network in clear)"
            }
            _ => " (loopback, plaintext)",
        }
    ));
    match std::net::TcpListener::bind(config.listen) {
        Ok(_) => r.ok(format!("{} can be bound", config.listen)),
        Err(e) => r.warn(format!(
            "{} cannot be bound now ({e}): a running statelyd holds it, or the address is not this machine's",
            config.listen
        )),
    }
    r.dir("data_dir", &config.data_dir, false);
    match &config.store.url {
        None => r.ok("[store] the ledger is SQLite in data_dir".into()),
        Some(_) => {
            r.ok(
                "[store] the ledger is on PostgreSQL (reached, and its schema checked, at start)"
                    .into(),
            );
            if let Some(f) = &config.store.password_file {
                r.file("[store] password_file", f);
            }
        }
    }
    if let Some(files) = config.tls.files(&config.cert_root()) {
        match crate::tls::build(&files) {
            Ok(_) => r.ok(format!(
                "[tls] {} and {} load{}",
                files.cert.display(),
                files.key.display(),
                match &files.client_ca {
                    Some(ca) => format!(", client CA {}", ca.display()),
                    None => String::new(),
                }
            )),
            Err(e) => r.error(e),
        }
    }
    if config.tokens.is_empty() {
        r.ok(format!(
            "no [[token]]: an operator token is generated at {}",
            config.data_dir.join("operator.token").display()
        ));
    }
    for t in &config.tokens {
        let secret = match (&t.value, &t.file) {
            (Some(v), _) => Some(v.trim().to_owned()),
            (None, Some(f)) => match std::fs::read_to_string(f) {
                Ok(s) => Some(s.trim().to_owned()),
                Err(e) => {
                    r.error(format!("token '{}': file {}: {e}", t.name, f.display()));
                    None
                }
            },
            (None, None) => None,
        };
        match secret {
            Some(s) if s.len() < 16 => r.error(format!(
                "token '{}' is shorter than 16 characters: the daemon refuses it",
                t.name
            )),
            Some(_) => r.ok(format!("token '{}' ({:?})", t.name, t.role)),
            None => {}
        }
    }
    if let Some(sock) = &config.listen_unix {
        match sock.parent() {
            Some(dir) if dir.as_os_str().is_empty() || dir.is_dir() => {
                r.ok(format!("listen_unix {}", sock.display()))
            }
            Some(dir) => r.error(format!(
                "listen_unix {}: its directory {} does not exist",
                sock.display(),
                dir.display()
            )),
            None => r.error(format!("listen_unix {} is not a file path", sock.display())),
        }
    }
    for t in &config.haproxy {
        let at = format!("[[haproxy]] '{}':", t.name);
        match crate::command::find_program(&t.binary.display().to_string()) {
            Some(p) => r.ok(format!("{at} binary {} is executable", p.display())),
            None => r.error(format!(
                "{at} binary {} is not an executable file: configurations cannot be checked or applied",
                t.binary.display()
            )),
        }
        if let Some(c) = &t.config {
            r.file(&format!("{at} config"), c);
        }
        if let Some(s) = &t.stats_socket {
            r.socket(
                &format!("{at} stats socket"),
                s,
                "show info\n",
                "stats, alerts and verification fail until HAProxy listens there",
            );
        }
        if let Some(s) = &t.master_socket {
            r.socket(
                &format!("{at} master socket"),
                s,
                "show proc\n",
                "reloads fail until HAProxy's master listens there",
            );
        }
        if let Some(argv) = &t.reload_command {
            match argv.first().and_then(|p| crate::command::find_program(p)) {
                Some(p) => r.ok(format!("{at} reload command {} is executable", p.display())),
                None => r.error(format!(
                    "{at} reload command {} is not found",
                    argv.first().map(String::as_str).unwrap_or("(empty)")
                )),
            }
        }
        if let Some(f) = &t.server_state_file
            && let Some(dir) = f.parent()
        {
            r.dir(&format!("{at} server_state_file's directory"), dir, true);
        }
        for d in t.allow_dirs.iter().flatten() {
            if !d.is_dir() {
                r.warn(format!("{at} allow_dirs {} does not exist", d.display()));
            }
        }
    }
    r.dir("[certificates] root", &config.cert_root(), false);
    for w in &config.certificates.webroots {
        if !w.is_dir() {
            r.warn(format!(
                "[certificates] webroot {} does not exist: jobs naming it fail",
                w.display()
            ));
        }
    }
    for a in &config.acme {
        for (what, f) in [("ca_file", &a.ca_file), ("eab_hmac_file", &a.eab_hmac_file)] {
            if let Some(f) = f {
                r.file(&format!("[[acme]] '{}': {what}", a.name), f);
            }
        }
    }
    if let Some(smtp) = &config.smtp {
        for (what, f) in [
            ("password_file", &smtp.password_file),
            ("ca_file", &smtp.ca_file),
        ] {
            if let Some(f) = f {
                r.file(&format!("[smtp] {what}"), f);
            }
        }
    }
    for rb in &config.runbooks {
        let warnings = crate::runbooks::warnings(rb);
        if warnings.is_empty() {
            r.ok(format!("runbook '{}': {} steps", rb.name, rb.steps.len()));
        }
        for w in warnings {
            r.warn(w);
        }
    }
    r
}
