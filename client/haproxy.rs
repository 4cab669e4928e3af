//! `stately haproxy`: targets, the live configuration, and validating a candidate (the dry run
//! of an apply), with HAProxy's complaints shown next to the lines they are about.

use crate::connect::Authed;
use crate::render::say;
use anyhow::{Context, Result, anyhow};
use serde_json::json;
use stately::haproxy::edits::Edit;
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
    /// Edit the live configuration with structured edits, as a job (edit, validate, swap,
    /// reload, verify, then check each edit from a client), attached; or with --dry-run show the
    /// diff. Several edits in one job, in the order given; the flags after an edit flag
    /// (--host, --code, --allow ...) belong to it.
    #[command(after_help = EDIT_HELP)]
    Edit(Box<EditArgs>),
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

const EDIT_HELP: &str = "\
Examples:
  stately haproxy edit edge --force-https web --dry-run
  stately haproxy edit edge --https-frontend web --force-https web
  stately haproxy edit edge --restrict web /admin --allow 203.0.113.7 --allow 10.0.0.0/8
  stately haproxy edit edge --health-check app --host www.example.com
  stately haproxy edit edge --add-server app/s3 10.0.0.3:8080 --option check
  stately haproxy edit edge --set 'backend app' 'timeout server 30s'
  stately haproxy edit edge -f edits.toml    # [[edit]] op = \"force_https\" frontend = \"web\"";

/// `stately haproxy edit`: the edit flags are read in order from the command line (see
/// [`order_edits`]); clap keeps each flag's values, not their order.
#[derive(clap::Args, Debug)]
pub(crate) struct EditArgs {
    target: String,
    /// Redirect plain HTTP to HTTPS in FRONTEND (the ACME challenge path stays on HTTP).
    #[arg(long = "force-https", value_name = "FRONTEND")]
    force_https: Vec<String>,
    /// Serve TLS in FRONTEND: `bind *:443 ssl crt <bundle dir> alpn h2,http/1.1`.
    #[arg(long = "https-frontend", value_name = "FRONTEND")]
    https_frontend: Vec<String>,
    /// Sticky sessions in BACKEND by an inserted cookie (SERVERID).
    #[arg(long = "sticky", value_name = "BACKEND")]
    sticky: Vec<String>,
    /// Deny PATH (a prefix) in FRONTEND to every address but --allow's.
    #[arg(long = "restrict", num_args = 2, value_names = ["FRONTEND", "PATH"])]
    restrict: Vec<String>,
    /// An HTTP health check of BACKEND (give --host: the Host it sends).
    #[arg(long = "health-check", value_name = "BACKEND")]
    health_check: Vec<String>,
    /// Send /.well-known/acme-challenge/ in FRONTEND to statelyd's responder.
    #[arg(long = "route-acme", value_name = "FRONTEND")]
    route_acme: Vec<String>,
    /// Send HAProxy's log to statelyd's log stream for the target (its log_socket or
    /// log_udp): `log ADDR local0 notice` in global, `log global` in DEFAULTS ('defaults', or
    /// 'defaults NAME').
    #[arg(long = "log-stream", value_name = "DEFAULTS")]
    log_stream: Vec<String>,
    /// Add `server NAME ADDR` to BACKEND (written BACKEND/NAME).
    #[arg(long = "add-server", num_args = 2, value_names = ["BACKEND/NAME", "ADDR"])]
    add_server: Vec<String>,
    /// Remove a server (BACKEND/NAME).
    #[arg(long = "remove-server", value_name = "BACKEND/NAME")]
    remove_server: Vec<String>,
    /// Set LINE in SECTION ('global', 'defaults', 'backend app' ...): the line of the same
    /// key is replaced, or LINE added.
    #[arg(long = "set", num_args = 2, value_names = ["SECTION", "LINE"])]
    set: Vec<String>,
    /// Remove the lines of SECTION that say LINE.
    #[arg(long = "remove", num_args = 2, value_names = ["SECTION", "LINE"])]
    remove: Vec<String>,
    /// With --force-https: only for this Host. With --health-check: the Host it sends.
    #[arg(long, value_name = "HOST")]
    host: Vec<String>,
    /// With --force-https: 301 (default), 302, 303, 307 or 308.
    #[arg(long, value_name = "CODE")]
    code: Vec<u16>,
    /// With --force-https: redirect the ACME challenge path too.
    #[arg(long = "no-acme-exemption")]
    no_acme_exemption: bool,
    /// With --https-frontend: the bind address (default *:443).
    #[arg(long, value_name = "ADDR")]
    bind: Vec<String>,
    /// With --https-frontend: a certificate file or directory (default the bundle directory).
    #[arg(long, value_name = "PATH")]
    crt: Vec<PathBuf>,
    /// With --https-frontend: ALPN (default h2,http/1.1).
    #[arg(long, value_name = "PROTOCOLS")]
    alpn: Vec<String>,
    /// With --https-frontend for a new frontend: its default backend.
    #[arg(long, value_name = "BACKEND")]
    backend: Vec<String>,
    /// With --sticky: the cookie's name (default SERVERID).
    #[arg(long, value_name = "NAME")]
    cookie: Vec<String>,
    /// With --restrict: an address or CIDR allowed (repeat, or separate with commas).
    #[arg(long, value_name = "CIDR")]
    allow: Vec<String>,
    /// With --restrict: the status denied requests get (default 403).
    #[arg(long, value_name = "STATUS")]
    status: Vec<u16>,
    /// With --health-check: the URI checked (default /).
    #[arg(long, value_name = "URI")]
    uri: Vec<String>,
    /// With --health-check: GET (default), HEAD or OPTIONS.
    #[arg(long, value_name = "METHOD")]
    method: Vec<String>,
    /// With --health-check: the status that means healthy (default 200).
    #[arg(long, value_name = "STATUS")]
    expect: Vec<u16>,
    /// With --route-acme: the responder's address (default statelyd's configured one).
    #[arg(long, value_name = "ADDR")]
    responder: Vec<String>,
    /// With --add-server: one more word for the server line (repeat: --option check).
    #[arg(long = "option", value_name = "WORD", allow_hyphen_values = true)]
    option: Vec<String>,
    /// With --set: the words that identify the line it replaces.
    #[arg(long, value_name = "WORDS")]
    key: Vec<String>,
    /// Edits from a TOML file: [[edit]] tables with `op` and the API's fields.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
    /// Replace lines that conflict with an edit instead of refusing.
    #[arg(long)]
    replace: bool,
    /// Refuse to edit a live configuration other than this version.
    #[arg(long)]
    base_version: Option<String>,
    /// Show the diff, the new version and `haproxy -c`'s verdict; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Accept servers UP before the reload being DOWN after it.
    #[arg(long)]
    allow_servers_down: bool,
    /// The edits, in command-line order (filled by `order_edits`).
    #[arg(skip)]
    pub(crate) edits: Vec<Edit>,
}

