//! `stately.v1.Haproxy`: targets, live configurations and dry-run validation, converted to and
//! from `pb`. The work is in `crate::haproxy`.

use crate::auth::require;
use crate::config::Role;
use crate::haproxy::{Level, Targets};
use crate::pb;
use tonic::{Request, Response, Status};

/// The `stately.v1.Haproxy` service.
#[derive(Debug, Clone)]
pub(crate) struct HaproxyApi {
    pub(crate) targets: Targets,
}

#[tonic::async_trait]
impl pb::haproxy_server::Haproxy for HaproxyApi {
    async fn list_targets(
        &self,
        req: Request<pb::ListTargetsRequest>,
    ) -> Result<Response<pb::ListTargetsResponse>, Status> {
        require(&req, Role::Viewer, "ListTargets")?;
        let targets = self
            .targets
            .all()
            .iter()
            .map(|t| pb::HaproxyTarget {
                name: t.name.clone(),
                has_config: t.config.is_some(),
                has_stats: t.stats_socket.is_some(),
            })
            .collect();
        Ok(Response::new(pb::ListTargetsResponse { targets }))
    }

    async fn get_config(
        &self,
        req: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::HaproxyConfig>, Status> {
        require(&req, Role::Viewer, "GetConfig")?;
        let target = req.into_inner().target;
        super::required_target(&target)?;
        let live = self.targets.live(&target).await?;
        Ok(Response::new(pb::HaproxyConfig {
            target,
            text: live.text,
            version: live.version,
        }))
    }

    async fn validate_config(
        &self,
        req: Request<pb::ValidateConfigRequest>,
    ) -> Result<Response<pb::ValidationResult>, Status> {
        require(&req, Role::Operator, "ValidateConfig")?;
        let r = req.into_inner();
        super::required_target(&r.target)?;
        if r.text.trim().is_empty() {
            return Err(Status::invalid_argument(
                "text (the whole candidate configuration) is required",
            ));
        }
        let v = self.targets.validate(&r.target, &r.text).await?;
        Ok(Response::new(pb::ValidationResult {
            valid: v.valid,
            version: v.version,
            diagnostics: v
                .diagnostics
                .into_iter()
                .map(|d| pb::Diagnostic {
                    level: match d.level {
                        Level::Alert => pb::diagnostic::Level::Alert,
                        Level::Warning => pb::diagnostic::Level::Warning,
                    } as i32,
                    line: d.line,
                    message: d.message,
                    source: d.source.unwrap_or_default(),
                })
                .collect(),
        }))
    }
}
