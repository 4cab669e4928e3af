//! Connections a crowd cannot use up: idle connections at a 1024 open-file limit, silent ones
//! closed after the first-bytes deadline, and a new client still answered.

use crate::support::*;
use std::io::Read;
use std::time::{Duration, Instant};

/// Lets this test process open more sockets than a 1024 default allows.
fn raise_own_nofile(at_least: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= at_least,
        "the test needs {at_least} open files, the hard limit is {hard}"
    );
    if soft < at_least {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

async fn health_within(d: &Daemon) -> Duration {
    let t = Instant::now();
    // Connections younger than 250 ms are not evicted for a newcomer: a client may be refused
    // (its connection closed at once, before or after it connected) until the crowd has aged
    // that much, and connects again, as clients do.
    loop {
        let answered = async {
            let channel = tonic::transport::Channel::from_shared(format!("http://{}", d.addr))
                .unwrap()
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            tokio::time::timeout(
                Duration::from_secs(5),
                health.check(tonic_health::pb::HealthCheckRequest::default()),
            )
            .await
            .map_err(|_| "no answer in 5 s".to_owned())?
            .map_err(|e| e.to_string())
        }
        .await;
        match answered {
            Ok(_) => return t.elapsed(),
            Err(e) => {
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "a new client is answered: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn idle_connections_at_a_1024_file_limit_do_not_lock_out_a_new_client() {
    raise_own_nofile(4096);
    let mut d = Daemon::configure("first_bytes_timeout = \"2s\"\n", &[]);
    d.nofile = Some(1024);
    d.spawn();
    let pid = d.pid().unwrap();
    // A client with a call in flight: a watch on a job that blocks in a step.
    let mut watcher = d.client().await;
    let job = watcher
        .submit_job(runbook("write-then-block", &[("name", "busy")]))
        .await
        .unwrap()
        .into_inner();
    let mut stream = events(&mut watcher, &job.id).await;
    until_log(&mut stream, "ready").await;

    let idle: Vec<std::net::TcpStream> = (0..1100)
        .filter_map(|_| std::net::TcpStream::connect(&d.addr).ok())
        .collect();
    assert!(idle.len() >= 1000, "connections opened: {}", idle.len());
    let waited = health_within(&d).await;
    eprintln!(
        "new client answered in {waited:?} beside {} idle",
        idle.len()
    );
    // The watch has been quiet for over a second now; more newcomers make room, but never by
    // closing a connection with a call in flight.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Newcomers that greet (the HTTP/2 preface) and then fall silent: they are not closed
    // for silence, so room comes from the quietest connections — never the watch.
    let greet = |mut s: std::net::TcpStream| {
        use std::io::Write;
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .ok()
            .map(|_| s)
    };
    let more: Vec<std::net::TcpStream> = (0..1100)
        .filter_map(|_| std::net::TcpStream::connect(&d.addr).ok())
        .filter_map(greet)
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let more2: Vec<std::net::TcpStream> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(&d.addr).ok())
        .filter_map(greet)
        .collect();
    health_within(&d).await;
    let mut c = d.client().await;
    cancel_wait(&mut c, &job.id).await;
    let rest = tokio::time::timeout(
        Duration::from_secs(10),
        until_log_with(&mut stream, "undone"),
    )
    .await
    .expect("the watch still streams");
    assert!(!rest.is_empty());
    drop((more, more2));

    // The accept loop does not spin on a full table.
    let before = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_seconds(pid) - before;
    assert!(
        used < 0.5,
        "the daemon used {used} s of CPU in 1 s while idle"
    );

    // Connections that never said anything are closed after the first-bytes deadline.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut closed = 0;
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        // The server's HTTP/2 settings may come first; then the close (or nothing).
        let mut b = [0u8; 256];
        loop {
            match s.read(&mut b) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(_) => {
                    closed += 1;
                    break;
                }
            }
        }
    }
    assert!(
        closed >= 1000,
        "only {closed} silent connections were closed"
    );
    health_within(&d).await;
}

#[tokio::test]
async fn anonymous_discovery_streams_do_not_hold_every_slot() {
    // Health Watch streams need no token and last as long as the client likes: they must not
    // keep their connections from making room, or four strangers would lock this daemon.
    let d = Daemon::start("max_connections = 4\n");
    let mut held = Vec::new();
    for _ in 0..4 {
        let ch = d.channel().await;
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        let s = h
            .watch(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        held.push((ch, s));
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut c = d.client().await;
    tokio::time::timeout(
        Duration::from_secs(5),
        c.get_status(stately::pb::GetStatusRequest {}),
    )
    .await
    .expect("answered")
    .expect("a client with a token gets in");
}
