//! `stately.v1.Haproxy`: targets, live configurations and dry-run validation, converted to and
//! from `pb`. The work is in `crate::haproxy`.

use crate::auth::require;
use crate::config::Role;
use crate::haproxy::edits::{self, Edit, EditError, Proof};
use crate::haproxy::{Level, Targets};
use crate::pb;
use tonic::{Request, Response, Status};

/// The `stately.v1.Haproxy` service.
#[derive(Debug, Clone)]
pub(crate) struct HaproxyApi {
    /// Whose configuration of now names the targets (a reload may change them).
    pub(crate) engine: crate::engine::Engine,
}

impl HaproxyApi {
    fn targets(&self) -> Targets {
        let config = self.engine.config();
        Targets::new(&config.haproxy, config.bundle_dir())
    }

    /// What structured edits of `target` need of the daemon (bundle directory, responder,
    /// log stream).
    fn edits_context(&self, target: &str) -> edits::Context {
        let config = self.engine.config();
        edits::Context {
            bundle_dir: config.bundle_dir(),
            responder: config.certificates.responder,
            replace: false,
            log_stream: config
                .haproxy
                .iter()
                .find(|t| t.name == target)
                .and_then(|t| t.log_address()),
        }
    }
}

fn some(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn nonzero(n: u32) -> Result<Option<u16>, Status> {
    match n {
        0 => Ok(None),
        n => u16::try_from(n)
            .map(Some)
            .map_err(|_| Status::invalid_argument(format!("{n} is not an HTTP status code"))),
    }
}

/// Edits from the wire; empty strings and zeros mean "the default".
pub(super) fn edits_from_pb(edits: Vec<pb::HaproxyEdit>) -> Result<Vec<Edit>, Status> {
    use pb::haproxy_edit::Op;
    if edits.len() > edits::MAX_EDITS {
        return Err(Status::invalid_argument(format!(
            "{} edits in one job; at most {}",
            edits.len(),
            edits::MAX_EDITS
        )));
    }
    edits
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            Ok(match e.op {
                Some(Op::ForceHttps(f)) => Edit::ForceHttps {
                    frontend: f.frontend,
                    host: some(f.host),
                    code: nonzero(f.code)?,
                    exempt_acme: f.no_acme_exemption.then_some(false),
                },
                Some(Op::HttpsFrontend(h)) => Edit::HttpsFrontend {
                    frontend: h.frontend,
                    bind: some(h.bind),
                    crt: some(h.crt).map(Into::into),
                    alpn: some(h.alpn),
                    backend: some(h.backend),
                },
                Some(Op::StickySessions(st)) => Edit::StickySessions {
                    backend: st.backend,
                    cookie: some(st.cookie),
                },
                Some(Op::RestrictPath(r)) => Edit::RestrictPath {
                    frontend: r.frontend,
                    path: r.path,
                    allow: r.allow,
                    status: nonzero(r.status)?,
                },
                Some(Op::HealthCheck(h)) => Edit::HealthCheck {
                    backend: h.backend,
                    method: some(h.method),
                    uri: some(h.uri),
                    host: some(h.host),
                    expect_status: nonzero(h.expect_status)?,
                },
                Some(Op::RouteAcme(r)) => Edit::RouteAcme {
                    frontend: r.frontend,
                    responder: some(r.responder),
                },
                Some(Op::LogStream(l)) => Edit::LogStream {
                    defaults: some(l.defaults),
                },
                Some(Op::AddServer(a)) => Edit::AddServer {
                    backend: a.backend,
                    name: a.name,
                    address: a.address,
                    options: a.options,
                },
                Some(Op::RemoveServer(r)) => Edit::RemoveServer {
                    backend: r.backend,
                    name: r.name,
                },
                Some(Op::SetLine(l)) => Edit::SetLine {
                    section: l.section,
                    line: l.line,
                    key: some(l.key),
                },
                Some(Op::RemoveLine(l)) => Edit::RemoveLine {
                    section: l.section,
                    line: l.line,
                },
                None => {
                    return Err(Status::invalid_argument(format!(
                        "edits[{i}] sets no operation (e.g. force_https)"
                    )));
                }
            })
        })
        .collect()
}

