//! `certificate_issue`: one job from ACME account to a certificate HAProxy serves. Steps:
//! account, order, provision challenges (webroot files or statelyd's responder), validate,
//! finalize (CSR), download the chain, install (certbot-compatible lineage + HAProxy bundle),
//! deploy (hot-swap or reload). Every change records its undo first: a cancel or failure
//! leaves no challenge file and the previous version live; a rollback puts it back.

use crate::certs::acme;
use crate::certs::config::AcmeServer;
use crate::certs::lineage::{self, FILES, Lineage};
use crate::certs::responder::{self, Responder};
use crate::certs::{KEY_TYPES, Meta, check_names};
use crate::config::Config;
use crate::job::LogLevel;
use crate::quote::quote;
use crate::step::{Env, Error, StepCtx, StepError};
use crate::undo::UndoEntry;
use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewOrder, Order, OrderStatus,
    RetryPolicy,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{Executor, Moment, Planned, StepFuture};

/// Issue or renew a certificate over ACME, install it, optionally deploy it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// The lineage's name.
    pub lineage: String,
    /// DNS names.
    pub names: Vec<String>,
    /// HTTP-01 by this webroot; None: statelyd's responder.
    pub webroot: Option<PathBuf>,
    /// ec256, ec384, rsa2048, rsa3072, rsa4096.
    pub key_type: String,
    /// Keep the lineage's key on renewal.
    pub reuse_key: bool,
    /// HAProxy targets to deploy to.
    pub deploy: Vec<String>,
    /// The ACME server's name ("" = the configured default).
    pub acme: String,
    /// Allow changing an existing lineage's names.
    pub expand: bool,
    /// Issue against a test CA and install nothing (certbot's --dry-run).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// "dns-01", or empty for HTTP-01.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub challenge: String,
}

/// The challenge type that proves names through DNS.
pub(crate) const DNS_01: &str = "dns-01";

/// The key type of a lineage when none is asked for.
pub(crate) const DEFAULT_KEY_TYPE: &str = "ec256";

impl Spec {
    /// A spec for `names` with the kind's defaults where a caller left a field empty: the
    /// lineage is named for the first name, the key type is ec256; names are compared in
    /// lower case, as DNS does.
    pub(crate) fn with_defaults(mut self) -> Spec {
        self.names = self
            .names
            .iter()
            .map(|n| n.trim().to_ascii_lowercase())
            .collect();
        if self.lineage.is_empty() {
            // certbot's choice too: a wildcard's lineage is named for its base name.
            let first = self.names.first().cloned().unwrap_or_default();
            self.lineage = first.strip_prefix("*.").unwrap_or(&first).to_owned();
        }
        self.challenge = match self.challenge.trim().to_ascii_lowercase().as_str() {
            "" | "http-01" => String::new(),
            other => other.to_owned(),
        };
        self.key_type = if self.key_type.is_empty() {
            DEFAULT_KEY_TYPE.into()
        } else {
            self.key_type.to_ascii_lowercase()
        };
        self
    }
}

/// The steps, in order; `Deploy` only with deploy targets.
#[derive(Debug, Clone, Copy)]
enum Step {
    Probe,
    Account,
    Order,
    Provision,
    Validate,
    Finalize,
    Download,
    Install,
    Deploy,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Probe => "check the challenge path",
            Step::Account => "account",
            Step::Order => "order",
            Step::Provision => "provision challenges",
            Step::Validate => "validate",
            Step::Finalize => "finalize",
            Step::Download => "download chain",
            Step::Install => "install",
            Step::Deploy => "deploy",
        })
    }
}

fn steps(probe: bool, deploy: bool, dry_run: bool) -> Vec<Step> {
    let mut v = if probe { vec![Step::Probe] } else { Vec::new() };
    v.extend([
        Step::Account,
        Step::Order,
        Step::Provision,
        Step::Validate,
        Step::Finalize,
        Step::Download,
    ]);
    // A dry run ends with the certificate in hand: nothing is installed or deployed.
    if !dry_run {
        v.push(Step::Install);
        if deploy {
            v.push(Step::Deploy);
        }
    }
    v
}

/// Validation and the certificate are polled with this backoff: a short first wait (a local
/// CA answers in milliseconds), growing to a few seconds, for at most two minutes.
fn polling() -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(Duration::from_millis(20))
        .backoff(1.6)
        .timeout(Duration::from_secs(120))
}

/// What the job will issue, checked against the configuration and the lineage on disk.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub(crate) lineage: String,
    pub(crate) names: Vec<String>,
    pub(crate) webroot: Option<PathBuf>,
    pub(crate) key_type: String,
    pub(crate) reuse_key: bool,
    pub(crate) deploy: Vec<String>,
    pub(crate) server: AcmeServer,
    pub(crate) dry_run: bool,
    /// DNS-01: the zone that takes each name's challenge record (by name); None: HTTP-01.
    pub(crate) dns: Option<Vec<(String, crate::certs::dns::DnsProvider)>>,
}

/// Checks a spec; the resources it holds are the lineage and the deploy targets.
pub(crate) async fn plan(spec: &Spec, env: &Env, _at: Moment) -> Result<Planned, Error> {
    let (req, resources) = request(&env.config, spec)?;
    let issue = Issue::new(&env.config, req, env.responder.clone());
    Ok(Planned {
        steps: issue.steps.iter().map(|s| s.to_string()).collect(),
        resources,
        executor: Box::new(issue),
    })
}

