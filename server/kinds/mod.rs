//! The kinds of job: one module each, owning its spec (the variant of [`JobSpec`] it wraps),
//! its planning and its steps. A kind plans at submission — so bad input is refused before
//! anything starts — and the same planning runs again when a job starts after a restart;
//! planning returns the steps, the resources and the [`Executor`] together.
//!
//! Adding a kind: a module with a `Spec` and an `async fn plan(&Spec, &Env, Moment)`, and its
//! line in the `kinds!` list below.

use crate::job::{JobId, JobRecord};
use crate::step::{Env, Error, StepCtx, StepError};
use crate::store::{self, StoredSpec, Write};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;

/// Declares every kind once: its module, its variant of [`JobSpec`] (the variant's name in
/// snake case is the module's name, the kind's name and its key in the stored JSON), its name
/// in [`JobSpec::KINDS`], and its arm in [`plan`] — so no kind can be half registered.
macro_rules! kinds {
    ($( $(#[$doc:meta])* $variant:ident($module:ident), )*) => {
        $( pub mod $module; )*

        /// What a job does: one variant per kind, each wrapping the spec its kind's module
        /// owns. Stored as JSON (`{"runbook": {...}}`): a variant's name and its spec's fields
        /// are the stored format, kept as they are.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum JobSpec {
            $( $(#[$doc])* $variant($module::Spec), )*
        }

        impl JobSpec {
            /// The kind's name: "runbook", "rollback".
            pub fn kind(&self) -> &'static str {
                match self {
                    $( JobSpec::$variant(_) => stringify!($module), )*
                }
            }

            /// Every kind's name.
            pub const KINDS: &'static [&'static str] = &[$( stringify!($module), )*];
        }

        /// Plans a spec against the daemon's configuration (and, at submission, the world),
        /// or says what is wrong with it.
        pub(crate) async fn plan(spec: &JobSpec, env: &Env, at: Moment) -> Result<Planned, Error> {
            match spec {
                $( JobSpec::$variant(s) => $module::plan(s, env, at).await, )*
            }
        }
    };
}

kinds! {
    /// Run a configured runbook.
    Runbook(runbook),
    /// Undo a finished job.
    Rollback(rollback),
    /// Replace a HAProxy target's configuration.
    HaproxyApply(haproxy_apply),
    /// Set a server's administrative state.
    HaproxyServerState(haproxy_server_state),
    /// Watch a target's stats and mail its transitions, until cancelled.
    AlertWatch(alert_watch),
    /// Issue or renew a certificate over ACME, install it, optionally deploy it.
    CertificateIssue(certificate_issue),
    /// Edit a HAProxy target's configuration with structured edits.
    HaproxyEdit(haproxy_edit),
    /// Revoke a lineage's live certificate at its CA (cannot be undone).
    CertificateRevoke(certificate_revoke),
    /// Delete a lineage, reversibly.
    CertificateDelete(certificate_delete),
    /// Take over certbot's lineages in place, reversibly.
    CertificateAdopt(certificate_adopt),
    /// A job of a kind this version does not know (read from a shared ledger; never submitted).
    Unknown(unknown),
}

impl JobSpec {
    /// Whether a job of this kind, found running after a restart, carries on instead of
    /// being unwound (long-lived watches).
    pub fn resumes(&self) -> bool {
        matches!(self, JobSpec::AlertWatch(_))
    }

    /// For a rollback, the job it undoes.
    pub fn rollback_of(&self) -> Option<JobId> {
        match self {
            JobSpec::Rollback(r) => Some(r.target),
            _ => None,
        }
    }
}

/// A job with its spec.
pub type Job = JobRecord<JobSpec>;

impl JobSpec {
    /// The spec as the store keeps it.
    pub(crate) fn stored(&self) -> StoredSpec {
        StoredSpec {
            kind: self.kind().to_owned(),
            json: serde_json::to_string(self).expect("specs serialize"),
            rollback_of: self.rollback_of(),
        }
    }

    /// A spec the store kept.
    pub(crate) fn from_stored(s: StoredSpec) -> Result<JobSpec, store::Error> {
        if !JobSpec::KINDS.contains(&s.kind.as_str()) || s.kind == "unknown" {
            // Another version's kind: shown as such, run by nobody here.
            return Ok(JobSpec::Unknown(unknown::Spec { kind: s.kind }));
        }
        serde_json::from_str(&s.json)
            .map_err(|e| store::Error::Corrupt(format!("job spec ({} job): {e}", s.kind)))
    }
}

/// A stored job, its spec read.
pub(crate) fn typed(r: JobRecord<StoredSpec>) -> Result<Job, store::Error> {
    r.map_spec(JobSpec::from_stored)
}

/// A step's run, boxed so every kind's executor fits one trait object.
pub(crate) type StepFuture<'a> = Pin<Box<dyn Future<Output = Result<(), StepError>> + Send + 'a>>;

/// A job's steps, ready to run: what a kind's planning builds.
///
/// The engine calls `run_step` for each planned step in order, on a fresh [`StepCtx`], and
/// skips the steps a restart finds done (only for kinds that resume). See [`crate::step`] for
/// what a step must do before it changes anything.
pub(crate) trait Executor: Send + std::fmt::Debug {
    /// Runs step `index` of the steps planned.
    fn run_step<'a>(&'a mut self, index: usize, ctx: &'a mut StepCtx<'_>) -> StepFuture<'a>;

    /// Writes to commit with the job's success.
    fn on_success(&self, _job: JobId) -> Vec<Write> {
        Vec::new()
    }
}

