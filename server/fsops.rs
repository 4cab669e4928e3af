//! File operations that undo can rely on: atomic replacement (temp file, fsync, rename over,
//! fsync the directory) and a snapshot of a file's state to compare against later.

use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The hex SHA-256 of some bytes.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// A file's state, as a rollback compares it: absent, or its content hash and ownership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub(crate) enum FileState {
    /// No file there.
    Absent,
    /// A file with this content and ownership.
    Present {
        /// Hex SHA-256 of the content.
        sha256: String,
        /// Permission bits.
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// A symbolic link pointing there.
    Link {
        /// Its target, as written in the link.
        target: String,
    },
}

impl FileState {
    /// Reads a file's state now.
    pub(crate) fn of(path: &Path) -> io::Result<FileState> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(FileState::Absent),
            Err(e) => Err(e),
            Ok(meta) if meta.file_type().is_symlink() => Ok(FileState::Link {
                target: std::fs::read_link(path)?.to_string_lossy().into_owned(),
            }),
            Ok(meta) => {
                if !meta.is_file() {
                    return Err(io::Error::other(format!(
                        "{} is not a regular file",
                        path.display()
                    )));
                }
                let bytes = std::fs::read(path)?;
                Ok(FileState::Present {
                    sha256: sha256_hex(&bytes),
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                })
            }
        }
    }

    /// How it differs from `other`, in words, or None when equal.
    pub(crate) fn difference(&self, now: &FileState) -> Option<String> {
        match (self, now) {
            (a, b) if a == b => None,
            (FileState::Link { target: a }, FileState::Link { target: b }) => {
                Some(format!("it pointed to {a} and now points to {b}"))
            }
            (FileState::Absent, FileState::Present { .. }) => Some("it was created since".into()),
            (FileState::Present { .. }, FileState::Absent) => Some("it was removed since".into()),
            (
                FileState::Present {
                    sha256: h1,
                    mode: m1,
                    uid: u1,
                    gid: g1,
                },
                FileState::Present {
                    sha256: h2,
                    mode: m2,
                    uid: u2,
                    gid: g2,
                },
            ) => Some(if h1 != h2 {
                format!(
                    "its content changed since (sha256 {}… is now {}…)",
                    &h1[..12],
                    &h2[..12]
                )
            } else if m1 != m2 {
                format!("its mode changed since ({m1:04o} is now {m2:04o})")
            } else {
                format!("its owner changed since ({u1}:{g1} is now {u2}:{g2})")
            }),
            _ => Some("it changed since".into()),
        }
    }
}

