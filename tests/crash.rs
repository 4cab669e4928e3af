//! statelyd killed with SIGKILL at seeded random moments — not at step boundaries — during
//! runbook file steps, HAProxy applies around their reload, and certificate installs, and a
//! node of a PostgreSQL fleet running a job submitted on another; then restarted on the same
//! data directory. After each trial: the world is all old or all new
//! (files with their modes, the running HAProxy serving the file on disk, a lineage at one
//! version with its bundle), no temp file anywhere, no job left RUNNING, events contiguous with
//! one terminal event at the end. A failing trial prints its seed: replay it with
//! `STATELY_CRASH_SEED=<seed> cargo nextest run crash::`.

use crate::support::pebble::Pebble;
use crate::support::*;
use rand::{Rng, SeedableRng};
use stately::pb;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a trial saw, for the summary line (BENCHMARKS.md records these).
#[derive(Default, Debug)]
struct Tally {
    trials: u32,
    old: u32,
    new: u32,
    /// Trials whose kill landed inside the named step (from the job's events).
    in_step: std::collections::BTreeMap<String, u32>,
}

impl Tally {
    fn print(&self, kind: &str, seed: u64) {
        eprintln!(
            "crash {kind}: {} trials, {} all-old, {} all-new, killed during: {:?}, 0 violations (seed {seed})",
            self.trials, self.old, self.new, self.in_step
        );
    }
}

/// Every event of a job, in order; checks they are contiguous from 1 and end with exactly one
/// terminal state event.
async fn check_events(c: &mut Client, id: &str, ctx: &str) -> Vec<pb::JobEvent> {
    let mut s = events(c, id).await;
    let mut all = Vec::new();
    while let Ok(Ok(Some(e))) = tokio::time::timeout(Duration::from_secs(30), s.message()).await {
        all.push(e);
    }
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "{ctx}: events contiguous: {all:#?}");
    }
    let terminal = |e: &pb::JobEvent| {
        matches!(&e.event, Some(pb::job_event::Event::StateChanged(s))
            if matches!(pb::JobState::try_from(s.to), Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)))
    };
    assert_eq!(
        all.iter().filter(|e| terminal(e)).count(),
        1,
        "{ctx}: one terminal event"
    );
    assert!(terminal(all.last().unwrap()), "{ctx}: it comes last");
    all
}

/// The step a job was in when it was killed: started, not finished before the restart.
fn killed_in(events: &[pb::JobEvent]) -> String {
    let mut current = "before the first step".to_owned();
    for e in events {
        match &e.event {
            Some(pb::job_event::Event::StepStarted(s)) => current = s.name.clone(),
            Some(pb::job_event::Event::StepFinished(_)) => current = "between steps".into(),
            Some(pb::job_event::Event::Log(l)) if l.message.starts_with("the daemon restarted") => {
                return current;
            }
            _ => {}
        }
    }
    "after the end".into()
}

/// Files under `dir` (recursively) that an interrupted atomic write leaves.
fn temps_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(".stately-") {
            out.push(p.clone());
        }
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.extend(temps_under(&p));
        }
    }
    out
}