/// The step planned at `index`. The engine runs only planned steps, so a wrong index is a
/// bug — reported as a failed step, not a panic that would leave the job RUNNING.
pub(crate) fn step_at<S: Copy>(steps: &[S], index: usize) -> Result<S, StepError> {
    steps
        .get(index)
        .copied()
        .ok_or_else(|| StepError::Failed(format!("the job has no step {index}")))
}

/// What a job will do, known when it is planned.
#[derive(Debug)]
pub(crate) struct Planned {
    /// The steps' names, as the job record shows them.
    pub(crate) steps: Vec<String>,
    /// What the job holds while it runs (`haproxy:edge`, `cert:example.com`).
    pub(crate) resources: Vec<String>,
    /// Runs the steps.
    pub(crate) executor: Box<dyn Executor>,
}

impl Planned {
    /// A plan whose steps are `steps` (their names are the steps' `Display`).
    pub(crate) fn new<S: std::fmt::Display>(
        steps: &[S],
        resources: Vec<String>,
        executor: impl Executor + 'static,
    ) -> Planned {
        Planned {
            steps: steps.iter().map(|s| s.to_string()).collect(),
            resources,
            executor: Box::new(executor),
        }
    }
}

/// When a plan is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Moment {
    /// At submission: planning also asks the world what the job will need (HAProxy knows the
    /// server, SMTP takes mail), so a job that could not work is refused at once.
    Submission,
    /// When a job starts later (after waiting, or after a restart): planning checks the spec
    /// against the configuration of now; the steps meet the world themselves.
    Start,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Specs exactly as the store holds them (written by stately before the kinds owned their
    /// specs): each must load, and write back byte for byte.
    const STORED: &[&str] = &[
        r#"{"runbook":{"runbook":"motd","params":{"greeting":"hi"}}}"#,
        r#"{"rollback":{"target":"0190f6c2-7b1e-7c3a-9f00-2b8e4d1a5c77","force":false}}"#,
        r#"{"haproxy_apply":{"target":"edge","config":"global\n","base_version":"sha256:ab","allow_servers_down":true}}"#,
        r#"{"haproxy_server_state":{"target":"edge","backend":"app","server":"s1","state":"drain"}}"#,
        r#"{"alert_watch":{"target":"edge","to":["ops@example.com"],"rules":{"interval_ms":1000,"hold_ms":10000,"proxies":["app*"],"max_session_rate":5,"max_sessions_percent":null,"max_5xx":3}}}"#,
        r#"{"certificate_issue":{"lineage":"example.com","names":["example.com","www.example.com"],"webroot":"/var/www/html","key_type":"ec256","reuse_key":false,"deploy":["edge"],"acme":"","expand":true}}"#,
        r#"{"haproxy_edit":{"target":"edge","edits":[{"op":"force_https","frontend":"web","host":null,"code":301,"exempt_acme":null},{"op":"restrict_path","frontend":"web","path":"/admin","allow":["127.0.0.1"],"status":null}],"base_version":null,"replace":false,"allow_servers_down":false}}"#,
        r#"{"certificate_revoke":{"lineage":"example.com","reason":"superseded"}}"#,
        r#"{"certificate_delete":{"lineage":"example.com"}}"#,
        r#"{"certificate_adopt":{"lineages":["example.com"],"deploy":["edge"]}}"#,
    ];

    #[test]
    fn stored_specs_load_and_write_back_unchanged() {
        let mut kinds = Vec::new();
        for text in STORED {
            let spec: JobSpec = serde_json::from_str(text).expect(text);
            assert_eq!(serde_json::to_string(&spec).unwrap(), *text);
            kinds.push(spec.kind());
        }
        let submitted: Vec<&str> = JobSpec::KINDS
            .iter()
            .copied()
            .filter(|k| *k != "unknown")
            .collect();
        assert_eq!(kinds, submitted, "one stored spec per kind, in KINDS order");
    }

    /// A spec stored before `allow_servers_down` existed still loads.
    #[test]
    fn older_apply_spec_loads() {
        let spec: JobSpec = serde_json::from_str(
            r#"{"haproxy_apply":{"target":"edge","config":"x","base_version":null}}"#,
        )
        .unwrap();
        assert_eq!(spec.kind(), "haproxy_apply");
    }
}

