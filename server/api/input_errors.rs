//! Statuses tonic's codec gives for bad input before a handler runs, corrected: a request that
//! is not valid protobuf is INVALID_ARGUMENT (tonic says INTERNAL), and one larger than the
//! service's limit is RESOURCE_EXHAUSTED (tonic says OUT_OF_RANGE). Both come back as
//! trailers-only responses, so their status is in the response headers.

use http::{HeaderValue, Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The layer, for `Server::builder().layer(..)`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct InputErrorsLayer;

impl<S> tower::Layer<S> for InputErrorsLayer {
    type Service = InputErrors<S>;
    fn layer(&self, inner: S) -> InputErrors<S> {
        InputErrors { inner }
    }
}

/// The service the layer wraps around the routes.
#[derive(Debug, Clone)]
pub(crate) struct InputErrors<S> {
    inner: S,
}

impl<S, B, R> tower::Service<Request<B>> for InputErrors<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            correct(resp.headers_mut());
            Ok(resp)
        })
    }
}

fn correct(headers: &mut http::HeaderMap) {
    let code = headers.get("grpc-status").and_then(|v| v.to_str().ok());
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let replacement = match code {
        // tonic-prost: "failed to decode Protobuf message: ..." (percent-encoded spaces).
        Some("13") if message.starts_with("failed%20to%20decode%20Protobuf%20message") => Some((
            "3",
            "the request is not a valid protobuf message of this method's type",
        )),
        Some("11") if message.contains("decoded%20message%20length%20too%20large") => Some((
            "8",
            "the request is larger than this service accepts (16 MiB for configurations, 1 MiB otherwise)",
        )),
        _ => None,
    };
    if let Some((code, message)) = replacement {
        headers.insert("grpc-status", HeaderValue::from_static(code));
        // Header values cannot hold spaces unencoded in gRPC's percent-encoding: encode them.
        let encoded = message
            .replace(' ', "%20")
            .replace('(', "%28")
            .replace(')', "%29");
        if let Ok(v) = HeaderValue::from_str(&encoded) {
            headers.insert("grpc-message", v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonics_decode_and_size_errors_get_the_input_codes() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("13"));
        h.insert(
            "grpc-message",
            HeaderValue::from_static("failed%20to%20decode%20Protobuf%20message:%20x"),
        );
        correct(&mut h);
        assert_eq!(h["grpc-status"], "3");

        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("11"));
        h.insert(
            "grpc-message",
            HeaderValue::from_static("Error,%20decoded%20message%20length%20too%20large:%20found"),
        );
        correct(&mut h);
        assert_eq!(h["grpc-status"], "8");

        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("13"));
        h.insert("grpc-message", HeaderValue::from_static("store%20failed"));
        correct(&mut h);
        assert_eq!(h["grpc-status"], "13");
    }
}
