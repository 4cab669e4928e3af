//! Integration tests: each starts real statelyd processes (and the real programs and servers
//! they drive) on loopback, and checks behaviour through gRPC and the CLI. One test binary, so
//! the suite links once.

mod support;

mod adopt;
mod alerts;
mod api;
mod certs;
mod cli;
mod client;
mod connections;
mod console;
mod crash;
mod dns;
mod edits;
mod events;
mod fleet;
mod haproxy;
mod hostile;
mod jobs_api;
mod metrics;
mod nginx;
mod package;
mod postgres;
mod python;
mod readme;
mod reflection;
mod remote;
mod runbooks;
mod stats;
mod systemd;