/// Planning, kind by kind: what each refuses and what it plans, without a daemon.
#[cfg(test)]
mod planning {
    use super::*;
    use crate::config::Config;
    use crate::step::test_env;

    fn config(text: &str) -> Config {
        Config::parse(text, std::path::Path::new("test.toml")).expect("config")
    }

    fn refusal(r: Result<Planned, Error>) -> Error {
        match r {
            Ok(p) => panic!("planned {:?}, expected a refusal", p.steps),
            Err(e) => e,
        }
    }

    const RUNBOOK: &str = r#"
[[runbook]]
name = "motd"
roots = ["/tmp"]
params = { greeting = { default = "hi", pattern = "[a-z]+" } }
resources = ["motd:{greeting}"]
[[runbook.step]]
type = "check"
argv = ["true", "{greeting}"]
[[runbook.step]]
name = "write it"
type = "write_file"
path = "/tmp/motd-{greeting}"
content = "{greeting}"
"#;

    /// A kind a newer version stored reads as `unknown` with its name (listed, shown,
    /// watched), and is never planned here.
    #[tokio::test]
    async fn another_versions_kind_reads_as_unknown_and_is_not_planned() {
        let spec = JobSpec::from_stored(StoredSpec {
            kind: "from_the_future".into(),
            json: r#"{"from_the_future":{"x":1}}"#.into(),
            rollback_of: None,
        })
        .unwrap();
        assert_eq!(
            spec,
            JobSpec::Unknown(unknown::Spec {
                kind: "from_the_future".into()
            })
        );
        let (env, _dir) = test_env(config(RUNBOOK));
        let e = refusal(plan(&spec, &env, Moment::Submission).await).to_string();
        assert!(e.contains("does not know jobs of kind"), "{e}");
    }

