//! How the CLI shows things: tables and job details for people, one JSON object per line for
//! scripts, and a live view of a job's steps (progress bars on a terminal, plain lines when not).

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use stately::pb;
use std::collections::HashMap;
use std::io::{IsTerminal, Write};

/// Prints a line to stdout; a closed pipe (`stately jobs list | head`) ends the program quietly.
/// Set once stdout's reader has gone (`stately run x | head -2`).
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Prints a line. A closed pipe is not an error, and does not end the command: an attached
/// job must neither be cancelled by it nor have its outcome hidden, so the command goes on
/// quietly and exits with the job's status (watchers check [`stdout_closed`] and leave).
pub(crate) fn say(line: &str) {
    if stdout_closed() {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}")
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        STDOUT_CLOSED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether stdout's reader has gone.
pub(crate) fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Resolves when stdout is a pipe whose reader has gone (`stately stats --watch | head -1`),
/// without waiting for the next write to find out; pends forever on a terminal or a file.
pub(crate) async fn stdout_gone() {
    use std::os::fd::AsFd;
    let watched = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .and_then(|fd| {
            // SAFETY: `fd` is our own duplicate of stdout, owned by the AsyncFd, which
            // deregisters it before it is closed.
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::ERROR)
            }
            .ok()
        });
    match watched {
        // A pipe's write end reports an error once its read end is closed.
        Some(fd) => {
            let _ = fd.ready(tokio::io::Interest::ERROR).await;
            STDOUT_CLOSED.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        None => std::future::pending().await,
    }
}

pub(crate) fn state_name(s: i32) -> &'static str {
    match pb::JobState::try_from(s) {
        Ok(pb::JobState::Pending) => "PENDING",
        Ok(pb::JobState::Running) => "RUNNING",
        Ok(pb::JobState::Cancelling) => "CANCELLING",
        Ok(pb::JobState::Succeeded) => "SUCCEEDED",
        Ok(pb::JobState::Failed) => "FAILED",
        Ok(pb::JobState::Cancelled) => "CANCELLED",
        _ => "UNKNOWN",
    }
}

/// JSON's one convention for enum values: upper case, as the job states, without the proto's
/// prefix (`SUCCEEDED`, `INFO`); an absent value is null.
fn json_enum(name: &str, prefix: &str) -> Value {
    match name.strip_prefix(prefix) {
        Some("UNSPECIFIED") | None => Value::Null,
        Some(v) => Value::String(v.to_owned()),
    }
}

fn step_state_json(s: i32) -> Value {
    pb::StepState::try_from(s).map_or(Value::Null, |s| json_enum(s.as_str_name(), "STEP_STATE_"))
}

fn job_state_json(s: i32) -> Value {
    pb::JobState::try_from(s).map_or(Value::Null, |s| json_enum(s.as_str_name(), "JOB_STATE_"))
}

