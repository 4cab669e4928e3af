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

/// The counters and histograms events feed.
struct Events {
    finished: Family<Finished, Counter>,
    duration: Family<Kind, Histogram>,
    poll_duration: Family<Target, Histogram>,
    polls_failed: Family<Target, Counter>,
    reloads: Family<Outcome, Counter>,
    deliveries: Family<Outcome, Counter>,
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
        polls_failed: Family::default(),
        reloads: Family::default(),
        deliveries: Family::default(),
    })
}

/// A job ended: counted by kind and outcome, its run time (from submission) observed.
pub(crate) fn job_finished(kind: &str, outcome: &str, seconds: f64) {
    let e = events();
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
struct ServerStatus {
    target: String,
    proxy: String,
    server: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: String,
}

/// The states HAProxy's own exporter gives `haproxy_server_status` one series each.
const SERVER_STATES: [&str; 8] = [
    "UP", "DOWN", "MAINT", "DRAIN", "NOLB", "no check", "STOPPED", "UNKNOWN",
];

/// Everything, as Prometheus' text format.
pub(crate) fn render(engine: &crate::engine::Engine) -> String {
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
    for (kind, state, n) in engine.job_counts().unwrap_or_default() {
        jobs.get_or_create(&JobLabels { kind, state }).set(n as i64);
    }
    r.register(
        "stately_jobs",
        "Jobs in the ledger, by kind and state",
        jobs,
    );
    let incomplete = Gauge::<i64>::default();
    incomplete.set(engine.unwind_incomplete().map_or(0, |v| v.len() as i64));
    r.register(
        "stately_unwinds_incomplete",
        "Jobs whose unwind could not finish (retried)",
        incomplete,
    );
    let outbox = Gauge::<i64>::default();
    outbox.set(engine.outbox_pending().unwrap_or(0) as i64);
    r.register(
        "stately_alert_outbox_pending",
        "Alert mails not delivered yet",
        outbox,
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
    let status = Family::<ServerStatus, Gauge>::default();
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
        let Some(poll) = hub.latest(&t.name) else {
            continue;
        };
        let Ok(snapshot) = &poll.result else { continue };
        for row in snapshot
            .rows
            .iter()
            .filter(|r| r.kind == crate::stats::parse::RowType::Server)
        {
            let word = row.status.raw.split(' ').next().unwrap_or("");
            let current = match row.status.raw.as_str() {
                "no check" => "no check",
                _ if SERVER_STATES.contains(&word) => word,
                _ => "UNKNOWN",
            };
            for s in SERVER_STATES {
                status
                    .get_or_create(&ServerStatus {
                        target: t.name.clone(),
                        proxy: row.proxy.clone(),
                        server: row.server.clone(),
                        state: s.into(),
                    })
                    .set(i64::from(s == current));
            }
        }
    }
    r.register(
        "stately_stats_polls",
        "Polls of each target's stats socket",
        polls,
    );
    r.register(
        "stately_haproxy_server_status",
        "Each server's status, one series per state (1 for the current), as HAProxy's exporter has it",
        status,
    );

    process(&mut r);
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
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
                            let text = tokio::task::spawn_blocking(move || render(&engine))
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
