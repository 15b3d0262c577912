//! A real PostgreSQL for the tests, with a fresh database per [`TestDb`],
//! dropped (WITH (FORCE)) on drop.
//!
//! Which server, in this order:
//! 1. `KEYWARD_TEST_PG_URL` (an admin URL such as
//!    `postgres://postgres@127.0.0.1:54321/postgres`): scripts/test.sh starts
//!    a private cluster on a free port in a temp dir and exports it, so the
//!    whole run shares one server it owns and stops.
//! 2. Otherwise a private cluster started by this test process: Debian's
//!    `initdb` + `pg_ctl` (under /usr/lib/postgresql/<ver>/bin) in a temp dir,
//!    on a free loopback port, run as user `postgres` when we are root
//!    (initdb refuses root), stopped by `pg_ctl stop` when the last
//!    [`TestDb`] of the process is dropped.
//!
//! The machine's own server on :5432 is never used implicitly: the tests
//! own the server they run against.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// A private cluster owned by this process; stopped when dropped.
pub struct PrivateCluster {
    _dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    pub port: u16,
    /// `postgres://postgres@127.0.0.1:<port>/postgres`
    pub admin_url: String,
    /// How long initdb + start took.
    pub startup: Duration,
}

/// One fresh database on the test server.
pub struct TestDb {
    /// `postgres://postgres@127.0.0.1:<port>/<name>`
    pub url: String,
    pub name: String,
    pub port: u16,
    admin_url: String,
    _cluster: Option<Arc<PrivateCluster>>,
}

/// Directory of the PostgreSQL server binaries (`initdb`, `pg_ctl`, `postgres`).
pub fn pg_bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort();
    for v in versions.iter().rev() {
        let bin = v.join("bin");
        if bin.join("initdb").is_file() && bin.join("pg_ctl").is_file() {
            return bin;
        }
    }
    panic!(
        "PostgreSQL server binaries not found under /usr/lib/postgresql: run scripts/test.sh, \
         which installs Debian's `postgresql`"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs `program args` as `postgres` when `as_postgres`, else as ourselves.
fn pg_command(as_postgres: bool, program: &Path) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl PrivateCluster {
    /// initdb (no fsync: test data) and start on a free loopback port.
    pub fn start() -> Self {
        let started = Instant::now();
        let bin = pg_bin_dir();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("keyward-pg-")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir(&sock).unwrap();
        if as_postgres {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(st.success(), "chown of the test cluster dir failed");
        }
        let out = pg_command(as_postgres, &bin.join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let log = dir.path().join("postgres.log");
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=200 -c shared_buffers=64MB",
            sock.display()
        );
        let out = pg_command(as_postgres, &bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-o", &opts, "-w", "-t", "60", "start"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Self {
            _dir: dir,
            data,
            bin,
            as_postgres,
            port,
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            startup: started.elapsed(),
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = pg_command(self.as_postgres, &self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The process's private cluster, shared by its live [`TestDb`]s.
fn private_cluster() -> Arc<PrivateCluster> {
    static CLUSTER: OnceLock<Mutex<Weak<PrivateCluster>>> = OnceLock::new();
    let slot = CLUSTER.get_or_init(|| Mutex::new(Weak::new()));
    let mut guard = slot.lock().unwrap();
    if let Some(c) = guard.upgrade() {
        return c;
    }
    let c = Arc::new(PrivateCluster::start());
    *guard = Arc::downgrade(&c);
    c
}

/// `psql` against `url`, one SQL command; panics with psql's output on failure.
pub fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql `{sql}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Replaces the database name of a `postgres://` URL.
fn with_database(url: &str, name: &str) -> String {
    let (base, _) = url
        .rsplit_once('/')
        .expect("a postgres URL ends in /<database>");
    format!("{base}/{name}")
}

fn port_of(url: &str) -> u16 {
    url.rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(5432)
}

impl TestDb {
    /// A fresh, empty database named `keyward_test_<pid>_<random>`.
    pub fn create() -> Self {
        let (admin_url, cluster) = match std::env::var("KEYWARD_TEST_PG_URL") {
            Ok(url) if !url.is_empty() => (url, None),
            _ => {
                let c = private_cluster();
                (c.admin_url.clone(), Some(c))
            }
        };
        let name = format!(
            "keyward_test_{}_{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        psql(&admin_url, &format!("CREATE DATABASE {name}"));
        Self {
            url: with_database(&admin_url, &name),
            port: port_of(&admin_url),
            name,
            admin_url,
            _cluster: cluster,
        }
    }

    /// One SQL command on this database, as the superuser (tests that tamper).
    pub fn psql(&self, sql: &str) -> String {
        psql(&self.url, sql)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-X", "-q", "-d", &self.admin_url, "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
