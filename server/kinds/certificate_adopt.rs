//! `certificate_adopt`: take over the lineages certbot left, in place, so stately renews them
//! from then on. For each lineage: its renewal settings (`renewal/<name>.conf`: authenticator,
//! webroot, server, key type) become stately's; links left by an interrupted certbot update are
//! repaired as certbot itself would; a `-0001` side lineage that covers the lineage's names is
//! merged into it (its versions become the next versions of the lineage, the live links follow
//! by rename, the side lineage is retired); certbot's renewal config is retired so `certbot
//! renew` leaves the lineage alone; the HAProxy bundle is written and any deploy follows.
//! Every change records its undo first: a cancel, a failure or a rollback puts both lineages
//! and certbot's configs back as they were.

use super::certificate_delete::{Item, items, remove_items};
use super::certificate_issue::{deploy_how, write_owned};
use super::{Executor, Moment, Planned, StepFuture};
use crate::certs::certbot::{self, RenewalConf};
use crate::certs::lineage::{self, FILES, Lineage};
use crate::certs::{KEY_TYPES, Meta};
use crate::config::Config;
use crate::job::LogLevel;
use crate::quote::quote;
use crate::step::{Env, Error, StepCtx, StepError};
use crate::undo::UndoEntry;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Adopt certbot's lineages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// certbot's root, which must be the daemon's certificate root (None: that root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// The lineages (empty: every lineage with a renewal config).
    #[serde(default)]
    pub lineages: Vec<String>,
    /// HAProxy targets to deploy the adopted certificates to.
    #[serde(default)]
    pub deploy: Vec<String>,
    /// Say what would be done, and do nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// One lineage to take over.
#[derive(Debug, Clone)]
struct Adoption {
    name: String,
    /// Live links to point elsewhere (certbot's repair), and `previous_*` links to remove.
    repair: Vec<(String, PathBuf)>,
    previous: Vec<PathBuf>,
    /// A side lineage merged into this one, with its own repair.
    merge: Option<Merge>,
    /// The renewal settings stately keeps.
    meta: Meta,
    /// How they were read, for the log.
    method: String,
}

#[derive(Debug, Clone)]
struct Merge {
    side: String,
    repair: Vec<(String, PathBuf)>,
    previous: Vec<PathBuf>,
    /// The side's versions, and the one live (after its repair).
    versions: Vec<u32>,
    current: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    Read,
    Repair,
    Merge,
    TakeOver,
    Deploy,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Read => "read certbot's lineages",
            Step::Repair => "repair interrupted certbot updates",
            Step::Merge => "merge -NNNN side lineages",
            Step::TakeOver => "take over renewal",
            Step::Deploy => "deploy",
        })
    }
}

/// Reads what certbot left and decides everything; nothing is changed here.
pub(crate) async fn plan(spec: &Spec, env: &Env, _at: Moment) -> Result<Planned, Error> {
    let config = env.config.clone();
    let spec2 = spec.clone();
    let adoptions = tokio::task::spawn_blocking(move || decide(&config, &spec2))
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))??;
    let mut resources: Vec<String> = Vec::new();
    for a in &adoptions {
        resources.push(format!("cert:{}", a.name));
        if let Some(m) = &a.merge {
            resources.push(format!("cert:{}", m.side));
        }
    }
    for t in &spec.deploy {
        if let Some(h) = env.config.haproxy.iter().find(|h| &h.name == t)
            && h.master_socket.is_none()
            && h.reload_command.is_none()
        {
            return Err(Error::FailedPrecondition(format!(
                "HAProxy target '{t}' has no master_socket or reload_command: an adopted lineage's bundle is new to HAProxy, so only a reload can load it"
            )));
        }
        for a in &adoptions {
            let bundle = env.config.bundle_dir().join(format!("{}.pem", a.name));
            super::certificate_issue::check_deploy_target(&env.config, t, &bundle)?;
        }
        resources.push(format!("haproxy:{t}"));
    }
    let scripts = certbot::hook_scripts(&env.config.cert_root());
    if let Some(s) = scripts.first() {
        return Err(Error::FailedPrecondition(format!(
            "certbot runs {} (and {} more hook(s) in renewal-hooks/) around every renewal, which stately does not run; deploy to what they reload instead (--deploy) and move them out first",
            s.display(),
            scripts.len() - 1
        )));
    }
    let mut steps = vec![Step::Read];
    if !spec.dry_run {
        if adoptions
            .iter()
            .any(|a| !a.repair.is_empty() || !a.previous.is_empty() || a.merge.as_ref().is_some_and(|m| !m.repair.is_empty() || !m.previous.is_empty()))
        {
            steps.push(Step::Repair);
        }
        if adoptions.iter().any(|a| a.merge.is_some()) {
            steps.push(Step::Merge);
        }
        steps.push(Step::TakeOver);
        if !spec.deploy.is_empty() {
            steps.push(Step::Deploy);
        }
    }
    Ok(Planned::new(
        &steps,
        resources,
        Adopt {
            spec: spec.clone(),
            steps: steps.clone(),
            adoptions,
            deploy: Vec::new(),
            certbot_lock: None,
        },
    ))
}

