//! The daemon's configuration: a TOML file whose every key has an embedded default, parsed
//! into raw structs and validated into the form the runtime uses (runbooks, tokens, limits).

use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration that could not be read or does not make sense.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema; the message carries line and column.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line and column.
        message: String,
    },
    /// A value is well-formed but wrong (an unknown parameter in a template, a path outside
    /// the runbook's roots, ...).
    #[error("{origin}: {message}")]
    Invalid {
        /// The file, or "defaults".
        origin: String,
        /// What is wrong and where.
        message: String,
    },
}

/// The whole configuration, as the daemon runs with it.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This statelyd's node name (its jobs, in a fleet, are this node's); by default the
    /// machine's host name.
    pub node: Option<String>,
    /// The gRPC listener.
    pub listen: SocketAddr,
    /// An optional unix socket listener, served beside TCP.
    pub listen_unix: Option<PathBuf>,
    /// The group the unix socket belongs to (mode 0660), so its members can connect.
    pub listen_unix_group: Option<String>,
    /// TLS on the TCP listener (and mTLS with a client CA).
    pub tls: crate::tls::TlsConfig,
    /// Allow a plaintext listener beyond loopback (tokens then cross the network in clear).
    pub insecure: bool,
    /// Whether server reflection answers without credentials.
    pub reflection: Reflection,
    /// Roles for client certificates.
    #[serde(rename = "client_cert")]
    pub client_certs: Vec<crate::auth::ClientCertRule>,
    /// Roles for unix-socket peers by uid.
    #[serde(rename = "unix_peer")]
    pub unix_peers: Vec<crate::auth::UnixPeerRule>,
    /// Where `/metrics` is served for Prometheus (off when unset).
    pub metrics_listen: Option<SocketAddr>,
    /// Where the web console and the API as JSON are served (off when unset); TLS as the
    /// gRPC listener's when `[tls]` is configured.
    pub console_listen: Option<SocketAddr>,
    /// Host names the console answers to besides IP literals and `localhost` (a page must
    /// not be reachable under another name: DNS rebinding).
    pub console_hosts: Vec<String>,
    /// Where the store, the blobs and the generated token live.
    pub data_dir: PathBuf,
    /// Open connections per listener at most (lowered to fit the open-file limit).
    pub max_connections: usize,
    /// A connection that has not finished its TLS handshake and HTTP/2 preface this long
    /// after it opened is closed.
    #[serde(with = "crate::human_time")]
    pub first_bytes_timeout: Duration,
    /// How long running jobs get to finish on SIGTERM before they are left for recovery.
    #[serde(with = "crate::human_time")]
    pub shutdown_grace: Duration,
    /// The journal's durability: `full` syncs every commit to disk (survives power loss),
    /// `normal` syncs at checkpoints (survives a crash of the daemon, not of the machine).
    pub sync: SyncMode,
    /// Where the job ledger is: SQLite in the data directory, or PostgreSQL.
    pub store: StoreConfig,
    /// Finished jobs kept.
    pub history: History,
    /// Bearer tokens. With none, an operator token is generated in the data directory.
    #[serde(rename = "token")]
    pub tokens: Vec<TokenConfig>,
    /// Operator-defined runbooks.
    #[serde(rename = "runbook")]
    pub runbooks: Vec<crate::runbooks::Runbook>,
    /// Files of more `[[runbook]]` tables (relative to this file's directory).
    pub include: Vec<PathBuf>,
    /// HAProxy targets clients may name.
    #[serde(rename = "haproxy")]
    pub haproxy: Vec<crate::haproxy::HaproxyTarget>,
    /// Where alert mails go out.
    pub smtp: Option<crate::alerts::mail::Smtp>,
    /// Certificates: where lineages live, how challenges are answered, renewal.
    pub certificates: crate::certs::config::Certificates,
    /// ACME servers beyond the built-in `letsencrypt` and `letsencrypt-staging`.
    #[serde(rename = "acme")]
    pub acme: Vec<crate::certs::config::AcmeServer>,
    /// DNS zones statelyd may publish DNS-01 challenge records in (RFC 2136 + TSIG).
    #[serde(rename = "dns")]
    pub dns: Vec<crate::certs::dns::DnsProvider>,
    /// nginx servers certificates are deployed to.
    #[serde(rename = "nginx")]
    pub nginx: Vec<crate::nginx::NginxTarget>,
}