/// Edits for the wire.
pub(super) fn edits_to_pb(edits: &[Edit]) -> Vec<pb::HaproxyEdit> {
    edits.iter().map(pb::HaproxyEdit::from).collect()
}

/// An edit for the wire (the CLI builds edits as [`Edit`]s and sends them so).
impl From<&Edit> for pb::HaproxyEdit {
    fn from(e: &Edit) -> pb::HaproxyEdit {
        use pb::haproxy_edit::Op;
        let s = |o: &Option<String>| o.clone().unwrap_or_default();
        let n = |o: &Option<u16>| o.map_or(0, u32::from);
        pb::HaproxyEdit {
            op: Some(match e {
                Edit::ForceHttps {
                    frontend,
                    host,
                    code,
                    exempt_acme,
                } => Op::ForceHttps(pb::ForceHttpsEdit {
                    frontend: frontend.clone(),
                    host: s(host),
                    code: n(code),
                    no_acme_exemption: *exempt_acme == Some(false),
                }),
                Edit::HttpsFrontend {
                    frontend,
                    bind,
                    crt,
                    alpn,
                    backend,
                } => Op::HttpsFrontend(pb::HttpsFrontendEdit {
                    frontend: frontend.clone(),
                    bind: s(bind),
                    crt: crt
                        .as_ref()
                        .map(|c| c.display().to_string())
                        .unwrap_or_default(),
                    alpn: s(alpn),
                    backend: s(backend),
                }),
                Edit::StickySessions { backend, cookie } => {
                    Op::StickySessions(pb::StickySessionsEdit {
                        backend: backend.clone(),
                        cookie: s(cookie),
                    })
                }
                Edit::RestrictPath {
                    frontend,
                    path,
                    allow,
                    status,
                } => Op::RestrictPath(pb::RestrictPathEdit {
                    frontend: frontend.clone(),
                    path: path.clone(),
                    allow: allow.clone(),
                    status: n(status),
                }),
                Edit::HealthCheck {
                    backend,
                    method,
                    uri,
                    host,
                    expect_status,
                } => Op::HealthCheck(pb::HealthCheckEdit {
                    backend: backend.clone(),
                    method: s(method),
                    uri: s(uri),
                    host: s(host),
                    expect_status: n(expect_status),
                }),
                Edit::RouteAcme {
                    frontend,
                    responder,
                } => Op::RouteAcme(pb::RouteAcmeEdit {
                    frontend: frontend.clone(),
                    responder: s(responder),
                }),
                Edit::LogStream { defaults } => Op::LogStream(pb::LogStreamEdit {
                    defaults: s(defaults),
                }),
                Edit::AddServer {
                    backend,
                    name,
                    address,
                    options,
                } => Op::AddServer(pb::AddServerEdit {
                    backend: backend.clone(),
                    name: name.clone(),
                    address: address.clone(),
                    options: options.clone(),
                }),
                Edit::RemoveServer { backend, name } => Op::RemoveServer(pb::RemoveServerEdit {
                    backend: backend.clone(),
                    name: name.clone(),
                }),
                Edit::SetLine { section, line, key } => Op::SetLine(pb::SetLineEdit {
                    section: section.clone(),
                    line: line.clone(),
                    key: s(key),
                }),
                Edit::RemoveLine { section, line } => Op::RemoveLine(pb::RemoveLineEdit {
                    section: section.clone(),
                    line: line.clone(),
                }),
            }),
        }
    }
}

/// A check the job makes after the reload, in words.
fn proof_words(p: &Proof) -> String {
    match p {
        Proof::Redirect { addr, host, code } => {
            format!("GET http://{addr}/ with Host {host} answers {code} to https://")
        }
        Proof::Tls { addr } => format!("TLS is served on {addr}"),
        Proof::Denied {
            addr,
            path,
            status,
            from,
        } => format!("GET http://{addr}{path} from {from} answers {status}"),
        Proof::BackendUp { backend } => format!("every server of backend {backend} is UP"),
        Proof::ServerPresent { backend, server } => format!("{backend}/{server} is UP"),
        Proof::ServerGone { backend, server } => format!("{backend}/{server} is gone"),
        Proof::AcmeRoute { addr } => {
            format!("a challenge request through {addr} reaches statelyd's responder")
        }
    }
}

