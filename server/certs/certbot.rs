//! What certbot left under its root: `renewal/<name>.conf` (how a lineage is renewed),
//! `live/<name>/*.pem` links into `archive/<name>/`, and the `previous_*.pem` links certbot
//! leaves when an update of the live links was interrupted. Read here, and turned into what
//! stately needs to take a lineage over: its renewal settings, the repair certbot itself
//! would make, and whether a `-0001` side lineage covers it.

use super::lineage::{FILES, Lineage};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A renewal configuration, as certbot writes it (configobj): top-level keys and
/// `[renewalparams]` and `[[webroot_map]]` keys.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct RenewalConf {
    pub(crate) top: BTreeMap<String, String>,
    pub(crate) params: BTreeMap<String, String>,
    pub(crate) webroot_map: BTreeMap<String, String>,
}

/// Parses a renewal configuration. Unknown sections are kept out; a line that is not
/// `key = value` is an error naming it.
pub(crate) fn parse_renewal(text: &str) -> Result<RenewalConf, String> {
    let mut conf = RenewalConf::default();
    let mut section = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            section = line
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned();
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("line {}: not `key = value`", i + 1));
        };
        let (k, v) = (k.trim().to_owned(), v.trim().to_owned());
        match section.as_str() {
            "" => conf.top.insert(k, v),
            "renewalparams" => conf.params.insert(k, v),
            "webroot_map" => conf.webroot_map.insert(k, v),
            _ => None,
        };
    }
    Ok(conf)
}

impl RenewalConf {
    /// The authenticator certbot used (`webroot`, `standalone`, `nginx`, `dns-rfc2136`...).
    pub(crate) fn authenticator(&self) -> &str {
        self.params
            .get("authenticator")
            .map(String::as_str)
            .unwrap_or("")
    }

    /// The ACME directory URL.
    pub(crate) fn server(&self) -> Option<&str> {
        self.params.get("server").map(String::as_str)
    }

    /// The webroot of `name` (from the map), else the first `webroot_path`.
    pub(crate) fn webroot(&self, name: &str) -> Option<PathBuf> {
        self.webroot_map
            .get(name)
            .cloned()
            .or_else(|| {
                self.params.get("webroot_path").and_then(|p| {
                    p.split(',')
                        .map(str::trim)
                        .find(|s| !s.is_empty())
                        .map(str::to_owned)
                })
            })
            .map(PathBuf::from)
    }

    /// stately's name for certbot's key settings (`key_type`, `elliptic_curve`,
    /// `rsa_key_size`); None when certbot recorded none (then the live key's type is used).
    pub(crate) fn key_type(&self) -> Option<String> {
        match self.params.get("key_type").map(String::as_str) {
            Some("ecdsa") => Some(
                match self
                    .params
                    .get("elliptic_curve")
                    .map(String::as_str)
                    .unwrap_or("secp256r1")
                {
                    "secp256r1" => "ec256".to_owned(),
                    "secp384r1" => "ec384".to_owned(),
                    // Not one stately issues: the caller refuses it by name.
                    other => other.to_owned(),
                },
            ),
            Some("rsa") => Some(format!(
                "rsa{}",
                self.params
                    .get("rsa_key_size")
                    .map(String::as_str)
                    .unwrap_or("2048")
            )),
            _ => None,
        }
    }

    /// The hooks certbot runs for this lineage (`pre_hook`, `post_hook`, `renew_hook`,
    /// `deploy_hook`), as (key, command).
    pub(crate) fn hooks(&self) -> Vec<(String, String)> {
        ["pre_hook", "post_hook", "renew_hook", "deploy_hook"]
            .iter()
            .filter_map(|k| {
                self.params
                    .get(*k)
                    .filter(|v| !v.is_empty() && v.as_str() != "None")
                    .map(|v| (k.to_string(), v.clone()))
            })
            .collect()
    }

    /// certbot's `reuse_key`.
    pub(crate) fn reuse_key(&self) -> bool {
        self.params
            .get("reuse_key")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }
}

/// The lineages certbot has a renewal configuration for, by name.
pub(crate) fn renewal_names(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join("renewal"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_suffix(".conf")
                        .map(str::to_owned)
                })
                .filter(|n| crate::fsops::is_safe_name(n))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `renewal/<name>.conf`.
pub(crate) fn renewal_file(root: &Path, name: &str) -> PathBuf {
    root.join("renewal").join(format!("{name}.conf"))
}