/// The side lineages of `base`: `base-0001`, `base-0002`, ... that exist under live/.
fn sides(root: &Path, base: &str) -> Vec<String> {
    let re = regex::Regex::new(&format!("^{}-[0-9]{{4}}$", regex::escape(base))).expect("a pattern");
    let mut v: Vec<String> = std::fs::read_dir(root.join("live"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| re.is_match(n))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The base of a side lineage's name (`x` of `x-0001`).
fn base_of(name: &str) -> Option<&str> {
    let (base, n) = name.rsplit_once('-')?;
    (n.len() == 4 && n.bytes().all(|b| b.is_ascii_digit()) && !base.is_empty()).then_some(base)
}

/// A lineage's links once certbot's repair is made: the repair, the previous links to go,
/// and the version live after it.
type Repaired = (Vec<(String, PathBuf)>, Vec<PathBuf>, u32);

fn repaired(l: &Lineage) -> Result<Repaired, Error> {
    let s = certbot::link_state(l);
    let (set, gone) = certbot::repair(l, &s);
    let mut after = s.clone();
    for (f, t) in &set {
        let v = t
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .and_then(|n| n.strip_prefix(f.as_str())?.strip_suffix(".pem")?.parse().ok());
        if let Some(e) = after.live.iter_mut().find(|(g, _)| g == f) {
            e.1 = v;
        }
    }
    let version = certbot::consistent(&after).map_err(|e| {
        Error::FailedPrecondition(format!(
            "lineage '{}': {e}, and certbot left no previous links to repair it from; fix it by hand (certbot would refuse it too)",
            l.name
        ))
    })?;
    Ok((set, gone, version))
}

/// The names of a lineage's version `v`.
fn names_of(l: &Lineage, v: u32) -> Result<Vec<String>, Error> {
    let pem = std::fs::read(l.archive_file("cert", v)).map_err(|e| {
        Error::FailedPrecondition(format!("lineage '{}': cert{v}.pem: {e}", l.name))
    })?;
    let info = lineage::read_cert(&pem)
        .map_err(|e| Error::FailedPrecondition(format!("lineage '{}': cert{v}.pem: {e}", l.name)))?;
    let key = std::fs::read_to_string(l.archive_file("privkey", v)).unwrap_or_default();
    if !lineage::key_matches(&pem, &key) {
        return Err(Error::FailedPrecondition(format!(
            "lineage '{}': privkey{v}.pem is not the key of cert{v}.pem",
            l.name
        )));
    }
    let mut n: Vec<String> = info.names.iter().map(|n| n.to_ascii_lowercase()).collect();
    n.sort();
    Ok(n)
}

fn decide(config: &Config, spec: &Spec) -> Result<Vec<Adoption>, Error> {
    let root = config.cert_root();
    if let Some(r) = &spec.root
        && crate::fsops::canonical_prefix(r) != crate::fsops::canonical_prefix(&root)
    {
        return Err(Error::FailedPrecondition(format!(
            "{} is not the daemon's certificate root ({}): stately adopts lineages in place, so set [certificates] root = {} first",
            quote(&r.to_string_lossy()),
            root.display(),
            quote(&r.to_string_lossy())
        )));
    }
    for n in &spec.lineages {
        if !crate::fsops::is_safe_name(n) {
            return Err(Error::InvalidArgument(format!(
                "{} is not a lineage name (letters, digits, '.', '_', '-')",
                quote(n)
            )));
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(t) = spec.deploy.iter().find(|t| !seen.insert(t.as_str())) {
        return Err(Error::InvalidArgument(format!(
            "deploy target {} is given twice",
            quote(t)
        )));
    }
    let all = certbot::renewal_names(&root);
    let asked: Vec<String> = if spec.lineages.is_empty() {
        if all.is_empty() {
            return Err(Error::NotFound(format!(
                "no certbot lineages under {} (no renewal/*.conf)",
                root.display()
            )));
        }
        all.clone()
    } else {
        for n in &spec.lineages {
            if !all.contains(n) {
                return Err(Error::NotFound(format!(
                    "no certbot lineage '{n}' under {} (no renewal/{n}.conf)",
                    root.display()
                )));
            }
        }
        spec.lineages.clone()
    };
    // A side lineage asked for brings its base, which it is merged into if it covers it.
    let mut bases: Vec<String> = asked.clone();
    for n in &asked {
        if let Some(b) = base_of(n)
            && all.iter().any(|a| a == b)
            && !bases.iter().any(|x| x == b)
        {
            bases.push(b.to_owned());
        }
    }
    let mut out = Vec::new();
    for name in bases {
        let l = Lineage::new(&root, &name);
        let (repair, previous, version) = repaired(&l)?;
        let names = names_of(&l, version)?;
        // The newest side lineage that covers every name of this one is merged into it.
        let mut merge = None;
        for side in sides(&root, &name).into_iter().rev() {
            if !all.contains(&side) {
                continue;
            }
            let sl = Lineage::new(&root, &side);
            let (srepair, sprevious, scurrent) = repaired(&sl)?;
            let snames = names_of(&sl, scurrent)?;
            if names.iter().all(|n| snames.contains(n)) {
                merge = Some((
                    Merge {
                        side: side.clone(),
                        repair: srepair,
                        previous: sprevious,
                        versions: sl.versions(),
                        current: scurrent,
                    },
                    snames,
                ));
                break;
            }
        }
        let (conf_of, names) = match &merge {
            Some((m, snames)) => (m.side.clone(), snames.clone()),
            None => (name.clone(), names),
        };
        let conf = read_conf(&root, &conf_of)?;
        let (meta, method) = settings(config, &conf_of, &conf, &names, &Lineage::new(&root, &conf_of), spec)?;
        out.push(Adoption {
            name,
            repair,
            previous,
            merge: merge.map(|(m, _)| m),
            meta,
            method,
        });
    }
    // A lineage merged into another is not adopted on its own too.
    let merged: Vec<String> = out
        .iter()
        .filter_map(|a| a.merge.as_ref().map(|m| m.side.clone()))
        .collect();
    out.retain(|a| !merged.contains(&a.name));
    // A base brought in for a side it does not merge is not adopted unasked.
    out.retain(|a| {
        asked.contains(&a.name) || a.merge.as_ref().is_some_and(|m| asked.contains(&m.side))
    });
    Ok(out)
}

fn read_conf(root: &Path, name: &str) -> Result<RenewalConf, Error> {
    let f = certbot::renewal_file(root, name);
    let text = std::fs::read_to_string(&f)
        .map_err(|e| Error::FailedPrecondition(format!("{}: {e}", f.display())))?;
    certbot::parse_renewal(&text)
        .map_err(|e| Error::FailedPrecondition(format!("{}: {e}", f.display())))
}

/// certbot's renewal settings as stately's, or why stately cannot renew the lineage so.
fn settings(
    config: &Config,
    name: &str,
    conf: &RenewalConf,
    names: &[String],
    l: &Lineage,
    spec: &Spec,
) -> Result<(Meta, String), Error> {
    let who = format!("lineage '{name}'");
    // certbot runs these after its renewals; stately would not, and what they reload would
    // keep the old certificate.
    if let Some((k, v)) = conf.hooks().first() {
        return Err(Error::FailedPrecondition(format!(
            "{who}: certbot runs its {k} {} after renewals, which stately does not run; deploy to the target it serves instead (--deploy) and remove the hook from renewal/{name}.conf first",
            quote(v)
        )));
    }
    let auth = conf.authenticator();
    let (webroot, challenge, method) = match auth {
        "webroot" => {
            let roots: Vec<PathBuf> = names.iter().filter_map(|n| conf.webroot(n)).collect();
            let Some(first) = roots.first().cloned() else {
                return Err(Error::FailedPrecondition(format!(
                    "{who}: certbot's webroot authenticator has no webroot_path"
                )));
            };
            if roots.iter().any(|r| r != &first) {
                return Err(Error::FailedPrecondition(format!(
                    "{who}: certbot answers its names from different webroots; stately uses one per lineage"
                )));
            }
            if !config.certificates.webroots.iter().any(|r| first.starts_with(r)) {
                return Err(Error::FailedPrecondition(format!(
                    "{who}: its webroot {} is not one of the daemon's [certificates] webroots: add it there first",
                    first.display()
                )));
            }
            let m = format!("webroot {}", first.display());
            (Some(first), String::new(), m)
        }
        "standalone" | "nginx" | "apache" | "" => {
            if config.certificates.responder.is_none() {
                return Err(Error::FailedPrecondition(format!(
                    "{who}: certbot answered HTTP-01 with its {} authenticator; stately would answer with its responder, and no [certificates] responder is configured",
                    if auth.is_empty() { "default" } else { auth }
                )));
            }
            (None, String::new(), format!("responder (certbot used {})", if auth.is_empty() { "its default" } else { auth }))
        }
        a if a.starts_with("dns") => {
            if let Some(n) = names
                .iter()
                .find(|n| crate::certs::dns::provider_for(&config.dns, n).is_none())
            {
                return Err(Error::FailedPrecondition(format!(
                    "{who}: certbot proved it by DNS ({a}); no [[dns]] zone of the daemon holds {}",
                    crate::certs::dns::challenge_name(n)
                )));
            }
            (None, super::certificate_issue::DNS_01.to_owned(), format!("dns-01 (certbot used {a})"))
        }
        other => {
            return Err(Error::FailedPrecondition(format!(
                "{who}: certbot's {other} authenticator cannot be renewed unattended by stately (webroot, standalone, nginx, apache and dns-* can)"
            )));
        }
    };
    let server = conf.server().unwrap_or("https://acme-v02.api.letsencrypt.org/directory");
    let mut known: Vec<crate::certs::config::AcmeServer> = config.acme.clone();
    for b in ["letsencrypt", "letsencrypt-staging"] {
        known.extend(config.acme_server(b));
    }
    let acme = known
        .iter()
        .find(|a| a.directory.trim_end_matches('/') == server.trim_end_matches('/'))
        .map(|a| a.name.clone())
        .ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "{who}: certbot renews it at {server}, which is none of the daemon's ACME servers: add an [[acme]] with that directory first"
            ))
        })?;
    let key_type = match conf.key_type() {
        Some(k) => k,
        None => {
            let pem = std::fs::read(l.live_file("cert")).unwrap_or_default();
            lineage::read_cert(&pem).map(|i| i.key_type).unwrap_or_default()
        }
    };
    if !KEY_TYPES.contains(&key_type.as_str()) {
        return Err(Error::FailedPrecondition(format!(
            "{who}: its key type {key_type} is not one stately issues ({})",
            KEY_TYPES.join(", ")
        )));
    }
    Ok((
        Meta {
            names: names.to_vec(),
            webroot,
            key_type,
            reuse_key: conf.reuse_key(),
            deploy: spec.deploy.clone(),
            acme,
            challenge,
        },
        method,
    ))
}

