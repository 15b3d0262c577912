//! OCSP benchmark, run by `scripts/bench.sh` (or `cargo bench --bench ocsp
//! -- [--seconds N] [--out BENCHMARKS.md]`).
//!
//! Sets up its own installation in a temp dir (SoftHSM2 token, the shipped
//! policies plus a `bench` group with `approval = "auto"` + `open_enrollment = true`, `keyward
//! init`, `keyward serve` built with the same profile, as its own process on
//! a loopback port), issues 256 device certificates through the API, and
//! makes one OCSP request per certificate with the stock `openssl ocsp
//! -reqout` (SHA-1 CertIDs, as openssl sends them).
//!
//! Measures, at concurrency 16, responses/s with p50/p99 latency:
//! - from the cache: `POST /v1/ocsp` without a nonce, cycling through the
//!   256 certificates (warmed first: every response is pre-signed);
//! - cold: the same requests with a nonce, each signed in SoftHSM2.
//!
//! The load generator is a minimal HTTP/1.1 keep-alive client on raw
//! sockets (one connection per worker), so that it costs the shared 2 cores
//! as little as possible; it checks every status and reads every body.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keyward::softhsm::SoftHsm;
use secrecy::{ExposeSecret, SecretString};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LABEL: &str = "keyward-bench-ocsp";
const CERTS: usize = 256;

struct Args {
    seconds: u64,
    out: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        seconds: 10,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--seconds" => a.seconds = it.next().unwrap().parse().unwrap(),
            "--out" => a.out = Some(it.next().unwrap()),
            _ => {} // cargo bench passes --bench
        }
    }
    assert!(a.seconds >= 1, "--seconds must be at least 1");
    a
}

fn random_text(bytes: usize) -> String {
    hex::encode(keyward::auth::random_bytes(bytes).unwrap())
}

struct Daemon {
    child: Child,
    url: String,
    addr: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn install(dir: &Path, hsm: &SoftHsm) -> Daemon {
    let pin = SecretString::from(random_text(12));
    hsm.create_token(LABEL, &SecretString::from(random_text(12)), &pin)
        .unwrap();
    std::fs::write(dir.join("hsm.pin"), pin.expose_secret()).unwrap();
    std::fs::write(dir.join("pepper"), random_text(24)).unwrap();
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    std::fs::copy(repo.join("ca.toml"), policies.join("ca.toml")).unwrap();
    let enrollment = std::fs::read_to_string(repo.join("enrollment.toml")).unwrap();
    std::fs::write(
        policies.join("enrollment.toml"),
        format!(
            "{enrollment}\n# Benchmark only: issues to anyone who asks.\n[[group]]\nname = \"bench\"\nprofile = \"device\"\napproval = \"auto\"\nopen_enrollment = true\n"
        ),
    )
    .unwrap();
    let config = dir.join("keyward.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\
             [store]\ntype = \"sqlite\"\npath = \"keyward.db\"\n\
             [keystore]\ntype = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{LABEL}\"\npin_file = \"hsm.pin\"\nsessions = 2\n\
             [auth]\ntoken_pepper_file = \"pepper\"\n\
             [log]\nlevel = \"warn\"\n\
             # Benchmark only: every request comes from loopback.\n\
             [limits]\nregistrations_per_source = 1000000\nregistrations_window_secs = 1\n\
             ocsp_fresh_per_source = 1000000\nocsp_fresh_window_secs = 1\n",
            hsm.module().display()
        ),
    )
    .unwrap();
    let keyward = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_keyward"));
        c.env("SOFTHSM2_CONF", hsm.conf());
        c
    };
    let out = keyward()
        .arg("init")
        .arg("--config")
        .arg(&config)
        .arg("--token-out")
        .arg(dir.join("admin.token"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keyward init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = keyward()
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("keyward listening on ") {
                let _ = tx.send(url.to_string());
            }
        }
    });
    let url = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    assert!(!url.is_empty(), "keyward serve did not start");
    println!("==> daemon at {url} (pid {})", child.id());
    Daemon {
        addr: url.trim_start_matches("http://").to_string(),
        url,
        child,
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Issues `CERTS` device certificates (openssl keys and CSRs, the `bench`
/// group) and returns one OCSP request per certificate, without and with a
/// nonce.
async fn requests(url: &str, dir: &Path) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let client = reqwest::Client::new();
    let (mut plain, mut nonce) = (Vec::new(), Vec::new());
    for i in 0..CERTS {
        let csr = format!("d{i}.csr");
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-nodes",
                "-subj",
                "/CN=bench",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-keyout",
                &format!("d{i}.key"),
                "-out",
                &csr,
            ],
        );
        let csr = std::fs::read_to_string(dir.join(&csr)).unwrap();
        let resp: serde_json::Value = client
            .post(format!("{url}/v1/registrations"))
            .json(&serde_json::json!({ "csr": csr, "name": "bench", "group": "bench" }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let creds: serde_json::Value = client
            .get(format!(
                "{url}/v1/registrations/{}/credentials",
                resp["id"].as_str().unwrap()
            ))
            .bearer_auth(resp["secret"].as_str().unwrap())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        std::fs::write(
            dir.join(format!("d{i}.pem")),
            creds["certificate_pem"].as_str().unwrap(),
        )
        .unwrap();
        if i == 0 {
            let chain = creds["chain_pem"].as_str().unwrap();
            let issuing = chain
                .split_inclusive("-----END CERTIFICATE-----\n")
                .next()
                .unwrap();
            std::fs::write(dir.join("issuing.pem"), issuing).unwrap();
        }
        let cert = format!("d{i}.pem");
        for (with_nonce, list) in [(false, &mut plain), (true, &mut nonce)] {
            let out = format!("d{i}-{with_nonce}.req");
            let mut args = vec!["ocsp", "-issuer", "issuing.pem", "-cert", &cert];
            if !with_nonce {
                args.push("-no_nonce");
            }
            args.extend_from_slice(&["-reqout", &out]);
            openssl(dir, &args);
            list.push(std::fs::read(dir.join(&out)).unwrap());
        }
    }
    (plain, nonce)
}

/// One keep-alive connection: sends `POST /v1/ocsp`, reads one response.
struct Conn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: &str) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Returns the body length; panics unless the status is 200.
    /// (The OCSP steps count cache hits on the daemon to prove what answered.)
    async fn post(&mut self, head: &[u8], body: &[u8]) -> usize {
        let mut req = Vec::with_capacity(head.len() + body.len());
        req.extend_from_slice(head);
        req.extend_from_slice(body);
        self.stream.write_all(&req).await.unwrap();
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            let n = self.stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
            let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let headers = std::str::from_utf8(&self.buf[..end]).unwrap();
            assert!(headers.starts_with("HTTP/1.1 200"), "{headers}");
            let len: usize = headers
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap();
            while self.buf.len() < end + 4 + len {
                let n = self.stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed");
                self.buf.extend_from_slice(&chunk[..n]);
            }
            assert_eq!(self.buf.len(), end + 4 + len, "one response per request");
            return len;
        }
    }
}

