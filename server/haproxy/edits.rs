//! The everyday HAProxy changes as structured edits of a configuration: force HTTPS, serve
//! TLS, sticky sessions, a path restricted to some addresses, a health check that sends the
//! right Host, the ACME challenge route, servers, and single lines. Each edit rewrites only
//! the lines it concerns ([`super::cfg`]), is a no-op when already in effect, and refuses a
//! conflicting line (naming it) unless told to replace it. Each also says how its effect can
//! be seen from outside ([`Proof`]), which the job checks after the reload.

use super::cfg::{Cfg, Rewrite, Section, with_words};
use crate::quote::quote;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// Edits in one job, at most.
pub const MAX_EDITS: usize = 100;
/// The backend `route_acme` sends challenges to.
pub const ACME_BACKEND: &str = "stately-acme";
const ACME_PATH: &str = "/.well-known/acme-challenge/";

/// One edit of a configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op", deny_unknown_fields)]
pub enum Edit {
    /// Redirect plain HTTP to HTTPS (the ACME challenge path exempt by default).
    ForceHttps {
        /// The frontend.
        frontend: String,
        /// Only for this Host.
        host: Option<String>,
        /// 301 (default), 302, 303, 307 or 308.
        code: Option<u16>,
        /// Keep serving `/.well-known/acme-challenge/` over plain HTTP (default true).
        exempt_acme: Option<bool>,
    },
    /// Serve TLS: `bind <addr> ssl crt <dir> alpn ...` and `X-Forwarded-Proto`.
    HttpsFrontend {
        /// The frontend (created when missing, with `backend` as its default).
        frontend: String,
        /// The bind address; default `*:443`.
        bind: Option<String>,
        /// A certificate file or directory; default the directory stately writes bundles to,
        /// so every certificate it issues is served by SNI.
        crt: Option<PathBuf>,
        /// ALPN; default `h2,http/1.1`.
        alpn: Option<String>,
        /// For a new frontend: its default backend.
        backend: Option<String>,
    },
    /// Sticky sessions by an inserted cookie.
    StickySessions {
        /// The backend.
        backend: String,
        /// The cookie's name; default SERVERID.
        cookie: Option<String>,
    },
    /// Deny a path prefix to every address outside the allow list.
    RestrictPath {
        /// The frontend.
        frontend: String,
        /// The path prefix, e.g. `/admin`.
        path: String,
        /// Addresses or CIDRs allowed.
        #[serde(default)]
        allow: Vec<String>,
        /// The status denied requests get; default 403.
        status: Option<u16>,
    },
    /// An HTTP health check that sends the right Host (an OpenLiteSpeed backend answers 404
    /// to a check without one, and HAProxy marks it DOWN).
    HealthCheck {
        /// The backend.
        backend: String,
        /// GET (default), HEAD or OPTIONS.
        method: Option<String>,
        /// Default `/`.
        uri: Option<String>,
        /// The Host header to send.
        host: Option<String>,
        /// The status that means healthy; default 200.
        expect_status: Option<u16>,
    },
    /// Send `/.well-known/acme-challenge/` to statelyd's HTTP-01 responder, before other
    /// routing.
    RouteAcme {
        /// The frontend plain HTTP arrives at.
        frontend: String,
        /// The responder's address; default the configured one.
        responder: Option<String>,
    },
    /// A server line in a backend.
    AddServer {
        /// The backend.
        backend: String,
        /// The server's name.
        name: String,
        /// `host:port`.
        address: String,
        /// More words for the line (`check`, `weight 10` ...).
        #[serde(default)]
        options: Vec<String>,
    },
    /// Remove a server line.
    RemoveServer {
        /// The backend.
        backend: String,
        /// The server's name.
        name: String,
    },
    /// Set a line in a section: the line of the same key is replaced, or the line added.
    SetLine {
        /// `global`, `defaults`, `defaults NAME`, `frontend NAME`, `backend NAME` ...
        section: String,
        /// The whole line, e.g. `timeout server 30s`.
        line: String,
        /// The words that identify the line it replaces; default its first word (two for
        /// `timeout`, `option`, `no`, `stats`, `http-check`, `tcp-check`).
        key: Option<String>,
    },
    /// Send HAProxy's log to statelyd's log stream for this target (`log_socket` or
    /// `log_udp`): `log <address> local0 notice` in global (the path made relative to a
    /// `chroot`), `log global` in a defaults section.
    LogStream {
        /// The defaults section that gets `log global`: `defaults` (the unnamed one, the
        /// default) or `defaults NAME`.
        defaults: Option<String>,
    },
    /// Remove the lines of a section that say exactly this.
    RemoveLine {
        /// As for `set_line`.
        section: String,
        /// The line's words.
        line: String,
    },
}

impl Edit {
    /// The operation's name, as the API and the CLI write it.
    pub fn op(&self) -> &'static str {
        match self {
            Edit::ForceHttps { .. } => "force_https",
            Edit::HttpsFrontend { .. } => "https_frontend",
            Edit::StickySessions { .. } => "sticky_sessions",
            Edit::RestrictPath { .. } => "restrict_path",
            Edit::HealthCheck { .. } => "health_check",
            Edit::RouteAcme { .. } => "route_acme",
            Edit::AddServer { .. } => "add_server",
            Edit::RemoveServer { .. } => "remove_server",
            Edit::SetLine { .. } => "set_line",
            Edit::RemoveLine { .. } => "remove_line",
            Edit::LogStream { .. } => "log_stream",
        }
    }
}

/// Why edits cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// An edit's own values are malformed.
    #[error("{0}")]
    Invalid(String),
    /// A section the edit names is not in the configuration.
    #[error("{0}")]
    NotFound(String),
    /// The configuration holds a line the edit would contradict (named), or a section it
    /// cannot edit safely (conditional, duplicated).
    #[error("{0}")]
    Conflict(String),
}

/// What the edits need to know beyond the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    /// Where stately writes certificate bundles (the default `crt` of `https_frontend`).
    pub(crate) bundle_dir: PathBuf,
    /// statelyd's HTTP-01 responder, if configured.
    pub(crate) responder: Option<SocketAddr>,
    /// Replace conflicting lines instead of refusing.
    pub(crate) replace: bool,
    /// Where the target's log stream reaches statelyd (`log_stream`'s address), if it has one.
    pub(crate) log_stream: Option<String>,
}

/// A change seen from a client, checked after the reload.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Proof {
    /// A plain request gets a redirect to https.
    Redirect {
        /// Where the frontend listens.
        addr: SocketAddr,
        /// The Host sent.
        host: String,
        /// The status expected.
        code: u16,
    },
    /// TLS is served there.
    Tls {
        /// Where.
        addr: SocketAddr,
    },
    /// A request for the path from an address outside the allow list is denied.
    Denied {
        /// Where the frontend listens.
        addr: SocketAddr,
        /// The path requested.
        path: String,
        /// The status expected.
        status: u16,
        /// The source address the request comes from.
        from: IpAddr,
    },
    /// Every server of the backend is UP.
    BackendUp {
        /// The backend.
        backend: String,
    },
    /// The server is no longer in the backend.
    ServerGone {
        /// The backend.
        backend: String,
        /// The server.
        server: String,
    },
    /// The server is in the backend (and UP, if checked).
    ServerPresent {
        /// The backend.
        backend: String,
        /// The server.
        server: String,
    },
    /// A challenge request through the frontend reaches the responder.
    AcmeRoute {
        /// Where the frontend listens.
        addr: SocketAddr,
    },
}

/// What the edits do to a configuration.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// The new configuration.
    pub(crate) text: String,
    /// Per edit, what it did ("added ...", "already in effect").
    pub(crate) notes: Vec<String>,
    /// What to check after the reload.
    pub(crate) proofs: Vec<Proof>,
    /// Said when an effect cannot be proven from here, and why.
    pub(crate) unproven: Vec<String>,
}

