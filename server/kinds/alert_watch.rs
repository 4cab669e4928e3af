//! `alert_watch`: follows a target's shared stats poller until cancelled, turns transitions
//! into mails, and delivers them from a durable outbox. Each alert is committed (with the
//! rules' memory and an event) before any attempt to send it; a restart resumes the watch and
//! its outbox, so nothing is told twice or lost.

use crate::alerts::mail::{Mail, Mailer, SendError, check_recipients};
use crate::alerts::rules::{self, Memory, Rules, Severity, Transition};
use crate::config::Config;
use crate::job::{EventBody, LogLevel, now_ms};
use crate::step::{Env, Error, StepCtx, StepError};
use crate::store::{OutboxEntry, Write};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Executor, Moment, Planned, StepFuture};

/// Watch a target's stats and mail its transitions, until cancelled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// The HAProxy target.
    pub target: String,
    /// Recipients.
    pub to: Vec<String>,
    /// What to alert on.
    pub rules: Rules,
}

/// Refuses a watch that could not work: unknown target, bad recipients or rules, and (at
/// submission) SMTP settings that do not let a mail out, checked by connecting. A watch
/// touches nothing, so it holds no resource. Its one step watches.
pub(crate) async fn plan(spec: &Spec, env: &Env, at: Moment) -> Result<Planned, Error> {
    let Spec { target, to, rules } = spec;
    let config = &env.config;
    let t = config
        .haproxy
        .iter()
        .find(|t| &t.name == target)
        .ok_or_else(|| {
            let known: Vec<&str> = config.haproxy.iter().map(|t| t.name.as_str()).collect();
            Error::NotFound(format!(
                "no HAProxy target {} is configured (targets: {})",
                crate::quote::quote(target),
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ))
        })?;
    if t.stats_socket.is_none() {
        return Err(Error::FailedPrecondition(format!(
            "HAProxy target '{target}' has no stats_socket configured, so it cannot be watched"
        )));
    }
    check_recipients(to).map_err(Error::InvalidArgument)?;
    rules.check().map_err(Error::InvalidArgument)?;
    let mailer = mailer(config).map_err(Error::FailedPrecondition)?;
    if at == Moment::Submission {
        mailer.check().await.map_err(|e| {
            Error::FailedPrecondition(format!(
                "alerts could not be mailed, so the watch was not started: {e}"
            ))
        })?;
    }
    let watch = Watch {
        target: target.clone(),
        to: to.clone(),
        rules: rules.clone(),
        mailer: Arc::new(mailer),
    };
    Ok(Planned::new(
        &[format!("watch {target}")],
        Vec::new(),
        watch,
    ))
}

fn mailer(config: &Config) -> Result<Mailer, String> {
    let smtp = config.smtp.as_ref().ok_or_else(|| {
        "no [smtp] section in the daemon's configuration: alerts have nowhere to go".to_owned()
    })?;
    Mailer::new(smtp)
}

/// A running watch.
#[derive(Debug)]
pub(crate) struct Watch {
    target: String,
    to: Vec<String>,
    rules: Rules,
    mailer: Arc<Mailer>,
}

impl Executor for Watch {
    fn run_step<'a>(&'a mut self, _index: usize, ctx: &'a mut StepCtx<'_>) -> StepFuture<'a> {
        Box::pin(self.watch(ctx))
    }
}

