//! Follows a job's events to its end, across daemon restarts: the client reconnects and
//! resumes after the last event it printed, so none is missed and none repeated.
//!
//!     STATELY_SERVER=127.0.0.1:50051 STATELY_TOKEN=... \
//!         cargo run --example follow_job -- JOB_ID [AFTER_SEQ]

use futures_util::StreamExt;
use stately::client::{Client, Connect};
use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(id) = args.next() else {
        eprintln!("usage: follow_job JOB_ID [AFTER_SEQ]");
        return ExitCode::from(2);
    };
    let after: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let server = std::env::var("STATELY_SERVER").unwrap_or_else(|_| "127.0.0.1:50051".into());
    let mut connect = Connect::new(server);
    if let Ok(t) = std::env::var("STATELY_TOKEN") {
        connect = connect.token(t);
    }
    let client = match Client::connect(&connect).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("follow_job: {e}");
            return ExitCode::from(3);
        }
    };
    let mut events = std::pin::pin!(client.watch(&id, after));
    while let Some(e) = events.next().await {
        match e {
            Ok(e) => println!(
                "seq {} {:?}",
                e.seq,
                e.event
                    .map(|e| format!("{e:?}"))
                    .unwrap_or_default()
                    .split('(')
                    .next()
                    .unwrap_or("")
            ),
            Err(e) => {
                eprintln!("follow_job: {e}");
                return ExitCode::from(3);
            }
        }
    }
    ExitCode::SUCCESS
}
