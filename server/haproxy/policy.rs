//! What a client's HAProxy configuration may ask of the machine. `haproxy -c` is not inert:
//! `lua-load` runs Lua as the checking user, a file named by `lua-load` or `-f` is quoted back
//! in errors, `.warning "${VAR}"` prints the environment. So before HAProxy sees a candidate,
//! every file it names (certificates, CA files, error files, ACL and map files, Lua, state and
//! pid files, unix sockets) must lie in a directory the target allows, and what runs code
//! (Lua, external checks, `program` sections, forking) is refused unless the daemon's
//! configuration allows it. HAProxy's own parser is the reference; this is a conservative
//! reading of its keywords, not a second parser: a line it cannot read is refused, not guessed.

use super::cfg::words;
use crate::fsops::canonical_prefix;
use std::path::{Component, Path, PathBuf};

/// A target's policy, resolved at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Directories files may be named in (canonical where they exist).
    pub allow_dirs: Vec<PathBuf>,
    /// Lua, external checks, `program` sections, `insecure-fork-wanted`, `setenv` and kin.
    pub allow_code: bool,
}

/// Keywords that make HAProxy run code or change what code it runs sees.
const CODE: &[&str] = &[
    "lua-load",
    "lua-load-per-thread",
    "lua-prepend-path",
    "external-check",
    "insecure-fork-wanted",
    "insecure-setuid-wanted",
    "setenv",
    "presetenv",
    "resetenv",
    "unsetenv",
    "ssl-engine",
    "ssl-provider",
    "ssl-provider-path",
];

/// Directives whose first argument is a file or directory.
const FILE_DIRECTIVES: &[&str] = &[
    "crt-base",
    "ca-base",
    "server-state-base",
    "server-state-file",
    "ssl-dh-param-file",
    "issuers-chain-path",
    "h1-case-adjust-file",
    "51degrees-data-file",
    "wurfl-data-file",
    "deviceatlas-json-file",
    "pidfile",
    "httpclient.ssl.ca-file",
    "server-state-file-name",
    "lua-load",
    "lua-load-per-thread",
    "lua-prepend-path",
];

/// Options, anywhere on a line, whose next word is a file.
const FILE_OPTIONS: &[&str] = &[
    "crt",
    "crt-list",
    "ca-file",
    "crl-file",
    "ca-verify-file",
    "ca-sign-file",
    "ssl-dh-param-file",
    "errorfile",
    "file",
    "lf-file",
    "-f",
    "config",
];

/// Converters and actions whose first argument is a file (`map_str(/etc/x.map)`, `set-map(..)`),
/// wherever they sit in a word (`%[src,map_ip(/x)]`).
static FILE_FUNCTION: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
    regex::Regex::new(
        r"(?:^|[^A-Za-z0-9_-])(map(?:_[a-z0-9]+)?|set-map|del-map|add-acl|del-acl)\(([^,)]*)",
    )
    .expect("a valid pattern")
});

impl Policy {
    /// Checks a candidate; the error names the line and what it may not do. `base` is the
    /// directory relative paths are read from (the live file's: the check runs there).
    pub fn check(&self, text: &str, base: &Path) -> Result<(), String> {
        self.check_changes(text, base, None)
    }