fn step_state_name(s: i32) -> &'static str {
    match pb::StepState::try_from(s) {
        Ok(pb::StepState::Pending) => "pending",
        Ok(pb::StepState::Running) => "running",
        Ok(pb::StepState::Succeeded) => "succeeded",
        Ok(pb::StepState::Failed) => "failed",
        Ok(pb::StepState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

fn time(t: &Option<prost_types::Timestamp>) -> Value {
    match t {
        Some(t) => {
            let at = std::time::UNIX_EPOCH
                + std::time::Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32);
            Value::String(humantime::format_rfc3339_millis(at).to_string())
        }
        None => Value::Null,
    }
}

fn spec_json(spec: &Option<pb::JobSpec>) -> Value {
    match spec.as_ref().and_then(|s| s.kind.as_ref()) {
        Some(pb::job_spec::Kind::Runbook(r)) => {
            json!({"runbook": {"runbook": r.runbook, "params": r.params}})
        }
        Some(pb::job_spec::Kind::Rollback(r)) => {
            json!({"rollback": {"target_job_id": r.target_job_id, "force": r.force}})
        }
        Some(pb::job_spec::Kind::HaproxyApply(a)) => {
            json!({"haproxy_apply": {"target": a.target, "base_version": a.base_version, "config_bytes": a.config.len()}})
        }
        Some(pb::job_spec::Kind::HaproxyServerState(h)) => {
            json!({"haproxy_server_state": {"target": h.target, "backend": h.backend, "server": h.server, "state": h.state}})
        }
        Some(pb::job_spec::Kind::AlertWatch(a)) => {
            json!({"alert_watch": {"target": a.target, "to": a.to, "interval_ms": a.interval_ms, "hold_ms": a.hold_ms,
                "proxies": a.proxies, "max_session_rate": a.max_session_rate,
                "max_sessions_percent": a.max_sessions_percent, "max_5xx": a.max_5xx}})
        }
        Some(pb::job_spec::Kind::CertificateIssue(c)) => {
            json!({"certificate_issue": {"names": c.names, "lineage": c.lineage, "webroot": c.webroot,
                "key_type": c.key_type, "reuse_key": c.reuse_key, "deploy": c.deploy, "acme": c.acme,
                "expand": c.expand, "challenge": c.challenge}})
        }
        Some(pb::job_spec::Kind::CertificateRevoke(r)) => {
            json!({"certificate_revoke": {"lineage": r.lineage, "reason": r.reason}})
        }
        Some(pb::job_spec::Kind::CertificateDelete(d)) => {
            json!({"certificate_delete": {"lineage": d.lineage}})
        }
        Some(pb::job_spec::Kind::CertificateAdopt(a)) => {
            json!({"certificate_adopt": {"root": a.root, "lineages": a.lineages, "deploy": a.deploy, "dry_run": a.dry_run}})
        }
        Some(pb::job_spec::Kind::HaproxyEdit(e)) => {
            json!({"haproxy_edit": {"target": e.target, "base_version": e.base_version, "replace": e.replace,
                "allow_servers_down": e.allow_servers_down,
                "edits": e.edits.iter().map(edit_json).collect::<Vec<_>>()}})
        }
        None => Value::Null,
    }
}

/// One structured edit as `{"<op>": {fields}}`, fields as the API names them.
pub(crate) fn edit_json(e: &pb::HaproxyEdit) -> Value {
    use pb::haproxy_edit::Op;
    match &e.op {
        Some(Op::ForceHttps(f)) => json!({"force_https": {"frontend": f.frontend, "host": f.host,
            "code": f.code, "no_acme_exemption": f.no_acme_exemption}}),
        Some(Op::HttpsFrontend(h)) => {
            json!({"https_frontend": {"frontend": h.frontend, "bind": h.bind,
            "crt": h.crt, "alpn": h.alpn, "backend": h.backend}})
        }
        Some(Op::StickySessions(st)) => {
            json!({"sticky_sessions": {"backend": st.backend, "cookie": st.cookie}})
        }
        Some(Op::RestrictPath(r)) => {
            json!({"restrict_path": {"frontend": r.frontend, "path": r.path,
            "allow": r.allow, "status": r.status}})
        }
        Some(Op::HealthCheck(h)) => {
            json!({"health_check": {"backend": h.backend, "method": h.method,
            "uri": h.uri, "host": h.host, "expect_status": h.expect_status}})
        }
        Some(Op::RouteAcme(r)) => {
            json!({"route_acme": {"frontend": r.frontend, "responder": r.responder}})
        }
        Some(Op::LogStream(l)) => json!({"log_stream": {"defaults": l.defaults}}),
        Some(Op::AddServer(a)) => json!({"add_server": {"backend": a.backend, "name": a.name,
            "address": a.address, "options": a.options}}),
        Some(Op::RemoveServer(r)) => {
            json!({"remove_server": {"backend": r.backend, "name": r.name}})
        }
        Some(Op::SetLine(l)) => {
            json!({"set_line": {"section": l.section, "line": l.line, "key": l.key}})
        }
        Some(Op::RemoveLine(l)) => json!({"remove_line": {"section": l.section, "line": l.line}}),
        None => Value::Null,
    }
}

pub(crate) fn job_json(j: &pb::Job) -> Value {
    json!({
        "id": j.id, "kind": j.kind, "spec": spec_json(&j.spec), "state": job_state_json(j.state),
        "steps": j.steps.iter().map(|s| json!({
            "index": s.index, "name": s.name, "state": step_state_json(s.state),
            "started_at": time(&s.started_at), "finished_at": time(&s.finished_at), "error": s.error,
        })).collect::<Vec<_>>(),
        "request_id": j.request_id, "labels": j.labels, "resources": j.resources, "waiting_for": j.waiting_for,
        "created_at": time(&j.created_at), "started_at": time(&j.started_at), "finished_at": time(&j.finished_at),
        "error": j.error, "failed_step": j.failed_step, "undo_entries": j.undo_entries,
        "rolled_back_by": j.rolled_back_by, "rollback_of": j.rollback_of, "last_seq": j.last_seq,
        "unwind_incomplete": j.unwind_incomplete,
        "submitted_by": (!j.submitted_by.is_empty()).then_some(&j.submitted_by),
        "node": j.node,
        "undo": j.undo.iter().map(|u| json!({"what": u.what, "applied": u.applied})).collect::<Vec<_>>(),
    })
}

pub(crate) fn event_json(e: &pb::JobEvent) -> Value {
    use pb::job_event::Event as E;
    let body = match &e.event {
        Some(E::StateChanged(s)) => {
            json!({"state_changed": {"from": job_state_json(s.from), "to": job_state_json(s.to), "reason": s.reason}})
        }
        Some(E::StepStarted(s)) => json!({"step_started": {"index": s.index, "name": s.name}}),
        Some(E::StepFinished(s)) => {
            json!({"step_finished": {"index": s.index, "name": s.name, "state": step_state_json(s.state), "error": s.error}})
        }
        Some(E::Progress(p)) => {
            json!({"progress": {"step_index": p.step_index, "done": p.done, "total": p.total, "message": p.message}})
        }
        Some(E::Log(l)) => {
            let level = pb::LogLevel::try_from(l.level)
                .map_or(Value::Null, |l| json_enum(l.as_str_name(), "LOG_LEVEL_"));
            json!({"log": {"level": level, "message": l.message, "step_index": l.step_index}})
        }
        None => Value::Null,
    };
    let mut v = json!({"job_id": e.job_id, "seq": e.seq, "at": time(&e.at)});
    if let (Value::Object(m), Value::Object(b)) = (&mut v, body) {
        m.extend(b);
    }
    v
}

/// A time for a table: local (TZ, else the system's zone), to the second, with its offset
/// (`2026-12-01 22:14:03 +01:00`). JSON keeps RFC 3339 in UTC.
fn short_time(t: &Option<prost_types::Timestamp>) -> String {
    let Some(t) = t else {
        return "-".into();
    };
    match jiff::Timestamp::new(t.seconds, t.nanos.clamp(0, 999_999_999)) {
        Ok(at) => at
            .to_zoned(jiff::tz::TimeZone::system())
            .strftime("%Y-%m-%d %H:%M:%S %:z")
            .to_string(),
        Err(_) => "-".into(),
    }
}

fn what(j: &pb::Job) -> String {
    match j.spec.as_ref().and_then(|s| s.kind.as_ref()) {
        Some(pb::job_spec::Kind::Runbook(r)) => r.runbook.clone(),
        Some(pb::job_spec::Kind::Rollback(r)) => format!("undo {}", &r.target_job_id),
        Some(pb::job_spec::Kind::HaproxyApply(a)) => format!("apply to {}", a.target),
        Some(pb::job_spec::Kind::HaproxyServerState(h)) => {
            format!("{} {}/{} {}", h.target, h.backend, h.server, h.state)
        }
        Some(pb::job_spec::Kind::AlertWatch(a)) => {
            format!("watch {} → {}", a.target, a.to.join(", "))
        }
        Some(pb::job_spec::Kind::CertificateIssue(c)) => {
            format!("cert {} ({})", c.lineage, c.names.join(", "))
        }
        Some(pb::job_spec::Kind::HaproxyEdit(e)) => {
            format!("edit {} ({} edit(s))", e.target, e.edits.len())
        }
        Some(pb::job_spec::Kind::CertificateRevoke(r)) => {
            format!("revoke {} ({})", r.lineage, r.reason)
        }
        Some(pb::job_spec::Kind::CertificateDelete(d)) => format!("delete {}", d.lineage),
        Some(pb::job_spec::Kind::CertificateAdopt(a)) => format!(
            "adopt {}{}",
            if a.lineages.is_empty() {
                "all of certbot's lineages".to_owned()
            } else {
                a.lineages.join(", ")
            },
            if a.dry_run { " (dry run)" } else { "" }
        ),
        None => String::new(),
    }
}

/// A job's state as a person reads it: an unwind that could not finish is said.
fn job_state(j: &pb::Job) -> String {
    if j.unwind_incomplete {
        format!("{} (unwind incomplete)", state_name(j.state))
    } else {
        state_name(j.state).to_owned()
    }
}

/// A job state coloured for a terminal: green succeeded, red failed (bold when its unwind is
/// incomplete), yellow cancelled or on its way, cyan running.
fn coloured_state(j: &pb::Job, width: usize) -> String {
    let text = format!("{:<width$}", job_state(j));
    let code = match pb::JobState::try_from(j.state) {
        _ if j.unwind_incomplete => "31;1",
        Ok(pb::JobState::Succeeded) => "32",
        Ok(pb::JobState::Failed) => "31",
        Ok(pb::JobState::Cancelled | pb::JobState::Cancelling | pb::JobState::Pending) => "33",
        Ok(pb::JobState::Running) => "36",
        _ => return text,
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

pub(crate) fn print_jobs_table(jobs: &[pb::Job]) {
    // A NODE column once the page holds jobs of more than one node (a shared ledger).
    let nodes = jobs.iter().any(|j| j.node != jobs[0].node);
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let mut r = vec![
                j.id.clone(),
                j.kind.clone(),
                job_state(j),
                short_time(&j.created_at),
                if j.submitted_by.is_empty() {
                    "-".into()
                } else {
                    j.submitted_by.clone()
                },
            ];
            if nodes {
                r.push(j.node.clone());
            }
            r.push(what(j));
            r
        })
        .collect();
    let mut header: Vec<String> = ["ID", "KIND", "STATE", "CREATED", "BY"]
        .map(String::from)
        .to_vec();
    if nodes {
        header.push("NODE".into());
    }
    header.push("WHAT".into());
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let line = |r: &[String], job: Option<&pb::Job>| {
        let cells: Vec<String> = r
            .iter()
            .zip(widths.iter().copied())
            .enumerate()
            .map(|(i, (c, w))| match job {
                Some(j) if i == 2 && tty => coloured_state(j, w),
                _ => format!("{c:<w$}"),
            })
            .collect();
        cells.join("  ").trim_end().to_owned()
    };
    say(&line(&header, None));
    for (r, j) in rows.iter().zip(jobs) {
        say(&line(r, Some(j)));
    }
}

pub(crate) fn print_job(j: &pb::Job) {
    say(&format!("job        {}", j.id));
    say(&format!("kind       {} ({})", j.kind, what(j)));
    say(&format!("state      {}", job_state(j)));
    if !j.error.is_empty() {
        say(&format!("error      {}", j.error));
    }
    if !j.failed_step.is_empty() {
        say(&format!("failed at  {}", j.failed_step));
    }
    say(&format!("created    {}", short_time(&j.created_at)));
    if !j.submitted_by.is_empty() {
        say(&format!("by         {}", j.submitted_by));
    }
    if !j.node.is_empty() {
        say(&format!("node       {}", j.node));
    }
    if j.finished_at.is_some() {
        say(&format!("finished   {}", short_time(&j.finished_at)));
    }
    if !j.resources.is_empty() {
        say(&format!("resources  {}", j.resources.join(", ")));
    }
    if !j.waiting_for.is_empty() {
        say(&format!("waiting    {}", j.waiting_for.join(", ")));
    }
    if !j.labels.is_empty() {
        let labels: Vec<String> = j.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        say(&format!("labels     {}", labels.join(", ")));
    }
    if !j.request_id.is_empty() {
        say(&format!("request id {}", j.request_id));
    }
    if let Some(pb::JobSpec {
        kind: Some(pb::job_spec::Kind::Runbook(r)),
    }) = &j.spec
    {
        let mut params: Vec<String> = r.params.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        params.sort();
        if !params.is_empty() {
            say(&format!("params     {}", params.join(", ")));
        }
    }
    say(&format!(
        "undo       {} entr{}{}",
        j.undo_entries,
        if j.undo_entries == 1 { "y" } else { "ies" },
        if j.undo.is_empty() {
            ""
        } else {
            " (an unwind or a rollback applies them newest first):"
        }
    ));
    for (i, u) in j.undo.iter().enumerate() {
        say(&format!(
            "  {}. {}{}",
            i + 1,
            u.what,
            if u.applied { " (applied)" } else { "" }
        ));
    }
    if !j.rolled_back_by.is_empty() {
        say(&format!("rolled back by {}", j.rolled_back_by));
    }
    if !j.rollback_of.is_empty() {
        say(&format!("rolls back {}", j.rollback_of));
    }
    say("steps");
    for s in &j.steps {
        let err = if s.error.is_empty() {
            String::new()
        } else {
            format!(": {}", s.error)
        };
        say(&format!(
            "  {}. {:<10} {}{err}",
            s.index + 1,
            step_state_name(s.state),
            s.name
        ));
    }
}

/// A live view of a job's events.
pub(crate) struct EventView {
    json: bool,
    fancy: Option<MultiProgress>,
    bars: HashMap<u32, ProgressBar>,
    /// The job's end state, once seen.
    pub(crate) ended: Option<i32>,
    pub(crate) job_id: String,
    pub(crate) last_seq: u64,
    /// What the job's unwind or rollback put back ("undone: ..." lines), for the summary.
    undone: Vec<String>,
}

/// What an unwind or a rollback put back, by kind: files, links, HAProxy, servers, commands.
fn came_back(undone: &[String]) -> String {
    let mut groups: Vec<(&str, Vec<String>)> = Vec::new();
    let mut add =
        |group: &'static str, item: String| match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, v)) => v.push(item),
            None => groups.push((group, vec![item])),
        };
    for u in undone {
        if let Some(rest) = u.strip_prefix("restore ") {
            match rest.split_once(" to ") {
                Some((path, _)) => add("ownership", path.to_owned()),
                None => add("files", rest.to_owned()),
            }
        } else if let Some(rest) = u.strip_prefix("remove the directory ") {
            add(
                "directories removed",
                rest.trim_end_matches(" if empty").to_owned(),
            );
        } else if let Some(rest) = u.strip_prefix("remove ") {
            add("files removed", rest.to_owned());
        } else if let Some(rest) = u.strip_prefix("point ") {
            add(
                "links",
                rest.split(" at ").next().unwrap_or(rest).to_owned(),
            );
        } else if u.starts_with("reload HAProxy") {
            add("HAProxy", "reloaded".to_owned());
        } else if let Some(rest) = u.strip_prefix("load ") {
            add(
                "certificates in HAProxy",
                rest.trim_end_matches(" into HAProxy again").to_owned(),
            );
        } else if u.contains("server ") && (u.starts_with("set ") || u.contains(" at runtime")) {
            add("servers", u.clone());
        } else if let Some(rest) = u.strip_prefix("run ") {
            add("commands", rest.to_owned());
        } else {
            add("other", u.clone());
        }
    }
    groups
        .into_iter()
        .map(|(g, v)| format!("{g}: {}", v.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

impl EventView {
    pub(crate) fn new(json: bool) -> Self {
        let fancy = (!json && std::io::stderr().is_terminal()).then(MultiProgress::new);
        EventView {
            json,
            fancy,
            bars: HashMap::new(),
            ended: None,
            job_id: String::new(),
            last_seq: 0,
            undone: Vec::new(),
        }
    }

    fn line(&self, s: String) {
        match &self.fancy {
            Some(mp) => {
                let _ = mp.println(s);
            }
            None => say(&s),
        }
    }

    pub(crate) fn show(&mut self, e: &pb::JobEvent) {
        use pb::job_event::Event as E;
        self.job_id.clone_from(&e.job_id);
        self.last_seq = e.seq;
        if let Some(E::StateChanged(s)) = &e.event
            && matches!(
                pb::JobState::try_from(s.to),
                Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
            )
        {
            self.ended = Some(s.to);
        }
        if self.json {
            say(&event_json(e).to_string());
            return;
        }
        let undone = match &e.event {
            Some(E::Log(l)) => l.message.strip_prefix("undone: "),
            Some(E::Progress(p)) => p.message.strip_prefix("undone: "),
            _ => None,
        };
        if let Some(u) = undone {
            self.undone.push(u.to_owned());
        }
        match &e.event {
            Some(E::StateChanged(s)) => {
                let reason = if s.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", s.reason)
                };
                self.line(format!("job {} {}{reason}", e.job_id, state_name(s.to)));
                if self.ended.is_some() && !self.undone.is_empty() {
                    self.line(format!("  ↺ came back — {}", came_back(&self.undone)));
                }
            }
            Some(E::StepStarted(s)) => match &self.fancy {
                Some(mp) => {
                    let bar = mp.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template("{spinner} {prefix} {msg}").expect("template"),
                    );
                    bar.set_prefix(format!("step {}", s.index + 1));
                    bar.set_message(s.name.clone());
                    bar.enable_steady_tick(std::time::Duration::from_millis(100));
                    self.bars.insert(s.index, bar);
                }
                None => self.line(format!("  ▸ step {}: {}", s.index + 1, s.name)),
            },
            Some(E::Progress(p)) => {
                if let Some(bar) = self.bars.get(&p.step_index) {
                    if p.total > 0 && bar.length() != Some(p.total) {
                        bar.set_length(p.total);
                        // Downloads count bytes; other steps count their items.
                        let counts = if p.total >= 1024 {
                            "{bytes}/{total_bytes}"
                        } else {
                            "{pos}/{len}"
                        };
                        bar.set_style(
                            ProgressStyle::with_template(&format!(
                                "  {{prefix}} {{msg}} [{{bar:30}}] {counts}"
                            ))
                            .expect("template")
                            .progress_chars("=> "),
                        );
                    }
                    bar.set_position(p.done);
                    if !p.message.is_empty() {
                        bar.set_message(p.message.clone());
                    }
                }
            }
            Some(E::Log(l)) => {
                let mark = match pb::LogLevel::try_from(l.level) {
                    Ok(pb::LogLevel::Warn) => "!",
                    Ok(pb::LogLevel::Error) => "✗",
                    _ => "│",
                };
                self.line(format!("    {mark} {}", l.message));
            }
            Some(E::StepFinished(s)) => {
                let (mark, tail) = match pb::StepState::try_from(s.state) {
                    Ok(pb::StepState::Succeeded) => ("✓", String::new()),
                    Ok(pb::StepState::Cancelled) => ("⊘", " (cancelled)".to_owned()),
                    _ => ("✗", format!(": {}", s.error)),
                };
                let text = format!("  {mark} step {}: {}{tail}", s.index + 1, s.name);
                match self.bars.remove(&s.index) {
                    Some(bar) => {
                        bar.finish_and_clear();
                        self.line(text);
                    }
                    None => self.line(text),
                }
            }
            None => {}
        }
    }
}

/// The ledger's nodes: a table, or a JSON object a line.
pub(crate) fn print_nodes(nodes: &[pb::Node], json: bool) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let state = |n: &pb::Node| match pb::NodeState::try_from(n.state) {
        Ok(pb::NodeState::Up) => "up",
        Ok(pb::NodeState::Lost) => "lost",
        _ => "?",
    };
    let secs = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| t.seconds).unwrap_or(0);
    if json {
        for n in nodes {
            say(&json!({
                "name": n.name, "state": state(n), "epoch": n.epoch,
                "started_at": secs(&n.started_at), "heartbeat_at": secs(&n.heartbeat_at),
                "version": n.version, "answering": n.answering,
                "heartbeat_age_s": n.heartbeat_age.as_ref().map(|d| d.seconds),
            })
            .to_string());
        }
        return;
    }
    let width = nodes.iter().map(|n| n.name.len()).max().unwrap_or(0).max(4);
    say(&format!(
        "{:<width$}  STATE  EPOCH  HEARTBEAT  VERSION",
        "NODE"
    ));
    for n in nodes {
        // On the database's clock; the CLI's own only from a server that does not say.
        let ago = match &n.heartbeat_age {
            Some(d) => d.seconds.max(0) as u64,
            None => (now - secs(&n.heartbeat_at)).max(0) as u64,
        };
        say(&format!(
            "{:<width$}  {:<5}  {:<5}  {:<9}  {}{}",
            n.name,
            state(n),
            n.epoch,
            format!("{}s ago", ago),
            n.version,
            if n.answering { "  (this node)" } else { "" }
        ));
    }
}

