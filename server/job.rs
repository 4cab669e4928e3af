//! The job model's domain types: ids, states, specs, steps, events — what the store keeps and
//! the engine works on, independent of the wire format.

use crate::kinds;
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

/// What a job does: one variant per kind, each wrapping the spec its kind's module owns.
/// Stored as JSON (`{"runbook": {...}}`): a variant's name and its spec's fields are the stored
/// format, kept as they are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobSpec {
    /// Run a configured runbook.
    Runbook(kinds::runbook::Spec),
    /// Undo a finished job.
    Rollback(kinds::rollback::Spec),
    /// Replace a HAProxy target's configuration.
    HaproxyApply(kinds::haproxy_apply::Spec),
    /// Set a server's administrative state.
    HaproxyServerState(kinds::haproxy_server_state::Spec),
    /// Watch a target's stats and mail its transitions, until cancelled.
    AlertWatch(kinds::alert_watch::Spec),
    /// Issue or renew a certificate over ACME, install it, optionally deploy it.
    CertificateIssue(kinds::certificate_issue::Spec),
}

impl JobSpec {
    /// The kind's name: "runbook", "rollback".
    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Runbook(_) => "runbook",
            JobSpec::Rollback(_) => "rollback",
            JobSpec::HaproxyApply(_) => "haproxy_apply",
            JobSpec::HaproxyServerState(_) => "haproxy_server_state",
            JobSpec::AlertWatch(_) => "alert_watch",
            JobSpec::CertificateIssue(_) => "certificate_issue",
        }
    }

    /// Every kind's name.
    pub const KINDS: &'static [&'static str] = &[
        "runbook",
        "rollback",
        "haproxy_apply",
        "haproxy_server_state",
        "alert_watch",
        "certificate_issue",
    ];

    /// Whether a job of this kind, found running after a restart, carries on instead of
    /// being unwound (long-lived watches).
    pub fn resumes(&self) -> bool {
        matches!(self, JobSpec::AlertWatch(_))
    }

    /// For a rollback, the job it undoes.
    pub fn rollback_of(&self) -> Option<JobId> {
        match self {
            JobSpec::Rollback(r) => Some(r.target),
            _ => None,
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

/// A job as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    /// Its id.
    pub id: JobId,
    /// What it does.
    pub spec: JobSpec,
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
}

impl JobRecord {
    /// For a rollback job, the job it undoes.
    pub fn rollback_of(&self) -> Option<JobId> {
        self.spec.rollback_of()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Specs exactly as the store holds them (written by stately before the kinds owned their
    /// specs): each must load, and write back byte for byte.
    const STORED: &[&str] = &[
        r#"{"runbook":{"runbook":"motd","params":{"greeting":"hi"}}}"#,
        r#"{"rollback":{"target":"0190f6c2-7b1e-7c3a-9f00-2b8e4d1a5c77","force":false}}"#,
        r#"{"haproxy_apply":{"target":"edge","config":"global\n","base_version":"sha256:ab","allow_servers_down":true}}"#,
        r#"{"haproxy_server_state":{"target":"edge","backend":"app","server":"s1","state":"drain"}}"#,
        r#"{"alert_watch":{"target":"edge","to":["ops@example.com"],"rules":{"interval_ms":1000,"hold_ms":10000,"proxies":["app*"],"max_session_rate":5,"max_sessions_percent":null,"max_5xx":3}}}"#,
        r#"{"certificate_issue":{"lineage":"example.com","names":["example.com","www.example.com"],"webroot":"/var/www/html","key_type":"ec256","reuse_key":false,"deploy":["edge"],"acme":"","expand":true}}"#,
    ];

    #[test]
    fn stored_specs_load_and_write_back_unchanged() {
        let mut kinds = Vec::new();
        for text in STORED {
            let spec: JobSpec = serde_json::from_str(text).expect(text);
            assert_eq!(serde_json::to_string(&spec).unwrap(), *text);
            kinds.push(spec.kind());
        }
        assert_eq!(
            kinds,
            JobSpec::KINDS,
            "one stored spec per kind, in KINDS order"
        );
    }

    /// A spec stored before `allow_servers_down` existed still loads.
    #[test]
    fn older_apply_spec_loads() {
        let spec: JobSpec = serde_json::from_str(
            r#"{"haproxy_apply":{"target":"edge","config":"x","base_version":null}}"#,
        )
        .unwrap();
        assert_eq!(spec.kind(), "haproxy_apply");
    }
}
