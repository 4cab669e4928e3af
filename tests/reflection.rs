//! A generic client, as grpcurl is: it learns the API only through server reflection (v1 and
//! v1alpha), builds messages from JSON, and calls the jobs service with them.

use crate::support::*;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use std::collections::BTreeSet;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_reflection::pb::v1 as refl;

struct DynCodec(MessageDescriptor);
struct DynEncoder;
struct DynDecoder(MessageDescriptor);

impl Codec for DynCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynEncoder;
    type Decoder = DynDecoder;
    fn encoder(&mut self) -> DynEncoder {
        DynEncoder
    }
    fn decoder(&mut self) -> DynDecoder {
        DynDecoder(self.0.clone())
    }
}

impl Encoder for DynEncoder {
    type Item = DynamicMessage;
    type Error = Status;
    fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl Decoder for DynDecoder {
    type Item = DynamicMessage;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
        DynamicMessage::decode(self.0.clone(), src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

type ReflClient =
    refl::server_reflection_client::ServerReflectionClient<InterceptedService<Channel, Bearer>>;

async fn ask(
    client: &mut ReflClient,
    req: refl::server_reflection_request::MessageRequest,
) -> refl::server_reflection_response::MessageResponse {
    let req = refl::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(req),
    };
    let mut s = client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    s.message()
        .await
        .unwrap()
        .unwrap()
        .message_response
        .unwrap()
}

/// Fetches the file defining `symbol` and every file it imports, as grpcurl does.
async fn pool_for(client: &mut ReflClient, symbol: &str) -> DescriptorPool {
    use refl::server_reflection_request::MessageRequest as Q;
    use refl::server_reflection_response::MessageResponse as A;
    let mut files = std::collections::HashMap::new();
    let mut wanted = vec![Q::FileContainingSymbol(symbol.into())];
    while let Some(q) = wanted.pop() {
        let A::FileDescriptorResponse(r) = ask(client, q).await else {
            panic!("no descriptor")
        };
        for bytes in r.file_descriptor_proto {
            let fd = prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap();
            for dep in &fd.dependency {
                if !files.contains_key(dep) {
                    wanted.push(Q::FileByFilename(dep.clone()));
                }
            }
            files.insert(fd.name().to_owned(), fd);
        }
        wanted.retain(|q| !matches!(q, Q::FileByFilename(f) if files.contains_key(f)));
    }
    DescriptorPool::from_file_descriptor_set(prost_types::FileDescriptorSet {
        file: files.into_values().collect(),
    })
    .unwrap()
}

fn message(desc: MessageDescriptor, json: &str) -> DynamicMessage {
    let mut de = serde_json::Deserializer::from_str(json);
    let m = DynamicMessage::deserialize(desc, &mut de).unwrap();
    de.end().unwrap();
    m
}

fn to_json(m: &DynamicMessage) -> serde_json::Value {
    serde_json::to_value(m).unwrap()
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_the_services() {
    let d = Daemon::start("");
    let mut v1 = refl::server_reflection_client::ServerReflectionClient::with_interceptor(
        d.channel().await,
        bearer(Some(VIEWER)),
    );
    let refl::server_reflection_response::MessageResponse::ListServicesResponse(list) = ask(
        &mut v1,
        refl::server_reflection_request::MessageRequest::ListServices(String::new()),
    )
    .await
    else {
        panic!("not a service list")
    };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains("stately.v1.Jobs"), "{names:?}");
    assert!(names.contains("stately.v1.Stats"), "{names:?}");
    assert!(names.contains("stately.v1.Haproxy"), "{names:?}");
    assert!(names.contains("grpc.health.v1.Health"), "{names:?}");

    use tonic_reflection::pb::v1alpha as alpha;
    let mut old = alpha::server_reflection_client::ServerReflectionClient::with_interceptor(
        d.channel().await,
        bearer(Some(VIEWER)),
    );
    let req = alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut s = old
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        s.message().await.unwrap().unwrap().message_response
    else {
        panic!("v1alpha answers too")
    };
    assert!(list.service.iter().any(|s| s.name == "stately.v1.Jobs"));

    // Discovery is public, as grpcurl needs it before any call; the calls are not.
    let mut anonymous = Generic::over(d.channel().await, None);
    assert!(anonymous.services().await.contains("stately.v1.Jobs"));
    let err = anonymous
        .call("stately.v1.Jobs", "ListJobs", "{}")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
}

#[tokio::test]
async fn reflection_can_be_locked_to_authenticated_callers() {
    let d = Daemon::start("reflection = \"authenticated\"\n");
    let mut anonymous =
        refl::server_reflection_client::ServerReflectionClient::new(d.channel().await);
    let req = refl::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            refl::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let err = anonymous
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut known = Generic::over(d.channel().await, Some(VIEWER));
    known.refl = refl::server_reflection_client::ServerReflectionClient::with_interceptor(
        d.channel().await,
        bearer(Some(VIEWER)),
    );
    assert!(known.services().await.contains("stately.v1.Jobs"));
}

#[tokio::test]
async fn a_generic_client_submits_watches_and_reads_a_job_from_json() {
    let d = Daemon::start("");
    let channel = d.channel().await;
    let mut refl = refl::server_reflection_client::ServerReflectionClient::with_interceptor(
        channel.clone(),
        bearer(Some(OPERATOR)),
    );
    let pool = pool_for(&mut refl, "stately.v1.Jobs").await;
    let svc = pool
        .get_service_by_name("stately.v1.Jobs")
        .expect("the service is described");
    let method = |name: &str| {
        svc.methods()
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("{name} is described"))
    };

    let mut grpc =
        tonic::client::Grpc::new(InterceptedService::new(channel, bearer(Some(OPERATOR))));
    let call =
        |name: &str| PathAndQuery::from_maybe_shared(format!("/stately.v1.Jobs/{name}")).unwrap();

    let submit = method("SubmitJob");
    let req = message(
        submit.input(),
        r#"{"spec": {"runbook": {"runbook": "write", "params": {"name": "json", "content": "from json\n"}}}, "labels": {"via": "reflection"}}"#,
    );
    grpc.ready().await.unwrap();
    let job = grpc
        .unary(
            tonic::Request::new(req),
            call("SubmitJob"),
            DynCodec(submit.output()),
        )
        .await
        .unwrap()
        .into_inner();
    let job = to_json(&job);
    let id = job["id"].as_str().expect("the job has an id").to_owned();
    assert_eq!(job["state"], "JOB_STATE_PENDING");

    let watch = method("WatchJob");
    let req = message(watch.input(), &format!(r#"{{"jobId": "{id}"}}"#));
    grpc.ready().await.unwrap();
    let mut events = grpc
        .server_streaming(
            tonic::Request::new(req),
            call("WatchJob"),
            DynCodec(watch.output()),
        )
        .await
        .unwrap()
        .into_inner();
    let mut last = serde_json::Value::Null;
    while let Some(e) = events.message().await.unwrap() {
        last = to_json(&e);
    }
    assert_eq!(last["stateChanged"]["to"], "JOB_STATE_SUCCEEDED", "{last}");

    let get = method("GetJob");
    let req = message(get.input(), &format!(r#"{{"jobId": "{id}"}}"#));
    grpc.ready().await.unwrap();
    let job = to_json(
        &grpc
            .unary(
                tonic::Request::new(req),
                call("GetJob"),
                DynCodec(get.output()),
            )
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(job["state"], "JOB_STATE_SUCCEEDED");
    assert_eq!(job["labels"]["via"], "reflection");
    assert_eq!(
        std::fs::read_to_string(d.root().join("json.txt")).unwrap(),
        "from json\n"
    );
}

/// A generic unary caller: service and method names, JSON in, JSON out.
pub(crate) struct Generic {
    channel: Channel,
    refl: ReflClient,
    token: Option<String>,
}

impl Generic {
    pub(crate) async fn new(d: &Daemon) -> Generic {
        Generic::over(d.channel().await, Some(OPERATOR))
    }

    /// Over any channel (TLS too), with a token or none (reflection needs none).
    pub(crate) fn over(channel: Channel, token: Option<&str>) -> Generic {
        let refl = refl::server_reflection_client::ServerReflectionClient::with_interceptor(
            channel.clone(),
            bearer(None),
        );
        Generic {
            channel,
            refl,
            token: token.map(str::to_owned),
        }
    }

    /// The services reflection lists.
    pub(crate) async fn services(&mut self) -> BTreeSet<String> {
        let refl::server_reflection_response::MessageResponse::ListServicesResponse(list) = ask(
            &mut self.refl,
            refl::server_reflection_request::MessageRequest::ListServices(String::new()),
        )
        .await
        else {
            panic!("not a service list")
        };
        list.service.into_iter().map(|s| s.name).collect()
    }

    /// The methods reflection describes for a service (as `grpcurl describe` prints them).
    pub(crate) async fn methods(&mut self, service: &str) -> Vec<String> {
        let pool = pool_for(&mut self.refl, service).await;
        pool.get_service_by_name(service)
            .unwrap_or_else(|| panic!("{service} is described"))
            .methods()
            .map(|m| m.name().to_owned())
            .collect()
    }

    pub(crate) async fn call(
        &mut self,
        service: &str,
        method: &str,
        json: &str,
    ) -> Result<serde_json::Value, Status> {
        let pool = pool_for(&mut self.refl, service).await;
        let svc = pool
            .get_service_by_name(service)
            .unwrap_or_else(|| panic!("{service} is described"));
        let m = svc
            .methods()
            .find(|m| m.name() == method)
            .unwrap_or_else(|| panic!("{method} is described"));
        let mut grpc = tonic::client::Grpc::new(InterceptedService::new(
            self.channel.clone(),
            bearer(self.token.as_deref()),
        ));
        grpc.ready().await.unwrap();
        let path = PathAndQuery::from_maybe_shared(format!("/{service}/{method}")).unwrap();
        grpc.unary(
            tonic::Request::new(message(m.input(), json)),
            path,
            DynCodec(m.output()),
        )
        .await
        .map(|r| to_json(&r.into_inner()))
    }

    /// Opens a server-streaming call, as grpcurl would from what reflection describes.
    async fn open(
        &mut self,
        service: &str,
        method: &str,
        json: &str,
    ) -> Result<tonic::Streaming<DynamicMessage>, Status> {
        let pool = pool_for(&mut self.refl, service).await;
        let m = pool
            .get_service_by_name(service)
            .unwrap_or_else(|| panic!("{service} is described"))
            .methods()
            .find(|m| m.name() == method)
            .unwrap_or_else(|| panic!("{method} is described"));
        let mut grpc = tonic::client::Grpc::new(InterceptedService::new(
            self.channel.clone(),
            bearer(self.token.as_deref()),
        ));
        grpc.ready().await.unwrap();
        let path = PathAndQuery::from_maybe_shared(format!("/{service}/{method}")).unwrap();
        Ok(grpc
            .server_streaming(
                tonic::Request::new(message(m.input(), json)),
                path,
                DynCodec(m.output()),
            )
            .await?
            .into_inner())
    }

    /// The first message of a server-streaming call (one that does not end by itself).
    pub(crate) async fn first(
        &mut self,
        service: &str,
        method: &str,
        json: &str,
    ) -> Result<serde_json::Value, Status> {
        let mut s = self.open(service, method, json).await?;
        let msg = s
            .message()
            .await?
            .ok_or_else(|| Status::unknown("the stream ended without a message"))?;
        Ok(to_json(&msg))
    }

    /// A server-streaming call, read to its end (as grpcurl prints each message).
    pub(crate) async fn stream(
        &mut self,
        service: &str,
        method: &str,
        json: &str,
    ) -> Result<Vec<serde_json::Value>, Status> {
        let mut s = self.open(service, method, json).await?;
        let mut out = Vec::new();
        while let Some(msg) = s.message().await? {
            out.push(to_json(&msg));
        }
        Ok(out)
    }
}

#[tokio::test]
async fn a_generic_client_starts_and_stops_an_alert_watch() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::start(0).await;
    let h = Haproxy::start(dir.path(), &[("app", vec![("s1", b.port)])]);
    let smtp = SmtpSink::start(&dir.path().join("mail"));
    let d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nstats_socket = \"{}\"\n{}",
        h.stats.display(),
        smtp.config()
    ));
    let mut g = Generic::new(&d).await;
    let job = g
        .call(
            "stately.v1.Jobs",
            "SubmitJob",
            r#"{"spec": {"alertWatch": {"target": "edge", "to": ["ops@example.test"], "intervalMs": 100}}}"#,
        )
        .await
        .unwrap();
    assert_eq!(job["kind"], "alert_watch", "{job}");
    assert_eq!(job["spec"]["alertWatch"]["to"][0], "ops@example.test");
    let id = job["id"].as_str().unwrap();
    let stopped = g
        .call(
            "stately.v1.Jobs",
            "CancelJob",
            &format!(r#"{{"jobId": "{id}", "wait": true}}"#),
        )
        .await
        .unwrap();
    assert_eq!(stopped["state"], "JOB_STATE_CANCELLED", "{stopped}");
    let err = g
        .call(
            "stately.v1.Jobs",
            "SubmitJob",
            r#"{"spec": {"alertWatch": {"target": "edge", "to": ["not an address"]}}}"#,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_generic_client_lists_certificates_and_issues_one() {
    let port = free_port();
    let p = crate::support::pebble::Pebble::start(port);
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&format!(
        "[certificates]\nroot = \"{}\"\ndefault_acme = \"pebble\"\nresponder = \"127.0.0.1:{port}\"\nchallenge_probe = \"127.0.0.1:{port}\"\nrenew_check = \"0s\"\n{}",
        dir.path().join("le").display(),
        p.config()
    ));
    let mut g = Generic::new(&d).await;
    let job = g
        .call(
            "stately.v1.Jobs",
            "SubmitJob",
            r#"{"spec": {"certificateIssue": {"names": ["example.test", "www.example.test"]}}}"#,
        )
        .await
        .unwrap();
    assert_eq!(job["kind"], "certificate_issue", "{job}");
    let mut c = d.client().await;
    let done = wait_end(&mut c, job["id"].as_str().unwrap()).await;
    assert_eq!(state(&done), stately::pb::JobState::Succeeded, "{done:#?}");
    let list = g
        .call("stately.v1.Certificates", "ListCertificates", "{}")
        .await
        .unwrap();
    assert_eq!(list["certificates"][0]["name"], "example.test", "{list}");
    assert_eq!(list["certificates"][0]["version"], 1);
    let err = g
        .call(
            "stately.v1.Certificates",
            "GetCertificate",
            r#"{"name": "nope"}"#,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn a_generic_client_lists_runbooks_and_retries_an_unwind() {
    let d = Daemon::start("");
    let mut g = Generic::new(&d).await;
    let list = g
        .call("stately.v1.Jobs", "ListRunbooks", "{}")
        .await
        .unwrap();
    let write = list["runbooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "write")
        .unwrap_or_else(|| panic!("{list}"));
    let params = write["params"].as_array().unwrap();
    let name = params.iter().find(|p| p["name"] == "name").unwrap();
    assert_eq!(name["pattern"], "[a-z0-9-]+");
    assert!(name.get("default").is_none(), "required: {name}");
    let content = params.iter().find(|p| p["name"] == "content").unwrap();
    assert_eq!(content["default"], "new\n");
    assert_eq!(write["steps"][0]["type"], "write_file");

    // UnwindJob is described and answers for a job whose unwind is complete.
    let job = g
        .call(
            "stately.v1.Jobs",
            "SubmitJob",
            r#"{"spec": {"runbook": {"runbook": "noop"}}}"#,
        )
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    let mut c = d.client().await;
    wait_end(&mut c, &id).await;
    let err = g
        .call(
            "stately.v1.Jobs",
            "UnwindJob",
            &format!(r#"{{"jobId": "{id}"}}"#),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn a_generic_client_previews_and_runs_structured_edits() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::start(0).await;
    let h = Haproxy::start_with(dir.path(), &[("app", vec![("s1", b.port)])], false);
    let d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nconfig = \"{}\"\nmaster_socket = \"{}\"\nstats_socket = \"{}\"\n",
        h.config.display(),
        h.dir.join("master.sock").display(),
        h.stats.display()
    ));
    let mut g = Generic::new(&d).await;
    let edits = r#"[{"setLine": {"section": "defaults", "line": "timeout client 9s"}},
                    {"stickySessions": {"backend": "app"}}]"#;
    let preview = g
        .call(
            "stately.v1.Haproxy",
            "PreviewEdits",
            &format!(r#"{{"target": "edge", "edits": {edits}}}"#),
        )
        .await
        .unwrap();
    assert_eq!(preview["changed"], true, "{preview}");
    assert_eq!(preview["valid"], true, "{preview}");
    assert!(
        preview["diff"]
            .as_str()
            .unwrap()
            .contains("+  timeout client 9s"),
        "{preview}"
    );
    let base = preview["currentVersion"].as_str().unwrap();
    let job = g
        .call(
            "stately.v1.Jobs",
            "SubmitJob",
            &format!(
                r#"{{"spec": {{"haproxyEdit": {{"target": "edge", "edits": {edits}, "baseVersion": "{base}"}}}}}}"#
            ),
        )
        .await
        .unwrap();
    assert_eq!(job["kind"], "haproxy_edit", "{job}");
    assert_eq!(
        job["spec"]["haproxyEdit"]["edits"][1]["stickySessions"]["backend"],
        "app"
    );
    let mut c = d.client().await;
    let done = wait_end(&mut c, job["id"].as_str().unwrap()).await;
    assert_eq!(
        state(&done),
        stately::pb::JobState::Succeeded,
        "{}",
        done.error
    );
    assert!(
        std::fs::read_to_string(&h.config)
            .unwrap()
            .contains("cookie SERVERID insert indirect nocache")
    );
    let err = g
        .call(
            "stately.v1.Haproxy",
            "PreviewEdits",
            r#"{"target": "edge", "edits": [{"forceHttps": {"frontend": "nope"}}]}"#,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
}
