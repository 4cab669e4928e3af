//! The CLI's commands: `run`, and `jobs list|show|watch|cancel|rollback`. Exit status: 0 when
//! the job succeeded (or the request did), 1 when a job ended otherwise, 3 when a request
//! failed, 2 for bad usage.

use crate::connect::{Client, connect, token};
use crate::render::{EventView, job_json, print_job, print_jobs_table, say, state_name};
use anyhow::{Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use stately::pb;
use std::path::PathBuf;
use tonic::Code;

/// The job ended, but not well.
pub(crate) const EXIT_JOB: u8 = 1;
/// The request itself failed.
pub(crate) const EXIT_ERROR: u8 = 3;
/// Bad usage (clap exits with it too).
pub(crate) const EXIT_USAGE: u8 = 2;

/// A usage error the CLI finds beyond what clap checks: it exits 2, as clap's do.
#[derive(Debug)]
pub(crate) struct Usage(pub(crate) String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Drive statelyd: run runbooks as jobs, watch, cancel and roll them back.
#[derive(Parser, Debug)]
#[command(name = "stately", version)]
pub(crate) struct Args {
    /// statelyd's address: host:port, http://host:port or unix:/path. Give it before the
    /// command (`stately --server ADDR stats ...`): `stats --server` names HAProxy servers.
    #[arg(long, env = "STATELY_SERVER", default_value = "127.0.0.1:50051")]
    server: String,
    /// Bearer token (default: the operator token statelyd generated on this machine).
    #[arg(long, global = true, env = "STATELY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the token from this file.
    #[arg(long, global = true, env = "STATELY_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// With https://: CA certificates (PEM) to trust beside the system's.
    #[arg(long, global = true, env = "STATELY_CACERT")]
    cacert: Option<PathBuf>,
    /// With https://: a client certificate (PEM) for mTLS; with it, no token is needed.
    #[arg(long, global = true, env = "STATELY_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "STATELY_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Output for people (table) or for scripts (json: one object per line).
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// On a shared ledger: the node a job is submitted for (default: the node reached), and
    /// the node whose jobs `jobs list` shows (default: every node's); see `stately nodes list`.
    #[arg(long, global = true, env = "STATELY_NODE")]
    node: Option<String>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Run a runbook, attached: Ctrl-C cancels the job and shows it unwinding.
    Run {
        /// The runbook's name (as in statelyd's configuration).
        runbook: String,
        /// A parameter, as key=value (repeat for more).
        #[arg(long = "param", short = 'p', value_parser = key_value)]
        params: Vec<(String, String)>,
        /// Submit and print the job id, without waiting.
        #[arg(long)]
        detach: bool,
        /// Idempotency key: a repeat returns the first job instead of starting another.
        #[arg(long)]
        request_id: Option<String>,
        /// A label, as key=value.
        #[arg(long = "label", value_parser = key_value)]
        labels: Vec<(String, String)>,
    },
    /// Jobs: list, show, watch, cancel, roll back.
    #[command(subcommand)]
    Jobs(Jobs),
    /// HAProxy stats of a target: a table, or a live view with --watch.
    Stats(crate::stats::StatsArgs),
    /// HAProxy targets and configurations.
    #[command(subcommand)]
    Haproxy(crate::haproxy::HaproxyCommand),
    /// Certificates over ACME: issue, list, show, renew.
    #[command(subcommand)]
    Cert(crate::certs::CertCommand),
    /// Mail alerts on a target's servers going down and coming back.
    #[command(subcommand)]
    Alerts(crate::alerts::AlertsCommand),
    /// The runbooks statelyd's configuration defines: what `stately run` takes.
    #[command(subcommand)]
    Runbooks(Runbooks),
    /// Print a shell completion script (e.g. `stately completions bash > /etc/bash_completion.d/stately`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; `stately man | man -l -`).
    Man,
    /// The daemon, its targets, certificates and jobs at a glance; exits 1 when something
    /// needs attention (a target unreachable, a certificate within 7 days of expiry, an unwind
    /// that could not finish, alert mails not delivered).
    Status,
    /// Who statelyd takes you for: the identity your jobs record, your role, and how you
    /// proved it (token, client certificate, unix peer).
    Whoami,
    /// The statelyd nodes of the job ledger.
    #[command(subcommand)]
    Nodes(Nodes),
}

#[derive(Subcommand, Debug)]
pub(crate) enum Nodes {
    /// Each node: up or lost (no heartbeat for its lease, 15 s by default), its epoch, last heartbeat, version.
    List,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Runbooks {
    /// Names and descriptions.
    List,
    /// One runbook: its parameters (pattern, default, whether required) and its steps.
    Show { name: String },
}

#[derive(Subcommand, Debug)]
pub(crate) enum Jobs {
    /// List jobs, newest first.
    List {
        /// Only in this state (repeat for more).
        #[arg(long, ignore_case = true, value_parser = clap::builder::PossibleValuesParser::new(
            ["pending", "running", "cancelling", "succeeded", "failed", "cancelled"]))]
        state: Vec<String>,
        /// Only of this kind (the library's list of kinds).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(stately::kinds::JobSpec::KINDS))]
        kind: Option<String>,
        /// Only with this label, as key=value.
        #[arg(long = "label", value_parser = key_value)]
        labels: Vec<(String, String)>,
        /// At most this many (the server caps pages at 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue from a previous page.
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Show one job.
    Show { id: String },
    /// Follow a job's events until it ends (Ctrl-C stops watching, not the job).
    Watch {
        id: String,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Cancel a job and wait until it has unwound.
    Cancel {
        id: String,
        /// Why, recorded in the job.
        #[arg(long, default_value = "")]
        reason: String,
        /// Return once the job has seen the cancel, without waiting for the unwind.
        #[arg(long)]
        no_wait: bool,
    },
    /// Undo a finished job's changes (as a new job), and follow it.
    Rollback {
        id: String,
        /// Undo even over changes made since.
        #[arg(long)]
        force: bool,
        /// Print the rollback job's id without waiting.
        #[arg(long)]
        detach: bool,
    },
    /// Retry now the unwind of a job whose unwind could not finish (shown as
    /// "unwind incomplete"); the daemon also retries it by itself, with backoff.
    Unwind {
        id: String,
        /// Give the rest of the unwind up (after putting things right by hand); frees the
        /// job's resources for the jobs waiting on them.
        #[arg(long)]
        abandon: bool,
    },
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("'{s}' is not key=value"))
}

fn cmd_name(cmd: &Runbooks) -> Option<&str> {
    match cmd {
        Runbooks::List => None,
        Runbooks::Show { name } => Some(name),
    }
}

/// How long the CLI waits for a restarting daemon before it gives up following a job.
const RECONNECT_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits for statelyd to answer again and follows the job from the last event seen.
async fn reconnect(
    client: &mut Client,
    view: &EventView,
) -> Result<Option<tonic::Streaming<pb::JobEvent>>> {
    say_err!(
        "statelyd stopped while job {} ran; reconnecting to follow it (Ctrl-C leaves; the job goes on)…",
        view.job_id
    );
    let deadline = tokio::time::Instant::now() + RECONNECT_WITHIN;
    // One Ctrl-C listener for the whole wait, so a press between attempts is not lost.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let left = |view: &EventView| {
        say_err!(
            "left; job {0} goes on (follow it: stately jobs watch {0} --after {1})",
            view.job_id,
            view.last_seq
        );
    };
    loop {
        let req = pb::WatchJobRequest {
            job_id: view.job_id.clone(),
            after_seq: view.last_seq,
        };
        tokio::select! {
            r = client.watch_job(req) => match r {
                Ok(s) => return Ok(Some(s.into_inner())),
                // Unavailable, or what a connection broken mid-call gives: still away.
                Err(s) if !stately::client::is_away(&s) => {
                    return Err(explain(s));
                }
                Err(_) => {}
            },
            _ = &mut interrupted => {
                left(view);
                return Ok(None);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "statelyd did not come back within {RECONNECT_WITHIN:?}; job {0} was at event {1} (follow it: stately jobs watch {0} --after {1})",
                view.job_id,
                view.last_seq
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
            _ = &mut interrupted => {
                left(view);
                return Ok(None);
            }
        }
    }
}

/// A job id as a person types it: the whole id, an unambiguous prefix of one (as git takes
/// commit ids), or `@last` for the newest job.
pub(crate) async fn resolve_id(client: &mut Client, given: &str) -> Result<String> {
    if given.parse::<stately::job::JobId>().is_ok() {
        return Ok(given.to_owned());
    }
    if given == "@last" {
        let page = client
            .list_jobs(pb::ListJobsRequest {
                page_size: 1,
                ..Default::default()
            })
            .await
            .map_err(explain)?
            .into_inner();
        return page
            .jobs
            .first()
            .map(|j| j.id.clone())
            .ok_or_else(|| anyhow!("not found: there are no jobs yet, so no @last"));
    }
    let prefix = given.to_ascii_lowercase();
    if prefix.len() < 4 || !prefix.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(anyhow!(
            "invalid request: '{given}' is not a job id, a prefix of one (at least 4 hex digits) or @last"
        ));
    }
    let mut matches = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_jobs(pb::ListJobsRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .map_err(explain)?
            .into_inner();
        matches.extend(
            page.jobs
                .into_iter()
                .map(|j| j.id)
                .filter(|id| id.starts_with(&prefix)),
        );
        if matches.len() > 1 || page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    match matches.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(anyhow!("not found: no job id starts with '{given}'")),
        many => Err(anyhow!(
            "invalid request: '{given}' is ambiguous: it begins {} and possibly more job ids (give more of it)",
            many[..2].join(" and ")
        )),
    }
}

