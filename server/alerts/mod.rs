//! Alerts: rules that turn stats snapshots into transitions, and the mail that tells them.
//! The `alert_watch` job kind (kinds/alert_watch.rs) ties them to the stats poller and the
//! outbox.

pub(crate) mod mail;
pub mod rules;

pub use mail::Mail;
