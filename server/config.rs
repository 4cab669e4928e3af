//! The daemon's configuration: a TOML file whose every key has an embedded default, parsed
//! into raw structs and validated into the form the runtime uses (runbooks, tokens, limits).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
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
    /// The gRPC listener.
    pub listen: SocketAddr,
    /// An optional unix socket listener, served beside TCP.
    pub listen_unix: Option<PathBuf>,
    /// Where the store, the blobs and the generated token live.
    pub data_dir: PathBuf,
    /// Open connections per listener at most (lowered to fit the open-file limit).
    pub max_connections: usize,
    /// A connection that sends nothing for this long after it opened is closed.
    #[serde(with = "humantime_serde_compat")]
    pub first_bytes_timeout: Duration,
    /// How long running jobs get to finish on SIGTERM before they are left for recovery.
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_grace: Duration,
    /// The journal's durability: `full` syncs every commit to disk (survives power loss),
    /// `normal` syncs at checkpoints (survives a crash of the daemon, not of the machine).
    pub sync: SyncMode,
    /// Finished jobs kept.
    pub history: History,
    /// Bearer tokens. With none, an operator token is generated in the data directory.
    #[serde(rename = "token")]
    pub tokens: Vec<TokenConfig>,
    /// Operator-defined runbooks.
    #[serde(rename = "runbook")]
    pub runbooks: Vec<Runbook>,
    /// Files of more `[[runbook]]` tables (relative to this file's directory).
    pub include: Vec<PathBuf>,
    /// HAProxy targets clients may name.
    #[serde(rename = "haproxy")]
    pub haproxy: Vec<HaproxyTarget>,
    /// Where alert mails go out.
    pub smtp: Option<Smtp>,
    /// Certificates: where lineages live, how challenges are answered, renewal.
    pub certificates: Certificates,
    /// ACME servers beyond the built-in `letsencrypt` and `letsencrypt-staging`.
    #[serde(rename = "acme")]
    pub acme: Vec<AcmeServer>,
}

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
    /// statelyd answers HTTP-01 challenges here (route `/.well-known/acme-challenge/` to it).
    pub responder: Option<SocketAddr>,
    /// Directories a job may name as its webroot (the directory itself or beneath it).
    pub webroots: Vec<PathBuf>,
    /// Renew a lineage this long before it expires.
    #[serde(with = "humantime_serde_compat")]
    pub renew_before: Duration,
    /// How often lineages are checked for renewal; "0s" turns automatic renewal off.
    #[serde(with = "humantime_serde_compat")]
    pub renew_check: Duration,
}

impl Default for Certificates {
    fn default() -> Self {
        Certificates {
            root: None,
            haproxy_dir: None,
            default_acme: "letsencrypt".into(),
            responder: None,
            webroots: Vec::new(),
            renew_before: Duration::from_secs(30 * 86400),
            renew_check: Duration::from_secs(12 * 3600),
        }
    }
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

impl Config {
    /// The certificate root.
    pub fn cert_root(&self) -> PathBuf {
        self.certificates
            .root
            .clone()
            .unwrap_or_else(|| self.data_dir.join("letsencrypt"))
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
        if let Some(a) = self.acme.iter().find(|a| a.name == name) {
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
}

/// The SMTP relay alerts are sent through.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Smtp {
    /// The relay's host name or address.
    pub host: String,
    /// Its port; by default 25 without TLS, 587 with STARTTLS, 465 with implicit TLS.
    pub port: Option<u16>,
    /// none, starttls or tls.
    #[serde(default)]
    pub tls: SmtpTls,
    /// The user to authenticate as, if any.
    pub user: Option<String>,
    /// A file holding the password (first line), readable by the daemon only.
    pub password_file: Option<PathBuf>,
    /// The From address, e.g. `stately <stately@example.com>`.
    pub from: String,
    /// Extra CA certificates (PEM) to trust for the relay's TLS.
    pub ca_file: Option<PathBuf>,
    /// How long one connection attempt or command may take.
    #[serde(default = "default_smtp_timeout", with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// The longest wait between two delivery attempts of a message.
    #[serde(default = "default_smtp_retry_max", with = "humantime_serde_compat")]
    pub retry_max: Duration,
}

impl fmt::Debug for Smtp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Smtp")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// How the SMTP connection is secured.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP (loopback relays only, really).
    None,
    /// STARTTLS, required.
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS).
    Tls,
}

