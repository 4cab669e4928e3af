//! The durable job ledger: jobs, their event logs and undo journals in SQLite (WAL).
//!
//! One writer thread owns the write connection and commits in groups: whatever writes are
//! queued when it wakes go into one transaction, so a thousand concurrent jobs cost one fsync
//! per round, not one each. Writes keep their submission order. Events are handed to live
//! watchers only after the commit that made them durable. Reads use their own connections.
//! The interface is narrow on purpose, so the ledger can move to a shared database later.

use crate::fsops::FileState;
use crate::job::{Event, JobId, JobProgress, JobRecord, JobState};
use crate::undo::{JournalEntry, UndoEntry};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use tokio::sync::{broadcast, oneshot};

mod pgtls;
mod postgres;
pub(crate) use postgres::Target as PostgresTarget;

/// The integration tests' PostgreSQL helper, shared with these unit tests.
#[cfg(test)]
#[path = "../tests/support/postgres.rs"]
#[allow(unreachable_pub, dead_code)]
mod pg_support;

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SQLite failed.
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The writer thread has stopped (the daemon is going down).
    #[error("store: the writer has stopped")]
    Closed,
    /// A write failed in the writer thread.
    #[error("store: {0}")]
    Write(String),
    /// A stored row could not be read back.
    #[error("store: corrupt row: {0}")]
    Corrupt(String),
    /// PostgreSQL failed or cannot be reached.
    #[error("store: {0}")]
    Postgres(String),
    /// `[store]` names something that is not there (a password file).
    #[error("store: {0}")]
    Config(String),
    /// The ledger was written by a newer statelyd.
    #[error(
        "store: the ledger at {at} has schema version {found}; this statelyd knows up to {known}: upgrade statelyd"
    )]
    SchemaTooNew {
        /// Which ledger.
        at: String,
        /// Its version.
        found: u32,
        /// The newest this binary knows.
        known: u32,
    },
}

/// A job as the ledger keeps it.
pub(crate) type StoredJob = JobRecord<StoredSpec>;

/// A job's spec as the ledger keeps it: JSON the store does not read, with the two things it
/// indexes (the kind's name, and the job a rollback undoes).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StoredSpec {
    pub(crate) kind: String,
    pub(crate) json: String,
    pub(crate) rollback_of: Option<JobId>,
}

/// One change to the ledger.
#[derive(Debug, Clone)]
pub(crate) enum Write {
    /// A new job.
    InsertJob(StoredJob),
    /// A job's new state (everything but who rolled it back).
    UpdateJob(JobProgress),
    /// An event, appended to its job's log.
    Event(Event),
    /// An undo entry, at its index in the job's journal.
    Undo {
        job: JobId,
        idx: u32,
        entry: UndoEntry,
    },
    /// An entry has been applied.
    UndoApplied { job: JobId, idx: u32 },
    /// An entry that could not be applied was given up by an operator (stored as applied = 2).
    UndoAbandoned { job: JobId, idx: u32 },
    /// The state the job left an entry's file in.
    Seal {
        job: JobId,
        idx: u32,
        left: FileState,
    },
    /// Who rolled a job back (None when that rollback was itself undone).
    RolledBackBy { job: JobId, by: Option<JobId> },
    /// Drops these finished jobs (chosen by [`Store::prunable`]) with their events, undo
    /// entries and the rest; one still running or whose unwind is incomplete is kept.
    Prune(Vec<JobId>),
    /// A step's command is running as this process group (leader start time in ticks).
    ProcessStarted { job: JobId, pgid: i32, started: u64 },
    /// That command has ended.
    ProcessEnded { job: JobId, pgid: i32 },
    /// A message queued for delivery (before any attempt to send it).
    OutboxAdd {
        job: JobId,
        n: u64,
        at: i64,
        mail: crate::alerts::Mail,
    },
    /// A delivery attempt failed and will be retried.
    OutboxAttempt {
        job: JobId,
        n: u64,
        attempts: u32,
        error: String,
    },
    /// A message was delivered (`error` None) or given up on.
    OutboxDone {
        job: JobId,
        n: u64,
        attempts: u32,
        at: i64,
        error: Option<String>,
    },
    /// A watch job's remembered state (JSON), kept across restarts.
    WatchState { job: JobId, state: String },
    /// What a job submitted on another node touches, once its node has planned it.
    Resources { job: JobId, resources: Vec<String> },
    /// A cancel asked on one node for a job of another (a shared ledger only): recorded, and
    /// signalled to that node.
    CancelRequest {
        job: JobId,
        node: String,
        reason: String,
    },
}

/// What another node wrote that this one may have to act on (a shared ledger only).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Notice {
    /// A job was submitted for `node`.
    Submitted { job: JobId, node: String },
    /// A cancel of a job of `node` was recorded.
    Cancel { job: JobId, node: String },
    /// These jobs have new events.
    Events(Vec<JobId>),
    /// The listener (re)connected: notices may have been missed; read the ledger again.
    Resync,
}

/// A message of a job's outbox.
#[derive(Debug, Clone)]
pub(crate) struct OutboxEntry {
    pub(crate) n: u64,
    pub(crate) mail: crate::alerts::Mail,
    pub(crate) attempts: u32,
    pub(crate) state: String,
}

struct Batch {
    writes: Vec<Write>,
    publish: Option<broadcast::Sender<Event>>,
    ack: Option<oneshot::Sender<Result<(), String>>>,
}

/// A cheap-clone handle on the ledger.
#[derive(Clone)]
pub(crate) struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// What logs and GetStatus show (a file, or PostgreSQL's host and database).
    describe: String,
    tx: Mutex<Option<Tx>>,
    backend: Backend,
    writer: Mutex<Option<WriterHandle>>,
    /// Says why, once the ledger has been lost to another statelyd (PostgreSQL).
    lost: Arc<tokio::sync::watch::Sender<Option<String>>>,
    /// This node's name: the node of every job on a SQLite ledger.
    node: String,
}

/// A statelyd on the ledger, as ListNodes shows it.
#[derive(Debug, Clone)]
pub(crate) struct NodeRow {
    pub(crate) name: String,
    pub(crate) epoch: u64,
    /// Milliseconds since the epoch, on the database's clock.
    pub(crate) started_at: i64,
    pub(crate) heartbeat_at: i64,
    /// Milliseconds since the last heartbeat, on the database's clock.
    pub(crate) heartbeat_age_ms: i64,
    pub(crate) up: bool,
    pub(crate) version: String,
}

/// Where the ledger is, and how it is read.
enum Backend {
    Sqlite {
        path: PathBuf,
        readers: Mutex<Vec<Connection>>,
    },
    Postgres(postgres::Ledger),
}

/// The writer's queue: a thread's (SQLite) or a task's (PostgreSQL).
enum Tx {
    Thread(mpsc::Sender<Batch>),
    Task(tokio::sync::mpsc::UnboundedSender<Batch>),
}

enum WriterHandle {
    Thread(std::thread::JoinHandle<()>),
    Task(tokio::task::JoinHandle<()>),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("at", &self.inner.describe)
            .finish()
    }
}

/// Reads on PostgreSQL go to its ledger; the rest of the method is SQLite's.
macro_rules! on_postgres {
    ($self:ident . $m:ident ( $($a:expr),* )) => {
        if let Backend::Postgres(p) = &$self.inner.backend {
            // Boxed: the PostgreSQL future does not enlarge every SQLite caller's.
            return Box::pin(p.$m($($a),*)).await;
        }
    };
}

/// What ListJobs asks for.
#[derive(Debug, Default, Clone)]
pub(crate) struct JobFilter {
    pub(crate) states: Vec<JobState>,
    pub(crate) kind: Option<String>,
    pub(crate) labels: Vec<(String, String)>,
    /// Only jobs older than this position (the page token).
    pub(crate) before: Option<i64>,
    pub(crate) limit: u32,
    /// Only this node's jobs.
    pub(crate) node: Option<String>,
    /// Not the jobs submitted elsewhere that their node has yet to plan.
    pub(crate) planned_only: bool,
}

