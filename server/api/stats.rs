//! `stately.v1.Stats`: converts the shared pollers' results into snapshots and deltas for each
//! watcher, with its filter. The polling and diffing live in `crate::stats`.

use super::ts;
use crate::auth::require;
use crate::config::Role;
use crate::pb;
use crate::stats::parse::{Row, RowType, State, Status as RowStatus};
use crate::stats::{DEFAULT_INTERVAL, Filter, Poll, Snapshot, StatsHub};
use futures_util::Stream;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// The `stately.v1.Stats` service.
#[derive(Debug, Clone)]
pub(crate) struct StatsApi {
    pub(crate) hub: Arc<StatsHub>,
    pub(crate) stopping: CancellationToken,
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::StatsUpdate, Status>> + Send>>;

/// Bounds on a filter: each pattern is matched against every row of every poll.
const MAX_PATTERNS: usize = 64;
const MAX_PATTERN_BYTES: usize = 256;

fn filter(f: Option<pb::StatsFilter>) -> Result<Filter, Status> {
    let f = f.unwrap_or_default();
    let types = f
        .types
        .iter()
        .map(|t| match pb::RowType::try_from(*t) {
            Ok(pb::RowType::Frontend) => Ok(RowType::Frontend),
            Ok(pb::RowType::Backend) => Ok(RowType::Backend),
            Ok(pb::RowType::Server) => Ok(RowType::Server),
            Ok(pb::RowType::Listener) => Ok(RowType::Listener),
            _ => Err(Status::invalid_argument(format!(
                "filter.types: {t} is not a row type"
            ))),
        })
        .collect::<Result<_, _>>()?;
    for (what, patterns) in [("proxies", &f.proxies), ("servers", &f.servers)] {
        if patterns.len() > MAX_PATTERNS {
            return Err(Status::invalid_argument(format!(
                "filter.{what}: at most {MAX_PATTERNS} patterns, not {}",
                patterns.len()
            )));
        }
        if let Some(p) = patterns.iter().find(|p| p.len() > MAX_PATTERN_BYTES) {
            return Err(Status::invalid_argument(format!(
                "filter.{what}: pattern {} is longer than {MAX_PATTERN_BYTES} bytes",
                crate::quote::quote(p)
            )));
        }
    }
    if f.types.len() > 8 {
        return Err(Status::invalid_argument(
            "filter.types: at most 8 row types",
        ));
    }
    Ok(Filter {
        proxies: f.proxies,
        servers: f.servers,
        types,
    })
}

#[tonic::async_trait]
impl pb::stats_server::Stats for StatsApi {
    async fn get_stats(
        &self,
        req: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::StatsSnapshot>, Status> {
        require(&req, Role::Viewer, "GetStats")?;
        let r = req.into_inner();
        let target = super::required_target(&r.target)?;
        let filter = filter(r.filter)?;
        let snap = self.hub.snapshot(target).await?;
        Ok(Response::new(snapshot_to_pb(
            target,
            crate::job::now_ms(),
            &snap,
            &filter,
            self.hub.polls(target),
        )))
    }

    type WatchStatsStream = UpdateStream;

    async fn watch_stats(
        &self,
        req: Request<pb::WatchStatsRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        require(&req, Role::Viewer, "WatchStats")?;
        let r = req.into_inner();
        let target = super::required_target(&r.target)?.to_owned();
        let filter = filter(r.filter)?;
        let interval = match r.interval {
            None => DEFAULT_INTERVAL,
            Some(d) => Duration::try_from(d)
                .ok()
                .filter(|d| *d <= Duration::from_secs(3600))
                .ok_or_else(|| Status::invalid_argument("interval must be between 0 and 1 hour"))?,
        };
        let mut sub = self.hub.subscribe(&target, interval)?;
        // One update in flight at most: a slow client then finds the latest poll waiting,
        // with the count of those it missed, rather than a queue of stale ones.
        let (tx, rx) = mpsc::channel(1);
        let stopping = self.stopping.clone();
        let changes_only = r.changes_only;
        let watching = crate::metrics::watching("stats");
        tokio::spawn(async move {
            let _watching = watching;
            let mut last_seq = 0;
            let mut skipped = 0;
            let mut need_full = true;
            let mut last_sent: Option<tokio::time::Instant> = None;
            let mut last_error: Option<String> = None;
            let mut poll = tokio::select! {
                p = sub.latest() => match p { Some(p) => p, None => return },
                _ = tx.closed() => return,
                _ = stopping.cancelled() => return,
            };
            loop {
                // Polls missed because this client read too slowly, owed to it until an update
                // carries the count.
                if last_seq != 0 {
                    skipped += poll.seq.saturating_sub(last_seq + 1);
                }
                last_seq = poll.seq;
                let update = match &poll.result {
                    // Said once per distinct failure, not every tick.
                    Err(e) => {
                        need_full = true;
                        let msg = e.to_string();
                        (last_error.as_ref() != Some(&msg))
                            .then(|| {
                                last_error = Some(msg);
                                update_for(&target, &poll, &filter, false, skipped)
                            })
                            .flatten()
                    }
                    Ok(_) => {
                        last_error = None;
                        // Full snapshots come at this watcher's own pace, even when the shared
                        // poller ticks faster for someone else; deltas come as they happen.
                        let due = changes_only
                            || need_full
                            || skipped > 0
                            || last_sent.is_none_or(|t| {
                                t.elapsed() + Duration::from_millis(20) >= interval
                            });
                        let u = due
                            .then(|| {
                                update_for(
                                    &target,
                                    &poll,
                                    &filter,
                                    changes_only && !need_full && skipped == 0,
                                    skipped,
                                )
                            })
                            .flatten();
                        if due {
                            need_full = false;
                        }
                        u
                    }
                };
                if let Some(u) = update {
                    skipped = 0;
                    tokio::select! {
                        r = tx.send(Ok(u)) => if r.is_err() { return },
                        _ = stopping.cancelled() => return,
                    }
                    last_sent = Some(tokio::time::Instant::now());
                }
                poll = tokio::select! {
                    p = sub.next() => match p { Some(p) => p, None => return },
                    _ = tx.closed() => return,
                    _ = stopping.cancelled() => return,
                };
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// What a watcher is sent for one poll: a delta (if `delta_ok` and anything it wants changed),
/// a full snapshot, or what went wrong.
fn update_for(
    target: &str,
    poll: &Poll,
    filter: &Filter,
    delta_ok: bool,
    skipped: u64,
) -> Option<pb::StatsUpdate> {
    use pb::stats_update::Update;
    let update = match &poll.result {
        Err(e @ crate::stats::Error::Parse { .. }) => Update::ParseError(e.to_string()),
        Err(e) => Update::Unreachable(e.to_string()),
        Ok(snap) => match (&poll.delta, delta_ok) {
            (Some(delta), true) => {
                let d = pb::StatsDelta {
                    changed: delta
                        .changed
                        .iter()
                        .filter(|(i, _)| filter.accepts(&snap.rows[*i]))
                        .map(|(i, before)| pb::RowChange {
                            row: Some(row_to_pb(&snap.rows[*i])),
                            previous_status: Some(status_to_pb(before)),
                        })
                        .collect(),
                    added: delta
                        .added
                        .iter()
                        .map(|i| &snap.rows[*i])
                        .filter(|r| filter.accepts(r))
                        .map(row_to_pb)
                        .collect(),
                    removed: delta
                        .removed
                        .iter()
                        .filter(|r| filter.accepts(r))
                        .map(|r| pb::RemovedRow {
                            proxy: r.proxy.to_string(),
                            server: r.server.to_string(),
                        })
                        .collect(),
                };
                if d.changed.is_empty() && d.added.is_empty() && d.removed.is_empty() {
                    return None;
                }
                Update::Delta(d)
            }
            _ => Update::Snapshot(snapshot_to_pb(target, poll.at, snap, filter, poll.seq)),
        },
    };
    Some(pb::StatsUpdate {
        target: target.to_owned(),
        at: Some(ts(poll.at)),
        poll: poll.seq,
        skipped,
        update: Some(update),
    })
}

fn snapshot_to_pb(
    target: &str,
    at: i64,
    snap: &Snapshot,
    filter: &Filter,
    polls: u64,
) -> pb::StatsSnapshot {
    pb::StatsSnapshot {
        target: target.to_owned(),
        at: Some(ts(at)),
        rows: snap
            .rows
            .iter()
            .filter(|r| filter.accepts(r))
            .map(row_to_pb)
            .collect(),
        polls,
    }
}

fn status_to_pb(s: &RowStatus) -> pb::Status {
    let state = match s.state {
        State::Up => pb::ServerState::Up,
        State::Down => pb::ServerState::Down,
        State::Maint => pb::ServerState::Maint,
        State::Drain => pb::ServerState::Drain,
        State::Nolb => pb::ServerState::Nolb,
        State::NoCheck => pb::ServerState::NoCheck,
        State::Open => pb::ServerState::Open,
        State::Full => pb::ServerState::Full,
        State::Stopped => pb::ServerState::Stopped,
        State::Other => pb::ServerState::Other,
    };
    pb::Status {
        state: state as i32,
        raw: s.raw.to_string(),
        checks_done: s.checks.map(|c| c.0),
        checks_needed: s.checks.map(|c| c.1),
        transitional: s.transitional(),
    }
}

fn row_to_pb(r: &Row) -> pb::StatsRow {
    let kind = match r.kind {
        RowType::Frontend => pb::RowType::Frontend,
        RowType::Backend => pb::RowType::Backend,
        RowType::Server => pb::RowType::Server,
        RowType::Listener => pb::RowType::Listener,
    };
    pb::StatsRow {
        proxy: r.proxy.to_string(),
        server: r.server.to_string(),
        r#type: kind as i32,
        status: Some(status_to_pb(&r.status)),
        current_sessions: r.current_sessions,
        max_sessions: r.max_sessions,
        session_limit: r.session_limit,
        total_sessions: r.total_sessions,
        session_rate: r.session_rate,
        request_rate: r.request_rate,
        check_status: r.check_status.as_deref().unwrap_or_default().to_owned(),
        check_in_progress: r.check_in_progress,
        check_code: r.check_code,
        check_description: r
            .check_description
            .as_deref()
            .unwrap_or_default()
            .to_owned(),
        last_change_seconds: r.last_change,
        downtime_seconds: r.downtime,
        http_5xx: r.http_5xx,
        weight: r.weight,
        address: r.address.as_deref().unwrap_or_default().to_owned(),
        cookie: r.cookie.as_deref().unwrap_or_default().to_owned(),
    }
}