/// The flags that begin an edit, and those that belong to the edit before them.
const EDIT_FLAGS: &[&str] = &[
    "force_https",
    "https_frontend",
    "sticky",
    "restrict",
    "health_check",
    "route_acme",
    "log_stream",
    "add_server",
    "remove_server",
    "set",
    "remove",
];
const MODIFIERS: &[&str] = &[
    "host",
    "code",
    "no_acme_exemption",
    "bind",
    "crt",
    "alpn",
    "backend",
    "cookie",
    "allow",
    "status",
    "uri",
    "method",
    "expect",
    "responder",
    "option",
    "key",
];

/// Builds `haproxy edit`'s edits in the order the flags were given, each modifier on the
/// edit flag before it; a modifier that fits no edit before it is a usage error (exit 2).
pub(crate) fn order_edits(args: &mut crate::cli::Args, matches: &clap::ArgMatches) {
    let crate::cli::Command::Haproxy(HaproxyCommand::Edit(edit)) = &mut args.command else {
        return;
    };
    let Some(m) = matches
        .subcommand_matches("haproxy")
        .and_then(|m| m.subcommand_matches("edit"))
    else {
        return;
    };
    let usage = |msg: String| -> ! {
        <crate::cli::Args as clap::CommandFactory>::command()
            .error(clap::error::ErrorKind::ArgumentConflict, msg)
            .exit()
    };
    // Every occurrence of every flag, with where it stood and its values.
    let mut seen: Vec<(usize, &str, Vec<String>)> = Vec::new();
    for id in EDIT_FLAGS.iter().chain(MODIFIERS) {
        let Some(indices) = m.indices_of(id) else {
            continue;
        };
        let indices: Vec<usize> = indices.collect();
        if *id == "no_acme_exemption" {
            if m.get_flag(id) {
                seen.push((indices[0], id, Vec::new()));
            }
            continue;
        }
        let values: Vec<Vec<String>> = match m.get_raw_occurrences(id) {
            Some(occ) => occ
                .map(|o| o.map(|v| v.to_string_lossy().into_owned()).collect())
                .collect(),
            None => continue,
        };
        let mut at = indices.into_iter();
        for v in values {
            let first = at.next().unwrap_or(0);
            for _ in 1..v.len() {
                at.next();
            }
            seen.push((first, id, v));
        }
    }
    seen.sort_by_key(|(i, _, _)| *i);
    let mut edits: Vec<Edit> = Vec::new();
    for (_, id, v) in seen {
        let one = v.first().cloned().unwrap_or_default();
        let flag = format!("--{}", id.replace('_', "-"));
        let new = match id {
            "force_https" => Some(Edit::ForceHttps {
                frontend: one.clone(),
                host: None,
                code: None,
                exempt_acme: None,
            }),
            "https_frontend" => Some(Edit::HttpsFrontend {
                frontend: one.clone(),
                bind: None,
                crt: None,
                alpn: None,
                backend: None,
            }),
            "sticky" => Some(Edit::StickySessions {
                backend: one.clone(),
                cookie: None,
            }),
            "restrict" => Some(Edit::RestrictPath {
                frontend: one.clone(),
                path: v.get(1).cloned().unwrap_or_default(),
                allow: Vec::new(),
                status: None,
            }),
            "health_check" => Some(Edit::HealthCheck {
                backend: one.clone(),
                method: None,
                uri: None,
                host: None,
                expect_status: None,
            }),
            "route_acme" => Some(Edit::RouteAcme {
                frontend: one.clone(),
                responder: None,
            }),
            "log_stream" => Some(Edit::LogStream {
                defaults: Some(one.clone()),
            }),
            "add_server" | "remove_server" => {
                let Some((backend, name)) = one.split_once('/') else {
                    usage(format!("{flag} takes BACKEND/NAME, not '{one}'"));
                };
                let (backend, name) = (backend.to_owned(), name.to_owned());
                Some(if id == "add_server" {
                    Edit::AddServer {
                        backend,
                        name,
                        address: v.get(1).cloned().unwrap_or_default(),
                        options: Vec::new(),
                    }
                } else {
                    Edit::RemoveServer { backend, name }
                })
            }
            "set" => Some(Edit::SetLine {
                section: one.clone(),
                line: v.get(1).cloned().unwrap_or_default(),
                key: None,
            }),
            "remove" => Some(Edit::RemoveLine {
                section: one.clone(),
                line: v.get(1).cloned().unwrap_or_default(),
            }),
            _ => None,
        };
        if let Some(e) = new {
            edits.push(e);
            continue;
        }
        let Some(last) = edits.last_mut() else {
            usage(format!(
                "{flag} belongs to an edit: put it after the edit flag it modifies (e.g. --force-https web {flag} ...)"
            ));
        };
        let fits = match (id, last) {
            ("host", Edit::ForceHttps { host, .. } | Edit::HealthCheck { host, .. }) => {
                *host = Some(one);
                true
            }
            ("code", Edit::ForceHttps { code, .. }) => {
                *code = one.parse().ok();
                true
            }
            ("no_acme_exemption", Edit::ForceHttps { exempt_acme, .. }) => {
                *exempt_acme = Some(false);
                true
            }
            ("bind", Edit::HttpsFrontend { bind, .. }) => {
                *bind = Some(one);
                true
            }
            ("crt", Edit::HttpsFrontend { crt, .. }) => {
                *crt = Some(one.into());
                true
            }
            ("alpn", Edit::HttpsFrontend { alpn, .. }) => {
                *alpn = Some(one);
                true
            }
            ("backend", Edit::HttpsFrontend { backend, .. }) => {
                *backend = Some(one);
                true
            }
            ("cookie", Edit::StickySessions { cookie, .. }) => {
                *cookie = Some(one);
                true
            }
            ("allow", Edit::RestrictPath { allow, .. }) => {
                allow.extend(one.split(',').filter(|a| !a.is_empty()).map(str::to_owned));
                true
            }
            ("status", Edit::RestrictPath { status, .. }) => {
                *status = one.parse().ok();
                true
            }
            ("uri", Edit::HealthCheck { uri, .. }) => {
                *uri = Some(one);
                true
            }
            ("method", Edit::HealthCheck { method, .. }) => {
                *method = Some(one.to_ascii_uppercase());
                true
            }
            ("expect", Edit::HealthCheck { expect_status, .. }) => {
                *expect_status = one.parse().ok();
                true
            }
            ("responder", Edit::RouteAcme { responder, .. }) => {
                *responder = Some(one);
                true
            }
            ("option", Edit::AddServer { options, .. }) => {
                options.extend(one.split_whitespace().map(str::to_owned));
                true
            }
            ("key", Edit::SetLine { key, .. }) => {
                *key = Some(one);
                true
            }
            _ => false,
        };
        if !fits {
            let op = edits.last().map(|e| e.op()).unwrap_or_default();
            usage(format!(
                "{flag} does not apply to the edit before it ({}); see stately haproxy edit --help",
                op.replace('_', "-")
            ));
        }
    }
    edit.edits = edits;
}