/// `live/<name>/previous_<file>.pem`: where certbot keeps the old targets while it switches.
pub(crate) fn previous_link(l: &Lineage, file: &str) -> PathBuf {
    l.live_dir().join(format!("previous_{file}.pem"))
}

/// What a lineage's live links say, checked as certbot checks them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LinkState {
    /// The version each live link points at (None: missing, or not into its archive).
    pub(crate) live: Vec<(String, Option<u32>)>,
    /// `previous_*.pem` links: an interrupted update, as (file, the link's target).
    pub(crate) previous: Vec<(String, PathBuf)>,
}

/// The version a link target names, if it is a file of `l`'s archive: relative
/// (`../../archive/<name>/certN.pem`, as stately and certbot's first install write it) or
/// absolute (`<root>/archive/<name>/certN.pem`, as certbot's `previous_*` links and its
/// repairs write it).
pub(crate) fn version_of(l: &Lineage, file: &str, target: &Path) -> Option<u32> {
    let parent = target.parent()?;
    let relative = Path::new("../../archive").join(&l.name);
    let same_dir = parent == relative
        || (target.is_absolute()
            && crate::fsops::canonical_prefix(parent)
                == crate::fsops::canonical_prefix(&l.archive_dir()));
    if !same_dir {
        return None;
    }
    target
        .file_name()?
        .to_string_lossy()
        .strip_prefix(file)?
        .strip_suffix(".pem")?
        .parse::<u32>()
        .ok()
}

/// Reads a lineage's links.
pub(crate) fn link_state(l: &Lineage) -> LinkState {
    let live = FILES
        .iter()
        .map(|f| {
            let v = std::fs::read_link(l.live_file(f))
                .ok()
                .filter(|_| l.live_file(f).exists())
                .and_then(|t| version_of(l, f, &t));
            (f.to_string(), v)
        })
        .collect();
    let previous = FILES
        .iter()
        .filter_map(|f| {
            std::fs::read_link(previous_link(l, f))
                .ok()
                .map(|t| (f.to_string(), t))
        })
        .collect();
    LinkState { live, previous }
}

/// What certbot's `_fix_symlinks` would do to a lineage: with all four `previous_*.pem`
/// links present (each naming a version of the lineage's archive that is there), point each
/// live link at its previous link's version; then remove every previous link. Returns the
/// live links to set (file, relative target, as stately writes them) and the previous links
/// to go.
pub(crate) fn repair(l: &Lineage, s: &LinkState) -> (Vec<(String, PathBuf)>, Vec<PathBuf>) {
    let versions: Vec<(String, u32)> = s
        .previous
        .iter()
        .filter_map(|(f, t)| {
            let v = version_of(l, f, t)?;
            l.archive_file(f, v).exists().then(|| (f.clone(), v))
        })
        .collect();
    let set = if versions.len() == FILES.len() {
        versions
            .iter()
            .filter(|(f, v)| {
                std::fs::read_link(l.live_file(f)).ok().as_deref()
                    != Some(l.link_target(f, *v).as_path())
            })
            .map(|(f, v)| (f.clone(), l.link_target(f, *v)))
            .collect()
    } else {
        Vec::new()
    };
    let gone = s
        .previous
        .iter()
        .map(|(f, _)| previous_link(l, f))
        .collect();
    (set, gone)
}

/// Whether the live links agree (all four into the archive, one version, each there).
pub(crate) fn consistent(s: &LinkState) -> Result<u32, String> {
    let mut version = None;
    for (f, v) in &s.live {
        let Some(v) = v else {
            return Err(format!(
                "live/{f}.pem is missing or does not point into the lineage's archive"
            ));
        };
        match version {
            None => version = Some(*v),
            Some(w) if w != *v => {
                return Err(format!(
                    "the live links point at different versions ({w} and {v}, at {f}.pem)"
                ));
            }
            _ => {}
        }
    }
    version.ok_or_else(|| "no live links".to_owned())
}

/// The executables in certbot's `renewal-hooks/{pre,deploy,post}/`, which certbot runs
/// around every renewal.
pub(crate) fn hook_scripts(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in ["pre", "deploy", "post"] {
        if let Ok(rd) = std::fs::read_dir(root.join("renewal-hooks").join(d)) {
            out.extend(
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.is_file()),
            );
        }
    }
    out.sort();
    out
}