/// What `spec` asks for, checked against the configuration and the lineage on disk, and the
/// resources the job holds.
fn request(config: &Config, spec: &Spec) -> Result<(Request, Vec<String>), Error> {
    let Spec {
        lineage,
        names,
        webroot,
        key_type,
        reuse_key,
        deploy,
        acme,
        expand,
        dry_run,
        challenge,
    } = spec;
    let by_dns = match challenge.as_str() {
        "" | "http-01" => false,
        DNS_01 => true,
        other => {
            return Err(Error::InvalidArgument(format!(
                "challenge {}: \"http-01\" (the default) or \"dns-01\"",
                quote(other)
            )));
        }
    };
    check_names(names, by_dns).map_err(Error::InvalidArgument)?;
    if !crate::fsops::is_safe_name(lineage) {
        return Err(Error::InvalidArgument(format!(
            "lineage name {} is not a safe file name (letters, digits, '.', '_', '-'; not '.' or '..')",
            quote(lineage)
        )));
    }
    if !KEY_TYPES.contains(&key_type.as_str()) {
        return Err(Error::InvalidArgument(format!(
            "key type {}: one of {}",
            quote(key_type),
            KEY_TYPES.join(", ")
        )));
    }
    let acme_name = match (acme.is_empty(), dry_run) {
        (false, _) => acme.as_str(),
        (true, true) => config.certificates.dry_run_acme.as_str(),
        (true, false) => config.certificates.default_acme.as_str(),
    };
    let server = config.acme_server(acme_name).ok_or_else(|| {
        let mut known: Vec<&str> = config.acme.iter().map(|a| a.name.as_str()).collect();
        known.extend(["letsencrypt", "letsencrypt-staging"]);
        Error::NotFound(format!(
            "no ACME server {} (known: {})",
            quote(acme_name),
            known.join(", ")
        ))
    })?;
    let dns = if by_dns {
        if webroot.is_some() {
            return Err(Error::InvalidArgument(
                "a webroot answers HTTP-01; a dns-01 job publishes DNS records instead: give one or the other".into(),
            ));
        }
        let mut zones = Vec::new();
        for n in names {
            let p = crate::certs::dns::provider_for(&config.dns, n).ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "no [[dns]] zone in the daemon's configuration holds {} (zones: {})",
                    crate::certs::dns::challenge_name(n),
                    if config.dns.is_empty() {
                        "none".to_owned()
                    } else {
                        config
                            .dns
                            .iter()
                            .map(|d| d.zone.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ))
            })?;
            zones.push((n.clone(), p.clone()));
        }
        Some(zones)
    } else {
        None
    };
    match webroot {
        _ if by_dns => {}
        Some(w) => {
            if !w.is_absolute() || !crate::fsops::is_normal(w) {
                return Err(Error::InvalidArgument(format!(
                    "webroot {} must be an absolute path without '..'",
                    quote(&w.to_string_lossy())
                )));
            }
            if !config
                .certificates
                .webroots
                .iter()
                .any(|r| w.starts_with(r))
            {
                return Err(Error::PermissionDenied(format!(
                    "webroot {} is not one of the daemon's [certificates] webroots ({})",
                    quote(&w.to_string_lossy()),
                    config
                        .certificates
                        .webroots
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        None if config.certificates.responder.is_none() => {
            return Err(Error::FailedPrecondition(
                "no webroot given and no [certificates] responder configured: nothing can answer the HTTP-01 challenge".into(),
            ));
        }
        None => {}
    }
    let mut resources = vec![format!("cert:{lineage}")];
    let mut seen = std::collections::HashSet::new();
    if let Some(t) = deploy.iter().find(|t| !seen.insert(t.as_str())) {
        return Err(Error::InvalidArgument(format!(
            "deploy target {} is given twice",
            quote(t)
        )));
    }
    let bundle = config.bundle_dir().join(format!("{lineage}.pem"));
    if !deploy.is_empty()
        && bundle
            .to_string_lossy()
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ';')
    {
        return Err(Error::FailedPrecondition(format!(
            "the bundle path {} cannot be named on HAProxy's command line: choose a haproxy_dir without spaces",
            bundle.display()
        )));
    }
    for t in deploy {
        if let Some(n) = config.nginx.iter().find(|n| &n.name == t) {
            check_nginx_target(n, &Lineage::new(&config.cert_root(), lineage))?;
            resources.push(format!("nginx:{t}"));
            continue;
        }
        check_deploy_target(config, t, &bundle)?;
        resources.push(format!("haproxy:{t}"));
    }
    // Changing an existing lineage's names is explicit.
    let l = Lineage::new(&config.cert_root(), lineage);
    if let Ok(pem) = std::fs::read(l.live_file("cert"))
        && let Ok(info) = lineage::read_cert(&pem)
    {
        let mut have: Vec<String> = info.names.iter().map(|n| n.to_ascii_lowercase()).collect();
        let mut want: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
        have.sort();
        want.sort();
        if have != want && !expand {
            return Err(Error::FailedPrecondition(format!(
                "lineage '{lineage}' is for {}; asking for {} changes its names: pass expand (--expand in the CLI) to do that",
                have.join(", "),
                want.join(", ")
            )));
        }
    }
    Ok((
        Request {
            lineage: lineage.clone(),
            names: names.clone(),
            webroot: webroot.clone(),
            key_type: key_type.clone(),
            reuse_key: *reuse_key,
            deploy: deploy.clone(),
            server,
            dry_run: *dry_run,
            dns,
        },
        resources,
    ))
}

/// Checks that a certificate can be deployed to HAProxy target `t`: it exists, has a way to
/// load the bundle, and (when its configuration can be read) loads `bundle` on a TLS bind.
pub(crate) fn check_deploy_target(config: &Config, t: &str, bundle: &Path) -> Result<(), Error> {
    let target = config
        .haproxy
        .iter()
        .find(|h| h.name == t)
        .ok_or_else(|| {
            Error::NotFound(format!("no HAProxy target {} to deploy to", quote(t)))
        })?;
    if target.master_socket.is_none()
        && target.reload_command.is_none()
        && target.stats_socket.is_none()
    {
        return Err(Error::FailedPrecondition(format!(
            "HAProxy target '{t}' has no master_socket, reload_command or stats_socket: a certificate cannot be deployed to it"
        )));
    }
    // A reload of a configuration that loads no bundle would not serve the certificate,
    // whatever the job said.
    if let Some(cfg) = &target.config
        && let Ok(text) = std::fs::read_to_string(cfg)
        && !crate::haproxy::edits::serves_bundle(&text, &config.bundle_dir(), bundle)
    {
        return Err(Error::FailedPrecondition(format!(
            "HAProxy target '{t}' loads neither {} nor {} on any `bind ... ssl`, so deploying would not serve the certificate; \
             the https_frontend edit makes a frontend serve every certificate stately issues \
             (stately haproxy edit {t} --https-frontend FRONTEND)",
            bundle.display(),
            config.bundle_dir().display()
        )));
    }
    Ok(())
}

/// Checks that an nginx target's configuration serves `l`'s live files, so that a reload
/// would serve the certificate.
pub(crate) fn check_nginx_target(n: &crate::nginx::NginxTarget, l: &Lineage) -> Result<(), Error> {
    let text = crate::nginx::read_all(&n.config).map_err(|e| {
        Error::FailedPrecondition(format!("nginx target '{}': {e}", n.name))
    })?;
    if !crate::nginx::serves(&text, &l.live_dir()) {
        return Err(Error::FailedPrecondition(format!(
            "nginx target '{}' has no ssl_certificate in {}, so deploying would not serve the certificate; \
             point a server's ssl_certificate at {} and ssl_certificate_key at {}",
            n.name,
            l.live_dir().display(),
            l.live_file("fullchain").display(),
            l.live_file("privkey").display()
        )));
    }
    Ok(())
}

struct Challenge {
    name: String,
    token: String,
    key_auth: String,
    /// DNS-01: the TXT value (the key authorization's digest).
    dns_value: String,
}

/// A certificate being issued.
pub(crate) struct Issue {
    req: Request,
    steps: Vec<Step>,
    data_dir: PathBuf,
    lineage: Lineage,
    bundle: PathBuf,
    responder: Option<Arc<Responder>>,
    /// The configured webroots.
    allowed: Vec<PathBuf>,
    account: Option<Account>,
    order: Option<Order>,
    challenges: Vec<Challenge>,
    answering: Vec<responder::Entry>,
    key_pem: Option<String>,
    chain: Option<String>,
    /// Each deploy target and how it gets the certificate (decided by the install).
    deploy: Vec<(String, UndoEntry)>,
    /// nginx deploy targets (reloaded, then checked).
    nginx: Vec<crate::nginx::NginxTarget>,
    /// Where the CA's HTTP-01 requests arrive here, probed before the order.
    probe: Option<std::net::SocketAddr>,
}

impl Executor for Issue {
    fn run_step<'a>(&'a mut self, index: usize, ctx: &'a mut StepCtx<'_>) -> StepFuture<'a> {
        Box::pin(async move {
            let step = super::step_at(&self.steps, index)?;
            self.run(step, ctx).await
        })
    }
}

impl std::fmt::Debug for Issue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issue")
            .field("lineage", &self.req.lineage)
            .field("names", &self.req.names)
            .finish_non_exhaustive()
    }
}

