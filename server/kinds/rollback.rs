//! The rollback kind: replays a finished job's undo journal newest first, after checking the
//! files it changed are still as it left them. Before each entry it records the entry's own
//! inverse, so a rollback can be rolled back too.

use super::{Executor, Moment, Planned, StepFuture};
use crate::fsops::FileState;
use crate::job::{JobId, JobState, LogLevel};
use crate::step::{Env, Error, StepCtx, StepError};
use crate::store::Write;
use crate::undo::{JournalEntry, UndoEntry};
use serde::{Deserialize, Serialize};

/// Undo a finished job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// The job undone.
    pub target: JobId,
    /// Undo even over later changes.
    pub force: bool,
}

const STEPS: [&str; 2] = ["check nothing changed since", "undo the job's changes"];

/// Loads the journal of the job to undo, which must have succeeded and not been rolled back
/// already; the rollback holds what that job held. At submission it also refuses a job no
/// other rollback is undoing, with changes recorded, whose files (unless forced) are as it
/// left them.
pub(crate) async fn plan(spec: &Spec, env: &Env, at: Moment) -> Result<Planned, Error> {
    let id = spec.target;
    let record = env
        .store
        .job(id).await?
        .ok_or_else(|| Error::NotFound(format!("job {id} no longer exists")))?;
    // Before the state: a revocation that failed or was cancelled may still have reached
    // the CA, and none can be undone.
    if record.spec.kind == "certificate_revoke" {
        return Err(Error::FailedPrecondition(format!(
            "job {id} revoked a certificate (or tried to), and {}",
            super::certificate_revoke::IRREVERSIBLE
        )));
    }
    match record.state {
        JobState::Succeeded => {}
        JobState::Failed | JobState::Cancelled => {
            return Err(Error::FailedPrecondition(format!(
                "job {id} ended {}; its changes were already undone when it ended",
                record.state.as_str()
            )));
        }
        s => {
            return Err(Error::FailedPrecondition(format!(
                "job {id} is {}; cancel it instead (CancelJob undoes what it did)",
                s.as_str()
            )));
        }
    }
    if let Some(by) = record.rolled_back_by {
        return Err(Error::FailedPrecondition(format!(
            "job {id} was already rolled back by job {by}"
        )));
    }
    let journal = env.store.journal(id).await?;
    if at == Moment::Submission {
        if let Some(active) = env.store.active_rollbacks_of(id).await?.first() {
            return Err(Error::FailedPrecondition(format!(
                "job {active} is already rolling back job {id}"
            )));
        }
        if journal.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "job {id} recorded no changes, so there is nothing to roll back"
            )));
        }
        if !spec.force {
            let changed = changed_since(journal.clone()).await;
            if !changed.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "the world changed since job {id} ran, so rolling it back would overwrite later changes: {} \
                     (force overrides: --force in the CLI)",
                    changed.join("; ")
                )));
            }
        }
    }
    let rollback = Rollback {
        target: id,
        force: spec.force,
        journal,
        target_undid: record.spec.rollback_of,
    };
    Ok(Planned::new(&STEPS, record.resources, rollback))
}

/// What changed in the files a journal's job left, in words; empty when nothing did.
pub(crate) async fn changed_since(journal: Vec<JournalEntry>) -> Vec<String> {
    tokio::task::spawn_blocking(move || {
        let mut seen = std::collections::HashSet::new();
        let mut changed = Vec::new();
        for e in journal.iter().rev() {
            let Some(path) = e.entry.path() else { continue };
            let Some(left) = &e.left else {
                if seen.insert(path.to_owned()) {
                    changed.push(format!("{}: its state when the job ended was not recorded, so it cannot be checked", path.display()));
                }
                continue;
            };
            if !seen.insert(path.to_owned()) {
                continue;
            }
            let now = FileState::of(path);
            let diff = match &now {
                Ok(now) => left.difference(now),
                Err(err) => Some(format!("it cannot be read: {err}")),
            };
            if let Some(d) = diff {
                changed.push(format!("{}: {d}", path.display()));
            }
        }
        changed
    })
    .await
    .unwrap_or_else(|e| vec![format!("the check failed: {e}")])
}

