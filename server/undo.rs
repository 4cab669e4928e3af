//! Undo entries: how to reverse one change to the world, as data. An entry is recorded durably
//! before the change it reverses; applying it twice is the same as once, so a journal can be
//! replayed after a crash.

use crate::blobs::BlobStore;
use crate::command::Invocation;
use crate::fsops::{self, FileState};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// How long an undo entry that talks to HAProxy waits for it to answer (a master re-execing
/// after a reload refuses connections for a moment; a recovery may land in that moment).
const SERVICE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Waits until a HAProxy CLI socket accepts a connection, within [`SERVICE_WAIT`].
async fn wait_for_socket(socket: &Path) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + SERVICE_WAIT;
    loop {
        match tokio::net::UnixStream::connect(socket).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "{} did not answer within {SERVICE_WAIT:?}: {e}",
                    socket.display()
                ));
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

/// One way to put something back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub(crate) enum UndoEntry {
    /// Put a file's earlier content (a blob) and ownership back.
    RestoreFile {
        path: PathBuf,
        blob: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// Remove a file the job created.
    RemoveFile { path: PathBuf },
    /// Put a file's earlier mode and ownership back.
    RestoreOwnership {
        path: PathBuf,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// Run a program that reverses a command; `redo` runs the command again (for rolling back
    /// a rollback).
    RunCommand {
        run: Invocation,
        redo: Option<Invocation>,
        /// Whether a failure is retried (a reload command: running it again is harmless); a
        /// runbook's own undo command may not be safe to repeat, so its failure is final.
        #[serde(default)]
        retry: bool,
    },
    /// Reload HAProxy through its master CLI (after the files it reads were put back).
    ReloadHaproxy {
        master_socket: PathBuf,
        /// (stats socket, state file): dump `show servers state` there first, so servers keep
        /// their state across this reload too.
        #[serde(default)]
        save_state: Option<(PathBuf, PathBuf)>,
    },
    /// Remove a directory the job created, if it is empty by then.
    RemoveEmptyDir { path: PathBuf },
    /// Make a symbolic link point where it pointed before.
    RestoreLink { path: PathBuf, target: PathBuf },
    /// Load a certificate file into a running HAProxy again (`set ssl cert` + `commit ssl
    /// cert` with the file's content at the time the entry is applied).
    HotSwapCert { socket: PathBuf, path: PathBuf },
    /// Put a server's administrative state back through the runtime API.
    HaproxyServerState {
        socket: PathBuf,
        backend: String,
        server: String,
        state: String,
    },
    /// Take a server added at runtime out again: drain it (bounded), then delete it. `args`
    /// are its line's words after the name (kept so that the inverse can add it back).
    RuntimeDelServer {
        socket: PathBuf,
        backend: String,
        server: String,
        args: Vec<String>,
    },
    /// Put a server removed at runtime back (`add server` with these words after its name,
    /// then enable it) in the administrative state it had; one still there gets that state.
    RuntimeAddServer {
        socket: PathBuf,
        backend: String,
        server: String,
        args: Vec<String>,
        /// ready, drain or maint.
        #[serde(default = "ready")]
        state: String,
    },
    /// Take a DNS-01 challenge record out of its zone (an RFC 2136 update signed with the
    /// zone's TSIG key, read from its file when applied). Removing one already gone is a no-op.
    RemoveDnsTxt {
        zone: crate::certs::dns::Zone,
        name: String,
        value: String,
    },
    /// Reload an nginx (after the files it reads were put back) if it reloaded since its
    /// `workers` were read (none: whatever happened): one that never reloaded still serves
    /// the old files.
    ReloadNginx {
        reload: crate::nginx::Reload,
        #[serde(default)]
        workers: Vec<i32>,
    },
}

fn ready() -> String {
    "ready".into()
}

/// A journal entry as stored: the entry, whether it has been applied, and the state the job
/// left its file in (filled when the job succeeds; a rollback checks it).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct JournalEntry {
    pub(crate) idx: u32,
    pub(crate) entry: UndoEntry,
    pub(crate) applied: bool,
    pub(crate) left: Option<FileState>,
}