fn default_smtp_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_smtp_retry_max() -> Duration {
    Duration::from_secs(300)
}

/// A HAProxy instance stately manages; clients name it, never its paths.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaproxyTarget {
    /// What clients call it.
    pub name: String,
    /// Its stats/admin socket (`stats socket <path> level admin`).
    pub stats_socket: Option<PathBuf>,
    /// Its configuration file.
    pub config: Option<PathBuf>,
    /// The master CLI socket (`haproxy -W -S <path>`), through which it is reloaded.
    pub master_socket: Option<PathBuf>,
    /// A command that reloads HAProxy (e.g. `["systemctl", "reload", "haproxy"]`), used when
    /// there is no master socket; the verify step then confirms the new worker.
    pub reload_command: Option<Vec<String>>,
    /// The `server-state-file` of haproxy.cfg: before a reload, `show servers state` is
    /// dumped there so servers keep their state (a DOWN server stays DOWN) across it.
    pub server_state_file: Option<PathBuf>,
    /// The haproxy binary that checks configurations.
    #[serde(default = "default_haproxy_binary")]
    pub binary: PathBuf,
    /// Directories a client's configuration may name files in (certificates, error files, ACL
    /// and map files, sockets, ...). Default: the directories of `config`, `stats_socket`,
    /// `master_socket`, `server_state_file`, and the certificate bundle directory.
    #[serde(default)]
    pub allow_dirs: Option<Vec<PathBuf>>,
    /// Let a client's configuration run code: `lua-load`, `external-check`, `program`
    /// sections, `insecure-fork-wanted`, `setenv` and kin. Off by default: `haproxy -c` runs
    /// Lua while it checks.
    #[serde(default)]
    pub allow_code: bool,
    /// With `allow_code`, run `haproxy -c` as this user (it must be able to read the
    /// certificates the configuration names) rather than as statelyd's.
    #[serde(default)]
    pub check_user: Option<String>,
}

impl HaproxyTarget {
    /// What a client's configuration for this target may ask of the machine.
    pub fn policy(&self, bundle_dir: &Path) -> crate::haproxy::policy::Policy {
        let dirs: Vec<PathBuf> = match &self.allow_dirs {
            Some(d) => d.clone(),
            None => [
                &self.config,
                &self.stats_socket,
                &self.master_socket,
                &self.server_state_file,
            ]
            .into_iter()
            .flatten()
            .filter_map(|p| p.parent().map(Path::to_owned))
            .chain(std::iter::once(bundle_dir.to_owned()))
            .collect(),
        };
        crate::haproxy::policy::Policy {
            allow_dirs: dirs
                .iter()
                .map(|d| crate::fsops::canonical_prefix(d))
                .collect(),
            allow_code: self.allow_code,
        }
    }
}

fn default_haproxy_binary() -> PathBuf {
    PathBuf::from("/usr/sbin/haproxy")
}

/// A file named by `include`: runbooks only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunbookFile {
    #[serde(rename = "runbook", default)]
    runbooks: Vec<Runbook>,
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

/// How hard the store syncs its commits.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync on every commit.
    Full,
    /// fsync at WAL checkpoints only.
    Normal,
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
    #[serde(with = "humantime_serde_compat")]
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

