//! Alert latency: from HAProxy marking a server DOWN (and UP again), as seen by a tight
//! `show stat` poll, to the SMTP server accepting the mail, for statelyd's alert_watch and
//! for HAProxy's own `mailers` section, on the same server and the same event, in one run.
//!
//! `cargo bench --bench alerts` (needs the Debian packages haproxy and python3-aiosmtpd).

mod support;
use support::{Auth, free_port, median, spawn_statelyd};

use stately::pb;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const TOKEN: &str = "bench-operator-token-000000";
const ROUNDS: usize = 11;

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// An aiosmtpd sink (the tests' script); its files are named by the acceptance time in ns.
fn sink(dir: &Path) -> (Child, u16) {
    let port = free_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/smtp_sink.py");
    let mut c = Command::new("/usr/bin/python3")
        .arg(script)
        .arg(dir)
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3-aiosmtpd is installed");
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    (c, port)
}

/// Acceptance times (ns) and subjects of the mails in `dir`.
fn mails(dir: &Path) -> Vec<(u128, String)> {
    let mut v: Vec<(u128, String)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !name.ends_with(".eml") {
                return None;
            }
            let t = name.split('-').next()?.parse().ok()?;
            let text = std::fs::read_to_string(e.path()).ok()?;
            let subject = text
                .lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap_or("")
                .to_owned();
            Some((t, subject))
        })
        .collect();
    v.sort();
    v
}

