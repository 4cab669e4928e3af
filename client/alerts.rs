//! `stately alerts`: start a watch that mails a target's transitions, list the watches, stop
//! one. A watch is an ordinary job (`stately jobs watch ID` shows its alerts as they fire).

use crate::cli::explain;
use crate::connect::Client;
use crate::render::{job_json, say, state_name};
use anyhow::{Result, anyhow};
use stately::pb;
use std::time::Duration;

#[derive(clap::Subcommand, Debug)]
pub(crate) enum AlertsCommand {
    /// Start watching a target: mail when a server leaves UP and when it comes back, when a
    /// backend has no server UP, and on the thresholds given.
    Start {
        /// The HAProxy target (with a stats socket).
        target: String,
        /// A recipient (repeat for more).
        #[arg(long, required = true)]
        to: Vec<String>,
        /// How often the stats are read.
        #[arg(long, default_value = "1s", value_parser = poll_interval)]
        interval: Duration,
        /// How long a transitional state (INI after a reload) must last to be believed.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        hold: Duration,
        /// Only these backends and their servers (names or globs; repeat for more). Frontends
        /// are still watched: their session-rate and session-limit thresholds apply.
        #[arg(long = "backend")]
        backends: Vec<String>,
        /// Alert when a frontend's or backend's session rate (per second) exceeds this.
        #[arg(long)]
        max_session_rate: Option<u64>,
        /// Alert when current sessions reach this percentage of their limit.
        #[arg(long)]
        max_sessions_percent: Option<u32>,
        /// Alert when a backend answers more than this many 5xx in one interval.
        #[arg(long = "max-5xx")]
        max_5xx: Option<u64>,
        /// Stay and show the alerts as they fire (Ctrl-C leaves; the watch goes on).
        #[arg(long)]
        follow: bool,
    },
    /// The watches that are running.
    List {
        /// Also the stopped ones.
        #[arg(long)]
        all: bool,
    },
    /// Stop a watch (a cancel of its job).
    Stop { id: String },
}

/// A poll interval as the daemon takes it: 100 ms to 1 hour (refused here rather than a 0
/// that would silently mean the default).
fn poll_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
        return Err(format!("{s} is not between 100ms and 1h"));
    }
    Ok(d)
}

fn millis(d: Duration, what: &str) -> Result<u32> {
    u32::try_from(d.as_millis()).map_err(|_| anyhow!("--{what} is too long"))
}

pub(crate) async fn run(client: &mut Client, cmd: AlertsCommand, json: bool) -> Result<u8> {
    match cmd {
        AlertsCommand::Start {
            target,
            to,
            interval,
            hold,
            backends,
            max_session_rate,
            max_sessions_percent,
            max_5xx,
            follow: stay,
        } => {
            let req = pb::SubmitJobRequest {
                node: crate::cli::target_node(),
                spec: Some(pb::JobSpec {
                    kind: Some(pb::job_spec::Kind::AlertWatch(pb::AlertWatchJob {
                        target,
                        to,
                        interval_ms: millis(interval, "interval")?,
                        hold_ms: Some(millis(hold, "hold")?),
                        proxies: backends,
                        max_session_rate,
                        max_sessions_percent,
                        max_5xx,
                    })),
                }),
                ..Default::default()
            };
            let job = client.submit_job(req).await.map_err(explain)?.into_inner();
            if json {
                say(&job_json(&job).to_string());
            } else {
                say(&job.id);
                say_err!("watching; stop with: stately alerts stop {}", job.id);
            }
            if !stay {
                return Ok(0);
            }
            crate::cli::print_or_follow(client, job, false, json).await
        }
        AlertsCommand::List { all } => {
            let states = if all {
                Vec::new()
            } else {
                vec![
                    pb::JobState::Pending as i32,
                    pb::JobState::Running as i32,
                    pb::JobState::Cancelling as i32,
                ]
            };
            let resp = client
                .list_jobs(pb::ListJobsRequest {
                    states,
                    kind: "alert_watch".into(),
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .map_err(explain)?
                .into_inner();
            if json {
                resp.jobs.iter().for_each(|j| say(&job_json(j).to_string()));
                return Ok(0);
            }
            if resp.jobs.is_empty() {
                say_err!("no alert watches{}", if all { "" } else { " running" });
                return Ok(0);
            }
            say(&format!(
                "{:<36}  {:<9}  {:<12}  {:<8}  TO",
                "ID", "STATE", "TARGET", "INTERVAL"
            ));
            for j in &resp.jobs {
                let Some(pb::job_spec::Kind::AlertWatch(a)) =
                    j.spec.as_ref().and_then(|s| s.kind.as_ref())
                else {
                    continue;
                };
                say(&format!(
                    "{:<36}  {:<9}  {:<12}  {:<8}  {}",
                    j.id,
                    state_name(j.state),
                    a.target,
                    format!("{}ms", a.interval_ms),
                    a.to.join(", ")
                ));
            }
            Ok(0)
        }
        AlertsCommand::Stop { id } => {
            let id = crate::cli::resolve_id(client, &id).await?;
            let job = client
                .get_job(pb::GetJobRequest { job_id: id.clone() })
                .await
                .map_err(explain)?
                .into_inner();
            if job.kind != "alert_watch" {
                return Err(anyhow!(
                    "job {id} is a {} job, not an alert watch (stately jobs cancel stops any job)",
                    job.kind
                ));
            }
            let job = client
                .cancel_job(pb::CancelJobRequest {
                    job_id: id,
                    reason: "alerts stopped".into(),
                    wait: true,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if json {
                say(&job_json(&job).to_string());
            } else {
                say(&format!("watch {} {}", job.id, state_name(job.state)));
            }
            Ok(0)
        }
    }
}