impl Error {
    /// Whether the configuration is at fault rather than the moment.
    pub(crate) fn is_configuration(&self) -> bool {
        matches!(self, Error::Config(_) | Error::SchemaTooNew { .. })
    }
}

/// The SQLite ledger's schema version (`PRAGMA user_version`; ledgers from before versioning
/// are 0 and are brought up by `migrate`).
const SQLITE_VERSION: u32 = 1;

/// How long closing waits for PostgreSQL to take the queued writes.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Read connections kept open between reads.
const MAX_IDLE_READERS: usize = 4;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    steps TEXT NOT NULL,
    request_id TEXT UNIQUE,
    labels TEXT NOT NULL,
    resources TEXT NOT NULL,
    waiting_for TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    error TEXT,
    failed_step TEXT,
    rolled_back_by TEXT,
    rollback_of TEXT,
    unwind_incomplete INTEGER NOT NULL DEFAULT 0,
    submitted_by TEXT
);
DROP INDEX IF EXISTS jobs_state;
CREATE INDEX IF NOT EXISTS jobs_state_kind ON jobs(state, kind);
CREATE INDEX IF NOT EXISTS jobs_unwind_incomplete ON jobs(pos) WHERE unwind_incomplete != 0;
CREATE INDEX IF NOT EXISTS jobs_rollback_of ON jobs(rollback_of);
CREATE TABLE IF NOT EXISTS job_resources (
    resource TEXT NOT NULL, job_id TEXT NOT NULL, PRIMARY KEY (resource, job_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL, seq INTEGER NOT NULL, at INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS processes (
    job_id TEXT NOT NULL, pgid INTEGER NOT NULL, started INTEGER NOT NULL,
    PRIMARY KEY (job_id, pgid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS undo (
    job_id TEXT NOT NULL, idx INTEGER NOT NULL, entry TEXT NOT NULL, blob TEXT,
    applied INTEGER NOT NULL DEFAULT 0, left_state TEXT,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    job_id TEXT NOT NULL, n INTEGER NOT NULL, created_at INTEGER NOT NULL, mail TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT, done_at INTEGER,
    PRIMARY KEY (job_id, n)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS watch_state (
    job_id TEXT PRIMARY KEY, state TEXT NOT NULL
) WITHOUT ROWID;
";

// The undo count and the last sequence number are derived, never stored twice.
const JOB_COLUMNS: &str = "id, spec, state, steps, request_id, labels, resources, waiting_for, created_at, \
     started_at, finished_at, error, failed_step, \
     (SELECT COUNT(*) FROM undo u WHERE u.job_id = jobs.id), rolled_back_by, \
     (SELECT COALESCE(MAX(seq), 0) FROM events e WHERE e.job_id = jobs.id), pos, unwind_incomplete, \
     kind, rollback_of, submitted_by";

impl Store {
    /// Opens (creating if needed) the ledger at `path` and starts its writer.
    pub(crate) fn open(path: &Path, sync_full: bool, node: &str) -> Result<Store, Error> {
        // The ledger holds job history and configurations: owner only. SQLite gives its -wal
        // and -shm files the database file's mode; older ones are corrected here too.
        for p in [
            path.to_owned(),
            path.with_extension("db-wal"),
            path.with_extension("db-shm"),
        ] {
            if p == path || p.exists() {
                crate::fsops::make_private_file(&p)
                    .map_err(|e| Error::Write(format!("{}: {e}", p.display())))?;
            }
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(
            None,
            "synchronous",
            if sync_full { "FULL" } else { "NORMAL" },
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Small page caches: the working set is the newest jobs, and an idle daemon stays small.
        conn.pragma_update(None, "cache_size", -1024)?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        let version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SQLITE_VERSION {
            return Err(Error::SchemaTooNew {
                at: path.display().to_string(),
                found: version,
                known: SQLITE_VERSION,
            });
        }
        conn.pragma_update(None, "user_version", SQLITE_VERSION)?;
        conn.set_prepared_statement_cache_capacity(64);
        let (tx, rx) = mpsc::channel::<Batch>();
        let writer = std::thread::Builder::new()
            .name("stately-store".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| Error::Write(e.to_string()))?;
        Ok(Store {
            inner: Arc::new(Inner {
                describe: path.display().to_string(),
                tx: Mutex::new(Some(Tx::Thread(tx))),
                backend: Backend::Sqlite {
                    path: path.to_owned(),
                    readers: Mutex::new(Vec::new()),
                },
                writer: Mutex::new(Some(WriterHandle::Thread(writer))),
                // A file is never taken by another daemon.
                lost: Arc::new(tokio::sync::watch::channel(None).0),
                node: node.to_owned(),
            }),
        })
    }

    /// Opens the ledger on PostgreSQL: its schema brought up to this version, the one-node
    /// lock taken, its writer started.
    pub(crate) async fn open_postgres(target: PostgresTarget) -> Result<Store, Error> {
        let (describe, node) = (target.describe.clone(), target.node.clone());
        let (ledger, tx, writer, lost) = postgres::open(target).await?;
        Ok(Store {
            inner: Arc::new(Inner {
                describe,
                tx: Mutex::new(Some(Tx::Task(tx))),
                backend: Backend::Postgres(ledger),
                writer: Mutex::new(Some(WriterHandle::Task(writer))),
                lost,
                node,
            }),
        })
    }

    /// Resolves, saying why, if the ledger is taken by another statelyd: this one writes
    /// nothing more and must stop. Never resolves for a SQLite ledger.
    pub(crate) async fn lost(&self) -> String {
        let mut rx = self.inner.lost.subscribe();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Says the ledger is lost to another statelyd: `lost()` resolves, and the daemon stops.
    pub(crate) fn fence(&self, why: String) {
        let _ = self.inner.lost.send(Some(why));
    }

    /// Joins the ledger as node `name`, with a new epoch (1 on SQLite, where the node is
    /// alone).
    pub(crate) async fn join(&self, name: &str) -> Result<u64, Error> {
        on_postgres!(self.join(name));
        Ok(1)
    }

    /// A heartbeat of the node's epoch: false once a later start has taken the name.
    pub(crate) async fn heartbeat(&self, name: &str, epoch: u64) -> Result<bool, Error> {
        on_postgres!(self.heartbeat(name, epoch));
        Ok(true)
    }

    /// The nodes of the ledger (None on SQLite: the answering node alone, in memory).
    pub(crate) async fn nodes(&self) -> Result<Option<Vec<NodeRow>>, Error> {
        if let Backend::Postgres(p) = &self.inner.backend {
            return Box::pin(p.nodes()).await.map(Some);
        }
        Ok(None)
    }

    /// This node's jobs submitted on other nodes and not yet planned here, oldest first.
    pub(crate) async fn unplanned(&self) -> Result<Vec<StoredJob>, Error> {
        if let Backend::Postgres(p) = &self.inner.backend {
            return Box::pin(p.unplanned()).await;
        }
        Ok(Vec::new())
    }

    /// Cancels recorded for this node's jobs that have not ended: (job, reason).
    pub(crate) async fn cancel_requests(&self) -> Result<Vec<(JobId, String)>, Error> {
        if let Backend::Postgres(p) = &self.inner.backend {
            return Box::pin(p.cancel_requests()).await;
        }
        Ok(Vec::new())
    }

    /// What other nodes wrote that may concern this one (None on SQLite: nobody else writes).
    pub(crate) fn notices(&self) -> Option<broadcast::Receiver<Notice>> {
        match &self.inner.backend {
            Backend::Postgres(p) => Some(p.notices()),
            Backend::Sqlite { .. } => None,
        }
    }

    /// Whether the ledger is shared (PostgreSQL) rather than this node's file.
    pub(crate) fn is_shared(&self) -> bool {
        matches!(self.inner.backend, Backend::Postgres(_))
    }

    /// Where the ledger is: its file, or PostgreSQL's host, port and database.
    pub(crate) fn describe(&self) -> &str {
        &self.inner.describe
    }

    fn send(&self, batch: Batch) -> Result<(), Error> {
        let tx = self.inner.tx.lock().expect("store lock");
        match tx.as_ref().ok_or(Error::Closed)? {
            Tx::Thread(t) => t.send(batch).map_err(|_| Error::Closed),
            Tx::Task(t) => t.send(batch).map_err(|_| Error::Closed),
        }
    }

    /// Queues writes, in order, without waiting for them to be durable. Events among them go
    /// to `publish` once committed.
    pub(crate) fn write(&self, writes: Vec<Write>, publish: Option<&broadcast::Sender<Event>>) {
        if let Err(e) = self.send(Batch {
            writes,
            publish: publish.cloned(),
            ack: None,
        }) {
            tracing::error!("{e}: a write was dropped");
        }
    }

    /// Writes and waits until they are durable (and their events published).
    pub(crate) async fn commit(
        &self,
        writes: Vec<Write>,
        publish: Option<&broadcast::Sender<Event>>,
    ) -> Result<(), Error> {
        let (ack, done) = oneshot::channel();
        self.send(Batch {
            writes,
            publish: publish.cloned(),
            ack: Some(ack),
        })?;
        done.await.map_err(|_| Error::Closed)?.map_err(Error::Write)
    }

    /// Waits for every queued write, then stops the writer.
    pub(crate) async fn close(&self) {
        let flushed = self.commit(Vec::new(), None);
        if matches!(self.inner.backend, Backend::Postgres(_)) {
            // A database that is away holds the writes; shutting down does not wait for ever.
            if tokio::time::timeout(CLOSE_WAIT, flushed).await.is_err() {
                tracing::error!(
                    "store: {} did not take the last writes within {CLOSE_WAIT:?}; they are lost, and the jobs they belong to are unwound at the next start",
                    self.inner.describe
                );
            }
        } else {
            let _ = flushed.await;
        }
        self.inner.tx.lock().expect("store lock").take();
        let writer = self.inner.writer.lock().expect("store lock").take();
        match writer {
            Some(WriterHandle::Thread(w)) => {
                let _ = tokio::task::spawn_blocking(move || w.join()).await;
            }
            Some(WriterHandle::Task(w)) => w.abort(),
            None => {}
        }
    }

    /// Runs a long read on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| Error::Write(format!("a read stopped: {e}")))?
    }

    /// A job read from SQLite, on this node (the file is the node's own).
    fn here(&self, mut job: StoredJob) -> StoredJob {
        job.node.clone_from(&self.inner.node);
        job
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, Error>) -> Result<T, Error> {
        let Backend::Sqlite { path, readers } = &self.inner.backend else {
            unreachable!("PostgreSQL reads return before a SQLite read");
        };
        let conn = readers.lock().expect("store lock").pop();
        let conn = match conn {
            Some(c) => c,
            None => {
                let c = Connection::open(path)?;
                c.busy_timeout(std::time::Duration::from_secs(5))?;
                c.pragma_update(None, "cache_size", -256)?;
                c
            }
        };
        let out = f(&conn);
        // Keep a few connections warm; a burst's extra ones are closed, so memory goes back
        // down when the daemon is idle again.
        let mut pool = readers.lock().expect("store lock");
        if pool.len() < MAX_IDLE_READERS {
            pool.push(conn);
        }
        out
    }

    /// Up to `max` finished jobs beyond the history limits, oldest first: chosen on a read
    /// connection, so the writer (and every job waiting on a commit) is not held while a long
    /// history is searched.
    pub(crate) async fn prunable(
        &self,
        keep_per_resource: u32,
        keep_total: u32,
        max: u32,
    ) -> Result<Vec<JobId>, Error> {
        on_postgres!(self.prunable(keep_per_resource, keep_total, max));
        // The search reads the whole history: off the runtime's threads.
        self.blocking(move |me| me.prunable_now(keep_per_resource, keep_total, max))
            .await
    }

    fn prunable_now(
        &self,
        keep_per_resource: u32,
        keep_total: u32,
        max: u32,
    ) -> Result<Vec<JobId>, Error> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(PRUNABLE)?;
            let ids = stmt
                .query_map(params![keep_per_resource, keep_total, max], |r| {
                    r.get::<_, String>(0)
                })?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            ids.iter()
                .map(|s| s.parse().map_err(Error::Corrupt))
                .collect()
        })
    }

    /// One job.
    pub(crate) async fn job(&self, id: JobId) -> Result<Option<StoredJob>, Error> {
        on_postgres!(self.job(id));
        self.read(|c| {
            c.prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))?
                .query_row([id.to_string()], row_to_job)
                .optional()?
                .map(|r| r.map(|(job, _)| self.here(job)))
                .transpose()
        })
    }

    /// The job created with this idempotency key.
    pub(crate) async fn job_by_request_id(
        &self,
        request_id: &str,
    ) -> Result<Option<StoredJob>, Error> {
        on_postgres!(self.job_by_request_id(request_id));
        self.read(|c| {
            c.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE request_id = ?1"
            ))?
            .query_row([request_id], row_to_job)
            .optional()?
            .map(|r| r.map(|(job, _)| self.here(job)))
            .transpose()
        })
    }

    /// This node's jobs that ended with undo entries left to apply.
    pub(crate) async fn jobs_unwind_incomplete(&self) -> Result<Vec<StoredJob>, Error> {
        on_postgres!(self.jobs_unwind_incomplete());
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs INDEXED BY jobs_unwind_incomplete WHERE unwind_incomplete != 0 ORDER BY pos"
            ))?;
            let rows = stmt.query_map([], row_to_job)?;
            let mut out = Vec::new();
            for r in rows {
                out.push(self.here(r??.0));
            }
            Ok(out)
        })
    }

    /// This node's jobs in these states, oldest first (for recovery at start-up).
    pub(crate) async fn jobs_in(&self, states: &[JobState]) -> Result<Vec<StoredJob>, Error> {
        let filter = JobFilter {
            states: states.to_vec(),
            limit: u32::MAX,
            node: Some(self.inner.node.clone()),
            planned_only: true,
            ..Default::default()
        };
        let mut jobs: Vec<StoredJob> = self
            .list(&filter)
            .await?
            .into_iter()
            .map(|(j, _)| j)
            .collect();
        jobs.reverse();
        Ok(jobs)
    }

    /// Rollback jobs of `target` that have not ended (and are planned: one submitted on
    /// another node is counted once its node has planned it).
    pub(crate) async fn active_rollbacks_of(&self, target: JobId) -> Result<Vec<JobId>, Error> {
        on_postgres!(self.active_rollbacks_of(target));
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id FROM jobs WHERE rollback_of = ?1 AND state IN ('PENDING','RUNNING','CANCELLING')",
            )?;
            let ids = stmt
                .query_map([target.to_string()], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            ids.into_iter().map(|s| s.parse().map_err(Error::Corrupt)).collect()
        })
    }

    /// Jobs matching the filter, newest first, each with its position (for page tokens).
    pub(crate) async fn list(&self, f: &JobFilter) -> Result<Vec<(StoredJob, i64)>, Error> {
        on_postgres!(self.list(f));
        if f.node.as_ref().is_some_and(|n| *n != self.inner.node) {
            return Ok(Vec::new());
        }
        let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE 1=1");
        let mut args: Vec<Value> = Vec::new();
        if !f.states.is_empty() {
            sql.push_str(" AND state IN (");
            for (i, s) in f.states.iter().enumerate() {
                sql.push_str(if i == 0 { "?" } else { ",?" });
                args.push(Value::Text(s.as_str().to_owned()));
            }
            sql.push(')');
        }
        if let Some(kind) = &f.kind {
            sql.push_str(" AND kind = ?");
            args.push(Value::Text(kind.clone()));
        }
        for (k, v) in &f.labels {
            sql.push_str(
                " AND EXISTS (SELECT 1 FROM json_each(jobs.labels) WHERE key = ? AND value = ?)",
            );
            args.push(Value::Text(k.clone()));
            args.push(Value::Text(v.clone()));
        }
        if let Some(before) = f.before {
            sql.push_str(" AND pos < ?");
            args.push(Value::Integer(before));
        }
        sql.push_str(" ORDER BY pos DESC LIMIT ?");
        args.push(Value::Integer(i64::from(f.limit.min(i64::MAX as u32))));
        self.read(|c| {
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args), row_to_job)?;
            rows.map(|r| {
                r.map_err(Error::from)
                    .and_then(|x| x)
                    .map(|(j, pos)| (self.here(j), pos))
            })
            .collect()
        })
    }

    /// A job's events with seq > `after`, in order.
    pub(crate) async fn events_after(&self, job: JobId, after: u64) -> Result<Vec<Event>, Error> {
        on_postgres!(self.events_after(job, after));
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT body FROM events WHERE job_id = ?1 AND seq > ?2 ORDER BY seq",
            )?;
            // Sequence numbers past i64::MAX do not exist: nothing comes after them.
            let after = i64::try_from(after).unwrap_or(i64::MAX);
            let rows =
                stmt.query_map(params![job.to_string(), after], |r| r.get::<_, String>(0))?;
            rows.map(|r| {
                let body = r?;
                serde_json::from_str(&body).map_err(|e| Error::Corrupt(e.to_string()))
            })
            .collect()
        })
    }

    /// Alert mails queued and not yet delivered, over every watch.
    /// How many jobs there are of each kind in each state (for the metrics).
    pub(crate) async fn job_counts(&self) -> Result<Vec<(String, String, u64)>, Error> {
        on_postgres!(self.job_counts());
        self.read(|c| {
            let mut stmt =
                // Read from the (state, kind) index alone: a scrape at 10,000 jobs reads no row.
                c.prepare_cached("SELECT kind, state, COUNT(*) FROM jobs GROUP BY state, kind")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)? as u64,
                ))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// How many jobs' unwinds could not finish (from a partial index: no row is read).
    pub(crate) async fn unwind_incomplete_count(&self) -> Result<u64, Error> {
        on_postgres!(self.unwind_incomplete_count());
        self.read(|c| {
            Ok(
                c.prepare_cached("SELECT COUNT(*) FROM jobs WHERE unwind_incomplete != 0")?
                    .query_row([], |r| r.get::<_, i64>(0))? as u64,
            )
        })
    }

    pub(crate) async fn outbox_pending(&self) -> Result<u64, Error> {
        on_postgres!(self.outbox_pending());
        self.read(|c| {
            Ok(
                c.prepare_cached("SELECT COUNT(*) FROM outbox WHERE state = 'pending'")?
                    .query_row([], |r| r.get::<_, i64>(0))? as u64,
            )
        })
    }

    /// When the oldest undelivered alert mail was queued (ms since the epoch), if any.
    pub(crate) async fn outbox_oldest(&self) -> Result<Option<i64>, Error> {
        on_postgres!(self.outbox_oldest());
        self.read(|c| {
            Ok(
                c.prepare_cached("SELECT MIN(created_at) FROM outbox WHERE state = 'pending'")?
                    .query_row([], |r| r.get::<_, Option<i64>>(0))?,
            )
        })
    }

    /// A job's undo journal, in the order it was recorded.
    pub(crate) async fn journal(&self, job: JobId) -> Result<Vec<JournalEntry>, Error> {
        on_postgres!(self.journal(job));
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT idx, entry, applied, left_state FROM undo WHERE job_id = ?1 ORDER BY idx",
            )?;
            let rows = stmt.query_map([job.to_string()], |r| {
                Ok((
                    r.get::<_, u32>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, bool>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            })?;
            rows.map(|r| {
                let (idx, entry, applied, left) = r?;
                let corrupt = |e: serde_json::Error| Error::Corrupt(e.to_string());
                Ok(JournalEntry {
                    idx,
                    entry: serde_json::from_str(&entry).map_err(corrupt)?,
                    applied,
                    left: left
                        .map(|l| serde_json::from_str(&l))
                        .transpose()
                        .map_err(corrupt)?,
                })
            })
            .collect()
        })
    }

    /// Commands of a job still recorded as running: (process group, leader start time).
    pub(crate) async fn processes(&self, job: JobId) -> Result<Vec<(i32, u64)>, Error> {
        on_postgres!(self.processes(job));
        self.read(|c| {
            let mut stmt =
                c.prepare_cached("SELECT pgid, started FROM processes WHERE job_id = ?1")?;
            let rows = stmt.query_map([job.to_string()], |r| {
                Ok((r.get::<_, i32>(0)?, r.get::<_, i64>(1)? as u64))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// A job's undelivered mails, oldest first.
    pub(crate) async fn outbox(&self, job: JobId) -> Result<Vec<OutboxEntry>, Error> {
        on_postgres!(self.outbox(job));
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT n, mail, attempts, state FROM outbox WHERE job_id = ?1 AND state = 'pending' ORDER BY n",
            )?;
            let rows = stmt.query_map([job.to_string()], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?;
            rows.map(|r| {
                let (n, mail, attempts, state) = r?;
                Ok(OutboxEntry {
                    n: n as u64,
                    mail: serde_json::from_str(&mail).map_err(|e| Error::Corrupt(e.to_string()))?,
                    attempts,
                    state,
                })
            })
            .collect()
        })
    }

    /// A watch job's remembered state.
    pub(crate) async fn watch_state(&self, job: JobId) -> Result<Option<String>, Error> {
        on_postgres!(self.watch_state(job));
        self.read(|c| {
            Ok(
                c.prepare_cached("SELECT state FROM watch_state WHERE job_id = ?1")?
                    .query_row([job.to_string()], |r| r.get(0))
                    .optional()?,
            )
        })
    }

    /// Every blob an undo entry still references.
    pub(crate) async fn referenced_blobs(&self) -> Result<HashSet<String>, Error> {
        on_postgres!(self.referenced_blobs());
        // Every undo entry of the history: off the runtime's threads.
        self.blocking(|me| me.referenced_blobs_now()).await
    }

    fn referenced_blobs_now(&self) -> Result<HashSet<String>, Error> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached("SELECT DISTINCT blob FROM undo WHERE blob IS NOT NULL")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            Ok(rows.collect::<Result<HashSet<_>, _>>()?)
        })
    }
}