pub use crate::certs::config::AcmeServer;

impl Config {
    /// This statelyd's node name: `node`, else the machine's host name.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| is_node_name(h))
                .unwrap_or_else(|| "localhost".into())
        })
    }

    /// The certificate root.
    pub fn cert_root(&self) -> PathBuf {
        self.certificates
            .root
            .clone()
            .unwrap_or_else(|| self.data_dir.join("letsencrypt"))
    }

    /// Where certificates live on disk.
    pub(crate) fn cert_places(&self) -> crate::certs::Places {
        crate::certs::Places {
            root: self.cert_root(),
            bundles: self.bundle_dir(),
            data_dir: self.data_dir.clone(),
        }
    }

    /// Where HAProxy bundles go.
    pub fn bundle_dir(&self) -> PathBuf {
        self.certificates
            .haproxy_dir
            .clone()
            .unwrap_or_else(|| self.cert_root().join("haproxy"))
    }

    /// An ACME server by name: configured ones first, then the built-in Let's Encrypt ones.
    pub fn acme_server(&self, name: &str) -> Option<AcmeServer> {
        crate::certs::config::acme_server(&self.acme, name)
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("listen_unix", &self.listen_unix)
            .field("data_dir", &self.data_dir)
            .field("tokens", &self.tokens.len())
            .field("runbooks", &self.runbooks.len())
            .finish_non_exhaustive()
    }
}

/// When the configuration was loaded, and the last reload that was refused, for GetStatus.
#[derive(Debug)]
pub(crate) struct Loads(std::sync::Mutex<LoadState>);

/// What [`Loads`] holds.
#[derive(Debug, Clone, Default)]
pub(crate) struct LoadState {
    /// When the configuration in force was loaded (unix ms).
    pub(crate) loaded_at: i64,
    /// Reloads that took effect.
    pub(crate) reloads: u32,
    /// The last refused reload since the last good one: when, and why.
    pub(crate) refused: Option<(i64, String)>,
}

impl Loads {
    pub(crate) fn new() -> Loads {
        Loads(std::sync::Mutex::new(LoadState {
            loaded_at: crate::job::now_ms(),
            ..LoadState::default()
        }))
    }

    pub(crate) fn loaded(&self) {
        let mut s = self.0.lock().expect("loads lock");
        s.loaded_at = crate::job::now_ms();
        s.reloads += 1;
        s.refused = None;
    }

    /// A refused reload. What a viewer may read of it leaves out the lines of the file a
    /// parse error quotes (they may hold a secret).
    pub(crate) fn refused(&self, why: String) {
        let shown: Vec<&str> = why
            .lines()
            .filter(|l| {
                let t = l
                    .trim_start()
                    .trim_start_matches(|c: char| c.is_ascii_digit());
                !t.trim_start().starts_with('|')
            })
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        self.0.lock().expect("loads lock").refused = Some((crate::job::now_ms(), shown.join("; ")));
    }

    pub(crate) fn get(&self) -> LoadState {
        self.0.lock().expect("loads lock").clone()
    }
}

/// Who may use server reflection.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Reflection {
    /// Anyone who reaches the listener: the API's schema is not a secret, and grpcurl needs
    /// reflection before any call.
    #[default]
    Public,
    /// Only authenticated callers.
    Authenticated,
}

/// How hard the store syncs its commits.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync on every commit.
    Full,
    /// fsync at WAL checkpoints only.
    Normal,
}

/// Where the job ledger lives.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// A PostgreSQL connection URL (`postgresql://user@host:port/database`, without a
    /// password); unset: SQLite in the data directory.
    pub url: Option<String>,
    /// A file holding the password (read at start).
    pub password_file: Option<PathBuf>,
    /// With `sslmode=require`: the CA certificates (PEM) PostgreSQL's certificate is verified
    /// against (default: the system's roots).
    pub ca_file: Option<PathBuf>,
    /// Read connections at most (the writer has its own).
    pub pool_size: Option<usize>,
    /// How long a node may go without a heartbeat (every third of it) before it is lost; a
    /// node whose lease lapsed (paused, or cut off from PostgreSQL that long) writes nothing
    /// more and stops.
    #[serde(with = "crate::human_time")]
    pub lease: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: None,
            password_file: None,
            ca_file: None,
            pool_size: None,
            lease: Duration::from_secs(15),
        }
    }
}

