//! The `haproxy_edit` kind: structured edits of a target's live configuration (force HTTPS,
//! serve TLS, sticky sessions, restrict a path, a health check, the ACME route, servers,
//! lines). It reads the live file, makes the edits surgically, and goes through the same
//! validate → swap → reload → verify path as `haproxy_apply` (whose steps it runs), then
//! proves each edit works from a client's side — a failed proof unwinds like a failed
//! reload. Edits already in effect make no change: no validation, no swap, no reload.

use super::haproxy_apply::{self, Apply};
use super::{Executor, Moment, Planned, StepFuture};
use crate::haproxy::edits::{self, Edit, EditError, Proof, RuntimeChange};
use crate::haproxy::{HaproxyTarget, Targets};
use crate::job::LogLevel;
use crate::stats::parse::{RowType, State};
use crate::step::{Env, Error, StepCtx, StepError};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Edit a HAProxy target's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// The target.
    pub target: String,
    /// The edits, made in order.
    pub edits: Vec<Edit>,
    /// The version the caller previewed, if given.
    pub base_version: Option<String>,
    /// Replace lines that conflict with an edit instead of refusing.
    #[serde(default)]
    pub replace: bool,
    /// Whether servers UP before may be DOWN after.
    #[serde(default)]
    pub allow_servers_down: bool,
}

/// How long a proof keeps trying (the new worker and its health checks need a moment).
const PROVE_WITHIN: Duration = Duration::from_secs(15);
/// How long a server removed at runtime may take to finish its sessions.
const DRAIN_WITHIN: Duration = Duration::from_secs(30);

/// The steps, in order.
#[derive(Debug, Clone, Copy)]
enum Step {
    Edit,
    Apply(haproxy_apply::Step),
    Runtime,
    Prove,
}

/// Edits that go live by a reload.
const BY_RELOAD: [Step; 6] = [
    Step::Edit,
    Step::Apply(haproxy_apply::Step::Validate),
    Step::Apply(haproxy_apply::Step::Swap),
    Step::Apply(haproxy_apply::Step::Reload),
    Step::Apply(haproxy_apply::Step::Verify),
    Step::Prove,
];

/// Server additions and removals HAProxy takes at runtime: the file is still validated and
/// swapped (so the next reload keeps them), but nothing is reloaded.
const AT_RUNTIME: [Step; 5] = [
    Step::Edit,
    Step::Apply(haproxy_apply::Step::Validate),
    Step::Apply(haproxy_apply::Step::Swap),
    Step::Runtime,
    Step::Prove,
];

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Edit => f.write_str("edit the configuration"),
            Step::Apply(s) => s.fmt(f),
            Step::Runtime => f.write_str("change servers at runtime"),
            Step::Prove => f.write_str("check the edits work"),
        }
    }
}

/// Whether these edits of this file go live at runtime: the changes, or why they reload.
fn runtime_mode(
    target: &HaproxyTarget,
    live: &str,
    edits: &[Edit],
) -> Result<Vec<RuntimeChange>, String> {
    if target.stats_socket.is_none() {
        return Err("the target has no stats_socket".into());
    }
    edits::runtime_changes(live, edits)
}

/// An edit's refusal as the caller gets it.
pub(crate) fn refusal(e: EditError) -> Error {
    match e {
        EditError::Invalid(m) => Error::InvalidArgument(m),
        EditError::NotFound(m) => Error::NotFound(m),
        EditError::Conflict(m) => Error::FailedPrecondition(m),
    }
}

/// What the edits need to know of the daemon.
pub(crate) fn context(env: &Env, replace: bool, target: &str) -> edits::Context {
    edits::Context {
        bundle_dir: env.config.bundle_dir(),
        responder: env.config.certificates.responder,
        replace,
        log_stream: env
            .config
            .haproxy
            .iter()
            .find(|t| t.name == target)
            .and_then(|t| t.log_address()),
    }
}

