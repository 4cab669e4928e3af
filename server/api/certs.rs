//! `stately.v1.Certificates`: lineages read from disk, and renewal as a job.

use crate::auth::require;
use crate::certs::{self, Listed};
use crate::config::Role;
use crate::engine::{Engine, Submission};
use crate::pb;
use tonic::{Request, Response, Status};

/// How long before expiry the daemon renews, if it renews by itself.
fn renew_before(config: &crate::config::Config) -> Option<std::time::Duration> {
    (!config.certificates.renew_check.is_zero()).then_some(config.certificates.renew_before)
}

/// The `stately.v1.Certificates` service.
#[derive(Debug, Clone)]
pub(crate) struct CertsApi {
    pub(crate) engine: Engine,
}

fn to_pb(l: &Listed, renew_before: Option<std::time::Duration>) -> pb::Certificate {
    let renews = renew_before.is_some();
    let now = crate::job::now_ms() / 1000;
    let path = |f: &str| l.lineage.live_file(f).display().to_string();
    pb::Certificate {
        name: l.name.clone(),
        names: l.info.names.clone(),
        not_before: Some(prost_types::Timestamp {
            seconds: l.info.not_before,
            nanos: 0,
        }),
        not_after: Some(prost_types::Timestamp {
            seconds: l.info.not_after,
            nanos: 0,
        }),
        days_left: (l.info.not_after - now).div_euclid(86400),
        serial: l.info.serial.clone(),
        issuer: l.info.issuer.clone(),
        key_type: l.info.key_type.clone(),
        version: l.version,
        versions: l.versions.clone(),
        cert_path: path("cert"),
        chain_path: path("chain"),
        fullchain_path: path("fullchain"),
        privkey_path: path("privkey"),
        bundle_path: l
            .bundle
            .as_ref()
            .map(|b| b.display().to_string())
            .unwrap_or_default(),
        auto_renew: renews && l.meta.is_some(),
        acme_server: l.meta.as_ref().map(|m| m.acme.clone()).unwrap_or_default(),
        method: l
            .meta
            .as_ref()
            .map(|m| match &m.webroot {
                _ if m.challenge == crate::kinds::certificate_issue::DNS_01 => "dns-01".into(),
                Some(w) => format!("webroot {}", w.display()),
                None => "responder".into(),
            })
            .unwrap_or_default(),
        deploy: l
            .meta
            .as_ref()
            .map(|m| m.deploy.clone())
            .unwrap_or_default(),
        next_renewal: renew_before
            .filter(|_| l.meta.is_some())
            .map(|b| prost_types::Timestamp {
                seconds: l.info.not_after - b.as_secs() as i64,
                nanos: 0,
            }),
        issued_by_job: String::new(),
    }
}

#[tonic::async_trait]
impl pb::certificates_server::Certificates for CertsApi {
    async fn list_certificates(
        &self,
        req: Request<pb::ListCertificatesRequest>,
    ) -> Result<Response<pb::ListCertificatesResponse>, Status> {
        require(&req, Role::Viewer, "ListCertificates")?;
        let config = self.engine.config();
        let renews = renew_before(&config);
        let all = tokio::task::spawn_blocking(move || certs::list(&config.cert_places()))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ListCertificatesResponse {
            certificates: all.iter().map(|l| to_pb(l, renews)).collect(),
        }))
    }

    async fn get_certificate(
        &self,
        req: Request<pb::GetCertificateRequest>,
    ) -> Result<Response<pb::Certificate>, Status> {
        require(&req, Role::Viewer, "GetCertificate")?;
        let name = req.into_inner().name;
        if !crate::fsops::is_safe_name(&name) {
            return Err(Status::invalid_argument(format!(
                "{} is not a lineage name (letters, digits, '.', '_', '-')",
                crate::quote::quote(&name)
            )));
        }
        let config = self.engine.config();
        let renews = renew_before(&config);
        let n = name.clone();
        let found = tokio::task::spawn_blocking(move || certs::get(&config.cert_places(), &n))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        match found {
            Some(l) => {
                let mut c = to_pb(&l, renews);
                c.issued_by_job = self
                    .engine
                    .last_issue_of(&name)
                    .await?
                    .map(|id| id.to_string())
                    .unwrap_or_default();
                Ok(Response::new(c))
            }
            None => Err(Status::not_found(format!(
                "no certificate lineage '{name}' (stately cert list shows them)"
            ))),
        }
    }

    async fn renew_certificate(
        &self,
        req: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        require(&req, Role::Operator, "RenewCertificate")?;
        let by = crate::auth::caller_of(&req).map(|c| c.identity());
        let r = req.into_inner();
        if !crate::fsops::is_safe_name(&r.name) {
            return Err(Status::invalid_argument(format!(
                "{} is not a lineage name (letters, digits, '.', '_', '-')",
                crate::quote::quote(&r.name)
            )));
        }
        let spec = crate::kinds::certificate_issue::renewal(&self.engine.config(), &r.name)?;
        let job = self
            .engine
            .submit(Submission {
                spec,
                request_id: Some(r.request_id).filter(|s| !s.is_empty()),
                labels: [("trigger".to_owned(), "renew".to_owned())].into(),
                submitted_by: by,
                node: None,
            })
            .await?;
        Ok(Response::new(super::jobs::job_to_pb(&job)))
    }
}
