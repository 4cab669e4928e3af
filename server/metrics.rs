//! `/metrics` for Prometheus, with the official prometheus-client crate, on its own HTTP
//! listener (`metrics_listen`; off when unset). Events are counted where they happen (a job
//! ending, a stats poll); what is a state rather than an event (jobs by kind and state,
//! certificate expiry, HAProxy server status, the outbox) is read when scraped, from what the
//! daemon already holds — the shared stats pollers' latest poll, so a scrape costs HAProxy no
//! poll of its own.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::OnceLock;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Finished {
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    kind: String,
    step: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Resource {
    resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    target: String,
    severity: String,
    tag: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Renewal {
    trigger: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LogLine {
    target: String,
    line: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Watcher {
    stream: String,
}

/// The counters and histograms events feed.
struct Events {
    finished: Family<Finished, Counter>,
    duration: Family<Kind, Histogram>,
    steps: Family<StepLabels, Histogram>,
    cancel_unwound: Family<Kind, Histogram>,
    queue_wait: Family<Resource, Histogram>,
    poll_duration: Family<Target, Histogram>,
    polls_failed: Family<Target, Counter>,
    reloads: Family<Outcome, Counter>,
    deliveries: Family<Outcome, Counter>,
    transitions: Family<TransitionLabels, Counter>,
    renewals: Family<Renewal, Counter>,
    watchers: Family<Watcher, Gauge>,
    log_lines: Family<LogLine, Counter>,
    /// The label values admitted so far for labels a client's input can vary (step names of
    /// runbooks, resources templated from parameters): each family takes at most
    /// `MAX_VALUES` distinct ones, the rest count as "other", so no client can grow a scrape
    /// without bound.
    admitted: std::sync::Mutex<
        std::collections::HashMap<&'static str, std::collections::HashSet<String>>,
    >,
}

/// Distinct client-variable label values a family takes before the rest count as "other".
const MAX_VALUES: usize = 200;

impl Events {
    fn bounded(&self, family: &'static str, value: &str) -> String {
        let mut admitted = self.admitted.lock().expect("metrics lock");
        let set = admitted.entry(family).or_default();
        if set.contains(value) {
            return value.to_owned();
        }
        if set.len() >= MAX_VALUES {
            return "other".into();
        }
        set.insert(value.to_owned());
        value.to_owned()
    }
}

/// A step ended (succeeded, failed or cancelled) after running `seconds`.
pub(crate) fn step_finished(kind: &str, step: &str, state: &str, seconds: f64) {
    let e = events();
    let step = e.bounded("step", step);
    e.steps
        .get_or_create(&StepLabels {
            kind: kind.into(),
            step,
            state: state.into(),
        })
        .observe(seconds);
}

/// A cancelled job's unwind finished, `seconds` after the cancel was asked for.
pub(crate) fn cancel_unwound(kind: &str, seconds: f64) {
    events()
        .cancel_unwound
        .get_or_create(&Kind { kind: kind.into() })
        .observe(seconds);
}

/// A job got its turn on its resources after waiting `seconds` (observed once per resource).
/// A lineage's name is left out of the label (there may be thousands): `cert`.
pub(crate) fn queue_waited(resources: &[String], seconds: f64) {
    let e = events();
    let none = ["none".to_owned()];
    let resources = if resources.is_empty() {
        &none[..]
    } else {
        resources
    };
    for r in resources {
        let label = if r.starts_with("cert:") {
            "cert".to_owned()
        } else {
            e.bounded("resource", r)
        };
        e.queue_wait
            .get_or_create(&Resource { resource: label })
            .observe(seconds);
    }
}

/// An alert watch saw a transition worth telling.
pub(crate) fn alert_transition(target: &str, severity: &str, tag: &str) {
    events()
        .transitions
        .get_or_create(&TransitionLabels {
            target: target.into(),
            severity: severity.into(),
            tag: tag.into(),
        })
        .inc();
}

/// A stream following something live (a job's events, a target's stats), counted while open.
pub(crate) struct Watching(Watcher);

/// Counts a stream of `kind` ("job" or "stats") until the guard is dropped.
pub(crate) fn watching(kind: &str) -> Watching {
    let w = Watcher {
        stream: kind.into(),
    };
    events().watchers.get_or_create(&w).inc();
    Watching(w)
}

impl Drop for Watching {
    fn drop(&mut self) {
        events().watchers.get_or_create(&self.0).dec();
    }
}

fn outcome(ok: bool) -> Outcome {
    Outcome {
        result: if ok { "ok" } else { "failed" }.into(),
    }
}

/// A poll of a target's stats socket, how long it took and whether it answered.
pub(crate) fn stats_polled(target: &str, seconds: f64, ok: bool) {
    let e = events();
    let t = Target {
        target: target.into(),
    };
    e.poll_duration.get_or_create(&t).observe(seconds);
    if !ok {
        e.polls_failed.get_or_create(&t).inc();
    }
}

/// A datagram of a target's HAProxy log stream: a state change (which woke the poller), or
/// not.
pub(crate) fn log_line(target: &str, state_change: bool) {
    events()
        .log_lines
        .get_or_create(&LogLine {
            target: target.into(),
            line: if state_change {
                "state_change"
            } else {
                "other"
            }
            .into(),
        })
        .inc();
}

/// A HAProxy reload through the master CLI, confirmed or not.
pub(crate) fn haproxy_reloaded(ok: bool) {
    events().reloads.get_or_create(&outcome(ok)).inc();
}

/// An alert mail's delivery attempt, accepted by the relay or not.
pub(crate) fn mail_sent(ok: bool) {
    events().deliveries.get_or_create(&outcome(ok)).inc();
}

fn events() -> &'static Events {
    static EVENTS: OnceLock<Events> = OnceLock::new();
    EVENTS.get_or_init(|| Events {
        finished: Family::default(),
        duration: Family::new_with_constructor(|| {
            // 10 ms to ~20 min: a one-step runbook to an ACME issuance with slow validation.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.01, 4.0, 10,
            ))
        }),
        poll_duration: Family::new_with_constructor(|| {
            // 100 µs to ~3 s: a small HAProxy to 5000 servers on a busy machine.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 3.0, 10,
            ))
        }),
        steps: Family::new_with_constructor(|| {
            // 1 ms to ~4.7 h: a file write to a long ACME validation or a drain.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.001, 4.0, 13,
            ))
        }),
        cancel_unwound: Family::new_with_constructor(|| {
            // 1 ms to ~9 min: a cancel between steps to an unwind that reloads HAProxy.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.001, 3.0, 13,
            ))
        }),
        queue_wait: Family::new_with_constructor(|| {
            // 100 µs (no wait) to ~7 h behind a long job.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 5.0, 13,
            ))
        }),
        polls_failed: Family::default(),
        reloads: Family::default(),
        deliveries: Family::default(),
        transitions: Family::default(),
        renewals: Family::default(),
        watchers: Family::default(),
        log_lines: Family::default(),
        admitted: Default::default(),
    })
}

