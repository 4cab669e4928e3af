//! `stately haproxy`: targets, the live configuration, and validating a candidate (the dry run
//! of an apply), with HAProxy's complaints shown next to the lines they are about.

use crate::connect::Authed;
use crate::render::say;
use anyhow::{Context, Result, anyhow};
use serde_json::json;
use stately::pb;
use std::path::PathBuf;

type Client = pb::haproxy_client::HaproxyClient<Authed>;

#[derive(clap::Subcommand, Debug)]
pub(crate) enum HaproxyCommand {
    /// The configured HAProxy targets.
    Targets,
    /// Print a target's live configuration (its version goes to stderr).
    Config { target: String },
    /// Set a server ready, drain or maint (a job; rolling it back restores the state it had).
    Server {
        target: String,
        /// BACKEND/SERVER.
        server: String,
        /// ready, drain or maint.
        state: String,
    },
    /// Apply a new configuration as a job (validate, swap, reload, verify; undone on failure),
    /// attached: Ctrl-C cancels it and puts the old configuration back.
    Apply {
        target: String,
        /// The new configuration file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Refuse to apply over a live configuration other than this version (from `config`).
        #[arg(long)]
        base_version: Option<String>,
        /// Only validate: nothing is swapped, nothing reloaded.
        #[arg(long)]
        dry_run: bool,
        /// Accept servers UP before the reload being DOWN after it.
        #[arg(long)]
        allow_servers_down: bool,
    },
}

pub(crate) async fn run(
    mut c: Client,
    jobs: &mut crate::connect::Client,
    cmd: HaproxyCommand,
    json: bool,
) -> Result<u8> {
    let status = |s: tonic::Status| anyhow!("{}", s.message());
    match cmd {
        HaproxyCommand::Targets => {
            let r = c
                .list_targets(pb::ListTargetsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if json {
                for t in &r.targets {
                    say(&json!({"name": t.name, "has_config": t.has_config, "has_stats": t.has_stats}).to_string());
                }
                return Ok(0);
            }
            if r.targets.is_empty() {
                eprintln!("no HAProxy targets are configured ([[haproxy]] in statelyd's config)");
                return Ok(0);
            }
            let width = r
                .targets
                .iter()
                .map(|t| t.name.len())
                .max()
                .unwrap_or(0)
                .max(6);
            say(&format!("{:<width$}  CONFIG  STATS", "TARGET"));
            for t in &r.targets {
                let yes = |b: bool| if b { "yes" } else { "-" };
                say(&format!(
                    "{:<width$}  {:<6}  {}",
                    t.name,
                    yes(t.has_config),
                    yes(t.has_stats)
                ));
            }
            Ok(0)
        }
        HaproxyCommand::Config { target } => {
            let cfg = c
                .get_config(pb::GetConfigRequest { target })
                .await
                .map_err(status)?
                .into_inner();
            if json {
                say(
                    &json!({"target": cfg.target, "version": cfg.version, "text": cfg.text})
                        .to_string(),
                );
            } else {
                eprintln!("# version {}", cfg.version);
                // A closed pipe (`| head`) is not an error.
                let _ =
                    std::io::Write::write_all(&mut std::io::stdout().lock(), cfg.text.as_bytes());
            }
            Ok(0)
        }
        HaproxyCommand::Server {
            target,
            server,
            state,
        } => {
            let (backend, server) = server
                .split_once('/')
                .ok_or_else(|| anyhow!("'{server}' is not BACKEND/SERVER"))?;
            let req = pb::SubmitJobRequest {
                spec: Some(pb::JobSpec {
                    kind: Some(pb::job_spec::Kind::HaproxyServerState(
                        pb::HaproxyServerStateJob {
                            target,
                            backend: backend.into(),
                            server: server.into(),
                            state,
                        },
                    )),
                }),
                ..Default::default()
            };
            let stream = jobs.run_job(req).await.map_err(status)?.into_inner();
            crate::cli::follow(jobs, stream, json, true).await
        }
        HaproxyCommand::Apply {
            target,
            file,
            base_version,
            dry_run,
            allow_servers_down,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            if !dry_run {
                let req = pb::SubmitJobRequest {
                    spec: Some(pb::JobSpec {
                        kind: Some(pb::job_spec::Kind::HaproxyApply(pb::HaproxyApplyJob {
                            target,
                            config: text,
                            base_version: base_version.unwrap_or_default(),
                            allow_servers_down,
                        })),
                    }),
                    ..Default::default()
                };
                let stream = jobs.run_job(req).await.map_err(status)?.into_inner();
                return crate::cli::follow(jobs, stream, json, true).await;
            }
            let v = c
                .validate_config(pb::ValidateConfigRequest { target, text })
                .await
                .map_err(status)?
                .into_inner();
            if json {
                let d: Vec<_> = v
                    .diagnostics
                    .iter()
                    .map(|d| json!({"level": if d.level == pb::diagnostic::Level::Alert as i32 { "alert" } else { "warning" }, "line": d.line, "message": d.message, "source": d.source}))
                    .collect();
                say(&json!({"valid": v.valid, "version": v.version, "diagnostics": d}).to_string());
            } else {
                for d in &v.diagnostics {
                    let mark = if d.level == pb::diagnostic::Level::Alert as i32 {
                        "✗"
                    } else {
                        "!"
                    };
                    match d.line {
                        Some(n) => {
                            say(&format!("{mark} {}:{n}: {}", file.display(), d.message));
                            say(&format!("    {n:>5} | {}", d.source));
                        }
                        None => say(&format!("{mark} {}", d.message)),
                    }
                }
                say(&if v.valid {
                    format!("valid ({})", v.version)
                } else {
                    "invalid: nothing was changed".to_owned()
                });
            }
            Ok(if v.valid { 0 } else { crate::cli::EXIT_JOB })
        }
    }
}