impl Issue {
    fn new(config: &Config, req: Request, responder: Option<Arc<Responder>>) -> Issue {
        // Probed when statelyd's responder answers (a webroot is served by another server).
        let probe = match (&req.webroot, &responder, &req.dns) {
            (None, Some(_), None) => config.certificates.challenge_probe.parse().ok(),
            _ => None,
        };
        let lineage = Lineage::new(&config.cert_root(), &req.lineage);
        let bundle = config.bundle_dir().join(format!("{}.pem", req.lineage));
        Issue {
            data_dir: config.data_dir.clone(),
            lineage,
            bundle,
            responder,
            allowed: config.certificates.webroots.clone(),
            account: None,
            order: None,
            challenges: Vec::new(),
            answering: Vec::new(),
            key_pem: None,
            chain: None,
            deploy: Vec::new(),
            nginx: Vec::new(),
            steps: steps(probe.is_some(), !req.deploy.is_empty(), req.dry_run),
            probe,
            req,
        }
    }

    /// A request for a probe token with each name's Host, sent where the CA's will arrive,
    /// must reach the responder.
    async fn probe(&self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        let (Some(addr), Some(responder)) = (self.probe, &self.responder) else {
            return Ok(());
        };
        let token = format!("stately-probe-{}", uuid::Uuid::now_v7().simple());
        let key = format!("{token}.probe");
        let _answering = responder.add(&token, &key);
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(StepError::failed)?;
        let url = format!("http://{addr}/.well-known/acme-challenge/{token}");
        for name in &self.req.names {
            let got = ctx
                .until_cancel(client.get(&url).header("Host", name.as_str()).send())
                .await?;
            let seen = match got {
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    if status.is_success() && body.trim() == key {
                        continue;
                    }
                    format!("answered {status}")
                }
                Err(e) => format!("failed: {e}"),
            };
            return Err(StepError::Precondition(format!(
                "a challenge request for {name} to {addr} (where the CA's will arrive: [certificates] challenge_probe) {seen} instead of reaching statelyd's responder; \
                 route /.well-known/acme-challenge/ to it first (stately haproxy edit TARGET --route-acme FRONTEND). Nothing was asked of the CA, \
                 whose failed validations count against its rate limit"
            )));
        }
        ctx.log(
            LogLevel::Info,
            format!(
                "challenge requests to {addr} for {} reach statelyd's responder",
                self.req.names.join(", ")
            ),
        );
        Ok(())
    }

    async fn run(&mut self, step: Step, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        let cancel = ctx.cancel_token().clone();
        match step {
            Step::Probe => self.probe(ctx).await,
            Step::Account => {
                let (account, created) = until_cancel(
                    &cancel,
                    acme::account(&self.data_dir, &self.req.server, false),
                )
                .await?
                .map_err(StepError::Failed)?;
                ctx.log(
                    LogLevel::Info,
                    format!(
                        "{} account at {}",
                        if created {
                            "registered a new"
                        } else {
                            "using the"
                        },
                        self.req.server.directory
                    ),
                );
                self.account = Some(account);
                Ok(())
            }
            Step::Order => self.order(ctx, &cancel).await,
            Step::Provision => self.provision(ctx).await,
            Step::Validate => self.validate(ctx, &cancel).await,
            Step::Finalize => self.finalize(ctx, &cancel).await,
            Step::Download => {
                let order = self.order.as_mut().ok_or_else(no_order)?;
                let chain = until_cancel(&cancel, order.poll_certificate(&polling()))
                    .await?
                    .map_err(|e| StepError::Failed(acme::describe(&e)))?;
                let info = lineage::read_cert(chain.as_bytes()).map_err(StepError::Failed)?;
                let mut got: Vec<String> =
                    info.names.iter().map(|n| n.to_ascii_lowercase()).collect();
                let mut want: Vec<String> = self
                    .req
                    .names
                    .iter()
                    .map(|n| n.to_ascii_lowercase())
                    .collect();
                got.sort();
                want.sort();
                if got != want {
                    return Err(StepError::Failed(format!(
                        "the CA's certificate is for {}, not {}",
                        got.join(", "),
                        want.join(", ")
                    )));
                }
                if let Some(key) = &self.key_pem
                    && !lineage::key_matches(chain.as_bytes(), key)
                {
                    return Err(StepError::Failed(
                        "the CA's certificate does not match the private key".into(),
                    ));
                }
                ctx.log(
                    LogLevel::Info,
                    format!(
                        "certificate {} for {}, valid until {}",
                        info.serial,
                        info.names.join(", "),
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH
                                + Duration::from_secs(info.not_after.max(0) as u64)
                        )
                    ),
                );
                self.chain = Some(chain);
                if self.req.dry_run {
                    ctx.log(
                        LogLevel::Info,
                        format!(
                            "dry run: {} issued it; nothing was installed or deployed",
                            self.req.server.name
                        ),
                    );
                }
                Ok(())
            }
            Step::Install => self.install(ctx, &cancel).await,
            Step::Deploy => self.deploy(ctx).await,
        }
    }

    async fn order(
        &mut self,
        ctx: &mut StepCtx<'_>,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(), StepError> {
        let ids: Vec<Identifier> = self
            .req
            .names
            .iter()
            .map(|n| Identifier::Dns(n.clone()))
            .collect();
        let account = self.account.as_ref().ok_or_else(no_order)?;
        let order = match until_cancel(cancel, account.new_order(&NewOrder::new(&ids))).await? {
            Ok(o) => o,
            Err(e) if acme::account_unknown(&e) => {
                ctx.log(
                    LogLevel::Warn,
                    "the CA does not know the stored account any more: registering again",
                );
                let (account, _) = until_cancel(
                    cancel,
                    acme::account(&self.data_dir, &self.req.server, true),
                )
                .await?
                .map_err(StepError::Failed)?;
                let o = until_cancel(cancel, account.new_order(&NewOrder::new(&ids)))
                    .await?
                    .map_err(|e| StepError::Failed(acme::describe(&e)))?;
                self.account = Some(account);
                o
            }
            Err(e) => return Err(StepError::Failed(acme::describe(&e))),
        };
        let mut order = order;
        let mut challenges = Vec::new();
        let mut authzs = order.authorizations();
        while let Some(a) = until_cancel(cancel, authzs.next()).await? {
            let mut a = a.map_err(|e| StepError::Failed(acme::describe(&e)))?;
            let name = match (a.identifier().identifier, a.identifier().wildcard) {
                (Identifier::Dns(d), true) => format!("*.{d}"),
                (Identifier::Dns(d), false) => d.clone(),
                (other, _) => format!("{other:?}"),
            };
            match a.status {
                AuthorizationStatus::Valid => {
                    ctx.log(LogLevel::Info, format!("{name}: already authorized"));
                    continue;
                }
                AuthorizationStatus::Pending => {}
                s => {
                    return Err(StepError::Failed(format!(
                        "{name}: the CA's authorization is {s:?}"
                    )));
                }
            }
            let kind = self.challenge_type();
            let ch = a.challenge(kind.clone()).ok_or_else(|| {
                StepError::Failed(format!("{name}: the CA offers no {kind:?} challenge"))
            })?;
            let key_auth = ch.key_authorization();
            challenges.push(Challenge {
                name,
                token: ch.token.clone(),
                key_auth: key_auth.as_str().to_owned(),
                dns_value: key_auth.dns_value(),
            });
        }
        ctx.log(
            LogLevel::Info,
            format!(
                "order {} for {} ({} challenge(s))",
                order.url(),
                self.req.names.join(", "),
                challenges.len()
            ),
        );
        self.challenges = challenges;
        self.order = Some(order);
        Ok(())
    }

    fn challenge_type(&self) -> ChallengeType {
        if self.req.dns.is_some() {
            ChallengeType::Dns01
        } else {
            ChallengeType::Http01
        }
    }

    /// The zone that takes `name`'s record.
    fn zone_of(&self, name: &str) -> Result<&crate::certs::dns::DnsProvider, StepError> {
        self.req
            .dns
            .iter()
            .flatten()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, p)| p)
            .ok_or_else(|| StepError::Failed(format!("{name}: the CA asked about a name not in the order")))
    }

    /// DNS-01: each record's removal is recorded, then the record published; then the job
    /// waits until every authoritative server of each zone answers every record.
    async fn publish(&mut self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        use crate::certs::dns;
        let mut by_zone: Vec<(crate::certs::dns::DnsProvider, Vec<(String, String)>)> = Vec::new();
        for c in &self.challenges {
            let p = self.zone_of(&c.name)?.clone();
            let zone = p.zone().map_err(StepError::Failed)?;
            let record = dns::challenge_name(&c.name);
            ctx.record_undo(UndoEntry::RemoveDnsTxt {
                zone: zone.clone(),
                name: record.clone(),
                value: c.dns_value.clone(),
            })
            .await?;
            ctx.until_cancel(dns::add_txt(&zone, &record, &c.dns_value, p.ttl))
                .await?
                .map_err(StepError::Failed)?;
            ctx.log(
                LogLevel::Info,
                format!("{}: published TXT {record} in {} through {}", c.name, zone.zone, zone.server),
            );
            match by_zone.iter_mut().find(|(q, _)| q.name == p.name) {
                Some((_, v)) => v.push((record, c.dns_value.clone())),
                None => by_zone.push((p, vec![(record, c.dns_value.clone())])),
            }
        }
        for (p, records) in by_zone {
            let servers = ctx
                .until_cancel(dns::authoritative(&p))
                .await?
                .map_err(StepError::Failed)?;
            let took = ctx
                .until_cancel(dns::wait_published(&servers, &records, p.propagation_timeout))
                .await?
                .map_err(|e| StepError::Failed(format!("zone {}: {e}", p.zone)))?;
            ctx.log(
                LogLevel::Info,
                format!(
                    "zone {}: all {} authoritative server(s) ({}) answer the challenge record(s), after {} ms",
                    p.zone,
                    servers.len(),
                    servers.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", "),
                    took.as_millis()
                ),
            );
        }
        Ok(())
    }

    async fn provision(&mut self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        if self.req.dns.is_some() {
            return self.publish(ctx).await;
        }
        for c in &self.challenges {
            if c.token.is_empty()
                || !c
                    .token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(StepError::Failed(format!(
                    "{}: the CA's token '{}' is not a safe file name",
                    c.name, c.token
                )));
            }
            match &self.req.webroot {
                Some(root) => {
                    let dir = self.challenge_dir(root, ctx).await?;
                    let path = dir.join(&c.token);
                    ctx.record_undo(UndoEntry::RemoveFile { path: path.clone() })
                        .await?;
                    let body = c.key_auth.clone();
                    let p = path.clone();
                    tokio::task::spawn_blocking(move || {
                        crate::fsops::write_atomic(&p, body.as_bytes(), 0o644, None)
                    })
                    .await
                    .map_err(|e| StepError::Failed(e.to_string()))?
                    .map_err(|e| StepError::Failed(format!("{}: {e}", path.display())))?;
                    ctx.log(
                        LogLevel::Info,
                        format!("{}: wrote {}", c.name, path.display()),
                    );
                }
                None => {
                    let r = self.responder.as_ref().ok_or_else(|| {
                        StepError::Failed("the HTTP-01 responder is not running".into())
                    })?;
                    self.answering.push(r.add(&c.token, &c.key_auth));
                    ctx.log(
                        LogLevel::Info,
                        format!(
                            "{}: the responder on {} answers its challenge",
                            c.name, r.addr
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// The webroot's challenge directory, created if needed, resolved through any symlinks
    /// and checked to lie under an allowed webroot (so a link cannot send writes elsewhere).
    /// The webroot's challenge directory, checked (symbolic links resolved) to lie in an
    /// allowed webroot before anything is created, and each directory it creates recorded for
    /// the unwind to remove.
    async fn challenge_dir(
        &self,
        root: &Path,
        ctx: &mut StepCtx<'_>,
    ) -> Result<PathBuf, StepError> {
        let dir = root.join(".well-known/acme-challenge");
        let allowed = self.allowed.clone();
        let d = dir.clone();
        let inside = move |p: &Path| {
            let real = crate::fsops::canonical_prefix(p);
            let ok = allowed
                .iter()
                .any(|a| real.starts_with(crate::fsops::canonical_prefix(a)));
            if ok {
                Ok(real)
            } else {
                Err(StepError::Failed(format!(
                    "{} resolves to {}, outside the allowed webroots",
                    p.display(),
                    real.display()
                )))
            }
        };
        let check = inside.clone();
        let (real, missing) = tokio::task::spawn_blocking(move || {
            let real = check(&d)?;
            // The directories to create, outermost first.
            let mut missing = Vec::new();
            let mut p = real.clone();
            while std::fs::symlink_metadata(&p).is_err() {
                missing.push(p.clone());
                if !p.pop() {
                    break;
                }
            }
            missing.reverse();
            Ok::<_, StepError>((real, missing))
        })
        .await
        .map_err(|e| StepError::Failed(e.to_string()))??;
        for m in missing {
            ctx.record_undo(UndoEntry::RemoveEmptyDir { path: m.clone() })
                .await?;
            let check = inside.clone();
            tokio::task::spawn_blocking(move || {
                match std::fs::create_dir(&m) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                        return Err(StepError::Failed(format!("{}: {e}", m.display())));
                    }
                    _ => {}
                }
                check(&m).map(|_| ())
            })
            .await
            .map_err(|e| StepError::Failed(e.to_string()))??;
        }
        inside(&real)
    }

    async fn validate(
        &mut self,
        ctx: &mut StepCtx<'_>,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(), StepError> {
        let kind = self.challenge_type();
        let order = self.order.as_mut().ok_or_else(no_order)?;
        let mut authzs = order.authorizations();
        while let Some(a) = until_cancel(cancel, authzs.next()).await? {
            let mut a = a.map_err(|e| StepError::Failed(acme::describe(&e)))?;
            if a.status != AuthorizationStatus::Pending {
                continue;
            }
            if let Some(mut ch) = a.challenge(kind.clone()) {
                until_cancel(cancel, ch.set_ready())
                    .await?
                    .map_err(|e| StepError::Failed(acme::describe(&e)))?;
            }
        }
        ctx.log(LogLevel::Info, "waiting for the CA to validate");
        let status = until_cancel(cancel, order.poll_ready(&polling()))
            .await?
            .map_err(|e| StepError::Failed(acme::describe(&e)))?;
        let outcome = if status == OrderStatus::Ready {
            Ok(())
        } else {
            // Which name failed, and the CA's words for it.
            let mut why = Vec::new();
            let mut authzs = order.authorizations();
            while let Some(Ok(a)) = authzs.next().await {
                if a.status == AuthorizationStatus::Valid {
                    continue;
                }
                let name = match (a.identifier().identifier, a.identifier().wildcard) {
                    (Identifier::Dns(d), true) => format!("*.{d}"),
                    (Identifier::Dns(d), false) => d.clone(),
                    (other, _) => format!("{other:?}"),
                };
                for c in &a.challenges {
                    if let Some(p) = &c.error {
                        why.push(format!("{name}: {}", acme::problem(p)));
                    }
                }
                if why.is_empty() {
                    why.push(format!("{name}: authorization {:?}", a.status));
                }
            }
            Err(StepError::Failed(format!(
                "validation failed (order {status:?}): {}",
                why.join("; ")
            )))
        };
        self.cleanup(ctx).await;
        outcome
    }

    /// The challenges are answered: stop answering (files removed, responder entries gone).
    async fn cleanup(&mut self, ctx: &mut StepCtx<'_>) {
        self.answering.clear();
        if self.req.dns.is_some() {
            for c in &self.challenges {
                let Ok(p) = self.zone_of(&c.name) else { continue };
                let Ok(zone) = p.zone() else { continue };
                let record = crate::certs::dns::challenge_name(&c.name);
                match crate::certs::dns::remove_txt(&zone, &record, &c.dns_value).await {
                    Ok(()) => ctx.log(LogLevel::Info, format!("{}: removed TXT {record}", c.name)),
                    Err(e) => ctx.log(LogLevel::Warn, format!("{}: {e}", c.name)),
                }
            }
        }
        if let Some(root) = &self.req.webroot {
            let paths: Vec<PathBuf> = self
                .challenges
                .iter()
                .map(|c| root.join(".well-known/acme-challenge").join(&c.token))
                .collect();
            let r = tokio::task::spawn_blocking(move || {
                paths
                    .iter()
                    .try_for_each(|p| crate::fsops::remove_if_present(p))
            })
            .await;
            if let Ok(Err(e)) = r {
                ctx.log(LogLevel::Warn, format!("removing a challenge file: {e}"));
            }
        }
    }

    async fn finalize(
        &mut self,
        ctx: &mut StepCtx<'_>,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(), StepError> {
        let reuse = if self.req.reuse_key {
            std::fs::read_to_string(self.lineage.live_file("privkey")).ok()
        } else {
            None
        };
        let key_type = self.req.key_type.clone();
        let (key, reused) = tokio::task::spawn_blocking(move || match reuse {
            Some(pem) => acme::load_key(&pem).map(|k| (k, true)),
            None => acme::new_key(&key_type).map(|k| (k, false)),
        })
        .await
        .map_err(|e| StepError::Failed(e.to_string()))?
        .map_err(StepError::Failed)?;
        let csr = acme::csr(&self.req.names, &key).map_err(StepError::Failed)?;
        let order = self.order.as_mut().ok_or_else(no_order)?;
        until_cancel(cancel, order.finalize_csr(&csr))
            .await?
            .map_err(|e| StepError::Failed(acme::describe(&e)))?;
        ctx.log(
            LogLevel::Info,
            if reused {
                "finalized with the lineage's key (reused)".to_owned()
            } else {
                format!("finalized with a new {} key", self.req.key_type)
            },
        );
        self.key_pem = Some(key.serialize_pem());
        Ok(())
    }

    async fn install(
        &mut self,
        ctx: &mut StepCtx<'_>,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(), StepError> {
        let chain_pem = self.chain.clone().ok_or_else(no_order)?;
        let key_pem = self.key_pem.clone().ok_or_else(no_order)?;
        let (cert, chain) = lineage::split_chain(&chain_pem).map_err(StepError::Failed)?;
        let fullchain = format!("{cert}{chain}");
        // How each target gets the certificate is decided here, once; its undo is recorded
        // first, so that unwinding redeploys last, after the files are back.
        self.deploy.clear();
        self.nginx.clear();
        for target in self.req.deploy.clone() {
            if let Some(n) = ctx.config().nginx.iter().find(|n| n.name == target).cloned() {
                let reload = n.reload();
                let workers = {
                    let r = reload.clone();
                    tokio::task::spawn_blocking(move || crate::nginx::workers(&r))
                        .await
                        .map_err(StepError::failed)?
                };
                if workers.is_empty() {
                    return Err(StepError::Precondition(format!(
                        "nginx '{target}' is not running (no master in {}, or no workers): start it first; nothing was changed",
                        n.pid_file.display()
                    )));
                }
                ctx.record_undo(UndoEntry::ReloadNginx { reload, workers })
                    .await?;
                self.nginx.push(n);
                continue;
            }
            let h = ctx
                .config()
                .haproxy
                .iter()
                .find(|h| h.name == target)
                .ok_or_else(|| StepError::Failed(format!("HAProxy target '{target}' is gone")))?;
            let how = deploy_how(h, &self.bundle)
                .await
                .map_err(StepError::Failed)?;
            ctx.record_undo(how.clone()).await?;
            self.deploy.push((target, how));
        }
        let n = self.lineage.versions().last().map_or(1, |v| v + 1);
        // The new key keeps the mode and owner of the live one (a group that reads it, say).
        let key_access = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(self.lineage.live_file("privkey"))
                .ok()
                .map(|m| (m.mode() & 0o7777, Some((m.uid(), m.gid()))))
                .unwrap_or((0o600, None))
        };
        let contents = [
            ("cert", cert.as_str(), (0o644, None)),
            ("chain", chain.as_str(), (0o644, None)),
            ("fullchain", fullchain.as_str(), (0o644, None)),
            ("privkey", key_pem.as_str(), key_access),
        ];
        // A first issuance creates the lineage's directories: a cancel takes them away too.
        for dir in [self.lineage.archive_dir(), self.lineage.live_dir()] {
            if !dir.exists() {
                ctx.record_undo(UndoEntry::RemoveEmptyDir { path: dir })
                    .await?;
            }
        }
        for (file, text, (mode, owner)) in contents {
            let path = self.lineage.archive_file(file, n);
            ctx.record_undo(UndoEntry::RemoveFile { path: path.clone() })
                .await?;
            write_owned(&path, text.as_bytes(), mode, owner).await?;
        }
        ctx.progress(
            4,
            9,
            format!("archive/{}/*{n}.pem written", self.req.lineage),
        );
        let pause = test_pause();
        for (i, file) in FILES.iter().enumerate() {
            let link = self.lineage.live_file(file);
            let undo = ctx.snapshot(&link).await?;
            ctx.record_undo(undo).await?;
            let target = self.lineage.link_target(file, n);
            tokio::task::spawn_blocking(move || crate::fsops::symlink_atomic(&target, &link))
                .await
                .map_err(|e| StepError::Failed(e.to_string()))?
                .map_err(|e| StepError::Failed(format!("switching live/{file}.pem: {e}")))?;
            ctx.progress(
                5 + i as u64,
                9,
                format!("live/{}/{file}.pem → version {n}", self.req.lineage),
            );
            if i == 1
                && let Some(p) = pause
            {
                ctx.log(
                    LogLevel::Info,
                    "test hook: pausing in the middle of the install",
                );
                until_cancel(cancel, tokio::time::sleep(p)).await?;
            }
        }
        let undo = ctx.snapshot(&self.bundle).await?;
        // HAProxy may read the bundle through its group: keep the old one's mode and owner.
        let (bmode, bowner) = match &undo {
            UndoEntry::RestoreFile { mode, uid, gid, .. } => (*mode, Some((*uid, *gid))),
            _ => (0o600, None),
        };
        ctx.record_undo(undo).await?;
        write_owned(
            &self.bundle,
            format!("{fullchain}{key_pem}").as_bytes(),
            bmode,
            bowner,
        )
        .await?;
        ctx.progress(9, 9, format!("HAProxy bundle {}", self.bundle.display()));
        // How to renew it, kept beside the store.
        let meta = Meta {
            names: self.req.names.clone(),
            webroot: self.req.webroot.clone(),
            key_type: self.req.key_type.clone(),
            reuse_key: self.req.reuse_key,
            deploy: self.req.deploy.clone(),
            acme: self.req.server.name.clone(),
            challenge: if self.req.dns.is_some() {
                DNS_01.into()
            } else {
                String::new()
            },
        };
        // Undone with the rest, so renewals repeat what is live.
        let path = crate::certs::meta_file(&self.data_dir, &self.req.lineage);
        let undo = ctx.snapshot(&path).await?;
        ctx.record_undo(undo).await?;
        let json = serde_json::to_vec_pretty(&meta).unwrap_or_default();
        write(&path, &json, 0o600).await?;
        ctx.log(
            LogLevel::Info,
            format!("installed version {n} of lineage '{}'", self.req.lineage),
        );
        Ok(())
    }

    async fn deploy(&mut self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        for n in self.nginx.clone() {
            crate::nginx::reload(&n.reload())
                .await
                .map_err(|e| StepError::Failed(format!("deploying to nginx '{}': {e}", n.name)))?;
            let Some(addr) = n.verify else {
                ctx.log(
                    LogLevel::Info,
                    format!(
                        "nginx '{}': nginx -t passed and new workers run the new files (no verify address to check the served certificate)",
                        n.name
                    ),
                );
                continue;
            };
            let want = self
                .chain
                .as_deref()
                .and_then(|c| lineage::read_cert(c.as_bytes()).ok())
                .map(|i| i.serial)
                .ok_or_else(no_order)?;
            let sni = self
                .req
                .names
                .iter()
                .find(|n| !n.starts_with("*."))
                .cloned()
                .unwrap_or_else(|| self.req.names[0].replacen('*', "stately-check", 1));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                let got = crate::nginx::served_serial(addr, &sni).await;
                match got {
                    Ok(s) if s == want => break,
                    _ if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(s) => {
                        return Err(StepError::Failed(format!(
                            "nginx '{}' reloaded, but {addr} serves certificate {s} for {sni}, not the new {want}",
                            n.name
                        )));
                    }
                    Err(e) => {
                        return Err(StepError::Failed(format!(
                            "nginx '{}' reloaded, but the served certificate cannot be checked: {e}",
                            n.name
                        )));
                    }
                }
            }
            ctx.log(
                LogLevel::Info,
                format!("nginx '{}': reloaded; {addr} serves certificate {want} for {sni}", n.name),
            );
        }
        for (target, how) in self.deploy.clone() {
            let mut lines = Vec::new();
            let r = how.apply(ctx.blobs(), |_, l| lines.push(l)).await;
            for l in lines {
                ctx.log(LogLevel::Info, l);
            }
            r.map_err(|e| StepError::Failed(format!("deploying to '{target}': {e}")))?;
            ctx.log(
                LogLevel::Info,
                match how {
                    UndoEntry::HotSwapCert { .. } => format!(
                        "'{target}': the new certificate is live (set ssl cert + commit, no reload)"
                    ),
                    _ => format!("'{target}': reloaded with the new certificate"),
                },
            );
        }
        Ok(())
    }
}