/// Checks the edits, and at submission makes them on the live file, so a conflict or a
/// missing section is refused before the job starts.
pub(crate) async fn plan(spec: &Spec, env: &Env, at: Moment) -> Result<Planned, Error> {
    let targets = Targets::new(&env.config.haproxy, env.config.bundle_dir());
    let target = haproxy_apply::appliable(&targets, &spec.target)?;
    if let Some(v) = &spec.base_version
        && !crate::haproxy::is_version(v)
    {
        return Err(Error::InvalidArgument(format!(
            "base_version {} is not a configuration version (sha256: and 64 hex digits, as GetConfig returns)",
            crate::quote::quote(v)
        )));
    }
    edits::check(&spec.edits).map_err(refusal)?;
    let cx = context(env, spec.replace, &spec.target);
    let live = targets.live(&spec.target).await?;
    let runtime = runtime_mode(&target, &live.text, &spec.edits).is_ok();
    let mut planned = None;
    if at == Moment::Submission {
        if let Some(base) = &spec.base_version
            && *base != live.version
        {
            return Err(Error::FailedPrecondition(stale(&spec.target, &live.version, base)));
        }
        let out = edits::apply_blocking(live.text.clone(), spec.edits.clone(), cx.clone())
            .await
            .map_err(refusal)?;
        if out.text != live.text {
            haproxy_apply::check_text(&targets, &spec.target, &out.text, Some(&live.text))?;
        }
        planned = Some((live.version, out));
    }
    let steps: &[Step] = if runtime { &AT_RUNTIME } else { &BY_RELOAD };
    let executor = EditJob {
        targets,
        target,
        spec: spec.clone(),
        cx,
        responder: env.responder.clone(),
        steps: steps.to_vec(),
        runtime: None,
        apply: None,
        proofs: Vec::new(),
        planned,
    };
    Ok(Planned::new(
        steps,
        vec![format!("haproxy:{}", spec.target)],
        executor,
    ))
}

fn stale(target: &str, live: &str, base: &str) -> String {
    format!(
        "the live configuration of '{target}' is now {live}, not {base} that the edits were previewed on; preview them again"
    )
}

#[derive(Debug)]
struct EditJob {
    targets: Targets,
    target: HaproxyTarget,
    spec: Spec,
    cx: edits::Context,
    responder: Option<Arc<crate::certs::responder::Responder>>,
    steps: Vec<Step>,
    /// The server changes made at runtime (runtime mode, once edited).
    runtime: Option<Vec<RuntimeChange>>,
    /// The apply of the edited file; None until edited, or when the edits change nothing.
    apply: Option<Apply>,
    proofs: Vec<Proof>,
    /// The edits made and checked at submission, with the version of the file they were made
    /// on: the edit step uses them when the file is still that version (on a 5000-server file
    /// making and checking them again is a few ms of a job's ~170).
    planned: Option<(String, edits::Outcome)>,
}

impl Executor for EditJob {
    fn run_step<'a>(&'a mut self, index: usize, ctx: &'a mut StepCtx<'_>) -> StepFuture<'a> {
        Box::pin(async move {
            match super::step_at(&self.steps, index)? {
                Step::Edit => self.edit(ctx).await,
                Step::Runtime => self.at_runtime(ctx).await,
                Step::Apply(step) => match &mut self.apply {
                    Some(apply) => apply.run(step, ctx).await,
                    None => {
                        ctx.log(LogLevel::Info, "skipped: nothing changed");
                        Ok(())
                    }
                },
                Step::Prove => self.prove(ctx).await,
            }
        })
    }
}