#[derive(Debug)]
struct Adopt {
    spec: Spec,
    steps: Vec<Step>,
    adoptions: Vec<Adoption>,
    /// Each deploy target and how it gets the certificates (decided when the bundles are written).
    deploy: Vec<(String, UndoEntry)>,
    /// certbot's lock on its root, held until the job ends.
    certbot_lock: Option<certbot::Lock>,
}

impl Executor for Adopt {
    fn run_step<'a>(&'a mut self, index: usize, ctx: &'a mut StepCtx<'_>) -> StepFuture<'a> {
        Box::pin(async move {
            match super::step_at(&self.steps, index)? {
                Step::Read => self.read(ctx).await,
                Step::Repair => self.repair(ctx).await,
                Step::Merge => self.merge(ctx).await,
                Step::TakeOver => self.take_over(ctx).await,
                Step::Deploy => self.deploy(ctx).await,
            }
        })
    }
}

impl Adopt {
    /// Says what the job does (all of it, for a dry run).
    async fn read(&mut self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        if !self.spec.dry_run {
            self.certbot_lock = Some(
                certbot::lock(&ctx.config().cert_root()).map_err(StepError::Precondition)?,
            );
            // With certbot locked out, what was planned must still be what is there.
            let (config, spec) = (ctx.config().clone(), self.spec.clone());
            let now = tokio::task::spawn_blocking(move || decide(&config, &spec))
                .await
                .map_err(StepError::failed)?
                .map_err(|e| StepError::Precondition(e.to_string()))?;
            if format!("{now:?}") != format!("{:?}", self.adoptions) {
                return Err(StepError::Precondition(
                    "certbot's lineages changed since the job was planned (a certbot run?): submit it again".into(),
                ));
            }
        }
        let dry = if self.spec.dry_run { "would " } else { "will " };
        for a in &self.adoptions {
            for (f, t) in &a.repair {
                ctx.log(
                    LogLevel::Info,
                    format!("{}: certbot's update was interrupted: {dry}point live/{f}.pem back at {} (as certbot would)", a.name, t.display()),
                );
            }
            if let Some(m) = &a.merge {
                ctx.log(
                    LogLevel::Info,
                    format!(
                        "{}: {} covers its names ({}): {dry}merge its {} version(s) into archive/{}/ and retire it",
                        a.name,
                        m.side,
                        a.meta.names.join(", "),
                        m.versions.len(),
                        a.name
                    ),
                );
            }
            ctx.log(
                LogLevel::Info,
                format!(
                    "{}: {dry}renew by {}, {} key{}, from {}{}; certbot's renewal/{}.conf {dry}be retired",
                    a.name,
                    a.method,
                    a.meta.key_type,
                    if a.meta.reuse_key { " (reused)" } else { "" },
                    a.meta.acme,
                    if a.meta.deploy.is_empty() {
                        String::new()
                    } else {
                        format!(", deployed to {}", a.meta.deploy.join(", "))
                    },
                    a.name
                ),
            );
        }
        for a in &self.adoptions {
            if a.meta.webroot.is_none() && a.meta.challenge.is_empty() {
                ctx.log(
                    LogLevel::Warn,
                    format!(
                        "{}: renewals answer HTTP-01 with statelyd's responder: /.well-known/acme-challenge/ must reach it (stately haproxy edit TARGET --route-acme FRONTEND); each renewal checks that first",
                        a.name
                    ),
                );
            }
        }
        let root = ctx.config().cert_root();
        if crate::fsops::canonical_prefix(&root) == Path::new("/etc/letsencrypt") {
            for t in certbot::timers() {
                ctx.log(
                    LogLevel::Warn,
                    format!(
                        "certbot's timer {} runs `certbot renew` here; it leaves adopted lineages alone once their renewal configs are retired, and renews any lineage not adopted",
                        t.display()
                    ),
                );
            }
        }
        if self.spec.dry_run {
            ctx.log(LogLevel::Info, "dry run: nothing was changed");
        }
        Ok(())
    }