/// A job ended: counted by kind and outcome, its run time (from submission) observed; a
/// certificate issuance submitted as a renewal (`trigger` renew or auto-renew) is a renewal.
pub(crate) fn job_finished(kind: &str, outcome: &str, seconds: f64, trigger: Option<&str>) {
    let e = events();
    if kind == "certificate_issue"
        && let Some(t @ ("renew" | "auto-renew")) = trigger
    {
        e.renewals
            .get_or_create(&Renewal {
                trigger: t.into(),
                result: outcome.to_ascii_lowercase(),
            })
            .inc();
    }
    e.finished
        .get_or_create(&Finished {
            kind: kind.into(),
            outcome: outcome.to_ascii_lowercase(),
        })
        .inc();
    e.duration
        .get_or_create(&Kind { kind: kind.into() })
        .observe(seconds);
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    kind: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Lineage {
    lineage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Target {
    target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: String,
}

/// The states HAProxy's own exporter (promex) gives `haproxy_server_status`, one series each.
const SERVER_STATES: [&str; 5] = ["DOWN", "UP", "MAINT", "DRAIN", "NOLB"];

/// A `show stat` status as promex classes the server: running ("UP", "UP 1/3" going down,
/// "no check") is UP, DRAIN when draining; stopping is NOLB; MAINT in any form (via a
/// tracked server, from resolution) is MAINT; anything else is DOWN.
fn server_state(raw: &str) -> u8 {
    match raw.split([' ', '(']).next().unwrap_or("") {
        "UP" | "no" => 1,
        "MAINT" => 2,
        "DRAIN" => 3,
        "NOLB" => 4,
        _ => 0,
    }
}

/// A target's `stately_haproxy_server_status` lines, as last rendered: 5000 servers are
/// 25,000 lines, and between two scrapes they rarely change, so a scrape that finds the same
/// servers in the same states reuses the text instead of formatting it again.
struct StatusBlock {
    names: Vec<(String, String)>,
    states: Vec<u8>,
    text: std::sync::Arc<String>,
}

/// The server status lines of `target` for `snapshot`, from the cache when nothing changed.
static STATUS_CACHE: OnceLock<std::sync::Mutex<std::collections::HashMap<String, StatusBlock>>> =
    OnceLock::new();

/// Drops the cached lines of targets no longer configured (a reload removed them).
fn keep_status_of(targets: &[&str]) {
    if let Some(cache) = STATUS_CACHE.get() {
        cache
            .lock()
            .expect("metrics cache lock")
            .retain(|t, _| targets.contains(&t.as_str()));
    }
}

fn status_lines(target: &str, snapshot: &crate::stats::Snapshot) -> std::sync::Arc<String> {
    let servers = snapshot
        .rows
        .iter()
        .filter(|r| r.kind == crate::stats::parse::RowType::Server);
    let states: Vec<u8> = servers
        .clone()
        .map(|r| server_state(&r.status.raw))
        .collect();
    let mut cache = STATUS_CACHE
        .get_or_init(Default::default)
        .lock()
        .expect("metrics cache lock");
    if let Some(b) = cache.get(target)
        && b.states == states
        && b.names.len() == states.len()
        && b.names
            .iter()
            .zip(servers.clone())
            .all(|((p, s), r)| *p == r.proxy && *s == r.server)
    {
        return b.text.clone();
    }
    // Written by hand rather than through a prometheus-client Family: 25,000 label sets
    // hashed and encoded per scrape cost more than everything else a scrape does.
    let mut text = String::with_capacity(states.len() * SERVER_STATES.len() * 96);
    let target_label = escape(target);
    for (r, &current) in servers.clone().zip(&states) {
        let (proxy, server) = (escape(&r.proxy), escape(&r.server));
        for (i, state) in SERVER_STATES.iter().enumerate() {
            use std::fmt::Write;
            let _ = writeln!(
                text,
                "stately_haproxy_server_status{{target=\"{target_label}\",proxy=\"{proxy}\",server=\"{server}\",state=\"{state}\"}} {}",
                u8::from(i as u8 == current)
            );
        }
    }
    let text = std::sync::Arc::new(text);
    cache.insert(
        target.to_owned(),
        StatusBlock {
            names: servers
                .map(|r| (r.proxy.to_string(), r.server.to_string()))
                .collect(),
            states,
            text: text.clone(),
        },
    );
    text
}

/// A label value as the text format escapes it.
fn escape(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return v.into();
    }
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

/// Everything, as Prometheus' text format.
/// The figures of a scrape that come from the job ledger, read before the rendering.
#[derive(Default)]
pub(crate) struct LedgerFigures {
    job_counts: Vec<(String, String, u64)>,
    unwind_incomplete: u64,
    outbox_pending: u64,
    outbox_oldest: Option<i64>,
}

impl LedgerFigures {
    /// Reads them (a figure the ledger cannot give now is left out, as zero).
    pub(crate) async fn read(engine: &crate::engine::Engine) -> LedgerFigures {
        LedgerFigures {
            job_counts: engine.job_counts().await.unwrap_or_default(),
            unwind_incomplete: engine.unwind_incomplete_count().await.unwrap_or(0),
            outbox_pending: engine.outbox_pending().await.unwrap_or(0),
            outbox_oldest: engine.outbox_oldest().await.ok().flatten(),
        }
    }
}

pub(crate) fn render(engine: &crate::engine::Engine, ledger: LedgerFigures) -> String {
    let mut r = Registry::default();
    let e = events();
    r.register(
        "stately_jobs_finished",
        "Jobs that ended, by kind and outcome",
        e.finished.clone(),
    );
    r.register_with_unit(
        "stately_job_duration",
        "Time from a job's submission to its end",
        Unit::Seconds,
        e.duration.clone(),
    );
    r.register_with_unit(
        "stately_step_duration",
        "How long each step ran, by kind, step and how it ended",
        Unit::Seconds,
        e.steps.clone(),
    );
    r.register_with_unit(
        "stately_cancel_to_unwound",
        "Time from a cancel asked for to the job's unwind finished",
        Unit::Seconds,
        e.cancel_unwound.clone(),
    );
    r.register_with_unit(
        "stately_queue_wait",
        "Time a job waited for its turn on each resource it holds (cert: any lineage)",
        Unit::Seconds,
        e.queue_wait.clone(),
    );
    r.register(
        "stately_alert_transitions",
        "Transitions alert watches saw, by target, severity and tag (DOWN, UP, ...)",
        e.transitions.clone(),
    );
    r.register(
        "stately_certificate_renewals",
        "Certificate renewals that ended, by trigger (renew, auto-renew) and outcome",
        e.renewals.clone(),
    );
    r.register(
        "stately_haproxy_log_lines",
        "Datagrams of each target's HAProxy log stream: state_change (they woke the poller) or other",
        e.log_lines.clone(),
    );
    r.register(
        "stately_watchers",
        "Open streams following a job's events (job) or a target's stats (stats)",
        e.watchers.clone(),
    );
    r.register_with_unit(
        "stately_stats_poll_duration",
        "How long a poll of a target's stats socket took",
        Unit::Seconds,
        e.poll_duration.clone(),
    );
    r.register(
        "stately_stats_polls_failed",
        "Polls of a stats socket that got no answer",
        e.polls_failed.clone(),
    );
    r.register(
        "stately_haproxy_reloads",
        "HAProxy reloads through the master CLI, by result",
        e.reloads.clone(),
    );
    r.register(
        "stately_alert_deliveries",
        "Alert mail delivery attempts, by result",
        e.deliveries.clone(),
    );
    let build = Family::<Build, Gauge>::default();
    build
        .get_or_create(&Build {
            version: env!("CARGO_PKG_VERSION").into(),
        })
        .set(1);
    r.register("stately_build_info", "statelyd's version", build);

    let jobs = Family::<JobLabels, Gauge>::default();
    for (kind, state, n) in ledger.job_counts {
        jobs.get_or_create(&JobLabels { kind, state }).set(n as i64);
    }
    r.register(
        "stately_jobs",
        "Jobs in the ledger, by kind and state",
        jobs,
    );
    let incomplete = Gauge::<i64>::default();
    incomplete.set(ledger.unwind_incomplete as i64);
    r.register(
        "stately_unwinds_incomplete",
        "Jobs whose unwind could not finish (retried)",
        incomplete,
    );
    let outbox = Gauge::<i64>::default();
    outbox.set(ledger.outbox_pending as i64);
    r.register(
        "stately_alert_outbox_pending",
        "Alert mails not delivered yet",
        outbox,
    );
    let oldest = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    if let Some(at) = ledger.outbox_oldest {
        oldest.set(((crate::job::now_ms() - at).max(0) as f64) / 1000.0);
    }
    r.register_with_unit(
        "stately_alert_outbox_oldest_age",
        "How long the oldest undelivered alert mail has waited (0 when none waits)",
        Unit::Seconds,
        oldest,
    );

    let config = engine.config();
    let expiry = Family::<Lineage, Gauge>::default();
    for l in crate::certs::list(&config.cert_places()) {
        expiry
            .get_or_create(&Lineage { lineage: l.name })
            .set(l.info.not_after);
    }
    r.register_with_unit(
        "stately_certificate_not_after",
        "When each lineage's live certificate expires (alert on it minus time())",
        Unit::Other("timestamp_seconds".into()),
        expiry,
    );

    let hub = engine.stats();
    let polls = Family::<Target, Counter>::default();
    let mut status = Vec::new();
    for t in &config.haproxy {
        if t.stats_socket.is_none() {
            continue;
        }
        polls
            .get_or_create(&Target {
                target: t.name.clone(),
            })
            .inc_by(hub.polls(&t.name));
        // From a running poller's latest poll only: a scrape never polls HAProxy itself.
        if let Some(poll) = hub.latest(&t.name)
            && let Ok(snapshot) = &poll.result
        {
            status.push(status_lines(&t.name, snapshot));
        }
    }
    keep_status_of(
        &config
            .haproxy
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
    );
    r.register(
        "stately_stats_polls",
        "Polls of each target's stats socket",
        polls,
    );

    process(&mut r);
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    // The server status family goes before the end marker the encoder wrote.
    let end = out.strip_suffix("# EOF\n").map_or(out.len(), str::len);
    out.truncate(end);
    out.reserve(status.iter().map(|b| b.len()).sum::<usize>() + 256);
    out.push_str(
        "# HELP stately_haproxy_server_status Each server's status, one series per state (1 for the current), as HAProxy's exporter has it.\n\
         # TYPE stately_haproxy_server_status gauge\n",
    );
    for block in &status {
        out.push_str(block);
    }
    out.push_str("# EOF\n");
    out
}

/// The process metrics Prometheus' clients export (the names their process collectors use),
/// read from /proc/self.
fn process(r: &mut Registry) {
    let ticks = 100.0; // USER_HZ on Linux
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..])
    {
        let f: Vec<&str> = after.split_whitespace().collect();
        let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let cpu = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        cpu.inc_by((field(11) + field(12)) / ticks);
        r.register_with_unit(
            "process_cpu",
            "User and system CPU time",
            Unit::Seconds,
            cpu,
        );
        let rss = Gauge::<i64>::default();
        rss.set((field(21) * 4096.0) as i64);
        r.register_with_unit(
            "process_resident_memory",
            "Resident memory",
            Unit::Bytes,
            rss,
        );
    }
    if let Ok(d) = std::fs::read_dir("/proc/self/fd") {
        let fds = Gauge::<i64>::default();
        fds.set(d.count() as i64);
        r.register("process_open_fds", "Open file descriptors", fds);
    }
}

