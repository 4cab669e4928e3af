//! The `certificate_revoke` kind: certbot's `revoke`. It asks the ACME server that issued a
//! lineage's live certificate to revoke it. That cannot be undone — no CA un-revokes — so the
//! step says so in its name, the job records no undo, and a rollback of it is refused with
//! that reason (see the rollback kind). The lineage stays; a renewal replaces the revoked
//! certificate, `certificate_delete` removes it.

use super::{Executor, Moment, Planned, StepFuture};
use crate::certs::acme;
use crate::config::AcmeServer;
use crate::job::LogLevel;
use crate::step::{Env, Error, StepCtx, StepError};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Revoke a lineage's live certificate at its CA.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// The lineage's name.
    pub lineage: String,
    /// RFC 5280's reason: unspecified, keycompromise, affiliationchanged, superseded,
    /// cessationofoperation (certbot's names).
    pub reason: String,
}

/// The reasons a subscriber may give (RFC 8555 §7.6 allows these to an account holder).
pub const REASONS: [&str; 5] = [
    "unspecified",
    "keycompromise",
    "affiliationchanged",
    "superseded",
    "cessationofoperation",
];

fn reason(name: &str) -> Option<instant_acme::RevocationReason> {
    use instant_acme::RevocationReason as R;
    Some(match name {
        "unspecified" => R::Unspecified,
        "keycompromise" => R::KeyCompromise,
        "affiliationchanged" => R::AffiliationChanged,
        "superseded" => R::Superseded,
        "cessationofoperation" => R::CessationOfOperation,
        _ => return None,
    })
}

/// How long the CA gets to answer the revocation.
const REVOKE_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// Why a rollback of a revocation is refused.
pub(crate) const IRREVERSIBLE: &str = "a revocation cannot be undone: the CA will not take it back. Issue a new certificate instead (stately cert renew, or cert issue)";

/// Checks the lineage has a live certificate and knows (or defaults) its ACME server.
pub(crate) async fn plan(spec: &Spec, env: &Env, _at: Moment) -> Result<Planned, Error> {
    let name = &spec.lineage;
    if !crate::fsops::is_safe_name(name) {
        return Err(Error::InvalidArgument(format!(
            "{} is not a lineage name (letters, digits, '.', '_', '-')",
            crate::quote::quote(name)
        )));
    }
    if reason(&spec.reason).is_none() {
        return Err(Error::InvalidArgument(format!(
            "reason {}: one of {}",
            crate::quote::quote(&spec.reason),
            REASONS.join(", ")
        )));
    }
    let config = &env.config;
    let listed = crate::certs::get(&config.cert_places(), name).ok_or_else(|| {
        Error::NotFound(format!(
            "no certificate lineage '{name}' under {}",
            config.cert_root().display()
        ))
    })?;
    let acme_name = listed
        .meta
        .as_ref()
        .map(|m| m.acme.clone())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| config.certificates.default_acme.clone());
    let server = config.acme_server(&acme_name).ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "lineage '{name}' was issued by ACME server '{acme_name}', which the configuration no longer has"
        ))
    })?;
    let steps = vec![
        format!("read the live certificate of '{name}'"),
        format!("revoke it at {acme_name} (cannot be undone)"),
    ];
    Ok(Planned {
        steps,
        resources: vec![format!("cert:{name}")],
        executor: Box::new(Revoke {
            cert: listed.lineage.live_file("cert"),
            server,
            data_dir: config.data_dir.clone(),
            spec: spec.clone(),
            der: None,
        }),
    })
}

#[derive(Debug)]
struct Revoke {
    cert: PathBuf,
    server: AcmeServer,
    data_dir: PathBuf,
    spec: Spec,
    der: Option<Vec<u8>>,
}

impl Executor for Revoke {
    fn run_step<'a>(&'a mut self, index: usize, ctx: &'a mut StepCtx<'_>) -> StepFuture<'a> {
        Box::pin(async move {
            match index {
                0 => self.read(ctx).await,
                1 => self.revoke(ctx).await,
                _ => Err(StepError::Failed(format!("no step {index}"))),
            }
        })
    }
}

impl Revoke {
    async fn read(&mut self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let pem = tokio::fs::read(&self.cert)
            .await
            .map_err(|e| StepError::Failed(format!("{}: {e}", self.cert.display())))?;
        let info = crate::certs::lineage::read_cert(&pem).map_err(StepError::Failed)?;
        let der = CertificateDer::from_pem_slice(&pem)
            .map_err(|e| StepError::Failed(format!("{}: {e}", self.cert.display())))?;
        ctx.log(
            LogLevel::Info,
            format!(
                "serial {} for {}, valid until {}",
                info.serial,
                info.names.join(", "),
                jiff::Timestamp::from_second(info.not_after)
                    .map(|t| t.to_string())
                    .unwrap_or_default()
            ),
        );
        self.der = Some(der.to_vec());
        Ok(())
    }

    async fn revoke(&mut self, ctx: &mut StepCtx<'_>) -> Result<(), StepError> {
        let der = self
            .der
            .clone()
            .ok_or_else(|| StepError::Failed("the certificate was not read".into()))?;
        // Only the account that issued it (or holds authorizations for its names) may revoke:
        // a new registration could not, so none is made here.
        if !acme::account_file(&self.data_dir, &self.server).exists() {
            return Err(StepError::Precondition(format!(
                "statelyd has no account at {}: a certificate another client issued is revoked with that client (certbot revoke)",
                self.server.directory
            )));
        }
        let (account, _) = ctx
            .until_cancel(acme::account(&self.data_dir, &self.server, false))
            .await?
            .map_err(StepError::Failed)?;
        let certificate = rustls::pki_types::CertificateDer::from(der);
        ctx.log(
            LogLevel::Info,
            format!("asking {} to revoke it", self.server.directory),
        );
        // Past this point the request may have reached the CA: no cancel interrupts it, and a
        // CA that does not answer leaves the outcome unknown, said as such.
        let sent = tokio::time::timeout(
            REVOKE_WITHIN,
            account.revoke(&instant_acme::RevocationRequest {
                certificate: &certificate,
                reason: reason(&self.spec.reason),
            }),
        )
        .await;
        match sent {
            Err(_) => {
                return Err(StepError::Failed(format!(
                    "{} did not answer within {}s: whether it revoked the certificate is unknown (stately cert revoke again: a revoked one is reported as such)",
                    self.server.directory,
                    REVOKE_WITHIN.as_secs()
                )));
            }
            Ok(Err(instant_acme::Error::Api(p)))
                if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:alreadyRevoked") =>
            {
                ctx.log(LogLevel::Info, "the CA says it was already revoked");
            }
            Ok(Err(e)) => return Err(StepError::Failed(acme::describe(&e))),
            Ok(Ok(())) => {}
        }
        ctx.done_irreversibly();
        ctx.log(
            LogLevel::Warn,
            format!(
                "revoked ({}); lineage '{}' still holds the revoked certificate: renew it (stately cert renew {}) or delete it (stately cert delete {})",
                self.spec.reason, self.spec.lineage, self.spec.lineage, self.spec.lineage
            ),
        );
        Ok(())
    }
}
