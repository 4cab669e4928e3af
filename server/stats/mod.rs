//! HAProxy stats: one shared poller per stats socket, however many watch it.
//!
//! A poller asks `show stat` on a fresh connection each tick (a persistent CLI connection
//! would stay on the old worker after a reload), parses it, works out what changed since the
//! previous poll once for everybody, and publishes the result on a `watch` channel. Watchers
//! read the latest result: a slow one skips to it and is told how many polls it missed, so it
//! neither slows the others nor holds memory. The tick is the smallest interval any watcher
//! asks for; the poller stops when its last watcher leaves.

pub mod logs;
pub mod parse;

use parse::{ParseError, Row, RowType, Text};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::watch;

/// The smallest poll interval.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Polls a log stream's wake-ups cause are at least this far apart (per target).
const EVENT_GAP: Duration = Duration::from_millis(2);
/// The interval when a watcher asks for none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// A poll that takes longer than this is a failure.
const POLL_TIMEOUT: Duration = Duration::from_secs(5);
/// `show stat` answers larger than this are refused (5000 servers is ~1.3 MB).
const MAX_ANSWER: usize = 64 << 20;

/// The read buffer of a `show stat` answer: more than HAProxy's socket buffer holds, so one
/// read takes all that gathered.
const CHUNK: usize = 256 << 10;

/// HAProxy writes an answer 16 kB at a time as fast as it makes it (~60 kB a millisecond at
/// 5000 servers), and a reader blocked on the socket is woken for each write: ~70 times a
/// poll, a third of the poll's CPU in those wake-ups. A poller, whose answers are late by a
/// millisecond or two without harm, reads without blocking and lets the answer gather for
/// GATHER whenever it has read all there was (~10 wake-ups a poll): HAProxy's socket buffer
/// holds ~200 kB, so HAProxy waits little if at all.
/// A one-off fetch (GetStats, an apply's check of the new worker) reads as the answer comes.
const GATHER: Duration = Duration::from_millis(2);

/// Why stats could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// No such target in the configuration.
    #[error("{0}")]
    UnknownTarget(String),
    /// The socket could not be reached or read.
    #[error("stats socket {socket}: {reason}")]
    Unreachable {
        /// The socket path.
        socket: String,
        /// Why.
        reason: String,
    },
    /// The answer could not be parsed.
    #[error("stats socket {socket}: {source}")]
    Parse {
        /// The socket path.
        socket: String,
        /// What was wrong.
        source: ParseError,
    },
}

/// The rows of one poll.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// In HAProxy's order.
    pub rows: Vec<Row>,
    /// proxy → server → row, built on first use (a diff of polls in the same order, the
    /// usual case, needs none).
    index: std::sync::OnceLock<HashMap<Text, HashMap<Text, usize>>>,
    /// The poll before, and per row whether it is that poll's row at the same place but for
    /// `lastchg` (see `parse::Memory`): a diff from it skips those rows.
    taken: Option<(std::sync::Weak<Snapshot>, Vec<bool>)>,
}

impl Snapshot {
    pub(crate) fn new(rows: Vec<Row>) -> Snapshot {
        Snapshot {
            rows,
            index: Default::default(),
            taken: None,
        }
    }

    /// The rows of a poll whose parse took rows from `before`'s (`taken`: which).
    fn following(rows: Vec<Row>, before: &Arc<Snapshot>, taken: Vec<bool>) -> Snapshot {
        Snapshot {
            taken: Some((Arc::downgrade(before), taken)),
            ..Snapshot::new(rows)
        }
    }

    /// The row of that proxy and server.
    pub fn get(&self, proxy: &str, server: &str) -> Option<&Row> {
        let index = self.index.get_or_init(|| {
            let mut index: HashMap<Text, HashMap<Text, usize>> = HashMap::new();
            for (i, r) in self.rows.iter().enumerate() {
                index
                    .entry(r.proxy.clone())
                    .or_default()
                    .insert(r.server.clone(), i);
            }
            index
        });
        index.get(proxy)?.get(server).map(|i| &self.rows[*i])
    }