struct Run {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    count: usize,
}

async fn load(addr: &str, bodies: Arc<Vec<Vec<u8>>>, concurrency: usize, secs: u64) -> Run {
    let heads = bodies
        .iter()
        .map(|b| {
            format!(
                "POST /v1/ocsp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/ocsp-request\r\nContent-Length: {}\r\n\r\n",
                b.len()
            )
            .into_bytes()
        })
        .collect();
    drive(addr, Arc::new(heads), bodies, concurrency, secs).await
}

async fn load_get(addr: &str, path: &str, concurrency: usize, secs: u64) -> Run {
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes();
    drive(
        addr,
        Arc::new(vec![head]),
        Arc::new(vec![Vec::new()]),
        concurrency,
        secs,
    )
    .await
}

/// `concurrency` workers, each on its own connection, send request `i`
/// (`heads[i]` then `bodies[i]`, cycling) until `secs` have passed.
async fn drive(
    addr: &str,
    heads: Arc<Vec<Vec<u8>>>,
    bodies: Arc<Vec<Vec<u8>>>,
    concurrency: usize,
    secs: u64,
) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..concurrency {
        conns.push(Conn::open(addr).await);
    }
    let start = Instant::now();
    for mut conn in conns {
        let (heads, bodies, stop, next) =
            (heads.clone(), bodies.clone(), stop.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed) % bodies.len();
                let t = Instant::now();
                conn.post(&heads[i], &bodies[i]).await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort();
    let pct =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1000.0;
    Run {
        rate: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        count: all.len(),
    }
}

/// One sample of the daemon's `/metrics`.
async fn metric(url: &str, sample: &str) -> f64 {
    reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}

fn main() -> ExitCode {
    let a = args();
    if cfg!(debug_assertions) {
        println!("==> debug build: a smoke run, the numbers mean nothing");
        assert!(a.out.is_none(), "--out needs a release build (cargo bench)");
    }
    let dir = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::prepare(dir.path()).unwrap();
    let daemon = install(dir.path(), &hsm);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(&a, &daemon, dir.path().to_path_buf()));
    ExitCode::SUCCESS
}