/// A named, operator-defined sequence of steps.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runbook {
    /// What clients call it by.
    pub name: String,
    /// One line for listings.
    #[serde(default)]
    pub description: String,
    /// Every path a file step touches must lie under one of these.
    #[serde(default)]
    pub roots: Vec<PathBuf>,
    /// Resources the job holds (templates allowed); default `runbook:<name>`.
    pub resources: Option<Vec<String>>,
    /// Declared parameters: nothing else may be passed.
    #[serde(default)]
    pub params: BTreeMap<String, ParamSpec>,
    /// The steps, in order.
    #[serde(rename = "step", default)]
    pub steps: Vec<StepSpec>,
}

/// A declared runbook parameter.
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// For people.
    #[serde(default)]
    pub description: String,
    /// The value when the client passes none; without one, the parameter is required.
    pub default: Option<String>,
    /// A regular expression the whole value must match.
    pub pattern: Option<String>,
    /// `pattern`, anchored and compiled once when the config is loaded.
    #[serde(skip)]
    pub(crate) compiled: Option<regex::Regex>,
}

/// One step of a runbook, as written in the config. Strings may hold `{param}` templates.
/// (Unknown keys are refused by `Action`, which sees every key but `name`.)
#[derive(Clone, Debug, Deserialize)]
pub struct StepSpec {
    /// Shown in progress and in the job's steps.
    pub name: Option<String>,
    /// What the step does, with its own settings.
    #[serde(flatten)]
    pub action: Action,
}

impl Action {
    /// The step type's name, as the configuration writes it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Action::Command { .. } => "command",
            Action::Check { .. } => "check",
            Action::BackupFile { .. } => "backup_file",
            Action::WriteFile { .. } => "write_file",
            Action::Download { .. } => "download",
            Action::Chown { .. } => "chown",
            Action::Chmod { .. } => "chmod",
        }
    }
}

/// The built-in step actions.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Run a program; `undo` is run when the step is unwound.
    Command {
        /// Program and arguments (no shell).
        argv: Vec<String>,
        /// Program and arguments that reverse it.
        undo: Option<Vec<String>>,
        /// Working directory.
        cwd: Option<String>,
        /// Environment, on top of a clean one with only PATH and LANG.
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// Killed (and the step failed) after this long; default 5 minutes.
        timeout: Option<String>,
    },
    /// Run a program whose failure fails the job; it changes nothing, so it has no undo.
    Check {
        /// Program and arguments (no shell).
        argv: Vec<String>,
        /// Working directory.
        cwd: Option<String>,
        /// Environment, on top of a clean one.
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// Killed (and the step failed) after this long; default 5 minutes.
        timeout: Option<String>,
    },
    /// Keep a copy of a file so that unwinding puts it back as it is now.
    BackupFile {
        /// The file.
        path: String,
    },
    /// Write a file atomically from a template.
    WriteFile {
        /// The file.
        path: String,
        /// Its content; usually `{some_param}`.
        content: String,
        /// Octal mode, e.g. "0640"; default 0644.
        mode: Option<String>,
        /// Owner user name.
        owner: Option<String>,
        /// Owner group name.
        group: Option<String>,
    },
    /// Fetch a URL into a file atomically, with a size limit.
    Download {
        /// HTTP(S) URL.
        url: String,
        /// The file.
        path: String,
        /// Bytes at most; default 10 MiB.
        max_bytes: Option<u64>,
        /// Default 5 minutes.
        timeout: Option<String>,
        /// Octal mode; default 0644.
        mode: Option<String>,
    },
    /// Change a file's owner and/or group.
    Chown {
        /// The file.
        path: String,
        /// User name.
        owner: Option<String>,
        /// Group name.
        group: Option<String>,
    },
    /// Change a file's mode.
    Chmod {
        /// The file.
        path: String,
        /// Octal mode, e.g. "0600".
        mode: String,
    },
}

