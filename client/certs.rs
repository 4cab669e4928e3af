//! `stately cert`: issue a certificate (a job, attached: a line per step), list lineages with
//! days left, show one, renew one.

use crate::cli::explain;
use crate::connect::{Authed, Client};
use crate::render::say;
use anyhow::Result;
use serde_json::json;
use stately::pb;
use std::io::IsTerminal;

type Certs = pb::certificates_client::CertificatesClient<Authed>;

#[derive(clap::Subcommand, Debug)]
pub(crate) enum CertCommand {
    /// Issue (or re-issue) a certificate for these names: order, challenge, validate, install
    /// the lineage and the HAProxy bundle, deploy. Ctrl-C cancels and undoes it.
    Issue {
        /// DNS names: the apex, www and more.
        #[arg(required = true)]
        names: Vec<String>,
        /// The lineage's name (default: the first name).
        #[arg(long)]
        name: Option<String>,
        /// Answer HTTP-01 by writing into this webroot (one the daemon allows).
        #[arg(long, conflicts_with = "responder")]
        webroot: Option<String>,
        /// Answer HTTP-01 with statelyd's own responder (the default when no webroot is given).
        #[arg(long)]
        responder: bool,
        /// Prove the names by DNS-01: TXT records published in the daemon's [[dns]] zones
        /// (RFC 2136 + TSIG), removed afterwards. Wildcards (*.example.com) need it.
        #[arg(long, conflicts_with_all = ["webroot", "responder"])]
        dns: bool,
        /// Deploy to this HAProxy or nginx target (repeat for more).
        #[arg(long)]
        deploy: Vec<String>,
        /// The new key's type.
        #[arg(long, default_value = "ec256", ignore_case = true, value_parser = clap::builder::PossibleValuesParser::new(
            ["ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"]))]
        key_type: String,
        /// On renewal, keep the lineage's private key.
        #[arg(long)]
        reuse_key: bool,
        /// Allow changing the names of an existing lineage.
        #[arg(long)]
        expand: bool,
        /// The ACME server (a name from the daemon's config; default: its default).
        #[arg(long, default_value = "")]
        acme: String,
        /// The whole issuance against a test CA (--acme, else the daemon's dry_run_acme:
        /// letsencrypt-staging), installing and deploying nothing (certbot's --dry-run).
        #[arg(long)]
        dry_run: bool,
        /// Print the job id and return.
        #[arg(long)]
        detach: bool,
    },
    /// The lineages, with days left.
    List,
    /// One lineage.
    Show { name: String },
    /// Renew a lineage now, as it was issued (a job, attached).
    Renew {
        name: String,
        /// Print the job id and return.
        #[arg(long)]
        detach: bool,
    },
    /// Revoke a lineage's live certificate at its CA (certbot's revoke). It cannot be undone,
    /// so it needs --yes; the lineage stays until renewed or deleted.
    Revoke {
        name: String,
        /// Why (RFC 5280's reasons, as certbot names them).
        #[arg(long, default_value = "unspecified", ignore_case = true, value_parser = clap::builder::PossibleValuesParser::new(
            stately::kinds::certificate_revoke::REASONS))]
        reason: String,
        /// Yes, revoke it: there is no undo.
        #[arg(long)]
        yes: bool,
        /// Print the job id and return.
        #[arg(long)]
        detach: bool,
    },
    /// Delete a lineage: links, versions, renewal settings, HAProxy bundle (a job; `stately
    /// jobs rollback` puts it all back).
    Delete {
        name: String,
        /// Print the job id and return.
        #[arg(long)]
        detach: bool,
    },
    /// Take over certbot's lineages in place (a job; `stately jobs rollback` undoes it):
    /// their renewal settings become statelyd's, interrupted certbot updates are repaired, a
    /// NAME-0001 that covers NAME's names is merged into NAME, certbot's renewal configs are
    /// retired so `certbot renew` leaves them alone.
    Adopt {
        /// Lineages (default: every lineage with a renewal config).
        names: Vec<String>,
        /// certbot's root; it must be the daemon's [certificates] root (default: that root).
        #[arg(long)]
        root: Option<String>,
        /// Deploy the adopted certificates to this HAProxy target (repeat for more).
        #[arg(long)]
        deploy: Vec<String>,
        /// Say what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the job id and return.
        #[arg(long)]
        detach: bool,
    },
}