#[derive(Debug)]
pub(crate) struct Rollback {
    target: JobId,
    force: bool,
    journal: Vec<JournalEntry>,
    /// When the target is itself a rollback: the job it undid, whose changes come back.
    target_undid: Option<JobId>,
}

impl Executor for Rollback {
    fn run_step<'a>(&'a mut self, index: usize, ctx: &'a mut StepCtx<'_>) -> StepFuture<'a> {
        Box::pin(async move {
            match index {
                0 => self.check(ctx).await,
                _ => self.undo(ctx).await,
            }
        })
    }

    fn on_success(&self, me: JobId) -> Vec<Write> {
        let mut writes = vec![Write::RolledBackBy {
            job: self.target,
            by: Some(me),
        }];
        if let Some(original) = self.target_undid {
            writes.push(Write::RolledBackBy {
                job: original,
                by: None,
            });
        }
        writes
    }
}

impl Rollback {
    async fn check(&self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        let changed = changed_since(self.journal.clone()).await;
        if changed.is_empty() {
            let files = self
                .journal
                .iter()
                .filter(|e| e.entry.path().is_some())
                .count();
            ctx.log(
                LogLevel::Info,
                if files == 0 {
                    format!(
                        "job {} changed no files; what it did elsewhere is put back",
                        self.target
                    )
                } else {
                    format!("every file job {} changed is as it left it", self.target)
                },
            );
            return Ok(());
        }
        if !self.force {
            return Err(StepError::Precondition(format!(
                "the world changed since job {} ran: {} (force overrides: --force in the CLI)",
                self.target,
                changed.join("; ")
            )));
        }
        for c in changed {
            ctx.log(LogLevel::Warn, format!("forced over a later change: {c}"));
        }
        Ok(())
    }

    async fn undo(&self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        let total = self.journal.len() as u64;
        // A reload must follow the files it reads. Its inverse is recorded first, so that
        // undoing this rollback puts the files back before reloading, as the original did.
        for je in &self.journal {
            if let e @ (UndoEntry::ReloadHaproxy { .. } | UndoEntry::HotSwapCert { .. }) = &je.entry
            {
                ctx.record_undo(e.clone()).await?;
            }
        }
        for (n, je) in self.journal.iter().rev().enumerate() {
            if ctx.is_cancelled() {
                return Err(StepError::Cancelled);
            }
            let inverse = match &je.entry {
                UndoEntry::ReloadHaproxy { .. } | UndoEntry::HotSwapCert { .. } => None,
                UndoEntry::HaproxyServerState {
                    socket,
                    backend,
                    server,
                    ..
                } => {
                    let now = crate::haproxy::runtime::server_state(socket, backend, server)
                        .await
                        .map_err(|e| {
                            StepError::Failed(format!(
                                "cannot read {backend}/{server} before undoing: {e:?}"
                            ))
                        })?;
                    Some(UndoEntry::HaproxyServerState {
                        socket: socket.clone(),
                        backend: backend.clone(),
                        server: server.clone(),
                        state: now,
                    })
                }
                entry => {
                    let (entry, blobs) = (entry.clone(), ctx.blobs().clone());
                    tokio::task::spawn_blocking(move || entry.inverse_now(&blobs))
                        .await
                        .map_err(|e| StepError::Failed(e.to_string()))?
                        .map_err(|e| {
                            StepError::Failed(format!("cannot keep a copy before undoing: {e}"))
                        })?
                }
            };
            match inverse {
                Some(inv) => ctx.record_undo(inv).await?,
                None if matches!(
                    je.entry,
                    UndoEntry::ReloadHaproxy { .. }
                        | UndoEntry::HotSwapCert { .. }
                        | UndoEntry::RemoveEmptyDir { .. }
                        | UndoEntry::RemoveDnsTxt { .. }
                        | UndoEntry::ReloadNginx { .. }
                ) => {}
                None => ctx.log(
                    LogLevel::Warn,
                    format!("'{}' cannot itself be undone later", je.entry.describe()),
                ),
            }
            let mut lines = Vec::new();
            let result = je.entry.apply(ctx.blobs(), |_, l| lines.push(l)).await;
            for l in lines {
                ctx.log(LogLevel::Info, l);
            }
            result.map_err(StepError::Failed)?;
            ctx.progress(
                n as u64 + 1,
                total,
                format!("undone: {}", je.entry.describe()),
            );
        }
        Ok(())
    }
}