impl Action {
    /// The step name used when the config gives none.
    pub fn default_name(&self) -> String {
        match self {
            Action::Command { argv, .. } => format!("run {}", argv.join(" ")),
            Action::Check { argv, .. } => format!("check {}", argv.join(" ")),
            Action::BackupFile { path } => format!("back up {path}"),
            Action::WriteFile { path, .. } => format!("write {path}"),
            Action::Download { path, .. } => format!("download {path}"),
            Action::Chown { path, .. } => format!("chown {path}"),
            Action::Chmod { path, .. } => format!("chmod {path}"),
        }
    }

    /// Every template string in the action, for validation.
    pub(crate) fn templates(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        match self {
            Action::Command {
                argv,
                undo,
                cwd,
                env,
                ..
            } => {
                out.extend(argv.iter().map(String::as_str));
                out.extend(undo.iter().flatten().map(String::as_str));
                out.extend(cwd.as_deref());
                out.extend(env.values().map(String::as_str));
            }
            Action::Check { argv, cwd, env, .. } => {
                out.extend(argv.iter().map(String::as_str));
                out.extend(cwd.as_deref());
                out.extend(env.values().map(String::as_str));
            }
            Action::BackupFile { path } | Action::Chmod { path, .. } => out.push(path),
            Action::WriteFile {
                path,
                content,
                owner,
                group,
                ..
            } => {
                out.extend([path.as_str(), content.as_str()]);
                out.extend(owner.as_deref());
                out.extend(group.as_deref());
            }
            Action::Download { url, path, .. } => out.extend([url.as_str(), path.as_str()]),
            Action::Chown { path, owner, group } => {
                out.push(path);
                out.extend(owner.as_deref());
                out.extend(group.as_deref());
            }
        }
        out
    }
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
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            listen_unix: None,
            data_dir: default_data_dir(),
            max_connections: 4096,
            first_bytes_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            sync: SyncMode::Full,
            history: History::default(),
            tokens: Vec::new(),
            runbooks: Vec::new(),
            include: Vec::new(),
            haproxy: Vec::new(),
            smtp: None,
            certificates: Certificates::default(),
            acme: Vec::new(),
        }
    }
}

/// The full default configuration with every key commented, as `statelyd --print-config`
/// prints it. A test checks it parses to the defaults.
pub const DEFAULT_CONFIG: &str = r#"# statelyd configuration. Every key is optional; the values shown are the defaults.

# gRPC listener (TCP). Keep it on loopback unless TLS is in front.
listen = "127.0.0.1:50051"

# Also serve on a unix socket (clients: --server unix:/path).
# listen_unix = "/run/stately/stately.sock"

# Store, backups and the generated token. Default: $STATELY_DATA_DIR, else /var/lib/stately
# for root, else $XDG_STATE_HOME/stately or ~/.local/state/stately.
# data_dir = "/var/lib/stately"

# Open connections per listener at most (lowered to fit the open-file limit, which statelyd
# raises to its hard limit at start). At the cap, the connection quiet the longest makes room.
max_connections = 4096
# A connection that sends nothing for this long after it opened is closed.
first_bytes_timeout = "10s"

# On SIGTERM/SIGINT: how long running jobs get to finish before the daemon exits and leaves
# them to be unwound at the next start.
shutdown_grace = "10s"

# Journal durability: "full" syncs each commit (survives power loss), "normal" survives a
# crash of the daemon but not of the machine.
sync = "full"

