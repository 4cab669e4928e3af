//! A job's life once submitted: wait for its resources, run its steps with write-ahead undo,
//! and on a cancel or a failure unwind the journal in reverse before ending.

use super::{LiveJob, Shared};
use crate::job::{EventBody, JobId, JobState, LogLevel, StepState, now_ms};
use crate::journal::{Journal, Unwound};
use crate::kinds::{self, Executor, Job, JobSpec, Moment};
use crate::step::{StepCtx, StepError};
use crate::store::Write;
use std::sync::Arc;
use tracing::Instrument;

/// The span a job's tasks run in: what they log carries the job's id and kind (journald
/// fields JOB_ID and JOB_KIND under systemd).
pub(crate) fn span(record: &Job) -> tracing::Span {
    tracing::info_span!("job", job_id = %record.id, job_kind = record.spec.kind())
}

/// The journal of a job of this process, holding the undo entries recorded so far.
fn journal_of(
    shared: &Shared,
    live: &LiveJob,
    record: &Job,
    entries: Vec<crate::undo::JournalEntry>,
) -> Journal {
    let mut journal = Journal::new(
        &shared.env.store,
        &shared.env.blobs,
        &live.events,
        &live.state,
        record,
        entries,
    );
    journal.kind = record.spec.kind();
    journal
}

/// What submission planned: the executor, and the configuration it was planned with.
pub(crate) struct Prepared {
    pub(crate) executor: Box<dyn Executor>,
    pub(crate) config: Arc<crate::config::Config>,
}

/// Takes a job another node submitted for this one: plans it against this node's
/// configuration (its targets, lineages and runbooks), records the steps and resources, and
/// runs it as a job submitted here. One this node cannot read or plan fails, saying why; one
/// cancelled before it was taken (`cancelled`, the reason recorded) ends CANCELLED, nothing
/// run.
pub(crate) async fn claim(
    shared: &Arc<Shared>,
    stored: crate::store::StoredJob,
    cancelled: Option<String>,
) {
    let live = LiveJob::new();
    {
        let mut map = shared.live.lock().expect("live lock");
        if map.contains_key(&stored.id) {
            return;
        }
        map.insert(stored.id, live.clone());
    }
    let (id, kind) = (stored.id, stored.spec.kind.clone());
    let mut record = match kinds::typed(stored.clone()) {
        Ok(record) => record,
        Err(e) => {
            // A kind of a newer version, say: that job fails, the others are taken.
            let why = format!(
                "node {} cannot read its spec ({}): {e}",
                shared.node.0,
                crate::quote::quote(&kind)
            );
            end_untaken(shared, &live, stored, JobState::Failed, why).await;
            return;
        }
    };
    if let Some(reason) = cancelled {
        tracing::info!(job = %id, "a job cancelled before this node took it");
        end_untaken(shared, &live, record, JobState::Cancelled, reason).await;
        return;
    }
    // Rollbacks are planned one at a time, as `Engine::rollback` does: the planning of one
    // looks for others of the same job.
    let _one_rollback_at_a_time = match record.spec {
        JobSpec::Rollback(_) => Some(shared.rollbacks.lock().await),
        _ => None,
    };
    let env = shared.env_now();
    let plan = match kinds::plan(&record.spec, &env, Moment::Submission).await {
        Ok(plan) => plan,
        Err(e) => {
            let why = format!("node {} cannot run it: {e}", shared.node.0);
            end_untaken(shared, &live, record, JobState::Failed, why).await;
            return;
        }
    };
    record.steps = crate::job::StepRecord::planned(plan.steps);
    record.resources = plan.resources;
    shared.scheduler.enqueue(record.id, &record.resources);
    let planned = vec![
        Write::UpdateJob(record.progress()),
        Write::Resources {
            job: record.id,
            resources: record.resources.clone(),
        },
    ];
    if let Err(e) = shared.env.store.commit(planned, None).await {
        // Still unplanned in the ledger: taken again at the next pass.
        tracing::warn!(job = %record.id, "recording the plan: {e}");
        shared.finish(record.id, &record.resources);
        return;
    }
    tracing::info!(job = %record.id, "took a job submitted for this node");
    let span = span(&record);
    shared.tasks.spawn(
        run(
            shared.clone(),
            record,
            live,
            Some(Prepared {
                executor: plan.executor,
                config: env.config,
            }),
        )
        .instrument(span),
    );
}

/// Ends a job submitted for this node before it was planned: nothing ran, nothing to undo.
async fn end_untaken<S>(
    shared: &Shared,
    live: &LiveJob,
    mut record: crate::job::JobRecord<S>,
    to: JobState,
    why: String,
) {
    let mut journal = Journal::new(
        &shared.env.store,
        &shared.env.blobs,
        &live.events,
        &live.state,
        &record,
        Vec::new(),
    );
    record.finished_at = Some(now_ms());
    record.error = Some(why.clone());
    journal
        .set_state(&mut record, to, why, true, Vec::new())
        .await;
    shared.finish(record.id, &[]);
}