    async fn repair(&mut self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        let root = ctx.config().cert_root();
        let mut work = Vec::new();
        for a in &self.adoptions {
            work.push((a.name.clone(), a.repair.clone(), a.previous.clone()));
            if let Some(m) = &a.merge {
                work.push((m.side.clone(), m.repair.clone(), m.previous.clone()));
            }
        }
        for (name, set, gone) in work {
            let l = Lineage::new(&root, &name);
            for (f, target) in set {
                relink(ctx, &l.live_file(&f), &target).await?;
                ctx.log(LogLevel::Info, format!("{name}: live/{f}.pem → {}", target.display()));
            }
            for p in gone {
                let target = std::fs::read_link(&p)
                    .map_err(|e| StepError::Failed(format!("{}: {e}", p.display())))?;
                ctx.record_undo(UndoEntry::RestoreLink { path: p.clone(), target }).await?;
                remove(&p).await?;
            }
        }
        Ok(())
    }

    async fn merge(&mut self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        let places = ctx.config().cert_places();
        for a in self.adoptions.clone() {
            let Some(m) = &a.merge else { continue };
            let base = Lineage::new(&places.root, &a.name);
            let side = Lineage::new(&places.root, &m.side);
            let mut next = base.versions().last().copied().unwrap_or(0);
            let mut live = None;
            for v in &m.versions {
                next += 1;
                for f in FILES {
                    let from = side.archive_file(f, *v);
                    let to = base.archive_file(f, next);
                    let (bytes, mode, owner) = {
                        use std::os::unix::fs::MetadataExt;
                        let meta = std::fs::metadata(&from)
                            .map_err(|e| StepError::Failed(format!("{}: {e}", from.display())))?;
                        let bytes = std::fs::read(&from)
                            .map_err(|e| StepError::Failed(format!("{}: {e}", from.display())))?;
                        (bytes, meta.mode() & 0o7777, Some((meta.uid(), meta.gid())))
                    };
                    if std::fs::symlink_metadata(&to).is_ok() {
                        return Err(StepError::Failed(format!("{} exists already", to.display())));
                    }
                    ctx.record_undo(UndoEntry::RemoveFile { path: to.clone() }).await?;
                    write_owned(&to, &bytes, mode, owner).await?;
                }
                if *v == m.current {
                    live = Some(next);
                }
                ctx.log(
                    LogLevel::Info,
                    format!("{}: version {v} of {} is version {next} of {}", a.name, m.side, a.name),
                );
            }
            let live = live.ok_or_else(|| {
                StepError::Failed(format!("{}: its live version is not in its archive", m.side))
            })?;
            for f in FILES {
                relink(ctx, &base.live_file(f), &base.link_target(f, live)).await?;
            }
            ctx.log(LogLevel::Info, format!("{}: live/ → version {live}", a.name));
            let side_name = m.side.clone();
            let p = places.clone();
            let retire = tokio::task::spawn_blocking(move || items(&p, &side_name))
                .await
                .map_err(StepError::failed)?
                .map_err(|e| StepError::Failed(e.to_string()))?;
            remove_items(ctx, &retire).await?;
            let n = retire.iter().filter(|i| !matches!(i, Item::Dir(_))).count();
            ctx.log(
                LogLevel::Info,
                format!("{}: retired ({n} files and links, its renewal config among them)", m.side),
            );
        }
        Ok(())
    }

