//! The kinds of job: one module each. A kind plans its steps at submission (so bad input is
//! refused before anything starts) and executes them, one at a time, on a `StepCtx`.

pub(crate) mod alert_watch;
pub(crate) mod certificate_issue;
pub(crate) mod haproxy_apply;
pub(crate) mod haproxy_server_state;
pub(crate) mod rollback;
pub(crate) mod runbook;

use crate::config::Config;
use crate::engine::{Error, Shared, StepCtx};
use crate::job::{JobId, JobSpec};
use crate::quote::quote;
use crate::store::Write;

/// What a job will do, known at submission.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) steps: Vec<String>,
    pub(crate) resources: Vec<String>,
    /// The executor built while planning, so the job need not build it again.
    pub(crate) prepared: Option<Executor>,
}

/// How a step ended badly.
#[derive(Debug)]
pub(crate) enum StepError {
    /// The job was cancelled; the step stopped at an await point.
    Cancelled,
    /// The step failed.
    Failed(String),
    /// The world is not as the step requires (e.g. a rollback over a later change).
    Precondition(String),
    /// The daemon is stopping and the (watch) step stopped without ending: the job stays
    /// RUNNING and resumes at the next start.
    Suspended,
}

/// Plans a submitted spec against the configuration (and, for a server's state, HAProxy), or
/// says what is wrong with it.
pub(crate) async fn plan(spec: &JobSpec, config: &Config) -> Result<Plan, Error> {
    match spec {
        JobSpec::HaproxyServerState {
            target,
            backend,
            server,
            state,
        } => Ok(Plan {
            steps: haproxy_server_state::step_names(backend, server, state),
            resources: haproxy_server_state::check(config, target, backend, server, state).await?,
            prepared: None,
        }),
        JobSpec::Runbook { runbook, params } => {
            let rb = config.runbook(runbook).ok_or_else(|| {
                let known: Vec<&str> = config.runbooks.iter().map(|r| r.name.as_str()).collect();
                Error::NotFound(format!(
                    "no runbook {} is configured{}",
                    quote(runbook),
                    if known.is_empty() {
                        " (none are)".to_owned()
                    } else {
                        format!(" (runbooks: {})", known.join(", "))
                    }
                ))
            })?;
            let resolved = runbook::resolve(rb, params)?;
            Ok(Plan {
                steps: resolved.step_names(),
                resources: resolved.resources.clone(),
                prepared: Some(Executor::Runbook(resolved)),
            })
        }
        JobSpec::HaproxyApply {
            target,
            config: text,
            ..
        } => Ok(Plan {
            steps: haproxy_apply::step_names(),
            resources: haproxy_apply::plan(config, target, text)?,
            prepared: None,
        }),
        JobSpec::AlertWatch { target, to, rules } => Ok(Plan {
            steps: alert_watch::step_names(target),
            resources: alert_watch::plan(config, target, to, rules).await?,
            prepared: None,
        }),
        spec @ JobSpec::CertificateIssue { deploy, .. } => {
            let (_, resources) = certificate_issue::plan(config, spec)?;
            Ok(Plan {
                steps: certificate_issue::step_names(!deploy.is_empty()),
                resources,
                prepared: None,
            })
        }
        JobSpec::Rollback { .. } => Err(Error::InvalidArgument(
            "rollback jobs come from RollbackJob".into(),
        )),
    }
}

/// A job's steps, ready to run.
#[derive(Debug)]
pub(crate) enum Executor {
    Runbook(runbook::Resolved),
    HaproxyApply(Box<haproxy_apply::Apply>),
    HaproxyServerState(haproxy_server_state::SetState),
    Rollback(rollback::Rollback),
    AlertWatch(alert_watch::Watch),
    CertificateIssue(Box<certificate_issue::Issue>),
}

impl Executor {
    /// Builds the executor when the job starts (from the configuration of that moment).
    pub(crate) async fn prepare(spec: &JobSpec, shared: &Shared) -> Result<Executor, StepError> {
        match spec {
            JobSpec::Runbook { runbook, params } => {
                let rb = shared.config.runbook(runbook).ok_or_else(|| {
                    StepError::Failed(format!("runbook '{runbook}' is no longer configured"))
                })?;
                let resolved =
                    runbook::resolve(rb, params).map_err(|e| StepError::Failed(e.to_string()))?;
                Ok(Executor::Runbook(resolved))
            }
            JobSpec::HaproxyApply {
                target,
                config,
                base_version,
                allow_servers_down,
            } => Ok(Executor::HaproxyApply(Box::new(haproxy_apply::Apply::new(
                &shared.config,
                target,
                config,
                base_version.clone(),
                *allow_servers_down,
            )?))),
            JobSpec::HaproxyServerState {
                target,
                backend,
                server,
                state,
            } => Ok(Executor::HaproxyServerState(
                haproxy_server_state::SetState::new(
                    &shared.config,
                    target,
                    backend,
                    server,
                    state,
                )?,
            )),
            JobSpec::AlertWatch { target, to, rules } => Ok(Executor::AlertWatch(
                alert_watch::Watch::new(&shared.config, target, to, rules)?,
            )),
            spec @ JobSpec::CertificateIssue { .. } => Ok(Executor::CertificateIssue(Box::new(
                certificate_issue::Issue::new(&shared.config, spec, shared.responder.clone())?,
            ))),
            JobSpec::Rollback { target, force } => Ok(Executor::Rollback(
                rollback::Rollback::load(shared, *target, *force)?,
            )),
        }
    }

    pub(crate) fn step_names(&self) -> Vec<String> {
        match self {
            Executor::Runbook(r) => r.step_names(),
            Executor::HaproxyApply(_) => haproxy_apply::step_names(),
            Executor::HaproxyServerState(s) => s.step_names(),
            Executor::Rollback(_) => rollback::step_names(),
            Executor::AlertWatch(w) => w.step_names(),
            Executor::CertificateIssue(i) => i.step_names(),
        }
    }

    pub(crate) async fn run_step(
        &mut self,
        index: usize,
        ctx: &mut StepCtx<'_>,
    ) -> Result<(), StepError> {
        match self {
            Executor::Runbook(r) => r.run_step(index, ctx).await,
            Executor::HaproxyApply(a) => a.run_step(index, ctx).await,
            Executor::HaproxyServerState(s) => s.run_step(index, ctx).await,
            Executor::Rollback(r) => r.run_step(index, ctx).await,
            Executor::AlertWatch(w) => w.run_step(index, ctx).await,
            Executor::CertificateIssue(i) => i.run_step(index, ctx).await,
        }
    }

    /// Writes to commit with the job's success.
    pub(crate) fn on_success(&self, job: JobId) -> Vec<Write> {
        match self {
            Executor::Runbook(_)
            | Executor::HaproxyApply(_)
            | Executor::HaproxyServerState(_)
            | Executor::AlertWatch(_)
            | Executor::CertificateIssue(_) => Vec::new(),
            Executor::Rollback(r) => r.on_success(job),
        }
    }
}