impl EditJob {
    async fn edit(&mut self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        let name = self.spec.target.clone();
        let live = self.targets.live(&name).await.map_err(StepError::failed)?;
        if let Some(base) = &self.spec.base_version
            && *base != live.version
        {
            return Err(StepError::Precondition(stale(&name, &live.version, base)));
        }
        let planned = self
            .planned
            .take()
            .filter(|(version, _)| *version == live.version)
            .map(|(_, out)| out);
        let checked = planned.is_some();
        let out = match planned {
            Some(out) => out,
            None => edits::apply_blocking(live.text.clone(), self.spec.edits.clone(), self.cx.clone())
                .await
                .map_err(|e| match e {
                    EditError::Conflict(m) | EditError::NotFound(m) => StepError::Precondition(m),
                    EditError::Invalid(m) => StepError::Failed(m),
                })?,
        };
        for n in &out.notes {
            ctx.log(LogLevel::Info, n.clone());
        }
        for u in &out.unproven {
            ctx.log(LogLevel::Warn, u.clone());
        }
        if out.text == live.text {
            ctx.log(
                LogLevel::Info,
                format!(
                    "no change: every edit is already in effect in {}; nothing is validated, swapped or reloaded",
                    live.version
                ),
            );
            return Ok(());
        }
        if !checked {
            haproxy_apply::check_text(&self.targets, &name, &out.text, Some(&live.text))
                .map_err(StepError::from)?;
        }
        let planned_runtime = self.steps.iter().any(|s| matches!(s, Step::Runtime));
        let runtime = runtime_mode(&self.target, &live.text, &self.spec.edits);
        match (&runtime, planned_runtime) {
            (Ok(_), true) => ctx.log(
                LogLevel::Info,
                "servers change at runtime: the file is swapped for the next reload, but nothing is reloaded",
            ),
            (Err(why), false) if self.spec.edits.iter().all(|e| {
                matches!(e, Edit::AddServer { .. } | Edit::RemoveServer { .. })
            }) => ctx.log(LogLevel::Info, format!("servers change by a reload: {why}")),
            (Err(_), false) => {}
            (r, _) => {
                return Err(StepError::Precondition(format!(
                    "the configuration changed since the job was planned: these edits now go live by {}; submit them again",
                    if r.is_ok() { "runtime changes" } else { "a reload" }
                )));
            }
        }
        let (added, removed) = changed_lines(&live.text, &out.text);
        ctx.log(
            LogLevel::Info,
            format!(
                "{added} line(s) added, {removed} removed; the new version is {}",
                crate::haproxy::version(out.text.as_bytes())
            ),
        );
        self.proofs = out.proofs;
        // The swap checks the file is still the one edited (another job or a person may
        // change it in between).
        let apply_text = out.text.clone();
        let apply = Apply::new(
            self.targets.clone(),
            self.target.clone(),
            out.text,
            Some(live.version),
            self.spec.allow_servers_down,
        );
        self.apply = Some(match runtime {
            Ok(changes) if planned_runtime => {
                // Servers only added: their backends with the global and defaults sections
                // are what can fail to load (a removal needs the whole file: another line may
                // name the server).
                let added: Vec<String> = changes
                    .iter()
                    .filter_map(|c| match c {
                        RuntimeChange::Add { backend, .. } => Some(backend.clone()),
                        RuntimeChange::Remove { .. } => None,
                    })
                    .collect();
                let names: Vec<&str> = added.iter().map(String::as_str).collect();
                let quick = (added.len() == changes.len())
                    .then(|| edits::backends_alone(&apply_text, &names))
                    .flatten();
                self.runtime = Some(changes);
                let apply = apply.without_reload();
                match quick {
                    Some(text) => apply.checking_first(
                        text,
                        format!("backend {} with the global and defaults sections", added.join(", ")),
                    ),
                    None => apply,
                }
            }
            _ => apply,
        });
        Ok(())
    }

    /// Adds and removes the servers in the running HAProxy, each undo recorded first: a
    /// server added is drained and deleted on an unwind, one removed is added back.
    async fn at_runtime(&mut self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        let Some(changes) = self.runtime.clone() else {
            ctx.log(LogLevel::Info, "skipped: nothing changed");
            return Ok(());
        };
        let Some(socket) = self.target.stats_socket.clone() else {
            return Err(StepError::Failed("the target has no stats_socket".into()));
        };
        use crate::haproxy::runtime;
        for c in changes {
            match c {
                RuntimeChange::Add {
                    backend,
                    server,
                    args,
                } => {
                    // One the running HAProxy has (added by hand, say) is not this job's to
                    // take away on an unwind.
                    if runtime::has_server(&socket, &backend, &server)
                        .await
                        .map_err(StepError::Failed)?
                    {
                        return Err(StepError::Precondition(format!(
                            "the running HAProxy already has {backend}/{server}, though the file does not: remove it there, or reload, first"
                        )));
                    }
                    ctx.record_undo(crate::undo::UndoEntry::RuntimeDelServer {
                        socket: socket.clone(),
                        backend: backend.clone(),
                        server: server.clone(),
                        args: args.clone(),
                    })
                    .await?;
                    runtime::add_server(&socket, &backend, &server, &args)
                        .await
                        .map_err(StepError::Failed)?;
                    ctx.log(
                        LogLevel::Info,
                        format!("added {backend}/{server} at runtime ({}), no reload", args.join(" ")),
                    );
                }
                RuntimeChange::Remove {
                    backend,
                    server,
                    args,
                } => {
                    let state = runtime::server_state(&socket, &backend, &server)
                        .await
                        .map_err(|e| match e {
                            crate::haproxy::runtime::Lookup::NotFound(m) => {
                                StepError::Precondition(m)
                            }
                            crate::haproxy::runtime::Lookup::Failed(m) => StepError::Failed(m),
                        })?;
                    ctx.record_undo(crate::undo::UndoEntry::RuntimeAddServer {
                        socket: socket.clone(),
                        backend: backend.clone(),
                        server: server.clone(),
                        args,
                        state,
                    })
                    .await?;
                    ctx.log(
                        LogLevel::Info,
                        format!("draining {backend}/{server} (up to {DRAIN_WITHIN:?})"),
                    );
                    ctx.until_cancel(runtime::remove_server(
                        &socket,
                        &backend,
                        &server,
                        DRAIN_WITHIN,
                    ))
                    .await?
                    .map_err(StepError::Failed)?;
                    ctx.log(
                        LogLevel::Info,
                        format!("deleted {backend}/{server} at runtime, no reload"),
                    );
                }
            }
        }
        Ok(())
    }

