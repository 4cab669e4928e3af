//! The step API: what a kind of job gets while its steps run, and how a step ends badly. The
//! kinds import this module; the engine builds it. Nothing here knows the engine.
//!
//! The contract a kind keeps (certbot's `interfaces.py` says as much of its plugins):
//! - **Record before acting.** Before a step changes anything outside statelyd, it records
//!   the undo entry that reverses the change ([`StepCtx::record_undo`]); only once that returns
//!   may the change be made. A crash between the two leaves an entry whose undo is harmless
//!   (putting back what is already there).
//! - **Every change is undoable from its entry alone**: an unwind may run after a restart, in a
//!   process that never saw the step.
//! - **Cancellation is observed at await points** ([`StepCtx::until_cancel`], or a `select!`
//!   on [`StepCtx::cancelled`]). A step that returns `Ok` after its job was cancelled is kept —
//!   its critical section is done — and then unwound with the rest.
//! - **Re-entrant where it resumes.** Only kinds whose spec says they resume (watches) are
//!   carried on after a restart; their step must pick up from the state it stored, not redo it.

use crate::blobs::BlobStore;
use crate::command::Stream;
use crate::config::Config;
use crate::job::{EventBody, JobId, LogLevel};
use crate::journal::Journal;
use crate::store::{self, Store, Write};
use crate::undo::UndoEntry;
use std::path::Path;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Why a request was refused or failed, in the terms a caller can act on; the gRPC layer
/// gives each its status code, in one place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// What it names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request names something the daemon's configuration does not allow.
    #[error("{0}")]
    PermissionDenied(String),
    /// The request is valid but the job or the world is not in a state that allows it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request is larger than the daemon takes, or would exhaust it.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The idempotency key was used for a different request.
    #[error("{0}")]
    AlreadyExists(String),
    /// The daemon is shutting down, or what the request needs cannot be reached now.
    #[error("{0}")]
    Unavailable(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// A HAProxy target refused or could not do what was asked.
    #[error(transparent)]
    Haproxy(#[from] crate::haproxy::Error),
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

impl StepError {
    /// A step failure carrying `e`'s message.
    pub(crate) fn failed(e: impl std::fmt::Display) -> StepError {
        StepError::Failed(e.to_string())
    }
}

impl From<Error> for StepError {
    /// A planning error met when a job starts (the configuration changed since it was
    /// submitted, say): the job fails with the same message the submission would have got.
    fn from(e: Error) -> StepError {
        match e {
            Error::FailedPrecondition(m) | Error::NotFound(m) => StepError::Precondition(m),
            e => StepError::Failed(e.to_string()),
        }
    }
}

/// What the daemon lends every job: configuration and the services steps use. A job gets
/// the configuration current when it started and keeps it to its end, whatever a reload
/// brings meanwhile.
#[derive(Clone)]
pub(crate) struct Env {
    /// The configuration the daemon runs with.
    pub(crate) config: Arc<Config>,
    /// The ledger.
    pub(crate) store: Store,
    /// Backups of files steps change.
    pub(crate) blobs: BlobStore,
    /// For steps that fetch over HTTP.
    pub(crate) http: reqwest::Client,
    /// The shared stats pollers (the Stats API and alert watches subscribe to them).
    pub(crate) stats: Arc<crate::stats::StatsHub>,
    /// statelyd's HTTP-01 responder, when configured.
    pub(crate) responder: Option<Arc<crate::certs::responder::Responder>>,
    /// Cancelled when the daemon begins to stop: watch jobs suspend themselves (they stay
    /// RUNNING and resume at the next start).
    pub(crate) stopping: CancellationToken,
}

/// What a step gets to work with: its job's journal, a cancel token, and read-only access to
/// what the daemon lends.
pub(crate) struct StepCtx<'a> {
    index: u32,
    cancel: CancellationToken,
    journal: &'a mut Journal,
    env: &'a Env,
    irreversible: bool,
}

impl<'a> StepCtx<'a> {
    /// The context of step `index`, cancelled by `cancel` (the engine builds one per step).
    pub(crate) fn new(
        index: u32,
        cancel: CancellationToken,
        journal: &'a mut Journal,
        env: &'a Env,
    ) -> Self {
        StepCtx {
            index,
            cancel,
            journal,
            env,
            irreversible: false,
        }
    }

    /// Says the step has done what cannot be undone (a revocation the CA accepted): a cancel
    /// that arrives now does not make it a cancelled step — the job would then say it was
    /// stopped, when what it did stands. Later steps still see the cancel.
    pub(crate) fn done_irreversibly(&mut self) {
        self.irreversible = true;
    }

    /// Whether [`StepCtx::done_irreversibly`] was said.
    pub(crate) fn is_irreversible(&self) -> bool {
        self.irreversible
    }

    /// The step's index in its job.
    pub(crate) fn index(&self) -> u32 {
        self.index
    }

    /// The job this step belongs to.
    pub(crate) fn job(&self) -> JobId {
        self.journal.job
    }

    /// The configuration of the moment the job started.
    pub(crate) fn config(&self) -> &Config {
        &self.env.config
    }

    /// The ledger, to read what the job stored earlier.
    pub(crate) fn store(&self) -> &Store {
        &self.env.store
    }

    /// Where backups of changed files go.
    pub(crate) fn blobs(&self) -> &BlobStore {
        &self.env.blobs
    }

    /// The daemon's HTTP client.
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.env.http
    }

    /// The shared stats pollers.
    pub(crate) fn stats(&self) -> &Arc<crate::stats::StatsHub> {
        &self.env.stats
    }

    /// Cancelled when the daemon begins to stop (for steps that suspend: watches).
    pub(crate) fn stopping(&self) -> &CancellationToken {
        &self.env.stopping
    }

    /// The job's cancel token, for steps that `select!` on it themselves.
    pub(crate) fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Whether the job has been cancelled.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Waits until the job is cancelled.
    pub(crate) async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// Runs `f` unless the job is cancelled first.
    pub(crate) async fn until_cancel<T>(
        &self,
        f: impl std::future::Future<Output = T>,
    ) -> Result<T, StepError> {
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(StepError::Cancelled),
            v = f => Ok(v),
        }
    }

    /// A line in the job's log.
    pub(crate) fn log(&mut self, level: LogLevel, message: impl Into<String>) {
        self.journal.log(level, Some(self.index), message);
    }

    /// A line a command printed (stderr lines are warnings).
    pub(crate) fn output(&mut self, stream: Stream, line: String) {
        let level = if stream == Stream::Stderr {
            LogLevel::Warn
        } else {
            LogLevel::Info
        };
        self.journal.log(level, Some(self.index), line);
    }

    /// How far the step is: `done` of `total` units (0: unknown).
    pub(crate) fn progress(&mut self, done: u64, total: u64, message: impl Into<String>) {
        self.journal.emit(EventBody::Progress {
            step: self.index,
            done,
            total,
            message: message.into(),
        });
    }

    /// Makes an undo entry durable; only then may the change it reverses be made.
    pub(crate) async fn record_undo(&mut self, entry: UndoEntry) -> Result<(), StepError> {
        self.journal
            .record_undo(entry)
            .await
            .map_err(|e| StepError::Failed(format!("could not record the undo entry: {e}")))
    }

    /// The undo entry that puts `path` back as it is now (its content, mode and owner, or its
    /// absence), its content kept in the blob store. Not recorded: the caller records it.
    pub(crate) async fn snapshot(&self, path: &Path) -> Result<UndoEntry, StepError> {
        let (p, blobs) = (path.to_owned(), self.env.blobs.clone());
        tokio::task::spawn_blocking(move || UndoEntry::snapshot_file(&p, &blobs))
            .await
            .map_err(StepError::failed)?
            .map_err(|e| StepError::Failed(format!("{}: {e}", path.display())))
    }

    /// Writes `writes` with an event, and waits until they are durable.
    pub(crate) async fn commit(
        &mut self,
        body: EventBody,
        writes: Vec<Write>,
    ) -> Result<(), store::Error> {
        self.journal.commit(body, writes).await
    }

    /// Writes `writes` (with an event, if given), without waiting.
    pub(crate) fn write(&mut self, body: Option<EventBody>, writes: Vec<Write>) {
        self.journal.write(body, writes)
    }

    /// Notes that the step's command runs as process group `pgid` (for recovery after a
    /// crash).
    pub(crate) fn process_started(&self, pgid: i32) {
        self.journal.process_started(pgid)
    }

    /// Notes that the command of process group `pgid` has ended.
    pub(crate) fn process_ended(&self, pgid: i32) {
        self.journal.process_ended(pgid)
    }
}

/// An [`Env`] over a fresh data directory, for unit tests of planning and steps.
#[cfg(test)]
pub(crate) fn test_env(config: Config) -> (Env, tempfile::TempDir) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = config;
    config.data_dir = dir.path().to_owned();
    let env = Env {
        store: Store::open(&dir.path().join("stately.db"), false, "test").expect("store"),
        blobs: BlobStore::open(dir.path().join("blobs")).expect("blobs"),
        http: reqwest::Client::new(),
        stats: Arc::new(crate::stats::StatsHub::new(Default::default())),
        responder: None,
        stopping: CancellationToken::new(),
        config: Arc::new(config),
    };
    (env, dir)
}