    async fn take_over(&mut self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        let places = ctx.config().cert_places();
        // How each target gets the certificates is decided once, its undo recorded first, so
        // that unwinding redeploys last, after the files are back.
        self.deploy.clear();
        for t in self.spec.deploy.clone() {
            let h = ctx
                .config()
                .haproxy
                .iter()
                .find(|h| h.name == t)
                .cloned()
                .ok_or_else(|| StepError::Failed(format!("HAProxy target '{t}' is gone")))?;
            let mut hows: Vec<UndoEntry> = Vec::new();
            for a in &self.adoptions {
                let bundle = places.bundles.join(format!("{}.pem", a.name));
                let how = deploy_how(&h, &bundle)
                    .await
                    .map_err(StepError::Precondition)?;
                // One reload serves every bundle.
                if matches!(how, UndoEntry::HotSwapCert { .. }) || !hows.contains(&how) {
                    hows.push(how);
                }
            }
            if hows.iter().any(|h| !matches!(h, UndoEntry::HotSwapCert { .. })) {
                hows.retain(|h| !matches!(h, UndoEntry::HotSwapCert { .. }));
            }
            for how in hows {
                ctx.record_undo(how.clone()).await?;
                self.deploy.push((t.clone(), how));
            }
        }
        // A bundle directory made here goes with a cancel or a rollback too.
        if std::fs::symlink_metadata(&places.bundles).is_err() {
            ctx.record_undo(UndoEntry::RemoveEmptyDir {
                path: places.bundles.clone(),
            })
            .await?;
        }
        for a in self.adoptions.clone() {
            let l = Lineage::new(&places.root, &a.name);
            // stately's record of how to renew it.
            let meta_path = crate::certs::meta_file(&places.data_dir, &a.name);
            let undo = ctx.snapshot(&meta_path).await?;
            ctx.record_undo(undo).await?;
            let json = serde_json::to_vec_pretty(&a.meta).unwrap_or_default();
            write_owned(&meta_path, &json, 0o600, None).await?;
            // The HAProxy bundle: fullchain and key of the live version.
            let fullchain = std::fs::read(l.live_file("fullchain"))
                .map_err(|e| StepError::Failed(format!("{}: {e}", l.live_file("fullchain").display())))?;
            let key = std::fs::read(l.live_file("privkey"))
                .map_err(|e| StepError::Failed(format!("{}: {e}", l.live_file("privkey").display())))?;
            let bundle = places.bundles.join(format!("{}.pem", a.name));
            let undo = ctx.snapshot(&bundle).await?;
            let (mode, owner) = match &undo {
                UndoEntry::RestoreFile { mode, uid, gid, .. } => (*mode, Some((*uid, *gid))),
                _ => (0o600, None),
            };
            ctx.record_undo(undo).await?;
            let mut b = fullchain;
            if !b.ends_with(b"\n") {
                b.push(b'\n');
            }
            b.extend_from_slice(&key);
            write_owned(&bundle, &b, mode, owner).await?;
            // certbot renews it no more.
            let conf = certbot::renewal_file(&places.root, &a.name);
            if std::fs::symlink_metadata(&conf).is_ok() {
                let undo = ctx.snapshot(&conf).await?;
                ctx.record_undo(undo).await?;
                remove(&conf).await?;
            }
            ctx.log(
                LogLevel::Info,
                format!(
                    "{}: adopted; stately renews it by {} (certbot's renewal config retired; stately jobs rollback puts it back)",
                    a.name, a.method
                ),
            );
        }
        Ok(())
    }