    async fn prove(&mut self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        if self.apply.is_none() {
            ctx.log(LogLevel::Info, "skipped: nothing changed");
            return Ok(());
        }
        if self.proofs.is_empty() {
            ctx.log(
                LogLevel::Info,
                "these edits have no effect a client could check beyond the reload",
            );
        }
        for proof in self.proofs.clone() {
            let deadline = tokio::time::Instant::now() + PROVE_WITHIN;
            loop {
                let r = ctx.until_cancel(self.check(&proof)).await?;
                match r {
                    Ok(seen) => {
                        ctx.log(LogLevel::Info, seen);
                        break;
                    }
                    Err(why) if tokio::time::Instant::now() >= deadline => {
                        if self.spec.allow_servers_down
                            && matches!(proof, Proof::BackendUp { .. })
                        {
                            ctx.log(LogLevel::Warn, format!("{why} (allowed: allow_servers_down)"));
                            break;
                        }
                        return Err(StepError::Failed(format!(
                            "the edit does not work as asked: {why}"
                        )));
                    }
                    Err(_) => {
                        ctx.until_cancel(tokio::time::sleep(Duration::from_millis(200)))
                            .await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// One look at a proof: what was seen when it holds, why not otherwise.
    async fn check(&self, proof: &Proof) -> Result<String, String> {
        let client = |b: reqwest::ClientBuilder| {
            b.redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .timeout(Duration::from_secs(3))
                .build()
                .map_err(|e| format!("cannot build an HTTP client: {e}"))
        };
        match proof {
            Proof::Redirect { addr, host, code } => {
                let c = client(reqwest::Client::builder())?;
                let r = c
                    .get(format!("http://{addr}/"))
                    .header("Host", host.as_str())
                    .send()
                    .await
                    .map_err(|e| format!("GET http://{addr}/ (Host {host}): {e}"))?;
                let location = r
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                if r.status().as_u16() == *code && location.starts_with("https://") {
                    Ok(format!(
                        "GET http://{addr}/ (Host {host}) answers {} to {location}",
                        r.status()
                    ))
                } else {
                    Err(format!(
                        "GET http://{addr}/ (Host {host}) answered {} {location}, not a {code} to https://",
                        r.status()
                    ))
                }
            }
            Proof::Tls { addr } => {
                // Any answer over TLS proves TLS is served; which certificate is a matter
                // of the directory's contents (SNI), not of this edit.
                let c = client(reqwest::Client::builder().danger_accept_invalid_certs(true))?;
                let r = c
                    .get(format!("https://{addr}/"))
                    .send()
                    .await
                    .map_err(|e| format!("TLS to {addr}: {}", chain(&e)))?;
                Ok(format!("TLS is served on {addr} (GET / answered {})", r.status()))
            }
            Proof::Denied {
                addr,
                path,
                status,
                from,
            } => {
                let c = client(reqwest::Client::builder().local_address(*from))?;
                let r = c
                    .get(format!("http://{addr}{path}"))
                    .send()
                    .await
                    .map_err(|e| format!("GET http://{addr}{path} from {from}: {e}"))?;
                if r.status().as_u16() == *status {
                    Ok(format!(
                        "GET http://{addr}{path} from {from} (outside the allow list) answers {}",
                        r.status()
                    ))
                } else {
                    Err(format!(
                        "GET http://{addr}{path} from {from} answered {}, not {status}",
                        r.status()
                    ))
                }
            }
            Proof::BackendUp { backend } => {
                let rows = self.rows(backend).await?;
                let servers: Vec<_> = rows
                    .iter()
                    .filter(|r| r.proxy == *backend && r.kind == RowType::Server)
                    .collect();
                // Servers in maintenance or drain were put there on purpose; an UP server
                // must have passed a check of the new configuration (HAProxy starts checked
                // servers UP before their first check).
                let down: Vec<String> = servers
                    .iter()
                    .filter(|r| !matches!(r.status.state, State::Maint | State::Drain))
                    .filter(|r| {
                        let checked = r
                            .check_status
                            .as_deref()
                            .is_none_or(|c| c != "INI" && !c.starts_with("* "));
                        r.status.state != State::Up || r.status.transitional() || !checked
                    })
                    .map(|r| format!("{}/{} is {}", backend, r.server, r.status.raw))
                    .collect();
                if servers.is_empty() {
                    Err(format!("backend {backend} has no servers in the stats"))
                } else if down.is_empty() {
                    Ok(format!(
                        "every server of backend {backend} is UP ({})",
                        servers.len()
                    ))
                } else {
                    Err(down.join(", "))
                }
            }
            Proof::ServerGone { backend, server } => {
                let rows = self.rows(backend).await?;
                if rows.iter().any(|r| {
                    r.proxy == *backend && r.server == *server && r.kind == RowType::Server
                }) {
                    Err(format!("{backend}/{server} is still in the stats"))
                } else {
                    Ok(format!("{backend}/{server} is gone"))
                }
            }
            Proof::ServerPresent { backend, server } => {
                let rows = self.rows(backend).await?;
                match rows
                    .iter()
                    .find(|r| r.proxy == *backend && r.server == *server && r.kind == RowType::Server)
                {
                    Some(r) if r.status.state == State::Up || r.status.raw == "no check" => {
                        Ok(format!("{backend}/{server} is {}", r.status.raw))
                    }
                    Some(r) => Err(format!("{backend}/{server} is {}", r.status.raw)),
                    None => Err(format!("{backend}/{server} is not in the stats")),
                }
            }
            Proof::AcmeRoute { addr } => {
                let Some(responder) = &self.responder else {
                    return Err("statelyd runs no responder to answer the probe".into());
                };
                let token = format!("stately-probe-{}", uuid::Uuid::now_v7().simple());
                let key = format!("{token}.probe");
                let _answering = responder.add(&token, &key);
                let c = client(reqwest::Client::builder())?;
                let url = format!("http://{addr}/.well-known/acme-challenge/{token}");
                let r = c
                    .get(&url)
                    .header("Host", "localhost")
                    .send()
                    .await
                    .map_err(|e| format!("GET {url}: {e}"))?;
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                if status.is_success() && body.trim() == key {
                    Ok(format!("a challenge request through {addr} reaches statelyd's responder"))
                } else {
                    Err(format!("GET {url} answered {status}, not the responder's answer"))
                }
            }
        }
    }

    /// The stats rows of one backend.
    async fn rows(&self, backend: &str) -> Result<Vec<crate::stats::parse::Row>, String> {
        let Some(socket) = &self.target.stats_socket else {
            return Err("the target has no stats_socket, so servers cannot be checked".into());
        };
        crate::stats::fetch_proxy(socket, backend)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Lines added and removed between two texts.
fn changed_lines(old: &str, new: &str) -> (usize, usize) {
    let diff = similar::TextDiff::from_lines(old, new);
    let mut added = 0;
    let mut removed = 0;
    for c in diff.iter_all_changes() {
        match c.tag() {
            similar::ChangeTag::Insert => added += 1,
            similar::ChangeTag::Delete => removed += 1,
            similar::ChangeTag::Equal => {}
        }
    }
    (added, removed)
}

/// An error with its causes ("error sending request" alone does not say what went wrong).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}
