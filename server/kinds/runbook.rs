//! The runbook kind: an operator-defined sequence of built-in steps from the daemon's config.
//! Clients pass declared parameters only; every path is checked against the runbook's roots
//! at submission and again, with symlinks resolved, when the step runs.

use super::{Executor, Moment, Planned, StepFuture};
use crate::command::{Invocation, Output};
use crate::fsops;
use crate::fsops::is_normal;
use crate::job::LogLevel;
use crate::quote::quote;
use crate::runbooks::{Action, Runbook, parse_mode, render};
use crate::step::{Env, Error, StepCtx, StepError};
use crate::undo::UndoEntry;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_MAX_DOWNLOAD: u64 = 10 << 20;
const MAX_PARAM_BYTES: usize = 1 << 20;

/// Run a configured runbook.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// Its name.
    pub runbook: String,
    /// Declared parameters.
    pub params: BTreeMap<String, String>,
}

/// Finds the runbook and applies the parameters.
pub(crate) async fn plan(spec: &Spec, env: &Env, _at: Moment) -> Result<Planned, Error> {
    let config = &env.config;
    let rb = config.runbook(&spec.runbook).ok_or_else(|| {
        let known: Vec<&str> = config.runbooks.iter().map(|r| r.name.as_str()).collect();
        Error::NotFound(format!(
            "no runbook {} is configured{}",
            quote(&spec.runbook),
            if known.is_empty() {
                " (none are)".to_owned()
            } else {
                format!(" (runbooks: {})", known.join(", "))
            }
        ))
    })?;
    let resolved = resolve(rb, &spec.params)?;
    Ok(Planned {
        steps: resolved.steps.iter().map(|(n, _)| n.clone()).collect(),
        resources: resolved.resources.clone(),
        executor: Box::new(resolved),
    })
}

/// A runbook with its parameters applied.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub(crate) steps: Vec<(String, Step)>,
    pub(crate) resources: Vec<String>,
    roots: Vec<PathBuf>,
}

/// One step, ready to run.
#[derive(Debug)]
pub(crate) enum Step {
    Command {
        run: Invocation,
        undo: Option<Invocation>,
    },
    Check {
        run: Invocation,
    },
    BackupFile {
        path: PathBuf,
    },
    WriteFile {
        path: PathBuf,
        content: String,
        mode: u32,
        owner: Option<(u32, u32)>,
    },
    Download {
        url: reqwest::Url,
        path: PathBuf,
        max_bytes: u64,
        timeout: Duration,
        mode: u32,
    },
    Chown {
        path: PathBuf,
        uid: Option<u32>,
        gid: Option<u32>,
    },
    Chmod {
        path: PathBuf,
        mode: u32,
    },
}

