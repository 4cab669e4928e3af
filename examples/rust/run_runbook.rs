//! Runs a runbook attached and prints its events; Ctrl-C drops the run, and the daemon
//! cancels the job and unwinds it (the example then follows the unwind to its end).
//!
//!     STATELY_SERVER=127.0.0.1:50051 STATELY_TOKEN=... \
//!         cargo run --example run_runbook -- motd text=hello

use stately::client::{Client, Connect, is_terminal, runbook};
use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(name) = args.next() else {
        eprintln!("usage: run_runbook RUNBOOK [key=value ...]");
        return ExitCode::from(2);
    };
    let params: Vec<(String, String)> = args
        .filter_map(|a| a.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let server = std::env::var("STATELY_SERVER").unwrap_or_else(|_| "127.0.0.1:50051".into());
    let mut connect = Connect::new(server);
    if let Ok(t) = std::env::var("STATELY_TOKEN") {
        connect = connect.token(t);
    }
    match run(&connect, &name, &params).await {
        Ok(state) if state == "SUCCEEDED" => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("run_runbook: {e}");
            ExitCode::from(3)
        }
    }
}

async fn run(
    connect: &Connect,
    name: &str,
    params: &[(String, String)],
) -> Result<String, stately::client::Error> {
    let client = Client::connect(connect).await?;
    let req = runbook(name, params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut run = client.run(req).await?;
    let mut last_seq = 0;
    loop {
        tokio::select! {
            e = run.next() => match e? {
                Some(e) => {
                    last_seq = e.seq;
                    println!("{}", describe(&e));
                    if is_terminal(&e) {
                        return Ok(state_of(&e));
                    }
                }
                None => return Ok("ENDED".into()),
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // Ctrl-C: dropping the attached run ends the call; the daemon cancels the job. Follow it.
    let id = run.job_id.clone().unwrap_or_default();
    drop(run);
    println!("interrupted: job {id} is cancelled and unwound by the daemon");
    use futures_util::StreamExt;
    let mut events = std::pin::pin!(client.watch(&id, last_seq));
    let mut state = String::new();
    while let Some(e) = events.next().await {
        let e = e?;
        println!("{}", describe(&e));
        if is_terminal(&e) {
            state = state_of(&e);
        }
    }
    Ok(state)
}

fn state_of(e: &stately::pb::JobEvent) -> String {
    match &e.event {
        Some(stately::pb::job_event::Event::StateChanged(s)) => {
            stately::pb::JobState::try_from(s.to)
                .map(|s| s.as_str_name().trim_start_matches("JOB_STATE_").to_owned())
                .unwrap_or_default()
        }
        _ => String::new(),
    }
}

fn describe(e: &stately::pb::JobEvent) -> String {
    use stately::pb::job_event::Event;
    let what = match &e.event {
        Some(Event::StateChanged(s)) => format!("state {} ({})", state_of(e), s.reason),
        Some(Event::StepStarted(s)) => format!("step {} started: {}", s.index + 1, s.name),
        Some(Event::StepFinished(s)) => format!("step {} finished", s.index + 1),
        Some(Event::Log(l)) => format!("log: {}", l.message),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    };
    format!("seq {}: {what}", e.seq)
}