/// How a target gets the certificate now: a hot-swap (`set ssl cert`) where HAProxy has the
/// bundle loaded, else a reload through the master CLI or the reload command.
pub(crate) async fn deploy_how(
    h: &crate::haproxy::HaproxyTarget,
    bundle: &Path,
) -> Result<UndoEntry, String> {
    if let Some(socket) = &h.stats_socket
        && let Ok(true) = crate::haproxy::runtime::ssl_cert_loaded(socket, bundle).await
    {
        return Ok(UndoEntry::HotSwapCert {
            socket: socket.clone(),
            path: bundle.to_owned(),
        });
    }
    UndoEntry::reload_haproxy(h).ok_or_else(|| {
        format!(
            "'{}' does not have the bundle loaded, and has no master_socket or reload_command to reload it",
            h.name
        )
    })
}

/// The job that renews a lineage: as it was issued when statelyd issued it, else (a lineage
/// made by certbot) for the live certificate's names with the daemon's defaults.
pub(crate) fn renewal(config: &Config, name: &str) -> Result<super::JobSpec, Error> {
    let l = crate::certs::get(&config.cert_places(), name).ok_or_else(|| {
        Error::NotFound(format!(
            "no certificate lineage '{name}' under {}",
            config.cert_root().display()
        ))
    })?;
    let meta = l.meta.unwrap_or_else(|| crate::certs::Meta {
        names: l.info.names.clone(),
        webroot: None,
        key_type: l.info.key_type.clone(),
        reuse_key: false,
        deploy: Vec::new(),
        acme: String::new(),
        challenge: String::new(),
    });
    Ok(super::JobSpec::CertificateIssue(Spec {
        lineage: name.to_owned(),
        names: meta.names,
        webroot: meta.webroot,
        key_type: if KEY_TYPES.contains(&meta.key_type.as_str()) {
            meta.key_type
        } else {
            DEFAULT_KEY_TYPE.into()
        },
        reuse_key: meta.reuse_key,
        deploy: meta.deploy,
        acme: meta.acme,
        expand: false,
        dry_run: false,
        challenge: meta.challenge,
    }))
}

async fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StepError> {
    write_owned(path, bytes, mode, None).await
}

pub(crate) async fn write_owned(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), StepError> {
    let (p, b) = (path.to_owned(), bytes.to_vec());
    tokio::task::spawn_blocking(move || crate::fsops::write_atomic(&p, &b, mode, owner))
        .await
        .map_err(|e| StepError::Failed(e.to_string()))?
        .map_err(|e| StepError::Failed(format!("{}: {e}", path.display())))
}

/// A test hook: `STATELY_TEST_INSTALL_PAUSE_MS` pauses the install halfway through the live
/// links, so tests can cancel or kill the daemon there — a moment no request can hold open.
/// Debug builds only (the tests' build): a release binary has no such hook.
fn test_pause() -> Option<Duration> {
    if !cfg!(debug_assertions) {
        return None;
    }
    std::env::var("STATELY_TEST_INSTALL_PAUSE_MS")
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

fn no_order() -> StepError {
    StepError::Failed("an earlier step did not complete".into())
}

/// Awaits `f` unless the job is cancelled first.
async fn until_cancel<T>(
    cancel: &tokio_util::sync::CancellationToken,
    f: impl std::future::Future<Output = T>,
) -> Result<T, StepError> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(StepError::Cancelled),
        v = f => Ok(v),
    }
}