/// Retention of finished jobs and their backups.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct History {
    /// Finished jobs kept per resource (like a deployment's revision history).
    pub keep_per_resource: u32,
    /// Finished jobs kept in all, whatever their resources.
    pub keep_total: u32,
    /// How often old jobs and unreferenced backups are pruned.
    #[serde(with = "crate::human_time")]
    pub prune_interval: Duration,
}

impl Default for History {
    fn default() -> Self {
        Self {
            keep_per_resource: 50,
            keep_total: 10_000,
            prune_interval: Duration::from_secs(60),
        }
    }
}

/// A bearer token and the role it grants. The secret comes from `value` or from `file`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A name for logs and audit (never the secret).
    pub name: String,
    /// `viewer` or `operator`.
    pub role: Role,
    /// The secret itself.
    pub value: Option<String>,
    /// A file holding the secret (trailing whitespace ignored).
    pub file: Option<PathBuf>,
}

impl fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("value", &self.value.as_ref().map(|_| "<redacted>"))
            .field("file", &self.file)
            .finish()
    }
}

/// What a token may do.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read and watch.
    Viewer,
    /// Also submit, run, cancel and roll back.
    Operator,
}

/// The default data directory: `$STATELY_DATA_DIR`, else `/var/lib/stately` for root, else
/// `$XDG_STATE_HOME/stately` or `~/.local/state/stately`. The CLI looks for the generated
/// token in the same place.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STATELY_DATA_DIR") {
        return PathBuf::from(dir);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/stately");
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(dir).join("stately");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/state/stately"),
        None => PathBuf::from("./stately-data"),
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            listen_unix: None,
            listen_unix_group: None,
            tls: Default::default(),
            insecure: false,
            reflection: Reflection::Public,
            client_certs: Vec::new(),
            unix_peers: Vec::new(),
            metrics_listen: None,
            console_listen: None,
            console_hosts: Vec::new(),
            data_dir: default_data_dir(),
            max_connections: 4096,
            first_bytes_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            sync: SyncMode::Full,
            store: StoreConfig::default(),
            history: History::default(),
            tokens: Vec::new(),
            runbooks: Vec::new(),
            include: Vec::new(),
            haproxy: Vec::new(),
            smtp: None,
            certificates: Default::default(),
            acme: Vec::new(),
            dns: Vec::new(),
            nginx: Vec::new(),
        }
    }
}

/// A node name: what a host name may hold, and `_`; at most 63 bytes.
pub(crate) fn is_node_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The full default configuration with every key commented, as `statelyd --print-config`
/// prints it. A test checks it parses to the defaults.
pub const DEFAULT_CONFIG: &str = r#"# statelyd configuration. Every key is optional; the values shown are the defaults.

# This statelyd's name, shown by `stately status` and the console (letters, digits, '-', '_'
# and '.'; at most 63). Default: the machine's host name.
# node = "edge-1"

# gRPC listener (TCP). Keep it on loopback unless TLS is in front.
listen = "127.0.0.1:50051"

# Also serve on a unix socket (clients: --server unix:/path).
# listen_unix = "/run/stately/stately.sock"
# Give the socket to this group (mode 0660) so its members can connect; a [[unix_peer]] rule
# with `group` gives them a role.
# listen_unix_group = "stately"

# A listener beyond loopback needs [tls] below, unless this says the path is encrypted some
# other way (tokens then cross the network in clear; statelyd warns at start).
insecure = false

# Serve /metrics for Prometheus here (plain HTTP, no credentials: the figures hold no
# secrets; keep it on loopback or behind your scrape network). Off when unset.
# metrics_listen = "127.0.0.1:9586"

# Serve the web console (and the API as JSON: POST /api/<service>/<method>) here. It asks for
# a token (or takes the client certificate) and speaks TLS when [tls] is configured; beyond
# loopback it needs [tls] as the gRPC listener does. Off when unset.
# console_listen = "127.0.0.1:8086"
# The names it answers to besides IP literals and localhost (any other Host is refused, so a
# page under a rebound DNS name cannot reach it).
console_hosts = []

