//! The job ledger on PostgreSQL (`[store] url`): the same tables, writes and reads as the
//! SQLite ledger, for operators who already run PostgreSQL and want their ledger there.
//!
//! One writer task owns one connection and commits in groups, as the SQLite writer thread
//! does: the batches queued when it wakes go into one transaction, a savepoint each, so a
//! batch that fails is rolled back alone. Events reach watchers only after their commit.
//! Reads come from a small pool. A lost connection is retried with the round held; a commit
//! whose answer was lost is told apart by the round number the transaction also wrote.
//!
//! Several statelyd share one database (its schema), each as its node: a job belongs to one
//! node, and only that node runs, recovers and unwinds it. The writer holds an advisory lock
//! on its node's name for the daemon's life, so a second statelyd with the same name is
//! refused. What one node writes for another (a job submitted for it, a cancel) is signalled
//! with NOTIFY on one channel; each node has one listening connection that fans the notices
//! out, and reads the ledger again after every reconnect, so a notice lost meanwhile is not
//! a change lost.

use super::{
    Batch, Error, JobColumns, JobFilter, Notice, OutboxEntry, StoredJob, Write, finish_round,
};
use crate::job::{Event, JobId};
use crate::undo::JournalEntry;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

/// How the ledger is reached.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) config: tokio_postgres::Config,
    /// What logs and GetStatus show: host, port and database, never credentials.
    pub(crate) describe: String,
    pub(crate) pool_size: usize,
    pub(crate) sync_full: bool,
    /// TLS (`sslmode=require`), verified.
    pub(crate) tls: Option<super::pgtls::Rustls>,
    /// This statelyd's node.
    pub(crate) node: String,
    /// How long the node may go without a heartbeat.
    pub(crate) lease: Duration,
}

impl Target {
    /// Checks a `[store] url` the way `from_config` reads it, without connecting.
    pub(crate) fn check_url(url: &str, insecure: bool) -> Result<(), String> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
        if config.get_password().is_some() {
            return Err(
                "holds a password: give it in [store] password_file, so it is not in the configuration"
                    .into(),
            );
        }
        if config.get_hosts().is_empty() {
            return Err("names no host".into());
        }
        let tls = config.get_ssl_mode() == tokio_postgres::config::SslMode::Require;
        // Without TLS the ledger (and, by some login methods, the password) would cross the
        // network in clear: as for the listeners, only with `insecure = true`.
        let remote = config.get_hosts().iter().any(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => {
                name != "localhost"
                    && !name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            tokio_postgres::config::Host::Unix(_) => false,
        });
        let remote = remote || config.get_hostaddrs().iter().any(|ip| !ip.is_loopback());
        if tls
            && config
                .get_hosts()
                .iter()
                .any(|h| matches!(h, tokio_postgres::config::Host::Unix(_)))
        {
            return Err("sslmode=require with a unix socket host: TLS is for TCP hosts".into());
        }
        if remote && !tls && !insecure {
            return Err("names a host beyond loopback without sslmode=require: the ledger would cross the network in clear. Add sslmode=require (TLS, verified against [store] ca_file or the system's roots), or set insecure = true if something else encrypts the path".into());
        }
        Ok(())
    }

    /// The target of `[store]`, with the password read from its file.
    pub(crate) fn from_config(
        store: &crate::config::StoreConfig,
        url: &str,
        sync_full: bool,
        insecure: bool,
        node: &str,
    ) -> Result<Target, Error> {
        Self::check_url(url, insecure).map_err(|e| Error::Config(format!("[store] url: {e}")))?;
        let mut config: tokio_postgres::Config = url.parse().expect("checked above");
        // TLS when the URL asks for it, and then verified; otherwise none ("prefer", the
        // default, would try TLS first and fall back to clear text on its own).
        let tls = if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            Some(super::pgtls::Rustls::new(store.ca_file.as_deref()).map_err(Error::Config)?)
        } else {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            if store.ca_file.is_some() {
                return Err(Error::Config(
                    "[store] ca_file is set but the url does not ask for TLS (sslmode=require)"
                        .into(),
                ));
            }
            None
        };
        if config.get_application_name().is_none() {
            config.application_name("statelyd");
        }
        config.connect_timeout(Duration::from_secs(10));
        // A half-open connection is noticed in seconds, not the kernel's quarter of an hour.
        config.keepalives_idle(Duration::from_secs(15));
        config.tcp_user_timeout(Duration::from_secs(30));
        if let Some(file) = &store.password_file {
            let text = std::fs::read_to_string(file).map_err(|e| {
                Error::Config(format!("[store] password_file {}: {e}", file.display()))
            })?;
            config.password(text.trim_end_matches(['\r', '\n']));
        }
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => String::new(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let describe = format!(
            "postgresql://{host}:{port}/{}",
            config.get_dbname().unwrap_or("")
        );
        Ok(Target {
            config,
            describe,
            pool_size: store.pool_size.unwrap_or(4),
            sync_full,
            tls,
            node: node.to_owned(),
            lease: store.lease,
        })
    }
}

/// Versioned schema changes, applied in order at start-up; a released one is never edited
/// (a database is at the version of the last one applied).
pub(super) const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE jobs (
    pos BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    steps TEXT NOT NULL,
    request_id TEXT UNIQUE,
    labels JSONB NOT NULL,
    resources TEXT NOT NULL,
    waiting_for TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    error TEXT,
    failed_step TEXT,
    rolled_back_by TEXT,
    rollback_of TEXT,
    unwind_incomplete BOOLEAN NOT NULL DEFAULT FALSE,
    submitted_by TEXT
);
CREATE INDEX jobs_state_kind ON jobs (state, kind);
CREATE INDEX jobs_unwind_incomplete ON jobs (pos) WHERE unwind_incomplete;
CREATE INDEX jobs_rollback_of ON jobs (rollback_of);
CREATE TABLE job_resources (
    resource TEXT NOT NULL, job_id TEXT NOT NULL, PRIMARY KEY (resource, job_id)
);
CREATE INDEX job_resources_job ON job_resources (job_id);
CREATE TABLE events (
    job_id TEXT NOT NULL, seq BIGINT NOT NULL, at BIGINT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE processes (
    job_id TEXT NOT NULL, pgid INTEGER NOT NULL, started BIGINT NOT NULL,
    PRIMARY KEY (job_id, pgid)
);
CREATE TABLE undo (
    job_id TEXT NOT NULL, idx BIGINT NOT NULL, entry TEXT NOT NULL, blob TEXT,
    applied SMALLINT NOT NULL DEFAULT 0, left_state TEXT,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE outbox (
    job_id TEXT NOT NULL, n BIGINT NOT NULL, created_at BIGINT NOT NULL, mail TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', attempts BIGINT NOT NULL DEFAULT 0,
    last_error TEXT, done_at BIGINT,
    PRIMARY KEY (job_id, n)
);
CREATE INDEX outbox_pending ON outbox (created_at) WHERE state = 'pending';
CREATE TABLE watch_state (job_id TEXT PRIMARY KEY, state TEXT NOT NULL);
CREATE TABLE stately_writer (
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one), round BIGINT NOT NULL, owner TEXT
);
INSERT INTO stately_writer (round) VALUES (0);
",
    "
CREATE TABLE nodes (
    name TEXT PRIMARY KEY,
    epoch BIGINT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL,
    version TEXT NOT NULL
);
",
    // Nodes share the ledger: each job is one node's, each node writes under its own marker.
    // Jobs from before are the node's that migrates (the ledger had one daemon).
    "
ALTER TABLE jobs ADD COLUMN node TEXT;
ALTER TABLE jobs ADD COLUMN unplanned BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX jobs_node_state ON jobs (node, state);
CREATE TABLE writers (node TEXT PRIMARY KEY, round BIGINT NOT NULL, owner TEXT);
DROP TABLE stately_writer;
CREATE TABLE cancels (
    job_id TEXT PRIMARY KEY, reason TEXT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT now()
);
",
    // Each node's lease, as it configured it: a round commits only within it.
    "
ALTER TABLE nodes ADD COLUMN lease_ms BIGINT NOT NULL DEFAULT 15000;
",
];

