//! The `haproxy_apply` kind: check the base version, validate with `haproxy -c`, swap the file
//! atomically, reload through the master CLI, verify the new worker serves. The swap records
//! its undo first — reload again, then put the old file back — so a failed reload or verify,
//! a cancel, or a rollback leaves HAProxy on the configuration it had, reloaded.

use super::{Executor, Moment, Planned, StepFuture};
use crate::haproxy::HaproxyTarget;
use crate::haproxy::{Level, Targets, master};
use crate::job::LogLevel;
use crate::step::{Env, Error, StepCtx, StepError};
use crate::undo::UndoEntry;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::time::Duration;

/// Replace a HAProxy target's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// The target.
    pub target: String,
    /// The whole new configuration.
    pub config: String,
    /// The version the caller edited, if given.
    pub base_version: Option<String>,
    /// Whether servers UP before may be DOWN after.
    #[serde(default)]
    pub allow_servers_down: bool,
}

/// How long the new worker gets to show the new configuration's proxies.
const VERIFY_WITHIN: Duration = Duration::from_secs(5);
/// How long a reload may take before it counts as failed (a port clash fails after ~2 s).
const RELOAD_WITHIN: Duration = Duration::from_secs(10);

/// The steps, in order.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Step {
    CheckBase,
    Validate,
    Swap,
    Reload,
    Verify,
}

const STEPS: [Step; 5] = [
    Step::CheckBase,
    Step::Validate,
    Step::Swap,
    Step::Reload,
    Step::Verify,
];

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::CheckBase => "check the base version",
            Step::Validate => "validate with haproxy -c",
            Step::Swap => "swap the configuration",
            Step::Reload => "reload",
            Step::Verify => "verify",
        })
    }
}

/// Checks a submission: the target exists with a config file and a master socket.
pub(crate) async fn plan(spec: &Spec, env: &Env, _at: Moment) -> Result<Planned, Error> {
    let targets = Targets::new(&env.config.haproxy, env.config.bundle_dir());
    let target = appliable(&targets, &spec.target)?;
    if spec.config.trim().is_empty() {
        return Err(Error::InvalidArgument(
            "config (the whole new configuration) is required".into(),
        ));
    }
    check_text(&targets, &spec.target, &spec.config, None)?;
    let apply = Apply::new(
        targets,
        target,
        spec.config.clone(),
        spec.base_version.clone(),
        spec.allow_servers_down,
    );
    Ok(Planned::new(
        &STEPS,
        vec![format!("haproxy:{}", spec.target)],
        apply,
    ))
}

/// The target, if a configuration can be applied to it: it has a file and a reload path.
pub(crate) fn appliable(targets: &Targets, target: &str) -> Result<HaproxyTarget, Error> {
    let t = targets.get(target)?.clone();
    if t.config.is_none() || (t.master_socket.is_none() && t.reload_command.is_none()) {
        return Err(Error::FailedPrecondition(format!(
            "HAProxy target '{target}' needs `config`, and `master_socket` or `reload_command`, in statelyd's configuration to be applied to"
        )));
    }
    Ok(t)
}

/// Refuses a configuration no target could take: a NUL byte, over 16 MiB, or (PERMISSION_
/// DENIED) what the target's policy forbids.
pub(crate) fn check_text(
    targets: &Targets,
    target: &str,
    text: &str,
    edited_from: Option<&str>,
) -> Result<(), Error> {
    if text.contains('\0') {
        return Err(Error::InvalidArgument(
            "the configuration holds a NUL byte".into(),
        ));
    }
    if text.len() > crate::haproxy::MAX_CONFIG_BYTES {
        return Err(Error::ResourceExhausted(
            "the configuration is larger than 16 MiB".into(),
        ));
    }
    // An edit answers for the lines it adds, not for what the file already had.
    match edited_from {
        Some(before) => targets.check_policy_of_changes(target, text, before)?,
        None => targets.check_policy(target, text)?,
    }
    Ok(())
}

