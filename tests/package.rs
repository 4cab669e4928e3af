//! The Debian package, installed for real with dpkg: binaries, the hardened unit (enabled),
//! the default config in /etc/stately as a conffile, data in /var/lib/stately, the stately
//! system user and group (whose members reach the daemon through its unix socket),
//! completions and the man page; an upgrade keeps an edited config and restarts the service;
//! a purge removes it all but the system user. The package is built from the binaries this
//! test run built (`scripts/package.sh --profile dev --no-build`).

use crate::support::free_port;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the package at `version` and returns its path.
fn package(version: &str) -> String {
    let out = run(Command::new("scripts/package.sh")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "--profile",
            "dev",
            "--no-build",
            "--fast",
            "--deb-version",
            version,
        ]));
    let deb = out.lines().last().unwrap_or_default().trim().to_owned();
    assert!(deb.ends_with(".deb"), "{out}");
    deb
}

/// Purges the package however the test ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "stately"]).output();
    }
}

fn mode(p: &str) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Stops the installed daemon however the test ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_debian_package_installs_upgrades_keeping_the_config_and_purges() {
    // The test purges what it installs: never on a machine where stately is installed for
    // real (its ledger would go with it).
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", "stately"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&installed.stdout).into_owned();
    assert!(
        !status.ends_with(" installed"),
        "the package stately is installed on this machine ({status}); this test installs and purges it, so it runs only where it is not"
    );
    let _ = Command::new("dpkg").args(["--purge", "stately"]).output();
    let deb = package("0.1.0-1");
    let _installed = Installed;
    run(Command::new("dpkg").args(["-i", &deb]));

    // What the package put where.
    for f in [
        "/usr/bin/statelyd",
        "/usr/bin/stately",
        "/usr/share/bash-completion/completions/stately",
        "/usr/share/zsh/vendor-completions/_stately",
        "/usr/share/fish/vendor_completions.d/stately.fish",
        "/usr/share/man/man1/stately.1.gz",
    ] {
        assert!(Path::new(f).exists(), "{f}");
    }
    let unit = [
        "/lib/systemd/system/statelyd.service",
        "/usr/lib/systemd/system/statelyd.service",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("the unit is installed");
    assert!(
        Path::new("/etc/systemd/system/multi-user.target.wants/statelyd.service").exists(),
        "the unit is enabled"
    );
    run(Command::new("systemd-analyze").args(["verify", unit]));
    let man = run(Command::new("sh").args(["-c", "zcat /usr/share/man/man1/stately.1.gz"]));
    assert!(man.contains(".TH stately"), "{man}");
    let passwd = run(Command::new("getent").args(["passwd", "stately"]));
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid < 1000, "a system user: {passwd}");
    assert_eq!(fields[6], "/usr/sbin/nologin", "{passwd}");
    let group = run(Command::new("getent").args(["group", "stately"]));
    let gid: u32 = group.split(':').nth(2).unwrap().parse().unwrap();
    assert_eq!(mode("/var/lib/stately"), 0o700);
    // It may hold tokens: root's alone (the daemon reads it as root).
    assert_eq!(mode("/etc/stately/stately.toml"), 0o600);
    assert_eq!(
        std::fs::metadata("/etc/stately/stately.toml")
            .unwrap()
            .uid(),
        0
    );
    assert!(
        run(Command::new("dpkg-query").args(["-W", "-f", "${Conffiles}", "stately"]))
            .contains("/etc/stately/stately.toml"),
        "the config is a conffile"
    );

    // The installed daemon on the installed config, as the unit starts it (systemd would make
    // /run/stately, its RuntimeDirectory).
    std::fs::create_dir_all("/run/stately").unwrap();
    run(Command::new("/usr/bin/statelyd").args([
        "--config",
        "/etc/stately/stately.toml",
        "--check-config",
    ]));
    let port = free_port();
    let mut daemon = Running(
        Command::new("/usr/bin/statelyd")
            .args([
                "--config",
                "/etc/stately/stately.toml",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !Path::new("/run/stately/stately.sock").exists()
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the installed statelyd did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A member of the stately group (here: nobody running with that group) is an operator
    // through the socket, with no token.
    use std::os::unix::process::CommandExt;
    let whoami = run(Command::new("/usr/bin/stately")
        .args(["--server", "unix:/run/stately/stately.sock", "whoami"])
        .env_clear()
        .env("HOME", "/nonexistent")
        .uid(65534)
        .gid(gid));
    assert!(
        whoami.starts_with("uid:65534 (operator, by unix peer)"),
        "{whoami}"
    );
    // Root, on loopback TCP, with the token statelyd generated in /var/lib/stately.
    let jobs = run(Command::new("/usr/bin/stately")
        .args([
            "--server",
            &format!("http://127.0.0.1:{port}"),
            "jobs",
            "list",
        ])
        .env_remove("STATELY_TOKEN")
        .env_remove("STATELY_DATA_DIR"));
    assert!(
        jobs.contains("no jobs") || jobs.is_empty() || jobs.contains("ID"),
        "{jobs}"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.0.wait();

    // An upgrade keeps the admin's edit of the config and restarts the service.
    let mut edited = std::fs::read_to_string("/etc/stately/stately.toml").unwrap();
    edited.push_str("\n# edited by the admin\nshutdown_grace = \"20s\"\n");
    std::fs::write("/etc/stately/stately.toml", &edited).unwrap();
    let deb2 = package("0.1.0-2");
    run(Command::new("dpkg").args(["-i", &deb2]));
    assert_eq!(
        run(Command::new("dpkg-query").args(["-W", "-f", "${Version}", "stately"])),
        "0.1.0-2"
    );
    assert_eq!(
        std::fs::read_to_string("/etc/stately/stately.toml").unwrap(),
        edited
    );
    assert!(!Path::new("/etc/stately/stately.toml.dpkg-dist").exists());
    // Where systemd runs (not inside this test's machine), the upgrade's postinst restarts the
    // unit rather than only starting it.
    let postinst = std::fs::read_to_string("/var/lib/dpkg/info/stately.postinst").unwrap();
    assert!(
        postinst.contains("_dh_action=restart")
            && postinst.contains("deb-systemd-invoke $_dh_action statelyd.service"),
        "{postinst}"
    );

    // A purge takes everything but the system user.
    run(Command::new("dpkg").args(["--purge", "stately"]));
    for gone in ["/usr/bin/statelyd", "/etc/stately", "/var/lib/stately"] {
        assert!(!Path::new(gone).exists(), "{gone} after purge");
    }
    assert!(
        Command::new("getent")
            .args(["passwd", "stately"])
            .status()
            .unwrap()
            .success()
    );
}
