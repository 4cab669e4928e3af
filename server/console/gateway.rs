//! The API as JSON over HTTP/1.1, for the console and for curl: `POST /api/<service>/<method>`
//! with the request message as JSON (proto3's canonical JSON mapping) answers with the response
//! message as JSON, and a server-streaming method answers with one JSON object per line
//! (`{"result": ...}`, and `{"error": ...}` if the stream ends in one), as grpc-gateway does.
//!
//! Nothing here implements a method: each call is converted to a gRPC request, framed, and
//! handed in-process to the same routes — interceptors, layers and handlers — that serve the
//! gRPC listener, with the console connection's handle (its peer, its count of calls in
//! flight) in the request's extensions as tonic would put it there. The conversion is driven
//! by the descriptors server reflection serves (prost-reflect), so no method needs code of
//! its own here; a dropped HTTP response drops the gRPC call, so an attached run is cancelled
//! as a dropped gRPC stream is.

use crate::quote::quote;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor, SerializeOptions};
use std::convert::Infallible;
use tonic::{Code, Status};

/// The routes the gRPC listener serves, with its layers.
pub(crate) type Grpc = crate::listen::Calls<crate::api::InputErrors<tonic::service::Routes>>;

/// The body of an answer from the routes.
type GrpcBody = crate::listen::CallBody<tonic::body::Body>;

/// A response body: a whole JSON document, or a stream of lines.
pub(crate) type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// JSON requests at most: the largest gRPC request (a whole configuration, 16 MiB) with room
/// for JSON's escaping.
const MAX_JSON: usize = 24 << 20;
/// A gRPC response message at most (the largest answer, a configuration, is 16 MiB).
const MAX_MESSAGE: usize = 32 << 20;

/// The JSON gateway over the in-process routes.
#[derive(Clone)]
pub(crate) struct Gateway {
    grpc: Grpc,
    pool: DescriptorPool,
}

impl Gateway {
    pub(crate) fn new(grpc: Grpc) -> Gateway {
        let pool = DescriptorPool::decode(crate::pb::FILE_DESCRIPTOR_SET)
            .expect("the compiled descriptor set decodes");
        Gateway { grpc, pool }
    }

    /// Only the API's own services (`stately.v1.*`); health and reflection stay gRPC.
    fn method(&self, service: &str, method: &str) -> Option<MethodDescriptor> {
        if !service.starts_with("stately.v1.") {
            return None;
        }
        self.pool
            .get_service_by_name(service)?
            .methods()
            .find(|m| m.name() == method)
    }

    /// Answers `POST /api/<service>/<method>`.
    pub(crate) async fn call<B>(
        &self,
        service: &str,
        method: &str,
        req: Request<B>,
        activity: crate::listen::Activity,
    ) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let Some(m) = self.method(service, method) else {
            return error(Status::not_found(format!(
                "no method {}/{} (GET /api lists them)",
                quote(service),
                quote(method)
            )));
        };
        if m.is_client_streaming() {
            return error(Status::unimplemented(
                "client-streaming methods are served over gRPC only",
            ));
        }
        let (parts, body) = req.into_parts();
        let json = match Limited::new(body, MAX_JSON).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return error(Status::resource_exhausted(format!(
                    "the request is larger than {} MiB",
                    MAX_JSON >> 20
                )));
            }
            Err(_) => return error(Status::invalid_argument("the request body was cut short")),
        };
        // An empty body is the empty message, as `curl -X POST` sends it.
        let json: &[u8] = if json.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &json
        };
        let mut de = serde_json::Deserializer::from_slice(json);
        let message = match DynamicMessage::deserialize(m.input(), &mut de).and_then(|msg| {
            de.end()?;
            Ok(msg)
        }) {
            Ok(msg) => msg,
            Err(e) => {
                return error(Status::invalid_argument(format!(
                    "the request is not a {} in JSON: {}",
                    m.input().name(),
                    quote(&e.to_string())
                )));
            }
        };

        let mut grpc = Request::builder()
            .method(http::Method::POST)
            .uri(format!("/{}/{}", m.parent_service().full_name(), m.name()))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for name in ["authorization", "grpc-timeout", "user-agent"] {
            if let Some(v) = parts.headers.get(name) {
                grpc = grpc.header(name, v.clone());
            }
        }
        let mut grpc = grpc
            .body(Full::new(frame(&message.encode_to_vec())))
            .expect("a valid request");
        grpc.extensions_mut().insert(activity);

        let mut svc = self.grpc.clone();
        let resp = match std::future::poll_fn(|cx| {
            <Grpc as tower::Service<Request<Full<Bytes>>>>::poll_ready(&mut svc, cx)
        })
        .await
        {
            Ok(()) => tower::Service::call(&mut svc, grpc).await,
            Err(e) => Err(e),
        };
        let resp = match resp {
            Ok(r) => r,
            Err(e) => return error(Status::unavailable(format!("the API is not serving: {e}"))),
        };
        // A trailers-only response (an error before any message) has its status in headers.
        if let Some(status) =
            Status::from_header_map(resp.headers()).filter(|s| s.code() != Code::Ok)
        {
            return error(status);
        }
        let output = m.output();
        let body = resp.into_body();
        if m.is_server_streaming() {
            stream(body, output)
        } else {
            unary(body, output).await
        }
    }
}

