//! The kinds of job: one module each, owning its spec (the variant of [`JobSpec`] it wraps),
//! its planning and its steps. A kind plans at submission — so bad input is refused before
//! anything starts — and the same planning runs again when a job starts after a restart;
//! planning returns the steps, the resources and the [`Executor`] together.
//!
//! Adding a kind: a module here, its variant in [`JobSpec`] (with its name in `KINDS`), and
//! its line in [`plan`].

pub mod alert_watch;
pub mod certificate_issue;
pub mod haproxy_apply;
pub mod haproxy_server_state;
pub mod rollback;
pub mod runbook;

use crate::job::{JobId, JobRecord};
use crate::step::{Env, Error, StepCtx, StepError};
use crate::store::{self, StoredSpec, Write};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;

/// What a job does: one variant per kind, each wrapping the spec its kind's module owns.
/// Stored as JSON (`{"runbook": {...}}`): a variant's name and its spec's fields are the stored
/// format, kept as they are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobSpec {
    /// Run a configured runbook.
    Runbook(runbook::Spec),
    /// Undo a finished job.
    Rollback(rollback::Spec),
    /// Replace a HAProxy target's configuration.
    HaproxyApply(haproxy_apply::Spec),
    /// Set a server's administrative state.
    HaproxyServerState(haproxy_server_state::Spec),
    /// Watch a target's stats and mail its transitions, until cancelled.
    AlertWatch(alert_watch::Spec),
    /// Issue or renew a certificate over ACME, install it, optionally deploy it.
    CertificateIssue(certificate_issue::Spec),
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

/// A job with its spec.
pub type Job = JobRecord<JobSpec>;

impl JobSpec {
    /// The spec as the store keeps it.
    pub(crate) fn stored(&self) -> StoredSpec {
        StoredSpec {
            kind: self.kind().to_owned(),
            json: serde_json::to_string(self).expect("specs serialize"),
            rollback_of: self.rollback_of(),
        }
    }

    /// A spec the store kept.
    pub(crate) fn from_stored(s: StoredSpec) -> Result<JobSpec, store::Error> {
        serde_json::from_str(&s.json)
            .map_err(|e| store::Error::Corrupt(format!("job spec ({} job): {e}", s.kind)))
    }
}

/// A stored job, its spec read.
pub(crate) fn typed(r: JobRecord<StoredSpec>) -> Result<Job, store::Error> {
    r.map_spec(JobSpec::from_stored)
}

/// A step's run, boxed so every kind's executor fits one trait object.
pub(crate) type StepFuture<'a> = Pin<Box<dyn Future<Output = Result<(), StepError>> + Send + 'a>>;

/// A job's steps, ready to run: what a kind's planning builds.
///
/// The engine calls `run_step` for each planned step in order, on a fresh [`StepCtx`], and
/// skips the steps a restart finds done (only for kinds that resume). See [`crate::step`] for
/// what a step must do before it changes anything.
pub(crate) trait Executor: Send + std::fmt::Debug {
    /// Runs step `index` of the steps planned.
    fn run_step<'a>(&'a mut self, index: usize, ctx: &'a mut StepCtx<'_>) -> StepFuture<'a>;

    /// Writes to commit with the job's success.
    fn on_success(&self, _job: JobId) -> Vec<Write> {
        Vec::new()
    }
}

/// What a job will do, known when it is planned.
#[derive(Debug)]
pub(crate) struct Planned {
    /// The steps' names, as the job record shows them.
    pub(crate) steps: Vec<String>,
    /// What the job holds while it runs (`haproxy:edge`, `cert:example.com`).
    pub(crate) resources: Vec<String>,
    /// Runs the steps.
    pub(crate) executor: Box<dyn Executor>,
}

impl Planned {
    /// A plan whose steps are `steps` (their names are the steps' `Display`).
    pub(crate) fn new<S: std::fmt::Display>(
        steps: &[S],
        resources: Vec<String>,
        executor: impl Executor + 'static,
    ) -> Planned {
        Planned {
            steps: steps.iter().map(|s| s.to_string()).collect(),
            resources,
            executor: Box::new(executor),
        }
    }
}

/// When a plan is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Moment {
    /// At submission: planning also asks the world what the job will need (HAProxy knows the
    /// server, SMTP takes mail), so a job that could not work is refused at once.
    Submission,
    /// When a job starts later (after waiting, or after a restart): planning checks the spec
    /// against the configuration of now; the steps meet the world themselves.
    Start,
}

/// Plans a spec against the daemon's configuration (and, at submission, the world), or says
/// what is wrong with it.
pub(crate) async fn plan(spec: &JobSpec, env: &Env, at: Moment) -> Result<Planned, Error> {
    match spec {
        JobSpec::Runbook(s) => runbook::plan(s, env),
        JobSpec::Rollback(s) => rollback::plan(s, env),
        JobSpec::HaproxyApply(s) => haproxy_apply::plan(s, env),
        JobSpec::HaproxyServerState(s) => haproxy_server_state::plan(s, env, at).await,
        JobSpec::AlertWatch(s) => alert_watch::plan(s, env, at).await,
        JobSpec::CertificateIssue(s) => certificate_issue::plan(s, env),
    }
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