fn cert_json(c: &pb::Certificate) -> serde_json::Value {
    let t = |ts: &Option<prost_types::Timestamp>| {
        ts.as_ref().map(|t| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.seconds.max(0) as u64),
            )
            .to_string()
        })
    };
    json!({
        "name": c.name, "names": c.names, "not_before": t(&c.not_before), "not_after": t(&c.not_after),
        "days_left": c.days_left, "serial": c.serial, "issuer": c.issuer, "key_type": c.key_type,
        "version": c.version, "versions": c.versions, "cert_path": c.cert_path, "chain_path": c.chain_path,
        "fullchain_path": c.fullchain_path, "privkey_path": c.privkey_path, "bundle_path": c.bundle_path,
        "auto_renew": c.auto_renew,
        "acme_server": (!c.method.is_empty()).then(|| c.acme_server.clone()),
        "method": (!c.method.is_empty()).then(|| c.method.clone()),
        "deploy": c.deploy, "next_renewal": t(&c.next_renewal),
        "issued_by_job": (!c.issued_by_job.is_empty()).then(|| c.issued_by_job.clone()),
    })
}

fn days(c: &pb::Certificate, colour: bool) -> String {
    let d = format!("{}", c.days_left);
    if !colour {
        return d;
    }
    match c.days_left {
        n if n < 7 => format!("\x1b[31;1m{d}\x1b[0m"),
        n if n < 30 => format!("\x1b[33m{d}\x1b[0m"),
        _ => format!("\x1b[32m{d}\x1b[0m"),
    }
}