# Server reflection (what `grpcurl ADDR list` and `describe` use) and the health check answer
# without credentials: the API's schema is not a secret. "authenticated" locks reflection.
reflection = "public"

# Store, backups and the generated token. Default: $STATELY_DATA_DIR, else /var/lib/stately
# for root, else $XDG_STATE_HOME/stately or ~/.local/state/stately.
# data_dir = "/var/lib/stately"

# Open connections per listener at most (lowered to fit the open-file limit, which statelyd
# raises to its hard limit at start). At the cap, the connection quiet the longest makes room.
max_connections = 4096
# A connection that has not finished its TLS handshake and HTTP/2 preface this long after it
# opened is closed.
first_bytes_timeout = "10s"

# On SIGTERM/SIGINT: how long running jobs get to finish before the daemon exits and leaves
# them to be unwound at the next start.
shutdown_grace = "10s"

# Journal durability: "full" syncs each commit (survives power loss), "normal" survives a
# crash of the daemon but not of the machine.
sync = "full"

# More runbooks, from files holding only [[runbook]] tables (paths relative to this file).
include = []

[store]
# The job ledger: SQLite in data_dir unless a PostgreSQL URL is given (no password in it:
# give password_file). Several statelyd share one schema, each as its node (`node`); keep
# fleets apart with `?options=-c%20search_path%3D<schema>`.
# url = "postgresql://stately@db.example:5432/stately"
# password_file = "/etc/stately/pg-password"
# With sslmode=require in the url: TLS, the server's certificate verified against this CA
# (default: the system's roots) and the url's host name.
# ca_file = "/etc/stately/pg-ca.pem"
# Read connections at most (the writer has its own).
# pool_size = 4
# A node heartbeats every third of its lease; one that goes a lease without (paused, or cut
# off from PostgreSQL that long) writes nothing more and stops (exit 75).
# lease = "15s"

[history]
# Finished jobs (and the backups their undo needs) kept per resource, newest first.
keep_per_resource = 50
# Finished jobs kept in all.
keep_total = 10000
# How often jobs beyond those limits, and backups nothing references, are removed.
prune_interval = "60s"

# HAProxy targets, named by clients (who never send paths). stats_socket is the admin socket
# from `stats socket <path> mode 600 level admin` in haproxy.cfg.
# [[haproxy]]
# name = "edge"
# config = "/etc/haproxy/haproxy.cfg"
# binary = "/usr/sbin/haproxy"
# master_socket = "/run/haproxy/master.sock"   # haproxy -W -S <path>: reloads go through it
# reload_command = ["systemctl", "reload", "haproxy"]   # used when there is no master_socket
# server_state_file = "/var/lib/haproxy/server-state"   # with `server-state-file` in global and
#                                       # `load-server-state-from-file global` in defaults
# stats_socket = "/run/haproxy/admin.sock"
# Hear HAProxy's log stream: a server's state change makes the stats poller poll at once, so
# watchers and alert watches see it in milliseconds (polls at their interval stay the
# backstop). Add to haproxy.cfg's global section `log /var/lib/haproxy/stately-log.sock local0
# notice` (`log /stately-log.sock ...` when HAProxy runs `chroot /var/lib/haproxy`, whose
# paths resolve inside the chroot) and `log global` to its defaults.
# log_socket = "/var/lib/haproxy/stately-log.sock"
# log_udp = "127.0.0.1:5140"    # or UDP on loopback: `log 127.0.0.1:5140 local0 notice`
# Directories a client's configuration may name files in (crt, ca-file, errorfile, ACL and map
# files, lua-load, sockets...). Default: those of config, the sockets, server_state_file, and
# the certificate bundle directory.
# allow_dirs = ["/etc/haproxy", "/run/haproxy", "/etc/ssl/stately"]
# Let a client's configuration run code (lua-load, external-check, program sections,
# insecure-fork-wanted, setenv and kin): `haproxy -c` runs Lua while it checks.
# allow_code = false
# With allow_code: run `haproxy -c` as this user (it must read the certificates).
# check_user = "haproxy"