# More runbooks, from files holding only [[runbook]] tables (paths relative to this file).
include = []

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
# Answer HTTP-01 here; route /.well-known/acme-challenge/ to it from HAProxy (see README).
# responder = "127.0.0.1:8402"
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
            let more: RunbookFile = toml::from_str(&text).map_err(|e| parse_error(&file, e))?;
            config.runbooks.extend(more.runbooks);
        }
        config.validate(&path.display().to_string())?;
        for spec in config
            .runbooks
            .iter_mut()
            .flat_map(|r| r.params.values_mut())
        {
            spec.compiled = spec
                .pattern
                .as_deref()
                .and_then(|p| regex::Regex::new(&format!("^(?:{p})$")).ok());
        }
        Ok(config)
    }

    /// Checks what the schema alone cannot: names, templates, roots, modes, timeouts.
    pub fn validate(&self, origin: &str) -> Result<(), Error> {
        let invalid = |message: String| Error::Invalid {
            origin: origin.to_owned(),
            message,
        };
        for a in &self.acme {
            if !is_safe_name(&a.name) {
                return Err(invalid(format!(
                    "acme '{}': a name of letters, digits, '-', '_', '.'",
                    a.name
                )));
            }
            if !a.directory.starts_with("https://") {
                return Err(invalid(format!(
                    "acme '{}': directory must be an https:// URL",
                    a.name
                )));
            }
            if a.eab_kid.is_some() != a.eab_hmac_file.is_some() {
                return Err(invalid(format!(
                    "acme '{}': eab_kid and eab_hmac_file go together",
                    a.name
                )));
            }
        }
        if self.acme_server(&self.certificates.default_acme).is_none() {
            return Err(invalid(format!(
                "certificates: default_acme '{}' is not an [[acme]] name nor letsencrypt / letsencrypt-staging",
                self.certificates.default_acme
            )));
        }
        for w in &self.certificates.webroots {
            if !w.is_absolute() {
                return Err(invalid(format!(
                    "certificates: webroot {} must be an absolute path",
                    w.display()
                )));
            }
        }
        if let Some(smtp) = &self.smtp {
            if smtp.host.trim().is_empty() {
                return Err(invalid("smtp: host is empty".into()));
            }
            if let Err(e) = smtp.from.parse::<lettre::message::Mailbox>() {
                return Err(invalid(format!(
                    "smtp: from '{}' is not a mail address: {e}",
                    smtp.from
                )));
            }
            if smtp.timeout < Duration::from_millis(100)
                || smtp.retry_max < Duration::from_millis(100)
            {
                return Err(invalid(
                    "smtp: timeout and retry_max are at least 100ms".into(),
                ));
            }
            if smtp.user.is_some() != smtp.password_file.is_some() {
                return Err(invalid(
                    "smtp: user and password_file go together (give both or neither)".into(),
                ));
            }
        }
        let mut targets = std::collections::HashSet::new();
        for t in &self.haproxy {
            if !is_safe_name(&t.name) || !targets.insert(t.name.as_str()) {
                return Err(invalid(format!(
                    "haproxy target '{}': a unique name of letters, digits, '-', '_', '.'",
                    t.name
                )));
            }
            if let Some(c) = &t.config
                && !c.is_absolute()
            {
                return Err(invalid(format!(
                    "haproxy target '{}': config must be an absolute path",
                    t.name
                )));
            }
            if let Some(s) = &t.stats_socket
                && !s.is_absolute()
            {
                return Err(invalid(format!(
                    "haproxy target '{}': stats_socket must be an absolute path",
                    t.name
                )));
            }
        }
        let mut names = std::collections::HashSet::new();
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
        for rb in &self.runbooks {
            let at = format!("runbook '{}'", rb.name);
            if !is_safe_name(&rb.name) {
                return Err(invalid(format!(
                    "{at}: a name is letters, digits, '-', '_' and '.'"
                )));
            }
            if !names.insert(rb.name.as_str()) {
                return Err(invalid(format!("{at} is defined twice")));
            }
            if rb.steps.is_empty() {
                return Err(invalid(format!("{at} has no steps")));
            }
            for root in &rb.roots {
                if !root.is_absolute() || !is_normal(root) {
                    return Err(invalid(format!(
                        "{at}: root {} must be an absolute path without '..'",
                        root.display()
                    )));
                }
            }
            for (name, spec) in &rb.params {
                if !is_safe_name(name) {
                    return Err(invalid(format!(
                        "{at}: parameter name '{name}' is not a plain name"
                    )));
                }
                if let Some(p) = &spec.pattern {
                    regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                        invalid(format!("{at}: parameter '{name}': bad pattern: {e}"))
                    })?;
                }
            }
            let check_template = |s: &str, what: &str| -> Result<(), Error> {
                for used in template_names(s).map_err(|e| invalid(format!("{at}, {what}: {e}")))? {
                    if !rb.params.contains_key(&used) {
                        return Err(invalid(format!(
                            "{at}, {what}: {{{used}}} is not a declared parameter"
                        )));
                    }
                }
                Ok(())
            };
            for r in rb.resources.iter().flatten() {
                check_template(r, "resources")?;
            }
            for (i, step) in rb.steps.iter().enumerate() {
                let what = format!("step {}", i + 1);
                for t in step.action.templates() {
                    check_template(t, &what)?;
                }
                let needs_roots =
                    !matches!(step.action, Action::Command { .. } | Action::Check { .. });
                if needs_roots && rb.roots.is_empty() {
                    return Err(invalid(format!("{at}, {what}: file steps need `roots`")));
                }
                match &step.action {
                    Action::Command { argv, timeout, .. } | Action::Check { argv, timeout, .. } => {
                        if argv.is_empty() {
                            return Err(invalid(format!("{at}, {what}: argv is empty")));
                        }
                        if let Some(t) = timeout {
                            humantime::parse_duration(t).map_err(|e| {
                                invalid(format!("{at}, {what}: timeout '{t}': {e}"))
                            })?;
                        }
                    }
                    Action::WriteFile { mode: Some(m), .. }
                    | Action::Download { mode: Some(m), .. }
                    | Action::Chmod { mode: m, .. } => {
                        parse_mode(m).map_err(|e| invalid(format!("{at}, {what}: {e}")))?;
                    }
                    _ => {}
                }
                if let Action::Download {
                    timeout: Some(t), ..
                } = &step.action
                {
                    humantime::parse_duration(t)
                        .map_err(|e| invalid(format!("{at}, {what}: timeout '{t}': {e}")))?;
                }
            }
        }
        Ok(())
    }

    /// The runbook of that name.
    pub fn runbook(&self, name: &str) -> Option<&Runbook> {
        self.runbooks.iter().find(|r| r.name == name)
    }
}

