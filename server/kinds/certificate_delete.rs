//! The `certificate_delete` kind: certbot's `delete`, reversibly. It removes a lineage — its
//! `live/` links, its `archive/` versions, how it was issued (so it is no longer renewed),
//! and its HAProxy bundle — each file backed up and its undo recorded before it goes, so a
//! rollback (or a cancel) puts the lineage back exactly as it was.

use super::{Executor, Moment, Planned, StepFuture};
use crate::job::LogLevel;
use crate::step::{Env, Error, StepCtx, StepError};
use crate::undo::UndoEntry;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Delete a certificate lineage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// The lineage's name.
    pub lineage: String,
}

const STEPS: [&str; 2] = [
    "check what uses the lineage",
    "remove the lineage (backed up for rollback)",
];

/// What goes, in the order it goes: links and the live directory's other files first, then
/// the archive, then the settings and the bundle.
#[derive(Debug, Clone)]
pub(crate) enum Item {
    Link(PathBuf),
    File(PathBuf),
    Dir(PathBuf),
}

pub(crate) fn items(places: &crate::certs::Places, name: &str) -> std::io::Result<Vec<Item>> {
    let l = crate::certs::lineage::Lineage::new(&places.root, name);
    let mut out = Vec::new();
    for dir in [l.live_dir(), l.archive_dir()] {
        // A lineage directory that is a link would take the delete outside the root.
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(std::io::Error::other(format!(
                    "{} is a symbolic link: stately deletes only a lineage whose directories are its own",
                    dir.display()
                )));
            }
            _ => {}
        }
        let mut entries: Vec<_> = match std::fs::read_dir(&dir) {
            Ok(d) => d.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        entries.sort();
        for p in entries {
            let m = std::fs::symlink_metadata(&p)?;
            if m.file_type().is_symlink() {
                out.push(Item::Link(p));
            } else if m.is_file() {
                out.push(Item::File(p));
            } else {
                return Err(std::io::Error::other(format!(
                    "{} is neither a file nor a link: the lineage is not one stately can delete",
                    p.display()
                )));
            }
        }
        out.push(Item::Dir(dir));
    }
    let meta = crate::certs::meta_file(&places.data_dir, name);
    let bundle = places.bundles.join(format!("{name}.pem"));
    let certbot_renewal = places.root.join("renewal").join(format!("{name}.conf"));
    for p in [meta, bundle, certbot_renewal] {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => out.push(Item::Link(p)),
            Ok(_) => out.push(Item::File(p)),
            Err(_) => {}
        }
    }
    Ok(out)
}

/// Checks the lineage exists; it holds the lineage (as an issue or a renewal would).
pub(crate) async fn plan(spec: &Spec, env: &Env, _at: Moment) -> Result<Planned, Error> {
    let name = &spec.lineage;
    if !crate::fsops::is_safe_name(name) {
        return Err(Error::InvalidArgument(format!(
            "{} is not a lineage name (letters, digits, '.', '_', '-')",
            crate::quote::quote(name)
        )));
    }
    let places = env.config.cert_places();
    let l = crate::certs::lineage::Lineage::new(&places.root, name);
    // Its directories, whatever state they are in (a live link left dangling by a half-done
    // update is a lineage to delete too).
    let there = |d: std::path::PathBuf| std::fs::symlink_metadata(d).is_ok();
    if !there(l.live_dir()) && !there(l.archive_dir()) {
        return Err(Error::NotFound(format!(
            "no certificate lineage '{name}' under {}",
            places.root.display()
        )));
    }
    Ok(Planned::new(
        &STEPS,
        vec![format!("cert:{name}")],
        Delete {
            spec: spec.clone(),
            items: Vec::new(),
        },
    ))
}

#[derive(Debug)]
struct Delete {
    spec: Spec,
    items: Vec<Item>,
}

impl Executor for Delete {
    fn run_step<'a>(&'a mut self, index: usize, ctx: &'a mut StepCtx<'_>) -> StepFuture<'a> {
        Box::pin(async move {
            match index {
                0 => self.check(ctx).await,
                1 => self.remove(ctx).await,
                _ => Err(StepError::Failed(format!("no step {index}"))),
            }
        })
    }
}