[certificates]
# The certbot-style root (archive/<name>/, live/<name>/). Default: <data_dir>/letsencrypt.
# root = "/etc/letsencrypt"
# HAProxy bundles (<name>.pem = fullchain + private key). Default: <root>/haproxy.
# haproxy_dir = "/etc/haproxy/certs"
# The ACME server jobs use unless they name one: "letsencrypt", "letsencrypt-staging", or an
# [[acme]] below.
default_acme = "letsencrypt"
# The ACME server a dry run (`stately cert issue --dry-run`) uses unless it names one.
dry_run_acme = "letsencrypt-staging"
# Answer HTTP-01 here; route /.well-known/acme-challenge/ to it from HAProxy (see README).
# responder = "127.0.0.1:8402"
# Where the CA's HTTP-01 request arrives here (HAProxy's port-80 frontend): before each order
# a probe per name must reach the responder through it ("" skips the probe).
challenge_probe = "127.0.0.1:80"
# Directories a job may name as its webroot.
webroots = []
# Renew lineages this long before they expire; check this often ("0s": never by itself).
renew_before = "30d"
renew_check = "12h"

# More ACME servers (e.g. a private one). The account key is created once per directory and
# kept 0600 in <data_dir>/acme/.
# [[acme]]
# name = "internal"
# directory = "https://acme.internal:14000/dir"
# contact = ["mailto:ops@example.com"]
# ca_file = "/etc/stately/internal-ca.pem"
# eab_kid = "kid-1"
# eab_hmac_file = "/etc/stately/eab.key"

# The SMTP relay alert mails go through (alert_watch jobs). The password is read from a file,
# never from a job or this file.
# [smtp]
# host = "smtp.example.com"
# port = 587                          # default: 25 (tls = "none"), 587 (starttls), 465 (tls)
# tls = "starttls"                    # none | starttls | tls
# user = "alerts@example.com"
# password_file = "/etc/stately/smtp.password"
# from = "stately <alerts@example.com>"
# ca_file = "/etc/stately/relay-ca.pem"   # extra CA for the relay's certificate
# timeout = "10s"                     # per connection attempt
# retry_max = "5m"                    # longest wait between delivery attempts

# Bearer tokens, each with a role: "viewer" (get, list, watch) or "operator" (also submit,
# run, cancel, roll back). With no token configured, an operator token is generated and
# written 0600 to <data_dir>/operator.token, where the CLI on this machine finds it.
# [[token]]
# name = "ci"
# role = "operator"
# file = "/etc/stately/ci.token"     # or: value = "..."

# TLS on the TCP listener (clients: --server https://host:port, --cacert). The files are read
# again when they change and on SIGHUP; open connections keep going on the old ones.
# [tls]
# cert = "/etc/stately/tls/server.crt"      # chain, leaf first (PEM)
# key = "/etc/stately/tls/server.key"
# lineage = "api.example.com"               # instead of cert and key: a lineage stately
#                                           # issues and renews (live/<lineage>/ under root)
# client_ca = "/etc/stately/tls/clients-ca.pem"   # mTLS: client certificates must chain here
# client_auth = "required"                  # or "optional": tokens without a certificate too

# Roles for client certificates (with [tls] client_ca): every field given must match the
# certificate's subject (cn, o) or one of its alternative names (san; "*.example.com" matches
# one label below). The first rule that matches gives the role; a token sent beside a
# certificate wins.
# [[client_cert]]
# role = "operator"
# o = "ops"
# [[client_cert]]
# role = "viewer"
# san = "*.dashboards.example.com"

# Roles for unix-socket peers by uid (or user), for callers that send no token.
# [[unix_peer]]
# user = "deploy"
# role = "operator"