type JobRow = Result<(StoredJob, i64), Error>;

fn row_to_job(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobColumns {
        id: r.get(0)?,
        spec: r.get(1)?,
        state: r.get(2)?,
        steps: r.get(3)?,
        request_id: r.get(4)?,
        labels: r.get(5)?,
        resources: r.get(6)?,
        waiting_for: r.get(7)?,
        created_at: r.get(8)?,
        started_at: r.get(9)?,
        finished_at: r.get(10)?,
        error: r.get(11)?,
        failed_step: r.get(12)?,
        undo_entries: r.get(13)?,
        rolled_back_by: r.get(14)?,
        last_seq: r.get(15)?,
        pos: r.get(16)?,
        unwind_incomplete: r.get(17)?,
        kind: r.get(18)?,
        rollback_of: r.get(19)?,
        submitted_by: r.get(20)?,
        // The store's node, set by the caller (`Store::here`).
        node: String::new(),
    }
    .build())
}

/// A job row's columns as both ledgers read them (in `JOB_COLUMNS` order).
struct JobColumns {
    id: String,
    spec: String,
    state: String,
    steps: String,
    request_id: Option<String>,
    labels: String,
    resources: String,
    waiting_for: String,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    error: Option<String>,
    failed_step: Option<String>,
    undo_entries: u32,
    rolled_back_by: Option<String>,
    last_seq: i64,
    pos: i64,
    unwind_incomplete: bool,
    kind: String,
    rollback_of: Option<String>,
    submitted_by: Option<String>,
    node: String,
}