/// `stately runbooks list` (all, `one` None) or `show NAME`.
pub(crate) fn print_runbooks(
    all: Vec<pb::Runbook>,
    one: Option<&str>,
    json: bool,
) -> anyhow::Result<u8> {
    let as_json = |r: &pb::Runbook| {
        json!({
            "name": r.name, "description": r.description,
            "params": r.params.iter().map(|p| json!({
                "name": p.name, "description": p.description, "default": p.default,
                "pattern": p.pattern, "required": p.default.is_none(),
            })).collect::<Vec<_>>(),
            "steps": r.steps.iter().map(|s| json!({"name": s.name, "type": s.r#type})).collect::<Vec<_>>(),
        })
    };
    let Some(name) = one else {
        if json {
            all.iter().for_each(|r| say(&as_json(r).to_string()));
        } else if all.is_empty() {
            say_err!("no runbooks are configured ([[runbook]] in statelyd's config)");
        } else {
            let width = all.iter().map(|r| r.name.len()).max().unwrap_or(0).max(7);
            say(&format!("{:<width$}  PARAMS  DESCRIPTION", "RUNBOOK"));
            for r in &all {
                say(format!(
                    "{:<width$}  {:<6}  {}",
                    r.name,
                    r.params.len(),
                    r.description
                )
                .trim_end());
            }
        }
        return Ok(0);
    };
    let Some(r) = all.iter().find(|r| r.name == name) else {
        let names: Vec<&str> = all.iter().map(|r| r.name.as_str()).collect();
        anyhow::bail!(
            "not found: no runbook '{name}' is configured (runbooks: {})",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        );
    };
    if json {
        say(&as_json(r).to_string());
        return Ok(0);
    }
    say(&format!("runbook    {}", r.name));
    if !r.description.is_empty() {
        say(&format!("about      {}", r.description));
    }
    if r.params.is_empty() {
        say("params     none");
    }
    for p in &r.params {
        let mut line = format!("param      {}", p.name);
        match &p.default {
            Some(d) => line.push_str(&format!(" (default {d:?})")),
            None => line.push_str(" (required)"),
        }
        if !p.pattern.is_empty() {
            line.push_str(&format!(" must match /{}/", p.pattern));
        }
        if !p.description.is_empty() {
            line.push_str(&format!(": {}", p.description));
        }
        say(&line);
    }
    for (i, s) in r.steps.iter().enumerate() {
        say(&format!(
            "step {:<5} {}{}",
            i + 1,
            s.r#type,
            if s.name.is_empty() {
                String::new()
            } else {
                format!(": {}", s.name)
            }
        ));
    }
    Ok(0)
}