/// No job of the daemon is left RUNNING, PENDING or CANCELLING, or with its unwind incomplete.
async fn assert_all_ended(c: &mut Client, ctx: &str) {
    let jobs = c
        .list_jobs(pb::ListJobsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    for j in jobs {
        assert!(
            matches!(
                state(&j),
                pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled
            ) && !j.unwind_incomplete,
            "{ctx}: job left unresolved: {j:?}"
        );
    }
}

fn crash_runbook(root: &Path, url: &str) -> String {
    let root = root.display();
    format!(
        r#"
[[runbook]]
name = "crash-files"
roots = ["{root}"]
resources = ["file:crash"]
[runbook.params.v]
pattern = "[0-9]+"
[[runbook.step]]
type = "write_file"
path = "{root}/a.txt"
content = "{{v}}\n"
mode = "0640"
[[runbook.step]]
type = "write_file"
path = "{root}/b.key"
content = "key {{v}}\n"
mode = "0600"
[[runbook.step]]
type = "download"
url = "{url}?v={{v}}"
path = "{root}/c.bin"
max_bytes = 4000000
[[runbook.step]]
type = "write_file"
path = "{root}/d.txt"
content = "{{v}}\n"
"#
    )
}

/// The version the runbook's files hold, with their modes; panics when they disagree.
fn files_version(root: &Path, ctx: &str) -> String {
    let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap();
    let mode = |f: &str| {
        std::fs::metadata(root.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    let a = read("a.txt");
    assert_eq!(read("b.key"), format!("key {a}"), "{ctx}: b.key");
    assert_eq!(read("d.txt"), a, "{ctx}: d.txt");
    assert_eq!(
        std::fs::metadata(root.join("c.bin")).unwrap().len(),
        2_000_000,
        "{ctx}: c.bin"
    );
    assert_eq!(
        (mode("a.txt"), mode("b.key")),
        (0o640, 0o600),
        "{ctx}: modes"
    );
    a.trim().to_owned()
}

/// A file trial's outcome: succeeded, so all new (the version is now `v`); failed by the
/// restart, so all old; nothing else.
fn judge_files(
    ended: &pb::Job,
    now: &str,
    v: String,
    version: &mut String,
    tally: &mut Tally,
    ctx: &str,
) {
    match state(ended) {
        pb::JobState::Succeeded => {
            assert_eq!(now, v, "{ctx}: succeeded, so all new");
            tally.new += 1;
            *version = v;
        }
        pb::JobState::Failed => {
            assert_eq!(now, version, "{ctx}: interrupted, so all old: {ended:?}");
            assert!(
                ended.error.contains("interrupted by restart"),
                "{ctx}: {}",
                ended.error
            );
            tally.old += 1;
        }
        s => panic!("{ctx}: ended {s:?}"),
    }
}

#[tokio::test]
async fn sigkill_at_random_moments_of_runbook_file_steps_leaves_all_old_or_all_new() {
    let seed = crash_seed("runbook");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    static BODY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let body: &'static [u8] = BODY.get_or_init(|| vec![b'x'; 2_000_000]);
    let url = http_server(body).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("files");
    std::fs::create_dir_all(&root).unwrap();
    let mut d = Daemon::start(&format!(
        "[certificates]\nrenew_check = \"0s\"\n{}",
        crash_runbook(&root, &url)
    ));
    // rename the roots: the runbook's root is ours, not the daemon's default test root.
    let mut c = d.client().await;
    let first = c
        .submit_job(runbook("crash-files", &[("v", "0")]))
        .await
        .unwrap()
        .into_inner();
    let t = Instant::now();
    let done = wait_end(&mut c, &first.id).await;
    let took = t.elapsed();
    assert_eq!(state(&done), pb::JobState::Succeeded, "{done:?}");
    let mut version = "0".to_owned();
    let mut tally = Tally::default();
    let window = took.as_micros().max(2000) as u64 * 3;
    for trial in 1..=40u32 {
        let ctx = format!("seed {seed}, trial {trial}");
        let delay = Duration::from_micros(rng.random_range(0..window));
        let v = trial.to_string();
        let mut c = d.client().await;
        let job = c
            .submit_job(runbook("crash-files", &[("v", &v)]))
            .await
            .unwrap()
            .into_inner();
        tokio::time::sleep(delay).await;
        d.kill9();
        d.spawn();
        let mut c = d.client().await;
        let ended = wait_end(&mut c, &job.id).await;
        let events = check_events(&mut c, &job.id, &ctx).await;
        *tally.in_step.entry(killed_in(&events)).or_default() += 1;
        let now = files_version(&root, &ctx);
        judge_files(&ended, &now, v, &mut version, &mut tally, &ctx);
        let temps = temps_under(dir.path());
        assert!(temps.is_empty(), "{ctx}: temp files left: {temps:?}");
        let temps = temps_under(&d.data());
        assert!(
            temps.is_empty(),
            "{ctx}: temp files in the data directory: {temps:?}"
        );
        assert_all_ended(&mut c, &ctx).await;
        tally.trials += 1;
    }
    tally.print("runbook", seed);
    assert!(
        tally.old > 0 && tally.new > 0,
        "both outcomes were hit: {tally:?}"
    );
}

fn proxies_in(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next()) {
                (Some("frontend" | "backend" | "listen"), Some(n)) => Some(n.to_owned()),
                _ => None,
            }
        })
        .collect()
}

