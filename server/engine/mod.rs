//! The job engine: submission (idempotent), resource scheduling, cancellation, rollback,
//! watching, recovery after a crash and retention. The gRPC layer calls this and nothing
//! below it.

mod runner;
mod scheduler;

use crate::blobs::BlobStore;
use crate::config::Config;
use crate::job::{Event, EventBody, JobId, JobRecord, JobState, StepRecord, now_ms};
use crate::kinds::{self, Job, JobSpec, Moment, Planned};
use crate::quote::quote;
use crate::step::Env;
use crate::store::{JobFilter, Store, Write};
use scheduler::Scheduler;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use crate::step::Error;

/// A job submission.
#[derive(Debug, Clone)]
pub struct Submission {
    /// What to do.
    pub spec: JobSpec,
    /// Idempotency key.
    pub request_id: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Who submits it (see [`JobRecord::submitted_by`]).
    pub submitted_by: Option<String>,
    /// The node to run it on (None: the node that takes the submission).
    pub node: Option<String>,
}

/// A job that has not ended, in this process.
pub(crate) struct LiveJob {
    pub(crate) cancel: CancellationToken,
    pub(crate) events: broadcast::Sender<Event>,
    /// The job's latest recorded state; a cancel waits on it (it cannot miss a change).
    pub(crate) state: tokio::sync::watch::Sender<JobState>,
    reason: Mutex<Option<String>>,
    /// When the first cancel was asked for (for the cancel-to-unwound metric).
    pub(crate) cancel_requested: std::sync::OnceLock<std::time::Instant>,
    /// Wakes the retry of an incomplete unwind at once (UnwindJob).
    pub(crate) unwind_now: tokio::sync::Notify,
    /// Set by UnwindJob with abandon: the entries left are given up.
    pub(crate) abandon: std::sync::atomic::AtomicBool,
    /// The latest UnwindJob request's number, and the number of the latest request an attempt
    /// began after (so UnwindJob waits for an attempt that started after it asked).
    pub(crate) unwind_requested: std::sync::atomic::AtomicU64,
    pub(crate) unwind_served: tokio::sync::watch::Sender<u64>,
}

impl LiveJob {
    fn new() -> Arc<Self> {
        Arc::new(LiveJob {
            cancel: CancellationToken::new(),
            // A watcher that falls behind reads the rest from the store.
            events: broadcast::channel(64).0,
            state: tokio::sync::watch::Sender::new(JobState::Pending),
            reason: Mutex::new(None),
            cancel_requested: std::sync::OnceLock::new(),
            unwind_now: tokio::sync::Notify::new(),
            abandon: std::sync::atomic::AtomicBool::new(false),
            unwind_requested: std::sync::atomic::AtomicU64::new(0),
            unwind_served: tokio::sync::watch::Sender::new(0),
        })
    }

    pub(crate) fn reason(&self) -> String {
        self.reason
            .lock()
            .expect("reason lock")
            .clone()
            .unwrap_or_else(|| "cancelled".into())
    }

    fn request_cancel(&self, reason: String) {
        self.reason
            .lock()
            .expect("reason lock")
            .get_or_insert(reason);
        let _ = self.cancel_requested.set(std::time::Instant::now());
        self.cancel.cancel();
    }
}

/// Everything the engine's tasks share.
pub(crate) struct Shared {
    /// What every job's steps get (config, store, blobs, HTTP, stats, responder, stop signal);
    /// its config is the one the engine started with (see `current`).
    pub(crate) env: Env,
    /// The configuration of now, replaced by a reload.
    current: std::sync::RwLock<Arc<Config>>,
    scheduler: Scheduler,
    live: Mutex<HashMap<JobId, Arc<LiveJob>>>,
    /// Jobs of other nodes watched here: one follower each reads the ledger at each notice
    /// and fans the events out to every watcher of the job (see [`follower`]).
    followed: Mutex<HashMap<JobId, broadcast::Sender<Event>>>,
    request_ids: tokio::sync::Mutex<()>,
    rollbacks: tokio::sync::Mutex<()>,
    tasks: TaskTracker,
    /// This node's name on the ledger, its epoch, and when the epoch began (ms).
    node: (String, u64, i64),
}

impl Shared {
    /// The configuration of now.
    pub(crate) fn config(&self) -> Arc<Config> {
        self.current.read().expect("config lock").clone()
    }

    /// What a job starting now gets: the services, and the configuration of now.
    pub(crate) fn env_now(&self) -> Env {
        Env {
            config: self.config(),
            ..self.env.clone()
        }
    }

    /// Whether new jobs may start (not once the daemon begins to stop).
    fn accepting(&self) -> bool {
        !self.env.stopping.is_cancelled()
    }

    /// A job has ended: free its resources and forget its live state.
    fn finish(&self, id: JobId, resources: &[String]) {
        self.live.lock().expect("live lock").remove(&id);
        self.scheduler.release(id, resources);
    }
}

/// A cheap-clone handle on the engine.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// A weak handle on the engine.
#[derive(Debug, Clone)]
pub(crate) struct WeakEngine(std::sync::Weak<Shared>);

/// Page sizes: 0 means the default; larger than the maximum is clamped.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// The most label filters ListJobs takes (a job has at most 64 labels).
pub const MAX_LABEL_FILTERS: usize = 64;
/// The largest page ListJobs returns.
pub const MAX_PAGE_SIZE: u32 = 1000;