#[derive(Debug)]
pub(crate) struct Apply {
    /// Whether the swap is followed by a reload (else the change goes live at runtime, and
    /// only the file is put back on an unwind).
    reload: bool,
    /// A smaller configuration `haproxy -c` checks first, when it proves what matters (the
    /// sections a runtime change touches); the whole text is checked if it does not pass.
    quick_check: Option<(String, String)>,
    targets: Targets,
    target: HaproxyTarget,
    text: String,
    base_version: Option<String>,
    /// Servers UP before the swap, to check none is DOWN after.
    up_before: HashSet<(String, String)>,
    allow_servers_down: bool,
    /// The configuration the swap replaced (to tell a port clash from the worker's own binds).
    old_text: String,
}

impl Executor for Apply {
    fn run_step<'a>(&'a mut self, index: usize, ctx: &'a mut StepCtx<'_>) -> StepFuture<'a> {
        Box::pin(async move { self.run(super::step_at(&STEPS, index)?, ctx).await })
    }
}

impl Apply {
    /// Applies `text` to `target`, over `base_version` if given.
    pub(crate) fn new(
        targets: Targets,
        target: HaproxyTarget,
        text: String,
        base_version: Option<String>,
        allow_servers_down: bool,
    ) -> Apply {
        Apply {
            reload: true,
            quick_check: None,
            targets,
            target,
            text,
            base_version,
            up_before: HashSet::new(),
            allow_servers_down,
            old_text: String::new(),
        }
    }

    /// The same apply whose change goes live at runtime: the file is swapped (and put back
    /// on an unwind) without a reload.
    pub(crate) fn without_reload(mut self) -> Apply {
        self.reload = false;
        self
    }

    /// Validates `text` (described as `what`) instead of the whole configuration, falling
    /// back to the whole one if it does not pass.
    pub(crate) fn checking_first(mut self, text: String, what: String) -> Apply {
        self.quick_check = Some((text, what));
        self
    }