    /// Like [`Policy::check`], judging only the lines `before` did not have (an edit answers
    /// for what it adds, not for what an administrator already wrote; `crt-base` and the
    /// like are still read from every line).
    pub fn check_changes(
        &self,
        text: &str,
        base: &Path,
        before: Option<&str>,
    ) -> Result<(), String> {
        let kept_lines: Option<std::collections::HashSet<&str>> =
            before.map(|b| b.lines().collect());
        let mut crt_base: Option<PathBuf> = None;
        let mut ca_base: Option<PathBuf> = None;
        let mut origin: Option<PathBuf> = None;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let kept = kept_lines.as_ref().is_some_and(|k| k.contains(raw));
            // A kept line matters only where it says where later names are looked up.
            if kept && !raw.contains("-base") && !raw.contains("default-path") {
                continue;
            }
            let words = words(raw).map_err(|why| format!("line {n}: {why}"))?;
            let Some(first) = words.first().map(String::as_str) else {
                continue;
            };
            let refuse = |what: String| {
                Err(format!(
                    "line {n} ({}): {what}",
                    crate::quote::quote(raw.trim())
                ))
            };
            let code = CODE.contains(&first)
                || first == "program"
                || (first == "option"
                    && words.get(1).map(String::as_str) == Some("external-check"));
            if code && !self.allow_code && !kept {
                return refuse(format!(
                    "`{first}` runs code or shapes what code sees, and this target's policy does not allow it (allow_code)"
                ));
            }
            let mut files: Vec<(&str, &str)> = Vec::new();
            if FILE_DIRECTIVES.contains(&first)
                && let Some(arg) = words.get(1)
            {
                files.push((first, arg));
            }
            // `stats socket <path>` and `bind <path>` / `bind unix@<path>` create sockets.
            if first == "stats"
                && words.get(1).map(String::as_str) == Some("socket")
                && let Some(arg) = words.get(2)
            {
                files.push(("stats socket", arg.strip_prefix("unix@").unwrap_or(arg)));
            }
            // `bind` / `dgram-bind` addresses, comma-separated: unix sockets are files HAProxy
            // renames over whatever is at that path.
            if (first == "bind" || first == "dgram-bind")
                && let Some(arg) = words.get(1)
            {
                for a in arg.split(',') {
                    let path = ["unix@", "uxst@", "uxdg@"]
                        .iter()
                        .find_map(|p| a.strip_prefix(p))
                        .or_else(|| a.starts_with('/').then_some(a));
                    if let Some(p) = path {
                        files.push((first, p));
                    }
                }
            }
            // `unix-bind prefix <dir>`: where unix sockets are created.
            if first == "unix-bind"
                && let Some(i) = words.iter().position(|w| w == "prefix")
                && let Some(dir) = words.get(i + 1)
            {
                files.push(("unix-bind prefix", dir));
            }
            // Where relative paths are read from: only the live file's directory is known.
            if first == "default-path" {
                match words.get(1).map(String::as_str) {
                    Some("config") => {}
                    Some("origin") => match words.get(2) {
                        Some(dir) => files.push(("default-path origin", dir)),
                        None => return refuse("`default-path origin` needs a directory".into()),
                    },
                    _ => {
                        if !kept {
                            return refuse(
                            "`default-path` may be `config` or `origin <dir>` here: relative paths must be read from a known directory".into(),
                        );
                        }
                    }
                }
            }
            for (j, w) in words.iter().enumerate().skip(1) {
                if FILE_OPTIONS.contains(&w.as_str())
                    && let Some(arg) = words.get(j + 1)
                {
                    // `errorfile <code> <file>` names the file second.
                    let arg = if w == "errorfile" && arg.bytes().all(|b| b.is_ascii_digit()) {
                        match words.get(j + 2) {
                            Some(a) => a,
                            None => continue,
                        }
                    } else {
                        arg
                    };
                    files.push((w, arg));
                }
                // Most words have no function call: skip the pattern for them (a 5000-server
                // configuration has tens of thousands of words).
                if !w.contains('(') {
                    continue;
                }
                for c in FILE_FUNCTION.captures_iter(w) {
                    let (Some(name), Some(arg)) = (c.get(1), c.get(2)) else {
                        continue;
                    };
                    if !arg.as_str().is_empty() {
                        files.push((name.as_str(), arg.as_str()));
                    }
                }
            }
            if first == "errorfile"
                && let Some(f) = words.get(2)
            {
                files.push(("errorfile", f));
            }
            for (what, arg) in files {
                let base = origin.as_deref().unwrap_or(base);
                let relative_to = match what {
                    "crt" | "crt-list" => crt_base.as_deref().unwrap_or(base),
                    "ca-file" | "crl-file" | "ca-verify-file" | "ca-sign-file" => {
                        ca_base.as_deref().unwrap_or(base)
                    }
                    _ => base,
                };
                if arg.contains(['"', '\'']) && !kept {
                    return refuse(format!(
                        "`{what}` names {} with quotes inside; name the file plainly",
                        crate::quote::quote(arg)
                    ));
                }
                if Path::new(arg)
                    .components()
                    .any(|c| c == Component::ParentDir)
                    && !kept
                {
                    return refuse(format!(
                        "`{what}` names {} through `..`; name the file plainly",
                        crate::quote::quote(arg)
                    ));
                }
                if arg.contains('$') && !kept {
                    return refuse(format!(
                        "`{what}` names a file through an environment variable ({}); name it plainly",
                        crate::quote::quote(arg)
                    ));
                }
                let path = resolve(relative_to, arg);
                // `crt-base` and `ca-base` only say where names are looked up (Debian's stock
                // haproxy.cfg sets them to /etc/ssl/...): the files read through them are
                // checked, not the directories themselves.
                let looked_up_in = matches!(what, "crt-base" | "ca-base");
                if !looked_up_in && !self.allows(&path) && !kept {
                    return refuse(format!(
                        "`{what}` names {}, outside the directories this target allows ({})",
                        crate::quote::quote(arg),
                        self.allow_dirs
                            .iter()
                            .map(|d| d.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                match what {
                    "crt-base" => crt_base = Some(path),
                    "ca-base" => ca_base = Some(path),
                    "default-path origin" => origin = Some(path),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Whether a path (resolved) lies in an allowed directory, symbolic links followed as far
    /// as the path exists.
    fn allows(&self, path: &Path) -> bool {
        let real = canonical_prefix(path);
        self.allow_dirs.iter().any(|d| real.starts_with(d))
    }
}

/// `arg` against `base` when relative, with `.` and `..` folded.
fn resolve(base: &Path, arg: &str) -> PathBuf {
    let joined = base.join(arg);
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(dir: &Path) -> Policy {
        Policy {
            allow_dirs: vec![canonical_prefix(dir)],
            allow_code: false,
        }
    }

    #[test]
    fn an_edit_answers_only_for_the_lines_it_adds() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy(dir.path());
        // What the administrator wrote stays theirs: an edit beside it is not refused for it.
        let before = "global\n  lua-load /etc/haproxy/auth.lua\nfrontend fe\n  bind :80\n";
        let edited = format!("{before}  http-request redirect scheme https\n");
        p.check_changes(&edited, dir.path(), Some(before)).unwrap();
        assert!(p.check(&edited, dir.path()).is_err());
        // A line the edit adds is judged.
        let added = format!("{before}  lua-load /tmp/evil.lua\n");
        let e = p
            .check_changes(&added, dir.path(), Some(before))
            .unwrap_err();
        assert!(e.contains("/tmp/evil.lua"), "{e}");
    }

    #[test]
    fn code_and_files_outside_the_allowed_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy(dir.path());
        let ok = format!(
            "global\n  stats socket {0}/admin.sock mode 600 level admin\n\
             frontend fe\n  bind :443 ssl crt {0}/certs alpn h2\n  errorfile 503 errors/503.http\n\
             acl a src -f {0}/allow.lst # -f /etc/shadow in a comment\n",
            dir.path().display()
        );
        p.check(&ok, dir.path()).unwrap();
        // Regex escapes HAProxy leaves alone are fine.
        p.check(
            "frontend fe\n  acl st path_reg \\.(css|js)$\n  http-request replace-path /a/(.*) /b/\\1\n",
            dir.path(),
        )
        .unwrap();
        // Debian's stock global section names where SSL files are looked up; that alone is fine.
        p.check(
            "global\n  ca-base /etc/ssl/certs\n  crt-base /etc/ssl/private\n",
            dir.path(),
        )
        .unwrap();
        for bad in [
            "global\n  lua-load /tmp/x.lua\n",
            "global\n  lua-load \"/tmp/x.lua\"\n",
            "program p\n  command /bin/sh\n",
            "backend b\n  option external-check\n",
            "global\n  insecure-fork-wanted\n",
            "global\n  setenv A b\n",
            "frontend fe\n  bind :443 ssl crt /etc/ssl/private\n",
            "frontend fe\n  http-request return status 200 file /etc/shadow\n",
            "frontend fe\n  acl a src -f /etc/shadow\n",
            "frontend fe\n  http-request set-header x %[src,map_ip(/etc/passwd)]\n",
            "frontend fe\n  errorfile 503 ../../../etc/shadow\n",
            "global\n  pidfile /etc/cron.d/x\n",
            "global\n  pidfile \"${HOME}/x\"\n",
            "global\n  crt-base /etc\nfrontend fe\n  bind :443 ssl crt ssl/private/x.pem\n",
            "global\n  ca-base /etc/ssl/certs\nbackend b\n  server s 1.2.3.4:443 ssl ca-file ca.pem\n",
            "frontend fe\n  bind /etc/evil.sock\n",
            "frontend fe\n  bind :80,uxst@/etc/evil.sock\n",
            "global\n  unix-bind prefix /etc\n",
            "global\n  lua-loa\\x64 /tmp/x.lua\n",
            "frontend fe\n  errorfile 503 \\x2fetc/shadow\n",
            "global\n  default-path parent\n",
            "global\n  default-path origin /etc\n",
            "global\n  ssl-provider-path /tmp\n",
            "global\n  ssl-engine rdrand\n",
            "global\n  httpclient.ssl.ca-file /etc/shadow\n",
            "frontend fe\n  errorfile 503 certs/../../../etc/shadow\n",
            "frontend fe\n  http-request set-header x %[src,map_ip(\\\"/etc/passwd\\\")]\n",
        ] {
            let e = p
                .check(bad, dir.path())
                .expect_err(&format!("refused: {bad}"));
            assert!(e.starts_with("line "), "{bad}: {e}");
        }
    }

    #[test]
    fn a_symlink_out_of_an_allowed_directory_is_seen_through() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("etc")).unwrap();
        let p = policy(dir.path());
        let e = p
            .check("frontend fe\n  errorfile 503 etc/shadow\n", dir.path())
            .unwrap_err();
        assert!(e.contains("outside the directories"), "{e}");
    }

    #[test]
    fn debians_stock_configuration_passes_with_the_default_directories() {
        // The haproxy package's own file (the test script installs the package).
        let stock = std::fs::read_to_string("/etc/haproxy/haproxy.cfg")
            .expect("Debian's haproxy package is installed");
        let p = Policy {
            allow_dirs: ["/etc/haproxy", "/run/haproxy"]
                .iter()
                .map(|d| canonical_prefix(Path::new(d)))
                .collect(),
            allow_code: false,
        };
        p.check(&stock, Path::new("/etc/haproxy")).unwrap();
    }

    #[test]
    fn allowed_code_passes() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = policy(dir.path());
        p.allow_code = true;
        p.check(
            &format!("global\n  lua-load {}/x.lua\n", dir.path().display()),
            dir.path(),
        )
        .unwrap();
        assert!(
            p.check("global\n  lua-load /tmp/x.lua\n", dir.path())
                .is_err()
        );
    }
}