fn edit_status(e: EditError) -> Status {
    match e {
        EditError::Invalid(m) => super::status(tonic::Code::InvalidArgument, m),
        EditError::NotFound(m) => super::status(tonic::Code::NotFound, m),
        EditError::Conflict(m) => super::status(tonic::Code::FailedPrecondition, m),
    }
}

#[tonic::async_trait]
impl pb::haproxy_server::Haproxy for HaproxyApi {
    async fn list_targets(
        &self,
        req: Request<pb::ListTargetsRequest>,
    ) -> Result<Response<pb::ListTargetsResponse>, Status> {
        require(&req, Role::Viewer, "ListTargets")?;
        let targets = self
            .targets()
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
        let live = self.targets().live(&target).await?;
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
        let v = self.targets().validate(&r.target, &r.text).await?;
        Ok(Response::new(pb::ValidationResult {
            valid: v.valid,
            version: v.version,
            diagnostics: v.diagnostics.into_iter().map(diagnostic).collect(),
        }))
    }

    async fn preview_edits(
        &self,
        req: Request<pb::PreviewEditsRequest>,
    ) -> Result<Response<pb::EditPreview>, Status> {
        require(&req, Role::Operator, "PreviewEdits")?;
        let r = req.into_inner();
        super::required_target(&r.target)?;
        let list = edits_from_pb(r.edits)?;
        edits::check(&list).map_err(edit_status)?;
        let live = self.targets().live(&r.target).await?;
        if !r.base_version.is_empty() && r.base_version != live.version {
            return Err(Status::failed_precondition(format!(
                "the live configuration of '{}' is now {}, not {}",
                r.target, live.version, r.base_version
            )));
        }
        let cx = edits::Context {
            replace: r.replace,
            ..self.edits_context(&r.target)
        };
        let out = edits::apply_blocking(live.text.clone(), list.clone(), cx)
            .await
            .map_err(edit_status)?;
        let changed = out.text != live.text;
        let mut preview = pb::EditPreview {
            changed,
            current_version: live.version.clone(),
            version: live.version.clone(),
            valid: true,
            notes: out.notes.clone(),
            unproven: out.unproven.clone(),
            ..Default::default()
        };
        if changed {
            self.targets()
                .check_policy_of_changes(&r.target, &out.text, &live.text)?;
            let v = self.targets().validate(&r.target, &out.text).await?;
            preview.diff = similar::TextDiff::from_lines(&live.text, &out.text)
                .unified_diff()
                .context_radius(3)
                .header(
                    &format!("{} {}", r.target, live.version),
                    &format!("{} {}", r.target, v.version),
                )
                .to_string();
            preview.version = v.version;
            preview.valid = v.valid;
            preview.diagnostics = v.diagnostics.into_iter().map(diagnostic).collect();
            let has_stats = self
                .targets()
                .get(&r.target)
                .is_ok_and(|t| t.stats_socket.is_some());
            preview.goes_live_by = match edits::runtime_changes(&live.text, &list) {
                Ok(_) if has_stats => "runtime".into(),
                Ok(_) => {
                    preview
                        .notes
                        .push("the target has no stats_socket, so servers change by reload".into());
                    "reload".into()
                }
                Err(why) => {
                    if list
                        .iter()
                        .all(|e| matches!(e, Edit::AddServer { .. } | Edit::RemoveServer { .. }))
                    {
                        preview.notes.push(format!("goes live by reload: {why}"));
                    }
                    "reload".into()
                }
            };
            preview.checks = out.proofs.iter().map(proof_words).collect();
        }
        Ok(Response::new(preview))
    }
}

fn diagnostic(d: crate::haproxy::Diagnostic) -> pb::Diagnostic {
    pb::Diagnostic {
        level: match d.level {
            Level::Alert => pb::diagnostic::Level::Alert,
            Level::Warning => pb::diagnostic::Level::Warning,
        } as i32,
        line: d.line,
        message: d.message,
        source: d.source.unwrap_or_default(),
    }
}