/// Serves `/metrics` on `addr` until `stop`: HTTP/1.1, GET only, nothing else.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    engine: crate::engine::Engine,
    stop: tokio_util::sync::CancellationToken,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let engine = engine.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let engine = engine.clone();
                    async move {
                        let resp = if req.method() == http::Method::GET
                            && req.uri().path() == "/metrics"
                        {
                            let ledger = LedgerFigures::read(&engine).await;
                            let text = tokio::task::spawn_blocking(move || render(&engine, ledger))
                                .await
                                .unwrap_or_default();
                            http::Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(text)))
                        } else {
                            http::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from_static(b"/metrics is all there is\n")))
                        };
                        Ok::<_, std::convert::Infallible>(resp.expect("a valid response"))
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(30),
                hyper::server::conn::http1::Builder::new().serve_connection(io, service),
            )
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_stat_statuses_map_to_promex_states() {
        for (raw, want) in [
            ("UP", "UP"),
            ("UP 1/3", "UP"),
            ("no check", "UP"),
            ("DOWN", "DOWN"),
            ("DOWN 1/2", "DOWN"),
            ("DOWN (agent)", "DOWN"),
            ("MAINT", "MAINT"),
            ("MAINT (via app/s1)", "MAINT"),
            ("MAINT(resolution)", "MAINT"),
            ("DRAIN", "DRAIN"),
            ("DRAIN (agent)", "DRAIN"),
            ("NOLB", "NOLB"),
            ("", "DOWN"),
        ] {
            assert_eq!(SERVER_STATES[server_state(raw) as usize], want, "{raw}");
        }
    }
}
