//! `stately status`: the daemon, its targets, certificates and jobs on one screen, exiting 1
//! when something needs attention — usable from monitoring.

use crate::cli::{EXIT_JOB, explain};
use crate::connect::Authed;
use crate::render::say;
use anyhow::Result;
use serde_json::json;
use stately::pb;

/// A certificate this close to expiry needs attention.
const CERT_ATTENTION_DAYS: i64 = 7;

pub(crate) async fn run(channel: Authed, json: bool) -> Result<u8> {
    let mut jobs = pb::jobs_client::JobsClient::new(channel.clone());
    let mut haproxy = pb::haproxy_client::HaproxyClient::new(channel.clone());
    let mut stats = pb::stats_client::StatsClient::new(channel.clone());
    let mut certs = pb::certificates_client::CertificatesClient::new(channel);
    let server = jobs
        .get_status(pb::GetStatusRequest {})
        .await
        .map_err(explain)?
        .into_inner();
    let mut attention: Vec<String> = Vec::new();

    // Targets: the config readable, the stats socket answering.
    let mut targets = Vec::new();
    let listed = haproxy
        .list_targets(pb::ListTargetsRequest {})
        .await
        .map_err(explain)?
        .into_inner()
        .targets;
    for t in listed {
        let config = if t.has_config {
            match haproxy
                .get_config(pb::GetConfigRequest {
                    target: t.name.clone(),
                })
                .await
            {
                Ok(_) => "ok".to_owned(),
                Err(s) => {
                    attention.push(format!("{}: config {}", t.name, s.message()));
                    format!("UNREADABLE ({})", s.message())
                }
            }
        } else {
            "-".to_owned()
        };
        let socket = if t.has_stats {
            match stats
                .get_stats(pb::GetStatsRequest {
                    target: t.name.clone(),
                    filter: None,
                })
                .await
            {
                Ok(_) => "ok".to_owned(),
                Err(s) => {
                    attention.push(format!("{}: stats {}", t.name, s.message()));
                    format!("UNREACHABLE ({})", s.message())
                }
            }
        } else {
            "-".to_owned()
        };
        targets.push((t.name, config, socket));
    }

    // Certificates, soonest to expire first.
    let mut lineages = certs
        .list_certificates(pb::ListCertificatesRequest {})
        .await
        .map_err(explain)?
        .into_inner()
        .certificates;
    lineages.sort_by_key(|c| c.days_left);
    for c in lineages
        .iter()
        .filter(|c| c.days_left < CERT_ATTENTION_DAYS)
    {
        attention.push(format!(
            "certificate {} has {} day(s) left",
            c.name, c.days_left
        ));
    }

    // Jobs: what runs, what waits, what could not unwind, the last failure.
    let list = |states: Vec<pb::JobState>, kind: &str, page_size: u32| pb::ListJobsRequest {
        states: states.into_iter().map(|s| s as i32).collect(),
        kind: kind.into(),
        page_size,
        ..Default::default()
    };
    let active = jobs
        .list_jobs(list(
            vec![
                pb::JobState::Pending,
                pb::JobState::Running,
                pb::JobState::Cancelling,
            ],
            "",
            1000,
        ))
        .await
        .map_err(explain)?
        .into_inner()
        .jobs;
    let count = |s: pb::JobState| active.iter().filter(|j| j.state == s as i32).count();
    let watches = active.iter().filter(|j| j.kind == "alert_watch").count();
    let ended = jobs
        .list_jobs(list(
            vec![pb::JobState::Failed, pb::JobState::Cancelled],
            "",
            1000,
        ))
        .await
        .map_err(explain)?
        .into_inner()
        .jobs;
    // Counted by the daemon over the whole ledger, not the newest page of ended jobs.
    let incomplete = &server.unwind_incomplete_job_ids;
    for id in incomplete {
        attention.push(format!("job {id} could not finish its unwind"));
    }
    let last_failed = ended
        .iter()
        .find(|j| j.state == pb::JobState::Failed as i32);
    if !server.config_reload_error.is_empty() {
        attention.push(format!(
            "the last configuration reload was refused (the old one is in force): {}",
            server.config_reload_error
        ));
    }
    if server.outbox_pending > 0 {
        attention.push(format!(
            "{} alert mail(s) not delivered yet",
            server.outbox_pending
        ));
    }

    let up = server
        .started_at
        .map(|t| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            humantime::format_duration(std::time::Duration::from_secs(
                (now - t.seconds).max(0) as u64
            ))
            .to_string()
        })
        .unwrap_or_default();
    if json {
        say(&json!({
            "server": {"version": server.version, "node": server.node, "client_version": env!("CARGO_PKG_VERSION"),
                       "uptime": up, "data_dir": server.data_dir, "store": server.store,
                       "listeners": server.listeners, "outbox_pending": server.outbox_pending,
                       "config_loaded_at": server.config_loaded_at.map(|t| t.seconds),
                       "config_reloads": server.config_reloads,
                       "config_reload_error": (!server.config_reload_error.is_empty()).then_some(&server.config_reload_error)},
            "targets": targets.iter().map(|(n, c, s)| json!({"name": n, "config": c, "stats": s})).collect::<Vec<_>>(),
            "certificates": lineages.iter().take(5).map(|c| json!({"name": c.name, "days_left": c.days_left})).collect::<Vec<_>>(),
            "jobs": {"pending": count(pb::JobState::Pending), "running": count(pb::JobState::Running),
                     "cancelling": count(pb::JobState::Cancelling), "alert_watches": watches,
                     "unwind_incomplete": incomplete,
                     "last_failed": last_failed.map(|j| json!({"id": j.id, "kind": j.kind, "error": j.error}))},
            "attention": attention,
        })
        .to_string());
    } else {
        say(&format!(
            "statelyd   {} on node {} (this CLI {}), up {up}, listening {}",
            server.version,
            server.node,
            env!("CARGO_PKG_VERSION"),
            server.listeners.join(", ")
        ));
        say(&format!(
            "data       {} (store {})",
            server.data_dir, server.store
        ));
        if server.config_reloads > 0 || !server.config_reload_error.is_empty() {
            say(&format!(
                "config     reloaded {} time(s){}",
                server.config_reloads,
                if server.config_reload_error.is_empty() {
                    String::new()
                } else {
                    "; the last reload was refused".into()
                }
            ));
        }
        if targets.is_empty() {
            say("targets    none configured");
        }
        for (name, config, socket) in &targets {
            say(&format!(
                "target     {name}: config {config}, stats {socket}"
            ));
        }
        if lineages.is_empty() {
            say("certs      none");
        }
        for c in lineages.iter().take(5) {
            say(&format!(
                "cert       {}: {} day(s) left{}",
                c.name,
                c.days_left,
                if c.auto_renew {
                    ", renewed by the daemon"
                } else {
                    ""
                }
            ));
        }
        say(&format!(
            "jobs       {} running, {} pending, {} cancelling; {} alert watch(es); {} with an incomplete unwind",
            count(pb::JobState::Running),
            count(pb::JobState::Pending),
            count(pb::JobState::Cancelling),
            watches,
            incomplete.len()
        ));
        say(&format!(
            "outbox     {} mail(s) waiting",
            server.outbox_pending
        ));
        if let Some(j) = last_failed {
            say(&format!("last fail  {} ({}): {}", j.id, j.kind, j.error));
        }
        if attention.is_empty() {
            say("all well");
        } else {
            for a in &attention {
                say(&format!("ATTENTION  {a}"));
            }
        }
    }
    Ok(if attention.is_empty() { 0 } else { EXIT_JOB })
}
