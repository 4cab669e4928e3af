//! A real authoritative DNS server for the tests: Debian's BIND 9 (`named`), on a free
//! loopback port, primary for one zone whose every name resolves to 127.0.0.1, accepting
//! RFC 2136 updates signed with a TSIG key made here (or none, as a lagging secondary).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const NAMED: &str = "/usr/sbin/named";
pub const DIG: &str = "/usr/bin/dig";

pub struct Bind {
    child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub zone: String,
    /// The BIND key file the zone accepts updates with.
    pub key_file: PathBuf,
}

impl Bind {
    /// The primary of `zone`, accepting updates signed with its key.
    pub fn start(zone: &str) -> Bind {
        Self::start_with(zone, true)
    }

    /// With `updates` false, a server for the same zone that never gets the updates (a
    /// secondary that has not caught up).
    pub fn start_with(zone: &str, updates: bool) -> Bind {
        for bin in [NAMED, DIG] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is not installed; scripts/test.sh installs the Debian packages bind9 and bind9-dnsutils"
            );
        }
        use base64::Engine;
        let dir = tempfile::tempdir().unwrap();
        let secret: [u8; 32] = rand::random();
        let key_file = dir.path().join("stately.key");
        std::fs::write(
            &key_file,
            format!(
                "key \"stately-test\" {{\n\talgorithm hmac-sha256;\n\tsecret \"{}\";\n}};\n",
                base64::engine::general_purpose::STANDARD.encode(secret)
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("zone.db"),
            format!(
                "$TTL 60\n@ IN SOA ns1.{zone}. hostmaster.{zone}. 1 60 60 600 60\n@ IN NS ns1.{zone}.\nns1 IN A 127.0.0.1\n@ IN A 127.0.0.1\n* IN A 127.0.0.1\n"
            ),
        )
        .unwrap();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = super::free_port();
            let d = dir.path().display();
            std::fs::write(
                dir.path().join("named.conf"),
                format!(
                    r#"include "{d}/stately.key";
options {{
  directory "{d}";
  pid-file "{d}/named.pid";
  session-keyfile "{d}/session.key";
  listen-on port {port} {{ 127.0.0.1; }};
  listen-on-v6 {{ none; }};
  recursion no;
  dnssec-validation no;
  notify no;
}};
controls {{ }};
zone "{zone}" {{ type primary; file "{d}/zone.db"; allow-update {{ {allow} }}; }};
"#,
                    allow = if updates {
                        "key \"stately-test\";"
                    } else {
                        "none;"
                    }
                ),
            )
            .unwrap();
            let mut child = Command::new(NAMED)
                .args(["-g", "-c"])
                .arg(dir.path().join("named.conf"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("named.log")).unwrap())
                .spawn()
                .expect("named starts");
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let mut up = false;
            while std::time::Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                let log = std::fs::read_to_string(dir.path().join("named.log")).unwrap_or_default();
                if log.contains("running")
                    && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                {
                    up = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !up {
                let _ = child.kill();
                let _ = child.wait();
                assert!(
                    attempt < 5,
                    "named never served: {}",
                    std::fs::read_to_string(dir.path().join("named.log")).unwrap_or_default()
                );
                continue;
            }
            return Bind {
                child,
                dir,
                port,
                zone: zone.to_owned(),
                key_file,
            };
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The TXT values this server answers for `name`, as an authority.
    pub fn txt(&self, name: &str) -> Vec<String> {
        let out = Command::new(DIG)
            .args(["+norec", "+short", "+time=2", "+tries=2", "-p"])
            .arg(self.port.to_string())
            .arg("@127.0.0.1")
            .args([name, "TXT"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dig: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().trim_matches('"').to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The `[[dns]]` table for this zone (`more` lines appended), named "test".
    pub fn config(&self, more: &str) -> String {
        format!(
            "[[dns]]\nname = \"test\"\nzone = \"{}\"\nserver = \"{}\"\ntsig_key_file = \"{}\"\nnameserver_port = {}\n{more}\n",
            self.zone,
            self.addr(),
            self.key_file.display(),
            self.port
        )
    }

    /// What named logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("named.log")).unwrap_or_default()
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
