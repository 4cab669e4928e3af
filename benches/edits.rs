//! A structured edit beside a whole-file apply of the same resulting file, both jobs of the
//! same statelyd on the same 5000-server haproxy, interleaved in one run; `add_server` at
//! runtime beside a reload apply of the same added line (and the reloads each made); and
//! PreviewEdits' latency on that file (a change, validated with `haproxy -c`; and an edit
//! already in effect, which needs no validation).
//!
//! `cargo bench --bench edits` (needs the Debian package haproxy).

mod support;
use support::{Auth, haproxy_config, median, spawn_statelyd, start_haproxy};

use stately::pb;
use std::path::Path;
use std::time::Instant;

const TOKEN: &str = "bench-operator-token-000000";
// Each job waits on a reload whose time varies by ±10 % here: 31 rounds keep the medians'
// noise under the few percent the edit's own work is.
const ROUNDS: usize = 31;

fn config(dir: &Path, backends: usize, servers: usize) -> String {
    haproxy_config(dir, backends, servers, None)
}

/// The pid of the worker answering on the admin socket (`show info`).
fn worker_pid(stats: &Path) -> u32 {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(stats).unwrap();
    s.write_all(b"show info\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix("Pid: "))
        .and_then(|p| p.trim().parse().ok())
        .expect("show info names the pid")
}

fn set_timeout(secs: u32) -> pb::HaproxyEdit {
    pb::HaproxyEdit {
        op: Some(pb::haproxy_edit::Op::SetLine(pb::SetLineEdit {
            section: "defaults".into(),
            line: format!("timeout client {secs}s"),
            key: String::new(),
        })),
    }
}

type Jobs = pb::jobs_client::JobsClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Auth>,
>;

/// Runs a job attached; returns its id.
async fn run(c: &mut Jobs, kind: pb::job_spec::Kind) -> String {
    let req = pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec { kind: Some(kind) }),
        ..Default::default()
    };
    let mut s = c.run_job(req).await.unwrap().into_inner();
    let mut last = None;
    let mut id = String::new();
    while let Some(e) = s.message().await.unwrap() {
        id = e.job_id;
        last = e.event;
    }
    match last {
        Some(pb::job_event::Event::StateChanged(sc)) if sc.to == pb::JobState::Succeeded as i32 => {
        }
        other => panic!("the job did not succeed: {other:?}"),
    }
    id
}

/// Each step's duration in ms, from the job's record.
async fn step_ms(c: &mut Jobs, id: &str) -> Vec<(String, f64)> {
    let job = c
        .get_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .unwrap()
        .into_inner();
    let ms = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .map_or(0.0, |t| t.seconds as f64 * 1e3 + t.nanos as f64 / 1e6)
    };
    let mut out = vec![(
        "before the first step".to_owned(),
        ms(&job.steps[0].started_at) - ms(&job.created_at),
    )];
    out.extend(
        job.steps
            .iter()
            .map(|st| (st.name.clone(), ms(&st.finished_at) - ms(&st.started_at))),
    );
    out
}