/// Runs a submitted job to its end.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut record: Job,
    live: Arc<LiveJob>,
    prepared: Option<Prepared>,
) {
    let mut journal = journal_of(&shared, &live, &record, Vec::new());
    let id = record.id;
    // Frees the job's resources however this task ends, a panic included.
    let _release = Release {
        shared: shared.clone(),
        id,
        resources: record.resources.clone(),
    };

    // Wait for our turn on every resource, or for a cancel.
    let mut had_to_wait = false;
    let resources = record.resources.clone();
    let queued = std::time::Instant::now();
    let waited = {
        let wait = shared.scheduler.wait_turn(id, &resources, |blockers| {
            had_to_wait = true;
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
    // What the job waited for may have changed what its plan found (the lineage's names,
    // the job a rollback undoes): it is planned again from the world of now.
    let prepared = if had_to_wait { None } else { prepared };
    if !waited {
        record.finished_at = Some(now_ms());
        record.error = Some(live.reason());
        let reason = live.reason();
        journal
            .set_state(&mut record, JobState::Cancelled, reason, true, Vec::new())
            .await;
        unwound_after_cancel(&record, live.as_ref());
        return;
    }
    crate::metrics::queue_waited(&resources, queued.elapsed().as_secs_f64());
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

/// A job's undo journal from the store, read again until it can be: an empty journal in its
/// place would let the job's next undo entry overwrite entry 0. None once the store has closed
/// (the daemon is stopping; the job is left for the next start).
async fn stored_journal(
    shared: &Shared,
    id: crate::job::JobId,
) -> Option<Vec<crate::undo::JournalEntry>> {
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        match shared.env.store.journal(id).await {
            Ok(entries) => return Some(entries),
            Err(crate::store::Error::Closed) => return None,
            // Reading again will not mend it: the job stays as it is for an operator.
            Err(e @ crate::store::Error::Corrupt(_)) => {
                tracing::error!(job = %id, "reading the undo journal: {e}; the job is left as it is");
                return None;
            }
            Err(e) => {
                tracing::warn!(job = %id, "reading the undo journal: {e}; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
}

/// Carries on with a watch job found RUNNING at start-up, from the step it was in.
pub(crate) async fn resume(shared: Arc<Shared>, record: Job, live: Arc<LiveJob>) {
    let Some(entries) = stored_journal(&shared, record.id).await else {
        return;
    };
    let mut journal = journal_of(&shared, &live, &record, entries);
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
    mut record: Job,
    mut journal: Journal,
    live: &Arc<LiveJob>,
    prepared: Option<Prepared>,
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
    if end == JobState::Cancelled {
        unwound_after_cancel(&record, live.as_ref());
    }
}

/// A cancelled job's unwind is over: how long it took from the cancel asked for (a job that
/// stopped for a shutdown, or whose unwind is still incomplete, is not counted).
fn unwound_after_cancel(record: &Job, live: &LiveJob) {
    if record.unwind_incomplete {
        return;
    }
    if let Some(at) = live.cancel_requested.get() {
        crate::metrics::cancel_unwound(record.spec.kind(), at.elapsed().as_secs_f64());
    }
}

/// Carries on with the unwind of a job that ended with undo entries left (found at start-up).
pub(crate) async fn retry_unwind(shared: Arc<Shared>, mut record: Job, live: Arc<LiveJob>) {
    let Some(entries) = stored_journal(&shared, record.id).await else {
        return;
    };
    let mut journal = journal_of(&shared, &live, &record, entries);
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
async fn finish_unwind(shared: &Shared, record: &mut Job, journal: &mut Journal, live: &LiveJob) {
    let base = record
        .error
        .as_deref()
        .map(|e| e.split(INCOMPLETE).next().unwrap_or(e).to_owned())
        .unwrap_or_default();
    let mut wait = RETRY_FIRST;
    loop {
        tokio::select! {
            _ = shared.env.stopping.cancelled() => {
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
        let writes = vec![Write::UpdateJob(record.progress())];
        let committed = shared.env.store.commit(writes, None).await;
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
    record: &mut Job,
    journal: &mut Journal,
    live: &LiveJob,
    prepared: Option<Prepared>,
) -> Result<Vec<Write>, StepError> {
    // The configuration of now, kept to the job's end whatever a reload brings meanwhile. A
    // plan made under another one (a reload between submission and start) is made again.
    let env = shared.env_now();
    let prepared = prepared
        .filter(|p| Arc::ptr_eq(&p.config, &env.config))
        .map(|p| p.executor);
    let mut executor = match prepared {
        Some(e) => e,
        None => {
            // Planned again from the same code as at submission, against the configuration
            // of now; its steps must be those the job was given.
            let plan = kinds::plan(&record.spec, &env, Moment::Start).await?;
            // Its resources too: a job must hold what its steps touch.
            let same = plan.steps.len() == record.steps.len()
                && plan.resources == record.resources
                && plan
                    .steps
                    .iter()
                    .zip(&record.steps)
                    .all(|(a, b)| *a == b.name);
            if !same {
                return Err(StepError::Failed(
                    "the job's steps or resources changed since it was submitted (its runbook in the configuration, or the file it edits): submit it again"
                        .into(),
                ));
            }
            plan.executor
        }
    };
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

        let mut ctx = StepCtx::new(index, live.cancel.child_token(), journal, &env);
        let step_began = std::time::Instant::now();
        let result = executor.run_step(i, &mut ctx).await;
        if let Err(StepError::Suspended) = result {
            return Err(StepError::Suspended);
        }
        // A step that finished its critical section is kept, then unwound with the rest.
        let result = match result {
            Ok(()) if live.cancel.is_cancelled() && !ctx.is_irreversible() => {
                Err(StepError::Cancelled)
            }
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
        crate::metrics::step_finished(
            record.spec.kind(),
            &name,
            state.as_str(),
            step_began.elapsed().as_secs_f64(),
        );
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
    mut record: Job,
    live: &Arc<LiveJob>,
) -> Result<(), crate::store::Error> {
    let entries = shared.env.store.journal(record.id).await?;
    let mut journal = journal_of(shared, live, &record, entries);
    let was = record.state;
    // A command that outlived the crashed daemon is stopped before its changes are undone.
    for (pgid, started) in shared.env.store.processes(record.id).await? {
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
