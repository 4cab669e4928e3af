//! The web console: a page served by statelyd (`console_listen`), its assets compiled into
//! the binary, talking to the API as JSON through [`gateway`] — the same routes the gRPC
//! listener serves, so the page can do nothing a gRPC client could not, and is refused what
//! the caller's role refuses.
//!
//! The page keeps its token in memory (sessionStorage) and sends it as a header: no cookie, so
//! no request a third-party page makes carries credentials, except a client certificate the
//! browser presents by itself — which is why a request whose `Origin` is not the console's own
//! is refused. A Host the console does not know is refused too (a page under a rebound DNS
//! name must not reach a loopback service), and every answer carries a strict
//! Content-Security-Policy with `frame-ancestors 'none'`.

pub(crate) mod gateway;

use bytes::Bytes;
use gateway::{Body, Gateway, respond};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");

/// The policy every answer carries: the page's own script, style and API, nothing else, and
/// never inside a frame.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// How long a request's headers may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// What a console connection is answered with.
#[derive(Clone)]
pub(crate) struct Console {
    gateway: Gateway,
    /// Names accepted in Host besides IP literals and `localhost`, lowercased.
    hosts: Arc<Vec<String>>,
}

impl Console {
    pub(crate) fn new(grpc: gateway::Grpc, hosts: &[String]) -> Console {
        Console {
            gateway: Gateway::new(grpc),
            hosts: Arc::new(hosts.iter().map(|h| h.to_ascii_lowercase()).collect()),
        }
    }

    /// Serves the connections `incoming` yields until `stop`.
    pub(crate) async fn serve<IO>(
        self,
        mut incoming: tokio_stream::wrappers::ReceiverStream<
            std::io::Result<crate::listen::Conn<IO>>,
        >,
        stop: CancellationToken,
    ) where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        use tokio_stream::StreamExt as _;
        use tonic::transport::server::Connected as _;
        loop {
            let conn = tokio::select! {
                _ = stop.cancelled() => return,
                c = incoming.next() => match c {
                    Some(Ok(c)) => c,
                    Some(Err(_)) => continue,
                    None => return,
                },
            };
            let activity = conn.connect_info();
            let tls = activity.peer.tls;
            let console = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let console = console.clone();
                    let activity = activity.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(console.answer(req, activity, tls).await)
                    }
                });
                let mut builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                builder
                    .http1()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT);
                let serving = builder.serve_connection(hyper_util::rt::TokioIo::new(conn), service);
                tokio::select! {
                    _ = serving => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    }

    async fn answer(
        &self,
        req: Request<hyper::body::Incoming>,
        activity: crate::listen::Activity,
        tls: bool,
    ) -> Response<Body> {
        let mut resp = self.route(req, activity, tls).await;
        secure(resp.headers_mut());
        resp
    }

    async fn route(
        &self,
        req: Request<hyper::body::Incoming>,
        activity: crate::listen::Activity,
        tls: bool,
    ) -> Response<Body> {
        let Some(host) = host_of(&req) else {
            return plain(StatusCode::BAD_REQUEST, "a request needs a Host header\n");
        };
        if !self.knows(&host) {
            // 421: this server does not answer for that name; the message says how to add it.
            return plain(
                StatusCode::MISDIRECTED_REQUEST,
                "this console does not answer to that host name; add it to console_hosts\n",
            );
        }
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        if let Some(rest) = path.strip_prefix("/api/") {
            if method != Method::POST {
                return gateway::error(tonic::Status::invalid_argument(
                    "API methods are called with POST and a JSON body",
                ));
            }
            if !same_origin(req.headers(), &host, tls) {
                return gateway::error(tonic::Status::permission_denied(
                    "a request from another site's page is refused",
                ));
            }
            let Some((service, name)) = rest.split_once('/') else {
                return gateway::error(tonic::Status::not_found(
                    "API paths are /api/<service>/<method> (GET /api lists them)",
                ));
            };
            let (service, name) = (service.to_string(), name.to_string());
            return self.gateway.call(&service, &name, req, activity).await;
        }
        if method != Method::GET && method != Method::HEAD {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET here\n");
        }
        let (content_type, body): (&'static str, &'static str) = match path.as_str() {
            "/" | "/index.html" => ("text/html; charset=utf-8", INDEX),
            "/console.js" => ("text/javascript; charset=utf-8", SCRIPT),
            "/console.css" => ("text/css; charset=utf-8", STYLE),
            "/api" => return self.gateway.index(),
            _ => return plain(StatusCode::NOT_FOUND, "not found\n"),
        };
        respond(
            StatusCode::OK,
            content_type,
            Bytes::from_static(body.as_bytes()),
        )
    }

    /// Whether the console answers to `host` (no port): an IP literal (no DNS name to
    /// rebind), `localhost`, or a configured name.
    fn knows(&self, host: &str) -> bool {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<std::net::IpAddr>().is_ok()
            || host == "localhost"
            || self.hosts.iter().any(|h| h == host)
    }
}