impl JobColumns {
    /// The job, and its position (for page tokens).
    fn build(self) -> Result<(StoredJob, i64), Error> {
        let corrupt =
            |what: &str, e: &dyn std::fmt::Display| Error::Corrupt(format!("{what}: {e}"));
        let job = JobRecord {
            id: self.id.parse().map_err(|e: String| corrupt("id", &e))?,
            spec: StoredSpec {
                kind: self.kind,
                json: self.spec,
                rollback_of: self
                    .rollback_of
                    .map(|s| s.parse())
                    .transpose()
                    .map_err(|e: String| corrupt("rollback_of", &e))?,
            },
            state: JobState::parse(&self.state).ok_or_else(|| corrupt("state", &self.state))?,
            steps: serde_json::from_str(&self.steps).map_err(|e| corrupt("steps", &e))?,
            request_id: self.request_id,
            labels: serde_json::from_str(&self.labels).map_err(|e| corrupt("labels", &e))?,
            resources: serde_json::from_str(&self.resources)
                .map_err(|e| corrupt("resources", &e))?,
            waiting_for: serde_json::from_str(&self.waiting_for)
                .map_err(|e| corrupt("waiting_for", &e))?,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            error: self.error,
            failed_step: self.failed_step,
            undo_entries: self.undo_entries,
            rolled_back_by: self
                .rolled_back_by
                .map(|s| s.parse())
                .transpose()
                .map_err(|e: String| corrupt("rolled_back_by", &e))?,
            last_seq: self.last_seq as u64,
            unwind_incomplete: self.unwind_incomplete,
            submitted_by: self.submitted_by,
            node: self.node,
        };
        Ok((job, self.pos))
    }
}

