//! A job's life once submitted: wait for its resources, run its steps with write-ahead undo,
//! and on a cancel or a failure unwind the journal in reverse before ending.

use super::{LiveJob, Shared};
use crate::blobs::BlobStore;
use crate::command::Stream;
use crate::fsops::FileState;
use crate::job::{Event, EventBody, JobId, JobRecord, JobState, LogLevel, StepState, now_ms};
use crate::kinds::{Executor, StepError};
use crate::store::{Store, Write};
use crate::undo::{JournalEntry, UndoEntry};
use std::sync::Arc;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// A job's event log and undo journal, as its runner appends to them.
pub(crate) struct Journal {
    store: Store,
    publish: broadcast::Sender<Event>,
    pub(crate) job: JobId,
    seq: u64,
    next_idx: u32,
    entries: Vec<JournalEntry>,
    pub(crate) blobs: BlobStore,
    live: Arc<LiveJob>,
}

impl Journal {
    pub(crate) fn new(
        shared: &Shared,
        live: &Arc<LiveJob>,
        record: &JobRecord,
        entries: Vec<JournalEntry>,
    ) -> Self {
        Journal {
            live: live.clone(),
            store: shared.store.clone(),
            publish: live.events.clone(),
            job: record.id,
            seq: record.last_seq,
            next_idx: entries.last().map_or(0, |e| e.idx + 1),
            entries,
            blobs: shared.blobs.clone(),
        }
    }

    fn event(&mut self, body: EventBody) -> Write {
        self.seq += 1;
        Write::Event(Event {
            job: self.job,
            seq: self.seq,
            at: now_ms(),
            body,
        })
    }

    /// Appends an event; it reaches watchers once durable.
    pub(crate) fn emit(&mut self, body: EventBody) {
        let w = self.event(body);
        self.store.write(vec![w], Some(&self.publish));
    }

    pub(crate) fn log(&mut self, level: LogLevel, step: Option<u32>, message: impl Into<String>) {
        self.emit(EventBody::Log {
            level,
            message: message.into(),
            step,
        });
    }

    /// Records the job's new state with an event, durably when `durable`; then tells those
    /// waiting on the job's state. A durable write is retried until the store takes it: a job
    /// whose end is not recorded must not hand its resources to the next job.
    async fn set_state(
        &mut self,
        record: &mut JobRecord,
        to: JobState,
        reason: String,
        durable: bool,
        extra: Vec<Write>,
    ) {
        let from = record.state;
        record.state = to;
        let ev = self.event(EventBody::State {
            from: Some(from),
            to,
            reason,
        });
        record.last_seq = self.seq;
        let mut writes = vec![Write::UpdateJob(record.clone()), ev];
        writes.extend(extra);
        if !durable {
            self.store.write(writes, Some(&self.publish));
            self.live.state.send_replace(to);
            return;
        }
        let mut backoff = std::time::Duration::from_millis(50);
        loop {
            match self.store.commit(writes.clone(), Some(&self.publish)).await {
                Ok(()) => break,
                // The daemon is going down; the next start recovers the job.
                Err(crate::store::Error::Closed) => return,
                Err(e) => {
                    tracing::error!(job = %self.job, "could not record state {}, retrying: {e}", to.as_str());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                }
            }
        }
        self.live.state.send_replace(to);
    }

    fn update(&mut self, record: &mut JobRecord, extra: Option<EventBody>) {
        let mut writes = Vec::with_capacity(2);
        if let Some(body) = extra {
            writes.push(self.event(body));
        }
        record.last_seq = self.seq;
        writes.insert(0, Write::UpdateJob(record.clone()));
        self.store.write(writes, Some(&self.publish));
    }

    /// Appends an event together with other writes, and waits until they are durable.
    pub(crate) async fn commit(
        &mut self,
        body: EventBody,
        mut writes: Vec<Write>,
    ) -> Result<(), crate::store::Error> {
        writes.push(self.event(body));
        self.store.commit(writes, Some(&self.publish)).await
    }