impl UndoEntry {
    /// The file it restores, if any.
    pub(crate) fn path(&self) -> Option<&Path> {
        match self {
            UndoEntry::RestoreFile { path, .. }
            | UndoEntry::RemoveFile { path }
            | UndoEntry::RestoreLink { path, .. }
            | UndoEntry::RestoreOwnership { path, .. } => Some(path),
            UndoEntry::RunCommand { .. }
            | UndoEntry::ReloadHaproxy { .. }
            | UndoEntry::HotSwapCert { .. }
            | UndoEntry::RemoveEmptyDir { .. }
            | UndoEntry::HaproxyServerState { .. }
            | UndoEntry::RuntimeDelServer { .. }
            | UndoEntry::RuntimeAddServer { .. }
            | UndoEntry::RemoveDnsTxt { .. }
            | UndoEntry::ReloadNginx { .. } => None,
        }
    }

    /// Whether a failure to apply it is retried until it applies (the job's unwind stays
    /// incomplete meanwhile): every entry is idempotent but a runbook's undo command.
    pub(crate) fn retryable(&self) -> bool {
        match self {
            UndoEntry::RunCommand { retry, .. } => *retry,
            _ => true,
        }
    }

    /// The blob it needs, if any.
    pub(crate) fn blob(&self) -> Option<&str> {
        match self {
            UndoEntry::RestoreFile { blob, .. } => Some(blob),
            _ => None,
        }
    }

    /// Says, in a few words, what applying it does.
    pub(crate) fn describe(&self) -> String {
        match self {
            UndoEntry::RestoreFile { path, .. } => format!("restore {}", path.display()),
            UndoEntry::RemoveFile { path } => format!("remove {}", path.display()),
            UndoEntry::RestoreLink { path, target } => {
                format!("point {} at {}", path.display(), target.display())
            }
            UndoEntry::RemoveEmptyDir { path } => {
                format!("remove the directory {} if empty", path.display())
            }
            UndoEntry::HotSwapCert { path, .. } => {
                format!("load {} into HAProxy again", path.display())
            }
            UndoEntry::RestoreOwnership {
                path,
                mode,
                uid,
                gid,
            } => {
                format!("restore {} to {mode:04o} {uid}:{gid}", path.display())
            }
            UndoEntry::RunCommand { run, .. } => format!("run {}", run.argv.join(" ")),
            UndoEntry::HaproxyServerState {
                backend,
                server,
                state,
                ..
            } => {
                format!("set server {backend}/{server} back to {state}")
            }
            UndoEntry::ReloadHaproxy { master_socket, .. } => {
                format!("reload HAProxy ({})", master_socket.display())
            }
            UndoEntry::RuntimeDelServer {
                backend, server, ..
            } => format!("drain and delete server {backend}/{server} at runtime"),
            UndoEntry::RuntimeAddServer {
                backend, server, ..
            } => format!("add server {backend}/{server} back at runtime"),
            UndoEntry::RemoveDnsTxt { zone, name, .. } => {
                format!("remove the challenge record TXT {name} from {}", zone.zone)
            }
            UndoEntry::ReloadNginx { reload, .. } => {
                format!("reload nginx ({})", reload.config.display())
            }
        }
    }

    /// How to reload a HAProxy target when unwinding, for every kind that reloads: through its
    /// master CLI (confirmed with `show proc`, server state kept across it when configured),
    /// else its reload command (retried until it succeeds). None when it has neither.
    pub(crate) fn reload_haproxy(target: &crate::haproxy::HaproxyTarget) -> Option<UndoEntry> {
        match (&target.master_socket, &target.reload_command) {
            (Some(socket), _) => Some(UndoEntry::ReloadHaproxy {
                master_socket: socket.clone(),
                save_state: target
                    .stats_socket
                    .clone()
                    .zip(target.server_state_file.clone()),
            }),
            (None, Some(argv)) => {
                let run = Invocation {
                    argv: argv.clone(),
                    cwd: None,
                    env: Default::default(),
                    timeout_ms: 60_000,
                };
                Some(UndoEntry::RunCommand {
                    run: run.clone(),
                    redo: Some(run),
                    retry: true,
                })
            }
            (None, None) => None,
        }
    }