/// Writes `bytes` to `path` atomically: a temp file beside it, fsynced, given its mode and
/// owner, renamed over the old file, then the directory fsynced.
pub(crate) fn write_atomic(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("path has no parent directory"))?;
    std::fs::create_dir_all(dir)?;
    let tmp = temp_beside(path);
    let result = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        // Created with its final mode: a private key is never readable by others, even briefly.
        let mut f = std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(mode & 0o777)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        // A daemon that is not root may only "give" a file to itself: skip that no-op.
        let me = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        if let Some((uid, gid)) = owner.filter(|o| *o != me) {
            nix::unistd::fchown(&f, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                .map_err(io::Error::from)?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Makes `path` a symbolic link to `target` atomically: a new link beside it renamed over
/// whatever was there (never unlink-then-link), then the directory fsynced.
pub(crate) fn symlink_atomic(target: &Path, path: &Path) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("path has no parent directory"))?;
    std::fs::create_dir_all(dir)?;
    let tmp = temp_beside(path);
    std::os::unix::fs::symlink(target, &tmp)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Moves an already written temp file over `path` and fsyncs the directory.
pub(crate) fn rename_into_place(tmp: &Path, path: &Path) -> io::Result<()> {
    std::fs::rename(tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A temp file name in the same directory (so a rename is atomic), unique to this call.
pub(crate) fn temp_beside(path: &Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.stately-{:016x}.tmp",
        rand::random::<u64>()
    ))
}

/// Creates a directory only its owner may enter (0700), or makes an existing one so: the data
/// directory holds job history, configurations and backups.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if meta.mode() & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Makes `path` readable by its owner only (0600), creating it empty if absent.
pub(crate) fn make_private_file(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::File::options()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
}

/// Whether `file_name` is a temp file [`temp_beside`] made (`.NAME.stately-<16 hex>.tmp`, or
/// `.cfg` for a candidate `haproxy -c` checks), for a file named `of` (any file when None).
fn is_temp_of(file_name: &str, of: Option<&str>, candidates: bool) -> bool {
    let Some(rest) = file_name.strip_prefix('.') else {
        return false;
    };
    let Some((stem, ext)) = rest.rsplit_once('.') else {
        return false;
    };
    let Some((name, id)) = stem.rsplit_once(".stately-") else {
        return false;
    };
    (ext == "tmp" || (candidates && ext == "cfg"))
        && id.len() == 16
        && id.bytes().all(|b| b.is_ascii_hexdigit())
        && of.is_none_or(|o| o == name)
}

/// Removes the temp files an interrupted write left in `dir` (those made for the file named
/// `of`, or all when None; with `candidates`, `haproxy -c` candidates too — only while no
/// check can be running, at start-up), and returns them. A missing directory has none.
pub(crate) fn sweep_temps(
    dir: &Path,
    of: Option<&str>,
    candidates: bool,
) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_temp_of(name, of, candidates) && std::fs::remove_file(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

/// Removes the temp files an interrupted write of `path` left beside it.
pub(crate) fn sweep_temps_beside(path: &Path, candidates: bool) -> Vec<std::path::PathBuf> {
    match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        (Some(dir), Some(name)) => sweep_temps(dir, Some(name), candidates),
        _ => Vec::new(),
    }
}

/// The path with symbolic links resolved in its longest existing ancestor (the rest appended),
/// so a link inside an allowed directory that points outside it is seen for what it is.
pub(crate) fn canonical_prefix(path: &Path) -> PathBuf {
    let mut existing = path.to_owned();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            let mut out = real;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (
            existing.file_name().map(|n| n.to_owned()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_owned();
            }
            _ => return path.to_owned(),
        }
    }
}

/// Removes a file; absent is fine (undo entries are idempotent).
pub(crate) fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => match path.parent().map(std::fs::File::open) {
            Some(Ok(dir)) => dir.sync_all(),
            // No directory, so no file: a job killed after recording the removal and before
            // making the directory left nothing to remove.
            Some(Err(e)) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Some(Err(e)) => Err(e),
            None => Ok(()),
        },
    }
}

/// Sets mode and ownership of an existing file.
pub(crate) fn set_ownership(path: &Path, mode: u32, uid: u32, gid: u32) -> io::Result<()> {
    nix::unistd::chown(path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
        .map_err(io::Error::from)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// The user id for a user name (or a number).
pub(crate) fn lookup_user(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        _ => Err(format!("no user named '{name}' on this machine")),
    }
}

/// The group id for a group name (or a number).
pub(crate) fn lookup_group(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(format!("no group named '{name}' on this machine")),
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
    p.components().all(|c| {
        matches!(
            c,
            std::path::Component::RootDir | std::path::Component::Normal(_)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_temp_files_of_atomic_writes_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("haproxy.cfg");
        std::fs::write(&f, "live").unwrap();
        let tmp = temp_beside(&f);
        let cand = temp_beside(&f).with_extension("cfg");
        let other = temp_beside(&dir.path().join("other"));
        for p in [&tmp, &cand, &other] {
            std::fs::write(p, "x").unwrap();
        }
        std::fs::write(dir.path().join(".haproxy.cfg.stately-zz.tmp"), "not ours").unwrap();
        let mut swept = sweep_temps_beside(&f, true);
        swept.sort();
        let mut want = vec![tmp.clone(), cand.clone()];
        want.sort();
        assert_eq!(swept, want);
        assert!(f.exists() && other.exists());
        assert_eq!(sweep_temps(dir.path(), None, true), vec![other]);
        assert!(dir.path().join(".haproxy.cfg.stately-zz.tmp").exists());
    }
}