impl Watch {
    async fn watch(&mut self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        let job = ctx.job();
        let store = ctx.store().clone();
        let failed = |e: crate::store::Error| StepError::Failed(e.to_string());
        let mut mem: Memory = match store.watch_state(job).await.map_err(failed)? {
            Some(s) => serde_json::from_str(&s)
                .map_err(|e| StepError::Failed(format!("the watch's saved state: {e}")))?,
            None => Memory::default(),
        };
        mem.restarted();
        if mem.stopped {
            // Stopped before a crash cut the end short: it stays stopped.
            return Err(StepError::Cancelled);
        }
        let mut outbox: VecDeque<OutboxEntry> = store
            .outbox(job)
            .await
            .map_err(failed)?
            .into_iter()
            .filter(|e| e.state == "pending")
            .collect();
        if !outbox.is_empty() {
            ctx.log(
                LogLevel::Info,
                format!("{} alert(s) still to deliver", outbox.len()),
            );
        }
        let mut sub = ctx
            .stats()
            .subscribe(&self.target, Duration::from_millis(self.rules.interval_ms))
            .map_err(|e| StepError::Failed(e.to_string()))?;
        ctx.log(
            LogLevel::Info,
            format!(
                "watching '{}' every {} ms; alerts to {} through {}",
                self.target,
                self.rules.interval_ms,
                self.to.join(", "),
                self.mailer.relay
            ),
        );
        let stopping = ctx.stopping().clone();
        let mut sending: Option<JoinHandle<Result<String, SendError>>> = None;
        let mut retry_at: Option<Instant> = None;
        loop {
            if sending.is_none()
                && retry_at.is_none_or(|t| t <= Instant::now())
                && let Some(front) = outbox.front()
            {
                retry_at = None;
                let (mailer, mail) = (self.mailer.clone(), front.mail.clone());
                sending = Some(tokio::spawn(async move { mailer.send(&mail).await }));
            }
            tokio::select! {
                biased;
                _ = ctx.cancelled() => break,
                _ = stopping.cancelled() => {
                    // Let a send under way finish (it is bounded by the SMTP timeout), so a
                    // restart does not send it again; past that it is abandoned and resent.
                    if let Some(mut h) = sending.take() {
                        match tokio::time::timeout(self.mailer.timeout + Duration::from_millis(500), &mut h).await {
                            Ok(r) => self.delivered(ctx, &mut outbox, r, &mut retry_at).await,
                            Err(_) => h.abort(),
                        }
                    }
                    return Err(StepError::Suspended);
                }
                r = async { sending.as_mut().expect("guarded").await }, if sending.is_some() => {
                    sending = None;
                    self.delivered(ctx, &mut outbox, r, &mut retry_at).await;
                }
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)),
                    if retry_at.is_some() && sending.is_none() => {}
                poll = sub.next() => {
                    let Some(poll) = poll else {
                        return Err(StepError::Failed("the stats poller stopped".into()));
                    };
                    let transitions = match &poll.result {
                        Ok(snap) => rules::evaluate(&self.rules, &mut mem, snap, poll.at),
                        Err(e) => rules::unreachable(&self.rules, &mut mem, &e.to_string(), poll.at),
                    };
                    // The memory is saved with each alert, and otherwise only when what it
                    // knows changed (not on every poll).
                    let changed = mem.take_changed();
                    for t in &transitions {
                        crate::metrics::alert_transition(&self.target, t.severity.as_str(), t.tag);
                    }
                    if !transitions.is_empty() {
                        let entry = self.alert(ctx, &mut mem, &transitions, poll.at).await?;
                        outbox.push_back(entry);
                    } else if changed {
                        let state = serde_json::to_string(&mem).unwrap_or_default();
                        ctx.write(None, vec![Write::WatchState { job, state }]);
                    }
                }
            }
        }
        // Stopped: recorded first, so a crash from here on does not bring the watch back.
        mem.stopped = true;
        let state = serde_json::to_string(&mem).unwrap_or_default();
        let stopping_event = EventBody::Log {
            level: LogLevel::Info,
            message: "stopping the watch".into(),
            step: Some(ctx.index()),
        };
        if let Err(e) =
            commit_retrying(ctx, stopping_event, vec![Write::WatchState { job, state }]).await
        {
            tracing::warn!(%job, "the stop of the watch was not recorded: {e}");
        }
        // A send under way may finish; what is left is reported, not sent.
        if let Some(mut h) = sending.take() {
            match tokio::time::timeout(self.mailer.timeout + Duration::from_millis(500), &mut h)
                .await
            {
                Ok(r) => self.delivered(ctx, &mut outbox, r, &mut retry_at).await,
                Err(_) => h.abort(),
            }
        }
        if !outbox.is_empty() {
            let mut writes = Vec::new();
            for e in &outbox {
                writes.push(Write::OutboxDone {
                    job,
                    n: e.n,
                    attempts: e.attempts,
                    at: now_ms(),
                    error: Some("not sent: the watch was stopped".into()),
                });
            }
            let numbers: Vec<String> = outbox.iter().map(|e| format!("#{}", e.n)).collect();
            ctx.write(
                Some(EventBody::Log {
                    level: LogLevel::Warn,
                    message: format!(
                        "alert(s) {} not delivered: the watch was stopped",
                        numbers.join(", ")
                    ),
                    step: Some(ctx.index()),
                }),
                writes,
            );
        }
        Err(StepError::Cancelled)
    }

    /// Commits one alert (outbox entry, the rules' memory, an event) before it is sent.
    async fn alert(
        &self,
        ctx: &mut StepCtx<'_>,
        mem: &mut Memory,
        transitions: &[Transition],
        at: i64,
    ) -> Result<OutboxEntry, StepError> {
        let job = ctx.job();
        let n = mem.next_alert.max(1);
        mem.next_alert = n + 1;
        let subject = rules::subject(&self.target, transitions);
        let lines: Vec<String> = transitions.iter().map(Transition::line).collect();
        let when = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_millis(at.max(0) as u64),
        );
        let body = format!(
            "HAProxy target '{}', seen at {when}:\n\n{}\n\n-- \nstately alert #{n} of watch job {job}.\nStop the watch: stately alerts stop {job}\n",
            self.target,
            lines.join("\n"),
        );
        let host = hostname();
        let mail = Mail {
            to: self.to.clone(),
            subject: subject.clone(),
            body,
            message_id: format!("<stately.{job}.{n}@{host}>"),
            date_ms: at,
        };
        let worst = transitions.iter().map(|t| t.severity).max();
        let level = match worst {
            Some(Severity::Critical) | Some(Severity::Warning) => LogLevel::Warn,
            _ => LogLevel::Info,
        };
        let writes = vec![
            Write::OutboxAdd {
                job,
                n,
                at,
                mail: mail.clone(),
            },
            Write::WatchState {
                job,
                state: serde_json::to_string(&mem).unwrap_or_default(),
            },
        ];
        let event = EventBody::Log {
            level,
            message: format!("alert #{n}: {subject}\n{}", lines.join("\n")),
            step: Some(ctx.index()),
        };
        commit_retrying(ctx, event, writes)
            .await
            .map_err(|e| StepError::Failed(format!("could not record alert #{n}: {e}")))?;
        Ok(OutboxEntry {
            n,
            mail,
            attempts: 0,
            state: "pending".into(),
        })
    }

    /// Records how a delivery attempt of the outbox's first message went.
    async fn delivered(
        &self,
        ctx: &mut StepCtx<'_>,
        outbox: &mut VecDeque<OutboxEntry>,
        result: Result<Result<String, SendError>, tokio::task::JoinError>,
        retry_at: &mut Option<Instant>,
    ) {
        let job = ctx.job();
        let Some(front) = outbox.front_mut() else {
            return;
        };
        front.attempts += 1;
        let (n, attempts) = (front.n, front.attempts);
        let result = result.unwrap_or_else(|e| {
            Err(SendError {
                permanent: false,
                message: format!("the send task failed: {e}"),
            })
        });
        let (writes, level, message) = match result {
            Ok(reply) => {
                outbox.pop_front();
                (
                    vec![Write::OutboxDone {
                        job,
                        n,
                        attempts,
                        at: now_ms(),
                        error: None,
                    }],
                    LogLevel::Info,
                    format!(
                        "alert #{n} delivered to {} (attempt {attempts}; relay said: {reply})",
                        self.to.join(", ")
                    ),
                )
            }
            Err(e) if e.permanent => {
                outbox.pop_front();
                (
                    vec![Write::OutboxDone {
                        job,
                        n,
                        attempts,
                        at: now_ms(),
                        error: Some(e.message.clone()),
                    }],
                    LogLevel::Error,
                    format!(
                        "alert #{n} refused for good by the relay, not retried: {}",
                        e.message
                    ),
                )
            }
            Err(e) => {
                let delay = backoff(attempts, self.mailer.retry_max);
                *retry_at = Some(Instant::now() + delay);
                (
                    vec![Write::OutboxAttempt {
                        job,
                        n,
                        attempts,
                        error: e.message.clone(),
                    }],
                    LogLevel::Warn,
                    format!(
                        "alert #{n}: delivery attempt {attempts} failed: {}; retrying in {}",
                        e.message,
                        humantime::format_duration(delay)
                    ),
                )
            }
        };
        let event = EventBody::Log {
            level,
            message,
            step: Some(ctx.index()),
        };
        // Durable before the next message goes: a restart must not send this one again.
        if let Err(e) = commit_retrying(ctx, event, writes).await {
            tracing::error!(%job, "could not record a delivery: {e}");
        }
    }
}