/// certbot's lock on its root, held until dropped; the lock file is removed then, as certbot
/// removes it.
#[derive(Debug)]
pub(crate) struct Lock {
    _file: std::fs::File,
    path: PathBuf,
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Takes certbot's own lock on its root (`.certbot.lock`, a POSIX record lock, as certbot's
/// `lock_dir` takes it), so no certbot run changes the lineages while it is held. An error
/// says certbot is running.
pub(crate) fn lock(root: &Path) -> Result<Lock, String> {
    let path = root.join(".certbot.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let whole = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_SETLK(&whole)).map_err(|e| {
        format!(
            "certbot holds {} ({e}): it is running on this root; try again when it is done",
            path.display()
        )
    })?;
    Ok(Lock { _file: f, path })
}

/// certbot's timers that run `certbot renew` on this machine (they renew what its renewal
/// directory lists), as paths.
pub(crate) fn timers() -> Vec<PathBuf> {
    [
        "/etc/cron.d/certbot",
        "/etc/systemd/system/timers.target.wants/certbot.timer",
        "/etc/systemd/system/timers.target.wants/snap.certbot.renew.timer",
    ]
    .iter()
    .map(PathBuf::from)
    .filter(|p| p.exists())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = "# renew_before_expiry = 30 days\nversion = 2.1.0\narchive_dir = /etc/letsencrypt/archive/example.com\ncert = /etc/letsencrypt/live/example.com/cert.pem\n\n# Options used in the renewal process\n[renewalparams]\naccount = 5ff5\nauthenticator = webroot\nwebroot_path = /var/www/html,\nserver = https://acme-v02.api.letsencrypt.org/directory\nkey_type = ecdsa\nelliptic_curve = secp384r1\nreuse_key = True\n[[webroot_map]]\nwww.example.com = /var/www/www\n";

    #[test]
    fn a_renewal_conf_reads_as_certbot_wrote_it() {
        let c = parse_renewal(CONF).unwrap();
        assert_eq!(c.top["version"], "2.1.0");
        assert_eq!(c.authenticator(), "webroot");
        assert_eq!(
            c.server(),
            Some("https://acme-v02.api.letsencrypt.org/directory")
        );
        assert_eq!(
            c.webroot("example.com").unwrap(),
            Path::new("/var/www/html")
        );
        assert_eq!(
            c.webroot("www.example.com").unwrap(),
            Path::new("/var/www/www")
        );
        assert_eq!(c.key_type().as_deref(), Some("ec384"));
        assert!(c.reuse_key());
        let rsa = parse_renewal("[renewalparams]\nkey_type = rsa\nrsa_key_size = 4096\n").unwrap();
        assert_eq!(rsa.key_type().as_deref(), Some("rsa4096"));
        assert!(
            parse_renewal("[renewalparams]\nnonsense\n")
                .unwrap_err()
                .contains("line 2")
        );
    }

    #[test]
    fn an_interrupted_switch_is_repaired_to_the_previous_links_as_certbot_does() {
        let dir = tempfile::tempdir().unwrap();
        let l = Lineage::new(dir.path(), "example.com");
        std::fs::create_dir_all(l.archive_dir()).unwrap();
        std::fs::create_dir_all(l.live_dir()).unwrap();
        for n in [1, 2] {
            for f in FILES {
                std::fs::write(l.archive_file(f, n), "x").unwrap();
            }
        }
        // Interrupted going from 1 to 2 after two links: previous links at 1, live mixed.
        for (i, f) in FILES.iter().enumerate() {
            std::os::unix::fs::symlink(l.link_target(f, 1), previous_link(&l, f)).unwrap();
            std::os::unix::fs::symlink(l.link_target(f, if i < 2 { 2 } else { 1 }), l.live_file(f))
                .unwrap();
        }
        let s = link_state(&l);
        assert!(consistent(&s).unwrap_err().contains("different versions"));
        let (set, gone) = repair(&l, &s);
        assert_eq!(
            set,
            vec![
                ("cert".to_owned(), l.link_target("cert", 1)),
                ("chain".to_owned(), l.link_target("chain", 1))
            ]
        );
        assert_eq!(gone.len(), 4);
        // Only some previous links: certbot just removes them.
        std::fs::remove_file(previous_link(&l, "cert")).unwrap();
        let (set, gone) = repair(&l, &link_state(&l));
        assert!(set.is_empty());
        assert_eq!(gone.len(), 3);
    }
}
