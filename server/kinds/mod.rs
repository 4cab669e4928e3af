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

use crate::job::{JobId, JobSpec};
use crate::step::{Env, Error, StepCtx, StepError};
use crate::store::Write;
use std::future::Future;
use std::pin::Pin;

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