async fn run(a: &Args, daemon: &Daemon, dir: PathBuf) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    println!("==> issuing {CERTS} device certificates and making their OCSP requests");
    let (plain, nonce) = requests(&daemon.url, &dir).await;
    assert!(plain.iter().chain(&nonce).all(|r| r[0] == 0x30));
    let (plain, nonce) = (Arc::new(plain), Arc::new(nonce));
    const HITS: &str = "keyward_ocsp_cache_total{result=\"hit\"}";
    const MISSES: &str = "keyward_ocsp_cache_total{result=\"miss\"}";
    const SIGNS: &str =
        "keyward_hsm_operations_total{keystore=\"default\",operation=\"sign\",result=\"ok\"}";
    // Warm-up: every response pre-signed, connections and allocator warm.
    load(&daemon.addr, plain.clone(), 16, 2).await;
    let (h0, m0, s0) = (
        metric(&daemon.url, HITS).await,
        metric(&daemon.url, MISSES).await,
        metric(&daemon.url, SIGNS).await,
    );
    println!("==> step: cached (pid {})", daemon.child.id());
    let cached = load(&daemon.addr, plain.clone(), 16, a.seconds).await;
    let (h1, m1, s1) = (
        metric(&daemon.url, HITS).await,
        metric(&daemon.url, MISSES).await,
        metric(&daemon.url, SIGNS).await,
    );
    println!(
        "OCSP from the cache, concurrency 16: {:>8.0}/s  p50 {:>6.3} ms  p99 {:>6.3} ms  ({} responses; cache hits {}, misses {}, HSM signatures {})",
        cached.rate,
        cached.p50_ms,
        cached.p99_ms,
        cached.count,
        h1 - h0,
        m1 - m0,
        s1 - s0
    );
    // The floor the HTTP stack sets: `GET /healthz` through the same
    // middleware and the same load generator.
    println!("==> step: healthz");
    let healthz = load_get(&daemon.addr, "/healthz", 16, a.seconds.min(5)).await;
    println!(
        "GET /healthz (same stack, no responder), concurrency 16: {:>8.0}/s  p50 {:>6.3} ms  p99 {:>6.3} ms",
        healthz.rate, healthz.p50_ms, healthz.p99_ms
    );
    let cold_secs = a.seconds.min(5);
    let cold = load(&daemon.addr, nonce.clone(), 16, cold_secs).await;
    println!(
        "OCSP with a nonce (signed in SoftHSM2), concurrency 16: {:>8.0}/s  p50 {:>6.3} ms  p99 {:>6.3} ms  ({} responses)",
        cold.rate, cold.p50_ms, cold.p99_ms, cold.count
    );
    if let Some(out) = &a.out {
        let mut md = format!(
            "\n## OCSP — {}\n\nMachine: {}. Daemon: `keyward serve` (release) as its own process, SoftHSM2 token, 2 PKCS#11 sessions, delegated P-256 signer; load generator (raw HTTP/1.1 keep-alive, one connection per worker) in a second process on the same cores. {CERTS} device certificates, SHA-1 CertIDs from `openssl ocsp -reqout`. {} s per step ({} s cold).\n\n",
            time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
            machine(),
            a.seconds,
            cold_secs
        );
        md.push_str("| measurement | result |\n|---|---|\n");
        md.push_str(&format!(
            "| OCSP from the pre-signed cache, concurrency 16 (target ≥ 20,000/s) | {:.0}/s, p50 {:.3} ms, p99 {:.3} ms; {} cache hits, {} misses, {} HSM signatures in the step |\n",
            cached.rate, cached.p50_ms, cached.p99_ms, h1 - h0, m1 - m0, s1 - s0
        ));
        md.push_str(&format!(
            "| `GET /healthz` through the same middleware and load generator (the HTTP stack's ceiling here) | {:.0}/s, p50 {:.3} ms, p99 {:.3} ms |\n",
            healthz.rate, healthz.p50_ms, healthz.p99_ms
        ));
        md.push_str(&format!(
            "| OCSP with a nonce (a fresh SoftHSM2 signature each), concurrency 16 | {:.0}/s, p50 {:.3} ms, p99 {:.3} ms |\n",
            cold.rate, cold.p50_ms, cold.p99_ms
        ));
        let mut existing = std::fs::read_to_string(out).unwrap_or_else(|_| {
            "# keyward benchmarks\n\nProduced by `scripts/bench.sh`; newest run last. Numbers from one machine on one day: compare runs on the same machine only.\n".to_string()
        });
        existing.push_str(&md);
        std::fs::write(out, existing).unwrap();
    }
}