/// A node's lease has not lapsed (its last heartbeat is younger than its lease), by the
/// database's clock; `n` is the nodes row.
const WITHIN_LEASE: &str = "n.heartbeat_at > now() - n.lease_ms * interval '1 millisecond'";
/// The same, by the clock at the statement (not the transaction's start).
const STILL_WITHIN_LEASE: &str =
    "n.heartbeat_at > clock_timestamp() - n.lease_ms * interval '1 millisecond'";

/// The channel of every notice between nodes.
const CHANNEL: &str = "stately";

const JOB_COLUMNS: &str = "id, spec, state, steps, request_id, labels::text, resources, waiting_for, \
     created_at, started_at, finished_at, error, failed_step, \
     (SELECT COUNT(*) FROM undo u WHERE u.job_id = jobs.id), rolled_back_by, \
     (SELECT COALESCE(MAX(seq), 0) FROM events e WHERE e.job_id = jobs.id), pos, unwind_incomplete, \
     kind, rollback_of, submitted_by, COALESCE(node, '')";

/// The reads' side of the ledger.
pub(crate) struct Ledger {
    pool: deadpool_postgres::Pool,
    /// This node, and the epoch it joined with.
    node: String,
    epoch: u64,
    notices: tokio::sync::broadcast::Sender<Notice>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

fn pg(e: tokio_postgres::Error) -> Error {
    Error::Postgres(describe_error(&e))
}

/// The server's message (and its SQLSTATE) when it sent one; the client's otherwise.
fn describe_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

async fn connect(target: &Target) -> Result<Client, Error> {
    let connected = async {
        match &target.tls {
            None => {
                let (client, conn) = target.config.connect(NoTls).await?;
                tokio::spawn(serve(conn));
                Ok(client)
            }
            Some(tls) => {
                let (client, conn) = target.config.connect(tls.clone()).await?;
                tokio::spawn(serve(conn));
                Ok(client)
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), connected)
        .await
        .map_err(|_| Error::Postgres(format!("{}: no answer within 10s", target.describe)))?
        .map_err(|e: tokio_postgres::Error| {
            Error::Postgres(format!("{}: {}", target.describe, cause(&e)))
        })
}

/// Drives a connection until it ends.
async fn serve(conn: impl std::future::Future<Output = Result<(), tokio_postgres::Error>>) {
    if let Err(e) = conn.await {
        tracing::debug!("store: a PostgreSQL connection ended: {e}");
    }
}

/// The server's message, or the innermost cause (a TLS verification failure says what it
/// is only there).
fn cause(e: &tokio_postgres::Error) -> String {
    if e.as_db_error().is_some() {
        return describe_error(e);
    }
    let mut msg = e.to_string();
    let mut inner: &dyn std::error::Error = e;
    while let Some(next) = inner.source() {
        msg = next.to_string();
        inner = next;
    }
    msg
}

/// Opens the ledger: connects, applies the migrations this binary knows, takes the one-node
/// lock, and starts the writer. Returns the reads and the writer's queue.
pub(crate) async fn open(
    target: Target,
) -> Result<
    (
        Ledger,
        tokio::sync::mpsc::UnboundedSender<Batch>,
        tokio::task::JoinHandle<()>,
        std::sync::Arc<tokio::sync::watch::Sender<Option<String>>>,
    ),
    Error,
> {
    let client = connect(&target).await?;
    // The lock first: a newer binary started by mistake does not upgrade the schema under a
    // running daemon.
    let backend = lock(&client, &target.node)
        .await?
        .ok_or_else(|| taken(&target.describe, &target.node))?;
    migrate(&client, &target.describe, &target.node).await?;
    let owner = uuid::Uuid::now_v7().to_string();
    let round: i64 = client
        .query_one(
            "INSERT INTO writers (node, round, owner) VALUES ($1, 0, $2) \
             ON CONFLICT (node) DO UPDATE SET owner = EXCLUDED.owner RETURNING round",
            &[&target.node, &owner],
        )
        .await
        .map_err(pg)?
        .get(0);
    // Joined here, before the writer starts: every round it commits names this epoch.
    let epoch = client
        .query_one(
            "INSERT INTO nodes (name, epoch, started_at, heartbeat_at, version, lease_ms) \
             VALUES ($1, 1, now(), now(), $2, $3) \
             ON CONFLICT (name) DO UPDATE SET epoch = nodes.epoch + 1, started_at = now(), \
             heartbeat_at = now(), version = EXCLUDED.version, lease_ms = EXCLUDED.lease_ms \
             RETURNING epoch",
            &[
                &target.node,
                &env!("CARGO_PKG_VERSION"),
                &(target.lease.as_millis() as i64),
            ],
        )
        .await
        .map_err(pg)?
        .get::<_, i64>(0);
    let recycling = || deadpool_postgres::ManagerConfig {
        recycling_method: deadpool_postgres::RecyclingMethod::Fast,
    };
    let manager = match &target.tls {
        None => deadpool_postgres::Manager::from_config(target.config.clone(), NoTls, recycling()),
        Some(tls) => {
            deadpool_postgres::Manager::from_config(target.config.clone(), tls.clone(), recycling())
        }
    };
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(target.pool_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(10)))
        .build()
        .map_err(|e| Error::Postgres(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let lost = std::sync::Arc::new(tokio::sync::watch::channel(None).0);
    let notices = tokio::sync::broadcast::channel(1024).0;
    let listener = tokio::spawn(listen(target.clone(), notices.clone()));
    let node = target.node.clone();
    let writer = tokio::spawn(
        Writer {
            target,
            client: Some(client),
            statements: HashMap::new(),
            round,
            owner,
            sent: None,
            lost: lost.clone(),
            backend,
            epoch,
        }
        .run(rx),
    );
    Ok((
        Ledger {
            pool,
            node,
            epoch: epoch as u64,
            notices,
            listener,
        },
        tx,
        writer,
        lost,
    ))
}

/// Brings the schema up to this binary's version, under a lock so two starts do not race;
/// refuses a schema newer than the binary knows.
async fn migrate(client: &Client, describe: &str, node: &str) -> Result<(), Error> {
    client
        .batch_execute(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext('stately:migrate:' || current_schema()));
             CREATE TABLE IF NOT EXISTS stately_schema (
                 version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL, statelyd TEXT NOT NULL)",
        )
        .await
        .map_err(pg)?;
    let result = async {
        let found: i32 = client
            .query_one("SELECT COALESCE(MAX(version), 0) FROM stately_schema", &[])
            .await
            .map_err(pg)?
            .get(0);
        let known = MIGRATIONS.len() as i32;
        if found > known {
            return Err(Error::SchemaTooNew {
                at: describe.to_owned(),
                found: found as u32,
                known: known as u32,
            });
        }
        if (1..3).contains(&found) {
            // The single-node versions held one key per schema for their life, not the
            // (schema, node) pair: one still running would lose its ledger under it.
            let free: bool = client
                .query_one(
                    "SELECT pg_try_advisory_xact_lock(hashtext('stately:node:' || current_schema()))",
                    &[],
                )
                .await
                .map_err(pg)?
                .get(0);
            if !free {
                return Err(Error::Postgres(format!(
                    "{describe}: a statelyd of an earlier version (one node per ledger) still runs on this ledger; stop it, then start this version (it upgrades the ledger, and the earlier one will not start on it again)"
                )));
            }
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            client.batch_execute(m).await.map_err(pg)?;
            if i == 2 {
                // The jobs of before are the node's that last ran on the ledger (the one that
                // ran them, when the node upgrading is another), else the node upgrading's.
                let owner: String = client
                    .query_one(
                        "SELECT COALESCE( \
                             (SELECT name FROM nodes ORDER BY heartbeat_at DESC LIMIT 1), $1)",
                        &[&node],
                    )
                    .await
                    .map_err(pg)?
                    .get(0);
                client
                    .execute("UPDATE jobs SET node = $1 WHERE node IS NULL", &[&owner])
                    .await
                    .map_err(pg)?;
                if owner != node {
                    let open: i64 = client
                        .query_one(
                            "SELECT count(*) FROM jobs WHERE node = $1 AND \
                             (state NOT IN ('SUCCEEDED','FAILED','CANCELLED') OR unwind_incomplete)",
                            &[&owner],
                        )
                        .await
                        .map_err(pg)?
                        .get(0);
                    if open > 0 {
                        tracing::warn!(
                            "{describe}: the ledger's {open} unfinished job(s) from before are node {owner}'s (it ran them); only a statelyd started as node {owner} recovers them"
                        );
                    }
                }
            }
            client
                .execute(
                    "INSERT INTO stately_schema (version, applied_at, statelyd) VALUES ($1, $2, $3)",
                    &[&(i as i32 + 1), &crate::job::now_ms(), &env!("CARGO_PKG_VERSION")],
                )
                .await
                .map_err(pg)?;
        }
        Ok(())
    }
    .await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    client.batch_execute(end).await.map_err(pg)?;
    result
}

/// The node's lock: held by the writer's session for the daemon's life. The session's
/// backend process id when taken (a later session of this daemon may end a dead one). Two
/// keys (the schema, the node): two names share a lock only if both their hashes collide.
async fn lock(client: &Client, node: &str) -> Result<Option<i32>, Error> {
    let row = client
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext('stately:node:' || current_schema()), hashtext($1)), \
             pg_backend_pid()",
            &[&node],
        )
        .await
        .map_err(pg)?;
    Ok(row.get::<_, bool>(0).then(|| row.get(1)))
}

