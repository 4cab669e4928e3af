//! statelyd's own HTTP-01 responder: answers `GET /.well-known/acme-challenge/<token>` with the
//! key authorization of a challenge a job provisioned, 404 otherwise. HAProxy routes the path
//! to it, so nothing has to be stopped to free port 80.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

const PREFIX: &str = "/.well-known/acme-challenge/";

/// The challenges being answered, by token.
#[derive(Debug)]
pub(crate) struct Responder {
    tokens: Mutex<HashMap<String, String>>,
    pub(crate) addr: SocketAddr,
}

impl Responder {
    /// Binds `addr` and serves until the process ends.
    pub(crate) async fn start(addr: SocketAddr) -> std::io::Result<Arc<Responder>> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let responder = Arc::new(Responder {
            tokens: Mutex::new(HashMap::new()),
            addr: listener.local_addr()?,
        });
        let weak = Arc::downgrade(&responder);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors, say: do not spin.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let Some(r) = weak.upgrade() else { return };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let r = r.clone();
                        async move { Ok::<_, std::convert::Infallible>(r.answer(&req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(std::time::Duration::from_secs(10))
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(responder)
    }

    fn answer<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        let found = req
            .uri()
            .path()
            .strip_prefix(PREFIX)
            .and_then(|t| self.tokens.lock().expect("responder lock").get(t).cloned());
        match found {
            Some(key_auth)
                if req.method() == hyper::Method::GET || req.method() == hyper::Method::HEAD =>
            {
                Response::builder()
                    .header("content-type", "application/octet-stream")
                    .body(Full::new(Bytes::from(key_auth)))
                    .unwrap_or_default()
            }
            _ => {
                let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
                *r.status_mut() = StatusCode::NOT_FOUND;
                r
            }
        }
    }

    /// Answers `token` with `key_auth` until the guard is dropped.
    pub(crate) fn add(self: &Arc<Self>, token: &str, key_auth: &str) -> Entry {
        self.tokens
            .lock()
            .expect("responder lock")
            .insert(token.to_owned(), key_auth.to_owned());
        Entry {
            responder: self.clone(),
            token: token.to_owned(),
        }
    }
}

/// A challenge being answered; dropping it stops answering.
#[derive(Debug)]
pub(crate) struct Entry {
    responder: Arc<Responder>,
    token: String,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.responder
            .tokens
            .lock()
            .expect("responder lock")
            .remove(&self.token);
    }
}