/// Applies parameters to a runbook, refusing unknown, missing or malformed ones and paths
/// outside its roots.
pub(crate) fn resolve(rb: &Runbook, given: &BTreeMap<String, String>) -> Result<Resolved, Error> {
    let invalid = Error::InvalidArgument;
    let declared = || rb.params.keys().cloned().collect::<Vec<_>>().join(", ");
    for name in given.keys() {
        if !rb.params.contains_key(name) {
            return Err(invalid(format!(
                "runbook '{}' takes no parameter {} (it takes: {})",
                rb.name,
                quote(name),
                if rb.params.is_empty() {
                    "none".into()
                } else {
                    declared()
                }
            )));
        }
    }
    let mut values = BTreeMap::new();
    for (name, spec) in &rb.params {
        let value = match (given.get(name), &spec.default) {
            (Some(v), _) => v.clone(),
            (None, Some(d)) => d.clone(),
            (None, None) => {
                return Err(invalid(format!(
                    "runbook '{}' needs parameter '{name}'{}",
                    rb.name,
                    if spec.description.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", spec.description)
                    }
                )));
            }
        };
        if value.len() > MAX_PARAM_BYTES || value.contains('\0') {
            return Err(invalid(format!(
                "parameter {} is longer than 1 MiB or holds a NUL byte",
                quote(name)
            )));
        }
        if let Some(p) = &spec.pattern {
            // Compiled when the config was loaded; compiling here cost each submission more
            // than the rest of its checks (a profile showed 5 % of the daemon's CPU under load).
            let compiled;
            let re = match &spec.compiled {
                Some(re) => re,
                None => {
                    compiled = regex::Regex::new(&format!("^(?:{p})$"))
                        .map_err(|e| invalid(e.to_string()))?;
                    &compiled
                }
            };
            if !re.is_match(&value) {
                return Err(invalid(format!(
                    "parameter '{name}' must match /{p}/; got {}",
                    quote(&value)
                )));
            }
        }
        values.insert(name.clone(), value);
    }
    let t = |s: &str| render(s, |n| values.get(n).cloned()).map_err(invalid);
    let path = |s: &str| -> Result<PathBuf, Error> {
        let p = PathBuf::from(t(s)?);
        if !p.is_absolute() || !is_normal(&p) || p.file_name().is_none() {
            return Err(invalid(format!(
                "path {} must be absolute, without '.' or '..'",
                quote(&p.to_string_lossy())
            )));
        }
        if !rb.roots.iter().any(|r| p.starts_with(r) && p != *r) {
            return Err(invalid(format!(
                "path {} is outside runbook '{}''s roots ({})",
                quote(&p.to_string_lossy()),
                rb.name,
                rb.roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(p)
    };
    let invocation = |argv: &[String],
                      cwd: &Option<String>,
                      env: &BTreeMap<String, String>,
                      timeout: &Option<String>| {
        Ok::<_, Error>(Invocation {
            argv: argv.iter().map(|a| t(a)).collect::<Result<_, _>>()?,
            cwd: cwd.as_deref().map(t).transpose()?.map(PathBuf::from),
            env: env
                .iter()
                .map(|(k, v)| Ok((k.clone(), t(v)?)))
                .collect::<Result<_, Error>>()?,
            timeout_ms: timeout
                .as_deref()
                .map(|s| humantime::parse_duration(s).map_err(|e| invalid(e.to_string())))
                .transpose()?
                .unwrap_or(DEFAULT_TIMEOUT)
                .as_millis() as u64,
        })
    };
    let mode = |m: &Option<String>| {
        m.as_deref()
            .map(parse_mode)
            .transpose()
            .map_err(invalid)
            .map(|m| m.unwrap_or(0o644))
    };
    let user = |u: &Option<String>| {
        u.as_deref()
            .map(|u| t(u).and_then(|u| fsops::lookup_user(&u).map_err(invalid)))
            .transpose()
    };
    let group = |g: &Option<String>| {
        g.as_deref()
            .map(|g| t(g).and_then(|g| fsops::lookup_group(&g).map_err(invalid)))
            .transpose()
    };

    let mut steps = Vec::with_capacity(rb.steps.len());
    for spec in &rb.steps {
        let name = match &spec.name {
            Some(n) => t(n)?,
            None => t(&spec.action.default_name())?,
        };
        let step = match &spec.action {
            Action::Command {
                argv,
                undo,
                cwd,
                env,
                timeout,
            } => Step::Command {
                run: invocation(argv, cwd, env, timeout)?,
                undo: undo
                    .as_ref()
                    .map(|u| invocation(u, cwd, env, timeout))
                    .transpose()?,
            },
            Action::Check {
                argv,
                cwd,
                env,
                timeout,
            } => Step::Check {
                run: invocation(argv, cwd, env, timeout)?,
            },
            Action::BackupFile { path: p } => Step::BackupFile { path: path(p)? },
            Action::WriteFile {
                path: p,
                content,
                mode: m,
                owner,
                group: g,
            } => {
                let uid = user(owner)?;
                let gid = group(g)?;
                let owner = match (uid, gid) {
                    (None, None) => None,
                    (u, g) => Some((
                        u.unwrap_or_else(|| nix::unistd::geteuid().as_raw()),
                        g.unwrap_or_else(|| nix::unistd::getegid().as_raw()),
                    )),
                };
                Step::WriteFile {
                    path: path(p)?,
                    content: t(content)?,
                    mode: mode(m)?,
                    owner,
                }
            }
            Action::Download {
                url,
                path: p,
                max_bytes,
                timeout,
                mode: m,
            } => {
                let raw = t(url)?;
                let url = reqwest::Url::parse(&raw)
                    .map_err(|e| invalid(format!("{} is not a URL: {e}", quote(&raw))))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(invalid(format!(
                        "download URL '{url}' must be http or https"
                    )));
                }
                let timeout = timeout
                    .as_deref()
                    .map(|s| humantime::parse_duration(s).map_err(|e| invalid(e.to_string())))
                    .transpose()?
                    .unwrap_or(DEFAULT_TIMEOUT);
                Step::Download {
                    url,
                    path: path(p)?,
                    max_bytes: max_bytes.unwrap_or(DEFAULT_MAX_DOWNLOAD),
                    timeout,
                    mode: mode(m)?,
                }
            }
            Action::Chown {
                path: p,
                owner,
                group: g,
            } => Step::Chown {
                path: path(p)?,
                uid: user(owner)?,
                gid: group(g)?,
            },
            Action::Chmod { path: p, mode: m } => Step::Chmod {
                path: path(p)?,
                mode: parse_mode(m).map_err(invalid)?,
            },
        };
        steps.push((name, step));
    }
    let resources = match &rb.resources {
        Some(list) => list.iter().map(|r| t(r)).collect::<Result<Vec<_>, _>>()?,
        None => vec![format!("runbook:{}", rb.name)],
    };
    if resources.iter().any(|r| r.is_empty()) {
        return Err(invalid("a resource renders empty".into()));
    }
    Ok(Resolved {
        steps,
        resources,
        roots: rb.roots.clone(),
    })
}

fn failed(e: impl std::fmt::Display) -> StepError {
    StepError::Failed(e.to_string())
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, StepError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(failed)?
        .map_err(StepError::Failed)
}

/// The path with its directory resolved (symlinks followed), refused if that lies outside the
/// roots or the file itself is a symlink. Steps act on this path only.
fn real_path(path: &Path, roots: &[PathBuf]) -> Result<PathBuf, String> {
    let parent = path.parent().ok_or("path has no parent")?;
    let name = path.file_name().ok_or("path has no file name")?;
    let real = parent
        .canonicalize()
        .map_err(|e| format!("directory {}: {e}", parent.display()))?;
    let inside = roots.iter().any(|r| {
        r.canonicalize()
            .map(|r| real.starts_with(r))
            .unwrap_or(false)
    });
    if !inside {
        return Err(format!(
            "{} resolves outside the runbook's roots (through a symlink)",
            path.display()
        ));
    }
    let real = real.join(name);
    if std::fs::symlink_metadata(&real)
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false)
    {
        return Err(format!(
            "{} is a symlink; runbooks only change regular files",
            path.display()
        ));
    }
    Ok(real)
}

impl Executor for Resolved {
    fn run_step<'a>(&'a mut self, index: usize, ctx: &'a mut StepCtx<'_>) -> StepFuture<'a> {
        Box::pin(self.run(index, ctx))
    }
}

