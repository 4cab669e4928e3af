//! `stately.v1.Jobs`: converts between `pb` messages and the engine's domain types and checks
//! the caller's role. No job logic here.

use super::ts;
use crate::auth::require;
use crate::config::Role;
use crate::engine::{self, Engine, Submission};
use crate::job::{Event, EventBody, JobId, JobState, LogLevel, StepRecord, StepState};
use crate::kinds::{self, Job, JobSpec};
use crate::pb;
use futures_util::{Stream, StreamExt};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// The `stately.v1.Jobs` service.
#[derive(Debug, Clone)]
pub(crate) struct JobsApi {
    pub(crate) engine: Engine,
    /// Cancelled when the daemon stops: open streams end (attached jobs are not cancelled by
    /// that; they are left to the shutdown grace period and recovery).
    pub(crate) stopping: CancellationToken,
    /// When the daemon started (unix ms) and where it listens, for GetStatus.
    pub(crate) started_at: i64,
    pub(crate) listeners: Vec<String>,
    /// When the configuration was loaded, and the last refused reload.
    pub(crate) loads: std::sync::Arc<crate::config::Loads>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

use crate::alerts::rules::{DEFAULT_HOLD_MS, DEFAULT_INTERVAL_MS, Rules};

fn parse_id(s: &str) -> Result<JobId, Status> {
    if s.is_empty() {
        return Err(Status::invalid_argument("job_id is required"));
    }
    s.parse().map_err(Status::invalid_argument)
}

fn submission(req: pb::SubmitJobRequest, by: Option<String>) -> Result<Submission, Status> {
    let spec = match req.spec.and_then(|s| s.kind) {
        Some(pb::job_spec::Kind::Runbook(r)) => {
            if r.runbook.is_empty() {
                return Err(Status::invalid_argument(
                    "spec.runbook.runbook (the runbook's name) is required",
                ));
            }
            JobSpec::Runbook(kinds::runbook::Spec {
                runbook: r.runbook,
                params: r.params.into_iter().collect(),
            })
        }
        Some(pb::job_spec::Kind::HaproxyApply(a)) => {
            if a.target.is_empty() {
                return Err(Status::invalid_argument(
                    "spec.haproxy_apply.target is required",
                ));
            }
            JobSpec::HaproxyApply(kinds::haproxy_apply::Spec {
                target: a.target,
                config: a.config,
                base_version: match a.base_version.as_str() {
                    "" => None,
                    v if crate::haproxy::is_version(v) => Some(a.base_version),
                    v => {
                        return Err(Status::invalid_argument(format!(
                            "spec.haproxy_apply.base_version {} is not a configuration version \
                             (sha256: and 64 hex digits, as GetConfig returns)",
                            crate::quote::quote(v)
                        )));
                    }
                },
                allow_servers_down: a.allow_servers_down,
            })
        }
        Some(pb::job_spec::Kind::HaproxyServerState(h)) => {
            if h.target.is_empty() || h.backend.is_empty() || h.server.is_empty() {
                return Err(Status::invalid_argument(
                    "spec.haproxy_server_state needs target, backend and server",
                ));
            }
            JobSpec::HaproxyServerState(kinds::haproxy_server_state::Spec {
                target: h.target,
                backend: h.backend,
                server: h.server,
                state: h.state,
            })
        }
        Some(pb::job_spec::Kind::AlertWatch(a)) => {
            if a.target.is_empty() {
                return Err(Status::invalid_argument(
                    "spec.alert_watch.target is required",
                ));
            }
            JobSpec::AlertWatch(kinds::alert_watch::Spec {
                target: a.target,
                to: a.to,
                rules: Rules {
                    interval_ms: match a.interval_ms {
                        0 => DEFAULT_INTERVAL_MS,
                        n => u64::from(n),
                    },
                    hold_ms: a.hold_ms.map_or(DEFAULT_HOLD_MS, u64::from),
                    proxies: a.proxies,
                    max_session_rate: a.max_session_rate,
                    max_sessions_percent: a.max_sessions_percent,
                    max_5xx: a.max_5xx,
                },
            })
        }
        Some(pb::job_spec::Kind::CertificateIssue(c)) => JobSpec::CertificateIssue(
            kinds::certificate_issue::Spec {
                lineage: c.lineage,
                names: c.names,
                webroot: Some(c.webroot)
                    .filter(|w| !w.is_empty())
                    .map(std::path::PathBuf::from),
                key_type: c.key_type,
                reuse_key: c.reuse_key,
                deploy: c.deploy,
                acme: c.acme,
                expand: c.expand,
                dry_run: c.dry_run,
                challenge: c.challenge,
            }
            .with_defaults(),
        ),
        Some(pb::job_spec::Kind::CertificateRevoke(r)) => {
            JobSpec::CertificateRevoke(kinds::certificate_revoke::Spec {
                lineage: r.lineage,
                reason: if r.reason.is_empty() {
                    "unspecified".into()
                } else {
                    r.reason.to_ascii_lowercase()
                },
            })
        }
        Some(pb::job_spec::Kind::CertificateAdopt(a)) => {
            JobSpec::CertificateAdopt(kinds::certificate_adopt::Spec {
                root: Some(a.root)
                    .filter(|r| !r.is_empty())
                    .map(std::path::PathBuf::from),
                lineages: a.lineages,
                deploy: a.deploy,
                dry_run: a.dry_run,
            })
        }
        Some(pb::job_spec::Kind::CertificateDelete(d)) => {
            JobSpec::CertificateDelete(kinds::certificate_delete::Spec { lineage: d.lineage })
        }
        Some(pb::job_spec::Kind::HaproxyEdit(h)) => {
            if h.target.is_empty() {
                return Err(Status::invalid_argument(
                    "spec.haproxy_edit.target is required",
                ));
            }
            JobSpec::HaproxyEdit(kinds::haproxy_edit::Spec {
                target: h.target,
                edits: super::haproxy::edits_from_pb(h.edits)?,
                base_version: (!h.base_version.is_empty()).then_some(h.base_version),
                replace: h.replace,
                allow_servers_down: h.allow_servers_down,
            })
        }
        Some(pb::job_spec::Kind::Rollback(_)) => {
            return Err(Status::invalid_argument(
                "rollback jobs are started with RollbackJob, not submitted",
            ));
        }
        None => {
            return Err(Status::invalid_argument(
                "spec is required: set one kind of job (e.g. spec.runbook)",
            ));
        }
    };
    Ok(Submission {
        spec,
        request_id: Some(req.request_id).filter(|r| !r.is_empty()),
        labels: req.labels.into_iter().collect(),
        submitted_by: by,
        node: Some(req.node).filter(|n| !n.is_empty()),
    })
}

/// How a request's caller is recorded on the jobs it starts.
fn submitter<T>(req: &Request<T>) -> Option<String> {
    crate::auth::caller_of(req).map(|c| c.identity())
}

#[tonic::async_trait]
impl pb::jobs_server::Jobs for JobsApi {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        require(&req, Role::Operator, "SubmitJob")?;
        let by = submitter(&req);
        let job = self
            .engine
            .submit(submission(req.into_inner(), by)?)
            .await?;
        Ok(Response::new(job_to_pb(&job)))
    }