fn wait_mails(dir: &Path, n: usize) -> Vec<(u128, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = mails(dir);
        if m.len() >= n {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} mails, wanted {n}",
            dir.display(),
            m.len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn status(stats: &Path) -> String {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(stats) else {
        return String::new();
    };
    let mut b = String::new();
    if s.write_all(b"show stat\n").is_err() || s.read_to_string(&mut b).is_err() {
        return String::new();
    }
    b.lines()
        .find(|l| l.starts_with("app,s1,"))
        .and_then(|l| l.split(',').nth(17))
        .unwrap_or("")
        .to_owned()
}

/// Polls tightly until s1's status is `want`; returns when it was first seen (ns).
fn seen(stats: &Path, want: &str) -> u128 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if status(stats) == want {
            return now_ns();
        }
        assert!(Instant::now() < deadline, "s1 never {want}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

struct Server {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    port: u16,
}

impl Server {
    /// A TCP listener that accepts and closes (enough for a layer-4 check).
    fn start(port: u16) -> Server {
        let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = l.local_addr().unwrap().port();
        l.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                match l.accept() {
                    Ok((s, _)) => drop(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Server {
            stop,
            thread: Some(thread),
            port,
        }
    }

    /// Closes the listening socket.
    fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// `events`: HAProxy also logs to statelyd's log socket, whose state-change lines wake the
/// poller; a WatchStats client is timed too, and the log path's CPU at 1,000 lines a second.
fn measure(interval_ms: u32, events: bool) {
    let root = tempfile::tempdir().unwrap();
    let (hmail, smail): (PathBuf, PathBuf) = (root.path().join("hmail"), root.path().join("smail"));
    let (mut hsink, hport) = sink(&hmail);
    let (mut ssink, sport) = sink(&smail);
    let mut backend = Server::start(0);
    let stats = root.path().join("admin.sock");
    let log_sock = root.path().join("log.sock");
    let (log_global, log_defaults, log_target) = if events {
        (
            format!("  log {} local0 notice\n", log_sock.display()),
            "  log global\n",
            format!("log_socket = \"{}\"\n", log_sock.display()),
        )
    } else {
        (String::new(), "", String::new())
    };
    let cfg = format!(
        "global\n  stats socket {} mode 600 level admin\n{log_global}defaults\n{log_defaults}  mode http\n  timeout connect 1s\n  \
         timeout client 5s\n  timeout server 5s\nmailers mta\n  mailer m1 127.0.0.1:{hport}\n  timeout mail 5s\n\
         backend app\n  email-alert mailers mta\n  email-alert from haproxy@example.test\n  \
         email-alert to ops@example.test\n  email-alert level notice\n  \
         server s1 127.0.0.1:{} check inter 100ms fall 1 rise 1\n",
        stats.display(),
        backend.port
    );
    std::fs::write(root.path().join("haproxy.cfg"), cfg).unwrap();
    let mut haproxy = Command::new("/usr/sbin/haproxy")
        .args(["-W", "-f"])
        .arg(root.path().join("haproxy.cfg"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy is installed");
    seen(&stats, "UP");

    let dcfg = root.path().join("statelyd.toml");
    std::fs::write(
        &dcfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[haproxy]]\nname = \"edge\"\nstats_socket = \"{}\"\n{log_target}\
             [smtp]\nhost = \"127.0.0.1\"\nport = {sport}\ntls = \"none\"\nfrom = \"stately@example.test\"\n\
             [[token]]\nname = \"b\"\nrole = \"operator\"\nvalue = \"{TOKEN}\"\n",
            root.path().join("data").display(),
            stats.display()
        ),
    )
    .unwrap();
    let (mut daemon, addr) = spawn_statelyd(&dcfg);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A WatchStats client at the same interval: when each change of s1 reached it (ns).
    let arrivals: std::sync::Arc<std::sync::Mutex<Vec<(u128, String)>>> = Default::default();
    {
        let arrivals = arrivals.clone();
        let addr = addr.clone();
        let mut s = rt.block_on(async move {
            let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut c = pb::stats_client::StatsClient::with_interceptor(ch, Auth(TOKEN));
            let mut s = c
                .watch_stats(pb::WatchStatsRequest {
                    target: "edge".into(),
                    changes_only: true,
                    interval: Some(prost_types::Duration {
                        seconds: i64::from(interval_ms / 1000),
                        nanos: ((interval_ms % 1000) * 1_000_000) as i32,
                    }),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            s.message().await.unwrap();
            s
        });
        rt.spawn(async move {
            while let Ok(Some(u)) = s.message().await {
                if let Some(pb::stats_update::Update::Delta(d)) = u.update {
                    for c in d.changed {
                        if let Some(st) = c.row.and_then(|r| r.status) {
                            arrivals.lock().unwrap().push((now_ns(), st.raw));
                        }
                    }
                }
            }
        });
    }
    rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = pb::jobs_client::JobsClient::with_interceptor(ch, Auth(TOKEN));
        c.submit_job(pb::SubmitJobRequest {
            node: String::new(),
            spec: Some(pb::JobSpec {
                kind: Some(pb::job_spec::Kind::AlertWatch(pb::AlertWatchJob {
                    target: "edge".into(),
                    to: vec!["ops@example.test".into()],
                    interval_ms,
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    });
    std::thread::sleep(Duration::from_millis(300));

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut watcher = Vec::new();
    let arrived = |want: &str, after: u128| -> u128 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((t, _)) = arrivals
                .lock()
                .unwrap()
                .iter()
                .find(|(t, st)| *t >= after && st == want)
            {
                return *t;
            }
            assert!(Instant::now() < deadline, "the watcher never saw {want}");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let (hbase, sbase) = (mails(&hmail).len(), mails(&smail).len());
    for round in 0..ROUNDS {
        let n = round * 2;
        // Spread the events over the watch's tick, so the figure is not tied to its phase.
        let phase =
            |k: usize| Duration::from_millis(u64::from(interval_ms) * ((k * 7) % 11) as u64 / 11);
        std::thread::sleep(phase(round));
        backend.stop();
        let before = now_ns();
        let down = seen(&stats, "DOWN");
        watcher.push((arrived("DOWN", before) as i128 - down as i128) as f64 / 1e6);
        let h = wait_mails(&hmail, hbase + n + 1);
        let s = wait_mails(&smail, sbase + n + 1);
        theirs.push((h[hbase + n].0 as i128 - down as i128) as f64 / 1e6);
        ours.push((s[sbase + n].0 as i128 - down as i128) as f64 / 1e6);
        assert!(s[sbase + n].1.contains("DOWN"), "{:?}", s[sbase + n]);
        std::thread::sleep(phase(round + 5));
        backend = Server::start(backend.port);
        let before = now_ns();
        let up = seen(&stats, "UP");
        watcher.push((arrived("UP", before) as i128 - up as i128) as f64 / 1e6);
        let h = wait_mails(&hmail, hbase + n + 2);
        let s = wait_mails(&smail, sbase + n + 2);
        theirs.push((h[hbase + n + 1].0 as i128 - up as i128) as f64 / 1e6);
        ours.push((s[sbase + n + 1].0 as i128 - up as i128) as f64 / 1e6);
        assert!(s[sbase + n + 1].1.contains("UP"), "{:?}", s[sbase + n + 1]);
    }
    let (m1, m2) = (median(ours.clone()), median(theirs.clone()));
    let max = |v: &[f64]| v.iter().cloned().fold(f64::MIN, f64::max);
    println!(
        "interval {interval_ms} ms{}: stately alert_watch median {m1:.1} ms (max {:.1}); HAProxy mailers median {m2:.1} ms \
         (max {:.1}); WatchStats client median {:.1} ms (max {:.1}); {} transitions each",
        if events { ", log stream heard" } else { "" },
        max(&ours),
        max(&theirs),
        median(watcher.clone()),
        max(&watcher),
        ours.len()
    );
    if events {
        // The log path's CPU: 1,000 lines a second (traffic-log lines, which wake nothing) for
        // 5 s, statelyd's CPU beside 5 s without them.
        let pid = daemon.id();
        let idle = {
            let c0 = support::cpu_secs(pid);
            std::thread::sleep(Duration::from_secs(5));
            support::cpu_secs(pid) - c0
        };
        let sock = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let line = b"<134>Dec  2 12:00:00 haproxy[1]: 127.0.0.1:40000 [02/Dec/2026:12:00:00.000] fe app/s1 0/0/0/1/1 200 120 - - ---- 1/1/0/0/0 0/0 \"GET / HTTP/1.1\"";
        let c0 = support::cpu_secs(pid);
        let t0 = Instant::now();
        for i in 0..5000u32 {
            let _ = sock.send_to(line, &log_sock);
            let next = t0 + Duration::from_millis(u64::from(i + 1));
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        let busy = support::cpu_secs(pid) - c0;
        println!(
            "log path at 1,000 lines/s: statelyd CPU {:.2} % of a core ({:.1} µs per line; idle {:.2} %)",
            (busy - idle).max(0.0) / t0.elapsed().as_secs_f64() * 100.0,
            (busy - idle).max(0.0) / 5000.0 * 1e6,
            idle / 5.0 * 100.0
        );
    }
    for p in [&mut daemon, &mut haproxy, &mut hsink, &mut ssink] {
        let _ = p.kill();
        let _ = p.wait();
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    measure(100, false);
    measure(1000, false);
    measure(1000, true);
}
