//! statelyd: parses flags, loads the configuration, and runs the daemon until SIGTERM/SIGINT
//! (SIGHUP reloads the configuration).

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
    /// Check the configuration and what it names (files, sockets, binaries, TLS), print
    /// what was found, and exit: 0 when it can run, 64 when not.
    #[arg(long)]
    check_config: bool,
}

/// The configuration the flags name: the file (or the embedded defaults), then the flags over
/// it. A SIGHUP reads it again the same way.
fn load(flags: &Flags) -> Result<Config, String> {
    let mut config = match &flags.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    if let Some(listen) = flags.listen {
        config.listen = listen;
    }
    if let Some(dir) = &flags.data_dir {
        config.data_dir = dir.clone();
    }
    // The flags may move the listener beyond loopback: the rule about TLS holds for them too.
    config
        .validate(&match &flags.config {
            Some(p) => p.display().to_string(),
            None => "defaults".into(),
        })
        .map_err(|e| e.to_string())?;
    Ok(config)
}

/// Logs go to stderr: plain text, coloured only on a terminal, or JSON lines with
/// STATELY_LOG_FORMAT=json; the level filter is STATELY_LOG (default info). Under systemd
/// (stderr is the journal stream systemd names in JOURNAL_STREAM), or with
/// STATELY_LOG_FORMAT=journald, they go to journald natively, a job's lines with its
/// JOB_ID and JOB_KIND as fields.
fn init_logs() {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("STATELY_LOG")
        .unwrap_or_else(|_| "info".into());
    let format = std::env::var("STATELY_LOG_FORMAT").ok();
    let journald = match format.as_deref() {
        Some("journald") => true,
        None => stderr_is_the_journal(),
        _ => false,
    };
    if journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(filter)
                    .with(
                        // Fields by their own names (JOB_ID, JOB_KIND, LINEAGE), not F_-prefixed:
                        // none of stately's collides with journald's own.
                        layer
                            .with_syslog_identifier("statelyd".into())
                            .with_field_prefix(None),
                    )
                    .init();
                return;
            }
            Err(e) => eprintln!("statelyd: journald cannot be reached ({e}): logging to stderr"),
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format.as_deref() {
        Some("json") => builder.json().with_current_span(false).init(),
        _ => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Whether stderr is the stream systemd connected to the journal (JOURNAL_STREAM is
/// "device:inode" of it; a child that inherited the variable but not the stream does not match).
fn stderr_is_the_journal() -> bool {
    let Ok(want) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    want == format!("{}:{}", meta.st_dev, meta.st_ino)
}

/// Exit status for a configuration that cannot be used.
const EXIT_CONFIG: u8 = 64;
/// This node lost its claim on the job ledger — another statelyd took its name, or its lease
/// lapsed (EX_TEMPFAIL): the unit does not restart it (`RestartPreventExitStatus`), so an
/// operator decides which daemon is the node (started again, it unwinds what it left).
const EXIT_LEDGER_LOST: u8 = 75;

fn main() -> ExitCode {
    let flags = Flags::parse();
    if flags.print_config {
        print!("{DEFAULT_CONFIG}");
        return ExitCode::SUCCESS;
    }
    if let Err(e) = std::env::var("STATELY_LOG_FORMAT")
        .as_deref()
        .map(|f| match f {
            "json" | "text" | "journald" => Ok(()),
            other => Err(other.to_owned()),
        })
        .unwrap_or(Ok(()))
    {
        eprintln!(
            "statelyd: STATELY_LOG_FORMAT={e}: it is \"text\" (the default), \"json\" or \"journald\""
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let config = match load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("statelyd: bad configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if flags.check_config {
        let report = stately::check::check(&config);
        let mut out = std::io::stdout().lock();
        for (level, line) in &report.findings {
            let tag = match level {
                stately::check::Level::Ok => "ok     ",
                stately::check::Level::Warning => "warning",
                stately::check::Level::Error => "error  ",
            };
            let _ = writeln!(out, "{tag} {line}");
        }
        let (errors, warnings) = report
            .findings
            .iter()
            .fold((0, 0), |(e, w), (l, _)| match l {
                stately::check::Level::Error => (e + 1, w),
                stately::check::Level::Warning => (e, w + 1),
                stately::check::Level::Ok => (e, w),
            });
        let _ = writeln!(
            out,
            "{}: {errors} error{}, {warnings} warning{}",
            flags
                .config
                .as_ref()
                .map_or("defaults".to_owned(), |p| p.display().to_string()),
            if errors == 1 { "" } else { "s" },
            if warnings == 1 { "" } else { "s" },
        );
        return if report.failed() {
            ExitCode::from(EXIT_CONFIG)
        } else {
            ExitCode::SUCCESS
        };
    }
    init_logs();
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
    let flags = std::sync::Arc::new(flags);
    let loader: stately::daemon::Loader = Box::new(move || load(&flags));
    let result = runtime.block_on(stately::daemon::run(
        config,
        Some(loader),
        announce,
        shutdown_signal(),
    ));
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ stately::daemon::Error::LedgerLost(_)) => {
            eprintln!("statelyd: {e}");
            ExitCode::from(EXIT_LEDGER_LOST)
        }
        Err(e) if e.is_configuration() => {
            eprintln!("statelyd: bad configuration: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
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
