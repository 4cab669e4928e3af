//! End-to-end HAProxy config apply (validate, swap, reload, confirmed serving) by statelyd,
//! beside the same steps done by a shell script (`haproxy -c`, `mv`, `echo reload | socat`,
//! poll `show proc`), in one run, for a small config and a 5000-server one.
//!
//! `cargo bench --bench apply` (needs the Debian packages haproxy and socat).

mod support;
use support::{Auth, free_port, haproxy_config as config, median, spawn_statelyd, start_haproxy};

use stately::pb;
use std::process::Command;
use std::time::Instant;

const TOKEN: &str = "bench-operator-token-000000";
const ROUNDS: usize = 11;

/// The shell operator's way, as one script run per apply.
const SCRIPT: &str = r#"set -e
dir="$1"; cand="$dir/candidate.cfg"; live="$dir/haproxy.cfg"
haproxy -c -q -f "$cand"
before=$(echo "show proc" | socat - "UNIX-CONNECT:$dir/master.sock" | awk '$2 == "master" {print $3}')
mv "$cand" "$live"
echo reload | socat - "UNIX-CONNECT:$dir/master.sock" >/dev/null || true
while :; do
  now=$(echo "show proc" | socat - "UNIX-CONNECT:$dir/master.sock" 2>/dev/null | awk '$2 == "master" {print $3}')
  [ -n "$now" ] && [ "$now" -gt "$before" ] && break
  sleep 0.02
done
"#;

fn measure(label: &str, backends: usize, servers: usize) {
    let root = tempfile::tempdir().unwrap();
    let (sd, hd) = (root.path().join("stately"), root.path().join("shell"));
    std::fs::create_dir_all(&sd).unwrap();
    std::fs::create_dir_all(&hd).unwrap();
    let mut h1 = start_haproxy(&sd, &config(&sd, backends, servers, None));
    let mut h2 = start_haproxy(&hd, &config(&hd, backends, servers, None));

    let cfg = root.path().join("statelyd.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[haproxy]]\nname = \"edge\"\nconfig = \"{}\"\nmaster_socket = \"{}\"\n\
             stats_socket = \"{}\"\n[[token]]\nname = \"b\"\nrole = \"operator\"\nvalue = \"{TOKEN}\"\n",
            root.path().join("data").display(),
            sd.join("haproxy.cfg").display(),
            sd.join("master.sock").display(),
            sd.join("admin.sock").display()
        ),
    )
    .unwrap();
    let (mut daemon, addr) = spawn_statelyd(&cfg);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut ours, mut script) = (Vec::new(), Vec::new());
    rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = pb::jobs_client::JobsClient::with_interceptor(ch, Auth(TOKEN));
        for round in 0..ROUNDS {
            // Alternate between the base config and one with an extra frontend.
            let extra = (round % 2 == 0).then(free_port);
            let text = config(&sd, backends, servers, extra);
            let t = Instant::now();
            let req = pb::SubmitJobRequest {
                node: String::new(),
                spec: Some(pb::JobSpec {
                    kind: Some(pb::job_spec::Kind::HaproxyApply(pb::HaproxyApplyJob {
                        target: "edge".into(),
                        config: text,
                        base_version: String::new(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            };
            let mut s = c.run_job(req).await.unwrap().into_inner();
            let mut last = None;
            while let Some(e) = s.message().await.unwrap() {
                last = e.event;
            }
            match last {
                Some(pb::job_event::Event::StateChanged(sc))
                    if sc.to == pb::JobState::Succeeded as i32 => {}
                other => panic!("apply did not succeed: {other:?}"),
            }
            ours.push(t.elapsed().as_secs_f64() * 1e3);

            std::fs::write(
                hd.join("candidate.cfg"),
                config(&hd, backends, servers, extra),
            )
            .unwrap();
            let t = Instant::now();
            let st = Command::new("bash")
                .arg("-c")
                .arg(SCRIPT)
                .arg("apply")
                .arg(&hd)
                .status()
                .unwrap();
            assert!(st.success());
            script.push(t.elapsed().as_secs_f64() * 1e3);
        }
    });
    let (m1, m2) = (median(ours), median(script));
    println!(
        "{label}: stately apply (validate, swap, reload, verified serving) median {m1:.0} ms; shell script (haproxy -c, mv, \
         reload via socat, poll show proc) median {m2:.0} ms; ratio {:.2} ({ROUNDS} rounds each)",
        m1 / m2
    );
    for p in [&mut daemon, &mut h1, &mut h2] {
        let _ = p.kill();
        let _ = p.wait();
    }
}

fn main() {
    measure("small config (1 frontend, 1 backend × 1 server)", 1, 1);
    measure("5000-server config (100 backends × 50 servers)", 100, 50);
}