    async fn deploy(&mut self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        for (target, how) in self.deploy.clone() {
            let mut lines = Vec::new();
            let r = how.apply(ctx.blobs(), |_, l| lines.push(l)).await;
            for l in lines {
                ctx.log(LogLevel::Info, l);
            }
            r.map_err(|e| StepError::Failed(format!("deploying to '{target}': {e}")))?;
            ctx.log(LogLevel::Info, format!("'{target}': {}", how.describe()));
        }
        Ok(())
    }
}

/// Points a link elsewhere by rename, its old target recorded first.
async fn relink(ctx: &mut StepCtx<'_>, link: &Path, target: &Path) -> Result<(), StepError> {
    let undo = ctx.snapshot(link).await?;
    ctx.record_undo(undo).await?;
    let (t, l) = (target.to_owned(), link.to_owned());
    tokio::task::spawn_blocking(move || crate::fsops::symlink_atomic(&t, &l))
        .await
        .map_err(StepError::failed)?
        .map_err(|e| StepError::Failed(format!("{}: {e}", link.display())))
}

async fn remove(p: &Path) -> Result<(), StepError> {
    let path = p.to_owned();
    tokio::task::spawn_blocking(move || crate::fsops::remove_if_present(&path))
        .await
        .map_err(StepError::failed)?
        .map_err(|e| StepError::Failed(format!("{}: {e}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_lineages_are_named_for_their_base() {
        assert_eq!(base_of("example.com-0001"), Some("example.com"));
        assert_eq!(base_of("example.com-12"), None);
        assert_eq!(base_of("example.com"), None);
        assert_eq!(base_of("-0001"), None);
    }
}