/// Checks edits' own values, before any configuration is read.
pub(crate) fn check(edits: &[Edit]) -> Result<(), EditError> {
    if edits.is_empty() {
        return Err(EditError::Invalid(
            "edits is empty: give at least one edit".into(),
        ));
    }
    if edits.len() > MAX_EDITS {
        return Err(EditError::Invalid(format!(
            "{} edits in one job; at most {MAX_EDITS}",
            edits.len()
        )));
    }
    for (i, e) in edits.iter().enumerate() {
        check_one(e)
            .map_err(|m| EditError::Invalid(format!("edit {} ({}): {m}", i + 1, e.op())))?;
    }
    Ok(())
}

fn check_one(e: &Edit) -> Result<(), String> {
    match e {
        Edit::ForceHttps {
            frontend,
            host,
            code,
            ..
        } => {
            name("frontend", frontend)?;
            if let Some(h) = host {
                hostname(h)?;
            }
            if let Some(c) = code
                && ![301, 302, 303, 307, 308].contains(c)
            {
                return Err(format!("code {c}: one of 301, 302, 303, 307, 308"));
            }
        }
        Edit::HttpsFrontend {
            frontend,
            bind,
            crt,
            alpn,
            backend,
        } => {
            name("frontend", frontend)?;
            if let Some(b) = bind {
                address(b)?;
            }
            if let Some(c) = crt
                && (!c.is_absolute() || !crate::fsops::is_normal(c) || !plain(&c.to_string_lossy()))
            {
                return Err(format!(
                    "crt {}: an absolute path without '..' or blanks",
                    quote(&c.to_string_lossy())
                ));
            }
            if let Some(a) = alpn
                && (a.is_empty()
                    || !a.split(',').all(|p| {
                        !p.is_empty()
                            && p.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"./-".contains(&b))
                    }))
            {
                return Err(format!("alpn {}: protocols like h2,http/1.1", quote(a)));
            }
            if let Some(b) = backend {
                name("backend", b)?;
            }
        }
        Edit::StickySessions { backend, cookie } => {
            name("backend", backend)?;
            if let Some(c) = cookie
                && (c.is_empty()
                    || c.len() > 64
                    || !c
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b)))
            {
                return Err(format!("cookie {}: letters, digits, '_' and '-'", quote(c)));
            }
        }
        Edit::RestrictPath {
            frontend,
            path,
            allow,
            status,
        } => {
            name("frontend", frontend)?;
            url_path(path)?;
            if allow.is_empty() {
                return Err(
                    "allow is empty: name the addresses or CIDRs that may reach the path".into(),
                );
            }
            if allow.len() > 256 {
                return Err("at most 256 allowed addresses".into());
            }
            for a in allow {
                cidr(a)?;
            }
            if let Some(s) = status
                && !(200..=599).contains(s)
            {
                return Err(format!("status {s}: between 200 and 599"));
            }
        }
        Edit::HealthCheck {
            backend,
            method,
            uri,
            host,
            expect_status,
        } => {
            name("backend", backend)?;
            if let Some(m) = method
                && !["GET", "HEAD", "OPTIONS"].contains(&m.as_str())
            {
                return Err(format!("method {}: GET, HEAD or OPTIONS", quote(m)));
            }
            if let Some(u) = uri {
                url_path(u)?;
            }
            if let Some(h) = host {
                hostname(h)?;
            }
            if let Some(s) = expect_status
                && !(100..=599).contains(s)
            {
                return Err(format!("expect_status {s}: between 100 and 599"));
            }
        }
        Edit::RouteAcme {
            frontend,
            responder,
        } => {
            name("frontend", frontend)?;
            if let Some(r) = responder {
                r.parse::<SocketAddr>().map_err(|_| {
                    format!("responder {}: an address like 127.0.0.1:8402", quote(r))
                })?;
            }
        }
        Edit::AddServer {
            backend,
            name: n,
            address: a,
            options,
        } => {
            name("backend", backend)?;
            name("server", n)?;
            address(a)?;
            if options.len() > 64 {
                return Err("at most 64 options".into());
            }
            for o in options {
                if o.is_empty() || !plain(o) {
                    return Err(format!(
                        "option {}: one word, no blanks or quotes",
                        quote(o)
                    ));
                }
            }
        }
        Edit::RemoveServer { backend, name: n } => {
            name("backend", backend)?;
            name("server", n)?;
        }
        Edit::SetLine { section, line, key } => {
            section_name(section)?;
            one_line(line)?;
            if let Some(k) = key {
                one_line(k)?;
                let lw = super::cfg::words(line).map_err(|e| format!("line: {e}"))?;
                let kw = super::cfg::words(k).map_err(|e| format!("key: {e}"))?;
                if kw.is_empty() || !lw.starts_with(&kw) {
                    return Err(format!(
                        "key {} is not how line {} begins",
                        quote(k),
                        quote(line)
                    ));
                }
            }
        }
        Edit::RemoveLine { section, line } => {
            section_name(section)?;
            one_line(line)?;
        }
        Edit::LogStream { defaults } => {
            if let Some(d) = defaults {
                section_name(d)?;
            }
        }
    }
    Ok(())
}

/// A word without blanks, quotes, comment or escape characters.
fn plain(s: &str) -> bool {
    !s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || "#\"'\\;".contains(c))
}

fn name(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty()
        || s.len() > 128
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
    {
        return Err(format!(
            "{what} name {}: letters, digits, '.', '_', ':' and '-'",
            quote(s)
        ));
    }
    Ok(())
}

fn hostname(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !ok {
        return Err(format!("host {}: a DNS name", quote(s)));
    }
    Ok(())
}

fn url_path(s: &str) -> Result<(), String> {
    if !s.starts_with('/') || s.len() > 1024 || !plain(s) {
        return Err(format!(
            "path {}: begins with '/', no blanks or quotes",
            quote(s)
        ));
    }
    Ok(())
}

fn address(s: &str) -> Result<(), String> {
    let ok = s.rsplit_once(':').is_some_and(|(h, p)| {
        p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok_and(|p| p > 0)
            && (h.is_empty()
                || h == "*"
                || h.parse::<IpAddr>().is_ok()
                || h.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .is_ok()
                || hostname(h).is_ok())
    });
    if !ok {
        return Err(format!(
            "address {}: host:port, e.g. 127.0.0.1:8080 or *:443",
            quote(s)
        ));
    }
    Ok(())
}

/// An address or CIDR, parsed.
fn cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let bad = || format!("{}: an address or a CIDR like 10.0.0.0/8", quote(s));
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) if l.bytes().all(|b| b.is_ascii_digit()) => {
            l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(bad)?
        }
        Some(_) => return Err(bad()),
        None => max,
    };
    Ok((ip, len))
}

fn section_name(s: &str) -> Result<(), String> {
    let w: Vec<&str> = s.split_whitespace().collect();
    match w.as_slice() {
        ["global"] | ["defaults"] => Ok(()),
        [kind, n] if ["defaults", "frontend", "backend", "listen"].contains(kind) => name(kind, n),
        _ => Err(format!(
            "section {}: global, defaults, or frontend/backend/listen/defaults NAME",
            quote(s)
        )),
    }
}

fn one_line(s: &str) -> Result<(), String> {
    if s.trim().is_empty() || s.len() > 4096 || s.contains(['\n', '\r', '\0']) {
        return Err("line: one non-empty line of at most 4096 bytes".into());
    }
    let words = super::cfg::words(s).map_err(|e| format!("line: {e}"))?;
    match words.first() {
        None => Err("line: a directive, not only a comment".into()),
        Some(w) if super::cfg::is_section_keyword(w) || w.starts_with('.') => Err(format!(
            "line: `{w}` opens a section or a condition; edit sections with their own edits"
        )),
        Some(_) => Ok(()),
    }
}