    fn runbook(params: &[(&str, &str)]) -> JobSpec {
        JobSpec::Runbook(runbook::Spec {
            runbook: "motd".into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    #[tokio::test]
    async fn a_runbook_plans_its_steps_and_templated_resources() {
        let (env, _dir) = test_env(config(RUNBOOK));
        let p = plan(&runbook(&[("greeting", "hello")]), &env, Moment::Submission)
            .await
            .unwrap();
        assert_eq!(p.steps, ["check true hello", "write it"]);
        assert_eq!(p.resources, ["motd:hello"]);
    }

    #[tokio::test]
    async fn a_runbook_refuses_unknown_names_parameters_and_values() {
        let (env, _dir) = test_env(config(RUNBOOK));
        let unknown = JobSpec::Runbook(runbook::Spec {
            runbook: "nope".into(),
            params: Default::default(),
        });
        let e = refusal(plan(&unknown, &env, Moment::Submission).await);
        assert!(
            matches!(&e, Error::NotFound(m) if m.contains("(runbooks: motd)")),
            "{e:?}"
        );
        let e = refusal(plan(&runbook(&[("colour", "x")]), &env, Moment::Submission).await);
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        let e = refusal(plan(&runbook(&[("greeting", "HELLO")]), &env, Moment::Submission).await);
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    }

    const EDGE: &str = r#"
[[haproxy]]
name = "edge"
config = "/nonexistent/haproxy/haproxy.cfg"
master_socket = "/run/haproxy-master.sock"
[[haproxy]]
name = "bare"
stats_socket = "/run/haproxy.sock"
"#;

    fn apply(target: &str, text: &str) -> JobSpec {
        JobSpec::HaproxyApply(haproxy_apply::Spec {
            target: target.into(),
            config: text.into(),
            base_version: None,
            allow_servers_down: false,
        })
    }

    #[tokio::test]
    async fn an_apply_plans_five_steps_holding_its_target() {
        let (env, _dir) = test_env(config(EDGE));
        let p = plan(&apply("edge", "global\n"), &env, Moment::Submission)
            .await
            .unwrap();
        assert_eq!(
            p.steps,
            [
                "check the base version",
                "validate with haproxy -c",
                "swap the configuration",
                "reload",
                "verify"
            ]
        );
        assert_eq!(p.resources, ["haproxy:edge"]);
    }

    #[tokio::test]
    async fn an_apply_refuses_each_bad_input_with_its_own_code() {
        let (env, _dir) = test_env(config(EDGE));
        let at = Moment::Submission;
        let e = refusal(plan(&apply("nope", "global\n"), &env, at).await);
        assert!(
            matches!(e, Error::Haproxy(crate::haproxy::Error::UnknownTarget(_))),
            "{e:?}"
        );
        let e = refusal(plan(&apply("bare", "global\n"), &env, at).await);
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
        let e = refusal(plan(&apply("edge", "  \n"), &env, at).await);
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        let e = refusal(plan(&apply("edge", "global\0\n"), &env, at).await);
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        let huge = "#".repeat(crate::haproxy::MAX_CONFIG_BYTES + 1);
        let e = refusal(plan(&apply("edge", &huge), &env, at).await);
        assert!(matches!(e, Error::ResourceExhausted(_)), "{e:?}");
        let e = refusal(plan(&apply("edge", "global\n  lua-load /x.lua\n"), &env, at).await);
        assert!(
            matches!(e, Error::Haproxy(crate::haproxy::Error::Refused(_))),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn a_server_state_asks_haproxy_only_at_submission() {
        let (env, _dir) = test_env(config(EDGE));
        let spec = JobSpec::HaproxyServerState(haproxy_server_state::Spec {
            target: "bare".into(),
            backend: "app".into(),
            server: "s1".into(),
            state: "drain".into(),
        });
        // No HAProxy listens on that socket: submission says so, a later start does not ask.
        let e = refusal(plan(&spec, &env, Moment::Submission).await);
        assert!(
            matches!(e, Error::Haproxy(crate::haproxy::Error::Io(_))),
            "{e:?}"
        );
        let p = plan(&spec, &env, Moment::Start).await.unwrap();
        assert_eq!(p.steps, ["read app/s1", "set app/s1 drain"]);
    }

    fn issue(spec: certificate_issue::Spec) -> JobSpec {
        JobSpec::CertificateIssue(spec.with_defaults())
    }

    fn names(names: &[&str]) -> certificate_issue::Spec {
        certificate_issue::Spec {
            lineage: String::new(),
            names: names.iter().map(|n| n.to_string()).collect(),
            webroot: None,
            key_type: String::new(),
            reuse_key: false,
            deploy: Vec::new(),
            acme: String::new(),
            expand: false,
            dry_run: false,
            challenge: String::new(),
        }
    }

    #[tokio::test]
    async fn an_issue_takes_the_kinds_defaults_and_holds_lineage_and_targets() {
        let text = format!("{EDGE}\n[certificates]\nresponder = \"127.0.0.1:0\"\n");
        let (env, _dir) = test_env(config(&text));
        let spec = certificate_issue::Spec {
            deploy: vec!["edge".into()],
            ..names(&[" Example.COM", "www.example.com"])
        };
        let JobSpec::CertificateIssue(s) = issue(spec.clone()) else {
            unreachable!()
        };
        assert_eq!(s.lineage, "example.com");
        assert_eq!(s.names, ["example.com", "www.example.com"]);
        assert_eq!(s.key_type, "ec256");
        let p = plan(&issue(spec), &env, Moment::Submission).await.unwrap();
        assert_eq!(p.resources, ["cert:example.com", "haproxy:edge"]);
        assert_eq!(p.steps.last().map(String::as_str), Some("deploy"));
    }

    #[tokio::test]
    async fn an_issue_with_nothing_to_answer_the_challenge_is_refused() {
        let (env, _dir) = test_env(config(EDGE));
        let e = refusal(plan(&issue(names(&["example.com"])), &env, Moment::Submission).await);
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
    }

    #[tokio::test]
    async fn a_rollback_of_an_unknown_job_is_not_found() {
        let (env, _dir) = test_env(config(""));
        let spec = JobSpec::Rollback(rollback::Spec {
            target: crate::job::JobId::new(),
            force: false,
        });
        let e = refusal(plan(&spec, &env, Moment::Submission).await);
        assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    }

    #[tokio::test]
    async fn a_watch_checks_its_mail_relay_only_at_submission() {
        // Nothing listens on port 1 of loopback.
        let text = format!(
            "{EDGE}\n[smtp]\nhost = \"127.0.0.1\"\nport = 1\ntls = \"none\"\nfrom = \"s <s@example.test>\"\ntimeout = \"1s\"\n"
        );
        let (env, _dir) = test_env(config(&text));
        let spec = JobSpec::AlertWatch(alert_watch::Spec {
            target: "bare".into(),
            to: vec!["ops@example.test".into()],
            rules: crate::alerts::rules::Rules {
                interval_ms: 1000,
                hold_ms: 10_000,
                proxies: Vec::new(),
                max_session_rate: None,
                max_sessions_percent: None,
                max_5xx: None,
            },
        });
        let e = refusal(plan(&spec, &env, Moment::Submission).await);
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
        let p = plan(&spec, &env, Moment::Start).await.unwrap();
        assert_eq!(p.steps, ["watch bare"]);
        assert!(p.resources.is_empty());
    }
}