/// Reads the one message of a unary answer.
async fn unary(body: GrpcBody, output: prost_reflect::MessageDescriptor) -> Response<Body> {
    let mut reader = Frames::new(body);
    let first = match reader.next().await {
        Ok(Some(m)) => m,
        Ok(None) => return error(reader.status()),
        Err(s) => return error(s),
    };
    // Drain to the trailers: the call's status comes after its message.
    loop {
        match reader.next().await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(s) => return error(s),
        }
    }
    let status = reader.status();
    if status.code() != Code::Ok {
        return error(status);
    }
    match to_json(&output, first) {
        Ok(json) => respond(StatusCode::OK, "application/json", Bytes::from(json)),
        Err(s) => error(s),
    }
}

/// Streams the messages of a server-streaming answer as lines, until the call ends or the
/// HTTP client goes away (which drops the call).
fn stream(body: GrpcBody, output: prost_reflect::MessageDescriptor) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let mut reader = Frames::new(body);
        loop {
            let line = match reader.next().await {
                Ok(Some(m)) => match to_json(&output, m) {
                    Ok(json) => {
                        let mut line = Vec::with_capacity(json.len() + 12);
                        line.extend_from_slice(b"{\"result\":");
                        line.extend_from_slice(&json);
                        line.extend_from_slice(b"}\n");
                        line
                    }
                    Err(s) => error_line(&s),
                },
                Ok(None) => {
                    let status = reader.status();
                    if status.code() != Code::Ok {
                        let _ = tx.send(Bytes::from(error_line(&status))).await;
                    }
                    return;
                }
                Err(s) => error_line(&s),
            };
            let last = line.starts_with(b"{\"error\"");
            if tx.send(Bytes::from(line)).await.is_err() || last {
                return;
            }
        }
    });
    let body = http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|b| Ok::<_, Infallible>(http_body::Frame::data(b))),
    );
    let mut resp = Response::new(BodyExt::boxed_unsync(body));
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/x-ndjson"),
    );
    no_store(resp.headers_mut());
    resp
}

use tokio_stream::StreamExt as _;

/// The length-prefixed messages of a gRPC response body, then its trailers.
struct Frames {
    body: GrpcBody,
    buf: BytesMut,
    trailers: Option<HeaderMap>,
    done: bool,
}

impl Frames {
    fn new(body: GrpcBody) -> Frames {
        Frames {
            body,
            buf: BytesMut::new(),
            trailers: None,
            done: false,
        }
    }