fn taken(describe: &str, node: &str) -> Error {
    Error::Postgres(format!(
        "{describe}: another statelyd runs as node {node} on this ledger (each statelyd needs its own node name)"
    ))
}

struct Writer {
    target: Target,
    client: Option<Client>,
    statements: HashMap<&'static str, Statement>,
    /// The number of the last round committed (also in `writers`).
    round: i64,
    /// The node's epoch: a round commits only while it is the node's, within its lease.
    epoch: i64,
    /// This process's claim on the ledger (in `stately_writer.owner`): a round commits only
    /// while the row still names it.
    owner: String,
    /// The results of the round whose COMMIT was sent last, for when its answer is lost but
    /// the commit took.
    sent: Option<(i64, Vec<Result<(), String>>)>,
    /// Told why, when the ledger is lost to another statelyd.
    lost: std::sync::Arc<tokio::sync::watch::Sender<Option<String>>>,
    /// The backend process of the session holding the lock.
    backend: i32,
}

/// Why a round did not commit.
enum RoundError {
    /// The connection or the server's state: the round is tried again, held in order.
    Retry(Error),
    /// Another statelyd holds the ledger now: this one must write nothing more.
    Fenced(String),
}

impl From<Error> for RoundError {
    fn from(e: Error) -> Self {
        RoundError::Retry(e)
    }
}

/// Errors of the moment, not of the batch (SQLSTATE classes): connection (08), transaction
/// rollback such as serialization or deadlock (40), insufficient resources (53), operator
/// intervention such as a shutdown or a statement timeout (57), a read-only transaction
/// during a failover (25006).
fn transient(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_none_or(|db| {
        let code = db.code().code();
        ["08", "40", "53", "57"].iter().any(|c| code.starts_with(c)) || code == "25006"
    })
}

impl Writer {
    /// Why this writer may write no more, after a round found it fenced (its transaction
    /// rolled back): its epoch is over (another start of the node), or its lease lapsed.
    async fn why_fenced(&self) -> String {
        let (describe, node, lease) = (&self.target.describe, &self.target.node, self.target.lease);
        let now = match &self.client {
            Some(c) => c
                .query_opt(
                    &format!(
                        "SELECT n.epoch FROM nodes n WHERE n.name = $1 AND {STILL_WITHIN_LEASE}"
                    ),
                    &[node],
                )
                .await
                .ok(),
            None => None,
        };
        match now {
            Some(Some(row)) if row.get::<_, i64>(0) != self.epoch => format!(
                "{describe}: node {node} was started again by another statelyd (its epoch {} is over)",
                self.epoch
            ),
            Some(Some(_)) => format!(
                "{describe}: node {node}'s lease lapsed for a moment (no heartbeat for {lease:?}: paused, or cut off from the ledger), or another statelyd has taken this ledger as node {node}"
            ),
            Some(None) => format!(
                "{describe}: node {node}'s lease lapsed (no heartbeat for {lease:?}: paused, or cut off from the ledger)"
            ),
            None => format!(
                "{describe}: node {node} was started again by another statelyd (its epoch {} is over), or its lease lapsed (no heartbeat for {lease:?}: paused, or cut off from the ledger)",
                self.epoch
            ),
        }
    }