    /// Appends an event together with other writes, without waiting.
    pub(crate) fn write(&mut self, body: Option<EventBody>, mut writes: Vec<Write>) {
        if let Some(b) = body {
            writes.push(self.event(b));
        }
        self.store.write(writes, Some(&self.publish));
    }

    /// Notes that a step's command runs as process group `pgid` (for recovery after a crash).
    pub(crate) fn process_started(&self, pgid: i32) {
        if let Some(started) = crate::command::start_ticks(pgid) {
            self.store.write(
                vec![Write::ProcessStarted {
                    job: self.job,
                    pgid,
                    started,
                }],
                None,
            );
        }
    }

    /// Notes that the command of process group `pgid` has ended.
    pub(crate) fn process_ended(&self, pgid: i32) {
        self.store.write(
            vec![Write::ProcessEnded {
                job: self.job,
                pgid,
            }],
            None,
        );
    }

    /// Makes an undo entry durable; only then may the change it reverses be made.
    pub(crate) async fn record_undo(&mut self, entry: UndoEntry) -> Result<(), StepError> {
        let idx = self.next_idx;
        self.store
            .commit(
                vec![Write::Undo {
                    job: self.job,
                    idx,
                    entry: entry.clone(),
                }],
                None,
            )
            .await
            .map_err(|e| StepError::Failed(format!("could not record the undo entry: {e}")))?;
        self.next_idx += 1;
        self.entries.push(JournalEntry {
            idx,
            entry,
            applied: false,
            left: None,
        });
        Ok(())
    }

    /// Applies the journal's unapplied entries newest first; a failing entry is reported, the
    /// others still run, and it stays unapplied (to be retried). Returns the failures. With
    /// `emit`, what it does goes to the job's events; a retry after the job's terminal event
    /// logs to the daemon's log instead (a job's events end with its terminal state).
    pub(crate) async fn unwind(&mut self, emit: bool) -> Unwound {
        let pending: Vec<JournalEntry> = self
            .entries
            .iter()
            .rev()
            .filter(|e| !e.applied)
            .cloned()
            .collect();
        let mut out = Unwound::default();
        if pending.is_empty() {
            return out;
        }
        let job = self.job;
        let say = |j: &mut Self, level: LogLevel, line: String| {
            if emit {
                j.log(level, None, line);
            } else if level == LogLevel::Error {
                tracing::warn!(%job, "retrying the unwind: {line}");
            } else {
                tracing::info!(%job, "retrying the unwind: {line}");
            }
        };
        say(
            self,
            LogLevel::Info,
            format!("undoing {} change(s)", pending.len()),
        );
        let total = pending.len();
        for (n, je) in pending.into_iter().enumerate() {
            let what = je.entry.describe();
            let mut lines = Vec::new();
            let result = je.entry.apply(&self.blobs, |_, l| lines.push(l)).await;
            for l in lines {
                say(self, LogLevel::Info, l);
            }
            match result {
                Ok(()) => say(self, LogLevel::Info, format!("undone: {what}")),
                Err(e) if je.entry.retryable() => {
                    say(self, LogLevel::Error, format!("undo failed: {e}"));
                    // Left unapplied, and the older entries behind it (they may depend on it:
                    // a reload must follow the file it reads). The daemon retries from here,
                    // and a restart finds them too.
                    out.left = Some(format!("{what}: {e}"));
                    out.waiting = total - n - 1;
                    return out;
                }
                Err(e) => {
                    // Not safe to repeat (a runbook's undo command): reported, not retried.
                    say(self, LogLevel::Error, format!("undo failed: {e}"));
                    out.failed.push(format!("{what}: {e}"));
                }
            }
            self.store.write(
                vec![Write::UndoApplied {
                    job: self.job,
                    idx: je.idx,
                }],
                None,
            );
            if let Some(e) = self.entries.iter_mut().find(|e| e.idx == je.idx) {
                e.applied = true;
            }
        }
        out
    }

