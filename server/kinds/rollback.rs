//! The rollback kind: replays a finished job's undo journal newest first, after checking the
//! files it changed are still as it left them. Before each entry it records the entry's own
//! inverse, so a rollback can be rolled back too.

use super::StepError;
use crate::engine::{Shared, StepCtx, changed_since};
use crate::job::{JobId, JobState, LogLevel};
use crate::store::Write;
use crate::undo::{JournalEntry, UndoEntry};

pub(crate) fn step_names() -> Vec<String> {
    vec![
        "check nothing changed since".into(),
        "undo the job's changes".into(),
    ]
}

#[derive(Debug)]
pub(crate) struct Rollback {
    target: JobId,
    force: bool,
    journal: Vec<JournalEntry>,
    /// When the target is itself a rollback: the job it undid, whose changes come back.
    target_undid: Option<JobId>,
}

impl Rollback {
    pub(crate) fn load(shared: &Shared, target: JobId, force: bool) -> Result<Self, StepError> {
        let store_err = |e: crate::store::Error| StepError::Failed(e.to_string());
        let record = shared
            .store
            .job(target)
            .map_err(store_err)?
            .ok_or_else(|| StepError::Failed(format!("job {target} no longer exists")))?;
        if record.state != JobState::Succeeded {
            return Err(StepError::Precondition(format!(
                "job {target} ended {}",
                record.state.as_str()
            )));
        }
        if let Some(by) = record.rolled_back_by {
            return Err(StepError::Precondition(format!(
                "job {target} was already rolled back by job {by}"
            )));
        }
        let journal = shared.store.journal(target).map_err(store_err)?;
        Ok(Rollback {
            target,
            force,
            journal,
            target_undid: record.rollback_of(),
        })
    }

    pub(crate) async fn run_step(
        &mut self,
        index: usize,
        ctx: &mut StepCtx<'_>,
    ) -> Result<(), StepError> {
        match index {
            0 => self.check(ctx).await,
            _ => self.undo(ctx).await,
        }
    }

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
            if ctx.cancel.is_cancelled() {
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
                    let (entry, blobs) = (entry.clone(), ctx.journal.blobs.clone());
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
                ) => {}
                None => ctx.log(
                    LogLevel::Warn,
                    format!("'{}' cannot itself be undone later", je.entry.describe()),
                ),
            }
            let mut lines = Vec::new();
            let result = je
                .entry
                .apply(&ctx.journal.blobs, |_, l| lines.push(l))
                .await;
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

    pub(crate) fn on_success(&self, me: JobId) -> Vec<Write> {
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