    async fn run(mut self, mut rx: tokio::sync::mpsc::UnboundedReceiver<Batch>) {
        let mut batches = Vec::new();
        while rx.recv_many(&mut batches, 1024).await > 0 {
            let round = self.round + 1;
            match self.commit_round(round, &batches).await {
                Ok(results) => {
                    self.round = round;
                    finish_round(std::mem::take(&mut batches), results);
                }
                Err(why) => {
                    tracing::error!("store: {why}; this statelyd writes nothing more: stop it");
                    let results = batches
                        .iter()
                        .map(|_| Err(format!("store: {why}")))
                        .collect();
                    finish_round(std::mem::take(&mut batches), results);
                    let _ = self.lost.send(Some(why));
                    // Every later write fails as the writer has stopped.
                    return;
                }
            }
        }
    }

    /// Commits one round, retrying it on a new connection while PostgreSQL is unreachable
    /// (the batches are held, in order: nothing is dropped or reordered). Err when the ledger
    /// has been taken by another statelyd.
    async fn commit_round(
        &mut self,
        round: i64,
        batches: &[Batch],
    ) -> Result<Vec<Result<(), String>>, String> {
        let mut pause = Duration::from_millis(100);
        loop {
            let attempt = tokio::time::timeout(ROUND_TIMEOUT, self.try_round(round, batches)).await;
            match attempt {
                Ok(Ok(results)) => return Ok(results),
                Ok(Err(RoundError::Fenced(why))) => return Err(why),
                Ok(Err(RoundError::Retry(e))) => {
                    tracing::warn!("store: {e}; the writes wait and are retried");
                }
                Err(_) => tracing::warn!(
                    "store: no answer from PostgreSQL within {ROUND_TIMEOUT:?}; the writes wait and are retried"
                ),
            }
            self.client = None;
            self.statements.clear();
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// The writer's connection: a new one takes the one-node lock again and must find the
    /// ledger still claimed by this process.
    async fn client(&mut self) -> Result<&Client, RoundError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let c = connect(&self.target).await?;
            match lock(&c, &self.target.node).await? {
                Some(pid) => self.backend = pid,
                None => {
                    // Held: by this daemon's own session that died unnoticed by the server
                    // (it ends that one and tries again), or by another statelyd (fenced).
                    let owner: Option<String> = c
                        .query_one(
                            "SELECT owner FROM writers WHERE node = $1",
                            &[&self.target.node],
                        )
                        .await
                        .map_err(pg)?
                        .get(0);
                    if owner.as_deref() != Some(self.owner.as_str()) {
                        return Err(RoundError::Fenced(format!(
                            "{}: another statelyd has taken this ledger",
                            self.target.describe
                        )));
                    }
                    c.execute("SELECT pg_terminate_backend($1)", &[&self.backend])
                        .await
                        .map_err(pg)?;
                    return Err(RoundError::Retry(Error::Postgres(
                        "this statelyd's previous session still held the ledger's lock; it was ended".into(),
                    )));
                }
            }
            self.statements.clear();
            self.client = Some(c);
        }
        Ok(self.client.as_ref().expect("connected"))
    }

    async fn prepared(&mut self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let client = self.client.as_ref().expect("connected");
        let s = client.prepare(sql).await?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    /// Sends every statement of the round at once (tokio-postgres pipelines requests polled
    /// together, in order); the first error, if any.
    async fn pipelined(&mut self, batches: &[Batch]) -> Result<(), tokio_postgres::Error> {
        let all: Vec<Stmt> = batches
            .iter()
            .flat_map(|b| {
                b.writes
                    .iter()
                    .flat_map(|w| statements(w, &self.target.node))
            })
            .chain(notify_events(batches))
            .collect();
        let mut prepared = Vec::with_capacity(all.len());
        for (sql, _) in &all {
            prepared.push(self.prepared(sql).await?);
        }
        let refs: Vec<Vec<&(dyn ToSql + Sync)>> = all
            .iter()
            .map(|(_, params)| {
                params
                    .iter()
                    .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                    .collect()
            })
            .collect();
        let client = self.client.as_ref().expect("connected");
        let sent = prepared
            .iter()
            .zip(&refs)
            .map(|(stmt, params)| client.execute(stmt, params));
        for r in futures_util::future::join_all(sent).await {
            r?;
        }
        Ok(())
    }

    /// The round batch by batch, each in its savepoint: a batch that fails is rolled back
    /// alone.
    async fn batch_by_batch(
        &mut self,
        batches: &[Batch],
    ) -> Result<Vec<Result<(), String>>, RoundError> {
        let mut results = Vec::with_capacity(batches.len());
        for batch in batches {
            let client = self.client.as_ref().expect("connected");
            client.batch_execute("SAVEPOINT b").await.map_err(pg)?;
            let mut failed = None;
            'writes: for w in &batch.writes {
                for (sql, params) in statements(w, &self.target.node) {
                    let stmt = match self.prepared(sql).await {
                        Ok(s) => s,
                        Err(e) => {
                            failed = Some(e);
                            break 'writes;
                        }
                    };
                    let refs: Vec<&(dyn ToSql + Sync)> = params
                        .iter()
                        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                        .collect();
                    let client = self.client.as_ref().expect("connected");
                    if let Err(e) = client.execute(&stmt, &refs).await {
                        failed = Some(e);
                        break 'writes;
                    }
                }
            }
            let client = self.client.as_ref().expect("connected");
            match failed {
                None => {
                    client
                        .batch_execute("RELEASE SAVEPOINT b")
                        .await
                        .map_err(pg)?;
                    results.push(Ok(()));
                }
                // Not the batch's fault: the whole round is tried again.
                Some(e) if client.is_closed() || transient(&e) => return Err(pg(e).into()),
                Some(e) => {
                    client
                        .batch_execute("ROLLBACK TO SAVEPOINT b; RELEASE SAVEPOINT b")
                        .await
                        .map_err(pg)?;
                    results.push(Err(format!("store: {}", describe_error(&e))));
                }
            }
        }
        Ok(results)
    }