/// A gRPC error as one line a person can act on.
pub(crate) fn explain(s: tonic::Status) -> anyhow::Error {
    let code = match s.code() {
        Code::Unavailable => return anyhow!("statelyd is unavailable: {}", s.message()),
        Code::Unauthenticated => {
            return match crate::connect::GENERATED_TOKEN.get() {
                Some(path) => anyhow!(
                    "not authenticated: {} (the token was read from {}, which statelyd generates when no [[token]] is configured; a daemon with [[token]]s does not take it: pass --token or --token-file)",
                    s.message(),
                    path.display()
                ),
                None => anyhow!("not authenticated: {}", s.message()),
            };
        }
        Code::PermissionDenied => "permission denied",
        Code::NotFound => "not found",
        Code::InvalidArgument => "invalid request",
        Code::FailedPrecondition => "refused",
        Code::AlreadyExists => "already exists",
        Code::DeadlineExceeded => "timed out",
        _ => "error",
    };
    anyhow!("{code}: {}", s.message())
}

/// `--node`, for the requests that name a node (set once, before any is made).
static TARGET_NODE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The node `--node` names; empty for the node reached.
pub(crate) fn target_node() -> String {
    TARGET_NODE.get().cloned().unwrap_or_default()
}

pub(crate) async fn run(args: Args) -> Result<u8> {
    // Generated from the flags themselves, so they cannot drift; no daemon needed.
    match &args.command {
        Command::Completions { shell } => {
            let mut cmd = <Args as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "stately", &mut out);
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), &out);
            return Ok(0);
        }
        Command::Man => {
            let mut out = Vec::new();
            clap_mangen::Man::new(<Args as clap::CommandFactory>::command()).render(&mut out)?;
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), &out);
            return Ok(0);
        }
        _ => {}
    }
    let tls = crate::connect::TlsFiles {
        cacert: args.cacert.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
    };
    if !stately::client::is_https(&args.server) && (tls.cacert.is_some() || tls.cert.is_some()) {
        return Err(Usage(format!(
            "--cacert, --cert and --key are for an https:// server, not {}",
            args.server
        ))
        .into());
    }
    // With a client certificate or on a unix socket, the daemon may know the caller without
    // a token.
    // The token statelyd generated here goes to this machine's daemon only; with a client
    // certificate, or on a unix socket, the daemon may know the caller without one.
    let generated = crate::connect::generated_for(&args.server, tls.cert.is_some());
    let token = token(args.token.clone(), args.token_file.clone(), generated)?;
    let channel = connect(&args.server, token.as_deref(), &tls).await?;
    let json = args.output == Output::Json;
    let _ = TARGET_NODE.set(args.node.clone().unwrap_or_default());
    let mut client = pb::jobs_client::JobsClient::new(channel.clone());
    match args.command {
        Command::Haproxy(cmd) => {
            crate::haproxy::run(
                pb::haproxy_client::HaproxyClient::new(channel),
                &mut client,
                cmd,
                json,
            )
            .await
        }
        Command::Alerts(cmd) => crate::alerts::run(&mut client, cmd, json).await,
        Command::Cert(cmd) => {
            crate::certs::run(
                pb::certificates_client::CertificatesClient::new(channel),
                &mut client,
                cmd,
                json,
            )
            .await
        }
        Command::Stats(a) => {
            crate::stats::run(pb::stats_client::StatsClient::new(channel), a, json).await
        }
        Command::Status => crate::status::run(channel, json).await,
        Command::Whoami => {
            let me = client
                .who_am_i(pb::WhoAmIRequest {})
                .await
                .map_err(explain)?
                .into_inner();
            if json {
                crate::render::say(&serde_json::json!({
                    "identity": me.identity, "role": me.role, "via": me.via, "peer": me.peer,
                    "tls": me.tls,
                    "certificate": (!me.certificate_cn.is_empty() || !me.certificate_san.is_empty()).then(|| serde_json::json!({
                        "cn": me.certificate_cn, "o": me.certificate_o, "san": me.certificate_san,
                    })),
                }).to_string());
            } else {
                crate::render::say(&format!(
                    "{} ({}, by {})",
                    me.identity,
                    me.role,
                    me.via.replace('_', " ")
                ));
                crate::render::say(&format!(
                    "connection {}{}",
                    me.peer,
                    if me.tls { ", TLS" } else { "" }
                ));
                if !me.certificate_cn.is_empty() || !me.certificate_san.is_empty() {
                    let mut subject = Vec::new();
                    if !me.certificate_cn.is_empty() {
                        subject.push(format!("CN={}", me.certificate_cn));
                    }
                    subject.extend(me.certificate_o.iter().map(|o| format!("O={o}")));
                    subject.extend(me.certificate_san.iter().map(|s| format!("SAN={s}")));
                    crate::render::say(&format!("certificate {}", subject.join(", ")));
                }
            }
            Ok(0)
        }
        Command::Run {
            runbook,
            params,
            detach,
            request_id,
            labels,
        } => {
            let req = pb::SubmitJobRequest {
                node: crate::cli::target_node(),
                spec: Some(pb::JobSpec {
                    kind: Some(pb::job_spec::Kind::Runbook(pb::RunbookJob {
                        runbook,
                        params: params.into_iter().collect(),
                    })),
                }),
                request_id: request_id.unwrap_or_default(),
                labels: labels.into_iter().collect(),
            };
            submit(&mut client, req, detach, json).await
        }
        Command::Jobs(Jobs::List {
            state,
            kind,
            labels,
            limit,
            page_token,
        }) => {
            let filtered = !state.is_empty() || kind.is_some() || !labels.is_empty();
            let states = state
                .iter()
                .map(|s| {
                    pb::JobState::from_str_name(&format!("JOB_STATE_{}", s.to_uppercase()))
                        .map(|s| s as i32)
                        .ok_or_else(|| anyhow!("unknown state '{s}'"))
                })
                .collect::<Result<Vec<_>>>()?;
            let resp = client
                .list_jobs(pb::ListJobsRequest {
                    states,
                    kind: kind.unwrap_or_default(),
                    labels: labels.into_iter().collect(),
                    page_size: limit,
                    page_token: page_token.unwrap_or_default(),
                    node: target_node(),
                })
                .await
                .map_err(explain)?
                .into_inner();
            if json {
                resp.jobs.iter().for_each(|j| say(&job_json(j).to_string()));
            } else if resp.jobs.is_empty() {
                say_err!(
                    "{}",
                    if filtered {
                        "no jobs match"
                    } else {
                        "no jobs yet"
                    }
                );
            } else {
                print_jobs_table(&resp.jobs);
                if !resp.next_page_token.is_empty() {
                    say_err!("more: --page-token {}", resp.next_page_token);
                }
            }
            Ok(0)
        }
        Command::Completions { .. } | Command::Man => unreachable!("answered before connecting"),
        Command::Nodes(Nodes::List) => {
            let nodes = client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(explain)?
                .into_inner()
                .nodes;
            crate::render::print_nodes(&nodes, json);
            Ok(0)
        }
        Command::Runbooks(cmd) => {
            let all = client
                .list_runbooks(pb::ListRunbooksRequest {})
                .await
                .map_err(explain)?
                .into_inner()
                .runbooks;
            crate::render::print_runbooks(all, cmd_name(&cmd), json)
        }
        Command::Jobs(Jobs::Show { id }) => {
            let id = resolve_id(&mut client, &id).await?;
            let job = client
                .get_job(pb::GetJobRequest { job_id: id })
                .await
                .map_err(explain)?
                .into_inner();
            if json {
                say(&job_json(&job).to_string())
            } else {
                print_job(&job)
            }
            Ok(0)
        }
        Command::Jobs(Jobs::Watch { id, after }) => {
            let id = resolve_id(&mut client, &id).await?;
            let stream = client
                .watch_job(pb::WatchJobRequest {
                    job_id: id,
                    after_seq: after,
                })
                .await
                .map_err(explain)?
                .into_inner();
            follow(&mut client, stream, json, false).await
        }
        Command::Jobs(Jobs::Cancel {
            id,
            reason,
            no_wait,
        }) => {
            let id = resolve_id(&mut client, &id).await?;
            let job = client
                .cancel_job(pb::CancelJobRequest {
                    job_id: id,
                    reason,
                    wait: !no_wait,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if json {
                say(&job_json(&job).to_string());
            } else {
                say(&format!("job {} {}", job.id, state_name(job.state)));
            }
            let ok = matches!(
                pb::JobState::try_from(job.state),
                Ok(pb::JobState::Cancelled | pb::JobState::Cancelling)
            );
            Ok(if ok { 0 } else { EXIT_JOB })
        }
        Command::Jobs(Jobs::Unwind { id, abandon }) => {
            let id = resolve_id(&mut client, &id).await?;
            let job = client
                .unwind_job(pb::UnwindJobRequest {
                    job_id: id,
                    abandon,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if json {
                say(&job_json(&job).to_string());
            } else if job.unwind_incomplete {
                say(&format!(
                    "job {} {}: its unwind is still incomplete: {}",
                    job.id,
                    state_name(job.state),
                    job.error
                ));
            } else {
                say(&format!(
                    "job {} {}: its unwind is complete ({})",
                    job.id,
                    state_name(job.state),
                    job.error
                ));
            }
            Ok(if job.unwind_incomplete { EXIT_JOB } else { 0 })
        }
        Command::Jobs(Jobs::Rollback { id, force, detach }) => {
            let id = resolve_id(&mut client, &id).await?;
            let job = client
                .rollback_job(pb::RollbackJobRequest { job_id: id, force })
                .await
                .map_err(explain)?
                .into_inner();
            print_or_follow(&mut client, job, detach, json).await
        }
    }
}

/// Submits a job: with `detach`, prints its id (or JSON) and returns; otherwise runs it
/// attached (`RunJob`) and follows it to its end.
pub(crate) async fn submit(
    client: &mut Client,
    req: pb::SubmitJobRequest,
    detach: bool,
    json: bool,
) -> Result<u8> {
    if detach {
        let job = client.submit_job(req).await.map_err(explain)?.into_inner();
        return print_or_follow(client, job, true, json).await;
    }
    let stream = client.run_job(req).await.map_err(explain)?.into_inner();
    follow(client, stream, json, true).await
}

/// With `detach`, prints a started job's id (or JSON); otherwise follows it to its end.
pub(crate) async fn print_or_follow(
    client: &mut Client,
    job: pb::Job,
    detach: bool,
    json: bool,
) -> Result<u8> {
    if detach {
        say(&if json {
            job_json(&job).to_string()
        } else {
            job.id
        });
        return Ok(0);
    }
    let stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: job.id,
            after_seq: 0,
        })
        .await
        .map_err(explain)?
        .into_inner();
    follow(client, stream, json, false).await
}

/// Shows a job's events until it ends. When `attached`, the first Ctrl-C cancels the job and
/// keeps showing it unwind; a second one leaves at once (the server still cancels it, since
/// the attached call ends).
pub(crate) async fn follow(
    client: &mut Client,
    mut stream: tonic::Streaming<pb::JobEvent>,
    json: bool,
    attached: bool,
) -> Result<u8> {
    let mut view = EventView::new(json);
    let mut interrupted = false;
    // One listener for the whole follow: a Ctrl-C pressed while a cancel request is on its way
    // (or an event is printed) is kept for the next turn, not lost with a listener made anew.
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(e)) => {
                    view.show(&e);
                    // Nobody reads any more: a watcher leaves (the job goes on); an attached
                    // run keeps following quietly, so the job is not cancelled by the closed
                    // pipe and the exit status is still the job's.
                    if !attached && crate::render::stdout_closed() {
                        return Ok(0);
                    }
                }
                Ok(None) if view.ended.is_some() || view.job_id.is_empty() => break,
                // The stream ended before the job: the daemon is stopping (a restart leaves
                // the job to its grace period and recovery). Follow it again from the last
                // event seen, once the daemon is back.
                Ok(None) => match reconnect(client, &view).await? {
                    Some(s) => stream = s,
                    None => return Ok(130),
                },
                Err(s) if stately::client::is_away(&s) && !view.job_id.is_empty() => {
                    match reconnect(client, &view).await? {
                        Some(s) => stream = s,
                        None => return Ok(130),
                    }
                }
                Err(s) => return Err(explain(s)),
            },
            // A watcher whose reader left goes at once (an attached run keeps following).
            _ = crate::render::stdout_gone(), if !attached => return Ok(0),
            _ = interrupts.recv() => {
                if view.job_id.is_empty() {
                    return Ok(130);
                }
                if !attached {
                    say_err!(
                        "stopped watching; job {0} goes on (follow it again: stately jobs watch {0} --after {1})",
                        view.job_id, view.last_seq
                    );
                    return Ok(130);
                }
                if interrupted {
                    say_err!(
                        "leaving; job {0} is still being cancelled and unwound (follow it: stately jobs watch {0} --after {1})",
                        view.job_id, view.last_seq
                    );
                    return Ok(130);
                }
                interrupted = true;
                say_err!("cancelling job {} (Ctrl-C again to leave now)…", view.job_id);
                let req = pb::CancelJobRequest { job_id: view.job_id.clone(), reason: "interrupted from the CLI".into(), wait: false };
                if let Err(s) = client.cancel_job(req).await {
                    say_err!("stately: {}", explain(s));
                }
            }
        }
    }
    match view.ended.map(pb::JobState::try_from) {
        Some(Ok(pb::JobState::Succeeded)) => Ok(0),
        Some(_) => Ok(EXIT_JOB),
        None => bail!(
            "the stream ended before job {} did (after event {})",
            view.job_id,
            view.last_seq
        ),
    }
}
