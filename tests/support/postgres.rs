//! A PostgreSQL ledger for a test: a fresh schema in the cluster scripts/test.sh started
//! (`STATELY_TEST_POSTGRES`), or, when a test runs on its own, in a throwaway cluster of its
//! own (scripts/pg-test-cluster.sh), stopped when the value is dropped. Shared by the
//! library's unit tests and the integration tests.

use std::path::Path;

/// A schema of its own in a running PostgreSQL.
pub struct TestPostgres {
    /// The admin URL of the cluster.
    pub admin: String,
    /// The schema this test owns.
    pub schema: String,
    /// The cluster's directory when this test started it.
    cluster: Option<tempfile::TempDir>,
}

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg-test-cluster.sh")
}

impl TestPostgres {
    /// A fresh schema (and a cluster, when the test script gave none).
    pub async fn start() -> TestPostgres {
        Self::start_in(std::env::var("STATELY_TEST_POSTGRES").ok()).await
    }

    async fn start_in(shared: Option<String>) -> TestPostgres {
        let (admin, cluster) = match shared {
            Some(url) if !url.is_empty() => (url, None),
            _ => {
                let dir = tempfile::tempdir().expect("a temp dir");
                // The cluster runs as the postgres user, who must reach its directory.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                    .unwrap();
                let out = std::process::Command::new(script())
                    .arg("start")
                    .arg(dir.path().join("pg"))
                    .output()
                    .expect("scripts/pg-test-cluster.sh runs");
                assert!(
                    out.status.success(),
                    "a PostgreSQL cluster for the test: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
                (url, Some(dir))
            }
        };
        let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
        let client = Self::connect(&admin).await;
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .expect("a schema for the test");
        TestPostgres {
            admin,
            schema,
            cluster,
        }
    }

    /// The URL of a fresh schema in the run's cluster (`STATELY_TEST_POSTGRES`), made with
    /// psql: for code that is not async.
    pub fn schema_blocking() -> String {
        let admin = std::env::var("STATELY_TEST_POSTGRES").expect(
            "STATELY_TEST_STORE=postgres needs STATELY_TEST_POSTGRES (scripts/test.sh sets both)",
        );
        let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
        let out = std::process::Command::new("psql")
            .args([admin.as_str(), "-qc", &format!("CREATE SCHEMA {schema}")])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "a schema for the test: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!("{admin}?options=-c%20search_path%3D{schema}")
    }

    /// A schema in a cluster of its own, even in a run that shares one: for a test that stops
    /// and starts PostgreSQL.
    pub async fn own_cluster() -> TestPostgres {
        Self::start_in(None).await
    }

    /// A client of the cluster as its superuser.
    pub async fn connect(url: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("the test's PostgreSQL answers");
        tokio::spawn(conn);
        client
    }

    /// The URL of a ledger in this test's schema.
    pub fn url(&self) -> String {
        format!("{}?options=-c%20search_path%3D{}", self.admin, self.schema)
    }

    /// Turns TLS on in the cluster this test owns (the certificate and key given), and makes a
    /// role `stately` with `password` that may log in over TLS only, with SCRAM, owning this
    /// test's schema.
    pub async fn enable_tls(&self, cert: &Path, key: &Path, password: &str) {
        let data = self
            .cluster
            .as_ref()
            .expect("a cluster of the test's own")
            .path()
            .join("pg/data");
        for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
            let to = data.join(to);
            std::fs::copy(from, &to).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
            let status = std::process::Command::new("chown")
                .arg("postgres:")
                .arg(&to)
                .status()
                .unwrap();
            assert!(status.success());
        }
        let hba = data.join("pg_hba.conf");
        let old = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(
            &hba,
            format!(
                "hostnossl all stately 127.0.0.1/32 reject\nhostssl all stately 127.0.0.1/32 scram-sha-256\n{old}"
            ),
        )
        .unwrap();
        let admin = Self::connect(&self.admin).await;
        for sql in [
            "ALTER SYSTEM SET ssl = on".to_owned(),
            "SELECT pg_reload_conf()".to_owned(),
            format!("CREATE ROLE stately LOGIN PASSWORD '{password}'"),
            format!("GRANT ALL ON SCHEMA {} TO stately", self.schema),
        ] {
            admin.batch_execute(&sql).await.unwrap();
        }
    }

    /// The URL of this test's schema as the role `stately`, over TLS.
    pub fn tls_url(&self) -> String {
        let port = self
            .admin
            .rsplit_once(':')
            .unwrap()
            .1
            .split('/')
            .next()
            .unwrap();
        format!(
            "postgresql://stately@127.0.0.1:{port}/postgres?sslmode=require&options=-c%20search_path%3D{}",
            self.schema
        )
    }

    /// Restarts the cluster this test owns: `pg_ctl restart -m <mode>` (fast: sessions are
    /// ended politely; immediate: as a crash, recovered from the WAL at the start).
    pub fn restart(&self, mode: &str) {
        let dir = self
            .cluster
            .as_ref()
            .expect("a cluster of the test's own")
            .path()
            .join("pg");
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .unwrap()
            .map(|e| e.unwrap().path().join("bin"))
            .max()
            .unwrap();
        let status = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("pg_ctl"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-m", mode, "-w", "restart", "-l"])
            .arg(dir.join("log"))
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl restart -m {mode}");
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if let Some(dir) = &self.cluster {
            let _ = std::process::Command::new(script())
                .arg("stop")
                .arg(dir.path().join("pg"))
                .status();
        }
    }
}
