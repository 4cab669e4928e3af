//! `stately stats`: a HAProxy target's stats as a table, a live view that redraws in place
//! (status colours, changed rows highlighted), or one JSON object per update for scripts.

use crate::connect::Authed;
use crate::render::say;
use anyhow::{Result, anyhow};
use serde_json::json;
use stately::pb;
use std::collections::BTreeMap;
use std::io::IsTerminal;

type Client = pb::stats_client::StatsClient<Authed>;

#[derive(clap::Args, Debug)]
pub(crate) struct StatsArgs {
    /// The HAProxy target (as named in statelyd's configuration).
    target: String,
    /// Only these proxies (exact or glob; repeat for more).
    #[arg(long = "proxy")]
    proxies: Vec<String>,
    /// Only these servers (exact or glob; FRONTEND and BACKEND are names too).
    #[arg(long = "server")]
    servers: Vec<String>,
    /// Only rows of this type.
    #[arg(long = "type", ignore_case = true, value_parser = clap::builder::PossibleValuesParser::new(
        ["frontend", "backend", "server", "listener"]))]
    types: Vec<String>,
    /// Keep a live view (or, with --output json, stream every change).
    #[arg(long)]
    watch: bool,
    /// How often to poll while watching (e.g. 500ms, 2s; 100ms to 1h).
    #[arg(long, default_value = "1s", requires = "watch", value_parser = watch_interval)]
    interval: std::time::Duration,
}

/// A watch's poll interval as the daemon takes it (100 ms to 1 h): refused here rather than
/// raised to the floor without a word.
fn watch_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_millis(100) || d > std::time::Duration::from_secs(3600) {
        return Err(format!("{s} is not between 100ms and 1h"));
    }
    Ok(d)
}

fn filter(a: &StatsArgs) -> Result<pb::StatsFilter> {
    let types = a
        .types
        .iter()
        .map(|t| {
            pb::RowType::from_str_name(&format!("ROW_TYPE_{}", t.to_uppercase()))
                .map(|t| t as i32)
                .ok_or_else(|| {
                    anyhow!("unknown row type '{t}' (frontend, backend, server, listener)")
                })
        })
        .collect::<Result<_>>()?;
    Ok(pb::StatsFilter {
        proxies: a.proxies.clone(),
        servers: a.servers.clone(),
        types,
    })
}

fn state_name(s: &Option<pb::Status>) -> String {
    s.as_ref().map(|s| s.raw.clone()).unwrap_or_default()
}

fn type_name(t: i32) -> &'static str {
    match pb::RowType::try_from(t) {
        Ok(pb::RowType::Frontend) => "frontend",
        Ok(pb::RowType::Backend) => "backend",
        Ok(pb::RowType::Server) => "server",
        Ok(pb::RowType::Listener) => "listener",
        _ => "?",
    }
}

