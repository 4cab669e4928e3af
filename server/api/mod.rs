//! The gRPC layer: one module per service, converting between `pb` messages and domain
//! types and checking the caller's role; and here, the one mapping of errors to status codes.

mod certs;
mod haproxy;
mod jobs;
mod stats;

pub(crate) use certs::CertsApi;
pub(crate) use haproxy::HaproxyApi;
pub(crate) use jobs::JobsApi;
pub(crate) use stats::StatsApi;

use crate::engine;
use tonic::Status;

impl From<engine::Error> for Status {
    fn from(e: engine::Error) -> Status {
        use engine::Error::*;
        match e {
            InvalidArgument(m) => Status::invalid_argument(m),
            NotFound(m) => Status::not_found(m),
            PermissionDenied(m) => Status::permission_denied(m),
            FailedPrecondition(m) => Status::failed_precondition(m),
            AlreadyExists(m) => Status::already_exists(m),
            Unavailable(m) => Status::unavailable(m),
            Store(crate::store::Error::Closed) => {
                Status::unavailable("the daemon is shutting down")
            }
            Store(e) => {
                tracing::error!("{e}");
                Status::internal(e.to_string())
            }
        }
    }
}
impl From<crate::stats::Error> for Status {
    fn from(e: crate::stats::Error) -> Status {
        use crate::stats::Error::*;
        match e {
            UnknownTarget(m) => Status::not_found(m),
            e @ Unreachable { .. } => Status::unavailable(e.to_string()),
            e @ Parse { .. } => Status::internal(e.to_string()),
        }
    }
}

impl From<crate::haproxy::Error> for Status {
    fn from(e: crate::haproxy::Error) -> Status {
        use crate::haproxy::Error::*;
        match e {
            UnknownTarget(m) => Status::not_found(m),
            e @ NoConfig(_) => Status::failed_precondition(e.to_string()),
            BadCandidate(m) => Status::invalid_argument(m),
            Io(m) => Status::unavailable(m),
        }
    }
}

/// Unix milliseconds as a protobuf timestamp.
fn ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}