    /// What changed from `before` to `self`, in operator terms (not the counters).
    pub fn delta_since(&self, before: &Snapshot) -> Delta {
        let mut delta = Delta::default();
        let mut same_order = self.rows.len() == before.rows.len();
        // A weak reference keeps its allocation, so an address equal to it is that snapshot.
        let taken = self
            .taken
            .as_ref()
            .filter(|(from, _)| std::ptr::eq(from.as_ptr(), before))
            .map(|(_, taken)| taken);
        for (i, row) in self.rows.iter().enumerate() {
            if taken.is_some_and(|t| t[i]) {
                continue;
            }
            let at_same_place = before
                .rows
                .get(i)
                .filter(|o| o.proxy == row.proxy && o.server == row.server);
            if at_same_place.is_none() {
                same_order = false;
            }
            match at_same_place.or_else(|| before.get(&row.proxy, &row.server)) {
                Some(old) if row.state_differs(old) => delta.changed.push((i, old.status.clone())),
                Some(_) => {}
                None => delta.added.push(i),
            }
        }
        if !same_order {
            for old in &before.rows {
                if self.get(&old.proxy, &old.server).is_none() {
                    delta.removed.push(old.clone());
                }
            }
        }
        delta
    }
}

/// Changes between two polls; indexes point into the newer snapshot's rows.
#[derive(Debug, Default, Clone)]
pub struct Delta {
    /// Rows whose state changed, with the status they had before.
    pub changed: Vec<(usize, parse::Status)>,
    /// Rows that are new.
    pub added: Vec<usize>,
    /// Rows that are gone (as they were last seen).
    pub removed: Vec<Row>,
}

impl Delta {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.added.is_empty() && self.removed.is_empty()
    }
}

/// One poll's result, shared by every watcher.
#[derive(Debug)]
pub struct Poll {
    /// The socket's poll counter at this poll (1, 2, ...).
    pub seq: u64,
    /// Unix milliseconds.
    pub at: i64,
    /// The rows, or why there are none.
    pub result: Result<Arc<Snapshot>, Error>,
    /// What changed since the previous successful poll (None for the first, or after a
    /// failure).
    pub delta: Option<Delta>,
}

/// Which rows a watcher wants.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Proxy names or globs; empty: all.
    pub proxies: Vec<String>,
    /// Server names or globs; empty: all.
    pub servers: Vec<String>,
    /// Row types; empty: all.
    pub types: Vec<RowType>,
}

impl Filter {
    /// Whether a row passes.
    pub fn accepts(&self, row: &Row) -> bool {
        self.accepts_names(&row.proxy, &row.server)
            && (self.types.is_empty() || self.types.contains(&row.kind))
    }

    fn accepts_names(&self, proxy: &str, server: &str) -> bool {
        (self.proxies.is_empty() || self.proxies.iter().any(|p| glob(p, proxy)))
            && (self.servers.is_empty() || self.servers.iter().any(|s| glob(s, server)))
    }
}