impl Resolved {
    async fn run(&mut self, index: usize, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        let Some((_, step)) = self.steps.get(index) else {
            return Err(StepError::Failed(format!("the job has no step {index}")));
        };
        let path = match step {
            Step::Command { .. } | Step::Check { .. } => None,
            Step::BackupFile { path }
            | Step::WriteFile { path, .. }
            | Step::Download { path, .. }
            | Step::Chown { path, .. }
            | Step::Chmod { path, .. } => {
                let (path, roots) = (path.clone(), self.roots.clone());
                Some(blocking(move || real_path(&path, &roots)).await?)
            }
        };
        let at = |p: &Path| {
            let p = p.to_owned();
            move |e: std::io::Error| format!("{}: {e}", p.display())
        };
        match (step, path) {
            (Step::Command { run, undo }, _) => {
                if let Some(undo) = undo {
                    ctx.record_undo(UndoEntry::RunCommand {
                        run: undo.clone(),
                        redo: Some(run.clone()),
                        retry: false,
                    })
                    .await?;
                }
                run_program(run, ctx).await
            }
            (Step::Check { run }, _) => run_program(run, ctx).await,
            (_, None) => unreachable!("file steps have a path"),
            (Step::BackupFile { .. }, Some(path)) => {
                let entry = snapshot(&path, ctx).await?;
                ctx.log(
                    LogLevel::Info,
                    format!("kept a copy: unwinding will {}", entry.describe()),
                );
                ctx.record_undo(entry).await
            }
            (
                Step::WriteFile {
                    content,
                    mode,
                    owner,
                    ..
                },
                Some(path),
            ) => {
                let entry = snapshot(&path, ctx).await?;
                ctx.record_undo(entry).await?;
                let (content, mode, owner, err) = (content.clone(), *mode, *owner, at(&path));
                blocking(move || {
                    fsops::write_atomic(&path, content.as_bytes(), mode, owner).map_err(err)
                })
                .await
            }
            (
                Step::Download {
                    url,
                    max_bytes,
                    timeout,
                    mode,
                    ..
                },
                Some(path),
            ) => {
                // Recorded before the download's temp file exists, so a crash mid-download
                // leaves a journal that names the path its temp file sits beside.
                let entry = snapshot(&path, ctx).await?;
                ctx.record_undo(entry).await?;
                let tmp = download(ctx, url, &path, *max_bytes, *timeout, *mode).await?;
                let mut guard = TempFile(Some(tmp.clone()));
                let err = at(&path);
                blocking(move || fsops::rename_into_place(&tmp, &path).map_err(err)).await?;
                guard.0 = None;
                Ok(())
            }
            (Step::Chown { uid, gid, .. }, Some(path)) => {
                let entry = snapshot_ownership(&path).await?;
                ctx.record_undo(entry).await?;
                let (uid, gid) = (*uid, *gid);
                blocking(move || {
                    nix::unistd::chown(
                        &path,
                        uid.map(nix::unistd::Uid::from_raw),
                        gid.map(nix::unistd::Gid::from_raw),
                    )
                    .map_err(|e| format!("chown {}: {e}", path.display()))
                })
                .await
            }
            (Step::Chmod { mode, .. }, Some(path)) => {
                let entry = snapshot_ownership(&path).await?;
                ctx.record_undo(entry).await?;
                let mode = *mode;
                blocking(move || {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                        .map_err(|e| format!("chmod {}: {e}", path.display()))
                })
                .await
            }
        }
    }
}