    /// One attempt at a round.
    async fn try_round(
        &mut self,
        round: i64,
        batches: &[Batch],
    ) -> Result<Vec<Result<(), String>>, RoundError> {
        let sync = if self.target.sync_full { "on" } else { "off" };
        let (owner, node, epoch) = (self.owner.clone(), self.target.node.clone(), self.epoch);
        let client = self.client().await?;
        client
            .batch_execute(&format!("BEGIN; SET LOCAL synchronous_commit = {sync}"))
            .await
            .map_err(pg)?;
        // The marker first, on this connection: a round whose COMMIT was sent before the
        // connection broke may have taken, and must not be applied twice.
        // And only while this epoch is the node's and its lease has not lapsed: a node paused
        // (or cut off) past its lease writes nothing when it resumes.
        let row = client
            .query_opt(
                &format!(
                    "SELECT w.round FROM writers w JOIN nodes n ON n.name = w.node \
                     WHERE w.node = $1 AND w.owner = $2 AND n.epoch = $3 AND {WITHIN_LEASE} FOR UPDATE OF w"
                ),
                &[&node, &owner, &epoch],
            )
            .await
            .map_err(pg)?;
        let Some(row) = row else {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(RoundError::Fenced(self.why_fenced().await));
        };
        if row.get::<_, i64>(0) == round {
            client.batch_execute("ROLLBACK").await.map_err(pg)?;
            return Ok(match self.sent.take() {
                Some((r, results)) if r == round => results,
                _ => batches.iter().map(|_| Ok(())).collect(),
            });
        }
        // Every statement of the round in one pipeline: a round trip for the round, not one
        // per statement. A batch that fails aborts the transaction; the round is then done
        // again batch by batch, each in its savepoint, so only that batch fails.
        let results = match self.pipelined(batches).await {
            Ok(()) => batches.iter().map(|_| Ok(())).collect(),
            Err(e) if self.client.as_ref().is_none_or(|c| c.is_closed()) || transient(&e) => {
                return Err(pg(e).into());
            }
            Err(_) => {
                let client = self.client.as_ref().expect("connected");
                client
                    .batch_execute(&format!(
                        "ROLLBACK; BEGIN; SET LOCAL synchronous_commit = {sync}"
                    ))
                    .await
                    .map_err(pg)?;
                let results = self.batch_by_batch(batches).await?;
                let done: Vec<&Batch> = batches
                    .iter()
                    .zip(&results)
                    .filter(|(_, r)| r.is_ok())
                    .map(|(b, _)| b)
                    .collect();
                for (sql, params) in notify_events(done) {
                    let refs: Vec<&(dyn ToSql + Sync)> = params
                        .iter()
                        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                        .collect();
                    let client = self.client.as_ref().expect("connected");
                    client.execute(sql, &refs).await.map_err(pg)?;
                }
                results
            }
        };
        // The lease again, as late as can be and by the clock of now (`now()` is the
        // transaction's start, and the batch-by-batch path began a new one): a pause since
        // the marker was read must not let the round commit. Only the COMMIT's own round trip
        // is left unchecked.
        let client = self.client.as_ref().expect("connected");
        let marked = client
            .execute(
                &format!(
                    "UPDATE writers AS w SET round = $1 FROM nodes AS n \
                     WHERE w.node = $2 AND w.owner = $3 AND n.name = w.node AND n.epoch = $4 \
                     AND {STILL_WITHIN_LEASE}"
                ),
                &[&round, &node, &owner, &epoch],
            )
            .await
            .map_err(pg)?;
        if marked != 1 {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(RoundError::Fenced(self.why_fenced().await));
        }
        self.sent = Some((round, results.clone()));
        let client = self.client.as_ref().expect("connected");
        client.batch_execute("COMMIT").await.map_err(pg)?;
        self.sent = None;
        Ok(results)
    }
}