# Runbooks: named sequences of built-in steps. Clients pass declared parameters only; every
# path must lie under one of the runbook's roots. Strings may use {param} (write {{ for {).
# [[runbook]]
# name = "example"
# description = "Write a greeting, then check it"
# roots = ["/srv/example"]
# resources = ["site:{site}"]        # default: ["runbook:<name>"]
# [runbook.params.site]
# pattern = "[a-z0-9-]+"
# [runbook.params.greeting]
# default = "hello"
# [[runbook.step]]
# type = "write_file"                # also: command, check, backup_file, download, chown, chmod
# path = "/srv/example/{site}.txt"
# content = "{greeting}\n"
# mode = "0644"
# [[runbook.step]]
# type = "check"
# argv = ["/usr/bin/grep", "-q", "{greeting}", "/srv/example/{site}.txt"]
# timeout = "30s"
"#;

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        let parse_error = |p: &Path, e: toml::de::Error| Error::Parse {
            path: p.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        };
        let mut config: Config = toml::from_str(text).map_err(|e| parse_error(path, e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for inc in config.include.clone() {
            let file = base.join(&inc);
            let text = std::fs::read_to_string(&file).map_err(|source| Error::Read {
                path: file.clone(),
                source,
            })?;
            let more: crate::runbooks::RunbookFile =
                toml::from_str(&text).map_err(|e| parse_error(&file, e))?;
            config.runbooks.extend(more.runbooks);
        }
        config.validate(&path.display().to_string())?;
        crate::runbooks::compile(&mut config.runbooks);
        Ok(config)
    }

    /// Checks what the schema alone cannot: names, templates, roots, modes, timeouts.
    pub fn validate(&self, origin: &str) -> Result<(), Error> {
        let invalid = |message: String| Error::Invalid {
            origin: origin.to_owned(),
            message,
        };
        crate::certs::config::check(&self.acme, &self.certificates).map_err(invalid)?;
        crate::certs::dns::check(&self.dns).map_err(invalid)?;
        if let Some(smtp) = &self.smtp {
            smtp.check().map_err(invalid)?;
        }
        crate::haproxy::target::check(&self.haproxy).map_err(invalid)?;
        let haproxy_names: Vec<&str> = self.haproxy.iter().map(|h| h.name.as_str()).collect();
        crate::nginx::check(&self.nginx, &haproxy_names).map_err(invalid)?;
        self.tls.check().map_err(invalid)?;
        if let Some(l) = &self.tls.lineage
            && !crate::fsops::is_safe_name(l)
        {
            return Err(invalid(format!(
                "[tls] lineage '{l}' is not a lineage name"
            )));
        }
        if !self.listen.ip().is_loopback() && !self.tls.enabled() && !self.insecure {
            return Err(invalid(format!(
                "listen = \"{}\" is beyond loopback without [tls]: tokens would cross the network in clear. Configure [tls] (cert and key, or lineage), or set insecure = true if something else encrypts the path",
                self.listen
            )));
        }
        if let Some(c) = self.console_listen
            && !c.ip().is_loopback()
            && !self.tls.enabled()
            && !self.insecure
        {
            return Err(invalid(format!(
                "console_listen = \"{c}\" is beyond loopback without [tls]: tokens would cross the network in clear. Configure [tls], or set insecure = true if something else encrypts the path"
            )));
        }
        if let Some(url) = &self.store.url {
            crate::store::PostgresTarget::check_url(url, self.insecure)
                .map_err(|e| invalid(format!("[store] url: {e}")))?;
        }
        if self.store.pool_size == Some(0) {
            return Err(invalid("[store] pool_size must be at least 1".into()));
        }
        if !(Duration::from_secs(3)..=Duration::from_secs(600)).contains(&self.store.lease) {
            return Err(invalid(
                "[store] lease must be from 3s to 10m (a heartbeat goes every third of it)".into(),
            ));
        }
        if let Some(n) = &self.node
            && !is_node_name(n)
        {
            return Err(invalid(format!(
                "node = {} is not a node name (letters, digits, '-', '_' and '.'; at most 63)",
                crate::quote::quote(n)
            )));
        }
        if let Some(h) = self.console_hosts.iter().find(|h| {
            h.is_empty()
                || h.len() > 253
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        }) {
            return Err(invalid(format!(
                "console_hosts: {} is not a host name (no port, no scheme)",
                crate::quote::quote(h)
            )));
        }
        crate::auth::check_rules(&self.client_certs, &self.unix_peers).map_err(invalid)?;
        if let Some(u) = &self.listen_unix
            && self
                .haproxy
                .iter()
                .any(|t| t.log_socket.as_ref() == Some(u))
        {
            return Err(invalid(
                "listen_unix and a [[haproxy]] log_socket are the same path".into(),
            ));
        }
        if let Some(g) = &self.listen_unix_group {
            if self.listen_unix.is_none() {
                return Err(invalid("listen_unix_group needs listen_unix".into()));
            }
            if !matches!(nix::unistd::Group::from_name(g), Ok(Some(_))) {
                return Err(invalid(format!(
                    "listen_unix_group: no group {} on this machine",
                    crate::quote::quote(g)
                )));
            }
        }
        if !self.client_certs.is_empty() && self.tls.client_ca.is_none() {
            return Err(invalid(
                "[[client_cert]] rules need [tls] client_ca, the CA client certificates are verified against".into(),
            ));
        }
        for token in &self.tokens {
            match (&token.value, &token.file) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => {
                    return Err(invalid(format!(
                        "token '{}': give exactly one of `value` and `file`",
                        token.name
                    )));
                }
            }
        }
        crate::runbooks::check(&self.runbooks).map_err(invalid)?;
        Ok(())
    }

    /// The runbook of that name.
    pub fn runbook(&self, name: &str) -> Option<&crate::runbooks::Runbook> {
        self.runbooks.iter().find(|r| r.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_default_config_parses_to_the_defaults() {
        let c = Config::parse(DEFAULT_CONFIG, Path::new("default")).unwrap();
        let d = Config::default();
        assert_eq!(c.listen, d.listen);
        assert_eq!(c.shutdown_grace, d.shutdown_grace);
        assert_eq!(c.sync, d.sync);
        assert_eq!(c.history.keep_per_resource, d.history.keep_per_resource);
        assert_eq!(c.history.keep_total, d.history.keep_total);
        assert!(c.tokens.is_empty() && c.runbooks.is_empty());
    }

    #[test]
    fn the_shipped_example_runbooks_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = "include = [\"examples/litespeed-trial-key.toml\", \"examples/openlitespeed-restart.toml\"]\n";
        let c = Config::parse(text, &dir.join("stately.toml")).unwrap();
        let names: Vec<&str> = c.runbooks.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["litespeed-trial-key", "openlitespeed-graceful-restart"]
        );
    }

    #[test]
    fn the_commented_example_runbook_is_valid() {
        let start = DEFAULT_CONFIG.find("# [[runbook]]").unwrap();
        let uncommented: String = DEFAULT_CONFIG[start..]
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::parse(&uncommented, Path::new("example")).unwrap();
        assert_eq!(c.runbooks.len(), 1);
        assert_eq!(c.runbooks[0].steps.len(), 2);
    }

    #[test]
    fn a_type_error_names_the_line() {
        let err = Config::parse(
            "listen = \"127.0.0.1:1\"\n\nsync = 3\n",
            Path::new("x.toml"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("x.toml") && msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn an_unknown_step_key_is_refused() {
        let text = "[[runbook]]\nname = \"x\"\n[[runbook.step]]\ntype = \"check\"\nargv = [\"true\"]\nargvv = 1\n";
        let err = Config::parse(text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("argvv"), "{err}");
    }

    #[test]
    fn a_lease_is_from_3s_to_10m_and_15s_by_default() {
        assert_eq!(Config::default().store.lease, Duration::from_secs(15));
        let c = Config::parse("[store]\nlease = \"30s\"\n", Path::new("x.toml")).unwrap();
        assert_eq!(c.store.lease, Duration::from_secs(30));
        for bad in ["1s", "11m"] {
            let err = Config::parse(
                &format!("[store]\nlease = \"{bad}\"\n"),
                Path::new("x.toml"),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("lease must be from 3s to 10m"), "{err}");
        }
    }

    #[test]
    fn a_node_name_is_checked_and_defaults_to_the_host_name() {
        let c = Config::parse("node = \"edge-7\"\n", Path::new("x.toml")).unwrap();
        assert_eq!(c.node_name(), "edge-7");
        for bad in ["", "a b", "edge/1", &"n".repeat(64)] {
            let err = Config::parse(&format!("node = {bad:?}\n"), Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("is not a node name"), "{err}");
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(Config::default().node_name(), host.trim());
    }

    #[test]
    fn a_bad_duration_says_what_humantime_says() {
        let err = Config::parse("shutdown_grace = \"10\"\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("time unit needed"), "{err}");
    }
}