fn row_json(r: &pb::StatsRow) -> serde_json::Value {
    json!({
        "proxy": r.proxy, "server": r.server, "type": type_name(r.r#type).to_uppercase(), "status": state_name(&r.status),
        "current_sessions": r.current_sessions, "session_limit": r.session_limit, "total_sessions": r.total_sessions,
        "session_rate": r.session_rate, "request_rate": r.request_rate, "check_status": r.check_status,
        "check_code": r.check_code, "check_description": r.check_description,
        "last_change_seconds": r.last_change_seconds, "downtime_seconds": r.downtime_seconds,
        "http_5xx": r.http_5xx, "weight": r.weight, "address": absent_if_empty(&r.address),
        "cookie": absent_if_empty(&r.cookie),
    })
}

/// A text HAProxy did not report is null in JSON, not "".
fn absent_if_empty(s: &str) -> serde_json::Value {
    if s.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::Value::String(s.to_owned())
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn colour(status: &str, on: bool) -> String {
    if !on {
        return status.to_owned();
    }
    // A transitional state (`UP 2/3`: a check failing; `DOWN 1/2`: recovering) is not green.
    let transitional = status.contains('/');
    let code = match status.split(' ').next().unwrap_or("") {
        "UP" | "OPEN" if !transitional => "32",
        "DOWN" if !transitional => "31;1",
        "UP" | "DOWN" | "MAINT" | "DRAIN" | "NOLB" => "33",
        _ => "0",
    };
    format!("\x1b[{code}m{status}\x1b[0m")
}

fn table(rows: &[&pb::StatsRow], changed: &[(String, String)], tty: bool) -> Vec<String> {
    let header = [
        "PROXY", "SERVER", "TYPE", "STATUS", "SESS", "LIMIT", "RATE", "CHECK", "LASTCHG",
    ]
    .map(String::from);
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            let check = if r.check_status.is_empty() {
                "-".into()
            } else {
                r.check_status.clone()
            };
            [
                r.proxy.clone(),
                r.server.clone(),
                type_name(r.r#type).into(),
                state_name(&r.status),
                opt(r.current_sessions),
                opt(r.session_limit),
                opt(r.session_rate),
                check,
                r.last_change_seconds
                    .map_or_else(|| "-".into(), |s| format!("{s}s")),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.len());
    for c in &cells {
        for (w, v) in widths.iter_mut().zip(c) {
            *w = (*w).max(v.chars().count());
        }
    }
    let mut out = vec![
        header
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned(),
    ];
    for (r, c) in rows.iter().zip(&cells) {
        let line: Vec<String> = c
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (v, w))| {
                if i == 3 {
                    format!("{}{}", colour(v, tty), " ".repeat(w - v.chars().count()))
                } else {
                    format!("{v:<w$}")
                }
            })
            .collect();
        let line = line.join("  ").trim_end().to_owned();
        let hot = tty && changed.iter().any(|(p, s)| *p == r.proxy && *s == r.server);
        out.push(if hot {
            format!("\x1b[7m{line}\x1b[0m")
        } else {
            line
        });
    }
    out
}

pub(crate) async fn run(mut c: Client, a: StatsArgs, json: bool) -> Result<u8> {
    let f = filter(&a)?;
    let status = |s: tonic::Status| anyhow!("{}", s.message());
    if !a.watch {
        let snap = c
            .get_stats(pb::GetStatsRequest {
                target: a.target.clone(),
                filter: Some(f),
            })
            .await
            .map_err(status)?
            .into_inner();
        if json {
            snap.rows.iter().for_each(|r| say(&row_json(r).to_string()));
        } else if snap.rows.is_empty() {
            say_err!("no rows of {} match the filter", a.target);
        } else {
            let tty = std::io::stdout().is_terminal();
            table(&snap.rows.iter().collect::<Vec<_>>(), &[], tty)
                .iter()
                .for_each(|l| say(l));
        }
        return Ok(0);
    }
    let interval = a.interval;
    let req = pb::WatchStatsRequest {
        target: a.target.clone(),
        filter: Some(f),
        interval: Some(prost_types::Duration {
            seconds: interval.as_secs() as i64,
            nanos: interval.subsec_nanos() as i32,
        }),
        // Scripts get changes; the live table redraws full snapshots (counters move too).
        changes_only: json,
    };
    let mut stream = c.watch_stats(req).await.map_err(status)?.into_inner();
    let tty = std::io::stdout().is_terminal();
    let mut previous: BTreeMap<(String, String), String> = BTreeMap::new();
    loop {
        let update = tokio::select! {
            m = stream.message() => match m.map_err(status)? { Some(u) => u, None => return Ok(0) },
            _ = tokio::signal::ctrl_c() => return Ok(0),
            _ = crate::render::stdout_gone() => return Ok(0),
        };
        if crate::render::stdout_closed() {
            return Ok(0);
        }
        if json {
            say(&update_json(&update).to_string());
            continue;
        }
        match update.update {
            Some(pb::stats_update::Update::Snapshot(snap)) => {
                let changed: Vec<(String, String)> = snap
                    .rows
                    .iter()
                    .filter(|r| {
                        previous
                            .get(&(r.proxy.clone(), r.server.clone()))
                            .is_some_and(|s| *s != state_name(&r.status))
                    })
                    .map(|r| (r.proxy.clone(), r.server.clone()))
                    .collect();
                previous = snap
                    .rows
                    .iter()
                    .map(|r| ((r.proxy.clone(), r.server.clone()), state_name(&r.status)))
                    .collect();
                let mut lines = vec![format!(
                    "{} — poll {}{}",
                    a.target,
                    update.poll,
                    if update.skipped > 0 {
                        format!(" ({} skipped)", update.skipped)
                    } else {
                        String::new()
                    }
                )];
                lines.extend(table(&snap.rows.iter().collect::<Vec<_>>(), &changed, tty));
                if tty {
                    print!("\x1b[2J\x1b[H");
                }
                lines.iter().for_each(|l| say(l));
            }
            Some(pb::stats_update::Update::Unreachable(why))
            | Some(pb::stats_update::Update::ParseError(why)) => {
                say(&format!("{} — {why} (still watching)", a.target));
            }
            Some(pb::stats_update::Update::Delta(_)) | None => {}
        }
    }
}

fn update_json(u: &pb::StatsUpdate) -> serde_json::Value {
    use pb::stats_update::Update;
    let body = match &u.update {
        Some(Update::Snapshot(s)) => {
            json!({"snapshot": s.rows.iter().map(row_json).collect::<Vec<_>>()})
        }
        Some(Update::Delta(d)) => json!({"changed": d.changed.iter().map(|c| {
            let mut v = c.row.as_ref().map(row_json).unwrap_or_default();
            v["previous_status"] = json!(state_name(&c.previous_status));
            v
        }).collect::<Vec<_>>(), "added": d.added.iter().map(row_json).collect::<Vec<_>>(),
        "removed": d.removed.iter().map(|r| json!({"proxy": r.proxy, "server": r.server})).collect::<Vec<_>>()}),
        Some(Update::Unreachable(w)) => json!({"unreachable": w}),
        Some(Update::ParseError(w)) => json!({"parse_error": w}),
        None => json!({}),
    };
    let mut v = json!({"target": u.target, "poll": u.poll, "skipped": u.skipped});
    if let (serde_json::Value::Object(m), serde_json::Value::Object(b)) = (&mut v, body) {
        m.extend(b);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::colour;

    #[test]
    fn a_transitional_state_is_not_green() {
        assert!(colour("UP", true).contains("\x1b[32m"));
        assert!(colour("UP 2/3", true).contains("\x1b[33m"));
        assert!(colour("DOWN 1/2", true).contains("\x1b[33m"));
        assert!(colour("DOWN", true).contains("\x1b[31;1m"));
        assert_eq!(colour("UP 2/3", false), "UP 2/3");
    }
}
