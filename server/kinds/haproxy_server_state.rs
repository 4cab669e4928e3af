//! The `haproxy_server_state` kind: set a server ready, drain or maint through the runtime
//! API (say, before a deploy); its undo entry, recorded first, puts back the state it had.

use super::{Executor, Moment, Planned, StepFuture};
use crate::config::Config;
use crate::haproxy::Targets;
use crate::haproxy::runtime::{self, Lookup, STATES};
use crate::job::LogLevel;
use crate::step::{Env, Error, StepCtx, StepError};
use crate::undo::UndoEntry;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Set a server's administrative state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// The HAProxy target.
    pub target: String,
    /// The backend.
    pub backend: String,
    /// The server.
    pub server: String,
    /// ready, drain or maint.
    pub state: String,
}

/// The steps, in order.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Read the state it has, to put back.
    Read,
    /// Set the new one.
    Set,
}

impl Step {
    fn name(self, spec: &Spec) -> String {
        let (b, s) = (&spec.backend, &spec.server);
        match self {
            Step::Read => format!("read {b}/{s}"),
            Step::Set => format!("set {b}/{s} {}", spec.state),
        }
    }
}

const STEPS: [Step; 2] = [Step::Read, Step::Set];

fn socket(config: &Config, target: &str) -> Result<PathBuf, Error> {
    let targets = Targets::new(&config.haproxy, config.bundle_dir());
    let t = targets.get(target)?;
    t.stats_socket.clone().ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "HAProxy target '{target}' has no stats_socket (the runtime API) configured"
        ))
    })
}

/// Checks a spec; at submission, asks HAProxy whether the backend and server exist.
pub(crate) async fn plan(spec: &Spec, env: &Env, at: Moment) -> Result<Planned, Error> {
    let Spec {
        target,
        backend,
        server,
        state,
    } = spec;
    for (what, name) in [("backend", backend), ("server", server)] {
        if name.is_empty()
            || name.len() > 256
            || name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '/')
        {
            return Err(Error::InvalidArgument(format!(
                "{what} name {} is not a HAProxy name",
                crate::quote::quote(name)
            )));
        }
    }
    if !STATES.contains(&state.as_str()) {
        return Err(Error::InvalidArgument(format!(
            "state {} is not one of ready, drain, maint",
            crate::quote::quote(state)
        )));
    }
    let socket = socket(&env.config, target)?;
    if at == Moment::Submission {
        // NOT_FOUND naming the servers it has, or UNAVAILABLE when HAProxy cannot be asked.
        runtime::server_state(&socket, backend, server)
            .await
            .map_err(crate::haproxy::Error::from)?;
    }
    let steps: Vec<String> = STEPS.iter().map(|s| s.name(spec)).collect();
    Ok(Planned {
        steps,
        resources: vec![format!("haproxy:{target}")],
        executor: Box::new(SetState {
            socket,
            spec: spec.clone(),
            before: None,
        }),
    })
}

#[derive(Debug)]
struct SetState {
    socket: PathBuf,
    spec: Spec,
    before: Option<String>,
}

impl Executor for SetState {
    fn run_step<'a>(&'a mut self, index: usize, ctx: &'a mut StepCtx<'_>) -> StepFuture<'a> {
        Box::pin(async move { self.run(super::step_at(&STEPS, index)?, ctx).await })
    }
}

impl SetState {
    async fn run(&mut self, step: Step, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        let Spec {
            backend,
            server,
            state,
            ..
        } = &self.spec;
        if let Step::Read = step {
            let now = runtime::server_state(&self.socket, backend, server)
                .await
                .map_err(|e| match e {
                    Lookup::NotFound(m) => StepError::Precondition(m),
                    Lookup::Failed(m) => StepError::Failed(m),
                })?;
            ctx.log(LogLevel::Info, format!("{}/{} is {now}", backend, server));
            self.before = Some(now);
            return Ok(());
        }
        let before = self.before.clone().unwrap_or_else(|| "ready".into());
        ctx.record_undo(UndoEntry::HaproxyServerState {
            socket: self.socket.clone(),
            backend: backend.clone(),
            server: server.clone(),
            state: before,
        })
        .await?;
        runtime::set_server_state(&self.socket, backend, server, state)
            .await
            .map_err(StepError::Failed)
    }
}