    /// Runs one of the apply's steps.
    pub(crate) async fn run(&mut self, step: Step, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        let failed = |e: crate::haproxy::Error| StepError::Failed(e.to_string());
        let name = self.target.name.clone();
        match step {
            Step::CheckBase => {
                let Some(base) = &self.base_version else {
                    ctx.log(
                        LogLevel::Info,
                        "no base version given: applying over whatever is live",
                    );
                    return Ok(());
                };
                let live = self.targets.live(&name).await.map_err(failed)?;
                if *base != live.version {
                    return Err(StepError::Precondition(format!(
                        "the live configuration of '{name}' is now {}, not {base} that the change was made from; \
                         get the config again and redo the edit",
                        live.version
                    )));
                }
                Ok(())
            }
            Step::Validate => {
                if let Some((text, what)) = self.quick_check.clone() {
                    let v = self.targets.validate(&name, &text).await.map_err(failed)?;
                    if v.valid {
                        ctx.log(
                            LogLevel::Info,
                            format!("haproxy -c accepts {what} (the rest of the file is as it was when it loaded)"),
                        );
                        return Ok(());
                    }
                    ctx.log(
                        LogLevel::Info,
                        format!("{what} alone does not check; checking the whole file"),
                    );
                }
                // Which servers are UP now, read while `haproxy -c` runs, to check none is
                // DOWN after the reload. Without a reload (servers changed at runtime) there
                // is nothing to compare.
                let before = async {
                    match &self.target.stats_socket {
                        Some(stats) if self.reload => {
                            crate::haproxy::runtime::server_health(stats).await.ok()
                        }
                        _ => None,
                    }
                };
                let (v, health) =
                    tokio::join!(self.targets.validate(&name, &self.text), before);
                if let Some(health) = health {
                    self.up_before = health
                        .into_iter()
                        .filter(|s| s.up)
                        .map(|s| (s.backend, s.server))
                        .collect();
                }
                let v = v.map_err(failed)?;
                for d in v.diagnostics.iter().filter(|d| d.level == Level::Warning) {
                    ctx.log(LogLevel::Warn, d.message.clone());
                }
                if !v.valid {
                    let alerts: Vec<String> = v
                        .diagnostics
                        .iter()
                        .filter(|d| d.level == Level::Alert)
                        .map(|d| match (d.line, &d.source) {
                            (Some(n), Some(src)) => {
                                format!("line {n} ({}): {}", src.trim(), d.message)
                            }
                            _ => d.message.clone(),
                        })
                        .collect();
                    return Err(StepError::Failed(format!(
                        "haproxy -c refused the configuration: {}",
                        alerts.join("; ")
                    )));
                }
                Ok(())
            }
            Step::Swap => {
                let live = self.target.config.clone().expect("planned with a config");
                let entry = ctx.snapshot(&live).await?;
                let (mode, owner) = match &entry {
                    UndoEntry::RestoreFile { mode, uid, gid, .. } => (*mode, Some((*uid, *gid))),
                    _ => (0o644, None),
                };
                // The file may have changed since the base check (another job, a person).
                if let (Some(base), UndoEntry::RestoreFile { blob, .. }) =
                    (&self.base_version, &entry)
                    && *base != format!("sha256:{blob}")
                {
                    return Err(StepError::Precondition(format!(
                        "the live configuration changed to sha256:{blob} while this job ran; it was made from {base}"
                    )));
                }
                if let UndoEntry::RestoreFile { blob, .. } = &entry {
                    self.old_text = ctx
                        .blobs()
                        .get(blob)
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default();
                }
                // Reverse order of undo: the old file goes back first, then HAProxy reloads.
                if self.reload {
                    ctx.record_undo(self.reload_undo()).await?;
                }
                ctx.record_undo(entry).await?;
                let text = self.text.clone();
                tokio::task::spawn_blocking(move || {
                    crate::fsops::write_atomic(&live, text.as_bytes(), mode, owner)
                })
                .await
                .map_err(|e| StepError::Failed(e.to_string()))?
                .map_err(|e| StepError::Failed(format!("swapping the configuration: {e}")))
            }
            Step::Reload => {
                // Servers keep their state across the reload when HAProxy loads it from a file.
                if let (Some(file), Some(stats)) =
                    (&self.target.server_state_file, &self.target.stats_socket)
                {
                    crate::haproxy::runtime::save_server_state(stats, file)
                        .await
                        .map_err(|e| {
                            StepError::Failed(format!(
                                "saving the server state to {}: {e}",
                                file.display()
                            ))
                        })?;
                }
                // A reload runs to its end (a critical section); a cancel is seen after it.
                match (&self.target.master_socket, &self.target.reload_command) {
                    (Some(socket), _) => {
                        let procs = match master::reload(socket, RELOAD_WITHIN).await {
                            Ok(p) => p,
                            Err(e) => return Err(StepError::Failed(self.why_reload_failed(e))),
                        };
                        ctx.log(
                            LogLevel::Info,
                            format!(
                                "reloaded: reload {} with worker(s) {:?}",
                                procs.reloads, procs.workers
                            ),
                        );
                    }
                    (None, Some(argv)) => {
                        let run = reload_invocation(argv);
                        run.run(&tokio_util::sync::CancellationToken::new(), |_, l| {
                            ctx.log(LogLevel::Info, l)
                        })
                        .await
                        .map_err(|e| {
                            StepError::Failed(format!("the reload command failed: {e}"))
                        })?;
                        ctx.log(
                            LogLevel::Info,
                            "reload command done; the verify step confirms the new worker",
                        );
                    }
                    (None, None) => unreachable!("planned with a reload path"),
                }
                Ok(())
            }
            Step::Verify => self.verify(ctx).await,
        }
    }