/// A name that is safe as a file name and in a resource: `[A-Za-z0-9._-]+`, not `.`/`..`.
pub(crate) fn is_safe_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Whether a path has no `.`/`..` components (so a prefix check on it means something).
pub(crate) fn is_normal(p: &Path) -> bool {
    p.components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// Parses an octal file mode such as "0644".
pub(crate) fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(format!("mode '{s}' is not an octal mode like \"0644\"")),
    }
}

/// The parameter names a template uses: `{name}`; `{{` and `}}` are literal braces.
pub(crate) fn template_names(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    render(s, |name| {
        out.push(name.to_owned());
        Some(String::new())
    })?;
    Ok(out)
}

/// Expands `{name}` with `lookup`; `{{`/`}}` are literal braces.
pub(crate) fn render(
    s: &str,
    mut lookup: impl FnMut(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => name.push(c),
                        None => return Err(format!("unclosed '{{' in \"{s}\"")),
                    }
                }
                match lookup(&name) {
                    Some(v) => out.push_str(&v),
                    None => return Err(format!("{{{name}}} is not a declared parameter")),
                }
            }
            '}' => return Err(format!("lone '}}' in \"{s}\" (write '}}}}')")),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Reads durations like "10s" written as strings in the config.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
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
    fn templates_expand_and_escape() {
        let out = render("a{x}b{{c}}", |n| (n == "x").then(|| "X".to_owned())).unwrap();
        assert_eq!(out, "aXb{c}");
        assert!(render("{y}", |_| None).is_err());
        assert!(render("{open", |_| Some(String::new())).is_err());
    }
}