/// Waits (bounded) until HAProxy serves exactly the proxies of the file on disk.
async fn assert_serves_the_file(h: &Haproxy, ctx: &str) {
    let want = proxies_in(&std::fs::read_to_string(&h.config).unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let have: BTreeSet<String> = show_stat(&h.stats)
            .into_iter()
            .map(|r| r.proxy.to_string())
            .collect();
        if have == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{ctx}: HAProxy serves {have:?}, the file says {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sigkill_around_an_applys_reload_leaves_haproxy_serving_the_file_on_disk() {
    let seed = crash_seed("apply");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(0).await;
    let h = Haproxy::start(dir.path(), &[("web", vec![("s1", backend.port)])]);
    let mut d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nconfig = \"{}\"\nmaster_socket = \"{}\"\nstats_socket = \"{}\"\n",
        h.config.display(),
        h.dir.join("master.sock").display(),
        h.stats.display()
    ));
    let base = std::fs::read_to_string(&h.config).unwrap();
    let with = |n: u32| {
        format!(
            "{base}frontend t{n}\n  bind 127.0.0.1:{}\n  http-request return status 200 content-type text/plain string t{n}\n",
            free_port()
        )
    };
    // How long an apply takes here, to spread the kills over it.
    let mut c = d.client().await;
    let t = Instant::now();
    let job = c
        .submit_job(apply_req(&with(0)))
        .await
        .unwrap()
        .into_inner();
    let done = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{done:?}");
    let window = t.elapsed().as_micros() as u64 * 5 / 4;
    let mut tally = Tally::default();
    for trial in 1..=30u32 {
        let ctx = format!("seed {seed}, trial {trial}");
        let before = std::fs::read_to_string(&h.config).unwrap();
        let new = with(trial);
        let mut c = d.client().await;
        let job = c.submit_job(apply_req(&new)).await.unwrap().into_inner();
        tokio::time::sleep(Duration::from_micros(rng.random_range(0..window))).await;
        d.kill9();
        d.spawn();
        let mut c = d.client().await;
        let ended = wait_end(&mut c, &job.id).await;
        let events = check_events(&mut c, &job.id, &ctx).await;
        *tally.in_step.entry(killed_in(&events)).or_default() += 1;
        let now = std::fs::read_to_string(&h.config).unwrap();
        match state(&ended) {
            pb::JobState::Succeeded => {
                assert_eq!(now, new, "{ctx}: succeeded, so the new file");
                tally.new += 1;
            }
            pb::JobState::Failed => {
                assert_eq!(
                    now, before,
                    "{ctx}: interrupted, so the old file: {ended:?}"
                );
                tally.old += 1;
            }
            s => panic!("{ctx}: ended {s:?}"),
        }
        assert_serves_the_file(&h, &ctx).await;
        let temps = temps_under(dir.path());
        assert!(temps.is_empty(), "{ctx}: temp files left: {temps:?}");
        assert_all_ended(&mut c, &ctx).await;
        tally.trials += 1;
    }
    tally.print("apply", seed);
    assert!(
        tally.in_step.get("reload").copied().unwrap_or(0) > 0,
        "some kills landed in the reload: {tally:?}"
    );
}

fn apply_req(config: &str) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::HaproxyApply(pb::HaproxyApplyJob {
                target: "edge".into(),
                config: config.into(),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

/// The version a lineage's live links point to; panics unless all four agree and the bundle
/// is that version's fullchain and key.
fn lineage_version(root: &Path, bundles: &Path, ctx: &str) -> u32 {
    let live = root.join("live/example.test");
    let mut versions = BTreeSet::new();
    for f in ["cert", "chain", "fullchain", "privkey"] {
        let target = std::fs::read_link(live.join(format!("{f}.pem"))).unwrap();
        let name = target.file_name().unwrap().to_string_lossy().into_owned();
        let n: u32 = name
            .trim_start_matches(f)
            .trim_end_matches(".pem")
            .parse()
            .unwrap_or_else(|_| panic!("{ctx}: {f}.pem -> {name}"));
        versions.insert(n);
    }
    assert_eq!(
        versions.len(),
        1,
        "{ctx}: live links at one version: {versions:?}"
    );
    let read = |f: &str| std::fs::read_to_string(live.join(format!("{f}.pem"))).unwrap();
    let bundle = std::fs::read_to_string(bundles.join("example.test.pem")).unwrap();
    assert_eq!(
        bundle,
        format!("{}{}", read("fullchain"), read("privkey")),
        "{ctx}: the bundle is that version's"
    );
    assert_eq!(
        std::fs::metadata(bundles.join("example.test.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600,
        "{ctx}: the bundle keeps its mode"
    );
    *versions.iter().next().unwrap()
}

#[tokio::test]
async fn sigkill_during_a_certificate_reissue_leaves_the_lineage_at_one_version() {
    let seed = crash_seed("certificate");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let port = free_port();
    let p = Pebble::start(port);
    let dir = tempfile::tempdir().unwrap();
    let (root, bundles) = (dir.path().join("le"), dir.path().join("bundles"));
    let mut d = Daemon::start(&format!(
        "[certificates]\nroot = \"{}\"\nhaproxy_dir = \"{}\"\ndefault_acme = \"pebble\"\nrenew_check = \"0s\"\nresponder = \"127.0.0.1:{port}\"\nchallenge_probe = \"127.0.0.1:{port}\"\n{}",
        root.display(),
        bundles.display(),
        p.config()
    ));
    let issue = || pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::CertificateIssue(
                pb::CertificateIssueJob {
                    names: vec!["example.test".into()],
                    ..Default::default()
                },
            )),
        }),
        ..Default::default()
    };
    let mut c = d.client().await;
    let t = Instant::now();
    let job = c.submit_job(issue()).await.unwrap().into_inner();
    let first = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&first), pb::JobState::Succeeded, "{first:?}");
    let window = t.elapsed().as_micros() as u64 * 5 / 4;
    let mut version = lineage_version(&root, &bundles, "first issue");
    let mut tally = Tally::default();
    for trial in 1..=16u32 {
        let ctx = format!("seed {seed}, trial {trial}");
        let mut c = d.client().await;
        let job = c.submit_job(issue()).await.unwrap().into_inner();
        tokio::time::sleep(Duration::from_micros(rng.random_range(0..window))).await;
        d.kill9();
        d.spawn();
        let mut c = d.client().await;
        let ended = wait_end(&mut c, &job.id).await;
        let events = check_events(&mut c, &job.id, &ctx).await;
        *tally.in_step.entry(killed_in(&events)).or_default() += 1;
        let now = lineage_version(&root, &bundles, &ctx);
        match state(&ended) {
            pb::JobState::Succeeded => {
                assert!(now > version, "{ctx}: succeeded, so a new version");
                version = now;
                tally.new += 1;
            }
            pb::JobState::Failed => {
                assert_eq!(
                    now, version,
                    "{ctx}: interrupted, so the old version: {ended:?}"
                );
                tally.old += 1;
            }
            s => panic!("{ctx}: ended {s:?}"),
        }
        let temps = temps_under(dir.path());
        assert!(
            temps.is_empty(),
            "{ctx}: temp files left (a key among them?): {temps:?}"
        );
        assert_all_ended(&mut c, &ctx).await;
        tally.trials += 1;
    }
    tally.print("certificate", seed);
}

