//! stately: durable, cancellable, reversible jobs for a web edge, served over gRPC.
//!
//! `statelyd` is a thin binary over [`daemon::run`]; the CLI `stately` uses [`pb`]'s client.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

pub mod alerts;
mod api;
mod auth;
mod blobs;
mod certs;
pub mod check;
pub mod client;
mod command;
pub mod config;
mod console;
pub mod daemon;
pub mod engine;
mod fsops;
pub mod haproxy;
mod human_time;
pub mod job;
mod journal;
pub mod kinds;
mod listen;
mod metrics;
pub mod nginx;
mod quote;
mod renewals;
mod runbooks;
pub mod stats;
mod step;
mod store;
mod tls;
mod undo;

/// Generated protobuf and gRPC code for `stately.v1`.
#[allow(
    missing_docs,
    clippy::all,
    unreachable_pub,
    missing_debug_implementations
)]
pub mod pb {
    tonic::include_proto!("stately.v1");
    /// The encoded descriptor set served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("stately_descriptor");
}