/// [`apply`] on a blocking thread: up to 100 edits of a 16 MiB file is work to keep off the
/// async runtime.
pub(crate) async fn apply_blocking(
    text: String,
    edits: Vec<Edit>,
    cx: Context,
) -> Result<Outcome, EditError> {
    tokio::task::spawn_blocking(move || apply(&text, &edits, &cx))
        .await
        .unwrap_or_else(|e| Err(EditError::Conflict(format!("the edit task failed: {e}"))))
}

/// Makes the edits, one after the other, each on the result of the one before.
pub(crate) fn apply(text: &str, edits: &[Edit], cx: &Context) -> Result<Outcome, EditError> {
    let mut out = Outcome {
        text: text.to_owned(),
        notes: Vec::new(),
        proofs: Vec::new(),
        unproven: Vec::new(),
    };
    for (i, e) in edits.iter().enumerate() {
        let at = |m: String| format!("edit {} ({}): {m}", i + 1, e.op());
        let cfg = Cfg::parse(&out.text).map_err(|m| EditError::Conflict(at(m)))?;
        let mut ed = Editor {
            cfg: &cfg,
            rw: Rewrite::default(),
            cx,
            said: Vec::new(),
            proofs: Vec::new(),
            unproven: Vec::new(),
        };
        ed.edit(e).map_err(|err| match err {
            EditError::Invalid(m) => EditError::Invalid(at(m)),
            EditError::NotFound(m) => EditError::NotFound(at(m)),
            EditError::Conflict(m) => EditError::Conflict(at(m)),
        })?;
        let note = if ed.rw.is_empty() {
            format!("{}: already in effect", describe(e))
        } else {
            format!("{}: {}", describe(e), ed.said.join("; "))
        };
        let (proofs, unproven) = (ed.proofs, ed.unproven);
        let new = ed.rw.render(&cfg);
        out.text = new;
        out.notes.push(note);
        for p in proofs {
            if !out.proofs.contains(&p) {
                out.proofs.push(p);
            }
        }
        out.unproven.extend(unproven);
    }
    Ok(out)
}

/// An edit in a few words, for notes and logs.
pub(crate) fn describe(e: &Edit) -> String {
    match e {
        Edit::ForceHttps { frontend, .. } => format!("force HTTPS on frontend {frontend}"),
        Edit::HttpsFrontend { frontend, .. } => format!("serve TLS on frontend {frontend}"),
        Edit::StickySessions { backend, .. } => format!("sticky sessions in backend {backend}"),
        Edit::RestrictPath { frontend, path, .. } => {
            format!("restrict {path} on frontend {frontend}")
        }
        Edit::HealthCheck { backend, .. } => format!("health check of backend {backend}"),
        Edit::RouteAcme { frontend, .. } => format!("ACME challenges from frontend {frontend}"),
        Edit::AddServer { backend, name, .. } => format!("server {backend}/{name}"),
        Edit::RemoveServer { backend, name } => format!("remove server {backend}/{name}"),
        Edit::SetLine { section, line, .. } => format!("set `{line}` in {section}"),
        Edit::RemoveLine { section, line } => format!("remove `{line}` from {section}"),
        Edit::LogStream { .. } => "HAProxy's log to statelyd".into(),
    }
}

struct Editor<'c, 'a> {
    cfg: &'c Cfg<'a>,
    rw: Rewrite,
    cx: &'c Context,
    said: Vec<String>,
    proofs: Vec<Proof>,
    unproven: Vec<String>,
}

/// Words of a line, for comparing lines whatever their spacing.
fn ws(line: &str) -> Vec<String> {
    super::cfg::words(line).unwrap_or_default()
}

impl Editor<'_, '_> {
    fn section(&self, kind: &str, name: &str) -> Result<&Section, EditError> {
        self.cfg
            .section(kind, name)
            .map_err(EditError::Conflict)?
            .ok_or_else(|| {
                let have: Vec<String> = self
                    .cfg
                    .sections
                    .iter()
                    .filter(|s| s.kind == kind || (s.kind == "listen" && kind != "listen"))
                    .filter_map(|s| s.name.clone())
                    .collect();
                EditError::NotFound(format!(
                    "there is no {kind} {} in the configuration ({kind}s: {})",
                    quote(name),
                    if have.is_empty() {
                        "none".into()
                    } else {
                        have.join(", ")
                    }
                ))
            })
    }

    /// A frontend, or a listen section of that name (which is a frontend too).
    fn frontend(&self, name: &str) -> Result<&Section, EditError> {
        match self
            .cfg
            .section("listen", name)
            .map_err(EditError::Conflict)?
        {
            Some(s) => Ok(s),
            None => self.section("frontend", name),
        }
    }

    fn backend(&self, name: &str) -> Result<&Section, EditError> {
        match self
            .cfg
            .section("listen", name)
            .map_err(EditError::Conflict)?
        {
            Some(s) => Ok(s),
            None => self.section("backend", name),
        }
    }

    /// Refuses to touch a line inside a `.if` block.
    fn unconditional(&self, at: usize) -> Result<(), EditError> {
        if self.cfg.lines.get(at).is_some_and(|l| l.conditional) {
            return Err(EditError::Conflict(format!(
                "line {} is inside a .if block: stately does not edit conditional lines",
                at + 1
            )));
        }
        Ok(())
    }

    fn line_of(&self, at: usize) -> String {
        format!(
            "line {} ({})",
            at + 1,
            quote(self.cfg.lines[at].text.trim())
        )
    }

    /// First keyword line of the section whose words satisfy `pred`.
    fn find(&self, s: &Section, pred: impl Fn(&[String]) -> bool) -> Option<usize> {
        self.cfg
            .keyword_lines(s)
            .find(|(_, l)| !l.conditional && pred(&l.words))
            .map(|(i, _)| i)
    }

    fn find_all(&self, s: &Section, pred: impl Fn(&[String]) -> bool) -> Vec<usize> {
        self.cfg
            .keyword_lines(s)
            .filter(|(_, l)| !l.conditional && pred(&l.words))
            .map(|(i, _)| i)
            .collect()
    }

    fn last(&self, s: &Section, pred: impl Fn(&[String]) -> bool) -> Option<usize> {
        self.cfg
            .keyword_lines(s)
            .filter(|(_, l)| !l.conditional && pred(&l.words))
            .last()
            .map(|(i, _)| i)
    }

    /// Puts `line` in place of the one at `existing` if it says otherwise (or not at all),
    /// refusing a conflict unless replacing; or inserts it at `at`.
    fn put(
        &mut self,
        s: &Section,
        existing: Option<usize>,
        at: usize,
        line: &str,
    ) -> Result<(), EditError> {
        self.put_or_replace(s, existing, at, line, self.cx.replace)
    }

    fn put_or_replace(
        &mut self,
        s: &Section,
        existing: Option<usize>,
        at: usize,
        line: &str,
        replace: bool,
    ) -> Result<(), EditError> {
        let indent = self.cfg.indent(s);
        match existing {
            Some(i) if self.cfg.lines[i].words == ws(line) => Ok(()),
            Some(i) => {
                self.unconditional(i)?;
                if !replace {
                    return Err(EditError::Conflict(format!(
                        "{} says otherwise than `{line}`; pass replace (--replace in the CLI) to change it",
                        self.line_of(i)
                    )));
                }
                self.said.push(format!("replaced {}", self.line_of(i)));
                // The line's own indentation and comment stay.
                let old = self.cfg.lines[i].text;
                let own = &old[..old.len() - old.trim_start().len()];
                let comment = super::cfg::trailing_comment(old)
                    .map(|c| format!(" {c}"))
                    .unwrap_or_default();
                self.rw.replace(i, format!("{own}{line}{comment}"));
                Ok(())
            }
            None => {
                // Inserted before a line inside a `.if` block would land in the block.
                if at < self.cfg.lines.len() {
                    self.unconditional(at)?;
                }
                self.said.push(format!("added `{line}`"));
                self.rw.insert(at, format!("{indent}{line}"));
                Ok(())
            }
        }
    }

