//! Stats watches against a real haproxy (master-worker, loopback) whose backend servers are
//! real TCP listeners started and stopped by the tests.

use crate::support::*;
use stately::pb;
use std::time::{Duration, Instant};
use tonic::Code;

struct Edge {
    d: Daemon,
    h: Haproxy,
    servers: Vec<Backend>,
    _dir: tempfile::TempDir,
}

/// statelyd with a target "edge" on a haproxy with backend "web" (s1, s2) and "api" (a1).
async fn edge() -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let servers = vec![
        Backend::start(0).await,
        Backend::start(0).await,
        Backend::start(0).await,
    ];
    let h = Haproxy::start(
        dir.path(),
        &[
            (
                "web",
                vec![("s1", servers[0].port), ("s2", servers[1].port)],
            ),
            ("api", vec![("a1", servers[2].port)]),
        ],
    );
    let d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nstats_socket = \"{}\"\n",
        h.stats.display()
    ));
    Edge {
        d,
        h,
        servers,
        _dir: dir,
    }
}

type StatsClient = pb::stats_client::StatsClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

async fn stats_client(d: &Daemon) -> StatsClient {
    pb::stats_client::StatsClient::with_interceptor(d.channel().await, bearer(Some(VIEWER)))
}

fn row<'a>(rows: &'a [pb::StatsRow], proxy: &str, server: &str) -> &'a pb::StatsRow {
    rows.iter()
        .find(|r| r.proxy == proxy && r.server == server)
        .unwrap_or_else(|| panic!("no row {proxy}/{server}"))
}

fn state(r: &pb::StatsRow) -> pb::ServerState {
    pb::ServerState::try_from(r.status.as_ref().unwrap().state).unwrap()
}

async fn watch(
    c: &mut StatsClient,
    filter: Option<pb::StatsFilter>,
    interval_ms: u64,
) -> tonic::Streaming<pb::StatsUpdate> {
    c.watch_stats(pb::WatchStatsRequest {
        target: "edge".into(),
        filter,
        interval: Some(prost_types::Duration {
            seconds: 0,
            nanos: (interval_ms * 1_000_000) as i32,
        }),
        changes_only: true,
    })
    .await
    .unwrap()
    .into_inner()
}

/// Reads updates until a change of `server` to `want` (a delta) arrives.
async fn until_change(
    s: &mut tonic::Streaming<pb::StatsUpdate>,
    server: &str,
    want: pb::ServerState,
) -> pb::RowChange {
    loop {
        let u = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("a change in time")
            .unwrap()
            .unwrap();
        if let Some(pb::stats_update::Update::Delta(d)) = u.update
            && let Some(c) = d.changed.into_iter().find(|c| {
                let r = c.row.as_ref().unwrap();
                r.server == server
                    && state(r) == want
                    && !c
                        .row
                        .as_ref()
                        .unwrap()
                        .status
                        .as_ref()
                        .unwrap()
                        .transitional
            })
        {
            return c;
        }
    }
}