    /// The new worker answers with the new configuration's proxies, and no server UP before
    /// is DOWN now.
    async fn verify(&self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        let Some(stats) = self.target.stats_socket.clone() else {
            ctx.log(
                LogLevel::Warn,
                "no stats_socket configured for this target: serving is not verified",
            );
            return Ok(());
        };
        let wanted: HashSet<String> = proxies(&self.text);
        let deadline = tokio::time::Instant::now() + VERIFY_WITHIN;
        // What the socket last said when it could not be read, for the timeout's message.
        let mut unread: Option<String> = None;
        loop {
            // The proxies from their frontend and backend rows, the servers from `show
            // servers state`: at 5000 servers both cost HAProxy a few milliseconds, where one
            // `show stat` costs it ~20.
            let check = async {
                let rows = crate::stats::fetch_proxies(&stats)
                    .await
                    .map_err(|e| e.to_string())?;
                let have: HashSet<&str> = rows.iter().map(|r| r.proxy.as_str()).collect();
                if !wanted.iter().all(|p| have.contains(p.as_str())) {
                    return Ok(None);
                }
                if self.up_before.is_empty() {
                    return Ok(Some(Vec::new()));
                }
                crate::haproxy::runtime::server_health(&stats).await.map(Some)
            };
            let health = match ctx.until_cancel(check).await? {
                Ok(health) => health,
                Err(e) => {
                    unread = Some(e);
                    None
                }
            };
            if let Some(health) = health {
                let down: Vec<String> = health
                    .iter()
                    .filter(|s| s.down)
                    .filter(|s| self.up_before.contains(&(s.backend.clone(), s.server.clone())))
                    .map(|s| format!("{}/{}", s.backend, s.server))
                    .collect();
                if !down.is_empty() && self.allow_servers_down {
                    ctx.log(
                        LogLevel::Warn,
                        format!(
                            "accepted as asked: servers UP before are DOWN now: {}",
                            down.join(", ")
                        ),
                    );
                } else if !down.is_empty() {
                    return Err(StepError::Failed(format!(
                        "servers UP before the reload are DOWN after it: {}",
                        down.join(", ")
                    )));
                }
                ctx.log(
                    LogLevel::Info,
                    format!("the new worker serves all {} proxies", wanted.len()),
                );
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StepError::Failed(match unread {
                    Some(e) => format!(
                        "the new worker could not be verified within {VERIFY_WITHIN:?}: {e}"
                    ),
                    None => format!(
                        "the new configuration's proxies did not all appear on the stats socket within {VERIFY_WITHIN:?}"
                    ),
                }));
            }
            ctx.until_cancel(tokio::time::sleep(Duration::from_millis(50)))
                .await?;
        }
    }
}

fn reload_invocation(argv: &[String]) -> crate::command::Invocation {
    crate::command::Invocation {
        argv: argv.to_vec(),
        cwd: None,
        env: Default::default(),
        timeout_ms: RELOAD_WITHIN.as_millis() as u64,
    }
}

impl Apply {
    /// A failed reload's message, with the likely cause when one can be found: an address
    /// the new configuration binds that another process holds.
    fn why_reload_failed(&self, failure: String) -> String {
        // Addresses the old configuration bound are the running worker's, not a clash.
        let busy = crate::haproxy::busy_binds(&self.text, &self.old_text);
        if busy.is_empty() {
            failure
        } else {
            format!("{failure}: {}", busy.join("; "))
        }
    }

    /// How to reload again when unwinding.
    fn reload_undo(&self) -> UndoEntry {
        UndoEntry::reload_haproxy(&self.target).expect("planned with a reload path")
    }
}

/// The proxy names a configuration declares (frontend, backend, listen sections).
fn proxies(text: &str) -> HashSet<String> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next()) {
                (Some("frontend" | "backend" | "listen"), Some(name)) => Some(name.to_owned()),
                _ => None,
            }
        })
        .collect()
}