impl Engine {
    /// Opens the store, unwinds jobs a crash interrupted, requeues pending jobs and starts
    /// the retention task.
    /// The engine stops taking jobs when `stop` (the daemon's stop signal) is cancelled, or at
    /// [`Engine::shutdown`].
    pub async fn start(config: Arc<Config>, stop: &CancellationToken) -> Result<Engine, Error> {
        let data = &config.data_dir;
        crate::fsops::create_private_dir(data).map_err(|e| {
            Error::Unavailable(format!(
                "cannot create data directory {}: {e}",
                data.display()
            ))
        })?;
        let sync_full = config.sync == crate::config::SyncMode::Full;
        let node = config.node_name();
        let store = match &config.store.url {
            None => Store::open(&data.join("stately.db"), sync_full, &node)?,
            Some(url) => {
                let target = crate::store::PostgresTarget::from_config(
                    &config.store,
                    url,
                    sync_full,
                    config.insecure,
                    &node,
                )?;
                Store::open_postgres(target).await?
            }
        };
        let blobs = BlobStore::open(data.join("blobs"))
            .map_err(|e| Error::Unavailable(format!("cannot create blob directory: {e}")))?;
        let (c, d) = (config.clone(), data.join("blobs"));
        let swept = tokio::task::spawn_blocking(move || sweep_known_temps(&c, &d))
            .await
            .unwrap_or_default();
        for p in swept {
            tracing::info!("removed {}, left by an interrupted write", p.display());
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("stately/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Unavailable(format!("cannot build the HTTP client: {e}")))?;
        let sockets = stats_sockets(&config);
        let responder = match config.certificates.responder {
            Some(addr) => Some(
                crate::certs::responder::Responder::start(addr)
                    .await
                    .map_err(|e| {
                        Error::Unavailable(format!(
                            "the HTTP-01 responder cannot listen on {addr}: {e}"
                        ))
                    })?,
            ),
            None => None,
        };
        let epoch = store.join(&node).await?;
        let node = (node, epoch, crate::job::now_ms());
        let shared = Arc::new(Shared {
            node,
            current: std::sync::RwLock::new(config.clone()),
            env: Env {
                responder,
                stats: Arc::new(crate::stats::StatsHub::new(sockets)),
                stopping: stop.child_token(),
                config,
                store,
                blobs,
                http,
            },
            scheduler: Scheduler::default(),
            live: Mutex::new(HashMap::new()),
            followed: Mutex::new(HashMap::new()),
            request_ids: tokio::sync::Mutex::new(()),
            rollbacks: tokio::sync::Mutex::new(()),
            tasks: TaskTracker::new(),
        });
        let engine = Engine { shared };
        // Heartbeating from the join on: a long recovery does not look like a lost node.
        engine.spawn_heartbeat();
        engine.recover().await?;
        engine.spawn_fleet();
        engine.spawn_retention();
        Ok(engine)
    }

    async fn recover(&self) -> Result<(), Error> {
        let s = &self.shared;
        // Every record is read before anything is done, so a ledger that cannot be read
        // stops the start before any job was unwound or resumed.
        let typed = |records: Vec<crate::store::StoredJob>| -> Result<Vec<Job>, Error> {
            Ok(records
                .into_iter()
                .map(kinds::typed)
                .collect::<Result<_, _>>()?)
        };
        let interrupted = typed(
            s.env
                .store
                .jobs_in(&[JobState::Running, JobState::Cancelling])
                .await?,
        )?;
        let incomplete = typed(s.env.store.jobs_unwind_incomplete().await?)?;
        let pending = typed(s.env.store.jobs_in(&[JobState::Pending]).await?)?;
        for record in interrupted {
            if record.state == JobState::Running && record.spec.resumes() {
                tracing::info!(job = %record.id, "resuming a watch job");
                let live = LiveJob::new();
                live.state.send_replace(JobState::Running);
                s.live
                    .lock()
                    .expect("live lock")
                    .insert(record.id, live.clone());
                let span = runner::span(&record);
                s.tasks
                    .spawn(runner::resume(s.clone(), record, live).instrument(span));
                continue;
            }
            tracing::warn!(job = %record.id, "unwinding a job interrupted by restart");
            let live = LiveJob::new();
            let span = runner::span(&record);
            runner::recover(s, record, &live).instrument(span).await?;
        }
        // Jobs whose unwind could not finish keep their resources (ahead of every pending
        // job) while their retries go on.
        for record in incomplete {
            tracing::warn!(job = %record.id, "retrying an unwind that could not finish");
            let live = LiveJob::new();
            live.state.send_replace(record.state);
            s.scheduler.enqueue(record.id, &record.resources);
            s.live
                .lock()
                .expect("live lock")
                .insert(record.id, live.clone());
            let span = runner::span(&record);
            s.tasks
                .spawn(runner::retry_unwind(s.clone(), record, live).instrument(span));
        }
        // Cancels other nodes recorded while this one was away apply before a pending job
        // starts.
        let cancels: BTreeMap<JobId, String> =
            s.env.store.cancel_requests().await?.into_iter().collect();
        for record in pending {
            let live = LiveJob::new();
            if let Some(reason) = cancels.get(&record.id) {
                live.request_cancel(reason.clone());
            }
            s.scheduler.enqueue(record.id, &record.resources);
            s.live
                .lock()
                .expect("live lock")
                .insert(record.id, live.clone());
            let span = runner::span(&record);
            s.tasks
                .spawn(runner::run(s.clone(), record, live, None).instrument(span));
        }
        Ok(())
    }

    fn spawn_retention(&self) {
        let weak = Arc::downgrade(&self.shared);
        let interval = self.shared.config().history.prune_interval;
        let grace = (interval * 10).clamp(Duration::from_secs(1), Duration::from_secs(600));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(s) = weak.upgrade() else { return };
                let h = s.config().history.clone();
                if let Err(e) = prune_history(&s.env.store, &h).await {
                    tracing::warn!("pruning the history failed: {e}");
                    continue;
                }
                let (store, blobs) = (s.env.store.clone(), s.env.blobs.clone());
                drop(s);
                let referenced = match store.referenced_blobs().await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!("collecting backup blobs failed: {e}");
                        continue;
                    }
                };
                let collected = tokio::task::spawn_blocking(move || {
                    blobs.collect(&referenced, grace).map_err(|e| e.to_string())
                })
                .await;
                match collected {
                    Ok(Ok(n)) if n > 0 => {
                        tracing::debug!("collected {n} unreferenced backup blob(s)")
                    }
                    Ok(Err(e)) => tracing::warn!("collecting backup blobs failed: {e}"),
                    _ => {}
                }
            }
        });
    }

    /// A handle that does not keep the engine alive (for background clients of it).
    pub(crate) fn downgrade(&self) -> WeakEngine {
        WeakEngine(Arc::downgrade(&self.shared))
    }

    /// The engine, if it still runs.
    pub(crate) fn upgrade(weak: &WeakEngine) -> Option<Engine> {
        weak.0.upgrade().map(|shared| Engine { shared })
    }

    /// The configuration of now (a reload replaces it; running jobs keep theirs).
    pub fn config(&self) -> Arc<Config> {
        self.shared.config()
    }

    /// Replaces the configuration: jobs submitted or started from now on plan and run with
    /// it, the stats pollers follow its targets; running jobs keep the one they started with.
    pub fn set_config(&self, config: Arc<Config>) {
        self.shared.env.stats.set_sockets(stats_sockets(&config));
        *self.shared.current.write().expect("config lock") = config;
    }

    /// Jobs in the ledger by kind and state (for the metrics).
    pub(crate) async fn job_counts(&self) -> Result<Vec<(String, String, u64)>, Error> {
        Ok(self.shared.env.store.job_counts().await?)
    }

    /// Heartbeats this node's epoch on a shared ledger; a later start of the same node
    /// (another process with its name) fences this one.
    fn spawn_heartbeat(&self) {
        let store = self.shared.env.store.clone();
        if !store.is_shared() {
            return;
        }
        let (name, epoch, _) = self.shared.node.clone();
        let stop = self.shared.env.stopping.clone();
        // The lease of the start ([store] is not reloaded).
        let lease = self.shared.env.config.store.lease;
        self.shared.tasks.spawn(async move {
            let mut tick = tokio::time::interval(lease / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match store.heartbeat(&name, epoch).await {
                    Ok(true) => {}
                    Ok(false) => {
                        store.fence(format!(
                            "node {name} was started again by another statelyd (its epoch {epoch} is over), or its lease lapsed (no heartbeat for {lease:?}: paused, or cut off from the ledger)"
                        ));
                        return;
                    }
                    Err(e) => tracing::warn!("the node's heartbeat: {e}"),
                }
            }
        });
    }

    /// On a shared ledger, what other nodes ask of this one: jobs submitted for it (planned
    /// and run here) and cancels of its jobs — at each notice, and in full at the start, after
    /// every reconnect of the listener and at each heartbeat (a notice lost is not a request
    /// lost).
    fn spawn_fleet(&self) {
        let store = self.shared.env.store.clone();
        let Some(mut notices) = store.notices() else {
            return;
        };
        let weak = Arc::downgrade(&self.shared);
        let stop = self.shared.env.stopping.clone();
        let mine = self.shared.node.0.clone();
        let every = self.shared.env.config.store.lease / 3;
        self.shared.tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let full = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => true,
                    n = notices.recv() => match n {
                        Ok(crate::store::Notice::Cancel { job, node }) if node == mine => {
                            let Some(s) = weak.upgrade() else { return };
                            // Not live yet (still to be planned): the full pass finds it.
                            !cancel_here(&s, job).await
                        }
                        Ok(crate::store::Notice::Submitted { node, .. }) => node == mine,
                        Ok(crate::store::Notice::Resync)
                        | Err(broadcast::error::RecvError::Lagged(_)) => true,
                        Ok(_) => false,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                };
                if !full {
                    continue;
                }
                let Some(s) = weak.upgrade() else { return };
                if let Err(e) = reconcile(&s).await {
                    tracing::warn!("reading what other nodes asked of this one: {e}");
                }
            }
        });
    }

    /// The ledger's nodes, by name (on SQLite, this node alone).
    pub(crate) async fn nodes(&self) -> Result<Vec<crate::store::NodeRow>, Error> {
        let (name, epoch, started_at) = self.shared.node.clone();
        Ok(match self.shared.env.store.nodes().await? {
            Some(nodes) => nodes,
            None => vec![crate::store::NodeRow {
                name,
                epoch,
                started_at,
                heartbeat_at: crate::job::now_ms(),
                heartbeat_age_ms: 0,
                up: true,
                version: env!("CARGO_PKG_VERSION").into(),
            }],
        })
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.shared.node.0
    }

    /// Resolves, saying why, if another statelyd has taken the ledger (this one must stop).
    pub async fn ledger_lost(&self) -> String {
        self.shared.env.store.lost().await
    }

    /// Where the job ledger is (its file, or PostgreSQL's host, port and database).
    pub fn store_description(&self) -> String {
        self.shared.env.store.describe().to_owned()
    }

    /// The shared stats pollers.
    pub fn stats(&self) -> Arc<crate::stats::StatsHub> {
        self.shared.env.stats.clone()
    }

    /// Submits a job. With a request id already used for the same spec, returns that job.
    pub async fn submit(&self, sub: Submission) -> Result<Job, Error> {
        if let JobSpec::Rollback(_) = sub.spec {
            return Err(Error::InvalidArgument(
                "rollback jobs are started with RollbackJob, not submitted".into(),
            ));
        }
        validate_labels(&sub.labels)?;
        if let Some(node) = sub.node.as_deref()
            && node != self.shared.node.0
        {
            self.known_node(node).await?;
        }

        match sub.request_id.clone().as_deref() {
            Some(rid) => {
                if rid.is_empty() || rid.len() > 256 || rid.contains(char::is_control) {
                    return Err(Error::InvalidArgument(
                        "request_id must be 1 to 256 characters, none of them control characters"
                            .into(),
                    ));
                }
                let _one_at_a_time = self.shared.request_ids.lock().await;
                let node = sub.node.clone();
                if let Some(existing) = self.repeat(rid, &sub.spec, node.as_deref()).await? {
                    return Ok(existing);
                }
                let spec = sub.spec.clone();
                let done = if self.elsewhere(&sub) {
                    self.enqueue_elsewhere(sub).await
                } else {
                    let env = self.shared.env_now();
                    let plan = kinds::plan(&sub.spec, &env, Moment::Submission).await?;
                    self.enqueue(sub, plan, env.config).await
                };
                match done {
                    // On a shared ledger another node may have recorded the same id first
                    // (the ledger's unique index refused this one): its job is the answer.
                    Err(e) if self.shared.env.store.is_shared() => {
                        match self.repeat(rid, &spec, node.as_deref()).await {
                            Ok(Some(existing)) => Ok(existing),
                            Ok(None) => Err(e),
                            Err(refused) => Err(refused),
                        }
                    }
                    done => done,
                }
            }
            None if self.elsewhere(&sub) => self.enqueue_elsewhere(sub).await,
            None => {
                let env = self.shared.env_now();
                let plan = kinds::plan(&sub.spec, &env, Moment::Submission).await?;
                self.enqueue(sub, plan, env.config).await
            }
        }
    }

    /// The job a request id was already used for, when `sub` repeats it; ALREADY_EXISTS when
    /// it was used for another spec, or for another node than the one named. A repeat that
    /// names no node gets the job wherever it runs (a client retrying through a balancer may
    /// reach another node than the first time).
    async fn repeat(
        &self,
        rid: &str,
        spec: &JobSpec,
        node: Option<&str>,
    ) -> Result<Option<Job>, Error> {
        let Some(existing) = self.shared.env.store.job_by_request_id(rid).await? else {
            return Ok(None);
        };
        let existing = kinds::typed(existing)?;
        if existing.spec != *spec {
            return Err(Error::AlreadyExists(format!(
                "request_id {} was already used for job {} with a different spec",
                quote(rid),
                existing.id
            )));
        }
        if node.is_some_and(|n| n != existing.node) {
            return Err(Error::AlreadyExists(format!(
                "request_id {} was already used for job {} on node {}",
                quote(rid),
                existing.id,
                existing.node
            )));
        }
        // A repeat gets its job back even if the config changed since.
        Ok(Some(existing))
    }

    /// Whether a submission is for another node.
    fn elsewhere(&self, sub: &Submission) -> bool {
        sub.node.as_deref().is_some_and(|n| n != self.shared.node.0)
    }

    /// Refuses a node the ledger does not know (on SQLite, any other than this one).
    async fn known_node(&self, node: &str) -> Result<(), Error> {
        if !crate::config::is_node_name(node) {
            return Err(Error::InvalidArgument(format!(
                "node {} is not a node name (letters, digits, '-', '_' and '.'; at most 63)",
                quote(node)
            )));
        }
        let nodes = self.nodes().await?;
        if nodes.iter().any(|n| n.name == node) {
            return Ok(());
        }
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        Err(Error::NotFound(format!(
            "no node {} on this ledger (nodes: {})",
            quote(node),
            names.join(", ")
        )))
    }

    /// Records a job for another node: its node plans it against its own configuration (its
    /// targets, lineages and runbooks) when it takes it, and fails it there if it cannot.
    async fn enqueue_elsewhere(&self, sub: Submission) -> Result<Job, Error> {
        let s = &self.shared;
        if !s.accepting() {
            return Err(Error::Unavailable("the daemon is shutting down".into()));
        }
        let node = sub.node.clone().expect("elsewhere has a node");
        let record = pending(sub, node.clone(), Vec::new(), Vec::new());
        let (id, now) = (record.id, record.created_at);
        let first = Event {
            job: id,
            seq: 1,
            at: now,
            body: EventBody::State {
                from: None,
                to: JobState::Pending,
                reason: format!("submitted on node {} for node {node}", s.node.0),
            },
        };
        s.env
            .store
            .commit(
                vec![
                    Write::InsertJob(record.clone().map_spec(|s| Ok::<_, Error>(s.stored()))?),
                    Write::Event(first),
                ],
                None,
            )
            .await?;
        Ok(record)
    }

    /// Records and starts a job planned (at submission) with `config`.
    async fn enqueue(
        &self,
        sub: Submission,
        plan: Planned,
        config: Arc<Config>,
    ) -> Result<Job, Error> {
        let s = &self.shared;
        if !s.accepting() {
            return Err(Error::Unavailable("the daemon is shutting down".into()));
        }
        let steps = StepRecord::planned(plan.steps);
        let mut record = pending(sub, s.node.0.clone(), steps, plan.resources);
        let (id, now) = (record.id, record.created_at);
        let live = LiveJob::new();
        s.live.lock().expect("live lock").insert(id, live.clone());
        s.scheduler.enqueue(id, &record.resources);
        let first = Event {
            job: id,
            seq: 1,
            at: now,
            body: EventBody::State {
                from: None,
                to: JobState::Pending,
                reason: "submitted".into(),
            },
        };
        if let Err(e) = s
            .env
            .store
            .commit(
                vec![
                    Write::InsertJob(record.clone().map_spec(|s| Ok::<_, Error>(s.stored()))?),
                    Write::Event(first),
                ],
                Some(&live.events),
            )
            .await
        {
            s.finish(id, &record.resources);
            return Err(e.into());
        }
        record.waiting_for = s
            .scheduler
            .blockers(id, &record.resources)
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        s.tasks.spawn(
            runner::run(
                s.clone(),
                record.clone(),
                live,
                Some(runner::Prepared {
                    executor: plan.executor,
                    config,
                }),
            )
            .instrument(runner::span(&record)),
        );
        Ok(record)
    }

    /// A job that has not ended, in this process.
    fn live(&self, id: JobId) -> Option<Arc<LiveJob>> {
        self.shared
            .live
            .lock()
            .expect("live lock")
            .get(&id)
            .cloned()
    }

    /// The newest succeeded `certificate_issue` job of a lineage in the history (the newest
    /// 1000 of the kind).
    pub async fn last_issue_of(&self, lineage: &str) -> Result<Option<JobId>, Error> {
        let (jobs, _) = self
            .list(
                vec![JobState::Succeeded],
                Some("certificate_issue".into()),
                Vec::new(),
                Some(self.shared.node.0.clone()),
                MAX_PAGE_SIZE,
                "",
            )
            .await?;
        Ok(jobs.into_iter().find_map(|j| match &j.spec {
            JobSpec::CertificateIssue(c) if c.lineage == lineage => Some(j.id),
            _ => None,
        }))
    }

    /// How many jobs' unwinds could not finish.
    pub async fn unwind_incomplete_count(&self) -> Result<u64, Error> {
        Ok(self.shared.env.store.unwind_incomplete_count().await?)
    }

    /// Every job whose unwind could not finish, oldest first.
    pub async fn unwind_incomplete(&self) -> Result<Vec<JobId>, Error> {
        Ok(self
            .shared
            .env
            .store
            .jobs_unwind_incomplete()
            .await?
            .into_iter()
            .map(|j| j.id)
            .collect())
    }

    /// A job's undo entries, oldest first: what each does, and whether it was applied.
    pub async fn undo_entries(&self, id: JobId) -> Result<Vec<(String, bool)>, Error> {
        Ok(self
            .shared
            .env
            .store
            .journal(id)
            .await?
            .into_iter()
            .map(|e| (e.entry.describe(), e.applied))
            .collect())
    }

    /// Alert mails queued and not yet delivered.
    pub async fn outbox_pending(&self) -> Result<u64, Error> {
        Ok(self.shared.env.store.outbox_pending().await?)
    }

    /// When the oldest undelivered alert mail was queued (ms since the epoch), if any.
    pub async fn outbox_oldest(&self) -> Result<Option<i64>, Error> {
        Ok(self.shared.env.store.outbox_oldest().await?)
    }

    /// One job.
    pub async fn get(&self, id: JobId) -> Result<Job, Error> {
        let stored = self
            .shared
            .env
            .store
            .job(id)
            .await?
            .ok_or_else(|| not_found(id))?;
        Ok(kinds::typed(stored)?)
    }

    /// A page of jobs, newest first, and the token of the next page (None on the last).
    pub async fn list(
        &self,
        states: Vec<JobState>,
        kind: Option<String>,
        labels: Vec<(String, String)>,
        node: Option<String>,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<Job>, Option<String>), Error> {
        let limit = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        if let Some(k) = &kind
            && !JobSpec::KINDS.contains(&k.as_str())
        {
            return Err(Error::InvalidArgument(format!(
                "unknown kind {} (kinds: {})",
                quote(k),
                JobSpec::KINDS.join(", ")
            )));
        }
        if labels.len() > MAX_LABEL_FILTERS {
            return Err(Error::InvalidArgument(format!(
                "labels: at most {MAX_LABEL_FILTERS} label filters, not {}",
                labels.len()
            )));
        }
        if let Some((k, _)) = labels.iter().find(|(k, v)| k.len() > 63 || v.len() > 256) {
            return Err(Error::InvalidArgument(format!(
                "labels: filter {} is longer than a label can be (keys 63 bytes, values 256)",
                quote(k)
            )));
        }
        if let Some(n) = &node
            && !crate::config::is_node_name(n)
        {
            return Err(Error::InvalidArgument(format!(
                "node {} is not a node name (letters, digits, '-', '_' and '.'; at most 63)",
                quote(n)
            )));
        }
        if states.len() > 16 {
            return Err(Error::InvalidArgument(
                "states: at most 16 states (there are 6)".into(),
            ));
        }
        let before = match page_token {
            "" => None,
            t => Some(t.parse::<i64>().ok().filter(|p| *p > 0).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "page_token {} is not one this server returned",
                    quote(t)
                ))
            })?),
        };
        let filter = JobFilter {
            states,
            kind,
            labels,
            before,
            limit: limit + 1,
            node,
            planned_only: false,
        };
        let mut rows = self.shared.env.store.list(&filter).await?;
        let next = if rows.len() > limit as usize {
            rows.truncate(limit as usize);
            rows.last().map(|(_, pos)| pos.to_string())
        } else {
            None
        };
        let jobs = rows
            .into_iter()
            .map(|(j, _)| kinds::typed(j))
            .collect::<Result<_, _>>()?;
        Ok((jobs, next))
    }

    /// Streams a job's events after `after_seq`: the recorded ones, then live ones, ending
    /// after the terminal event. Nothing is skipped or repeated.
    pub async fn watch(
        &self,
        id: JobId,
        after_seq: u64,
    ) -> Result<mpsc::Receiver<Result<Event, Error>>, Error> {
        // Subscribed before the state is read: what follows the state is in the subscription.
        let live = self.live(id);
        let events = live.as_ref().map(|l| l.events.subscribe());
        // A live job's state is in memory; reading the record back from the store only to
        // learn it cost a job attached by RunJob ~4 % of the daemon's CPU under load.
        let (ended, events) = match &live {
            Some(l) => (l.state.borrow().is_terminal(), events),
            None => {
                let record = self.get(id).await?;
                let ended = record.state.is_terminal();
                // Not running in this process: on another node (or stopping here). Its
                // events come from the ledger, through the job's one follower here.
                let followed = (!ended).then(|| self.follow(id, record.last_seq)).flatten();
                (ended, followed)
            }
        };
        let from_ledger = live.is_none();
        let live = events;
        let (tx, rx) = mpsc::channel(64);
        let store = self.shared.env.store.clone();
        tokio::spawn(async move {
            let mut last = after_seq;
            if replay(&store, id, &mut last, &tx).await {
                return;
            }
            if ended {
                return;
            }
            let Some(mut rx) = live else {
                return;
            };
            loop {
                tokio::select! {
                    r = rx.recv() => match r {
                        Ok(e) if e.seq <= last => {}
                        Ok(e) if e.seq == last + 1 => {
                            last = e.seq;
                            let end = e.body.is_terminal();
                            if tx.send(Ok(e)).await.is_err() || end {
                                return;
                            }
                        }
                        // A gap (lagged or out of order): the store has it all.
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                            if replay(&store, id, &mut last, &tx).await {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => {
                            // The job ended (its end is in the ledger); or the daemon is
                            // stopping, or the job's follower could not read the ledger for
                            // a minute.
                            if !replay(&store, id, &mut last, &tx).await {
                                let why = if from_ledger {
                                    format!("the events of job {id} could not be followed from the ledger (or the daemon is stopping); watch again")
                                } else {
                                    format!("the daemon is stopping before job {id} ended; watch again once it is back")
                                };
                                let _ = tx.send(Err(Error::Unavailable(why))).await;
                            }
                            return;
                        }
                    },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(rx)
    }

    /// A subscription to the follower of a job not live here (started if it has none), or
    /// None on a ledger nobody else writes. `seen` is the job's last event when it was read:
    /// a new follower reads from there (the watcher reads up to it itself).
    fn follow(&self, id: JobId, seen: u64) -> Option<broadcast::Receiver<Event>> {
        let notices = self.shared.env.store.notices()?;
        let mut map = self.shared.followed.lock().expect("followed lock");
        if let Some(tx) = map.get(&id) {
            return Some(tx.subscribe());
        }
        let (tx, rx) = broadcast::channel(256);
        map.insert(id, tx.clone());
        tokio::spawn(follower(self.shared.clone(), id, seen, notices, tx));
        Some(rx)
    }

    /// Cancels a job. With `wait`, returns once it has ended; otherwise once it has seen the
    /// cancel (CANCELLING, or already ended).
    pub async fn cancel(&self, id: JobId, reason: &str, wait: bool) -> Result<Job, Error> {
        let Some(live) = self.live(id) else {
            let record = self.get(id).await?;
            if !record.state.is_terminal() {
                // Another node's, or one of this node's it has not taken yet (submitted on
                // another node): recorded, and its node applies it when it takes the job.
                if record.node != self.shared.node.0 || self.untaken(id).await? {
                    return self.cancel_elsewhere(record, reason, wait).await;
                }
                return Err(Error::Unavailable(format!(
                    "job {id} is {} but not running in this daemon (it is stopping, or its recovery failed: see the daemon's log); cancel it again once it runs",
                    record.state.as_str()
                )));
            }
            return Err(Error::FailedPrecondition(format!(
                "job {id} has already ended {}; there is nothing to cancel{}",
                record.state.as_str(),
                if record.state == JobState::Succeeded {
                    " (RollbackJob undoes it)"
                } else {
                    ""
                }
            )));
        };
        let mut state = live.state.subscribe();
        let reason = if reason.trim().is_empty() {
            "cancelled by request".to_owned()
        } else {
            format!("cancelled: {}", reason.trim())
        };
        live.request_cancel(reason);
        let deadline = if wait {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs(5)
        };
        let seen = tokio::time::timeout(
            deadline,
            state.wait_for(|s| s.is_terminal() || (!wait && *s == JobState::Cancelling)),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        let record = self.get(id).await?;
        if seen && matches!(record.state, JobState::Succeeded | JobState::Failed) {
            return Err(Error::FailedPrecondition(format!(
                "job {id} ended {} before the cancel took effect",
                record.state.as_str()
            )));
        }
        Ok(record)
    }

    /// Whether a job of this node was submitted on another and is not yet taken here.
    async fn untaken(&self, id: JobId) -> Result<bool, Error> {
        Ok(self
            .shared
            .env
            .store
            .unplanned()
            .await?
            .iter()
            .any(|j| j.id == id))
    }

    /// Cancels a job of another node: the cancel is recorded in the ledger and signalled to
    /// its node, which cancels and unwinds it as a local cancel; returns as [`Engine::cancel`]
    /// once the ledger shows the job seeing it.
    async fn cancel_elsewhere(&self, record: Job, reason: &str, wait: bool) -> Result<Job, Error> {
        let store = &self.shared.env.store;
        let mut notices = store.notices();
        let id = record.id;
        let reason = if reason.trim().is_empty() {
            format!("cancelled by request (on node {})", self.shared.node.0)
        } else {
            format!(
                "cancelled on node {}: {}",
                self.shared.node.0,
                reason.trim()
            )
        };
        store
            .commit(
                vec![Write::CancelRequest {
                    job: id,
                    node: record.node.clone(),
                    reason,
                }],
                None,
            )
            .await?;
        let limit = if wait {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs(5)
        };
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let now = self.get(id).await?;
            if now.state.is_terminal() || (!wait && now.state == JobState::Cancelling) {
                if matches!(now.state, JobState::Succeeded | JobState::Failed) {
                    return Err(Error::FailedPrecondition(format!(
                        "job {id} ended {} before the cancel took effect",
                        now.state.as_str()
                    )));
                }
                return Ok(now);
            }
            let wake = async {
                match notices.as_mut() {
                    Some(n) => loop {
                        match n.recv().await {
                            Ok(crate::store::Notice::Events(ids)) if ids.contains(&id) => return,
                            Ok(crate::store::Notice::Events(_)) => {}
                            _ => return,
                        }
                    },
                    None => std::future::pending().await,
                }
            };
            // The backstop, should a notice be missed.
            if tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_secs(1)),
                wake,
            )
            .await
            .is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return Err(Error::Unavailable(format!(
                    "node {} has not taken the cancel of job {id} within {}s; it is recorded, and the node applies it when it reads the ledger again",
                    now.node,
                    limit.as_secs()
                )));
            }
        }
    }

    /// Starts a rollback of a finished job, after checking it can be undone and (unless
    /// `force`) that nothing changed what it left.
    pub async fn rollback(
        &self,
        id: JobId,
        force: bool,
        submitted_by: Option<String>,
    ) -> Result<Job, Error> {
        let _one_at_a_time = self.shared.rollbacks.lock().await;
        // NOT_FOUND as for any job id; the rest is the rollback's planning.
        let target = self.get(id).await?;
        let spec = JobSpec::Rollback(kinds::rollback::Spec { target: id, force });
        if target.node != self.shared.node.0 {
            // Its node undoes it: the journal's files are that node's.
            return self
                .enqueue_elsewhere(Submission {
                    spec,
                    request_id: None,
                    labels: BTreeMap::new(),
                    submitted_by,
                    node: Some(target.node),
                })
                .await;
        }
        let env = self.shared.env_now();
        let plan = kinds::plan(&spec, &env, Moment::Submission).await?;
        self.enqueue(
            Submission {
                spec,
                request_id: None,
                labels: BTreeMap::new(),
                submitted_by,
                node: None,
            },
            plan,
            env.config,
        )
        .await
    }

    /// Retries at once the unwind of a job that ended with undo entries left, or (`abandon`)
    /// gives those entries up; returns the job after that attempt.
    pub async fn unwind(&self, id: JobId, abandon: bool) -> Result<Job, Error> {
        let record = self.get(id).await?;
        if !record.unwind_incomplete {
            return Err(Error::FailedPrecondition(if record.state.is_terminal() {
                format!(
                    "job {id} ended {} with its unwind complete: there is nothing left to undo",
                    record.state.as_str()
                )
            } else {
                format!(
                    "job {id} is {}; CancelJob stops it and undoes what it did",
                    record.state.as_str()
                )
            }));
        }
        if record.node != self.shared.node.0 {
            return Err(Error::FailedPrecondition(format!(
                "job {id} is node {}'s: its unwind is retried there, and UnwindJob is asked of that node",
                record.node
            )));
        }
        let Some(live) = self.live(id) else {
            // It may have just completed.
            let now = self.get(id).await?;
            if !now.unwind_incomplete {
                return Ok(now);
            }
            return Err(Error::Unavailable(
                "the daemon is stopping; the unwind goes on after the restart".into(),
            ));
        };
        let mut served = live.unwind_served.subscribe();
        if abandon {
            live.abandon
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let asked = live
            .unwind_requested
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        live.unwind_now.notify_one();
        // One attempt is bounded by the undo entries' own timeouts (a reload waits 15 s).
        let _ =
            tokio::time::timeout(Duration::from_secs(120), served.wait_for(|n| *n >= asked)).await;
        self.get(id).await
    }

    /// Stops taking jobs, gives running ones `grace` to end, then flushes the store. Jobs still
    /// running are left RUNNING, to be unwound at the next start.
    pub async fn shutdown(&self, grace: Duration) {
        let s = &self.shared;
        s.env.stopping.cancel();
        s.tasks.close();
        let running: usize = s.live.lock().expect("live lock").len();
        if running > 0 {
            tracing::info!("waiting up to {grace:?} for {running} job(s)");
        }
        // Pending jobs never start now; they stay PENDING in the store and run after restart.
        if tokio::time::timeout(grace, s.tasks.wait()).await.is_err() {
            tracing::warn!("grace period over; unfinished jobs will be unwound at the next start");
        }
        s.env.store.close().await;
    }
}

/// Sends a job's stored events after `*last`; true once the terminal event was sent or the
/// client left.
/// Drops the finished jobs beyond the history limits, in small transactions each awaited
/// before the next: a backlog of tens of thousands of jobs (a first start with lower limits, a
/// burst) deleted in one held every job's commits for seconds.
async fn prune_history(store: &Store, h: &crate::config::History) -> Result<(), String> {
    /// Jobs chosen per search of the history (the search reads all of it), and dropped per
    /// transaction.
    const PRUNE_SEARCH: u32 = 10_000;
    const PRUNE_BATCH: usize = 200;
    loop {
        let ids = store
            .prunable(h.keep_per_resource, h.keep_total, PRUNE_SEARCH)
            .await
            .map_err(|e| e.to_string())?;
        for batch in ids.chunks(PRUNE_BATCH) {
            store
                .commit(vec![Write::Prune(batch.to_vec())], None)
                .await
                .map_err(|e| e.to_string())?;
        }
        if ids.len() < PRUNE_SEARCH as usize {
            return Ok(());
        }
    }
}

/// Follows a job of another node from the ledger for every watcher of it here: reads its
/// events after `last` at each notice naming it, at each resync of the listener and every
/// 30 s, and sends them to the watchers; ends at the job's end or when no watcher is left.
/// One read per commit of the job's node, however many watch it (1000 watchers of one job
/// cost one read each time, not 1000). While the ledger is away it reads again with backoff
/// (up to 60 s), and the watchers wait.
async fn follower(
    shared: Arc<Shared>,
    id: JobId,
    mut last: u64,
    mut notices: broadcast::Receiver<crate::store::Notice>,
    tx: broadcast::Sender<Event>,
) {
    let store = shared.env.store.clone();
    let stop = |shared: &Shared| {
        let mut map = shared.followed.lock().expect("followed lock");
        if map.get(&id).is_some_and(|t| t.same_channel(&tx)) {
            map.remove(&id);
        }
    };
    loop {
        let mut pause = Duration::from_millis(100);
        let gave_up = tokio::time::Instant::now() + Duration::from_secs(60);
        let events = loop {
            match store.events_after(id, last).await {
                Ok(events) => break events,
                Err(e)
                    if tokio::time::Instant::now() < gave_up
                        && !shared.env.stopping.is_cancelled() =>
                {
                    tracing::debug!(job = %id, "following from the ledger: {e}; again in {pause:?}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    // The watchers read the ledger themselves once this ends, and say why.
                    tracing::warn!(job = %id, "following from the ledger: {e}");
                    stop(&shared);
                    return;
                }
            }
        };
        for e in events {
            last = e.seq;
            let end = e.body.is_terminal();
            let _ = tx.send(e);
            if end {
                stop(&shared);
                return;
            }
        }
        let backstop = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            {
                // Under the map's lock: a watcher subscribes under it too.
                let mut map = shared.followed.lock().expect("followed lock");
                if tx.receiver_count() == 0 {
                    if map.get(&id).is_some_and(|t| t.same_channel(&tx)) {
                        map.remove(&id);
                    }
                    return;
                }
            }
            let wake = tokio::select! {
                n = notices.recv() => match n {
                    Ok(crate::store::Notice::Events(ids)) => ids.contains(&id),
                    Ok(crate::store::Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => true,
                    Ok(_) => false,
                    Err(broadcast::error::RecvError::Closed) => {
                        stop(&shared);
                        return;
                    }
                },
                _ = tokio::time::sleep_until(backstop) => true,
                // The daemon stopping: the watchers end, and are told to watch again.
                _ = shared.env.stopping.cancelled() => {
                    stop(&shared);
                    return;
                }
                // A watcher gone is seen here within a second.
                _ = tokio::time::sleep(Duration::from_secs(1)) => false,
            };
            if wake {
                break;
            }
        }
    }
}

/// A new job's record, PENDING with its first event to come, for `node`.
fn pending(sub: Submission, node: String, steps: Vec<StepRecord>, resources: Vec<String>) -> Job {
    JobRecord {
        id: JobId::new(),
        spec: sub.spec,
        state: JobState::Pending,
        steps,
        request_id: sub.request_id,
        labels: sub.labels,
        resources,
        waiting_for: Vec::new(),
        created_at: now_ms(),
        started_at: None,
        finished_at: None,
        error: None,
        failed_step: None,
        undo_entries: 0,
        rolled_back_by: None,
        last_seq: 1,
        unwind_incomplete: false,
        submitted_by: sub.submitted_by,
        node,
    }
}

/// Asks a live job of this node to cancel for the reason recorded; false if it is not live
/// here.
async fn cancel_here(s: &Arc<Shared>, job: JobId) -> bool {
    let Some(live) = s.live.lock().expect("live lock").get(&job).cloned() else {
        return false;
    };
    match s.env.store.cancel_requests().await {
        Ok(asked) => {
            if let Some((_, reason)) = asked.into_iter().find(|(j, _)| *j == job) {
                live.request_cancel(reason);
            }
        }
        Err(e) => tracing::warn!(job = %job, "reading a cancel: {e}"),
    }
    true
}

/// Takes the jobs other nodes submitted for this one, then applies the cancels recorded for
/// its jobs. The cancels are read first: a job cancelled before this node took it ends
/// CANCELLED without running.
async fn reconcile(s: &Arc<Shared>) -> Result<(), Error> {
    let cancels: BTreeMap<JobId, String> =
        s.env.store.cancel_requests().await?.into_iter().collect();
    for record in s.env.store.unplanned().await? {
        let cancelled = cancels.get(&record.id).cloned();
        runner::claim(s, record, cancelled).await;
    }
    for (job, reason) in cancels {
        let live = s.live.lock().expect("live lock").get(&job).cloned();
        if let Some(live) = live
            && !live.cancel.is_cancelled()
        {
            live.request_cancel(reason);
        }
    }
    Ok(())
}

async fn replay(
    store: &Store,
    id: JobId,
    last: &mut u64,
    tx: &mpsc::Sender<Result<Event, Error>>,
) -> bool {
    match read_after(store, id, last, tx).await {
        Err(e) => {
            let _ = tx.send(Err(e)).await;
            true
        }
        Ok(ended) => ended,
    }
}

/// Sends the job's recorded events after `last`; true once the stream is over (its terminal
/// event sent, or the watcher gone).
async fn read_after(
    store: &Store,
    id: JobId,
    last: &mut u64,
    tx: &mpsc::Sender<Result<Event, Error>>,
) -> Result<bool, Error> {
    for e in store.events_after(id, *last).await? {
        *last = e.seq;
        let end = e.body.is_terminal();
        if tx.send(Ok(e)).await.is_err() || end {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The stats sockets of the configured targets, by target.
fn stats_sockets(config: &Config) -> HashMap<String, std::path::PathBuf> {
    config
        .haproxy
        .iter()
        .filter_map(|t| t.stats_socket.clone().map(|s| (t.name.clone(), s)))
        .collect()
}

/// Removes the temp files interrupted writes left where statelyd writes on its own: beside
/// each target's configuration (candidates of `haproxy -c` too) and server-state file, in the
/// blob store, and in the certificate root. Temp files beside what a job changed are removed
/// when that job is recovered.
fn sweep_known_temps(config: &Config, blobs: &std::path::Path) -> Vec<std::path::PathBuf> {
    use crate::fsops::{sweep_temps, sweep_temps_beside};
    let mut swept = Vec::new();
    for t in &config.haproxy {
        for p in t.config.iter().chain(&t.server_state_file) {
            swept.extend(sweep_temps_beside(p, true));
        }
    }
    let root = config.cert_root();
    let mut dirs = vec![config.bundle_dir()];
    for parent in [
        blobs.to_owned(),
        root.join("live"),
        root.join("archive"),
        config.data_dir.join("acme"),
    ] {
        if let Ok(entries) = std::fs::read_dir(&parent) {
            dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
        dirs.push(parent);
    }
    for d in dirs {
        swept.extend(sweep_temps(&d, None, false));
    }
    swept
}

fn not_found(id: JobId) -> Error {
    Error::NotFound(format!(
        "no job {id} (it never existed, or the history limit pruned it)"
    ))
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), Error> {
    if labels.len() > 64 {
        return Err(Error::InvalidArgument("at most 64 labels".into()));
    }
    for (k, v) in labels {
        if k.is_empty()
            || k.len() > 63
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
        {
            return Err(Error::InvalidArgument(format!(
                "label key {}: 1 to 63 of letters, digits, '.', '_', '-', '/'",
                quote(k)
            )));
        }
        if v.len() > 256 {
            return Err(Error::InvalidArgument(format!(
                "label {}: the value is longer than 256 bytes",
                quote(k)
            )));
        }
        if v.contains(char::is_control) {
            return Err(Error::InvalidArgument(format!(
                "label {}: the value holds a control character",
                quote(k)
            )));
        }
    }
    Ok(())
}

/// The engine's state transitions, in process (no gRPC, no daemon binary).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::StepState;
    use crate::kinds::runbook;

    const RUNBOOKS: &str = r#"
[[runbook]]
name = "ok"
[[runbook.step]]
type = "check"
argv = ["true"]

[[runbook.step]]
type = "check"
argv = ["true"]

[[runbook]]
name = "fails"
[[runbook.step]]
type = "check"
argv = ["false"]

[[runbook]]
name = "slow"
[[runbook.step]]
type = "command"
argv = ["sleep", "30"]
"#;

    async fn engine() -> (Engine, CancellationToken, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::parse(RUNBOOKS, std::path::Path::new("test.toml")).unwrap();
        config.data_dir = dir.path().to_owned();
        let stop = CancellationToken::new();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let engine = Engine::start(Arc::new(config), &stop).await.unwrap();
        (engine, stop, dir)
    }

    fn run(name: &str) -> Submission {
        Submission {
            spec: JobSpec::Runbook(runbook::Spec {
                runbook: name.into(),
                params: Default::default(),
            }),
            request_id: None,
            labels: BTreeMap::new(),
            submitted_by: None,
            node: None,
        }
    }

    /// The states a job's events go through, until its terminal one.
    async fn states(engine: &Engine, id: JobId) -> Vec<JobState> {
        let mut rx = engine.watch(id, 0).await.unwrap();
        let mut out = Vec::new();
        while let Some(ev) = rx.recv().await {
            if let EventBody::State { to, .. } = ev.unwrap().body {
                out.push(to);
            }
        }
        out
    }

    #[tokio::test]
    async fn a_job_that_succeeds_goes_pending_running_succeeded() {
        let (engine, _stop, _dir) = engine().await;
        let job = engine.submit(run("ok")).await.unwrap();
        assert_eq!(job.state, JobState::Pending);
        assert_eq!(
            states(&engine, job.id).await,
            [JobState::Pending, JobState::Running, JobState::Succeeded]
        );
        let done = engine.get(job.id).await.unwrap();
        assert!(done.steps.iter().all(|s| s.state == StepState::Succeeded));
        assert!(done.finished_at.is_some() && done.error.is_none());
    }

    #[tokio::test]
    async fn a_failing_step_fails_the_job_and_names_the_step() {
        let (engine, _stop, _dir) = engine().await;
        let job = engine.submit(run("fails")).await.unwrap();
        assert_eq!(
            states(&engine, job.id).await,
            [JobState::Pending, JobState::Running, JobState::Failed]
        );
        let done = engine.get(job.id).await.unwrap();
        assert_eq!(done.failed_step.as_deref(), Some("check false"));
        assert_eq!(done.steps[0].state, StepState::Failed);
    }

    #[tokio::test]
    async fn a_cancel_of_a_running_job_goes_through_cancelling() {
        let (engine, _stop, _dir) = engine().await;
        let job = engine.submit(run("slow")).await.unwrap();
        let mut rx = engine.watch(job.id, 0).await.unwrap();
        // Wait for the step to start before cancelling.
        while let Some(ev) = rx.recv().await {
            if let EventBody::StepStarted { .. } = ev.unwrap().body {
                break;
            }
        }
        let cancelled = engine.cancel(job.id, "test", true).await.unwrap();
        assert_eq!(cancelled.state, JobState::Cancelled);
        assert_eq!(
            states(&engine, job.id).await,
            [
                JobState::Pending,
                JobState::Running,
                JobState::Cancelling,
                JobState::Cancelled
            ]
        );
        assert_eq!(cancelled.error.as_deref(), Some("cancelled: test"));
    }

    #[tokio::test]
    async fn a_job_waits_for_the_resource_an_earlier_job_holds() {
        let (engine, _stop, _dir) = engine().await;
        let first = engine.submit(run("slow")).await.unwrap();
        let second = engine.submit(run("slow")).await.unwrap();
        assert_eq!(second.waiting_for, ["runbook:slow"]);
        engine.cancel(first.id, "make way", true).await.unwrap();
        let mut rx = engine.watch(second.id, 0).await.unwrap();
        while let Some(ev) = rx.recv().await {
            if let EventBody::State {
                to: JobState::Running,
                ..
            } = ev.unwrap().body
            {
                break;
            }
        }
        engine.cancel(second.id, "done", true).await.unwrap();
    }

    #[tokio::test]
    async fn a_rollback_cannot_be_submitted_directly() {
        let (engine, _stop, _dir) = engine().await;
        let e = engine
            .submit(Submission {
                spec: JobSpec::Rollback(crate::kinds::rollback::Spec {
                    target: JobId::new(),
                    force: false,
                }),
                request_id: None,
                labels: BTreeMap::new(),
                submitted_by: None,
                node: None,
            })
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    }
}