/// `*` and `?` globbing on bytes, iteratively (no backtracking blow-up); a pattern without
/// wildcards is a plain comparison.
fn glob(pattern: &str, text: &str) -> bool {
    if !pattern.contains(['*', '?']) {
        return pattern == text;
    }
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// All stats pollers of the daemon, by target.
#[derive(Debug)]
pub struct StatsHub {
    sockets: std::sync::RwLock<HashMap<String, PathBuf>>,
    pollers: Mutex<HashMap<String, Weak<Poller>>>,
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

/// A running poller; it stops when the last `Subscription` holding it is dropped.
#[derive(Debug)]
struct Poller {
    rx: watch::Receiver<Arc<Poll>>,
    intervals: Arc<Mutex<HashMap<u64, Duration>>>,
    /// Wakes the loop when a watcher joins, so a shorter interval takes effect at once.
    joined: Arc<tokio::sync::Notify>,
    /// Wakes the loop for a poll now (HAProxy logged a state change).
    wake: Arc<tokio::sync::Notify>,
    next_id: AtomicU64,
    task: tokio::task::AbortHandle,
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A watcher's hold on a poller.
#[derive(Debug)]
pub struct Subscription {
    poller: Arc<Poller>,
    id: u64,
    rx: watch::Receiver<Arc<Poll>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.poller
            .intervals
            .lock()
            .expect("interval lock")
            .remove(&self.id);
    }
}

impl Subscription {
    /// The latest poll (waits for the first one).
    pub async fn latest(&mut self) -> Option<Arc<Poll>> {
        self.rx.wait_for(|p| p.seq > 0).await.ok()?;
        Some(self.rx.borrow_and_update().clone())
    }

    /// Waits for a poll newer than the last one this subscription returned.
    pub async fn next(&mut self) -> Option<Arc<Poll>> {
        self.rx.changed().await.ok()?;
        Some(self.rx.borrow_and_update().clone())
    }
}

impl StatsHub {
    /// A hub for the configured targets' stats sockets.
    pub fn new(sockets: HashMap<String, PathBuf>) -> StatsHub {
        StatsHub {
            sockets: std::sync::RwLock::new(sockets),
            pollers: Mutex::new(HashMap::new()),
            counters: Mutex::new(HashMap::new()),
        }
    }

    /// The targets of a reloaded configuration: a target whose socket changed (or that is
    /// gone) gets a new poller at its next subscription; watchers of the old one keep it
    /// until they leave.
    pub fn set_sockets(&self, sockets: HashMap<String, PathBuf>) {
        let mut current = self.sockets.write().expect("sockets lock");
        let mut pollers = self.pollers.lock().expect("poller lock");
        pollers.retain(|target, _| current.get(target) == sockets.get(target));
        *current = sockets;
    }

    fn counter(&self, target: &str) -> Arc<AtomicU64> {
        self.counters
            .lock()
            .expect("counter lock")
            .entry(target.to_owned())
            .or_default()
            .clone()
    }

    /// The latest poll of a target's running poller, if one runs (nothing is polled for it).
    pub fn latest(&self, target: &str) -> Option<Arc<Poll>> {
        let pollers = self.pollers.lock().expect("poller lock");
        let p = pollers.get(target)?.upgrade()?;
        let latest = p.rx.borrow().clone();
        (latest.seq > 0).then_some(latest)
    }

    /// How many times a target's socket has been polled since start.
    pub fn polls(&self, target: &str) -> u64 {
        self.counter(target).load(Ordering::SeqCst)
    }

    fn socket(&self, target: &str) -> Result<PathBuf, Error> {
        let sockets = self.sockets.read().expect("sockets lock");
        sockets.get(target).cloned().ok_or_else(|| {
            let mut known: Vec<&str> = sockets.keys().map(String::as_str).collect();
            known.sort();
            Error::UnknownTarget(format!(
                "no HAProxy target {} with a stats socket is configured{}",
                crate::quote::quote(target),
                if known.is_empty() {
                    " (none are)".to_owned()
                } else {
                    format!(" (targets: {})", known.join(", "))
                }
            ))
        })
    }

    /// Makes `target`'s running poller poll now (when something says its state changed);
    /// nothing when no one watches it.
    pub fn wake(&self, target: &str) {
        let pollers = self.pollers.lock().expect("poller lock");
        if let Some(p) = pollers.get(target).and_then(Weak::upgrade) {
            p.wake.notify_one();
        }
    }

    /// Subscribes to a target's shared poller, starting it if needed, at most `interval`
    /// apart (clamped to at least `MIN_INTERVAL`).
    pub fn subscribe(&self, target: &str, interval: Duration) -> Result<Subscription, Error> {
        let socket = self.socket(target)?;
        let interval = interval.max(MIN_INTERVAL);
        let mut pollers = self.pollers.lock().expect("poller lock");
        let poller = match pollers.get(target).and_then(Weak::upgrade) {
            Some(p) => p,
            None => {
                let counter = self.counter(target);
                let p = Arc::new(start_poller(target.to_owned(), socket, counter));
                pollers.insert(target.to_owned(), Arc::downgrade(&p));
                p
            }
        };
        let id = poller.next_id.fetch_add(1, Ordering::SeqCst);
        poller
            .intervals
            .lock()
            .expect("interval lock")
            .insert(id, interval);
        poller.joined.notify_one();
        let rx = poller.rx.clone();
        Ok(Subscription { poller, id, rx })
    }

    /// One snapshot now, from a fresh poll (not counted as a tick of the shared poller).
    pub async fn snapshot(&self, target: &str) -> Result<Arc<Snapshot>, Error> {
        let socket = self.socket(target)?;
        self.counter(target).fetch_add(1, Ordering::SeqCst);
        fetch(&socket)
            .await
            .map(|rows| Arc::new(Snapshot::new(rows)))
    }
}

fn start_poller(target: String, socket: PathBuf, counter: Arc<AtomicU64>) -> Poller {
    let first = Arc::new(Poll {
        seq: 0,
        at: 0,
        result: Ok(Arc::default()),
        delta: None,
    });
    let (tx, rx) = watch::channel(first);
    let intervals: Arc<Mutex<HashMap<u64, Duration>>> = Arc::default();
    let joined: Arc<tokio::sync::Notify> = Arc::default();
    let wake: Arc<tokio::sync::Notify> = Arc::default();
    let task = tokio::spawn(poll_loop(
        target,
        socket,
        tx,
        intervals.clone(),
        joined.clone(),
        wake.clone(),
        counter,
    ))
    .abort_handle();
    Poller {
        rx,
        intervals,
        joined,
        wake,
        next_id: AtomicU64::new(0),
        task,
    }
}

async fn poll_loop(
    target: String,
    socket: PathBuf,
    tx: watch::Sender<Arc<Poll>>,
    intervals: Arc<Mutex<HashMap<u64, Duration>>>,
    joined: Arc<tokio::sync::Notify>,
    wake: Arc<tokio::sync::Notify>,
    counter: Arc<AtomicU64>,
) {
    let mut previous: Option<Arc<Snapshot>> = None;
    let mut recall = Recall::default();
    // This poller's own sequence (what `skipped` is computed from); `counter` counts every
    // poll of the socket, one-shot GetStats included.
    let mut seq = 0;
    loop {
        let started = tokio::time::Instant::now();
        counter.fetch_add(1, Ordering::SeqCst);
        seq += 1;
        let (result, kept) = poll_once(&socket, recall).await;
        recall = kept;
        let took = started.elapsed();
        crate::metrics::stats_polled(&target, started.elapsed().as_secs_f64(), result.is_ok());
        let delta = match (&result, &previous) {
            (Ok(now), Some(before)) => Some(now.delta_since(before)),
            _ => None,
        };
        previous = result.as_ref().ok().cloned();
        tx.send_replace(Arc::new(Poll {
            seq,
            at: crate::job::now_ms(),
            result,
            delta,
        }));
        // Sleep until the smallest interval has passed since this poll began; a watcher
        // joining with a shorter one shortens the wait (to nothing if it is already over).
        loop {
            let interval = intervals
                .lock()
                .expect("interval lock")
                .values()
                .min()
                .copied()
                .unwrap_or(DEFAULT_INTERVAL);
            tokio::select! {
                _ = tokio::time::sleep_until(started + interval) => break,
                _ = joined.notified() => {}
                _ = wake.notified() => {
                    // Wake-ups close together (a flapping server, the DOWN line and the
                    // backend's, a flood of forged lines) make one poll per EVENT_GAP at most,
                    // and never keep HAProxy answering `show stat` more than half the time
                    // (a 5000-server poll is tens of ms of its CPU). The permit of a wake that
                    // arrives during a poll is kept, so the last change is polled too.
                    tokio::time::sleep_until(started + EVENT_GAP.max(took * 2)).await;
                    break;
                }
            }
        }
    }
}

/// One `show stat` on a fresh connection, parsed: blocking I/O on a blocking thread, which
/// costs less CPU than waking the reactor for each of the ~70 chunks of a large answer.
pub(crate) async fn fetch(socket: &Path) -> Result<Vec<Row>, Error> {
    fetch_with(socket, "show stat\n".into()).await
}

/// The frontend and backend rows alone (`show stat -1 3 -1`): which proxies a worker runs,
/// without the server rows (at 5000 servers 26 kB instead of 1.1 MB, under a millisecond of
/// HAProxy's time instead of ~20).
pub(crate) async fn fetch_proxies(socket: &Path) -> Result<Vec<Row>, Error> {
    fetch_with(socket, "show stat -1 3 -1\n".into()).await
}

/// The rows of one proxy (`show stat <proxy> -1 -1`): what a step that looks at one backend
/// needs, without reading the 5,000 rows of the others. `proxy` is a checked HAProxy name.
pub(crate) async fn fetch_proxy(socket: &Path, proxy: &str) -> Result<Vec<Row>, Error> {
    if proxy.is_empty()
        || proxy
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ';')
    {
        return Err(Error::UnknownTarget(format!(
            "'{proxy}' is not a proxy name"
        )));
    }
    fetch_with(socket, format!("show stat {proxy} -1 -1\n")).await
}

async fn fetch_with(socket: &Path, command: String) -> Result<Vec<Row>, Error> {
    let socket = socket.to_owned();
    tokio::task::spawn_blocking(move || fetch_blocking(&socket, &command))
        .await
        .map_err(|e| Error::Unreachable {
            socket: String::new(),
            reason: e.to_string(),
        })?
}

/// What a poller keeps from one poll for the next: the answer's lines and its rows, so that
/// the lines that did not change are not parsed again (see `parse::Memory`), and the buffers
/// of the poll before, to be filled again.
#[derive(Default)]
struct Recall {
    lines: parse::Memory,
    rows: Option<Arc<Snapshot>>,
    spare: parse::Memory,
}

/// A poller's `show stat`, taking the rows of unchanged lines from the poll before.
async fn poll_once(socket: &Path, mut recall: Recall) -> (Result<Arc<Snapshot>, Error>, Recall) {
    let socket = socket.to_owned();
    let polled = tokio::task::spawn_blocking(move || {
        let into = std::mem::take(&mut recall.spare);
        let before = recall.rows.as_ref().map(|s| (&recall.lines, &s.rows[..]));
        let parser = parse::Parser::remembering(before, into);
        match read_answer(&socket, "show stat\n", parser, true) {
            Ok((rows, recalled)) => {
                let recalled = recalled.expect("a remembering parse");
                let now = Arc::new(match &recall.rows {
                    Some(before) => Snapshot::following(rows, before, recalled.taken),
                    None => Snapshot::new(rows),
                });
                recall.spare = std::mem::replace(&mut recall.lines, recalled.memory);
                recall.rows = Some(now.clone());
                (Ok(now), recall)
            }
            Err(e) => {
                recall.rows = None;
                (Err(e), recall)
            }
        }
    })
    .await;
    polled.unwrap_or_else(|e| {
        (
            Err(Error::Unreachable {
                socket: String::new(),
                reason: e.to_string(),
            }),
            Recall::default(),
        )
    })
}

fn fetch_blocking(socket: &Path, command: &str) -> Result<Vec<Row>, Error> {
    let (rows, _) = read_answer(socket, command, parse::Parser::new(0), false)?;
    Ok(rows)
}

/// Sends `command` on a fresh connection and parses the answer as it arrives (letting it
/// `gather`, see GATHER).
fn read_answer(
    socket: &Path,
    command: &str,
    mut parser: parse::Parser<'_>,
    gather: bool,
) -> Result<(Vec<Row>, Option<parse::Recalled>), Error> {
    use std::io::{Read, Write};
    let unreachable = |e: std::io::Error| {
        let reason = match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                format!("no answer within {POLL_TIMEOUT:?}")
            }
            _ => e.to_string(),
        };
        Error::Unreachable {
            socket: socket.display().to_string(),
            reason,
        }
    };
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(unreachable)?;
    s.set_read_timeout(Some(POLL_TIMEOUT))
        .map_err(unreachable)?;
    s.set_write_timeout(Some(POLL_TIMEOUT))
        .map_err(unreachable)?;
    s.write_all(command.as_bytes()).map_err(unreachable)?;
    // Each chunk read is parsed before the next is read, in a buffer kept by the thread
    // between polls (a fresh one each time is fresh pages to fault in and zero) and small
    // enough to stay in the cache; only a line longer than it grows it.
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let bad = |source| Error::Parse {
        socket: socket.display().to_string(),
        source,
    };
    BUF.with_borrow_mut(|buf| {
        if buf.len() < CHUNK {
            buf.resize(CHUNK, 0);
        }
        let (mut kept, mut total) = (0, 0);
        let deadline = std::time::Instant::now() + POLL_TIMEOUT;
        if gather {
            s.set_nonblocking(true).map_err(unreachable)?;
        }
        loop {
            if kept == buf.len() {
                let longer = (buf.len() * 2).min(MAX_ANSWER + 1);
                buf.resize(longer, 0);
            }
            let room = (buf.len() - kept).min(MAX_ANSWER - total);
            if room == 0 {
                // Longer than any answer of HAProxy's: what was read ends cut short.
                break;
            }
            let n = match s.read(&mut buf[kept..kept + room]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if gather && e.kind() == std::io::ErrorKind::WouldBlock => {
                    // All there was is read. An answer's only empty line is its last: then
                    // HAProxy has no more to say, and its close is not waited for.
                    if parser.ended() {
                        break;
                    }
                    if std::time::Instant::now() > deadline {
                        return Err(unreachable(std::io::ErrorKind::TimedOut.into()));
                    }
                    std::thread::sleep(GATHER);
                    continue;
                }
                Err(e) => return Err(unreachable(e)),
            };
            total += n;
            let end = kept + n;
            let used = parser.feed(&buf[..end]).map_err(bad)?;
            buf.copy_within(used..end, 0);
            kept = end - used;
        }
        let rows = parser.finish_remembering(&buf[..kept]).map_err(bad);
        // A one-off long line does not keep its buffer.
        if buf.len() > 4 * CHUNK {
            *buf = Vec::new();
        }
        rows
    })
}