/// The edits of a TOML file: `[[edit]]` tables, each with `op` and the API's fields.
fn edits_file(path: &std::path::Path) -> Result<Vec<Edit>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        edit: Vec<Edit>,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let f: File = toml::from_str(&text)
        .map_err(|e| anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
    if f.edit.is_empty() {
        return Err(anyhow!(
            "{}: no [[edit]] tables (each with op = \"force_https\", ... and its fields)",
            path.display()
        ));
    }
    Ok(f.edit)
}

fn print_preview(p: &pb::EditPreview, json: bool) {
    if json {
        let d: Vec<_> = p
            .diagnostics
            .iter()
            .map(|d| json!({"level": if d.level == pb::diagnostic::Level::Alert as i32 { "alert" } else { "warning" }, "line": d.line, "message": d.message, "source": d.source}))
            .collect();
        say(&json!({"changed": p.changed, "diff": p.diff, "current_version": p.current_version,
            "version": p.version, "valid": p.valid, "diagnostics": d, "notes": p.notes,
            "goes_live_by": if p.goes_live_by.is_empty() { serde_json::Value::Null } else { json!(p.goes_live_by) },
            "checks": p.checks, "unproven": p.unproven})
        .to_string());
        return;
    }
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none();
    for line in p.diff.lines() {
        let code = match line.as_bytes().first() {
            _ if !colour => None,
            Some(b'+') if !line.starts_with("+++") => Some("32"),
            Some(b'-') if !line.starts_with("---") => Some("31"),
            Some(b'@') => Some("36"),
            _ => None,
        };
        match code {
            Some(c) => say(&format!("\x1b[{c}m{line}\x1b[0m")),
            None => say(line),
        }
    }
    for n in &p.notes {
        say(&format!("# {n}"));
    }
    for d in &p.diagnostics {
        let mark = if d.level == pb::diagnostic::Level::Alert as i32 {
            "✗"
        } else {
            "!"
        };
        match d.line {
            Some(n) => say(&format!(
                "{mark} line {n}: {} ({})",
                d.message,
                d.source.trim()
            )),
            None => say(&format!("{mark} {}", d.message)),
        }
    }
    if !p.changed {
        say(&format!(
            "no change: every edit is already in effect ({})",
            p.current_version
        ));
        return;
    }
    for c in &p.checks {
        say(&format!("# the job checks: {c}"));
    }
    for u in &p.unproven {
        say(&format!("# not checked: {u}"));
    }
    say(&if p.valid {
        format!(
            "valid: {} -> {}, goes live by {} (run again without --dry-run, with --base-version {})",
            p.current_version, p.version, p.goes_live_by, p.current_version
        )
    } else {
        "invalid: haproxy -c refuses the edited file; nothing was changed".to_owned()
    });
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
                say_err!("no HAProxy targets are configured ([[haproxy]] in statelyd's config)");
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
                say_err!("# version {}", cfg.version);
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
                node: crate::cli::target_node(),
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
        HaproxyCommand::Edit(mut e) => {
            if let Some(f) = &e.file {
                e.edits.extend(edits_file(f)?);
            }
            if e.edits.is_empty() {
                return Err(anyhow!(
                    "no edits: give an edit flag (--force-https FRONTEND, ...) or -f FILE; see stately haproxy edit --help"
                ));
            }
            let edits: Vec<pb::HaproxyEdit> = e.edits.iter().map(pb::HaproxyEdit::from).collect();
            if e.dry_run {
                let p = c
                    .preview_edits(pb::PreviewEditsRequest {
                        target: e.target,
                        edits,
                        base_version: e.base_version.unwrap_or_default(),
                        replace: e.replace,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                print_preview(&p, json);
                return Ok(if p.valid { 0 } else { crate::cli::EXIT_JOB });
            }
            let req = pb::SubmitJobRequest {
                node: crate::cli::target_node(),
                spec: Some(pb::JobSpec {
                    kind: Some(pb::job_spec::Kind::HaproxyEdit(pb::HaproxyEditJob {
                        target: e.target,
                        edits,
                        base_version: e.base_version.unwrap_or_default(),
                        replace: e.replace,
                        allow_servers_down: e.allow_servers_down,
                    })),
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
                    node: crate::cli::target_node(),
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