    /// The entry that puts a file back as it is now: its content in a blob, or its absence.
    pub(crate) fn snapshot_file(path: &Path, blobs: &BlobStore) -> std::io::Result<UndoEntry> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(UndoEntry::RemoveFile {
                path: path.to_owned(),
            }),
            Err(e) => Err(e),
            Ok(meta) if meta.file_type().is_symlink() => Ok(UndoEntry::RestoreLink {
                path: path.to_owned(),
                target: std::fs::read_link(path)?,
            }),
            Ok(meta) => {
                use std::os::unix::fs::MetadataExt;
                if !meta.is_file() {
                    return Err(std::io::Error::other(format!(
                        "{} is not a regular file",
                        path.display()
                    )));
                }
                let blob = blobs.put(&std::fs::read(path)?)?;
                Ok(UndoEntry::RestoreFile {
                    path: path.to_owned(),
                    blob,
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                })
            }
        }
    }

    /// The entry that puts a file's ownership back as it is now.
    pub(crate) fn snapshot_ownership(path: &Path) -> std::io::Result<UndoEntry> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        Ok(UndoEntry::RestoreOwnership {
            path: path.to_owned(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }

    /// The entry that would reverse applying this one (a rollback records it first, so a
    /// rollback can itself be rolled back). None when it cannot be reversed.
    pub(crate) fn inverse_now(&self, blobs: &BlobStore) -> std::io::Result<Option<UndoEntry>> {
        Ok(match self {
            UndoEntry::RestoreFile { path, .. }
            | UndoEntry::RemoveFile { path }
            | UndoEntry::RestoreLink { path, .. } => Some(Self::snapshot_file(path, blobs)?),
            e @ UndoEntry::HotSwapCert { .. } => Some(e.clone()),
            // Files written again create their directories.
            UndoEntry::RemoveEmptyDir { .. } => None,
            UndoEntry::RestoreOwnership { path, .. } => match Self::snapshot_ownership(path) {
                Ok(e) => Some(e),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            },
            UndoEntry::RunCommand { run, redo, retry } => {
                redo.as_ref().map(|redo| UndoEntry::RunCommand {
                    run: redo.clone(),
                    redo: Some(run.clone()),
                    retry: *retry,
                })
            }
            // Reloading again is its own inverse.
            e @ UndoEntry::ReloadHaproxy { .. } => Some(e.clone()),
            // Reading a server's state is asynchronous: the rollback kind does it itself.
            UndoEntry::HaproxyServerState { .. } => None,
            UndoEntry::RuntimeDelServer {
                socket,
                backend,
                server,
                args,
            } => Some(UndoEntry::RuntimeAddServer {
                socket: socket.clone(),
                backend: backend.clone(),
                server: server.clone(),
                args: args.clone(),
                state: ready(),
            }),
            UndoEntry::RuntimeAddServer {
                socket,
                backend,
                server,
                args,
                ..
            } => Some(UndoEntry::RuntimeDelServer {
                socket: socket.clone(),
                backend: backend.clone(),
                server: server.clone(),
                args: args.clone(),
            }),
            // A challenge record is of no use once its order is done: never put back.
            UndoEntry::RemoveDnsTxt { .. } => None,
            // Reloading again is its own inverse (the mark: reload whatever happened).
            UndoEntry::ReloadNginx { reload, .. } => Some(UndoEntry::ReloadNginx {
                reload: reload.clone(),
                workers: Vec::new(),
            }),
        })
    }

    /// Applies the entry. Undo runs to the end (a cancel does not interrupt it), bounded by
    /// the command's own timeout.
    pub(crate) async fn apply(
        &self,
        blobs: &BlobStore,
        on_line: impl FnMut(crate::command::Stream, String),
    ) -> Result<(), String> {
        match self.clone() {
            UndoEntry::RunCommand { run, .. } => run
                .run(&CancellationToken::new(), on_line)
                .await
                .map_err(|e| e.to_string()),
            UndoEntry::HaproxyServerState {
                socket,
                backend,
                server,
                state,
            } => {
                wait_for_socket(&socket).await?;
                crate::haproxy::runtime::set_server_state(&socket, &backend, &server, &state).await
            }
            UndoEntry::HotSwapCert { socket, path } => {
                // A bundle the unwind removed was one this job made: HAProxy never had it.
                let pem = match tokio::fs::read_to_string(&path).await {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                    r => r.map_err(|e| format!("{}: {e}", path.display()))?,
                };
                wait_for_socket(&socket).await?;
                crate::haproxy::runtime::set_ssl_cert(&socket, &path, &pem).await
            }
            UndoEntry::RuntimeDelServer {
                socket,
                backend,
                server,
                ..
            } => {
                use crate::haproxy::runtime;
                wait_for_socket(&socket).await?;
                if !runtime::has_server(&socket, &backend, &server).await? {
                    return Ok(());
                }
                runtime::remove_server(&socket, &backend, &server, SERVICE_WAIT).await
            }
            UndoEntry::RuntimeAddServer {
                socket,
                backend,
                server,
                args,
                state,
            } => {
                use crate::haproxy::runtime;
                wait_for_socket(&socket).await?;
                if !runtime::has_server(&socket, &backend, &server).await? {
                    runtime::add_server(&socket, &backend, &server, &args).await?;
                }
                runtime::set_server_state(&socket, &backend, &server, &state).await
            }
            UndoEntry::RemoveDnsTxt { zone, name, value } => {
                crate::certs::dns::remove_txt(&zone, &name, &value).await
            }
            UndoEntry::ReloadNginx { reload, workers } => {
                // An nginx that is not running reads the restored files when it starts.
                if !crate::nginx::running(&reload) {
                    return Ok(());
                }
                if !workers.is_empty() && !crate::nginx::reloaded_since(&reload, &workers)? {
                    return Ok(());
                }
                crate::nginx::reload(&reload).await
            }
            UndoEntry::ReloadHaproxy {
                master_socket,
                save_state,
            } => {
                if let Some((stats, file)) = &save_state {
                    // Best effort: a worker that does not answer has no state worth keeping.
                    if wait_for_socket(stats).await.is_ok()
                        && let Err(e) =
                            crate::haproxy::runtime::save_server_state(stats, file).await
                    {
                        tracing::warn!("saving the server state before an undo's reload: {e}");
                    }
                }
                crate::haproxy::master::reload(&master_socket, SERVICE_WAIT)
                    .await
                    .map(|_| ())
            }
            entry => {
                let blobs = blobs.clone();
                tokio::task::spawn_blocking(move || entry.apply_file(&blobs))
                    .await
                    .map_err(|e| e.to_string())?
            }
        }
    }

    fn apply_file(&self, blobs: &BlobStore) -> Result<(), String> {
        let at = |e: std::io::Error| format!("{}: {e}", self.describe());
        match self {
            UndoEntry::RestoreFile {
                path,
                blob,
                mode,
                uid,
                gid,
            } => {
                let bytes = blobs.get(blob).map_err(at)?;
                fsops::write_atomic(path, &bytes, *mode, Some((*uid, *gid))).map_err(at)
            }
            UndoEntry::RemoveFile { path } => fsops::remove_if_present(path).map_err(at),
            UndoEntry::RestoreLink { path, target } => {
                fsops::symlink_atomic(target, path).map_err(at)
            }
            UndoEntry::RemoveEmptyDir { path } => match std::fs::remove_dir(path) {
                Err(e)
                    if e.kind() != std::io::ErrorKind::NotFound
                        && e.kind() != std::io::ErrorKind::DirectoryNotEmpty =>
                {
                    Err(at(e))
                }
                _ => Ok(()),
            },
            UndoEntry::RestoreOwnership {
                path,
                mode,
                uid,
                gid,
            } => fsops::set_ownership(path, *mode, *uid, *gid).map_err(at),
            UndoEntry::RunCommand { .. }
            | UndoEntry::ReloadHaproxy { .. }
            | UndoEntry::HotSwapCert { .. }
            | UndoEntry::HaproxyServerState { .. }
            | UndoEntry::RuntimeDelServer { .. }
            | UndoEntry::RuntimeAddServer { .. }
            | UndoEntry::RemoveDnsTxt { .. }
            | UndoEntry::ReloadNginx { .. } => {
                Err("commands and reloads are applied asynchronously".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_file_and_a_removed_file_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"before").unwrap();
        let restore = UndoEntry::snapshot_file(&file, &blobs).unwrap();
        std::fs::write(&file, b"after").unwrap();
        restore.apply_file(&blobs).unwrap();
        restore.apply_file(&blobs).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"before");

        let new = dir.path().join("new");
        let remove = UndoEntry::snapshot_file(&new, &blobs).unwrap();
        assert_eq!(remove, UndoEntry::RemoveFile { path: new.clone() });
        std::fs::write(&new, b"x").unwrap();
        remove.apply_file(&blobs).unwrap();
        remove.apply_file(&blobs).unwrap();
        assert!(!new.exists());

        // Recorded, then killed before its directory was made: nothing to remove.
        let never = UndoEntry::RemoveFile {
            path: dir.path().join("not-made/new"),
        };
        never.apply_file(&blobs).unwrap();
    }
}