fn add_server_req(name: &str, port: u16) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::HaproxyEdit(pb::HaproxyEditJob {
                target: "edge".into(),
                edits: vec![pb::HaproxyEdit {
                    op: Some(pb::haproxy_edit::Op::AddServer(pb::AddServerEdit {
                        backend: "web".into(),
                        name: name.into(),
                        address: format!("127.0.0.1:{port}"),
                        options: vec![],
                    })),
                }],
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn sigkill_during_a_runtime_add_server_leaves_file_and_haproxy_agreeing() {
    let seed = crash_seed("runtime-edit");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(0).await;
    // No health checks, so no default-server: the backend takes servers at runtime.
    let h = Haproxy::start_with(dir.path(), &[("web", vec![("s1", backend.port)])], false);
    let mut d = Daemon::start(&format!(
        "[[haproxy]]\nname = \"edge\"\nconfig = \"{}\"\nmaster_socket = \"{}\"\nstats_socket = \"{}\"\n",
        h.config.display(),
        h.dir.join("master.sock").display(),
        h.stats.display()
    ));
    let mut c = d.client().await;
    let t = Instant::now();
    let job = c
        .submit_job(add_server_req("t0", backend.port))
        .await
        .unwrap()
        .into_inner();
    let done = wait_end(&mut c, &job.id).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{done:?}");
    assert!(
        done.steps
            .iter()
            .any(|s| s.name == "change servers at runtime")
    );
    let window = t.elapsed().as_micros() as u64 * 5 / 4;
    let in_haproxy = |name: &str| show_stat(&h.stats).iter().any(|r| r.server == name);
    let mut tally = Tally::default();
    for trial in 1..=40u32 {
        let ctx = format!("seed {seed}, trial {trial}");
        let name = format!("t{trial}");
        let before = std::fs::read_to_string(&h.config).unwrap();
        let mut c = d.client().await;
        let job = c
            .submit_job(add_server_req(&name, backend.port))
            .await
            .unwrap()
            .into_inner();
        // Every other kill in the later part of the job, where `haproxy -c` (most of its
        // time) is over and the swap and the runtime change happen.
        let from = if trial % 2 == 0 { window / 3 } else { 0 };
        tokio::time::sleep(Duration::from_micros(rng.random_range(from..window))).await;
        d.kill9();
        d.spawn();
        let mut c = d.client().await;
        let ended = wait_end(&mut c, &job.id).await;
        let events = check_events(&mut c, &job.id, &ctx).await;
        *tally.in_step.entry(killed_in(&events)).or_default() += 1;
        let now = std::fs::read_to_string(&h.config).unwrap();
        let line = format!("  server {name} 127.0.0.1:{}\n", backend.port);
        match state(&ended) {
            pb::JobState::Succeeded => {
                assert_eq!(
                    now,
                    format!("{before}{line}"),
                    "{ctx}: the file has the server"
                );
                assert!(in_haproxy(&name), "{ctx}: and so has HAProxy");
                tally.new += 1;
            }
            pb::JobState::Failed => {
                assert_eq!(
                    now, before,
                    "{ctx}: interrupted, so the old file: {ended:?}"
                );
                assert!(!in_haproxy(&name), "{ctx}: and HAProxy has no {name}");
                tally.old += 1;
            }
            s => panic!("{ctx}: ended {s:?}"),
        }
        let temps = temps_under(dir.path());
        assert!(temps.is_empty(), "{ctx}: temp files left: {temps:?}");
        assert_all_ended(&mut c, &ctx).await;
        tally.trials += 1;
    }
    tally.print("runtime add_server", seed);
    let late: u32 = [
        "swap the configuration",
        "change servers at runtime",
        "check the edits work",
    ]
    .iter()
    .map(|s| tally.in_step.get(*s).copied().unwrap_or(0))
    .sum();
    assert!(
        late > 0 && tally.old > 0 && tally.new > 0,
        "kills landed after the validation, and both outcomes were seen: {tally:?}"
    );
}

#[tokio::test]
async fn sigkill_during_a_certificate_delete_leaves_the_lineage_all_there_or_all_gone() {
    let seed = crash_seed("certificate-delete");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let port = free_port();
    let p = Pebble::start(port);
    let dir = tempfile::tempdir().unwrap();
    let (root, bundles) = (dir.path().join("le"), dir.path().join("bundles"));
    let mut d = Daemon::start(&format!(
        "[certificates]\nroot = \"{}\"\nhaproxy_dir = \"{}\"\ndefault_acme = \"pebble\"\nrenew_check = \"0s\"\nresponder = \"127.0.0.1:{port}\"\nchallenge_probe = \"127.0.0.1:{port}\"\n{}",
        root.display(),
        bundles.display(),
        p.config()
    ));
    let mut c = d.client().await;
    let issue = c
        .submit_job(pb::SubmitJobRequest {
            node: String::new(),
            spec: Some(pb::JobSpec {
                kind: Some(pb::job_spec::Kind::CertificateIssue(
                    pb::CertificateIssueJob {
                        names: vec!["gone.example.test".into()],
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        state(&wait_end(&mut c, &issue.id).await),
        pb::JobState::Succeeded
    );
    let places = [
        root.join("live/gone.example.test"),
        root.join("archive/gone.example.test"),
        bundles.join("gone.example.test.pem"),
        d.data().join("renewal/gone.example.test.json"),
    ];
    let before = tree(&places);
    let delete = || pb::SubmitJobRequest {
        node: String::new(),
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::CertificateDelete(
                pb::CertificateDeleteJob {
                    lineage: "gone.example.test".into(),
                },
            )),
        }),
        ..Default::default()
    };
    // How long a delete takes, to aim the kills inside it.
    let t = Instant::now();
    let job = c.submit_job(delete()).await.unwrap().into_inner();
    assert_eq!(
        state(&wait_end(&mut c, &job.id).await),
        pb::JobState::Succeeded
    );
    let window = (t.elapsed().as_micros() as u64 * 5 / 4).max(1);
    rollback(&mut c, &job.id, false).await;
    assert_eq!(tree(&places), before, "the rollback put it back");
    let mut tally = Tally::default();
    for trial in 1..=12u32 {
        let ctx = format!("seed {seed}, trial {trial}");
        let mut c = d.client().await;
        let job = c.submit_job(delete()).await.unwrap().into_inner();
        tokio::time::sleep(Duration::from_micros(rng.random_range(0..window))).await;
        d.kill9();
        d.spawn();
        let mut c = d.client().await;
        let ended = wait_end(&mut c, &job.id).await;
        let events = check_events(&mut c, &job.id, &ctx).await;
        *tally.in_step.entry(killed_in(&events)).or_default() += 1;
        match state(&ended) {
            pb::JobState::Succeeded => {
                assert!(tree(&places).is_empty(), "{ctx}: succeeded, so all gone");
                tally.new += 1;
                rollback(&mut c, &job.id, false).await;
            }
            pb::JobState::Failed => tally.old += 1,
            s => panic!("{ctx}: ended {s:?}"),
        }
        assert_eq!(
            tree(&places),
            before,
            "{ctx}: the lineage all there again, byte for byte"
        );
        let temps = temps_under(dir.path());
        assert!(temps.is_empty(), "{ctx}: temp files left: {temps:?}");
        assert_all_ended(&mut c, &ctx).await;
        tally.trials += 1;
    }
    tally.print("certificate-delete", seed);
}

/// Two nodes on one PostgreSQL ledger: a job submitted on A for B, B killed at a seeded random
/// moment — while it is told, takes (plans) the job, or runs its steps — and started again.
/// A's watch sees every event once, in order, through B's absence; B's files are all old or
/// all new; nothing is left behind; A never runs B's job.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_of_a_node_at_random_moments_of_a_job_submitted_on_another_leaves_all_old_or_all_new()
 {
    let seed = crash_seed("fleet");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    static BODY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let body: &'static [u8] = BODY.get_or_init(|| vec![b'x'; 2_000_000]);
    let url = http_server(body).await;
    let pg = crate::support::postgres::TestPostgres::start().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("files");
    std::fs::create_dir_all(&root).unwrap();
    let a = Daemon::start(&format!(
        "node = \"crash-a\"\n[store]\nurl = \"{}\"\n",
        pg.url()
    ));
    let mut b = Daemon::start(&format!(
        "node = \"crash-b\"\n[store]\nurl = \"{}\"\n[certificates]\nrenew_check = \"0s\"\n{}",
        pg.url(),
        crash_runbook(&root, &url)
    ));
    let for_b = |v: &str| {
        let mut req = runbook("crash-files", &[("v", v)]);
        req.node = "crash-b".into();
        req
    };
    let mut ca = a.client().await;
    let t = Instant::now();
    let first = ca.submit_job(for_b("0")).await.unwrap().into_inner();
    let done = wait_end(&mut ca, &first.id).await;
    let took = t.elapsed();
    assert_eq!(state(&done), pb::JobState::Succeeded, "{done:?}");
    let mut version = "0".to_owned();
    let mut tally = Tally::default();
    let window = took.as_micros().max(2000) as u64 * 2;
    for trial in 1..=20u32 {
        let ctx = format!("seed {seed}, trial {trial}");
        // Every other trial within the first 10 ms: while B is told of the job and plans it.
        let upto = if trial % 2 == 1 { 10_000 } else { window };
        let delay = Duration::from_micros(rng.random_range(0..upto));
        let v = trial.to_string();
        let job = ca.submit_job(for_b(&v)).await.unwrap().into_inner();
        tokio::time::sleep(delay).await;
        let killed_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        b.kill9();
        b.spawn();
        let ended = wait_end(&mut ca, &job.id).await;
        let events = check_events(&mut ca, &job.id, &ctx).await;
        let mut moment = killed_in(&events);
        let at_ms = |e: &pb::JobEvent| {
            e.at.as_ref()
                .map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        };
        if moment == "after the end" && events.last().is_some_and(|e| at_ms(e) > killed_at) {
            // No step was interrupted, and it ended after the kill: B had not started it.
            moment = "before it was taken or started".into();
        }
        *tally.in_step.entry(moment).or_default() += 1;
        let now = files_version(&root, &ctx);
        judge_files(&ended, &now, v, &mut version, &mut tally, &ctx);
        assert_eq!(ended.node, "crash-b", "{ctx}");
        for d in [dir.path().to_owned(), b.data(), a.data()] {
            let temps = temps_under(&d);
            assert!(temps.is_empty(), "{ctx}: temp files left: {temps:?}");
        }
        assert_all_ended(&mut ca, &ctx).await;
        tally.trials += 1;
    }
    assert!(!a.log().contains("took a job submitted"), "{}", a.log());
    tally.print("fleet", seed);
    assert!(
        tally.old > 0 && tally.new > 0,
        "both outcomes were hit: {tally:?}"
    );
}