    /// The next message's bytes, None at the end of the body.
    async fn next(&mut self) -> Result<Option<Bytes>, Status> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes")) as usize;
                if self.buf[0] != 0 {
                    return Err(Status::internal(
                        "a compressed gRPC message was not asked for",
                    ));
                }
                if len > MAX_MESSAGE {
                    return Err(Status::resource_exhausted(
                        "the answer is too large for JSON",
                    ));
                }
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    return Ok(Some(self.buf.split_to(len).freeze()));
                }
            }
            if self.done {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Status::internal("the answer ended inside a message"))
                };
            }
            match self.body.frame().await {
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => self.buf.put(data),
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            self.trailers = Some(t);
                        }
                    }
                },
                Some(Err(e)) => return Err(e),
                None => self.done = true,
            }
        }
    }

    /// The call's status, from its trailers (OK when they say nothing).
    fn status(&self) -> Status {
        self.trailers
            .as_ref()
            .and_then(Status::from_header_map)
            .unwrap_or_else(|| {
                if self.trailers.is_some() {
                    Status::ok("")
                } else {
                    Status::unavailable("the call ended without a status (statelyd is stopping?)")
                }
            })
    }
}

/// A message's bytes as JSON: every field, defaults included (a page reads `state` without
/// guessing that a missing one means the first enum value), names in lowerCamelCase.
fn to_json(desc: &prost_reflect::MessageDescriptor, bytes: Bytes) -> Result<Vec<u8>, Status> {
    let msg = DynamicMessage::decode(desc.clone(), bytes)
        .map_err(|e| Status::internal(format!("an answer did not decode: {e}")))?;
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    msg.serialize_with_options(
        &mut ser,
        &SerializeOptions::new().skip_default_fields(false),
    )
    .map_err(|e| Status::internal(format!("an answer did not encode as JSON: {e}")))?;
    Ok(out)
}

/// A message in gRPC's framing: uncompressed, its length, its bytes.
fn frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(message.len() as u32);
    b.put_slice(message);
    b.freeze()
}

/// The HTTP status for a gRPC code, as grpc-gateway and Google's APIs map them.
pub(crate) fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).expect("499"),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `{"code": 403, "status": "PERMISSION_DENIED", "message": "..."}` (Google's JSON errors).
fn error_object(s: &Status) -> serde_json::Value {
    serde_json::json!({
        "code": http_status(s.code()).as_u16(),
        "status": code_name(s.code()),
        "message": s.message(),
    })
}

fn error_line(s: &Status) -> Vec<u8> {
    let mut line = serde_json::to_vec(&serde_json::json!({ "error": error_object(s) }))
        .expect("JSON of a status");
    line.push(b'\n');
    line
}

/// An error answer: the mapped HTTP status, `{"error": {...}}`.
pub(crate) fn error(s: Status) -> Response<Body> {
    let body = serde_json::to_vec(&serde_json::json!({ "error": error_object(&s) }))
        .expect("JSON of a status");
    respond(http_status(s.code()), "application/json", Bytes::from(body))
}

pub(crate) fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Body> {
    let mut resp = Response::new(BodyExt::boxed_unsync(Full::new(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static(content_type));
    no_store(resp.headers_mut());
    resp
}

fn no_store(h: &mut HeaderMap) {
    h.insert("cache-control", HeaderValue::from_static("no-store"));
}

/// The canonical name of a gRPC code, as grpcurl prints it.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Unauthenticated => "UNAUTHENTICATED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
    }
}

impl Gateway {
    /// `GET /api`: the methods, for a person finding their way (the schema itself is server
    /// reflection's).
    pub(crate) fn index(&self) -> Response<Body> {
        let mut lines = String::from(
            "POST /api/<service>/<method> with the request as JSON (proto3 JSON mapping);\n\
             server-streaming methods answer with one {\"result\": ...} per line.\n\n",
        );
        for s in self.pool.services() {
            if !s.full_name().starts_with("stately.v1.") {
                continue;
            }
            for m in s.methods() {
                lines.push_str(&format!(
                    "POST /api/{}/{}{}\n",
                    s.full_name(),
                    m.name(),
                    if m.is_server_streaming() {
                        "  (stream)"
                    } else {
                        ""
                    }
                ));
            }
        }
        respond(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            Bytes::from(lines),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_maps_to_an_http_status_and_a_name() {
        assert_eq!(http_status(Code::PermissionDenied), 403);
        assert_eq!(http_status(Code::FailedPrecondition), 400);
        assert_eq!(http_status(Code::NotFound), 404);
        assert_eq!(http_status(Code::ResourceExhausted), 429);
        assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
    }
}
