//! The `haproxy_server_state` kind: set a server ready, drain or maint through the runtime
//! API (say, before a deploy); its undo entry, recorded first, puts back the state it had.

use super::StepError;
use crate::config::Config;
use crate::engine::{Error, StepCtx};
use crate::haproxy::Targets;
use crate::haproxy::runtime::{self, Lookup, STATES};
use crate::job::LogLevel;
use crate::undo::UndoEntry;
use std::path::PathBuf;

pub(crate) fn step_names(backend: &str, server: &str, state: &str) -> Vec<String> {
    vec![
        format!("read {backend}/{server}"),
        format!("set {backend}/{server} {state}"),
    ]
}

fn socket(config: &Config, target: &str) -> Result<PathBuf, Error> {
    let targets = Targets::new(config);
    let t = targets
        .get(target)
        .map_err(|e| Error::NotFound(e.to_string()))?;
    t.stats_socket.clone().ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "HAProxy target '{target}' has no stats_socket (the runtime API) configured"
        ))
    })
}

/// Checks a submission, asking HAProxy whether the backend and server exist.
pub(crate) async fn check(
    config: &Config,
    target: &str,
    backend: &str,
    server: &str,
    state: &str,
) -> Result<Vec<String>, Error> {
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
    if !STATES.contains(&state) {
        return Err(Error::InvalidArgument(format!(
            "state {} is not one of ready, drain, maint",
            crate::quote::quote(state)
        )));
    }
    let socket = socket(config, target)?;
    match runtime::server_state(&socket, backend, server).await {
        Ok(_) => Ok(vec![format!("haproxy:{target}")]),
        Err(Lookup::NotFound(m)) => Err(Error::NotFound(m)),
        Err(Lookup::Failed(m)) => Err(Error::Unavailable(m)),
    }
}

#[derive(Debug)]
pub(crate) struct SetState {
    socket: PathBuf,
    backend: String,
    server: String,
    state: String,
    before: Option<String>,
}

impl SetState {
    pub(crate) fn new(
        config: &Config,
        target: &str,
        backend: &str,
        server: &str,
        state: &str,
    ) -> Result<SetState, StepError> {
        let socket = socket(config, target).map_err(|e| StepError::Failed(e.to_string()))?;
        Ok(SetState {
            socket,
            backend: backend.into(),
            server: server.into(),
            state: state.into(),
            before: None,
        })
    }

    pub(crate) fn step_names(&self) -> Vec<String> {
        step_names(&self.backend, &self.server, &self.state)
    }

    pub(crate) async fn run_step(
        &mut self,
        index: usize,
        ctx: &mut StepCtx<'_>,
    ) -> Result<(), StepError> {
        if index == 0 {
            let now = runtime::server_state(&self.socket, &self.backend, &self.server)
                .await
                .map_err(|e| match e {
                    Lookup::NotFound(m) => StepError::Precondition(m),
                    Lookup::Failed(m) => StepError::Failed(m),
                })?;
            ctx.log(
                LogLevel::Info,
                format!("{}/{} is {now}", self.backend, self.server),
            );
            self.before = Some(now);
            return Ok(());
        }
        let before = self.before.clone().unwrap_or_else(|| "ready".into());
        ctx.record_undo(UndoEntry::HaproxyServerState {
            socket: self.socket.clone(),
            backend: self.backend.clone(),
            server: self.server.clone(),
            state: before,
        })
        .await?;
        runtime::set_server_state(&self.socket, &self.backend, &self.server, &self.state)
            .await
            .map_err(StepError::Failed)
    }
}
