//! stately: the command-line client of statelyd. Parses flags and hands over to `cli`.

/// `eprintln!` that does not panic when stderr is closed (`stately ... 2>&-`): a line that
/// cannot be written is dropped, as a closed stdout's are.
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod alerts;
mod certs;
mod cli;
mod connect;
mod haproxy;
mod render;
mod stats;
mod status;

use clap::{CommandFactory, FromArgMatches};
use std::process::ExitCode;

fn main() -> ExitCode {
    let matches = cli::Args::command().get_matches();
    let mut args = cli::Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    haproxy::order_edits(&mut args, &matches);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            say_err!("stately: {e}");
            return ExitCode::from(cli::EXIT_ERROR);
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            say_err!("stately: {e}");
            ExitCode::from(if e.downcast_ref::<cli::Usage>().is_some() {
                cli::EXIT_USAGE
            } else {
                cli::EXIT_ERROR
            })
        }
    }
}