/// Brings a ledger written by an earlier version up to this one's schema.
fn migrate(conn: &Connection) -> Result<(), Error> {
    let has = |table: &str, column: &str| -> rusqlite::Result<bool> {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
        let names = stmt.query_map([], |r| r.get::<_, String>(1))?;
        for n in names {
            if n? == column {
                return Ok(true);
            }
        }
        Ok(false)
    };
    if !has("jobs", "unwind_incomplete")? {
        conn.execute_batch(
            "ALTER TABLE jobs ADD COLUMN unwind_incomplete INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    if !has("jobs", "submitted_by")? {
        conn.execute_batch("ALTER TABLE jobs ADD COLUMN submitted_by TEXT")?;
    }
    Ok(())
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Batch>) {
    while let Ok(first) = rx.recv() {
        let mut batches = vec![first];
        while batches.len() < 1024 {
            match rx.try_recv() {
                Ok(b) => batches.push(b),
                Err(_) => break,
            }
        }
        let results = apply_batches(&mut conn, &batches);
        finish_round(batches, results);
    }
}

/// After a round's commit: each batch that took has its events published (only now are they
/// durable), and each batch's writer learns how it went.
fn finish_round(batches: Vec<Batch>, results: Vec<Result<(), String>>) {
    for (batch, result) in batches.into_iter().zip(results) {
        if result.is_ok()
            && let Some(tx) = &batch.publish
        {
            for w in &batch.writes {
                if let Write::Event(e) = w {
                    let _ = tx.send(e.clone());
                }
            }
        }
        match batch.ack {
            Some(ack) => {
                let _ = ack.send(result);
            }
            None => {
                if let Err(e) = result {
                    tracing::error!("store: a write failed: {e}");
                }
            }
        }
    }
}

/// Applies every batch in one transaction; a batch that fails is rolled back alone.
fn apply_batches(conn: &mut Connection, batches: &[Batch]) -> Vec<Result<(), String>> {
    let tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => return batches.iter().map(|_| Err(e.to_string())).collect(),
    };
    let mut results = Vec::with_capacity(batches.len());
    for batch in batches {
        let r = (|| -> rusqlite::Result<()> {
            tx.execute_batch("SAVEPOINT b")?;
            for w in &batch.writes {
                if let Err(e) = apply(&tx, w) {
                    tx.execute_batch("ROLLBACK TO b; RELEASE b")?;
                    return Err(e);
                }
            }
            tx.execute_batch("RELEASE b")
        })();
        results.push(r.map_err(|e| e.to_string()));
    }
    match tx.commit() {
        Ok(()) => results,
        Err(e) => batches.iter().map(|_| Err(e.to_string())).collect(),
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("domain types serialize")
}

fn apply(tx: &rusqlite::Transaction<'_>, w: &Write) -> rusqlite::Result<()> {
    match w {
        Write::InsertJob(j) => {
            tx.prepare_cached(
                "INSERT INTO jobs (id, kind, spec, state, steps, request_id, labels, resources, waiting_for, \
                 created_at, started_at, finished_at, error, failed_step, rolled_back_by, rollback_of, \
                 submitted_by) \
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17)",
            )?
            .execute(params![
                j.id.to_string(),
                j.spec.kind,
                j.spec.json,
                j.state.as_str(),
                json(&j.steps),
                j.request_id,
                json(&j.labels),
                json(&j.resources),
                json(&j.waiting_for),
                j.created_at,
                j.started_at,
                j.finished_at,
                j.error,
                j.failed_step,
                j.rolled_back_by.map(|r| r.to_string()),
                j.spec.rollback_of.map(|r| r.to_string()),
                j.submitted_by,
            ])?;
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO job_resources (resource, job_id) VALUES (?1, ?2)",
            )?;
            for r in &j.resources {
                stmt.execute(params![r, j.id.to_string()])?;
            }
        }
        Write::UpdateJob(j) => {
            tx.prepare_cached(
                "UPDATE jobs SET state=?2, steps=?3, waiting_for=?4, started_at=?5, finished_at=?6, error=?7, \
                 failed_step=?8, unwind_incomplete=?9 WHERE id=?1",
            )?
            .execute(params![
                j.id.to_string(),
                j.state.as_str(),
                json(&j.steps),
                json(&j.waiting_for),
                j.started_at,
                j.finished_at,
                j.error,
                j.failed_step,
                j.unwind_incomplete,
            ])?;
        }
        Write::Event(e) => {
            tx.prepare_cached(
                "INSERT INTO events (job_id, seq, at, body) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![e.job.to_string(), e.seq as i64, e.at, json(e)])?;
        }
        Write::Undo { job, idx, entry } => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO undo (job_id, idx, entry, blob) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![job.to_string(), idx, json(entry), entry.blob()])?;
        }
        Write::UndoApplied { job, idx } => {
            tx.prepare_cached("UPDATE undo SET applied = 1 WHERE job_id = ?1 AND idx = ?2")?
                .execute(params![job.to_string(), idx])?;
        }
        Write::UndoAbandoned { job, idx } => {
            tx.prepare_cached("UPDATE undo SET applied = 2 WHERE job_id = ?1 AND idx = ?2")?
                .execute(params![job.to_string(), idx])?;
        }
        Write::Seal { job, idx, left } => {
            tx.prepare_cached("UPDATE undo SET left_state = ?3 WHERE job_id = ?1 AND idx = ?2")?
                .execute(params![job.to_string(), idx, json(left)])?;
        }
        Write::RolledBackBy { job, by } => {
            tx.prepare_cached("UPDATE jobs SET rolled_back_by = ?2 WHERE id = ?1")?
                .execute(params![job.to_string(), by.map(|b| b.to_string())])?;
        }
        Write::Prune(ids) => prune(tx, ids)?,
        Write::Resources { job, resources } => {
            tx.prepare_cached("UPDATE jobs SET resources = ?2 WHERE id = ?1")?
                .execute(params![job.to_string(), json(resources)])?;
            for r in resources {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO job_resources (resource, job_id) VALUES (?1, ?2)",
                )?
                .execute(params![r, job.to_string()])?;
            }
        }
        // A SQLite ledger has one node: a cancel never crosses to another.
        Write::CancelRequest { .. } => {}
        Write::ProcessStarted { job, pgid, started } => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO processes (job_id, pgid, started) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![job.to_string(), pgid, *started as i64])?;
        }
        Write::ProcessEnded { job, pgid } => {
            tx.prepare_cached("DELETE FROM processes WHERE job_id = ?1 AND pgid = ?2")?
                .execute(params![job.to_string(), pgid])?;
        }
        Write::OutboxAdd { job, n, at, mail } => {
            tx.prepare_cached(
                "INSERT INTO outbox (job_id, n, created_at, mail) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![job.to_string(), *n as i64, at, json(mail)])?;
        }
        Write::OutboxAttempt {
            job,
            n,
            attempts,
            error,
        } => {
            tx.prepare_cached(
                "UPDATE outbox SET attempts = ?3, last_error = ?4 WHERE job_id = ?1 AND n = ?2",
            )?
            .execute(params![job.to_string(), *n as i64, attempts, error])?;
        }
        Write::OutboxDone {
            job,
            n,
            attempts,
            at,
            error,
        } => {
            tx.prepare_cached(
                "UPDATE outbox SET state = ?3, attempts = ?4, last_error = ?5, done_at = ?6 \
                 WHERE job_id = ?1 AND n = ?2",
            )?
            .execute(params![
                job.to_string(),
                *n as i64,
                if error.is_some() { "failed" } else { "sent" },
                attempts,
                error,
                at
            ])?;
        }
        Write::WatchState { job, state } => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO watch_state (job_id, state) VALUES (?1, ?2)",
            )?
            .execute(params![job.to_string(), state])?;
        }
    }
    Ok(())
}