/// Waits until GetStats shows `server` settled in `want` (not "UP 1/2" and the like).
async fn until_state(c: &mut StatsClient, proxy: &str, server: &str, want: pb::ServerState) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snap = c
            .get_stats(pb::GetStatsRequest {
                target: "edge".into(),
                filter: None,
            })
            .await
            .unwrap()
            .into_inner();
        let r = row(&snap.rows, proxy, server);
        if state(r) == want && !r.status.as_ref().unwrap().transitional {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{proxy}/{server} never became {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_snapshot_lists_frontends_backends_and_servers_with_their_types() {
    let e = edge().await;
    let mut c = stats_client(&e.d).await;
    until_state(&mut c, "web", "s1", pb::ServerState::Up).await;
    let snap = c
        .get_stats(pb::GetStatsRequest {
            target: "edge".into(),
            filter: None,
        })
        .await
        .unwrap()
        .into_inner();
    let fe = row(&snap.rows, "fe", "FRONTEND");
    assert_eq!(fe.r#type, pb::RowType::Frontend as i32);
    assert_eq!(state(fe), pb::ServerState::Open);
    assert!(fe.session_limit.is_some());
    let s1 = row(&snap.rows, "web", "s1");
    assert_eq!(s1.r#type, pb::RowType::Server as i32);
    assert_eq!(s1.address, format!("127.0.0.1:{}", e.servers[0].port));
    assert_eq!(s1.check_status, "L4OK");
    assert_eq!(
        row(&snap.rows, "web", "BACKEND").r#type,
        pb::RowType::Backend as i32
    );
    assert_eq!(
        row(&snap.rows, "api", "a1").r#type,
        pb::RowType::Server as i32
    );
    assert!(snap.polls >= 1);
}

#[tokio::test]
async fn filters_select_proxies_servers_and_types() {
    let e = edge().await;
    let mut c = stats_client(&e.d).await;
    let get = |f: pb::StatsFilter| pb::GetStatsRequest {
        target: "edge".into(),
        filter: Some(f),
    };
    let rows = c
        .get_stats(get(pb::StatsFilter {
            proxies: vec!["w*".into()],
            types: vec![pb::RowType::Server as i32],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .rows;
    let names: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r.proxy.as_str(), r.server.as_str()))
        .collect();
    assert_eq!(names, [("web", "s1"), ("web", "s2")]);
    let rows = c
        .get_stats(get(pb::StatsFilter {
            servers: vec!["a?".into()],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].server, "a1");
    let rows = c
        .get_stats(get(pb::StatsFilter {
            types: vec![pb::RowType::Backend as i32],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert!(
        rows.iter().all(|r| r.server == "BACKEND") && rows.len() == 2,
        "{rows:?}"
    );
}

#[tokio::test]
async fn a_killed_backend_goes_down_in_the_stream_and_comes_back_up() {
    let mut e = edge().await;
    let mut c = stats_client(&e.d).await;
    until_state(&mut c, "web", "s1", pb::ServerState::Up).await;
    let mut s = watch(&mut c, None, 100).await;
    match s.message().await.unwrap().unwrap().update {
        Some(pb::stats_update::Update::Snapshot(snap)) => {
            assert_eq!(state(row(&snap.rows, "web", "s1")), pb::ServerState::Up)
        }
        u => panic!("a watch starts with a full snapshot, not {u:?}"),
    }
    let port = e.servers[0].port;
    e.servers[0].stop().await;
    let down = until_change(&mut s, "s1", pb::ServerState::Down).await;
    let row = down.row.unwrap();
    assert_eq!(row.check_status, "L4CON", "the reason is the check's");
    assert_eq!(
        pb::ServerState::try_from(down.previous_status.unwrap().state).unwrap(),
        pb::ServerState::Up
    );

    e.servers[0] = Backend::start(port).await;
    let up = until_change(&mut s, "s1", pb::ServerState::Up).await;
    assert_eq!(
        pb::ServerState::try_from(up.previous_status.unwrap().state).unwrap(),
        pb::ServerState::Down
    );
}

#[tokio::test]
async fn a_hundred_watchers_see_the_same_change_from_one_poll_per_tick() {
    let mut e = edge().await;
    let mut c = stats_client(&e.d).await;
    until_state(&mut c, "web", "s2", pb::ServerState::Up).await;
    let mut streams = Vec::new();
    for _ in 0..100 {
        let mut wc = stats_client(&e.d).await;
        let mut s = watch(
            &mut wc,
            Some(pb::StatsFilter {
                servers: vec!["s2".into()],
                ..Default::default()
            }),
            200,
        )
        .await;
        s.message().await.unwrap().unwrap();
        streams.push((wc, s));
    }
    let before = c
        .get_stats(pb::GetStatsRequest {
            target: "edge".into(),
            filter: None,
        })
        .await
        .unwrap()
        .into_inner()
        .polls;
    let t = Instant::now();
    e.servers[1].stop().await;
    for (_, s) in streams.iter_mut() {
        let _ = until_change(s, "s2", pb::ServerState::Down).await;
    }
    let elapsed = t.elapsed();
    let after = c
        .get_stats(pb::GetStatsRequest {
            target: "edge".into(),
            filter: None,
        })
        .await
        .unwrap()
        .into_inner()
        .polls;
    // Two GetStats are counted too.
    let ticks = after - before - 1;
    let most = elapsed.as_millis() as u64 / 200 + 2;
    assert!(
        ticks <= most,
        "{ticks} polls in {elapsed:?} for 100 watchers at 200 ms: the poller is not shared"
    );
    assert!(ticks >= 1);
}

#[tokio::test]
async fn a_stopped_haproxy_is_reported_and_the_stream_recovers_when_it_is_back() {
    let mut e = edge().await;
    let mut c = stats_client(&e.d).await;
    let mut s = watch(&mut c, None, 100).await;
    s.message().await.unwrap().unwrap();
    e.h.stop();
    loop {
        let u = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(pb::stats_update::Update::Unreachable(why)) = u.update {
            assert!(why.contains("admin.sock"), "{why}");
            break;
        }
    }
    e.h.spawn();
    loop {
        let u = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match u.update {
            Some(pb::stats_update::Update::Snapshot(snap)) => {
                assert!(snap.rows.iter().any(|r| r.server == "s1"));
                break;
            }
            Some(pb::stats_update::Update::Unreachable(_)) => {}
            other => panic!("after recovery a full snapshot comes first, not {other:?}"),
        }
    }
}

#[tokio::test]
async fn bad_stats_requests_get_clear_statuses() {
    let e = edge().await;
    let mut c = stats_client(&e.d).await;
    let err = c
        .get_stats(pb::GetStatsRequest {
            target: "nope".into(),
            filter: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("edge"),
        "names the targets: {}",
        err.message()
    );
    let err = c
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .watch_stats(pb::WatchStatsRequest {
            target: "edge".into(),
            interval: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut anon = pb::stats_client::StatsClient::new(e.d.channel().await);
    let err = anon
        .get_stats(pb::GetStatsRequest {
            target: "edge".into(),
            filter: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn the_cli_prints_a_table_and_streams_json() {
    use std::io::{BufRead, BufReader};
    let e = edge().await;
    let mut c = stats_client(&e.d).await;
    until_state(&mut c, "web", "s1", pb::ServerState::Up).await;
    let out =
        e.d.cli()
            .args(["stats", "edge", "--proxy", "web"])
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("PROXY") && lines[0].contains("STATUS"),
        "{text}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("web")
            && l.contains("s1")
            && l.contains("UP")
            && l.contains("L4OK")),
        "{text}"
    );
    assert!(!text.contains("api"), "filtered: {text}");

    let mut child =
        e.d.cli()
            .args([
                "-o",
                "json",
                "stats",
                "edge",
                "--watch",
                "--interval",
                "100ms",
                "--server",
                "s1",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let v: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(v["target"], "edge");
    assert_eq!(v["snapshot"][0]["server"], "s1");
    assert_eq!(v["snapshot"][0]["status"], "UP");
}

#[tokio::test]
async fn the_poller_follows_the_shortest_interval_and_stops_when_nobody_watches() {
    let e = edge().await;
    let mut c = stats_client(&e.d).await;
    let full = |interval_ms: u64| pb::WatchStatsRequest {
        target: "edge".into(),
        filter: None,
        interval: Some(prost_types::Duration {
            seconds: (interval_ms / 1000) as i64,
            nanos: ((interval_ms % 1000) * 1_000_000) as i32,
        }),
        changes_only: false,
    };
    let mut slow_client = stats_client(&e.d).await;
    let mut slow = slow_client
        .watch_stats(full(10_000))
        .await
        .unwrap()
        .into_inner();
    slow.message().await.unwrap().unwrap();
    // A faster watcher joining shortens the shared tick at once.
    let mut fast = c.watch_stats(full(100)).await.unwrap().into_inner();
    let t = Instant::now();
    for _ in 0..4 {
        fast.message().await.unwrap().unwrap();
    }
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "4 snapshots at 100 ms took {:?}",
        t.elapsed()
    );
    // The 10 s watcher is not flooded with the fast one's ticks.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), slow.message())
            .await
            .is_err(),
        "full snapshots at its own pace"
    );
    drop((fast, slow));

    // With no watcher left the poller stops: only the two GetStats below poll.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = c
        .get_stats(pb::GetStatsRequest {
            target: "edge".into(),
            filter: None,
        })
        .await
        .unwrap()
        .into_inner()
        .polls;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = c
        .get_stats(pb::GetStatsRequest {
            target: "edge".into(),
            filter: None,
        })
        .await
        .unwrap()
        .into_inner()
        .polls;
    assert_eq!(
        after,
        before + 1,
        "the poller kept polling after its last watcher left"
    );

    // And a new watcher starts it again.
    let mut again = watch(&mut c, None, 100).await;
    assert!(matches!(
        again.message().await.unwrap().unwrap().update,
        Some(pb::stats_update::Update::Snapshot(_))
    ));
}

#[tokio::test]
async fn deltas_are_quiet_when_nothing_changes_and_respect_filters() {
    let mut e = edge().await;
    let mut c = stats_client(&e.d).await;
    until_state(&mut c, "web", "s1", pb::ServerState::Up).await;
    until_state(&mut c, "api", "a1", pb::ServerState::Up).await;
    let mut all = watch(&mut c, None, 100).await;
    all.message().await.unwrap().unwrap();
    let mut c2 = stats_client(&e.d).await;
    let mut api_only = watch(
        &mut c2,
        Some(pb::StatsFilter {
            proxies: vec!["api".into()],
            ..Default::default()
        }),
        100,
    )
    .await;
    api_only.message().await.unwrap().unwrap();
    if let Ok(u) = tokio::time::timeout(Duration::from_millis(500), all.message()).await {
        panic!(
            "no delta while nothing changes (counters and running checks are not changes): {u:?}"
        );
    }
    e.servers[0].stop().await;
    until_change(&mut all, "s1", pb::ServerState::Down).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), api_only.message())
            .await
            .is_err(),
        "a web change is not sent to an api-only watcher"
    );
}

#[tokio::test]
async fn a_slow_watcher_skips_to_the_latest_poll_without_slowing_the_others() {
    // 400 servers, so snapshots are large (~50 KB) and what HTTP/2 buffers for a stalled
    // stream (a few hundred KB) fills within a second.
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..400).map(|i| format!("s{i}")).collect();
    let servers: Vec<(&str, u16)> = names.iter().map(|n| (n.as_str(), 9)).collect();
    let h = Haproxy::start_with(dir.path(), &[("web", servers)], false);
    let d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nstats_socket = \"{}\"\n",
        h.stats.display()
    ));
    let full = pb::WatchStatsRequest {
        target: "edge".into(),
        filter: None,
        interval: Some(prost_types::Duration {
            seconds: 0,
            nanos: 100_000_000,
        }),
        changes_only: false,
    };
    // A client that takes only ~2 KB before it reads.
    let tight = tonic::transport::Endpoint::from_shared(format!("http://{}", d.addr))
        .unwrap()
        .initial_stream_window_size(2048)
        .initial_connection_window_size(2048)
        .connect()
        .await
        .unwrap();
    let mut slow_client =
        pb::stats_client::StatsClient::with_interceptor(tight, bearer(Some(VIEWER)));
    let mut slow = slow_client
        .watch_stats(full.clone())
        .await
        .unwrap()
        .into_inner();

    let mut c = stats_client(&d).await;
    let mut brisk = c.watch_stats(full).await.unwrap().into_inner();
    let t = Instant::now();
    let mut seen = 0;
    while t.elapsed() < Duration::from_secs(2) {
        brisk.message().await.unwrap().unwrap();
        seen += 1;
    }
    assert!(
        seen >= 14,
        "the brisk watcher got {seen} updates in 2 s at 100 ms: it was slowed down"
    );

    // The slow one now reads: after what was already buffered for it, it is told what it missed.
    let mut skipped = 0;
    let mut polls = Vec::new();
    for _ in 0..40 {
        let u = slow.message().await.unwrap().unwrap();
        polls.push((u.poll, u.skipped));
        if u.skipped > 0 {
            skipped = u.skipped;
            assert!(matches!(
                u.update,
                Some(pb::stats_update::Update::Snapshot(_))
            ));
            break;
        }
    }
    assert!(
        skipped >= 3,
        "the slow watcher was told it skipped polls (told {skipped}): {polls:?}"
    );
}

#[tokio::test]
async fn a_json_watch_leaves_as_soon_as_its_reader_does() {
    use std::io::{BufRead, BufReader};
    let e = edge().await;
    // `stately -o json stats edge --watch | head -1`, polling only every 30 s.
    let mut cli =
        e.d.cli()
            .args([
                "-o",
                "json",
                "stats",
                "edge",
                "--watch",
                "--interval",
                "30s",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    let mut out = BufReader::new(cli.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.contains("snapshot"), "{first}");
    let left = std::time::Instant::now();
    drop(out);
    let status = cli.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        left.elapsed() < std::time::Duration::from_secs(10),
        "left after {:?}, not at the next poll",
        left.elapsed()
    );
}