/// Commits an event with its writes, retrying with backoff while the store refuses (a full
/// disk, a locked database): an alert or a delivery that is not recorded would be lost or sent
/// twice. Gives up only when the store has closed (the daemon is stopping).
async fn commit_retrying(
    ctx: &mut StepCtx<'_>,
    event: EventBody,
    writes: Vec<Write>,
) -> Result<(), crate::store::Error> {
    let mut wait = Duration::from_millis(50);
    loop {
        match ctx.commit(event.clone(), writes.clone()).await {
            Ok(()) => return Ok(()),
            Err(e @ crate::store::Error::Closed) => return Err(e),
            Err(e) => {
                tracing::error!(job = %ctx.job(), "the store refused a write, retrying: {e}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The wait before attempt `attempts + 1`: 500 ms doubling, at most `max`.
fn backoff(attempts: u32, max: Duration) -> Duration {
    let exp = attempts.saturating_sub(1).min(20);
    (Duration::from_millis(500) * 2u32.pow(exp)).min(max)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let max = Duration::from_secs(5);
        assert_eq!(backoff(1, max), Duration::from_millis(500));
        assert_eq!(backoff(2, max), Duration::from_secs(1));
        assert_eq!(backoff(4, max), Duration::from_secs(4));
        assert_eq!(backoff(5, max), max);
        assert_eq!(backoff(1000, max), max);
    }
}
