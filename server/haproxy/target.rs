//! A HAProxy target as the daemon's configuration declares it (`[[haproxy]]`), and what its
//! declaration allows a client's configuration to ask of the machine.

use serde::Deserialize;
use std::path::{Path, PathBuf};

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
    /// A unix datagram socket statelyd binds to hear HAProxy's log stream for this target
    /// (`log <path> local0 notice` in haproxy.cfg's global section): a server's state change
    /// makes the stats poller poll at once, so watchers and alerts see it in milliseconds.
    #[serde(default)]
    pub log_socket: Option<PathBuf>,
    /// Or a UDP address on loopback (`log 127.0.0.1:<port> local0 notice`).
    #[serde(default)]
    pub log_udp: Option<std::net::SocketAddr>,
    /// With `allow_code`, run `haproxy -c` as this user (it must be able to read the
    /// certificates the configuration names) rather than as statelyd's.
    #[serde(default)]
    pub check_user: Option<String>,
}

impl HaproxyTarget {
    /// Where HAProxy's `log` line sends this target's log stream to statelyd (the path of
    /// `log_socket`, or `log_udp`), if it has one.
    pub fn log_address(&self) -> Option<String> {
        match (&self.log_socket, &self.log_udp) {
            (Some(p), _) => Some(p.display().to_string()),
            (None, Some(a)) => Some(a.to_string()),
            (None, None) => None,
        }
    }

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

/// Checks what the schema alone cannot: unique safe names, absolute paths.
pub(crate) fn check(targets: &[HaproxyTarget]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for t in targets {
        if !crate::fsops::is_safe_name(&t.name) || !seen.insert(t.name.as_str()) {
            return Err(format!(
                "haproxy target '{}': a unique name of letters, digits, '-', '_', '.'",
                t.name
            ));
        }
        if let Some(c) = &t.config
            && !c.is_absolute()
        {
            return Err(format!(
                "haproxy target '{}': config must be an absolute path",
                t.name
            ));
        }
        if let Some(s) = &t.stats_socket
            && !s.is_absolute()
        {
            return Err(format!(
                "haproxy target '{}': stats_socket must be an absolute path",
                t.name
            ));
        }
        if (t.log_socket.is_some() || t.log_udp.is_some()) && t.stats_socket.is_none() {
            return Err(format!(
                "haproxy target '{}': a log stream only wakes the stats poller: it needs stats_socket",
                t.name
            ));
        }
        if t.log_socket.is_some() && t.log_udp.is_some() {
            return Err(format!(
                "haproxy target '{}': give log_socket or log_udp, not both",
                t.name
            ));
        }
        if let Some(s) = &t.log_socket
            && targets.iter().any(|o| {
                [
                    &o.stats_socket,
                    &o.master_socket,
                    &o.server_state_file,
                    &o.config,
                ]
                .into_iter()
                .flatten()
                .any(|p| p == s)
                    || (o.name != t.name && o.log_socket.as_ref() == Some(s))
            })
        {
            return Err(format!(
                "haproxy target '{}': log_socket is a path another setting names already",
                t.name
            ));
        }
        if let Some(s) = &t.log_socket
            && !s.is_absolute()
        {
            return Err(format!(
                "haproxy target '{}': log_socket must be an absolute path",
                t.name
            ));
        }
        if let Some(a) = &t.log_udp
            && !a.ip().is_loopback()
        {
            return Err(format!(
                "haproxy target '{}': log_udp must be a loopback address (anyone who can reach it could send lines)",
                t.name
            ));
        }
    }
    Ok(())
}
