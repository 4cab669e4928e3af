//! The gRPC layer: one module per service, converting between `pb` messages and domain
//! types and checking the caller's role; and here, the one mapping of errors to status codes.

mod certs;
mod haproxy;
mod input_errors;
mod jobs;
mod stats;

pub(crate) use input_errors::{InputErrors, InputErrorsLayer};

pub(crate) use certs::CertsApi;
pub(crate) use haproxy::HaproxyApi;
pub(crate) use jobs::JobsApi;
pub(crate) use stats::StatsApi;

use crate::engine;
use crate::quote::cap;
use tonic::{Code, Status};

/// A status whose message is capped (a backstop: client values are quoted short where named).
fn status(code: Code, message: String) -> Status {
    Status::new(code, cap(message))
}

/// A required target name, or INVALID_ARGUMENT (the same answer from every service).
fn required_target(t: &str) -> Result<&str, Status> {
    if t.is_empty() {
        return Err(Status::invalid_argument(
            "target is required (a configured HAProxy target's name)",
        ));
    }
    Ok(t)
}

impl From<engine::Error> for Status {
    fn from(e: engine::Error) -> Status {
        use engine::Error::*;
        match e {
            InvalidArgument(m) => status(Code::InvalidArgument, m),
            NotFound(m) => status(Code::NotFound, m),
            PermissionDenied(m) => status(Code::PermissionDenied, m),
            FailedPrecondition(m) => status(Code::FailedPrecondition, m),
            ResourceExhausted(m) => status(Code::ResourceExhausted, m),
            AlreadyExists(m) => status(Code::AlreadyExists, m),
            Unavailable(m) => status(Code::Unavailable, m),
            Store(crate::store::Error::Closed) => {
                Status::unavailable("the daemon is shutting down")
            }
            // The ledger's database is away: the call may be tried again.
            Store(e @ crate::store::Error::Postgres(_)) => {
                tracing::warn!("{e}");
                Status::unavailable(e.to_string())
            }
            Store(e) => {
                tracing::error!("{e}");
                Status::internal(e.to_string())
            }
            Haproxy(e) => e.into(),
        }
    }
}
impl From<crate::stats::Error> for Status {
    fn from(e: crate::stats::Error) -> Status {
        use crate::stats::Error::*;
        match e {
            UnknownTarget(m) => status(Code::NotFound, m),
            e @ Unreachable { .. } => status(Code::Unavailable, e.to_string()),
            e @ Parse { .. } => status(Code::Internal, e.to_string()),
        }
    }
}

impl From<crate::haproxy::Error> for Status {
    fn from(e: crate::haproxy::Error) -> Status {
        use crate::haproxy::Error::*;
        match e {
            UnknownTarget(m) | NotFound(m) => status(Code::NotFound, m),
            e @ NoConfig(_) => status(Code::FailedPrecondition, e.to_string()),
            BadCandidate(m) => status(Code::InvalidArgument, m),
            Refused(m) => status(Code::PermissionDenied, m),
            TooLarge(m) => status(Code::ResourceExhausted, m),
            Io(m) => status(Code::Unavailable, m),
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