/// The finished jobs beyond the newest `keep_total` finished jobs, or beyond the newest
/// `keep_per_resource` of a resource they touched, oldest first.
const PRUNABLE: &str = "
    SELECT id FROM jobs
    WHERE state IN ('SUCCEEDED','FAILED','CANCELLED') AND unwind_incomplete = 0
      AND (pos NOT IN (SELECT pos FROM jobs WHERE state IN ('SUCCEEDED','FAILED','CANCELLED')
                       ORDER BY pos DESC LIMIT ?2)
           OR (EXISTS (SELECT 1 FROM job_resources r WHERE r.job_id = jobs.id)
               AND id NOT IN (
                 SELECT job_id FROM (
                   SELECT r.job_id, ROW_NUMBER() OVER (PARTITION BY r.resource ORDER BY j.pos DESC) AS n
                   FROM job_resources r JOIN jobs j ON j.id = r.job_id
                   WHERE j.state IN ('SUCCEEDED','FAILED','CANCELLED'))
                 WHERE n <= ?1)))
    ORDER BY pos
    LIMIT ?3";

fn prune(tx: &rusqlite::Transaction<'_>, ids: &[JobId]) -> rusqlite::Result<()> {
    tx.execute_batch(
        "DROP TABLE IF EXISTS temp.doomed; CREATE TEMP TABLE doomed (id TEXT PRIMARY KEY)",
    )?;
    {
        // Chosen from a snapshot that may be a moment old: a job is dropped only if it is
        // still finished with nothing left to unwind (a finished job never becomes newer, so
        // it stays beyond the limits).
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO temp.doomed (id) SELECT id FROM jobs WHERE id = ?1 \
             AND state IN ('SUCCEEDED','FAILED','CANCELLED') AND unwind_incomplete = 0",
        )?;
        for id in ids {
            insert.execute(params![id.to_string()])?;
        }
    }
    tx.execute_batch(
        "DELETE FROM events WHERE job_id IN (SELECT id FROM temp.doomed);
         DELETE FROM undo WHERE job_id IN (SELECT id FROM temp.doomed);
         DELETE FROM processes WHERE job_id IN (SELECT id FROM temp.doomed);
         DELETE FROM outbox WHERE job_id IN (SELECT id FROM temp.doomed);
         DELETE FROM watch_state WHERE job_id IN (SELECT id FROM temp.doomed);
         DELETE FROM job_resources WHERE job_id IN (SELECT id FROM temp.doomed);
         DELETE FROM jobs WHERE id IN (SELECT id FROM temp.doomed);
         DROP TABLE temp.doomed;",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::JobSpec;

    /// The specs the fixture holds, one per kind, as job.rs' tests pin them.
    fn fixture_specs() -> Vec<JobSpec> {
        [
            r#"{"runbook":{"runbook":"motd","params":{"greeting":"hi"}}}"#,
            r#"{"rollback":{"target":"0190f6c2-7b1e-7c3a-9f00-2b8e4d1a5c77","force":false}}"#,
            r#"{"haproxy_apply":{"target":"edge","config":"global\n","base_version":"sha256:ab","allow_servers_down":true}}"#,
            r#"{"haproxy_server_state":{"target":"edge","backend":"app","server":"s1","state":"drain"}}"#,
            r#"{"alert_watch":{"target":"edge","to":["ops@example.com"],"rules":{"interval_ms":1000,"hold_ms":10000,"proxies":["app*"],"max_session_rate":5,"max_sessions_percent":null,"max_5xx":3}}}"#,
            r#"{"certificate_issue":{"lineage":"example.com","names":["example.com","www.example.com"],"webroot":"/var/www/html","key_type":"ec256","reuse_key":false,"deploy":["edge"],"acme":"","expand":true}}"#,
        ]
        .iter()
        .map(|t| serde_json::from_str(t).unwrap())
        .collect()
    }

    fn stored(kind: &str, state: JobState, labels: &[(&str, &str)]) -> StoredJob {
        JobRecord {
            id: JobId::new(),
            spec: StoredSpec {
                kind: kind.into(),
                json: "{}".into(),
                rollback_of: None,
            },
            state,
            steps: Vec::new(),
            request_id: None,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            resources: vec!["r".into()],
            waiting_for: Vec::new(),
            created_at: 1,
            started_at: None,
            finished_at: None,
            error: None,
            failed_step: None,
            undo_entries: 0,
            rolled_back_by: None,
            last_seq: 0,
            unwind_incomplete: false,
            node: "test".into(),
            submitted_by: None,
        }
    }

    use super::pg_support;

    /// Each case runs on a SQLite ledger and on a PostgreSQL one (a schema of its own).
    macro_rules! on_both_stores {
        ($($case:ident),* $(,)?) => {
            mod sqlite {
                $(
                    #[tokio::test]
                    async fn $case() {
                        let dir = tempfile::tempdir().unwrap();
                        let store = super::Store::open(&dir.path().join("stately.db"), false, "test").unwrap();
                        super::$case(store).await;
                    }
                )*
            }
            mod postgres {
                $(
                    #[tokio::test]
                    async fn $case() {
                        let pg = super::pg_support::TestPostgres::start().await;
                        let store = super::postgres_store(&pg.url()).await.unwrap();
                        super::$case(store).await;
                    }
                )*
            }
        };
    }

    on_both_stores!(
        list_filters_by_state_kind_and_labels_and_pages_newest_first,
        pruning_takes_the_oldest_beyond_the_limits_in_batches_and_spares_the_unfinished,
        an_update_changes_progress_and_keeps_the_spec,
        events_undo_entries_processes_outbox_and_watch_state_round_trip,
        a_failing_batch_is_rolled_back_alone_and_events_are_published_after_their_commit,
    );

    async fn postgres_store(url: &str) -> Result<Store, Error> {
        postgres_store_as(url, "test").await
    }

    async fn postgres_store_as(url: &str, node: &str) -> Result<Store, Error> {
        let config = crate::config::StoreConfig {
            url: Some(url.to_owned()),
            ..Default::default()
        };
        Store::open_postgres(PostgresTarget::from_config(
            &config, url, false, false, node,
        )?)
        .await
    }

    async fn events_undo_entries_processes_outbox_and_watch_state_round_trip(store: Store) {
        use crate::job::EventBody;
        let job = stored("alert_watch", JobState::Running, &[]);
        let id = job.id;
        let event = |seq: u64| Event {
            job: id,
            seq,
            at: 1000 + seq as i64,
            body: EventBody::Log {
                level: crate::job::LogLevel::Info,
                step: None,
                message: format!("line {seq}"),
            },
        };
        let entry = UndoEntry::RestoreFile {
            path: "/etc/x".into(),
            blob: "sha256:ab".into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        let mail = crate::alerts::Mail {
            to: vec!["ops@example.com".into()],
            subject: "s".into(),
            body: "b".into(),
            message_id: "<1@stately>".into(),
            date_ms: 5,
        };
        // A fire-and-forget write keeps its order with the commit that follows it: the job
        // is there when the commit's writes about it are read back.
        store.write(vec![Write::InsertJob(job)], None);
        let mut writes: Vec<Write> = (1..=3).map(|s| Write::Event(event(s))).collect();
        writes.extend([
            Write::Undo {
                job: id,
                idx: 0,
                entry: entry.clone(),
            },
            Write::Undo {
                job: id,
                idx: 1,
                entry: entry.clone(),
            },
            Write::UndoApplied { job: id, idx: 0 },
            Write::Seal {
                job: id,
                idx: 1,
                left: FileState::Absent,
            },
            Write::ProcessStarted {
                job: id,
                pgid: 42,
                started: 7,
            },
            Write::ProcessStarted {
                job: id,
                pgid: 43,
                started: 8,
            },
            Write::ProcessEnded { job: id, pgid: 42 },
            Write::OutboxAdd {
                job: id,
                n: 1,
                at: 5,
                mail: mail.clone(),
            },
            Write::OutboxAdd {
                job: id,
                n: 2,
                at: 6,
                mail: mail.clone(),
            },
            Write::OutboxAttempt {
                job: id,
                n: 1,
                attempts: 1,
                error: "refused".into(),
            },
            Write::OutboxDone {
                job: id,
                n: 2,
                attempts: 1,
                at: 9,
                error: None,
            },
            Write::WatchState {
                job: id,
                state: "{\"a\":1}".into(),
            },
            Write::WatchState {
                job: id,
                state: "{\"a\":2}".into(),
            },
        ]);
        store.commit(writes, None).await.unwrap();
        let seqs: Vec<u64> = store
            .events_after(id, 1)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [2, 3]);
        assert_eq!(store.job(id).await.unwrap().unwrap().last_seq, 3);
        assert_eq!(store.job(id).await.unwrap().unwrap().undo_entries, 2);
        let journal = store.journal(id).await.unwrap();
        assert_eq!(journal.len(), 2);
        assert!(journal[0].applied && !journal[1].applied);
        assert_eq!(journal[1].left, Some(FileState::Absent));
        // An entry recorded again is unapplied and unsealed.
        store
            .commit(
                vec![Write::Undo {
                    job: id,
                    idx: 0,
                    entry: entry.clone(),
                }],
                None,
            )
            .await
            .unwrap();
        let journal = store.journal(id).await.unwrap();
        assert!(!journal[0].applied && journal[0].left.is_none());
        // An entry given up on reads back as applied.
        store
            .commit(vec![Write::UndoAbandoned { job: id, idx: 1 }], None)
            .await
            .unwrap();
        assert!(store.journal(id).await.unwrap()[1].applied);
        assert_eq!(
            store.referenced_blobs().await.unwrap(),
            HashSet::from(["sha256:ab".to_owned()])
        );
        assert_eq!(store.processes(id).await.unwrap(), [(43, 8)]);
        let outbox = store.outbox(id).await.unwrap();
        assert_eq!(outbox.len(), 1);
        assert_eq!((outbox[0].n, outbox[0].attempts), (1, 1));
        assert_eq!(store.outbox_pending().await.unwrap(), 1);
        assert_eq!(store.outbox_oldest().await.unwrap(), Some(5));
        assert_eq!(
            store.watch_state(id).await.unwrap().as_deref(),
            Some("{\"a\":2}")
        );
        assert_eq!(
            store.job_counts().await.unwrap(),
            [("alert_watch".to_owned(), "RUNNING".to_owned(), 1)]
        );
        store.close().await;
    }

    async fn a_failing_batch_is_rolled_back_alone_and_events_are_published_after_their_commit(
        store: Store,
    ) {
        let mut first = stored("runbook", JobState::Pending, &[]);
        first.request_id = Some("once".into());
        let mut again = stored("runbook", JobState::Pending, &[]);
        again.request_id = Some("once".into());
        let other = stored("runbook", JobState::Pending, &[]);
        let (tx, mut rx) = broadcast::channel(16);
        let event = Event {
            job: other.id,
            seq: 1,
            at: 1,
            body: crate::job::EventBody::Log {
                level: crate::job::LogLevel::Info,
                step: None,
                message: "hello".into(),
            },
        };
        // Three batches in one round: the duplicate idempotency key fails its batch alone.
        let (a, b, c) = tokio::join!(
            store.commit(vec![Write::InsertJob(first.clone())], None),
            store.commit(vec![Write::InsertJob(again.clone())], None),
            store.commit(
                vec![Write::InsertJob(other.clone()), Write::Event(event)],
                Some(&tx)
            ),
        );
        a.unwrap();
        assert!(
            b.is_err(),
            "a second job with the same request_id is refused"
        );
        c.unwrap();
        assert_eq!(
            rx.try_recv().unwrap().seq,
            1,
            "the event is published once committed"
        );
        assert!(store.job(again.id).await.unwrap().is_none());
        assert_eq!(
            store.job_by_request_id("once").await.unwrap().unwrap().id,
            first.id
        );
        assert!(store.job(other.id).await.unwrap().is_some());
        store.close().await;
    }

    #[tokio::test]
    async fn a_ledger_of_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stately.db");
        Store::open(&path, false, "test").unwrap().close().await;
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Store::open(&path, false, "test").unwrap_err().to_string();
        assert!(
            err.contains("schema version 99") && err.contains("upgrade statelyd"),
            "{err}"
        );

        let pg = pg_support::TestPostgres::start().await;
        postgres_store(&pg.url()).await.unwrap().close().await;
        let admin = pg_support::TestPostgres::connect(&pg.url()).await;
        admin
            .batch_execute("INSERT INTO stately_schema VALUES (99, 0, 'later')")
            .await
            .unwrap();
        let err = postgres_store(&pg.url()).await.unwrap_err().to_string();
        assert!(
            err.contains("schema version 99") && err.contains("upgrade statelyd"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_second_daemon_with_one_node_name_is_refused_and_another_name_shares_the_ledger() {
        let pg = pg_support::TestPostgres::start().await;
        let first = postgres_store(&pg.url()).await.unwrap();
        let err = postgres_store(&pg.url()).await.unwrap_err().to_string();
        assert!(
            err.contains("another statelyd runs as node test on this ledger"),
            "{err}"
        );
        let other = postgres_store_as(&pg.url(), "other").await.unwrap();
        first.close().await;
        other.close().await;
        // Once the first has stopped, its name is free again.
        postgres_store(&pg.url()).await.unwrap().close().await;
    }

    #[tokio::test]
    async fn an_upgrade_from_one_node_per_ledger_waits_for_the_old_daemon_and_keeps_its_jobs_on_its_node()
     {
        let pg = pg_support::TestPostgres::start().await;
        // The ledger as the single-node version left it (schema 2: its node row, a job of
        // its own), and that version still running: it holds the one key per schema.
        let old = pg_support::TestPostgres::connect(&pg.url()).await;
        old.batch_execute(
            "CREATE TABLE stately_schema (
                 version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL, statelyd TEXT NOT NULL)",
        )
        .await
        .unwrap();
        for (i, m) in crate::store::postgres::MIGRATIONS[..2].iter().enumerate() {
            old.batch_execute(m).await.unwrap();
            old.execute(
                "INSERT INTO stately_schema VALUES ($1, 0, 'earlier')",
                &[&(i as i32 + 1)],
            )
            .await
            .unwrap();
        }
        let id = JobId::new();
        old.batch_execute(&format!(
            "INSERT INTO nodes VALUES ('old-edge', 3, now(), now(), 'earlier');
             INSERT INTO jobs (id, kind, spec, state, steps, labels, resources, waiting_for, created_at)
             VALUES ('{id}', 'runbook', '{{}}', 'SUCCEEDED', '[]', '{{}}', '[]', '[]', 1);
             SELECT pg_advisory_lock(hashtext('stately:node:' || current_schema()))"
        ))
        .await
        .unwrap();
        let err = postgres_store_as(&pg.url(), "new-edge")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a statelyd of an earlier version") && err.contains("stop it"),
            "{err}"
        );
        let version: i32 = old
            .query_one("SELECT MAX(version) FROM stately_schema", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(version, 2, "nothing migrated under the running daemon");
        // Stopped: the new version upgrades the ledger, and the old job stays the old node's.
        old.batch_execute("SELECT pg_advisory_unlock_all()")
            .await
            .unwrap();
        let store = postgres_store_as(&pg.url(), "new-edge").await.unwrap();
        assert_eq!(store.job(id).await.unwrap().unwrap().node, "old-edge");
        store.close().await;
    }

    fn filter(states: &[JobState], kind: Option<&str>, labels: &[(&str, &str)]) -> JobFilter {
        JobFilter {
            states: states.to_vec(),
            kind: kind.map(str::to_owned),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            before: None,
            limit: 100,
            ..Default::default()
        }
    }

    async fn list_filters_by_state_kind_and_labels_and_pages_newest_first(store: Store) {
        let jobs = [
            stored("runbook", JobState::Succeeded, &[("env", "prod")]),
            stored("runbook", JobState::Failed, &[("env", "test")]),
            stored(
                "haproxy_apply",
                JobState::Succeeded,
                &[("env", "prod"), ("team", "web")],
            ),
        ];
        let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
        store
            .commit(jobs.into_iter().map(Write::InsertJob).collect(), None)
            .await
            .unwrap();
        let got = async |f: JobFilter| -> Vec<JobId> {
            store
                .list(&f)
                .await
                .unwrap()
                .into_iter()
                .map(|(j, _)| j.id)
                .collect()
        };
        assert_eq!(got(filter(&[], None, &[])).await, [ids[2], ids[1], ids[0]]);
        assert_eq!(
            got(filter(&[JobState::Succeeded], None, &[])).await,
            [ids[2], ids[0]]
        );
        assert_eq!(
            got(filter(&[], Some("runbook"), &[])).await,
            [ids[1], ids[0]]
        );
        assert_eq!(
            got(filter(&[], None, &[("env", "prod")])).await,
            [ids[2], ids[0]]
        );
        assert_eq!(
            got(filter(&[], None, &[("env", "prod"), ("team", "web")])).await,
            [ids[2]]
        );
        // A page ends at its limit; the next starts below the last position it gave.
        let mut f = filter(&[], None, &[]);
        f.limit = 2;
        let page = store.list(&f).await.unwrap();
        assert_eq!(page.len(), 2);
        f.before = Some(page[1].1);
        assert_eq!(got(f).await, [ids[0]]);
        store.close().await;
    }

    async fn pruning_takes_the_oldest_beyond_the_limits_in_batches_and_spares_the_unfinished(
        store: Store,
    ) {
        let mut jobs: Vec<StoredJob> = (0..12)
            .map(|_| stored("runbook", JobState::Succeeded, &[]))
            .collect();
        jobs[1].state = JobState::Running;
        jobs[2].unwind_incomplete = true;
        let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
        let incomplete = Write::UpdateJob(jobs[2].progress());
        let mut writes: Vec<Write> = jobs.into_iter().map(Write::InsertJob).collect();
        writes.push(incomplete);
        store.commit(writes, None).await.unwrap();
        // Keep 4 of the 11 finished: 7 beyond, the one with an incomplete unwind not among
        // those that may go; oldest first, 3 at a time.
        let first = store.prunable(100, 4, 3).await.unwrap();
        assert_eq!(first, [ids[0], ids[3], ids[4]]);
        store.commit(vec![Write::Prune(first)], None).await.unwrap();
        let second = store.prunable(100, 4, 3).await.unwrap();
        assert_eq!(second, [ids[5], ids[6], ids[7]]);
        // A job chosen a moment ago that has started again since is not dropped.
        let mut back = store.job(ids[6]).await.unwrap().unwrap();
        back.state = JobState::Running;
        store
            .commit(
                vec![Write::UpdateJob(back.progress()), Write::Prune(second)],
                None,
            )
            .await
            .unwrap();
        let left: Vec<JobId> = store
            .list(&filter(&[], None, &[]))
            .await
            .unwrap()
            .into_iter()
            .map(|(j, _)| j.id)
            .collect();
        let mut want = vec![ids[1], ids[2], ids[6], ids[8], ids[9], ids[10], ids[11]];
        want.reverse();
        assert_eq!(left, want);
        store.close().await;
    }

    async fn an_update_changes_progress_and_keeps_the_spec(store: Store) {
        let mut job = stored("runbook", JobState::Pending, &[]);
        job.spec.json = r#"{"runbook":{"runbook":"x","params":{}}}"#.into();
        store
            .commit(vec![Write::InsertJob(job.clone())], None)
            .await
            .unwrap();
        job.state = JobState::Running;
        job.unwind_incomplete = true;
        store
            .commit(vec![Write::UpdateJob(job.progress())], None)
            .await
            .unwrap();
        let back = store.job(job.id).await.unwrap().unwrap();
        assert_eq!(back.state, JobState::Running);
        assert_eq!(back.spec, job.spec);
        assert_eq!(store.jobs_unwind_incomplete().await.unwrap().len(), 1);
        assert_eq!(store.jobs_in(&[JobState::Pending]).await.unwrap().len(), 0);
        store.close().await;
    }

    /// A ledger written before each kind owned its spec loads, every job with its spec.
    #[tokio::test]
    async fn ledger_from_before_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stately.db");
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/ledger-before-kinds.db"
            ),
            &path,
        )
        .unwrap();
        let store = Store::open(&path, true, "test").unwrap();
        let jobs = store
            .list(&JobFilter {
                states: vec![],
                kind: None,
                labels: vec![],
                before: None,
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut specs: Vec<JobSpec> = jobs
            .into_iter()
            .map(|(j, _)| JobSpec::from_stored(j.spec).unwrap())
            .collect();
        specs.reverse(); // newest first
        assert_eq!(specs, fixture_specs());
        store.close().await;
    }
}
