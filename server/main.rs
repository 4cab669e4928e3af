//! statelyd: parses flags, loads the configuration, and runs the daemon until SIGTERM/SIGINT.

use clap::Parser;
use stately::config::{Config, DEFAULT_CONFIG};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// The stately daemon: durable, cancellable, reversible jobs for a web edge, over gRPC.
#[derive(Parser, Debug)]
#[command(version)]
struct Flags {
    /// Configuration file (TOML). Without one, embedded defaults are used.
    #[arg(long, short, env = "STATELY_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address (overrides the file).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory (overrides the file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print the full default configuration, every key commented, and exit.
    #[arg(long)]
    print_config: bool,
}

/// Exit status for a configuration that cannot be used.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let flags = Flags::parse();
    if flags.print_config {
        print!("{DEFAULT_CONFIG}");
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STATELY_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut config = match &flags.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("statelyd: bad configuration: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => Config::default(),
    };
    if let Some(listen) = flags.listen {
        config.listen = listen;
    }
    if let Some(dir) = flags.data_dir {
        config.data_dir = dir;
    }
    // Few blocking threads: file steps fsync one disk, and dozens of threads creating files in
    // one directory mostly spin on its lock.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(4)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("statelyd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    spawn_trimmer();
    let result = runtime.block_on(stately::daemon::run(config, announce, shutdown_signal()));
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("statelyd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// glibc keeps memory freed after a burst of jobs in its per-thread arenas; hand it back to
/// the system now and then, so an idle daemon stays small (BENCHMARKS.md).
fn spawn_trimmer() {
    let _ = std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(|| {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(10));
                // SAFETY: malloc_trim only returns free heap memory to the system.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
        });
}

/// Says where it listens on stdout, so scripts and tests can use port 0.
fn announce(addr: SocketAddr) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "listening on {addr}");
    let _ = out.flush();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