    /// Where a new `http-request` rule goes: after the section's last one, else before its
    /// routing (`use_backend`, `default_backend`, servers), else at its end.
    fn rule_place(&self, s: &Section) -> usize {
        if let Some(i) = self.last(s, |w| w[0] == "http-request") {
            return i + 1;
        }
        self.find(s, |w| {
            ["use_backend", "default_backend", "server", "default-server"].contains(&w[0].as_str())
        })
        .unwrap_or_else(|| self.cfg.end_of(s))
    }

    /// Where the frontend accepts plain and TLS connections, as a client reaches them.
    fn binds(&self, s: &Section) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
        let (mut plain, mut tls) = (Vec::new(), Vec::new());
        for (_, l) in self.cfg.keyword_lines(s) {
            if l.words[0] != "bind" || l.words.len() < 2 {
                continue;
            }
            let is_tls = l.words.iter().any(|w| w == "ssl");
            for a in l.words[1].split(',') {
                if let Some(addr) = reachable(a) {
                    if is_tls {
                        tls.push(addr)
                    } else {
                        plain.push(addr)
                    }
                }
            }
        }
        (plain, tls)
    }

    fn edit(&mut self, e: &Edit) -> Result<(), EditError> {
        match e {
            Edit::ForceHttps {
                frontend,
                host,
                code,
                exempt_acme,
            } => {
                let s = self.frontend(frontend)?.clone();
                let code = code.unwrap_or(301);
                let mut line =
                    format!("http-request redirect scheme https code {code} if !{{ ssl_fc }}");
                if exempt_acme.unwrap_or(true) {
                    line.push_str(&format!(" !{{ path_beg {ACME_PATH} }}"));
                }
                if let Some(h) = host {
                    line.push_str(&format!(" {{ hdr(host),field(1,:) -i {h} }}"));
                }
                let existing = self.find(&s, |w| {
                    w.len() >= 4
                        && w[0] == "http-request"
                        && w[1] == "redirect"
                        && w[2] == "scheme"
                        && w[3] == "https"
                        && host.as_ref().is_none_or(|h| w.iter().any(|x| x == h))
                });
                let at = self.rule_place(&s);
                self.put(&s, existing, at, &line)?;
                let (plain, _) = self.binds(&s);
                match plain.first() {
                    Some(addr) => self.proofs.push(Proof::Redirect {
                        addr: *addr,
                        host: host.clone().unwrap_or_else(|| "localhost".into()),
                        code,
                    }),
                    None => self.unproven.push(format!(
                        "frontend {frontend} has no plain bind stately can reach, so the redirect is not checked"
                    )),
                }
            }
            Edit::HttpsFrontend {
                frontend,
                bind,
                crt,
                alpn,
                backend,
            } => {
                let bind = bind.clone().unwrap_or_else(|| "*:443".into());
                let crt = crt.clone().unwrap_or_else(|| self.cx.bundle_dir.clone());
                let alpn = alpn.clone().unwrap_or_else(|| "h2,http/1.1".into());
                let bind_line = format!("bind {bind} ssl crt {} alpn {alpn}", crt.display());
                let header = "http-request set-header X-Forwarded-Proto https if { ssl_fc }";
                let port = bind.rsplit_once(':').map(|(_, p)| p.to_owned());
                match self
                    .cfg
                    .section("frontend", frontend)
                    .map_err(EditError::Conflict)?
                {
                    Some(s) => {
                        let s = s.clone();
                        let existing = self.find(&s, |w| {
                            w[0] == "bind"
                                && w.len() > 1
                                && w[1].rsplit_once(':').map(|(_, p)| p.to_owned()) == port
                        });
                        let at = self
                            .last(&s, |w| w[0] == "bind")
                            .map_or_else(|| self.cfg.end_of(&s), |i| i + 1);
                        self.put(&s, existing, at, &bind_line)?;
                        let has_header = self.find(&s, |w| {
                            w.len() > 2
                                && w[0] == "http-request"
                                && w[1] == "set-header"
                                && w[2].eq_ignore_ascii_case("X-Forwarded-Proto")
                        });
                        if has_header.is_none() {
                            let at = self.rule_place(&s);
                            self.put(&s, None, at, header)?;
                        }
                    }
                    None => {
                        let Some(b) = backend else {
                            return Err(EditError::NotFound(format!(
                                "there is no frontend {}: give backend (--backend in the CLI) to create it",
                                quote(frontend)
                            )));
                        };
                        self.backend(b)?;
                        let indent = "    ";
                        self.rw.append(String::new());
                        self.rw.append(format!("frontend {frontend}"));
                        self.rw.append(format!("{indent}mode http"));
                        self.rw.append(format!("{indent}{bind_line}"));
                        self.rw.append(format!("{indent}{header}"));
                        self.rw.append(format!("{indent}default_backend {b}"));
                        self.said.push(format!("added frontend {frontend}"));
                    }
                }
                match reachable(&bind) {
                    Some(addr) => self.proofs.push(Proof::Tls { addr }),
                    None => self.unproven.push(format!(
                        "{bind} cannot be reached from here, so TLS is not checked"
                    )),
                }
            }
            Edit::StickySessions { backend, cookie } => {
                let s = self.backend(backend)?.clone();
                let cookie = cookie.clone().unwrap_or_else(|| "SERVERID".into());
                let line = format!("cookie {cookie} insert indirect nocache");
                let existing = self.find(&s, |w| w[0] == "cookie");
                let at = self
                    .find(&s, |w| w[0] == "server" || w[0] == "default-server")
                    .unwrap_or_else(|| self.cfg.end_of(&s));
                self.put(&s, existing, at, &line)?;
                for i in self.find_all(&s, |w| w[0] == "server" && w.len() >= 3) {
                    let l = &self.cfg.lines[i];
                    if l.words.iter().any(|w| w == "cookie") {
                        continue;
                    }
                    self.unconditional(i)?;
                    let server = l.words[1].clone();
                    self.rw
                        .replace(i, with_words(l.text, &format!("cookie {server}")));
                    self.said
                        .push(format!("server {server} gets cookie {server}"));
                }
            }
            Edit::RestrictPath {
                frontend,
                path,
                allow,
                status,
            } => {
                let s = self.frontend(frontend)?.clone();
                let status = status.unwrap_or(403);
                let line = format!(
                    "http-request deny deny_status {status} if {{ path_beg {path} }} !{{ src {} }}",
                    allow.join(" ")
                );
                let existing = self.find(&s, |w| {
                    w.len() > 2
                        && w[0] == "http-request"
                        && w[1] == "deny"
                        && w.windows(2).any(|p| p[0] == "path_beg" && p[1] == *path)
                });
                // Before a redirect to https, so the path is denied over plain HTTP too.
                let at = self
                    .find(&s, |w| {
                        w.len() > 1 && w[0] == "http-request" && w[1] == "redirect"
                    })
                    .unwrap_or_else(|| self.rule_place(&s));
                self.put(&s, existing, at, &line)?;
                let allowed: Vec<(IpAddr, u8)> =
                    allow.iter().filter_map(|a| cidr(a).ok()).collect();
                let (plain, _) = self.binds(&s);
                let outsider = (2u8..=254)
                    .map(|n| IpAddr::from([127, 0, 0, n]))
                    .chain(std::iter::once(IpAddr::from([127, 0, 0, 1])))
                    .find(|ip| !allowed.iter().any(|(net, len)| contains(*net, *len, *ip)));
                match (plain.iter().find(|a| a.is_ipv4()), outsider) {
                    (Some(addr), Some(from)) => self.proofs.push(Proof::Denied {
                        addr: *addr,
                        path: path.clone(),
                        status,
                        from,
                    }),
                    _ => self.unproven.push(format!(
                        "no plain bind of frontend {frontend}, or no loopback address outside the allow list, so the deny is not checked"
                    )),
                }
            }
            Edit::HealthCheck {
                backend,
                method,
                uri,
                host,
                expect_status,
            } => {
                let s = self.backend(backend)?.clone();
                let method = method.clone().unwrap_or_else(|| "GET".into());
                let uri = uri.clone().unwrap_or_else(|| "/".into());
                let mut send = format!("http-check send meth {method} uri {uri}");
                if let Some(h) = host {
                    send.push_str(&format!(" hdr Host {h}"));
                }
                let expect = format!("http-check expect status {}", expect_status.unwrap_or(200));
                let first_server = self
                    .find(&s, |w| w[0] == "server" || w[0] == "default-server")
                    .unwrap_or_else(|| self.cfg.end_of(&s));
                let opt = self.find(&s, |w| w.len() > 1 && w[0] == "option" && w[1] == "httpchk");
                let snd = self.find(&s, |w| {
                    w.len() > 1 && w[0] == "http-check" && w[1] == "send"
                });
                let exp = self.find(&s, |w| {
                    w.len() > 1 && w[0] == "http-check" && w[1] == "expect"
                });
                let before = |xs: &[Option<usize>]| {
                    xs.iter().flatten().copied().min().unwrap_or(first_server)
                };
                self.put(&s, opt, before(&[snd, exp]), "option httpchk")?;
                self.put(&s, snd, before(&[exp]), &send)?;
                self.put(&s, exp, first_server, &expect)?;
                for i in self.find_all(&s, |w| w[0] == "server" && w.len() >= 3) {
                    let l = &self.cfg.lines[i];
                    if l.words.iter().any(|w| w == "check") {
                        continue;
                    }
                    self.unconditional(i)?;
                    self.rw.replace(i, with_words(l.text, "check"));
                    self.said.push(format!("server {} gets check", l.words[1]));
                }
                self.proofs.push(Proof::BackendUp {
                    backend: backend.clone(),
                });
            }
            Edit::RouteAcme {
                frontend,
                responder,
            } => {
                let s = self.frontend(frontend)?.clone();
                let addr = match responder {
                    Some(r) => r.parse::<SocketAddr>().map_err(|_| EditError::Invalid(format!("responder {}", quote(r))))?,
                    None => self.cx.responder.ok_or_else(|| {
                        EditError::Conflict(
                            "no [certificates] responder is configured: give the responder's address".into(),
                        )
                    })?,
                };
                let use_line = format!("use_backend {ACME_BACKEND} if {{ path_beg {ACME_PATH} }}");
                let existing = self.find(&s, |w| {
                    w.len() > 1 && w[0] == "use_backend" && w[1] == ACME_BACKEND
                });
                let at = self
                    .find(&s, |w| w[0] == "use_backend" || w[0] == "default_backend")
                    .unwrap_or_else(|| self.cfg.end_of(&s));
                self.put(&s, existing, at, &use_line)?;
                let server = format!("server responder {addr}");
                match self
                    .cfg
                    .section("backend", ACME_BACKEND)
                    .map_err(EditError::Conflict)?
                {
                    Some(b) => {
                        let b = b.clone();
                        let existing = self.find(&b, |w| w[0] == "server");
                        let at = self.cfg.end_of(&b);
                        self.put(&b, existing, at, &server)?;
                    }
                    None => {
                        self.rw.append(String::new());
                        self.rw.append(format!("backend {ACME_BACKEND}"));
                        self.rw.append("    mode http".into());
                        self.rw.append(format!("    {server}"));
                        self.said.push(format!("added backend {ACME_BACKEND}"));
                    }
                }
                let (plain, _) = self.binds(&s);
                match plain.first() {
                    Some(_) if responder.is_some() => self.unproven.push(format!(
                        "the route goes to {addr}, which statelyd does not answer, so it is not checked"
                    )),
                    Some(a) => self.proofs.push(Proof::AcmeRoute { addr: *a }),
                    None => self.unproven.push(format!("frontend {frontend} has no plain bind stately can reach, so the route is not checked")),
                }
            }
            Edit::AddServer {
                backend,
                name,
                address,
                options,
            } => {
                let s = self.backend(backend)?.clone();
                let mut line = format!("server {name} {address}");
                for o in options {
                    line.push(' ');
                    line.push_str(o);
                }
                let existing = self.find(&s, |w| w[0] == "server" && w.get(1) == Some(name));
                let at = self
                    .last(&s, |w| w[0] == "server")
                    .map_or_else(|| self.cfg.end_of(&s), |i| i + 1);
                self.put(&s, existing, at, &line)?;
                self.proofs.push(Proof::ServerPresent {
                    backend: backend.clone(),
                    server: name.clone(),
                });
            }
            Edit::RemoveServer { backend, name } => {
                let s = self.backend(backend)?.clone();
                for i in self.find_all(&s, |w| w[0] == "server" && w.get(1) == Some(name)) {
                    self.unconditional(i)?;
                    self.said.push(format!("removed {}", self.line_of(i)));
                    self.rw.remove(i);
                }
                self.proofs.push(Proof::ServerGone {
                    backend: backend.clone(),
                    server: name.clone(),
                });
            }
            Edit::SetLine { section, line, key } => {
                let s = self.named_section(section)?.clone();
                let key = match key {
                    Some(k) => ws(k),
                    None => default_key(&ws(line)),
                };
                let matching = self.find_all(&s, |w| w.starts_with(&key));
                if matching.len() > 1 {
                    return Err(EditError::Conflict(format!(
                        "`{}` begins {} lines of {section} ({}): remove the others, or give a longer key",
                        key.join(" "),
                        matching.len(),
                        matching
                            .iter()
                            .map(|i| (i + 1).to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                let at = self.cfg.end_of(&s);
                // Setting a line is what the edit asks: no conflict to refuse.
                self.put_or_replace(&s, matching.first().copied(), at, line.trim(), true)?;
            }
            Edit::LogStream { defaults } => {
                let Some(address) = self.cx.log_stream.clone() else {
                    return Err(EditError::Conflict(
                        "this target has no log_socket or log_udp in statelyd's configuration: there is nothing to send its log to".into(),
                    ));
                };
                let g = self.named_section("global")?.clone();
                // A chrooted HAProxy resolves a unix path inside its chroot.
                let mut address = address;
                if address.starts_with('/')
                    && let Some(i) = self.find(&g, |w| w[0] == "chroot" && w.len() == 2)
                {
                    let root = self.cfg.lines[i].words[1].trim_end_matches('/').to_owned();
                    match address.strip_prefix(&format!("{root}/")) {
                        Some(inside) => address = format!("/{inside}"),
                        None => {
                            return Err(EditError::Conflict(format!(
                                "HAProxy runs `chroot {root}` ({}), so it cannot reach {address}: put log_socket inside {root}",
                                self.line_of(i)
                            )));
                        }
                    }
                }
                let line = format!("log {address} local0 notice");
                let existing = self.find(&g, |w| w.len() >= 2 && w[0] == "log" && w[1] == address);
                let at = self
                    .last(&g, |w| w[0] == "log")
                    .map_or_else(|| self.cfg.end_of(&g), |i| i + 1);
                self.put_or_replace(&g, existing, at, &line, true)?;
                let d = self
                    .named_section(defaults.as_deref().unwrap_or("defaults"))?
                    .clone();
                if d.kind != "defaults" {
                    return Err(EditError::Invalid(format!(
                        "log_stream's defaults names a {} section, not a defaults one",
                        d.kind
                    )));
                }
                let existing = self.find(&d, |w| w == ["log", "global"]);
                let at = self.cfg.end_of(&d);
                self.put_or_replace(&d, existing, at, "log global", false)?;
                self.unproven.push(
                    "the log stream is not checked by a request: stately_haproxy_log_lines_total counts what arrives".into(),
                );
            }
            Edit::RemoveLine { section, line } => {
                let s = self.named_section(section)?.clone();
                let want = ws(line);
                for i in self.find_all(&s, |w| *w == want[..]) {
                    self.unconditional(i)?;
                    self.said.push(format!("removed {}", self.line_of(i)));
                    self.rw.remove(i);
                }
            }
        }
        Ok(())
    }

    fn named_section(&self, spec: &str) -> Result<&Section, EditError> {
        let w: Vec<&str> = spec.split_whitespace().collect();
        match w.as_slice() {
            [kind] => {
                let found: Vec<&Section> = self
                    .cfg
                    .sections
                    .iter()
                    .filter(|s| s.kind == *kind && s.name.is_none())
                    .collect();
                match found.as_slice() {
                    [one] => Ok(one),
                    [] => Err(EditError::NotFound(format!("there is no {kind} section"))),
                    _ => Err(EditError::Conflict(format!(
                        "{kind} is defined {} times: edit it by hand",
                        found.len()
                    ))),
                }
            }
            [kind, name] => self.section(kind, name),
            _ => Err(EditError::Invalid(format!("section {}", quote(spec)))),
        }
    }
}

/// The words that identify a line `set_line` replaces.
fn default_key(words: &[String]) -> Vec<String> {
    let two = [
        "timeout",
        "option",
        "no",
        "stats",
        "http-check",
        "tcp-check",
    ];
    let n = if words.first().is_some_and(|w| two.contains(&w.as_str())) {
        2
    } else {
        1
    };
    words.iter().take(n).cloned().collect()
}

fn contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

/// A bind address as a client on this machine reaches it (`*:80` and `:80` by loopback).
fn reachable(bind: &str) -> Option<SocketAddr> {
    let (host, port) = bind.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches("ipv4@").trim_start_matches("ipv6@");
    let ip: IpAddr = match host {
        "" | "*" | "0.0.0.0" => IpAddr::from([127, 0, 0, 1]),
        "::" | "[::]" => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        h => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()?,
    };
    Some(SocketAddr::new(ip, port))
}

/// A server change HAProxy can make without a reload.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RuntimeChange {
    /// `add server <backend>/<server> <args>`.
    Add {
        /// The backend.
        backend: String,
        /// The server.
        server: String,
        /// The line's words after the name: address, then options.
        args: Vec<String>,
    },
    /// Drain and `del server`; `args` are its line's words after the name (to put it back).
    Remove {
        /// The backend.
        backend: String,
        /// The server.
        server: String,
        /// As the file says it.
        args: Vec<String>,
    },
}

/// Load-balancing algorithms whose backends take servers added at runtime (HAProxy 2.6: a
/// dynamic algorithm; the hash-based ones only with `hash-type consistent`).
const DYNAMIC: &[&str] = &["roundrobin", "leastconn", "first", "random"];

/// The runtime changes that carry these edits live without a reload, when HAProxy allows it:
/// only server additions and removals, in backends with a dynamic algorithm, no `cookie`
/// persistence (a fixed cookie per server) and no `default-server` (whose settings a server
/// added at runtime would not get). Otherwise why not — the job reloads.
pub(crate) fn runtime_changes(text: &str, edits: &[Edit]) -> Result<Vec<RuntimeChange>, String> {
    // Asked of every edit job: known before parsing the file (a few ms at 5000 servers).
    if let Some(other) = edits
        .iter()
        .find(|e| !matches!(e, Edit::AddServer { .. } | Edit::RemoveServer { .. }))
    {
        return Err(format!("{} needs a reload", other.op()));
    }
    let cfg = Cfg::parse(text)?;
    let defaults_have_default_server =
        cfg.sections
            .iter()
            .filter(|s| s.kind == "defaults")
            .any(|s| {
                cfg.keyword_lines(s)
                    .any(|(_, l)| l.words[0] == "default-server")
            });
    let mut out = Vec::new();
    for e in edits {
        let (backend, server) = match e {
            Edit::AddServer { backend, name, .. } | Edit::RemoveServer { backend, name } => {
                (backend, name)
            }
            other => return Err(format!("{} needs a reload", other.op())),
        };
        let s = match cfg.section("backend", backend)? {
            Some(s) => s,
            None => return Err(format!("backend {backend} is not a plain backend section")),
        };
        // The backend's own lines, else what a defaults section gives it.
        let words = |key: &str| {
            let own: Vec<Vec<String>> = cfg
                .keyword_lines(s)
                .filter(|(_, l)| l.words[0] == key)
                .map(|(_, l)| l.words.clone())
                .collect();
            if !own.is_empty() {
                return own;
            }
            cfg.sections
                .iter()
                .filter(|d| d.kind == "defaults" && d.header < s.header)
                .flat_map(|d| cfg.keyword_lines(d))
                .filter(|(_, l)| l.words[0] == key)
                .map(|(_, l)| l.words.clone())
                .collect()
        };
        if let Some(b) = words("balance").last() {
            let algo = b.get(1).map(String::as_str).unwrap_or("roundrobin");
            let consistent = words("hash-type")
                .last()
                .is_some_and(|h| h.get(1).map(String::as_str) == Some("consistent"));
            if !DYNAMIC.contains(&algo) && !consistent {
                return Err(format!(
                    "backend {backend} balances by {algo}, which takes no server at runtime"
                ));
            }
        }
        if !words("cookie").is_empty() {
            return Err(format!(
                "backend {backend} uses cookie persistence, which a server added at runtime would not join"
            ));
        }
        if !words("default-server").is_empty() || defaults_have_default_server {
            return Err(format!(
                "backend {backend} has default-server settings, which a server added at runtime would not get"
            ));
        }
        let line = cfg
            .keyword_lines(s)
            .find(|(_, l)| l.words[0] == "server" && l.words.get(1) == Some(server))
            .map(|(_, l)| l.words[2..].to_vec());
        out.push(match e {
            Edit::AddServer {
                address, options, ..
            } => {
                if line.is_some() {
                    return Err(format!("server {backend}/{server} is already in the file"));
                }
                let mut args = vec![address.clone()];
                args.extend(options.iter().cloned());
                RuntimeChange::Add {
                    backend: backend.clone(),
                    server: server.clone(),
                    args,
                }
            }
            _ => match line {
                Some(args) => RuntimeChange::Remove {
                    backend: backend.clone(),
                    server: server.clone(),
                    args,
                },
                None => return Err(format!("server {backend}/{server} is not in the file")),
            },
        });
    }
    Ok(out)
}

/// The global and defaults sections of a configuration and the backends named: what
/// `haproxy -c` needs to check a server line added to those backends.
pub(crate) fn backends_alone(text: &str, backends: &[&str]) -> Option<String> {
    let cfg = Cfg::parse(text).ok()?;
    let mut out = String::new();
    for s in &cfg.sections {
        let keep = s.kind == "global"
            || s.kind == "defaults"
            || (s.kind == "backend" && s.name.as_deref().is_some_and(|n| backends.contains(&n)));
        if keep {
            for l in &cfg.lines[s.header..s.body.end] {
                out.push_str(l.text);
                out.push('\n');
            }
        }
    }
    Some(out)
}

/// Whether a configuration serves the bundle at `bundle` (or every bundle of `dir`) on some
/// `bind ... ssl`: names the file or the directory, or uses a `crt-list` (whose contents
/// cannot be known here, so it is given the benefit of the doubt).
pub(crate) fn serves_bundle(text: &str, dir: &Path, bundle: &Path) -> bool {
    let Ok(cfg) = Cfg::parse(text) else {
        return true;
    };
    cfg.lines.iter().any(|l| {
        l.words.first().is_some_and(|w| w == "bind")
            && l.words.windows(2).any(|p| {
                p[0] == "crt-list"
                    || (p[0] == "crt"
                        && (Path::new(p[1].trim_end_matches('/')) == dir
                            || Path::new(&p[1]) == bundle))
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx() -> Context {
        Context {
            bundle_dir: PathBuf::from("/var/lib/stately/letsencrypt/haproxy"),
            responder: Some("127.0.0.1:8402".parse().unwrap()),
            replace: false,
            log_stream: Some("/var/lib/haproxy/stately-log.sock".into()),
        }
    }

    #[test]
    fn log_stream_logs_to_statelyd_relative_to_a_chroot_once() {
        let text = "global\n  chroot /var/lib/haproxy\n  log /dev/log local0\n\ndefaults\n  mode http\n\nbackend app\n  server s1 127.0.0.1:8080\n";
        let edit = [Edit::LogStream { defaults: None }];
        let o = apply(text, &edit, &cx()).unwrap();
        assert!(
            o.text.starts_with("global\n  chroot /var/lib/haproxy\n  log /dev/log local0\n  log /stately-log.sock local0 notice\n\ndefaults\n  mode http\n  log global\n"),
            "{}",
            o.text
        );
        assert_eq!(apply(&o.text, &edit, &cx()).unwrap().text, o.text);
        // A socket outside the chroot cannot be reached.
        let outside = Context {
            log_stream: Some("/run/stately/log.sock".into()),
            ..cx()
        };
        assert!(matches!(
            apply(text, &edit, &outside),
            Err(EditError::Conflict(_))
        ));
        // A target without a log stream has nothing to point at.
        let none = Context {
            log_stream: None,
            ..cx()
        };
        assert!(matches!(
            apply(text, &edit, &none),
            Err(EditError::Conflict(_))
        ));
    }

    const BASE: &str = "\
global
    daemon # keep

defaults
    mode http
    timeout connect 5s

frontend web
    bind *:80
    # route everything to app
    default_backend app

backend app
    balance roundrobin
    server s1 127.0.0.1:8081 # first
    server s2 127.0.0.1:8082
";

    fn run(text: &str, edits: &[Edit]) -> Outcome {
        check(edits).unwrap();
        apply(text, edits, &cx()).unwrap()
    }

    #[test]
    fn force_https_adds_one_rule_before_routing_and_is_then_in_effect() {
        let e = [Edit::ForceHttps {
            frontend: "web".into(),
            host: None,
            code: None,
            exempt_acme: None,
        }];
        let o = run(BASE, &e);
        assert!(o.text.contains(
            "    bind *:80\n    # route everything to app\n    http-request redirect scheme https code 301 if !{ ssl_fc } !{ path_beg /.well-known/acme-challenge/ }\n    default_backend app\n"
        ), "{}", o.text);
        assert_eq!(
            o.proofs,
            [Proof::Redirect {
                addr: "127.0.0.1:80".parse().unwrap(),
                host: "localhost".into(),
                code: 301
            }]
        );
        let again = run(&o.text, &e);
        assert_eq!(again.text, o.text);
        assert!(
            again.notes[0].ends_with("already in effect"),
            "{:?}",
            again.notes
        );
    }

    #[test]
    fn every_byte_outside_the_change_stays() {
        let crlf = BASE.replace('\n', "\r\n");
        let e = [Edit::HealthCheck {
            backend: "app".into(),
            method: None,
            uri: None,
            host: Some("example.com".into()),
            expect_status: None,
        }];
        let o = run(&crlf, &e);
        assert_eq!(
            o.text,
            crlf.replace(
                "    balance roundrobin\r\n    server s1 127.0.0.1:8081 # first\r\n    server s2 127.0.0.1:8082\r\n",
                "    balance roundrobin\r\n    option httpchk\r\n    http-check send meth GET uri / hdr Host example.com\r\n    http-check expect status 200\r\n    server s1 127.0.0.1:8081 check # first\r\n    server s2 127.0.0.1:8082 check\r\n"
            )
        );
    }

    #[test]
    fn a_conflicting_line_is_named_unless_replaced() {
        let text = BASE.replace(
            "    bind *:80\n",
            "    bind *:80\n    bind *:443 ssl crt /etc/ssl/x.pem\n",
        );
        let e = [Edit::HttpsFrontend {
            frontend: "web".into(),
            bind: None,
            crt: None,
            alpn: None,
            backend: None,
        }];
        let err = apply(&text, &e, &cx()).unwrap_err();
        assert!(
            matches!(&err, EditError::Conflict(m) if m.contains("line 10") && m.contains("bind *:443 ssl crt /etc/ssl/x.pem")),
            "{err}"
        );
        let o = apply(
            &text,
            &e,
            &Context {
                replace: true,
                ..cx()
            },
        )
        .unwrap();
        assert!(
            o.text.contains(
                "    bind *:443 ssl crt /var/lib/stately/letsencrypt/haproxy alpn h2,http/1.1\n"
            ),
            "{}",
            o.text
        );
        assert!(o.text.contains("    http-request set-header X-Forwarded-Proto https if { ssl_fc }\n    default_backend app"));
    }

    #[test]
    fn a_missing_frontend_is_created_only_with_a_backend() {
        let mut e = Edit::HttpsFrontend {
            frontend: "tls".into(),
            bind: Some("127.0.0.1:8443".into()),
            crt: Some("/etc/ssl/site".into()),
            alpn: None,
            backend: None,
        };
        assert!(matches!(
            apply(BASE, &[e.clone()], &cx()),
            Err(EditError::NotFound(_))
        ));
        if let Edit::HttpsFrontend { backend, .. } = &mut e {
            *backend = Some("app".into());
        }
        let o = run(BASE, &[e]);
        assert!(o.text.starts_with(BASE));
        assert!(o.text.ends_with(
            "\nfrontend tls\n    mode http\n    bind 127.0.0.1:8443 ssl crt /etc/ssl/site alpn h2,http/1.1\n    http-request set-header X-Forwarded-Proto https if { ssl_fc }\n    default_backend app\n"
        ), "{}", o.text);
    }

    #[test]
    fn sticky_sessions_give_each_server_its_cookie() {
        let o = run(
            BASE,
            &[Edit::StickySessions {
                backend: "app".into(),
                cookie: None,
            }],
        );
        assert!(o.text.contains(
            "    balance roundrobin\n    cookie SERVERID insert indirect nocache\n    server s1 127.0.0.1:8081 cookie s1 # first\n    server s2 127.0.0.1:8082 cookie s2\n"
        ), "{}", o.text);
    }

    #[test]
    fn a_restricted_path_is_denied_before_the_https_redirect() {
        let o = run(
            BASE,
            &[
                Edit::ForceHttps {
                    frontend: "web".into(),
                    host: None,
                    code: None,
                    exempt_acme: Some(false),
                },
                Edit::RestrictPath {
                    frontend: "web".into(),
                    path: "/admin".into(),
                    allow: vec!["127.0.0.1".into(), "10.0.0.0/8".into()],
                    status: None,
                },
            ],
        );
        let deny = o.text.find("http-request deny deny_status 403 if { path_beg /admin } !{ src 127.0.0.1 10.0.0.0/8 }").unwrap();
        let redirect = o.text.find("http-request redirect").unwrap();
        assert!(deny < redirect, "{}", o.text);
        assert!(o.proofs.contains(&Proof::Denied {
            addr: "127.0.0.1:80".parse().unwrap(),
            path: "/admin".into(),
            status: 403,
            from: "127.0.0.2".parse().unwrap(),
        }));
    }

    #[test]
    fn route_acme_goes_before_other_routing_with_its_backend() {
        let o = run(
            BASE,
            &[Edit::RouteAcme {
                frontend: "web".into(),
                responder: None,
            }],
        );
        assert!(o.text.contains(
            "    use_backend stately-acme if { path_beg /.well-known/acme-challenge/ }\n    default_backend app\n"
        ));
        assert!(o.text.ends_with(
            "\nbackend stately-acme\n    mode http\n    server responder 127.0.0.1:8402\n"
        ));
        assert_eq!(
            run(
                &o.text,
                &[Edit::RouteAcme {
                    frontend: "web".into(),
                    responder: None
                }]
            )
            .text,
            o.text
        );
    }

    #[test]
    fn servers_are_added_after_the_last_and_removed_by_name() {
        let o = run(
            BASE,
            &[Edit::AddServer {
                backend: "app".into(),
                name: "s3".into(),
                address: "127.0.0.1:8083".into(),
                options: vec!["check".into()],
            }],
        );
        assert!(
            o.text
                .ends_with("    server s2 127.0.0.1:8082\n    server s3 127.0.0.1:8083 check\n")
        );
        let o = run(
            &o.text,
            &[Edit::RemoveServer {
                backend: "app".into(),
                name: "s1".into(),
            }],
        );
        assert!(!o.text.contains("s1"));
        assert!(o.text.contains("    balance roundrobin\n    server s2"));
    }

    #[test]
    fn set_line_replaces_the_line_of_its_key_or_adds_it() {
        let o = run(
            BASE,
            &[Edit::SetLine {
                section: "defaults".into(),
                line: "timeout connect 10s".into(),
                key: None,
            }],
        );
        assert!(o.text.contains("    timeout connect 10s\n"));
        assert!(!o.text.contains("5s"));
        let o = run(
            BASE,
            &[Edit::SetLine {
                section: "backend app".into(),
                line: "timeout server 30s".into(),
                key: None,
            }],
        );
        assert!(
            o.text
                .ends_with("    server s2 127.0.0.1:8082\n    timeout server 30s\n")
        );
        let o = run(
            BASE,
            &[Edit::RemoveLine {
                section: "global".into(),
                line: "daemon".into(),
            }],
        );
        assert!(o.text.starts_with("global\n\ndefaults"));
    }

    #[test]
    fn a_backend_alone_keeps_global_defaults_and_that_backend() {
        let text = "global\n  daemon\ndefaults\n  mode http\nfrontend web\n  bind :80\nbackend app\n  server s1 a:1\nbackend other\n  server s2 b:2\n";
        assert_eq!(
            backends_alone(text, &["app"]).unwrap(),
            "global\n  daemon\ndefaults\n  mode http\nbackend app\n  server s1 a:1\n"
        );
    }

    #[test]
    fn a_replaced_line_keeps_its_indentation_and_comment() {
        let text = "defaults\n\ttimeout connect 5s # keep this\n";
        let o = run(
            text,
            &[Edit::SetLine {
                section: "defaults".into(),
                line: "timeout connect 9s".into(),
                key: None,
            }],
        );
        assert_eq!(o.text, "defaults\n\ttimeout connect 9s # keep this\n");
    }

    #[test]
    fn what_backends_inherit_from_defaults_decides_runtime_or_reload() {
        let add = [Edit::AddServer {
            backend: "app".into(),
            name: "s3".into(),
            address: "127.0.0.1:1".into(),
            options: vec![],
        }];
        assert!(runtime_changes("backend app\n  server s1 a:1\n", &add).is_ok());
        let e = runtime_changes(
            "defaults\n  balance source\nbackend app\n  server s1 a:1\n",
            &add,
        )
        .unwrap_err();
        assert!(e.contains("source"), "{e}");
        let e = runtime_changes(
            "defaults\n  cookie SRV insert\nbackend app\n  server s1 a:1\n",
            &add,
        )
        .unwrap_err();
        assert!(e.contains("cookie"), "{e}");
        assert!(
            runtime_changes(
                "defaults\n  balance source\nbackend app\n  balance roundrobin\n  server s1 a:1\n",
                &add
            )
            .is_ok()
        );
    }

    #[test]
    fn bad_values_are_refused_before_any_file_is_read() {
        for e in [
            Edit::ForceHttps {
                frontend: "we b".into(),
                host: None,
                code: None,
                exempt_acme: None,
            },
            Edit::ForceHttps {
                frontend: "web".into(),
                host: None,
                code: Some(200),
                exempt_acme: None,
            },
            Edit::RestrictPath {
                frontend: "web".into(),
                path: "admin".into(),
                allow: vec!["127.0.0.1".into()],
                status: None,
            },
            Edit::RestrictPath {
                frontend: "web".into(),
                path: "/a".into(),
                allow: vec!["300.0.0.1".into()],
                status: None,
            },
            Edit::RestrictPath {
                frontend: "web".into(),
                path: "/a".into(),
                allow: vec![],
                status: None,
            },
            Edit::SetLine {
                section: "backend app".into(),
                line: "a\nb".into(),
                key: None,
            },
            Edit::SetLine {
                section: "bogus x y".into(),
                line: "a".into(),
                key: None,
            },
            Edit::AddServer {
                backend: "app".into(),
                name: "s".into(),
                address: "nowhere".into(),
                options: vec![],
            },
            Edit::HealthCheck {
                backend: "app".into(),
                method: Some("POST".into()),
                uri: None,
                host: None,
                expect_status: None,
            },
        ] {
            assert!(
                matches!(check(std::slice::from_ref(&e)), Err(EditError::Invalid(_))),
                "{e:?}"
            );
        }
        assert!(matches!(check(&[]), Err(EditError::Invalid(_))));
        for e in [
            Edit::SetLine {
                section: "global".into(),
                line: "# only a comment".into(),
                key: None,
            },
            Edit::SetLine {
                section: "global".into(),
                line: "backend evil".into(),
                key: None,
            },
            Edit::SetLine {
                section: "global".into(),
                line: ".if defined(X)".into(),
                key: None,
            },
            Edit::AddServer {
                backend: "app".into(),
                name: "s".into(),
                address: "1.2.3.4:+80".into(),
                options: vec![],
            },
            Edit::AddServer {
                backend: "app".into(),
                name: "s".into(),
                address: "1.2.3.4:80".into(),
                options: vec!["check;".into()],
            },
            Edit::RestrictPath {
                frontend: "web".into(),
                path: "/a".into(),
                allow: vec!["10.0.0.0/+8".into()],
                status: None,
            },
        ] {
            assert!(
                matches!(check(std::slice::from_ref(&e)), Err(EditError::Invalid(_))),
                "{e:?}"
            );
        }
    }

    #[test]
    fn edits_in_conditional_or_duplicated_sections_are_refused() {
        let text = ".if defined(X)\nfrontend web\n    bind :80\n.endif\n";
        let e = [Edit::ForceHttps {
            frontend: "web".into(),
            host: None,
            code: None,
            exempt_acme: None,
        }];
        assert!(matches!(apply(text, &e, &cx()), Err(EditError::Conflict(m)) if m.contains(".if")));
        let text = "frontend web\n    bind :80\nfrontend web\n    bind :81\n";
        assert!(
            matches!(apply(text, &e, &cx()), Err(EditError::Conflict(m)) if m.contains("2 times"))
        );
        let text = "frontend other\n    bind :80\n";
        assert!(
            matches!(apply(text, &e, &cx()), Err(EditError::NotFound(m)) if m.contains("frontends: other"))
        );
    }

    #[test]
    fn a_corpus_file_edited_keeps_its_other_bytes() {
        let mut edited = 0;
        for text in super::super::cfg::tests::CORPUS {
            let e = [Edit::SetLine {
                section: "global".into(),
                line: "maxconn 100".into(),
                key: None,
            }];
            // Only files with a global section take the edit; the others must say so.
            let o = match apply(text, &e, &cx()) {
                Ok(o) => o,
                Err(EditError::NotFound(_)) if !text.contains("global") => continue,
                Err(err) => panic!("{text:?}: {err}"),
            };
            edited += 1;
            // Removing the one added line gives the original back.
            let back = o
                .text
                .replacen("    maxconn 100\n", "", 1)
                .replacen("\tmaxconn 100\r\n", "", 1)
                .replacen("    maxconn 100\r\n", "", 1)
                .replacen("  maxconn 100\n", "", 1);
            assert_eq!(back, *text, "{text:?} -> {:?}", o.text);
        }
        assert_eq!(edited, 4, "the four corpus files with a global section");
    }
}