    /// Removes temp files that writes interrupted by a crash left beside the files this job
    /// changed (or was about to: an entry is recorded before its change).
    async fn sweep_temps(&mut self, emit: bool) {
        let paths: Vec<std::path::PathBuf> = self
            .entries
            .iter()
            .filter_map(|e| e.entry.path().map(|p| p.to_owned()))
            .collect();
        let swept = tokio::task::spawn_blocking(move || {
            paths
                .iter()
                // Not `haproxy -c` candidates: a check may be running now (the start-up
                // sweep, before the listeners open, removes those).
                .flat_map(|p| crate::fsops::sweep_temps_beside(p, false))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for p in swept {
            let line = format!(
                "removed {}, left by a write the crash interrupted",
                p.display()
            );
            if emit {
                self.log(LogLevel::Info, None, line);
            } else {
                tracing::info!(job = %self.job, "{line}");
            }
        }
    }

    /// Gives up the entries not applied yet (an operator put the world right by hand).
    fn abandon(&mut self) -> usize {
        let mut writes = Vec::new();
        for e in self.entries.iter_mut().filter(|e| !e.applied) {
            e.applied = true;
            writes.push(Write::UndoAbandoned {
                job: self.job,
                idx: e.idx,
            });
        }
        let n = writes.len();
        self.store.write(writes, None);
        n
    }

    /// Records the state the job leaves each file in, for a later rollback to compare.
    async fn seal(&mut self) {
        let entries: Vec<(u32, std::path::PathBuf)> = self
            .entries
            .iter()
            .filter_map(|e| e.entry.path().map(|p| (e.idx, p.to_owned())))
            .collect();
        if entries.is_empty() {
            return;
        }
        let states = tokio::task::spawn_blocking(move || {
            entries
                .into_iter()
                .filter_map(|(idx, p)| FileState::of(&p).ok().map(|s| (idx, s)))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let writes = states
            .into_iter()
            .map(|(idx, left)| Write::Seal {
                job: self.job,
                idx,
                left,
            })
            .collect();
        self.store.write(writes, None);
    }
}

/// What a step gets to work with.
pub(crate) struct StepCtx<'a> {
    pub(crate) index: u32,
    /// Cancelled when the job is; steps observe it at their await points.
    pub(crate) cancel: CancellationToken,
    pub(crate) journal: &'a mut Journal,
    pub(crate) shared: &'a Shared,
}

impl StepCtx<'_> {
    pub(crate) fn log(&mut self, level: LogLevel, message: impl Into<String>) {
        self.journal.log(level, Some(self.index), message);
    }

    pub(crate) fn output(&mut self, stream: Stream, line: String) {
        let level = if stream == Stream::Stderr {
            LogLevel::Warn
        } else {
            LogLevel::Info
        };
        self.journal.log(level, Some(self.index), line);
    }

    pub(crate) fn progress(&mut self, done: u64, total: u64, message: impl Into<String>) {
        self.journal.emit(EventBody::Progress {
            step: self.index,
            done,
            total,
            message: message.into(),
        });
    }

    pub(crate) async fn record_undo(&mut self, entry: UndoEntry) -> Result<(), StepError> {
        self.journal.record_undo(entry).await
    }
}

/// Runs a submitted job to its end.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut record: JobRecord,
    live: Arc<LiveJob>,
    prepared: Option<Executor>,
) {
    let mut journal = Journal::new(&shared, &live, &record, Vec::new());
    let id = record.id;
    // Frees the job's resources however this task ends, a panic included.
    let _release = Release {
        shared: shared.clone(),
        id,
        resources: record.resources.clone(),
    };

    // Wait for our turn on every resource, or for a cancel.
    let resources = record.resources.clone();
    let waited = {
        let wait = shared.scheduler.wait_turn(id, &resources, |blockers| {
            record.waiting_for = blockers.iter().map(|(r, _)| r.clone()).collect();
            let names: Vec<String> = blockers
                .iter()
                .map(|(r, j)| format!("{r} (held by job {j})"))
                .collect();
            let line = EventBody::Log {
                level: LogLevel::Info,
                message: format!("waiting for {}", names.join(", ")),
                step: None,
            };
            journal.update(&mut record, Some(line));
        });
        tokio::select! {
            biased;
            _ = live.cancel.cancelled() => false,
            _ = wait => true,
        }
    };
    record.waiting_for.clear();
    if !waited {
        record.finished_at = Some(now_ms());
        record.error = Some(live.reason());
        let reason = live.reason();
        journal
            .set_state(&mut record, JobState::Cancelled, reason, true, Vec::new())
            .await;
        return;
    }
    if !shared.accepting() {
        // Shutting down: the job stays PENDING and runs after the restart.
        return;
    }

    record.started_at = Some(now_ms());
    journal
        .set_state(
            &mut record,
            JobState::Running,
            "started".into(),
            false,
            Vec::new(),
        )
        .await;
    complete(&shared, record, journal, &live, prepared).await;
}

/// Carries on with a watch job found RUNNING at start-up, from the step it was in.
pub(crate) async fn resume(shared: Arc<Shared>, record: JobRecord, live: Arc<LiveJob>) {
    let entries = shared.store.journal(record.id).unwrap_or_default();
    let mut journal = Journal::new(&shared, &live, &record, entries);
    let _release = Release {
        shared: shared.clone(),
        id: record.id,
        resources: record.resources.clone(),
    };
    journal.log(
        LogLevel::Info,
        None,
        "the daemon restarted; the job carries on",
    );
    complete(&shared, record, journal, &live, None).await;
}

/// Runs the steps not done yet, then ends the job (unwinding on a failure or a cancel).
async fn complete(
    shared: &Arc<Shared>,
    mut record: JobRecord,
    mut journal: Journal,
    live: &Arc<LiveJob>,
    prepared: Option<Executor>,
) {
    let outcome = execute(shared, &mut record, &mut journal, live, prepared).await;
    let mut extra = Vec::new();
    let (end, reason) = match outcome {
        // The daemon is stopping: the job stays RUNNING and resumes at the next start.
        Err(StepError::Suspended) => return,
        Ok(writes) => {
            journal.seal().await;
            extra = writes;
            (JobState::Succeeded, "all steps succeeded".to_owned())
        }
        Err(StepError::Cancelled) => {
            // Durable, so a restart mid-unwind still knows it was a cancel, and why.
            record.error = Some(live.reason());
            journal
                .set_state(
                    &mut record,
                    JobState::Cancelling,
                    live.reason(),
                    true,
                    Vec::new(),
                )
                .await;
            let unwound = journal.unwind(true).await;
            record.error = Some(with_failures(live.reason(), &unwound));
            record.unwind_incomplete = unwound.incomplete();
            (JobState::Cancelled, live.reason())
        }
        Err(StepError::Failed(msg) | StepError::Precondition(msg)) => {
            let unwound = journal.unwind(true).await;
            record.error = Some(with_failures(msg.clone(), &unwound));
            record.unwind_incomplete = unwound.incomplete();
            (JobState::Failed, msg)
        }
    };
    record.finished_at = Some(now_ms());
    journal
        .set_state(&mut record, end, reason, true, extra)
        .await;
    if record.unwind_incomplete {
        finish_unwind(shared, &mut record, &mut journal, live).await;
    }
}

/// Carries on with the unwind of a job that ended with undo entries left (found at start-up).
pub(crate) async fn retry_unwind(shared: Arc<Shared>, mut record: JobRecord, live: Arc<LiveJob>) {
    let entries = shared.store.journal(record.id).unwrap_or_default();
    let mut journal = Journal::new(&shared, &live, &record, entries);
    let _release = Release {
        shared: shared.clone(),
        id: record.id,
        resources: record.resources.clone(),
    };
    journal.sweep_temps(false).await;
    finish_unwind(&shared, &mut record, &mut journal, &live).await;
}

/// The first retry of an incomplete unwind, and the longest wait between two.
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(300);

/// Retries the undo entries a job's unwind left, with backoff (or at once on `UnwindJob`),
/// until they all apply or an operator abandons them. The job keeps its resources meanwhile,
/// so no later job builds on a half-restored world. Returns when done, or when the daemon
/// stops (the next start carries on).
async fn finish_unwind(
    shared: &Shared,
    record: &mut JobRecord,
    journal: &mut Journal,
    live: &LiveJob,
) {
    let base = record
        .error
        .as_deref()
        .map(|e| e.split(INCOMPLETE).next().unwrap_or(e).to_owned())
        .unwrap_or_default();
    let mut wait = RETRY_FIRST;
    loop {
        tokio::select! {
            _ = shared.stopping.cancelled() => {
                // No more attempts in this process: whoever waits has its answer.
                live.unwind_served.send_replace(u64::MAX);
                return;
            }
            _ = live.unwind_now.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        // The latest request this attempt answers (it begins after that request was made).
        let serving = live
            .unwind_requested
            .load(std::sync::atomic::Ordering::SeqCst);
        if live.abandon.load(std::sync::atomic::Ordering::SeqCst) {
            let n = journal.abandon();
            tracing::warn!(job = %record.id, "{n} undo entr(ies) abandoned by request");
            record.unwind_incomplete = false;
            record.error = Some(format!(
                "{base}; {n} undo step(s) that could not be applied were abandoned by request"
            ));
        } else {
            let unwound = journal.unwind(false).await;
            record.unwind_incomplete = unwound.incomplete();
            record.error = Some(if unwound.incomplete() {
                with_failures(base.clone(), &unwound)
            } else {
                tracing::info!(job = %record.id, "the unwind is complete");
                format!(
                    "{}; its unwind completed on a retry",
                    with_failures(base.clone(), &unwound)
                )
            });
        }
        let writes = vec![Write::UpdateJob(record.clone())];
        let committed = shared.store.commit(writes, None).await;
        if committed.is_ok() && !record.unwind_incomplete {
            // Done: every request, even one made during this attempt, has its answer.
            live.unwind_served.send_replace(u64::MAX);
            return;
        }
        live.unwind_served.send_replace(serving);
        wait = (wait * 2).min(RETRY_MAX);
    }
}

/// Releases a job's resources and live state when its task ends.
struct Release {
    shared: Arc<Shared>,
    id: JobId,
    resources: Vec<String>,
}

impl Drop for Release {
    fn drop(&mut self) {
        self.shared.finish(self.id, &self.resources);
    }
}

/// What an unwind left.
#[derive(Debug, Default)]
pub(crate) struct Unwound {
    /// The entry that could not be applied and stopped the unwind (retried later).
    left: Option<String>,
    /// How many older entries wait behind it.
    waiting: usize,
    /// Entries that failed and are not retried (reported only).
    failed: Vec<String>,
}

impl Unwound {
    fn incomplete(&self) -> bool {
        self.left.is_some()
    }
}

/// Where a job's error says its unwind is incomplete (what comes before is why it ended).
const INCOMPLETE: &str = "; its unwind is incomplete: ";
/// Where a job's error reports undo steps that failed for good.
const FAILED_UNDO: &str = "; and undo step(s) failed: ";

fn with_failures(msg: String, u: &Unwound) -> String {
    let mut out = msg;
    if !u.failed.is_empty() {
        out.push_str(FAILED_UNDO);
        out.push_str(&u.failed.join("; "));
    }
    if let Some(left) = &u.left {
        out.push_str(&format!(
            "{INCOMPLETE}{left}{}; retried with backoff (stately jobs unwind ID retries now)",
            match u.waiting {
                0 => String::new(),
                n => format!(", and {n} older change(s) wait behind it"),
            }
        ));
    }
    out
}

async fn execute(
    shared: &Shared,
    record: &mut JobRecord,
    journal: &mut Journal,
    live: &LiveJob,
    prepared: Option<Executor>,
) -> Result<Vec<Write>, StepError> {
    let mut executor = match prepared {
        Some(e) => e,
        None => Executor::prepare(&record.spec, shared).await?,
    };
    if executor.step_names()
        != record
            .steps
            .iter()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>()
    {
        return Err(StepError::Failed(
            "the runbook's steps changed in the configuration since the job was submitted".into(),
        ));
    }
    let first = record
        .steps
        .iter()
        .position(|s| s.state != StepState::Succeeded)
        .unwrap_or(record.steps.len());
    for i in first..record.steps.len() {
        if live.cancel.is_cancelled() {
            return Err(StepError::Cancelled);
        }
        let name = record.steps[i].name.clone();
        let index = i as u32;
        record.steps[i].state = StepState::Running;
        record.steps[i].started_at = Some(now_ms());
        journal.update(
            record,
            Some(EventBody::StepStarted {
                index,
                name: name.clone(),
            }),
        );

        let mut ctx = StepCtx {
            index,
            cancel: live.cancel.child_token(),
            journal,
            shared,
        };
        let result = executor.run_step(i, &mut ctx).await;
        if let Err(StepError::Suspended) = result {
            return Err(StepError::Suspended);
        }
        // A step that finished its critical section is kept, then unwound with the rest.
        let result = match result {
            Ok(()) if live.cancel.is_cancelled() => Err(StepError::Cancelled),
            r => r,
        };
        let (state, error) = match &result {
            Ok(()) => (StepState::Succeeded, None),
            Err(StepError::Cancelled) => (StepState::Cancelled, Some(live.reason())),
            Err(StepError::Failed(e) | StepError::Precondition(e)) => {
                (StepState::Failed, Some(e.clone()))
            }
            Err(StepError::Suspended) => (StepState::Running, None),
        };
        record.steps[i].state = state;
        record.steps[i].finished_at = Some(now_ms());
        record.steps[i].error = error.clone();
        if matches!(
            result,
            Err(StepError::Failed(_) | StepError::Precondition(_))
        ) {
            record.failed_step = Some(name.clone());
        }
        journal.update(
            record,
            Some(EventBody::StepFinished {
                index,
                name,
                state,
                error,
            }),
        );
        result?;
    }
    Ok(executor.on_success(record.id))
}

/// Unwinds a job found RUNNING or CANCELLING at start-up, and ends it.
pub(crate) async fn recover(
    shared: &Shared,
    mut record: JobRecord,
    live: &Arc<LiveJob>,
) -> Result<(), crate::store::Error> {
    let entries = shared.store.journal(record.id)?;
    let mut journal = Journal::new(shared, live, &record, entries);
    let was = record.state;
    // A command that outlived the crashed daemon is stopped before its changes are undone.
    for (pgid, started) in shared.store.processes(record.id)? {
        if crate::command::kill_orphan(pgid, started) {
            journal.log(
                LogLevel::Warn,
                None,
                format!("killed process group {pgid}, left running by the crash"),
            );
        }
        journal.process_ended(pgid);
    }
    journal.log(
        LogLevel::Warn,
        None,
        format!("the daemon restarted while the job was {}", was.as_str()),
    );
    let unwound = journal.unwind(true).await;
    journal.sweep_temps(true).await;
    for step in record
        .steps
        .iter_mut()
        .filter(|s| s.state == StepState::Running)
    {
        step.state = StepState::Failed;
        step.finished_at = Some(now_ms());
        step.error = Some("interrupted by restart".into());
    }
    let (end, reason) = if was == JobState::Cancelling {
        (
            JobState::Cancelled,
            record.error.clone().unwrap_or_else(|| "cancelled".into()),
        )
    } else {
        (JobState::Failed, "interrupted by restart".to_owned())
    };
    record.error = Some(with_failures(reason.clone(), &unwound));
    record.unwind_incomplete = unwound.incomplete();
    record.finished_at = Some(now_ms());
    journal
        .set_state(&mut record, end, reason, true, Vec::new())
        .await;
    Ok(())
}