impl Delete {
    /// Lists what goes, and says what will notice: HAProxy targets that load the bundle keep
    /// serving it until their next reload, and one that names the file itself would fail it.
    async fn check(&mut self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        let name = self.spec.lineage.clone();
        let env_items = {
            let config = ctx.config();
            let places = config.cert_places();
            let bundle = places.bundles.join(format!("{name}.pem"));
            let mut named_by = Vec::new();
            let mut loads_dir = Vec::new();
            for t in &config.haproxy {
                let Some(cfg) = &t.config else { continue };
                let text = std::fs::read_to_string(cfg).unwrap_or_default();
                if text.contains(&bundle.display().to_string()) {
                    named_by.push(t.name.clone());
                } else if text.contains(&places.bundles.display().to_string()) {
                    loads_dir.push(t.name.clone());
                }
            }
            (named_by, loads_dir)
        };
        let (named_by, loads_dir) = env_items;
        if !named_by.is_empty() {
            return Err(StepError::Precondition(format!(
                "HAProxy target(s) {} name the bundle of '{name}' in their configuration: a reload would fail without it. Remove that `crt` first",
                named_by.join(", ")
            )));
        }
        for t in loads_dir {
            ctx.log(
                LogLevel::Warn,
                format!(
                    "HAProxy target '{t}' loads the bundle directory: it serves '{name}' until its next reload"
                ),
            );
        }
        let places = ctx.config().cert_places();
        self.items = tokio::task::spawn_blocking(move || items(&places, &name))
            .await
            .map_err(StepError::failed)?
            .map_err(|e| StepError::Failed(e.to_string()))?;
        let files = self
            .items
            .iter()
            .filter(|i| !matches!(i, Item::Dir(_)))
            .count();
        ctx.log(
            LogLevel::Info,
            format!("{files} files and links of '{}' go", self.spec.lineage),
        );
        Ok(())
    }

    /// Each file is backed up and its undo recorded before it is removed; directories come
    /// back with the files restored into them.
    async fn remove(&mut self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        remove_items(ctx, &self.items).await?;
        ctx.log(
            LogLevel::Info,
            format!(
                "lineage '{}' deleted; it is no longer renewed (stately jobs rollback puts it back)",
                self.spec.lineage
            ),
        );
        Ok(())
    }
}

/// Removes a lineage's files, links and directories ([`items`]), each file backed up and its
/// undo recorded before it goes; directories come back with the files restored into them.
pub(crate) async fn remove_items(ctx: &mut StepCtx<'_>, items: &[Item]) -> Result<(), StepError> {
    {
        // The directories' modes and owners first, so the unwind (newest first) puts them
        // back last, once the files restored into them have recreated them.
        for item in items {
            if let Item::Dir(d) = item {
                let undo = crate::undo::UndoEntry::snapshot_ownership(d)
                    .map_err(|e| StepError::Failed(format!("{}: {e}", d.display())))?;
                ctx.record_undo(undo).await?;
            }
        }
        for item in items.iter().cloned() {
            if ctx.is_cancelled() {
                return Err(StepError::Cancelled);
            }
            match item {
                Item::Link(p) => {
                    let target = std::fs::read_link(&p)
                        .map_err(|e| StepError::Failed(format!("{}: {e}", p.display())))?;
                    ctx.record_undo(UndoEntry::RestoreLink {
                        path: p.clone(),
                        target,
                    })
                    .await?;
                    remove_file(&p).await?;
                }
                Item::File(p) => {
                    let undo = ctx.snapshot(&p).await?;
                    ctx.record_undo(undo).await?;
                    remove_file(&p).await?;
                }
                Item::Dir(p) => match std::fs::remove_dir(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StepError::Failed(format!("{}: {e}", p.display()))),
                },
            }
        }
        Ok(())
    }
}

async fn remove_file(p: &std::path::Path) -> Result<(), StepError> {
    let path = p.to_owned();
    tokio::task::spawn_blocking(move || crate::fsops::remove_if_present(&path))
    .await
    .map_err(StepError::failed)?
    .map_err(|e| StepError::Failed(format!("{}: {e}", p.display())))
}