/// The request's host name, lowercased, without its port: HTTP/2's `:authority`, else Host.
fn host_of<B>(req: &Request<B>) -> Option<String> {
    let authority = match req.uri().authority() {
        Some(a) => a.as_str().to_string(),
        None => req.headers().get("host")?.to_str().ok()?.to_string(),
    };
    let authority: http::uri::Authority = authority.parse().ok()?;
    Some(authority.host().to_ascii_lowercase())
}

/// Whether a call comes from the console's own page (or from no page: curl sends no Origin).
/// Browsers send Origin on every POST, a form's included.
fn same_origin(headers: &HeaderMap, host: &str, tls: bool) -> bool {
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site" || v.as_bytes() == b"same-site")
    {
        return false;
    }
    let Some(origin) = headers.get("origin") else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let want = if tls { "https://" } else { "http://" };
    let Some(rest) = origin.strip_prefix(want) else {
        return false;
    };
    match rest.parse::<http::uri::Authority>() {
        Ok(a) => a.host().eq_ignore_ascii_case(host),
        Err(_) => false,
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    respond(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(text.as_bytes()),
    )
}

/// The headers every answer carries.
fn secure(h: &mut HeaderMap) {
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: &str) -> Request<()> {
        Request::builder()
            .uri("/")
            .header("host", host)
            .body(())
            .unwrap()
    }

    #[test]
    fn hosts_are_read_without_their_port() {
        assert_eq!(
            host_of(&req("127.0.0.1:8086")).as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(host_of(&req("[::1]:8086")).as_deref(), Some("[::1]"));
        assert_eq!(
            host_of(&req("Edge.Example.com")).as_deref(),
            Some("edge.example.com")
        );
        assert_eq!(host_of(&req("a b")), None);
    }

    #[test]
    fn only_known_names_and_ip_literals_are_answered() {
        let c = Console {
            gateway: Gateway::new(
                tower::ServiceBuilder::new()
                    .layer(crate::listen::CallsLayer)
                    .layer(crate::api::InputErrorsLayer)
                    .service(tonic::service::Routes::default()),
            ),
            hosts: Arc::new(vec!["edge.example.com".into()]),
        };
        for ok in [
            "127.0.0.1",
            "[::1]",
            "localhost",
            "edge.example.com",
            "10.1.2.3",
        ] {
            assert!(c.knows(ok), "{ok}");
        }
        for no in [
            "attacker.example",
            "127.0.0.1.nip.io",
            "localhost.attacker.example",
        ] {
            assert!(!c.knows(no), "{no}");
        }
    }

    #[test]
    fn another_sites_page_is_not_the_console() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        assert!(same_origin(&h(&[]), "127.0.0.1", false));
        assert!(same_origin(
            &h(&[("origin", "http://127.0.0.1:8086")]),
            "127.0.0.1",
            false
        ));
        assert!(!same_origin(
            &h(&[("origin", "https://127.0.0.1:8086")]),
            "127.0.0.1",
            false
        ));
        assert!(!same_origin(
            &h(&[("origin", "http://evil.example")]),
            "127.0.0.1",
            false
        ));
        assert!(!same_origin(&h(&[("origin", "null")]), "127.0.0.1", false));
        assert!(!same_origin(
            &h(&[("sec-fetch-site", "cross-site")]),
            "127.0.0.1",
            false
        ));
    }
}
