//! Automatic certificate renewal: checks the lineages every `renew_check` and submits a
//! renewal for each near expiry, driving the engine like any other client (it holds only a
//! weak handle, so it ends with the engine).

use crate::engine::{Engine, MAX_PAGE_SIZE, Submission};
use crate::job::{JobState, now_ms};
use crate::kinds::JobSpec;

/// Checks lineages every `renew_check` and submits a renewal (an ordinary job, labelled
/// trigger=auto-renew) for each within `renew_before` of expiry. The request id names the
/// live certificate's serial and the day, so a certificate is renewed once (a failed
/// renewal is tried again the next day).
pub(crate) fn spawn(engine: &Engine) {
    let every = engine.config().certificates.renew_check;
    if every.is_zero() {
        return;
    }
    let weak = engine.downgrade();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(engine) = Engine::upgrade(&weak) else {
                return;
            };
            let config = engine.config();
            let due: Vec<crate::certs::Listed> = tokio::task::spawn_blocking(move || {
                let before = config.certificates.renew_before.as_secs() as i64;
                let now = now_ms() / 1000;
                crate::certs::list(&config.cert_places())
                    .into_iter()
                    .filter(|l| l.meta.is_some() && l.info.not_after - now <= before)
                    .collect()
            })
            .await
            .unwrap_or_default();
            if due.is_empty() {
                continue;
            }
            // A lineage with a job queued or running on it (an issuance, a revocation, a
            // delete — a renewal queued behind a delete would bring the lineage back) is left
            // to that job.
            let busy: Vec<String> = engine
                .list(
                    vec![JobState::Pending, JobState::Running, JobState::Cancelling],
                    None,
                    Vec::new(),
                    // This node's: its lineages are its own.
                    Some(engine.node_name().to_owned()),
                    MAX_PAGE_SIZE,
                    "",
                )
                .await
                .map(|(jobs, _)| jobs)
                .unwrap_or_default()
                .into_iter()
                .flat_map(|j| match j.spec {
                    JobSpec::CertificateIssue(c) => vec![c.lineage],
                    JobSpec::CertificateRevoke(r) => vec![r.lineage],
                    JobSpec::CertificateDelete(d) => vec![d.lineage],
                    // An adoption of every lineage holds them all (it is short).
                    JobSpec::CertificateAdopt(a) if a.lineages.is_empty() => {
                        due.iter().map(|l| l.name.clone()).collect()
                    }
                    JobSpec::CertificateAdopt(a) => a.lineages,
                    _ => Vec::new(),
                })
                .collect();
            for l in due.into_iter().filter(|l| !busy.contains(&l.name)) {
                let spec = match crate::kinds::certificate_issue::renewal(&engine.config(), &l.name)
                {
                    Ok(spec) => spec,
                    Err(e) => {
                        tracing::warn!(lineage = %l.name, "cannot renew: {e}");
                        continue;
                    }
                };
                let sub = Submission {
                    spec,
                    // Once per certificate and day: a renewal that failed (or was rolled
                    // back) is tried again the next day, not at every check. The node's name
                    // too: request ids are unique over a shared ledger, lineage names are not.
                    request_id: Some(format!(
                        "auto-renew:{}:{}:{}:{}",
                        engine.node_name(),
                        l.name,
                        l.info.serial,
                        now_ms() / 86_400_000
                    )),
                    labels: [("trigger".to_owned(), "auto-renew".to_owned())].into(),
                    submitted_by: Some("statelyd".into()),
                    node: None,
                };
                match engine.submit(sub).await {
                    Ok(job) => {
                        tracing::info!(job = %job.id, lineage = %l.name, "renewal submitted")
                    }
                    Err(e) => tracing::warn!(lineage = %l.name, "renewal not submitted: {e}"),
                }
            }
        }
    });
}
