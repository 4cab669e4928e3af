//! The job model's domain types: ids, states, specs, steps, events — what the store keeps and
//! the engine works on, independent of the wire format.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// A job's id: a UUIDv7, so ids sort by creation time.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(uuid::Uuid);

impl JobId {
    pub(crate) fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for JobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        uuid::Uuid::try_parse(s).map(JobId).map_err(|_| {
            format!(
                "{} is not a job id (ids look like 0190f6c2-7b1e-7c3a-9f00-2b8e4d1a5c77)",
                crate::quote::quote(s)
            )
        })
    }
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Queued, possibly waiting for a resource.
    Pending,
    /// Steps are running.
    Running,
    /// Cancelled while running; its journal is being unwound.
    Cancelling,
    /// Ended well.
    Succeeded,
    /// Ended with an error; its journal was unwound.
    Failed,
    /// Ended by a cancel; its journal was unwound.
    Cancelled,
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "PENDING",
            JobState::Running => "RUNNING",
            JobState::Cancelling => "CANCELLING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "PENDING" => JobState::Pending,
            "RUNNING" => JobState::Running,
            "CANCELLING" => JobState::Cancelling,
            "SUCCEEDED" => JobState::Succeeded,
            "FAILED" => JobState::Failed,
            "CANCELLED" => JobState::Cancelled,
            _ => return None,
        })
    }
}

/// Where a step is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Not reached yet.
    Pending,
    /// Running now.
    Running,
    /// Done.
    Succeeded,
    /// Failed; the job fails with it.
    Failed,
    /// Stopped by a cancel.
    Cancelled,
}

impl StepState {
    /// The state as a word (the metrics' label).
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::Cancelled => "cancelled",
        }
    }
}

/// A step as the job record shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: StepState,
    /// Unix milliseconds.
    pub started_at: Option<i64>,
    /// Unix milliseconds.
    pub finished_at: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
}

impl StepRecord {
    /// The steps a plan names, none started.
    pub(crate) fn planned(names: Vec<String>) -> Vec<StepRecord> {
        names
            .into_iter()
            .map(|name| StepRecord {
                name,
                state: StepState::Pending,
                started_at: None,
                finished_at: None,
                error: None,
            })
            .collect()
    }
}

/// A job: what it does (`S`, its spec — the kinds' `JobSpec`, or the store's JSON of it), and
/// where it is.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord<S> {
    /// Its id.
    pub id: JobId,
    /// What it does.
    pub spec: S,
    /// Where it is.
    pub state: JobState,
    /// Its steps, planned at submission.
    pub steps: Vec<StepRecord>,
    /// The caller's idempotency key.
    pub request_id: Option<String>,
    /// The caller's labels.
    pub labels: BTreeMap<String, String>,
    /// What it touches.
    pub resources: Vec<String>,
    /// Resources held by earlier jobs it waits for, while pending.
    pub waiting_for: Vec<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub started_at: Option<i64>,
    /// Unix milliseconds.
    pub finished_at: Option<i64>,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// The step that failed.
    pub failed_step: Option<String>,
    /// Undo entries recorded.
    pub undo_entries: u32,
    /// The rollback job that undid it.
    pub rolled_back_by: Option<JobId>,
    /// The latest event's sequence number.
    pub last_seq: u64,
    /// Ended, but undo entries are left that could not be applied (retried with backoff).
    pub unwind_incomplete: bool,
    /// Who submitted it (`token:ci`, `cert:ci.example.com`, `uid:0`, `statelyd` for the
    /// daemon's own renewals); unknown for jobs from before it was recorded.
    pub submitted_by: Option<String>,
    /// The node it runs on (on a SQLite ledger, always the node that answers).
    pub node: String,
}

impl<S> JobRecord<S> {
    /// The same job with its spec turned by `f` (to or from its stored form).
    pub fn map_spec<T, E>(self, f: impl FnOnce(S) -> Result<T, E>) -> Result<JobRecord<T>, E> {
        Ok(JobRecord {
            spec: f(self.spec)?,
            id: self.id,
            state: self.state,
            steps: self.steps,
            request_id: self.request_id,
            labels: self.labels,
            resources: self.resources,
            waiting_for: self.waiting_for,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            error: self.error,
            failed_step: self.failed_step,
            undo_entries: self.undo_entries,
            rolled_back_by: self.rolled_back_by,
            last_seq: self.last_seq,
            unwind_incomplete: self.unwind_incomplete,
            submitted_by: self.submitted_by,
            node: self.node,
        })
    }

    /// What changes as the job runs (everything but its spec and who rolled it back).
    pub(crate) fn progress(&self) -> JobProgress {
        JobProgress {
            id: self.id,
            state: self.state,
            steps: self.steps.clone(),
            waiting_for: self.waiting_for.clone(),
            started_at: self.started_at,
            finished_at: self.finished_at,
            error: self.error.clone(),
            failed_step: self.failed_step.clone(),
            unwind_incomplete: self.unwind_incomplete,
        }
    }
}

/// What a job's update writes: the part of its record that changes as it runs.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct JobProgress {
    pub(crate) id: JobId,
    pub(crate) state: JobState,
    pub(crate) steps: Vec<StepRecord>,
    pub(crate) waiting_for: Vec<String>,
    pub(crate) started_at: Option<i64>,
    pub(crate) finished_at: Option<i64>,
    pub(crate) error: Option<String>,
    pub(crate) failed_step: Option<String>,
    pub(crate) unwind_incomplete: bool,
}

/// One entry of a job's event log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The job.
    pub job: JobId,
    /// 1, 2, 3, ... per job.
    pub seq: u64,
    /// Unix milliseconds.
    pub at: i64,
    /// What happened.
    pub body: EventBody,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum EventBody {
    /// The job changed state.
    State {
        /// Before (None for the first event).
        from: Option<JobState>,
        /// After.
        to: JobState,
        /// Why.
        reason: String,
    },
    /// A step began.
    StepStarted {
        /// Its index.
        index: u32,
        /// Its name.
        name: String,
    },
    /// A step ended.
    StepFinished {
        /// Its index.
        index: u32,
        /// Its name.
        name: String,
        /// How.
        state: StepState,
        /// Why it failed.
        error: Option<String>,
    },
    /// A step moved forward.
    Progress {
        /// The step.
        step: u32,
        /// Units done.
        done: u64,
        /// Units in all, 0 if unknown.
        total: u64,
        /// For people.
        message: String,
    },
    /// A line for the log.
    Log {
        /// How serious.
        level: LogLevel,
        /// The text.
        message: String,
        /// The step it came from.
        step: Option<u32>,
    },
}

impl EventBody {
    /// Whether this event ends the job's log.
    pub fn is_terminal(&self) -> bool {
        matches!(self, EventBody::State { to, .. } if to.is_terminal())
    }
}

/// How serious a log line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    /// Normal.
    Info,
    /// Worth a look.
    Warn,
    /// Something failed.
    Error,
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