#[cfg(test)]
mod tests {
    use super::{Snapshot, glob, parse};
    use std::sync::Arc;

    #[test]
    fn a_diff_skips_only_rows_taken_from_the_poll_it_is_from() {
        let a = include_str!("testdata/show-stat-2.6.csv");
        // The next poll: two servers' lastchg moved on (the other lines are as they were),
        // and one server went DOWN → UP.
        let b = a
            .replace(",46,46,", ",47,46,")
            .replacen(",DOWN,", ",UP,", 1);
        assert_ne!(a, b);
        let parse_into = |text: &str, before: Option<(&parse::Memory, &[parse::Row])>| {
            let mut p = parse::Parser::remembering(before, parse::Memory::default());
            let used = p.feed(text.as_bytes()).unwrap();
            let (rows, recalled) = p.finish_remembering(&text.as_bytes()[used..]).unwrap();
            (rows, recalled.unwrap())
        };
        let (rows, first) = parse_into(a, None);
        let before = Arc::new(Snapshot::new(rows));
        let (rows, next) = parse_into(&b, Some((&first.memory, &before.rows)));
        assert!(next.taken.iter().any(|t| *t) && next.taken.iter().any(|t| !*t));
        let skipping = Snapshot::following(rows.clone(), &before, next.taken);
        let plain = Snapshot::new(rows);
        let (d1, d2) = (skipping.delta_since(&before), plain.delta_since(&before));
        assert_eq!(d1.changed, d2.changed);
        assert_eq!((d1.added, d1.removed), (d2.added, d2.removed));
        assert_eq!(d1.changed.len(), 1);
        // From another snapshot (the same rows, not the one parsed from), nothing is skipped.
        let other = Snapshot::new(
            before
                .rows
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.status = parse::Status::parse("MAINT");
                    r
                })
                .collect(),
        );
        assert_eq!(
            skipping.delta_since(&other).changed.len(),
            plain.delta_since(&other).changed.len()
        );
        assert!(plain.delta_since(&other).changed.len() > 1);
    }

    #[test]
    fn globs_match_like_a_shell() {
        assert!(glob("web*", "web1"));
        assert!(glob("*", ""));
        assert!(glob("w?b", "web"));
        assert!(!glob("web", "web1"));
        assert!(glob("*-*-x", "a-b-c-x"));
        assert!(!glob("a*b", "acbd"));
    }
}
