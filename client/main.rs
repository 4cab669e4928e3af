//! stately: the command-line client of statelyd. Parses flags and hands over to `cli`.

mod alerts;
mod certs;
mod cli;
mod connect;
mod haproxy;
mod render;
mod stats;
mod status;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stately: {e}");
            return ExitCode::from(cli::EXIT_ERROR);
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("stately: {e}");
            ExitCode::from(cli::EXIT_ERROR)
        }
    }
}
