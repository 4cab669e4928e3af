//! A job's event log and undo journal as its runner appends to them: events reach watchers
//! once durable, and an undo entry is durable before the change it reverses is made.

use crate::blobs::BlobStore;
use crate::fsops::FileState;
use crate::job::{Event, EventBody, JobId, JobRecord, JobState, LogLevel, now_ms};
use crate::store::{Store, Write};
use crate::undo::{JournalEntry, UndoEntry};
use tokio::sync::{broadcast, watch};

/// A job's event log and undo journal, as its runner appends to them.
pub(crate) struct Journal {
    store: Store,
    publish: broadcast::Sender<Event>,
    pub(crate) job: JobId,
    seq: u64,
    next_idx: u32,
    entries: Vec<JournalEntry>,
    pub(crate) blobs: BlobStore,
    /// The job's latest recorded state, for those waiting on it.
    state: watch::Sender<JobState>,
    /// The job's kind, for the metrics of its end.
    pub(crate) kind: &'static str,
}

impl Journal {
    /// The journal of `record`, publishing its events to `publish` and its state to `state`,
    /// holding the `entries` recorded so far.
    pub(crate) fn new<S>(
        store: &Store,
        blobs: &BlobStore,
        publish: &broadcast::Sender<Event>,
        state: &watch::Sender<JobState>,
        record: &JobRecord<S>,
        entries: Vec<JournalEntry>,
    ) -> Self {
        Journal {
            state: state.clone(),
            store: store.clone(),
            publish: publish.clone(),
            job: record.id,
            seq: record.last_seq,
            next_idx: entries.last().map_or(0, |e| e.idx + 1),
            entries,
            blobs: blobs.clone(),
            kind: "",
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
    pub(crate) async fn set_state<S>(
        &mut self,
        record: &mut JobRecord<S>,
        to: JobState,
        reason: String,
        durable: bool,
        extra: Vec<Write>,
    ) {
        let from = record.state;
        record.state = to;
        if to.is_terminal() && !from.is_terminal() && !self.kind.is_empty() {
            let seconds = (now_ms() - record.created_at).max(0) as f64 / 1000.0;
            if to == JobState::Succeeded {
                tracing::info!(
                    "{} job {}: {reason}",
                    self.kind,
                    to.as_str().to_ascii_lowercase()
                );
            } else {
                tracing::warn!(
                    "{} job {}: {reason}",
                    self.kind,
                    to.as_str().to_ascii_lowercase()
                );
            }
            let trigger = record.labels.get("trigger").map(String::as_str);
            crate::metrics::job_finished(self.kind, to.as_str(), seconds, trigger);
        }
        let ev = self.event(EventBody::State {
            from: Some(from),
            to,
            reason,
        });
        record.last_seq = self.seq;
        let mut writes = vec![Write::UpdateJob(record.progress()), ev];
        writes.extend(extra);
        if !durable {
            self.store.write(writes, Some(&self.publish));
            self.state.send_replace(to);
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
        self.state.send_replace(to);
    }

    pub(crate) fn update<S>(&mut self, record: &mut JobRecord<S>, extra: Option<EventBody>) {
        let mut writes = Vec::with_capacity(2);
        if let Some(body) = extra {
            writes.push(self.event(body));
        }
        record.last_seq = self.seq;
        writes.insert(0, Write::UpdateJob(record.progress()));
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
    pub(crate) async fn record_undo(
        &mut self,
        entry: UndoEntry,
    ) -> Result<(), crate::store::Error> {
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
            .await?;
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
    pub(crate) async fn sweep_temps(&mut self, emit: bool) {
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
    pub(crate) fn abandon(&mut self) -> usize {
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
    pub(crate) async fn seal(&mut self) {
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

/// What an unwind left.
#[derive(Debug, Default)]
pub(crate) struct Unwound {
    /// The entry that could not be applied and stopped the unwind (retried later).
    pub(crate) left: Option<String>,
    /// How many older entries wait behind it.
    pub(crate) waiting: usize,
    /// Entries that failed and are not retried (reported only).
    pub(crate) failed: Vec<String>,
}

impl Unwound {
    pub(crate) fn incomplete(&self) -> bool {
        self.left.is_some()
    }
}