fn main() {
    let (backends, servers) = (100, 50);
    let root = tempfile::tempdir().unwrap();
    let hd = root.path().join("haproxy");
    std::fs::create_dir_all(&hd).unwrap();
    let mut h = start_haproxy(&hd, &config(&hd, backends, servers));
    let live = hd.join("haproxy.cfg");
    let cfg = root.path().join("statelyd.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[haproxy]]\nname = \"edge\"\nconfig = \"{}\"\nmaster_socket = \"{}\"\n\
             stats_socket = \"{}\"\n[[token]]\nname = \"b\"\nrole = \"operator\"\nvalue = \"{TOKEN}\"\n",
            root.path().join("data").display(),
            live.display(),
            hd.join("master.sock").display(),
            hd.join("admin.sock").display()
        ),
    )
    .unwrap();
    let (mut daemon, addr) = spawn_statelyd(&cfg);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut edits, mut applies, mut preview_change, mut preview_same) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut runtime_adds, mut reload_adds, mut runtime_reloads) = (Vec::new(), Vec::new(), 0);
    let mut runtime_steps: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = pb::jobs_client::JobsClient::with_interceptor(ch.clone(), Auth(TOKEN));
        let mut hc = pb::haproxy_client::HaproxyClient::with_interceptor(ch, Auth(TOKEN));
        let mut secs = 5;
        for round in 0..ROUNDS {
            // Each operation changes the one line; they alternate which goes first.
            for edit_first in [round % 2 == 0, round % 2 != 0] {
                secs = if secs == 5 { 6 } else { 5 };
                let t = Instant::now();
                if edit_first {
                    run(
                        &mut c,
                        pb::job_spec::Kind::HaproxyEdit(pb::HaproxyEditJob {
                            target: "edge".into(),
                            edits: vec![set_timeout(secs)],
                            ..Default::default()
                        }),
                    )
                    .await;
                    edits.push(t.elapsed().as_secs_f64() * 1e3);
                } else {
                    // The same resulting file, computed before the clock starts.
                    let text = std::fs::read_to_string(&live).unwrap().replace(
                        &format!("timeout client {}s", if secs == 5 { 6 } else { 5 }),
                        &format!("timeout client {secs}s"),
                    );
                    let t = Instant::now();
                    run(
                        &mut c,
                        pb::job_spec::Kind::HaproxyApply(pb::HaproxyApplyJob {
                            target: "edge".into(),
                            config: text,
                            ..Default::default()
                        }),
                    )
                    .await;
                    applies.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        // A server more in b7: at runtime (then removed at runtime, untimed), and by an apply
        // of the file with its line (then the file without it, untimed).
        let server = |name: &str| pb::HaproxyEdit {
            op: Some(pb::haproxy_edit::Op::AddServer(pb::AddServerEdit {
                backend: "b7".into(),
                name: name.into(),
                address: "127.0.0.9:9999".into(),
                options: vec![],
            })),
        };
        let remove = |name: &str| pb::HaproxyEdit {
            op: Some(pb::haproxy_edit::Op::RemoveServer(pb::RemoveServerEdit {
                backend: "b7".into(),
                name: name.into(),
            })),
        };
        let edit = |e: pb::HaproxyEdit| {
            pb::job_spec::Kind::HaproxyEdit(pb::HaproxyEditJob {
                target: "edge".into(),
                edits: vec![e],
                ..Default::default()
            })
        };
        let apply = |text: String| {
            pb::job_spec::Kind::HaproxyApply(pb::HaproxyApplyJob {
                target: "edge".into(),
                config: text,
                ..Default::default()
            })
        };
        for round in 0..ROUNDS {
            let name = format!("extra{round}");
            let pid = worker_pid(&hd.join("admin.sock"));
            let t = Instant::now();
            let id = run(&mut c, edit(server(&name))).await;
            runtime_adds.push(t.elapsed().as_secs_f64() * 1e3);
            for (step, ms) in step_ms(&mut c, &id).await {
                runtime_steps.entry(step).or_default().push(ms);
            }
            if worker_pid(&hd.join("admin.sock")) != pid {
                runtime_reloads += 1;
            }
            run(&mut c, edit(remove(&name))).await;
            let base = std::fs::read_to_string(&live).unwrap();
            let with = base.replace(
                "backend b7\n",
                &format!("backend b7\n  server {name} 127.0.0.9:9999\n"),
            );
            let t = Instant::now();
            run(&mut c, apply(with)).await;
            reload_adds.push(t.elapsed().as_secs_f64() * 1e3);
            run(&mut c, apply(base)).await;
        }
        for _ in 0..21 {
            let other = if secs == 5 { 6 } else { 5 };
            for (list, s) in [(&mut preview_change, other), (&mut preview_same, secs)] {
                let t = Instant::now();
                let p = hc
                    .preview_edits(pb::PreviewEditsRequest {
                        target: "edge".into(),
                        edits: vec![set_timeout(s)],
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                list.push(t.elapsed().as_secs_f64() * 1e3);
                assert_eq!(p.changed, s != secs);
            }
        }
    });
    let spread = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        (s[0], s[s.len() - 1])
    };
    let (el, eh) = spread(&edits);
    let (al, ah) = spread(&applies);
    let (m_edit, m_apply) = (median(edits), median(applies));
    println!(
        "5000-server config (100 backends × 50 servers): haproxy_edit (set_line) median {m_edit:.0} ms [{el:.0}–{eh:.0}]; \
         haproxy_apply of the same resulting file median {m_apply:.0} ms [{al:.0}–{ah:.0}]; ratio {:.3} ({ROUNDS} rounds each, interleaved)",
        m_edit / m_apply
    );
    let (rl, rh) = spread(&runtime_adds);
    let (ll, lh) = spread(&reload_adds);
    let (m_rt, m_rl) = (median(runtime_adds), median(reload_adds));
    println!(
        "add_server on it: at runtime median {m_rt:.0} ms [{rl:.0}–{rh:.0}], {runtime_reloads} reload(s) in {ROUNDS}; \
         a reload apply of the same line median {m_rl:.0} ms [{ll:.0}–{lh:.0}]; ratio 1/{:.1}",
        m_rl / m_rt
    );
    let steps: Vec<String> = runtime_steps
        .into_iter()
        .map(|(name, v)| format!("{name} {:.1}", median(v)))
        .collect();
    println!("  its steps, median ms: {}", steps.join("; "));
    let (pl, ph) = spread(&preview_change);
    let (sl, sh) = spread(&preview_same);
    println!(
        "PreviewEdits on it: a change (edit + diff + haproxy -c) median {:.1} ms [{pl:.1}–{ph:.1}]; an edit already in effect \
         (read + edit, no validation) median {:.1} ms [{sl:.1}–{sh:.1}] (21 calls each)",
        median(preview_change),
        median(preview_same)
    );
    for p in [&mut daemon, &mut h] {
        let _ = p.kill();
        let _ = p.wait();
    }
}