pub(crate) async fn run(
    mut certs: Certs,
    jobs: &mut Client,
    cmd: CertCommand,
    json: bool,
) -> Result<u8> {
    match cmd {
        CertCommand::Issue {
            names,
            name,
            webroot,
            responder: _,
            dns,
            deploy,
            key_type,
            reuse_key,
            expand,
            acme,
            dry_run,
            detach,
        } => {
            let req = pb::SubmitJobRequest {
                node: crate::cli::target_node(),
                spec: Some(pb::JobSpec {
                    kind: Some(pb::job_spec::Kind::CertificateIssue(
                        pb::CertificateIssueJob {
                            names,
                            lineage: name.unwrap_or_default(),
                            webroot: webroot.unwrap_or_default(),
                            key_type,
                            reuse_key,
                            deploy,
                            acme,
                            expand,
                            dry_run,
                            challenge: if dns { "dns-01".into() } else { String::new() },
                        },
                    )),
                }),
                ..Default::default()
            };
            crate::cli::submit(jobs, req, detach, json).await
        }
        CertCommand::Revoke {
            name,
            reason,
            yes,
            detach,
        } => {
            if !yes {
                return Err(crate::cli::Usage(format!(
                    "revoking {name}'s certificate cannot be undone (no CA takes a revocation back, and a rollback of it is refused): pass --yes to go ahead"
                ))
                .into());
            }
            let req = pb::SubmitJobRequest {
                node: crate::cli::target_node(),
                spec: Some(pb::JobSpec {
                    kind: Some(pb::job_spec::Kind::CertificateRevoke(
                        pb::CertificateRevokeJob {
                            lineage: name,
                            reason: reason.to_ascii_lowercase(),
                        },
                    )),
                }),
                ..Default::default()
            };
            crate::cli::submit(jobs, req, detach, json).await
        }
        CertCommand::Adopt {
            names,
            root,
            deploy,
            dry_run,
            detach,
        } => {
            let req = pb::SubmitJobRequest {
                node: crate::cli::target_node(),
                spec: Some(pb::JobSpec {
                    kind: Some(pb::job_spec::Kind::CertificateAdopt(
                        pb::CertificateAdoptJob {
                            root: root.unwrap_or_default(),
                            lineages: names,
                            deploy,
                            dry_run,
                        },
                    )),
                }),
                ..Default::default()
            };
            crate::cli::submit(jobs, req, detach, json).await
        }
        CertCommand::Delete { name, detach } => {
            let req = pb::SubmitJobRequest {
                node: crate::cli::target_node(),
                spec: Some(pb::JobSpec {
                    kind: Some(pb::job_spec::Kind::CertificateDelete(
                        pb::CertificateDeleteJob { lineage: name },
                    )),
                }),
                ..Default::default()
            };
            crate::cli::submit(jobs, req, detach, json).await
        }
        CertCommand::List => {
            let all = certs
                .list_certificates(pb::ListCertificatesRequest {})
                .await
                .map_err(explain)?
                .into_inner()
                .certificates;
            if json {
                all.iter().for_each(|c| say(&cert_json(c).to_string()));
                return Ok(0);
            }
            if all.is_empty() {
                say_err!("no certificates yet (stately cert issue NAME ...)");
                return Ok(0);
            }
            let colour = std::io::stdout().is_terminal();
            let w = all.iter().map(|c| c.name.len()).max().unwrap_or(4).max(4);
            say(&format!(
                "{:<w$}  {:>9}  {:<10}  {:<3}  {:<7}  NAMES",
                "NAME", "DAYS LEFT", "EXPIRES", "VER", "KEY"
            ));
            for c in &all {
                let exp = cert_json(c)["not_after"]
                    .as_str()
                    .map(|s| s[..10].to_owned())
                    .unwrap_or_default();
                let d = days(c, colour);
                let pad = 9 + d.len() - format!("{}", c.days_left).len();
                say(&format!(
                    "{:<w$}  {:>pad$}  {:<10}  {:<3}  {:<7}  {}",
                    c.name,
                    d,
                    exp,
                    c.version,
                    c.key_type,
                    c.names.join(", ")
                ));
            }
            Ok(0)
        }
        CertCommand::Show { name } => {
            let c = certs
                .get_certificate(pb::GetCertificateRequest { name })
                .await
                .map_err(explain)?
                .into_inner();
            let v = cert_json(&c);
            if json {
                say(&v.to_string());
                return Ok(0);
            }
            let colour = std::io::stdout().is_terminal();
            say(&format!("lineage     {}", c.name));
            say(&format!("names       {}", c.names.join(", ")));
            say(&format!(
                "valid       {} → {} ({} days left)",
                v["not_before"].as_str().unwrap_or("?"),
                v["not_after"].as_str().unwrap_or("?"),
                days(&c, colour)
            ));
            say(&format!("serial      {}", c.serial));
            say(&format!("issuer      {}", c.issuer));
            say(&format!("key         {}", c.key_type));
            say(&format!(
                "version     {} (kept: {})",
                c.version,
                c.versions
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            say(&format!("fullchain   {}", c.fullchain_path));
            say(&format!("privkey     {}", c.privkey_path));
            if !c.bundle_path.is_empty() {
                say(&format!("bundle      {}", c.bundle_path));
            }
            if !c.method.is_empty() {
                say(&format!(
                    "issued      by {} through {}{}",
                    c.method,
                    if c.acme_server.is_empty() {
                        "the daemon's default ACME server"
                    } else {
                        c.acme_server.as_str()
                    },
                    if c.issued_by_job.is_empty() {
                        String::new()
                    } else {
                        format!(" (job {})", c.issued_by_job)
                    }
                ));
                say(&format!(
                    "deploy      {}",
                    if c.deploy.is_empty() {
                        "-".to_owned()
                    } else {
                        c.deploy.join(", ")
                    }
                ));
            }
            say(&format!(
                "renewal     {}",
                match (&c.next_renewal, c.auto_renew) {
                    (Some(_), true) => format!(
                        "by statelyd, as issued, from {}",
                        v["next_renewal"].as_str().unwrap_or("?")
                    ),
                    (_, true) => "by statelyd, as issued".to_owned(),
                    (_, false) if !c.method.is_empty() => {
                        "not automatic (renew_check = \"0s\"): `stately cert renew` renews it as issued".to_owned()
                    }
                    _ => "not by statelyd (not issued by it): `stately cert renew` uses the daemon's defaults".to_owned(),
                }
            ));
            Ok(0)
        }
        CertCommand::Renew { name, detach } => {
            let job = certs
                .renew_certificate(pb::RenewCertificateRequest {
                    name,
                    request_id: String::new(),
                })
                .await
                .map_err(explain)?
                .into_inner();
            crate::cli::print_or_follow(jobs, job, detach, json).await
        }
    }
}