/// The undo entry that puts a file back as it is now (its content, or its absence), unless
/// the job was cancelled before this step changed anything.
async fn snapshot(path: &Path, ctx: &StepCtx<'_>) -> Result<UndoEntry, StepError> {
    if ctx.is_cancelled() {
        return Err(StepError::Cancelled);
    }
    ctx.snapshot(path).await
}

/// The undo entry that puts a file's mode and owner back as they are now.
async fn snapshot_ownership(path: &Path) -> Result<UndoEntry, StepError> {
    let path = path.to_owned();
    blocking(move || {
        UndoEntry::snapshot_ownership(&path).map_err(|e| format!("{}: {e}", path.display()))
    })
    .await
}

async fn run_program(run: &Invocation, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
    let cancel = ctx.cancel_token().clone();
    let mut group = None;
    let result = run
        .run_tracked(&cancel, |event| match event {
            Output::Spawned(pgid) => {
                group = Some(pgid);
                ctx.process_started(pgid);
            }
            Output::Line(stream, line) => ctx.output(stream, line),
        })
        .await;
    if let Some(pgid) = group {
        ctx.process_ended(pgid);
    }
    match result {
        Ok(()) => Ok(()),
        Err(crate::command::Error::Cancelled { .. }) => Err(StepError::Cancelled),
        Err(e) => Err(failed(e)),
    }
}

/// Removes a temp file unless it was moved into place.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Fetches `url` into a temp file beside `path`, within the size limit; returns the temp file.
async fn download(
    ctx: &mut StepCtx<'_>,
    url: &reqwest::Url,
    path: &Path,
    max_bytes: u64,
    timeout: Duration,
    mode: u32,
) -> Result<PathBuf, StepError> {
    let cancel = ctx.cancel_token().clone();
    let fetch = async {
        let resp = ctx
            .http()
            .get(url.clone())
            .send()
            .await
            .map_err(|e| failed(format!("GET {url}: {e}")))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(failed(format!("GET {url}: the server answered {status}")));
        }
        let total = resp.content_length().unwrap_or(0);
        if total > max_bytes {
            return Err(failed(format!(
                "GET {url}: {total} bytes is more than the limit of {max_bytes}"
            )));
        }
        let tmp = fsops::temp_beside(path);
        let mut guard = TempFile(Some(tmp.clone()));
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::File::options()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
                .map_err(|e| failed(format!("{}: {e}", tmp.display())))?
        };
        let mut body = resp.bytes_stream();
        let mut done: u64 = 0;
        let mut reported: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| failed(format!("GET {url}: {e}")))?;
            done += chunk.len() as u64;
            if done > max_bytes {
                return Err(failed(format!(
                    "GET {url}: the body passed the limit of {max_bytes} bytes"
                )));
            }
            file.write_all(&chunk).map_err(failed)?;
            if done - reported >= 64 << 10 {
                reported = done;
                ctx.progress(done, total, format!("{done} bytes"));
            }
        }
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(failed)?;
        }
        file.sync_all().map_err(failed)?;
        ctx.progress(done, total.max(done), format!("downloaded {done} bytes"));
        guard.0 = None;
        Ok(tmp)
    };
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(StepError::Cancelled),
        r = tokio::time::timeout(timeout, fetch) => r.map_err(|_| failed(format!("GET {url}: timed out after {timeout:?}")))?,
    }
}