/// A statement and its parameters.
type Stmt = (&'static str, Vec<Box<dyn ToSql + Sync + Send>>);

/// How long one attempt at a round may take before the connection is given up on.
const ROUND_TIMEOUT: Duration = Duration::from_secs(30);

/// Free text as PostgreSQL's TEXT takes it (it refuses NUL, which a program's output may hold).
fn text(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

fn text_opt(s: &Option<String>) -> Option<String> {
    s.as_deref().map(text)
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("domain types serialize")
}

macro_rules! params {
    ($($p:expr),* $(,)?) => { vec![$(Box::new($p) as Box<dyn ToSql + Sync + Send>),*] };
}

/// The statements a write is made of.
/// One NOTIFY per round naming the jobs that have new events in it (delivered at the
/// commit), for watchers on other nodes; split to stay under PostgreSQL's 8000-byte payload.
fn notify_events<'a>(batches: impl IntoIterator<Item = &'a Batch>) -> Vec<Stmt> {
    let mut jobs: Vec<JobId> = Vec::new();
    for b in batches {
        for w in &b.writes {
            if let Write::Event(e) = w
                && !jobs.contains(&e.job)
            {
                jobs.push(e.job);
            }
        }
    }
    jobs.chunks(100)
        .map(|chunk| {
            let ids: Vec<String> = chunk.iter().map(JobId::to_string).collect();
            (
                "SELECT pg_notify('stately', $1)",
                params![format!("events {}", ids.join(" "))],
            )
        })
        .collect()
}

fn statements(w: &Write, mine: &str) -> Vec<Stmt> {
    match w {
        Write::InsertJob(j) => {
            let mut out: Vec<Stmt> = vec![(
                "INSERT INTO jobs (id, kind, spec, state, steps, request_id, labels, resources, waiting_for, \
                 created_at, started_at, finished_at, error, failed_step, rolled_back_by, rollback_of, \
                 submitted_by, node, unplanned) \
                 VALUES ($1,$2,$3,$4,$5,$6,$7::text::jsonb,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19)",
                params![
                    j.id.to_string(),
                    j.spec.kind.clone(),
                    j.spec.json.clone(),
                    j.state.as_str().to_owned(),
                    json(&j.steps),
                    j.request_id.clone(),
                    json(&j.labels),
                    json(&j.resources),
                    json(&j.waiting_for),
                    j.created_at,
                    j.started_at,
                    j.finished_at,
                    text_opt(&j.error),
                    text_opt(&j.failed_step),
                    j.rolled_back_by.map(|r| r.to_string()),
                    j.spec.rollback_of.map(|r| r.to_string()),
                    text_opt(&j.submitted_by),
                    j.node.clone(),
                    j.node != mine,
                ],
            )];
            // Its node plans and runs it: told at the commit.
            if j.node != mine {
                out.push((
                    "SELECT pg_notify('stately', $1)",
                    params![format!("submitted {} {}", j.id, j.node)],
                ));
            }
            for r in &j.resources {
                out.push((
                    "INSERT INTO job_resources (resource, job_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    params![r.clone(), j.id.to_string()],
                ));
            }
            out
        }
        Write::UpdateJob(j) => vec![(
            "UPDATE jobs SET state=$2, steps=$3, waiting_for=$4, started_at=$5, finished_at=$6, error=$7, \
             failed_step=$8, unwind_incomplete=$9 WHERE id=$1",
            params![
                j.id.to_string(),
                j.state.as_str().to_owned(),
                json(&j.steps),
                json(&j.waiting_for),
                j.started_at,
                j.finished_at,
                text_opt(&j.error),
                text_opt(&j.failed_step),
                j.unwind_incomplete,
            ],
        )],
        Write::Event(e) => vec![(
            "INSERT INTO events (job_id, seq, at, body) VALUES ($1, $2, $3, $4)",
            params![e.job.to_string(), e.seq as i64, e.at, json(e)],
        )],
        // As SQLite's INSERT OR REPLACE: an entry recorded again is unapplied and unsealed.
        Write::Undo { job, idx, entry } => vec![(
            "INSERT INTO undo (job_id, idx, entry, blob) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (job_id, idx) DO UPDATE SET entry = EXCLUDED.entry, blob = EXCLUDED.blob, \
             applied = 0, left_state = NULL",
            params![
                job.to_string(),
                i64::from(*idx),
                json(entry),
                entry.blob().map(str::to_owned)
            ],
        )],
        Write::UndoApplied { job, idx } => vec![(
            "UPDATE undo SET applied = 1 WHERE job_id = $1 AND idx = $2",
            params![job.to_string(), i64::from(*idx)],
        )],
        Write::UndoAbandoned { job, idx } => vec![(
            "UPDATE undo SET applied = 2 WHERE job_id = $1 AND idx = $2",
            params![job.to_string(), i64::from(*idx)],
        )],
        Write::Seal { job, idx, left } => vec![(
            "UPDATE undo SET left_state = $3 WHERE job_id = $1 AND idx = $2",
            params![job.to_string(), i64::from(*idx), json(left)],
        )],
        Write::RolledBackBy { job, by } => vec![(
            "UPDATE jobs SET rolled_back_by = $2 WHERE id = $1",
            params![job.to_string(), by.map(|b| b.to_string())],
        )],
        // Chosen from a snapshot that may be a moment old: a job is dropped only if it is
        // still finished with nothing left to unwind.
        Write::Prune(ids) => vec![(
            "WITH doomed AS (SELECT id FROM jobs WHERE id = ANY($1) \
                 AND state IN ('SUCCEEDED','FAILED','CANCELLED') AND NOT unwind_incomplete FOR UPDATE), \
             e AS (DELETE FROM events WHERE job_id IN (SELECT id FROM doomed)), \
             u AS (DELETE FROM undo WHERE job_id IN (SELECT id FROM doomed)), \
             p AS (DELETE FROM processes WHERE job_id IN (SELECT id FROM doomed)), \
             o AS (DELETE FROM outbox WHERE job_id IN (SELECT id FROM doomed)), \
             w AS (DELETE FROM watch_state WHERE job_id IN (SELECT id FROM doomed)), \
             r AS (DELETE FROM job_resources WHERE job_id IN (SELECT id FROM doomed)), \
             c AS (DELETE FROM cancels WHERE job_id IN (SELECT id FROM doomed)) \
             DELETE FROM jobs WHERE id IN (SELECT id FROM doomed)",
            params![ids.iter().map(|i| i.to_string()).collect::<Vec<String>>()],
        )],
        Write::ProcessStarted { job, pgid, started } => vec![(
            "INSERT INTO processes (job_id, pgid, started) VALUES ($1, $2, $3) \
             ON CONFLICT (job_id, pgid) DO UPDATE SET started = EXCLUDED.started",
            params![job.to_string(), *pgid, *started as i64],
        )],
        Write::ProcessEnded { job, pgid } => vec![(
            "DELETE FROM processes WHERE job_id = $1 AND pgid = $2",
            params![job.to_string(), *pgid],
        )],
        Write::OutboxAdd { job, n, at, mail } => vec![(
            "INSERT INTO outbox (job_id, n, created_at, mail) VALUES ($1, $2, $3, $4)",
            params![job.to_string(), *n as i64, *at, json(mail)],
        )],
        Write::OutboxAttempt {
            job,
            n,
            attempts,
            error,
        } => vec![(
            "UPDATE outbox SET attempts = $3, last_error = $4 WHERE job_id = $1 AND n = $2",
            params![
                job.to_string(),
                *n as i64,
                i64::from(*attempts),
                text(error)
            ],
        )],
        Write::OutboxDone {
            job,
            n,
            attempts,
            at,
            error,
        } => vec![(
            "UPDATE outbox SET state = $3, attempts = $4, last_error = $5, done_at = $6 \
             WHERE job_id = $1 AND n = $2",
            params![
                job.to_string(),
                *n as i64,
                if error.is_some() { "failed" } else { "sent" },
                i64::from(*attempts),
                text_opt(error),
                *at
            ],
        )],
        Write::WatchState { job, state } => vec![(
            "INSERT INTO watch_state (job_id, state) VALUES ($1, $2) \
             ON CONFLICT (job_id) DO UPDATE SET state = EXCLUDED.state",
            params![job.to_string(), state.clone()],
        )],
        Write::Resources { job, resources } => {
            let mut out: Vec<Stmt> = vec![(
                "UPDATE jobs SET resources = $2, unplanned = FALSE WHERE id = $1",
                params![job.to_string(), json(resources)],
            )];
            for r in resources {
                out.push((
                    "INSERT INTO job_resources (resource, job_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    params![r.clone(), job.to_string()],
                ));
            }
            out
        }
        Write::CancelRequest { job, node, reason } => vec![
            (
                "INSERT INTO cancels (job_id, reason) VALUES ($1, $2) ON CONFLICT (job_id) DO NOTHING",
                params![job.to_string(), text(reason)],
            ),
            (
                "SELECT pg_notify('stately', $1)",
                params![format!("cancel {job} {node}")],
            ),
        ],
    }
}

/// A notice as NOTIFY carried it; None for one this version does not know.
fn parse_notice(payload: &str) -> Option<Notice> {
    let mut words = payload.split(' ');
    let what = words.next()?;
    match what {
        "events" => Some(Notice::Events(
            words.map(|w| w.parse().ok()).collect::<Option<_>>()?,
        )),
        "submitted" | "cancel" => {
            let job = words.next()?.parse().ok()?;
            let node = words.next()?.to_owned();
            Some(if what == "submitted" {
                Notice::Submitted { job, node }
            } else {
                Notice::Cancel { job, node }
            })
        }
        _ => None,
    }
}

/// The node's one listening connection: LISTEN, then every notice to the broadcast; after
/// each (re)connect a `Resync`, as notices sent while it was away are gone.
async fn listen(target: Target, tx: tokio::sync::broadcast::Sender<Notice>) {
    let mut target = target;
    target
        .config
        .application_name(format!("statelyd listener {}", target.node));
    let mut pause = Duration::from_millis(100);
    loop {
        match connect_listening(&target, tx.clone()).await {
            Ok((client, conn)) => match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                Ok(()) => {
                    pause = Duration::from_millis(100);
                    let _ = tx.send(Notice::Resync);
                    let _ = conn.await;
                    tracing::warn!("store: the ledger's listening connection ended; reconnecting");
                }
                Err(e) => tracing::warn!("store: LISTEN: {}", describe_error(&e)),
            },
            Err(e) => tracing::debug!("store: the listening connection: {e}"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// A connection whose notifications go to `tx`; the task driving it ends with it.
async fn connect_listening(
    target: &Target,
    tx: tokio::sync::broadcast::Sender<Notice>,
) -> Result<(Client, tokio::task::JoinHandle<()>), Error> {
    let connected = async {
        Ok::<_, tokio_postgres::Error>(match &target.tls {
            None => {
                let (client, conn) = target.config.connect(NoTls).await?;
                (client, tokio::spawn(notices(conn, tx)))
            }
            Some(tls) => {
                let (client, conn) = target.config.connect(tls.clone()).await?;
                (client, tokio::spawn(notices(conn, tx)))
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(10), connected)
        .await
        .map_err(|_| Error::Postgres(format!("{}: no answer within 10s", target.describe)))?
        .map_err(|e| Error::Postgres(format!("{}: {}", target.describe, cause(&e))))
}

/// Drives a listening connection, passing its notifications on.
async fn notices<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    tx: tokio::sync::broadcast::Sender<Notice>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    while let Some(m) = messages.next().await {
        match m {
            Ok(tokio_postgres::AsyncMessage::Notification(n)) if n.channel() == CHANNEL => {
                if let Some(notice) = parse_notice(n.payload()) {
                    let _ = tx.send(notice);
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!("store: the listening connection: {e}");
                return;
            }
        }
    }
}

fn job_row(r: &tokio_postgres::Row) -> Result<(StoredJob, i64), Error> {
    let get = |e: tokio_postgres::Error| Error::Corrupt(e.to_string());
    JobColumns {
        id: r.try_get(0).map_err(get)?,
        spec: r.try_get(1).map_err(get)?,
        state: r.try_get(2).map_err(get)?,
        steps: r.try_get(3).map_err(get)?,
        request_id: r.try_get(4).map_err(get)?,
        labels: r.try_get(5).map_err(get)?,
        resources: r.try_get(6).map_err(get)?,
        waiting_for: r.try_get(7).map_err(get)?,
        created_at: r.try_get(8).map_err(get)?,
        started_at: r.try_get(9).map_err(get)?,
        finished_at: r.try_get(10).map_err(get)?,
        error: r.try_get(11).map_err(get)?,
        failed_step: r.try_get(12).map_err(get)?,
        undo_entries: r.try_get::<_, i64>(13).map_err(get)? as u32,
        rolled_back_by: r.try_get(14).map_err(get)?,
        last_seq: r.try_get(15).map_err(get)?,
        pos: r.try_get(16).map_err(get)?,
        unwind_incomplete: r.try_get(17).map_err(get)?,
        kind: r.try_get(18).map_err(get)?,
        rollback_of: r.try_get(19).map_err(get)?,
        submitted_by: r.try_get(20).map_err(get)?,
        node: r.try_get(21).map_err(get)?,
    }
    .build()
}

fn ids(rows: Vec<tokio_postgres::Row>) -> Result<Vec<JobId>, Error> {
    rows.iter()
        .map(|r| r.get::<_, String>(0).parse().map_err(Error::Corrupt))
        .collect()
}

impl Ledger {
    async fn client(&self) -> Result<deadpool_postgres::Object, Error> {
        self.pool
            .get()
            .await
            .map_err(|e| Error::Postgres(format!("no connection to the ledger: {e}")))
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, Error> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(sql).await.map_err(pg)?;
        c.query(&stmt, params).await.map_err(pg)
    }

    async fn jobs(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<(StoredJob, i64)>, Error> {
        self.query(sql, params).await?.iter().map(job_row).collect()
    }

    pub(crate) async fn prunable(
        &self,
        keep_per_resource: u32,
        keep_total: u32,
        max: u32,
    ) -> Result<Vec<JobId>, Error> {
        let rows = self
            .query(
                "SELECT id FROM jobs
                 WHERE state IN ('SUCCEEDED','FAILED','CANCELLED') AND NOT unwind_incomplete AND node = $4
                   AND (pos NOT IN (SELECT pos FROM jobs WHERE state IN ('SUCCEEDED','FAILED','CANCELLED')
                                    AND node = $4 ORDER BY pos DESC LIMIT $2)
                        OR (EXISTS (SELECT 1 FROM job_resources r WHERE r.job_id = jobs.id)
                            AND id NOT IN (
                              SELECT job_id FROM (
                                SELECT r.job_id, ROW_NUMBER() OVER (PARTITION BY r.resource ORDER BY j.pos DESC) AS n
                                FROM job_resources r JOIN jobs j ON j.id = r.job_id
                                WHERE j.state IN ('SUCCEEDED','FAILED','CANCELLED') AND j.node = $4) AS ranked
                              WHERE n <= $1)))
                 ORDER BY pos
                 LIMIT $3",
                &[
                    &i64::from(keep_per_resource),
                    &i64::from(keep_total),
                    &i64::from(max),
                    &self.node,
                ],
            )
            .await?;
        ids(rows)
    }

    pub(crate) async fn job(&self, id: JobId) -> Result<Option<StoredJob>, Error> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        Ok(self
            .jobs(&sql, &[&id.to_string()])
            .await?
            .pop()
            .map(|(j, _)| j))
    }

    pub(crate) async fn job_by_request_id(
        &self,
        request_id: &str,
    ) -> Result<Option<StoredJob>, Error> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE request_id = $1");
        Ok(self.jobs(&sql, &[&request_id]).await?.pop().map(|(j, _)| j))
    }

    pub(crate) async fn jobs_unwind_incomplete(&self) -> Result<Vec<StoredJob>, Error> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE unwind_incomplete AND node = $1 ORDER BY pos"
        );
        Ok(self
            .jobs(&sql, &[&self.node])
            .await?
            .into_iter()
            .map(|(j, _)| j)
            .collect())
    }

    pub(crate) async fn active_rollbacks_of(&self, target: JobId) -> Result<Vec<JobId>, Error> {
        let rows = self
            .query(
                // Not one still unplanned: its node is planning it (perhaps this very
                // call), and plans one rollback at a time.
                "SELECT id FROM jobs WHERE rollback_of = $1 AND NOT unplanned \
                 AND state IN ('PENDING','RUNNING','CANCELLING')",
                &[&target.to_string()],
            )
            .await?;
        ids(rows)
    }

    pub(crate) async fn list(&self, f: &JobFilter) -> Result<Vec<(StoredJob, i64)>, Error> {
        let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE TRUE");
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut arg = |sql: &mut String, v: Box<dyn ToSql + Sync + Send>| {
            args.push(v);
            sql.push_str(&format!("${}", args.len()));
        };
        if !f.states.is_empty() {
            sql.push_str(" AND state = ANY(");
            let states: Vec<String> = f.states.iter().map(|s| s.as_str().to_owned()).collect();
            arg(&mut sql, Box::new(states));
            sql.push(')');
        }
        if let Some(kind) = &f.kind {
            sql.push_str(" AND kind = ");
            arg(&mut sql, Box::new(kind.clone()));
        }
        // One term per filter: two filters on one key match nothing, as in SQLite.
        for (k, v) in &f.labels {
            sql.push_str(" AND jobs.labels ->> ");
            arg(&mut sql, Box::new(k.clone()));
            sql.push_str(" = ");
            arg(&mut sql, Box::new(v.clone()));
        }
        if let Some(before) = f.before {
            sql.push_str(" AND pos < ");
            arg(&mut sql, Box::new(before));
        }
        if let Some(node) = &f.node {
            sql.push_str(" AND node = ");
            arg(&mut sql, Box::new(node.clone()));
        }
        if f.planned_only {
            sql.push_str(" AND NOT unplanned");
        }
        sql.push_str(" ORDER BY pos DESC LIMIT ");
        arg(&mut sql, Box::new(i64::from(f.limit)));
        let refs: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect();
        self.jobs(&sql, &refs).await
    }

    pub(crate) async fn events_after(&self, job: JobId, after: u64) -> Result<Vec<Event>, Error> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "SELECT body FROM events WHERE job_id = $1 AND seq > $2 ORDER BY seq",
                &[&job.to_string(), &after],
            )
            .await?;
        rows.iter()
            .map(|r| {
                serde_json::from_str(r.get::<_, &str>(0)).map_err(|e| Error::Corrupt(e.to_string()))
            })
            .collect()
    }

    pub(crate) async fn job_counts(&self) -> Result<Vec<(String, String, u64)>, Error> {
        let rows = self
            .query(
                "SELECT kind, state, COUNT(*) FROM jobs GROUP BY state, kind",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2) as u64))
            .collect())
    }

    async fn count(&self, sql: &str) -> Result<u64, Error> {
        Ok(self.query(sql, &[]).await?[0].get::<_, i64>(0) as u64)
    }

    pub(crate) async fn unwind_incomplete_count(&self) -> Result<u64, Error> {
        let rows = self
            .query(
                "SELECT COUNT(*) FROM jobs WHERE unwind_incomplete AND node = $1",
                &[&self.node],
            )
            .await?;
        Ok(rows[0].get::<_, i64>(0) as u64)
    }

    /// This node's jobs submitted elsewhere and not yet planned here.
    pub(crate) async fn unplanned(&self) -> Result<Vec<StoredJob>, Error> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE node = $1 AND unplanned AND state = 'PENDING' ORDER BY pos"
        );
        Ok(self
            .jobs(&sql, &[&self.node])
            .await?
            .into_iter()
            .map(|(j, _)| j)
            .collect())
    }

    /// Cancels recorded for this node's jobs that have not ended.
    pub(crate) async fn cancel_requests(&self) -> Result<Vec<(JobId, String)>, Error> {
        let rows = self
            .query(
                "SELECT c.job_id, c.reason FROM cancels c JOIN jobs j ON j.id = c.job_id \
                 WHERE j.node = $1 AND j.state IN ('PENDING','RUNNING') ORDER BY c.at",
                &[&self.node],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let id: String = r.get(0);
                Ok((id.parse().map_err(Error::Corrupt)?, r.get(1)))
            })
            .collect()
    }

    /// What other nodes write that may concern this one.
    pub(crate) fn notices(&self) -> tokio::sync::broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    pub(crate) async fn outbox_pending(&self) -> Result<u64, Error> {
        self.count("SELECT COUNT(*) FROM outbox WHERE state = 'pending'")
            .await
    }

    pub(crate) async fn outbox_oldest(&self) -> Result<Option<i64>, Error> {
        Ok(self
            .query(
                "SELECT MIN(created_at) FROM outbox WHERE state = 'pending'",
                &[],
            )
            .await?[0]
            .get(0))
    }

    pub(crate) async fn journal(&self, job: JobId) -> Result<Vec<JournalEntry>, Error> {
        let rows = self
            .query(
                "SELECT idx, entry, applied, left_state FROM undo WHERE job_id = $1 ORDER BY idx",
                &[&job.to_string()],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let corrupt = |e: serde_json::Error| Error::Corrupt(e.to_string());
                Ok(JournalEntry {
                    idx: r.get::<_, i64>(0) as u32,
                    entry: serde_json::from_str(r.get::<_, &str>(1)).map_err(corrupt)?,
                    applied: r.get::<_, i16>(2) != 0,
                    left: r
                        .get::<_, Option<&str>>(3)
                        .map(serde_json::from_str)
                        .transpose()
                        .map_err(corrupt)?,
                })
            })
            .collect()
    }

    pub(crate) async fn processes(&self, job: JobId) -> Result<Vec<(i32, u64)>, Error> {
        let rows = self
            .query(
                "SELECT pgid, started FROM processes WHERE job_id = $1",
                &[&job.to_string()],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    pub(crate) async fn outbox(&self, job: JobId) -> Result<Vec<OutboxEntry>, Error> {
        let rows = self
            .query(
                "SELECT n, mail, attempts, state FROM outbox WHERE job_id = $1 AND state = 'pending' ORDER BY n",
                &[&job.to_string()],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxEntry {
                    n: r.get::<_, i64>(0) as u64,
                    mail: serde_json::from_str(r.get::<_, &str>(1))
                        .map_err(|e| Error::Corrupt(e.to_string()))?,
                    attempts: r.get::<_, i64>(2) as u32,
                    state: r.get(3),
                })
            })
            .collect()
    }

    pub(crate) async fn watch_state(&self, job: JobId) -> Result<Option<String>, Error> {
        Ok(self
            .query(
                "SELECT state FROM watch_state WHERE job_id = $1",
                &[&job.to_string()],
            )
            .await?
            .first()
            .map(|r| r.get(0)))
    }

    /// Joins the ledger as `name`: a new epoch for the node, on the database's clock.
    /// The epoch this node joined with (at `open`, before its writer started).
    pub(crate) async fn join(&self, name: &str) -> Result<u64, Error> {
        debug_assert_eq!(name, self.node);
        Ok(self.epoch)
    }

    /// A heartbeat of this epoch of the node; false when a later start of the node has
    /// taken its name.
    pub(crate) async fn heartbeat(&self, name: &str, epoch: u64) -> Result<bool, Error> {
        let c = self.client().await?;
        // Not renewed once lapsed: a node that was away past its lease stays fenced.
        let n = c
            .execute(
                &format!(
                    "UPDATE nodes AS n SET heartbeat_at = now() WHERE n.name = $1 AND n.epoch = $2 AND {WITHIN_LEASE}"
                ),
                &[&name, &(epoch as i64)],
            )
            .await
            .map_err(pg)?;
        Ok(n == 1)
    }

    /// Every node, by name, its state judged on the database's clock.
    pub(crate) async fn nodes(&self) -> Result<Vec<super::NodeRow>, Error> {
        let rows = self
            .query(
                &format!(
                    "SELECT name, epoch, (extract(epoch FROM started_at) * 1000)::bigint, \
                     (extract(epoch FROM heartbeat_at) * 1000)::bigint, \
                     {WITHIN_LEASE}, version, \
                     (extract(epoch FROM now() - heartbeat_at) * 1000)::bigint \
                     FROM nodes n ORDER BY name"
                ),
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| super::NodeRow {
                name: r.get(0),
                epoch: r.get::<_, i64>(1) as u64,
                started_at: r.get(2),
                heartbeat_at: r.get(3),
                up: r.get(4),
                version: r.get(5),
                heartbeat_age_ms: r.get::<_, i64>(6).max(0),
            })
            .collect())
    }

    pub(crate) async fn referenced_blobs(&self) -> Result<HashSet<String>, Error> {
        Ok(self
            .query("SELECT DISTINCT blob FROM undo WHERE blob IS NOT NULL", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }
}