    type RunJobStream = EventStream;

    async fn run_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        require(&req, Role::Operator, "RunJob")?;
        let deadline = deadline(&req);
        let by = submitter(&req);
        let job = self
            .engine
            .submit(submission(req.into_inner(), by)?)
            .await?;
        let rx = self.engine.watch(job.id, 0).await?;
        let stream = Attached {
            rx,
            engine: Some(self.engine.clone()),
            job: job.id,
            stopping: self.stopping.clone(),
            deadline,
            _watching: crate::metrics::watching("job"),
        };
        Ok(Response::new(Box::pin(
            stream.take_until(self.stopping.clone().cancelled_owned()),
        )))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        require(&req, Role::Viewer, "GetJob")?;
        let id = parse_id(&req.get_ref().job_id)?;
        let mut job = job_to_pb(&self.engine.get(id).await?);
        job.undo = self
            .engine
            .undo_entries(id)
            .await?
            .into_iter()
            .map(|(what, applied)| pb::UndoItem { what, applied })
            .collect();
        Ok(Response::new(job))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        require(&req, Role::Viewer, "ListJobs")?;
        let r = req.into_inner();
        let states = r
            .states
            .iter()
            .map(|s| match pb::JobState::try_from(*s) {
                Ok(s) if s != pb::JobState::Unspecified => Ok(state_from_pb(s)),
                _ => Err(Status::invalid_argument(format!(
                    "states: {s} is not a job state"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let kind = Some(r.kind).filter(|k| !k.is_empty());
        let (jobs, next) = self
            .engine
            .list(
                states,
                kind,
                r.labels.into_iter().collect(),
                Some(r.node).filter(|n| !n.is_empty()),
                r.page_size,
                &r.page_token,
            )
            .await?;
        Ok(Response::new(pb::ListJobsResponse {
            // A listing leaves out applied configuration texts (up to 16 MiB each): GetJob has them.
            jobs: jobs
                .iter()
                .map(|j| {
                    let mut p = job_to_pb(j);
                    if let Some(pb::JobSpec {
                        kind: Some(pb::job_spec::Kind::HaproxyApply(a)),
                    }) = &mut p.spec
                    {
                        a.config.clear();
                    }
                    p
                })
                .collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        require(&req, Role::Viewer, "WatchJob")?;
        let id = parse_id(&req.get_ref().job_id)?;
        let rx = self.engine.watch(id, req.get_ref().after_seq).await?;
        let stream = Attached {
            rx,
            engine: None,
            job: id,
            stopping: self.stopping.clone(),
            deadline: deadline(&req),
            _watching: crate::metrics::watching("job"),
        };
        Ok(Response::new(Box::pin(
            stream.take_until(self.stopping.clone().cancelled_owned()),
        )))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        require(&req, Role::Operator, "CancelJob")?;
        let r = req.into_inner();
        let id = parse_id(&r.job_id)?;
        let job = self.engine.cancel(id, &r.reason, r.wait).await?;
        Ok(Response::new(job_to_pb(&job)))
    }

    async fn rollback_job(
        &self,
        req: Request<pb::RollbackJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        require(&req, Role::Operator, "RollbackJob")?;
        let by = submitter(&req);
        let r = req.into_inner();
        let id = parse_id(&r.job_id)?;
        let job = self.engine.rollback(id, r.force, by).await?;
        Ok(Response::new(job_to_pb(&job)))
    }

    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::ServerStatus>, Status> {
        require(&req, Role::Viewer, "GetStatus")?;
        let config = self.engine.config();
        let loads = self.loads.get();
        Ok(Response::new(pb::ServerStatus {
            config_loaded_at: Some(ts(loads.loaded_at)),
            config_reloads: loads.reloads,
            config_reload_error: loads
                .refused
                .as_ref()
                .map(|(_, e)| e.clone())
                .unwrap_or_default(),
            config_reload_error_at: loads.refused.as_ref().map(|(at, _)| ts(*at)),
            version: env!("CARGO_PKG_VERSION").into(),
            node: config.node_name(),
            started_at: Some(ts(self.started_at)),
            data_dir: config.data_dir.display().to_string(),
            store: self.engine.store_description(),
            listeners: self.listeners.clone(),
            outbox_pending: self.engine.outbox_pending().await?,
            unwind_incomplete_job_ids: self
                .engine
                .unwind_incomplete()
                .await?
                .into_iter()
                .map(|id| id.to_string())
                .collect(),
        }))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        require(&req, Role::Viewer, "ListNodes")?;
        let me = self.engine.node_name().to_owned();
        let nodes = self
            .engine
            .nodes()
            .await?
            .into_iter()
            .map(|n| pb::Node {
                answering: n.name == me,
                name: n.name,
                epoch: n.epoch,
                started_at: Some(ts(n.started_at)),
                heartbeat_at: Some(ts(n.heartbeat_at)),
                state: if n.up {
                    pb::NodeState::Up
                } else {
                    pb::NodeState::Lost
                } as i32,
                version: n.version,
                heartbeat_age: Some(prost_types::Duration {
                    seconds: n.heartbeat_age_ms / 1000,
                    nanos: (n.heartbeat_age_ms % 1000) as i32 * 1_000_000,
                }),
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::Identity>, Status> {
        require(&req, Role::Viewer, "WhoAmI")?;
        let caller = crate::auth::caller_of(&req).cloned();
        let peer = crate::auth::peer_of(&req).unwrap_or_default();
        let cert = peer.cert.clone().unwrap_or_default();
        Ok(Response::new(pb::Identity {
            identity: caller.as_ref().map(|c| c.identity()).unwrap_or_default(),
            role: match caller.as_ref().map(|c| c.role) {
                Some(Role::Operator) => "operator".into(),
                Some(Role::Viewer) => "viewer".into(),
                None => String::new(),
            },
            via: caller
                .map(|c| c.via.as_str().to_owned())
                .unwrap_or_default(),
            peer: peer.address.clone(),
            tls: peer.tls,
            certificate_cn: cert.cn.unwrap_or_default(),
            certificate_o: cert.o,
            certificate_san: cert.sans,
        }))
    }

    async fn list_runbooks(
        &self,
        req: Request<pb::ListRunbooksRequest>,
    ) -> Result<Response<pb::ListRunbooksResponse>, Status> {
        require(&req, Role::Viewer, "ListRunbooks")?;
        let runbooks = self
            .engine
            .config()
            .runbooks
            .iter()
            .map(|r| pb::Runbook {
                name: r.name.clone(),
                description: r.description.clone(),
                params: r
                    .params
                    .iter()
                    .map(|(name, p)| pb::RunbookParam {
                        name: name.clone(),
                        description: p.description.clone(),
                        default: p.default.clone(),
                        pattern: p.pattern.clone().unwrap_or_default(),
                    })
                    .collect(),
                steps: r
                    .steps
                    .iter()
                    .map(|s| pb::RunbookStep {
                        name: s.name.clone().unwrap_or_default(),
                        r#type: s.action.type_name().to_owned(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListRunbooksResponse { runbooks }))
    }

    async fn unwind_job(
        &self,
        req: Request<pb::UnwindJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        require(&req, Role::Operator, "UnwindJob")?;
        let r = req.into_inner();
        let id = parse_id(&r.job_id)?;
        let job = self.engine.unwind(id, r.abandon).await?;
        Ok(Response::new(job_to_pb(&job)))
    }
}

/// An event stream. For RunJob (`engine` set) it is attached: dropped before the job's
/// terminal event — the client cancelled, hit its deadline or went away — it cancels the job.
struct Attached {
    rx: mpsc::Receiver<Result<Event, engine::Error>>,
    engine: Option<Engine>,
    job: JobId,
    stopping: CancellationToken,
    /// The caller's deadline (`grpc-timeout`): the stream ends there, DEADLINE_EXCEEDED.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Counts the stream in `stately_watchers` while it is open.
    _watching: crate::metrics::Watching,
}

/// Reads a `grpc-timeout` header ("100m", "5S", ...), as the gRPC spec writes it.
fn grpc_timeout<T>(req: &Request<T>) -> Option<std::time::Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    // The spec allows at most 8 digits, so none of the products below can overflow.
    if n.is_empty() || n.len() > 8 {
        return None;
    }
    let n: u64 = n.parse().ok()?;
    use std::time::Duration as D;
    Some(match unit {
        "H" => D::from_secs(n * 3600),
        "M" => D::from_secs(n * 60),
        "S" => D::from_secs(n),
        "m" => D::from_millis(n),
        "u" => D::from_micros(n),
        "n" => D::from_nanos(n),
        _ => return None,
    })
}

fn deadline<T>(req: &Request<T>) -> Option<Pin<Box<tokio::time::Sleep>>> {
    grpc_timeout(req).map(|d| Box::pin(tokio::time::sleep(d)))
}

impl Stream for Attached {
    type Item = Result<pb::JobEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(d) = self.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            self.deadline = None;
            // Tonic ends the call on this error; the drop that follows cancels an attached job.
            return Poll::Ready(Some(Err(Status::deadline_exceeded(
                "the call's deadline passed",
            ))));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(e))) => {
                if e.body.is_terminal() {
                    self.engine = None;
                }
                Poll::Ready(Some(Ok(event_to_pb(&e))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                self.engine = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        // A stream ended by the daemon's own shutdown leaves the job to the grace period.
        if let Some(engine) = self.engine.take().filter(|_| !self.stopping.is_cancelled()) {
            let job = self.job;
            tokio::spawn(async move {
                tracing::info!(%job, "the attached call ended before the job: cancelling it");
                let _ = engine.cancel(job, "the attached call ended", false).await;
            });
        }
    }
}

pub(crate) fn state_to_pb(s: JobState) -> pb::JobState {
    match s {
        JobState::Pending => pb::JobState::Pending,
        JobState::Running => pb::JobState::Running,
        JobState::Cancelling => pb::JobState::Cancelling,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

fn state_from_pb(s: pb::JobState) -> JobState {
    match s {
        pb::JobState::Pending | pb::JobState::Unspecified => JobState::Pending,
        pb::JobState::Running => JobState::Running,
        pb::JobState::Cancelling => JobState::Cancelling,
        pb::JobState::Succeeded => JobState::Succeeded,
        pb::JobState::Failed => JobState::Failed,
        pb::JobState::Cancelled => JobState::Cancelled,
    }
}

fn step_state_to_pb(s: StepState) -> pb::StepState {
    match s {
        StepState::Pending => pb::StepState::Pending,
        StepState::Running => pb::StepState::Running,
        StepState::Succeeded => pb::StepState::Succeeded,
        StepState::Failed => pb::StepState::Failed,
        StepState::Cancelled => pb::StepState::Cancelled,
    }
}

fn spec_to_pb(spec: &JobSpec) -> pb::JobSpec {
    let kind = match spec {
        // Another version's kind: no message of this version holds it (Job.kind names it).
        JobSpec::Unknown(_) => return pb::JobSpec { kind: None },
        JobSpec::Runbook(kinds::runbook::Spec { runbook, params }) => {
            pb::job_spec::Kind::Runbook(pb::RunbookJob {
                runbook: runbook.clone(),
                params: params.clone().into_iter().collect(),
            })
        }
        JobSpec::HaproxyApply(kinds::haproxy_apply::Spec {
            target,
            config,
            base_version,
            allow_servers_down,
        }) => pb::job_spec::Kind::HaproxyApply(pb::HaproxyApplyJob {
            target: target.clone(),
            config: config.clone(),
            base_version: base_version.clone().unwrap_or_default(),
            allow_servers_down: *allow_servers_down,
        }),
        JobSpec::HaproxyServerState(kinds::haproxy_server_state::Spec {
            target,
            backend,
            server,
            state,
        }) => pb::job_spec::Kind::HaproxyServerState(pb::HaproxyServerStateJob {
            target: target.clone(),
            backend: backend.clone(),
            server: server.clone(),
            state: state.clone(),
        }),
        JobSpec::AlertWatch(kinds::alert_watch::Spec { target, to, rules }) => {
            pb::job_spec::Kind::AlertWatch(pb::AlertWatchJob {
                target: target.clone(),
                to: to.clone(),
                interval_ms: rules.interval_ms.min(u64::from(u32::MAX)) as u32,
                hold_ms: Some(rules.hold_ms.min(u64::from(u32::MAX)) as u32),
                proxies: rules.proxies.clone(),
                max_session_rate: rules.max_session_rate,
                max_sessions_percent: rules.max_sessions_percent,
                max_5xx: rules.max_5xx,
            })
        }
        JobSpec::CertificateIssue(kinds::certificate_issue::Spec {
            lineage,
            names,
            webroot,
            key_type,
            reuse_key,
            deploy,
            acme,
            expand,
            dry_run,
            challenge,
        }) => pb::job_spec::Kind::CertificateIssue(pb::CertificateIssueJob {
            names: names.clone(),
            lineage: lineage.clone(),
            webroot: webroot
                .as_ref()
                .map(|w| w.display().to_string())
                .unwrap_or_default(),
            key_type: key_type.clone(),
            reuse_key: *reuse_key,
            deploy: deploy.clone(),
            acme: acme.clone(),
            expand: *expand,
            dry_run: *dry_run,
            challenge: challenge.clone(),
        }),
        JobSpec::CertificateRevoke(r) => {
            pb::job_spec::Kind::CertificateRevoke(pb::CertificateRevokeJob {
                lineage: r.lineage.clone(),
                reason: r.reason.clone(),
            })
        }
        JobSpec::CertificateAdopt(a) => {
            pb::job_spec::Kind::CertificateAdopt(pb::CertificateAdoptJob {
                root: a
                    .root
                    .as_ref()
                    .map(|r| r.display().to_string())
                    .unwrap_or_default(),
                lineages: a.lineages.clone(),
                deploy: a.deploy.clone(),
                dry_run: a.dry_run,
            })
        }
        JobSpec::CertificateDelete(d) => {
            pb::job_spec::Kind::CertificateDelete(pb::CertificateDeleteJob {
                lineage: d.lineage.clone(),
            })
        }
        JobSpec::HaproxyEdit(e) => pb::job_spec::Kind::HaproxyEdit(pb::HaproxyEditJob {
            target: e.target.clone(),
            edits: super::haproxy::edits_to_pb(&e.edits),
            base_version: e.base_version.clone().unwrap_or_default(),
            replace: e.replace,
            allow_servers_down: e.allow_servers_down,
        }),
        JobSpec::Rollback(kinds::rollback::Spec { target, force }) => {
            pb::job_spec::Kind::Rollback(pb::RollbackSpec {
                target_job_id: target.to_string(),
                force: *force,
            })
        }
    };
    pb::JobSpec { kind: Some(kind) }
}

fn step_to_pb(i: usize, s: &StepRecord) -> pb::Step {
    pb::Step {
        index: i as u32,
        name: s.name.clone(),
        state: step_state_to_pb(s.state) as i32,
        started_at: s.started_at.map(ts),
        finished_at: s.finished_at.map(ts),
        error: s.error.clone().unwrap_or_default(),
    }
}

pub(crate) fn job_to_pb(j: &Job) -> pb::Job {
    pb::Job {
        id: j.id.to_string(),
        kind: match &j.spec {
            JobSpec::Unknown(u) => u.kind.clone(),
            s => s.kind().to_owned(),
        },
        spec: Some(spec_to_pb(&j.spec)),
        state: state_to_pb(j.state) as i32,
        steps: j
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| step_to_pb(i, s))
            .collect(),
        request_id: j.request_id.clone().unwrap_or_default(),
        labels: j.labels.clone().into_iter().collect(),
        resources: j.resources.clone(),
        waiting_for: j.waiting_for.clone(),
        created_at: Some(ts(j.created_at)),
        started_at: j.started_at.map(ts),
        finished_at: j.finished_at.map(ts),
        error: j.error.clone().unwrap_or_default(),
        failed_step: j.failed_step.clone().unwrap_or_default(),
        undo_entries: j.undo_entries,
        rolled_back_by: j.rolled_back_by.map(|r| r.to_string()).unwrap_or_default(),
        rollback_of: j
            .spec
            .rollback_of()
            .map(|r| r.to_string())
            .unwrap_or_default(),
        last_seq: j.last_seq,
        unwind_incomplete: j.unwind_incomplete,
        undo: Vec::new(),
        submitted_by: j.submitted_by.clone().unwrap_or_default(),
        node: j.node.clone(),
    }
}

pub(crate) fn event_to_pb(e: &Event) -> pb::JobEvent {
    use pb::job_event::Event as E;
    let event = match &e.body {
        EventBody::State { from, to, reason } => E::StateChanged(pb::StateChanged {
            from: from.map(|f| state_to_pb(f) as i32).unwrap_or(0),
            to: state_to_pb(*to) as i32,
            reason: reason.clone(),
        }),
        EventBody::StepStarted { index, name } => E::StepStarted(pb::StepStarted {
            index: *index,
            name: name.clone(),
        }),
        EventBody::StepFinished {
            index,
            name,
            state,
            error,
        } => E::StepFinished(pb::StepFinished {
            index: *index,
            name: name.clone(),
            state: step_state_to_pb(*state) as i32,
            error: error.clone().unwrap_or_default(),
        }),
        EventBody::Progress {
            step,
            done,
            total,
            message,
        } => E::Progress(pb::Progress {
            step_index: *step,
            done: *done,
            total: *total,
            message: message.clone(),
        }),
        EventBody::Log {
            level,
            message,
            step,
        } => E::Log(pb::LogLine {
            level: match level {
                LogLevel::Info => pb::LogLevel::Info,
                LogLevel::Warn => pb::LogLevel::Warn,
                LogLevel::Error => pb::LogLevel::Error,
            } as i32,
            message: message.clone(),
            step_index: *step,
        }),
    };
    pb::JobEvent {
        job_id: e.job.to_string(),
        seq: e.seq,
        at: Some(ts(e.at)),
        event: Some(event),
    }
}

#[cfg(test)]
mod tests {
    use super::grpc_timeout;
    use std::time::Duration;

    fn with(value: &str) -> Option<Duration> {
        let mut req = tonic::Request::new(());
        req.metadata_mut()
            .insert("grpc-timeout", value.parse().unwrap());
        grpc_timeout(&req)
    }

    #[test]
    fn grpc_timeout_reads_every_unit_the_spec_names() {
        assert_eq!(with("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(with("3M"), Some(Duration::from_secs(180)));
        assert_eq!(with("5S"), Some(Duration::from_secs(5)));
        assert_eq!(with("100m"), Some(Duration::from_millis(100)));
        assert_eq!(with("7u"), Some(Duration::from_micros(7)));
        assert_eq!(with("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(
            with("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
    }

    #[test]
    fn grpc_timeout_ignores_what_the_spec_does_not_allow() {
        for bad in ["", "S", "5", "5s", "123456789S", "-1S", "1.5S", "5 S"] {
            let mut req = tonic::Request::new(());
            if let Ok(v) = bad.parse() {
                req.metadata_mut().insert("grpc-timeout", v);
            }
            assert_eq!(grpc_timeout(&req), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&tonic::Request::new(())), None);
    }
}
