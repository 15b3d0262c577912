//! Issuance benchmark, run by `scripts/bench.sh` (or `cargo bench --bench
//! issuance -- [--seconds N] [--out BENCHMARKS.md]`).
//!
//! Sets up its own installation in a temp dir: a SoftHSM2 token
//! (`keyward::softhsm`), the shipped policies plus a `bench` group with
//! `approval = "auto"` + `open_enrollment = true`, `keyward init`, and `keyward serve` (the binary
//! built with the same profile) as a separate process on a loopback port.
//!
//! Measures in one run: raw SoftHSM2 ECDSA P-256 signatures/s through the
//! KeyStore (1 and 2 signers), end-to-end issuances/s through the HTTP API at
//! concurrency 1, 16 and 64 with p50/p99 latency, and the rate of the check
//! the daemon makes on every certificate before storing it (the device
//! certificate's signature against the issuing CA, ring). Each issuance is one
//! `POST /v1/registrations` to a group with `approval = "auto"` + `open_enrollment = true`: CSR
//! verification, certificate built and signed in the HSM and checked,
//! registration, device, certificate and three audit events committed before
//! the answer. `keyward audit verify` checks the chain afterwards.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once, when this process loads it for the
//! raw rate, so the binary prepares the token directory and re-executes
//! itself with `SOFTHSM2_CONF` set (no process-global environment mutation).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keyward::keystore::pkcs11::{Pkcs11KeyStore, Pkcs11Settings, TokenSelector};
use keyward::keystore::{KeyAlgorithm, KeySpec, KeyStore};
use keyward::softhsm::SoftHsm;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use secrecy::{ExposeSecret, SecretString};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Set (to the work directory) in the re-executed child.
#[path = "issuance/wrk.rs"]
mod wrk;

const WORK_DIR: &str = "KEYWARD_BENCH_DIR";
const LABEL: &str = "keyward-bench";

struct Args {
    seconds: u64,
    out: Option<String>,
    /// Only the cost of audit checkpoints on issuance (see [`checkpoint_cost`]).
    checkpoint_cost: bool,
    /// Issue 12 modes (benches/issuance/wrk.rs).
    wrk: bool,
    scale: bool,
    idle_rss: bool,
    levers: bool,
    rounds: usize,
    devices: usize,
}

fn args() -> Args {
    let mut a = Args {
        seconds: 10,
        out: None,
        checkpoint_cost: false,
        wrk: false,
        scale: false,
        idle_rss: false,
        levers: false,
        rounds: 3,
        devices: 1_000_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--seconds" => a.seconds = it.next().unwrap().parse().unwrap(),
            "--out" => a.out = Some(it.next().unwrap()),
            "--checkpoint-cost" => a.checkpoint_cost = true,
            "--wrk" => a.wrk = true,
            "--scale" => a.scale = true,
            "--idle-rss" => a.idle_rss = true,
            "--levers" => {
                a.wrk = true;
                a.levers = true;
            }
            "--rounds" => a.rounds = it.next().unwrap().parse().unwrap(),
            "--devices" => a.devices = it.next().unwrap().parse().unwrap(),
            _ => {} // cargo bench passes --bench
        }
    }
    assert!(a.seconds >= 1, "--seconds must be at least 1");
    assert!(a.rounds >= 1, "--rounds must be at least 1");
    a
}

fn random_text(bytes: usize) -> String {
    hex::encode(keyward::auth::random_bytes(bytes).unwrap())
}

fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

/// The daemon under test; killed (by its own PID) when dropped.
struct Daemon {
    child: Child,
    url: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One installation in `dir`: token, secrets, policies, config, `keyward
/// init`, then `keyward serve`. Returns the daemon and the token's user PIN.
fn install(dir: &Path, hsm: &SoftHsm) -> (Daemon, PathBuf, SecretString) {
    let (config, pin) = prepare(dir, hsm);
    (start(hsm, &config), config, pin)
}

/// `keyward serve --config config`, waiting for its listening line.
fn start(hsm: &SoftHsm, config: &Path) -> Daemon {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .env("SOFTHSM2_CONF", hsm.conf())
        .arg("serve")
        .arg("--config")
        .arg(config)
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
    let url = rx.recv_timeout(Duration::from_secs(30));
    let daemon = Daemon {
        child,
        url: url.unwrap_or_default(),
    };
    assert!(!daemon.url.is_empty(), "keyward serve did not start");
    println!("==> daemon at {} (pid {})", daemon.url, daemon.child.id());
    daemon
}

/// Token, secrets, policies, config and `keyward init` in `dir`.
fn prepare(dir: &Path, hsm: &SoftHsm) -> (PathBuf, SecretString) {
    let pin = SecretString::from(random_text(12));
    hsm.create_token(LABEL, &SecretString::from(random_text(12)), &pin)
        .unwrap();
    write_private(&dir.join("hsm.pin"), pin.expose_secret());
    write_private(&dir.join("pepper"), &random_text(24));
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    std::fs::copy(repo.join("ca.toml"), policies.join("ca.toml")).unwrap();
    let enrollment = std::fs::read_to_string(repo.join("enrollment.toml")).unwrap();
    std::fs::write(policies.join("jwks.json"), jwt_key().1.to_string()).unwrap();
    std::fs::write(
        policies.join("enrollment.toml"),
        format!(
            "{enrollment}\n# Benchmark only: issues to anyone who asks.\n[[group]]\nname = \"bench\"\nprofile = \"device\"\napproval = \"auto\"\nopen_enrollment = true\n\n\
             # Attested, auto-approved: a bootstrap token, a JWT.\n\
             [[group]]\nname = \"bench-token\"\nprofile = \"device\"\napproval = \"auto\"\nattestation = {{ method = \"bootstrap-token\" }}\n\n\
             [[group]]\nname = \"bench-jwt\"\nprofile = \"device\"\napproval = \"auto\"\n\
             attestation = {{ method = \"jwt\", issuer = \"https://endorse.bench\", audience = \"keyward\", jwks_file = \"jwks.json\", device_claim = \"imsi\" }}\n"
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
             [limits]\nregistrations_per_source = 1000000\nregistrations_window_secs = 1\n",
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
    (config, pin)
}

async fn raw_rate(ks: Arc<dyn KeyStore>, signers: usize, secs: u64) -> f64 {
    let key = ks
        .generate(&KeySpec {
            id: uuid::Uuid::new_v4(),
            label: "bench-raw".into(),
            algorithm: KeyAlgorithm::EcdsaP256,
            extractable: false,
            usage: keyward::keystore::KeyUsage::Sign,
        })
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..signers {
        let (ks, h, stop, count) = (ks.clone(), key.handle.clone(), stop.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let msg = [7u8; 300];
            while !stop.load(Ordering::Relaxed) {
                ks.sign(&h, KeyAlgorithm::EcdsaP256, &msg).await.unwrap();
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let rate = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    ks.destroy(&key.handle).await.unwrap();
    rate
}

/// Distinct CSRs made with ring, cycled through by the load generator.
/// The benchmark's JWT issuer key (fixed per process) and its JWKS.
fn jwt_key() -> (&'static EcdsaKeyPair, serde_json::Value) {
    use base64::Engine;
    static KEY: std::sync::OnceLock<EcdsaKeyPair> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .unwrap();
        EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap()
    });
    let point = key.public_key().as_ref();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({ "keys": [{
        "kty": "EC", "crv": "P-256", "kid": "bench", "use": "sig", "alg": "ES256",
        "x": b64(&point[1..33]), "y": b64(&point[33..65]),
    }]});
    (key, jwks)
}

/// `n` ES256 JWTs, each with its own jti and device claim.
fn jwts(n: usize) -> Vec<String> {
    use base64::Engine;
    let (key, _) = jwt_key();
    let rng = ring::rand::SystemRandom::new();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = b64(br#"{"alg":"ES256","typ":"JWT","kid":"bench"}"#);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    (0..n)
        .map(|i| {
            let claims = serde_json::json!({
                "iss": "https://endorse.bench", "aud": "keyward", "iat": now,
                "exp": now + 3600, "jti": format!("bench-{i}"), "imsi": format!("4401{i:011}"),
            });
            let signing = format!("{header}.{}", b64(claims.to_string().as_bytes()));
            let sig = key.sign(&rng, signing.as_bytes()).unwrap();
            format!("{signing}.{}", b64(sig.as_ref()))
        })
        .collect()
}

fn csrs(n: usize) -> Vec<String> {
    use der::Encode;
    let rng = ring::rand::SystemRandom::new();
    (0..n)
        .map(|i| {
            let pkcs8 =
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
            let key =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
                    .unwrap();
            let info = x509_cert::request::CertReqInfo {
                version: x509_cert::request::Version::V1,
                subject: der::Decode::from_der(
                    &keyward::ca::x509::name_cn(&format!("bench-{i}")).unwrap(),
                )
                .unwrap(),
                public_key: spki::SubjectPublicKeyInfoOwned {
                    algorithm: spki::AlgorithmIdentifierOwned {
                        oid: const_oid::db::rfc5912::ID_EC_PUBLIC_KEY,
                        parameters: Some(const_oid::db::rfc5912::SECP_256_R_1.into()),
                    },
                    subject_public_key: der::asn1::BitString::from_bytes(key.public_key().as_ref())
                        .unwrap(),
                },
                attributes: Default::default(),
            };
            let sig = key.sign(&rng, &info.to_der().unwrap()).unwrap();
            let req = x509_cert::request::CertReq {
                info,
                algorithm: spki::AlgorithmIdentifierOwned {
                    oid: const_oid::db::rfc5912::ECDSA_WITH_SHA_256,
                    parameters: None,
                },
                signature: der::asn1::BitString::from_bytes(sig.as_ref()).unwrap(),
            };
            der::pem::encode_string(
                "CERTIFICATE REQUEST",
                der::pem::LineEnding::LF,
                &req.to_der().unwrap(),
            )
            .unwrap()
        })
        .collect()
}

struct Run {
    concurrency: usize,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    count: usize,
}

/// A client for the daemon: plain, or trusting only `root` (PEM) for HTTPS.
/// `reuse` keeps connections alive; without it every request opens a new
/// connection (resuming the TLS session where the server allows).
fn http_client(root: Option<&[u8]>, concurrency: usize, reuse: bool) -> reqwest::Client {
    let mut b =
        reqwest::Client::builder().pool_max_idle_per_host(if reuse { concurrency } else { 0 });
    if let Some(pem) = root {
        b = b.tls_certs_only(reqwest::Certificate::from_pem_bundle(pem).unwrap());
    }
    b.build().unwrap()
}

async fn e2e(
    client: &reqwest::Client,
    url: &str,
    bodies: Arc<Vec<String>>,
    concurrency: usize,
    secs: u64,
) -> Run {
    let endpoint = format!("{url}/v1/registrations");
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, endpoint, bodies, stop, next) = (
            client.clone(),
            endpoint.clone(),
            bodies.clone(),
            stop.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed) % bodies.len();
                let t = Instant::now();
                let resp = client
                    .post(&endpoint)
                    .header("content-type", "application/json")
                    .body(bodies[i].clone())
                    .send()
                    .await
                    .unwrap();
                let status = resp.status();
                let body = resp.bytes().await.unwrap();
                assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
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
        concurrency,
        rate: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        count: all.len(),
    }
}

/// One device certificate and its issuing CA's certificate, fetched through
/// the API like a device would (register, then fetch credentials).
async fn device_and_issuer(client: &reqwest::Client, url: &str, body: &str) -> (Vec<u8>, Vec<u8>) {
    let resp: serde_json::Value = client
        .post(format!("{url}/v1/registrations"))
        .header("content-type", "application/json")
        .body(body.to_string())
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
    let der = |pem: &str| der::pem::decode_vec(pem.as_bytes()).unwrap().1;
    let chain = creds["chain_pem"].as_str().unwrap();
    let issuer = chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap();
    (der(creds["certificate_pem"].as_str().unwrap()), der(issuer))
}

/// How fast the check the daemon makes on every issued certificate runs:
/// the device certificate's signature against the issuing CA's certificate
/// (`verify_issued_by`, ring), one thread.
fn verify_rate(cert: &[u8], issuer: &[u8], secs: u64) -> f64 {
    assert!(keyward::ca::x509::verify_issued_by(cert, issuer));
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        for _ in 0..64 {
            assert!(keyward::ca::x509::verify_issued_by(
                std::hint::black_box(cert),
                issuer
            ));
        }
        n += 64;
    }
    n as f64 / start.elapsed().as_secs_f64()
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
    let softhsm = std::process::Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{cores} cores, {cpu}; SoftHSM {softhsm}")
}

fn main() -> ExitCode {
    let Some(dir) = std::env::var_os(WORK_DIR) else {
        let dir = tempfile::tempdir().unwrap();
        let hsm = SoftHsm::prepare(dir.path()).unwrap();
        let status = Command::new(std::env::current_exe().unwrap())
            .args(std::env::args_os().skip(1))
            .env("SOFTHSM2_CONF", hsm.conf())
            .env(WORK_DIR, dir.path())
            .status()
            .unwrap();
        return ExitCode::from(status.code().unwrap_or(1) as u8);
    };
    let dir = PathBuf::from(dir);
    let hsm = SoftHsm::prepare(&dir).unwrap();
    let a = args();
    if cfg!(debug_assertions) {
        println!("==> debug build: a smoke run, the numbers mean nothing");
        assert!(a.out.is_none(), "--out needs a release build (cargo bench)");
    }
    let (daemon, config, pin) = install(&dir, &hsm);
    if a.checkpoint_cost {
        checkpoint_cost(&a, daemon, &hsm, &config, &dir);
        return ExitCode::SUCCESS;
    }
    if a.wrk || a.scale || a.idle_rss {
        if a.idle_rss {
            wrk::idle_rss_mode(&a, daemon, &hsm, &config);
        } else if a.wrk {
            wrk::wrk_mode(&a, daemon, &hsm, &config, pin, &dir);
        } else {
            wrk::scale_mode(&a, daemon, &hsm, &config, &dir);
        }
        return audit_verify(&config);
    }
    let https = |daemon: Daemon| {
        // The same installation served over HTTPS: keyward issues itself a
        // server certificate, its key in the same token.
        drop(daemon);
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(
            "[server.tls]\nissue = true\nissuer = \"devices\"\nip_addresses = [\"127.0.0.1\"]\n",
        );
        std::fs::write(&config, text).unwrap();
        let daemon = start(&hsm, &config);
        let root: Vec<u8> = rusqlite::Connection::open(dir.join("keyward.db"))
            .unwrap()
            .query_row("SELECT certificate FROM cas WHERE kind = 'root'", [], |r| {
                r.get(0)
            })
            .unwrap();
        let pem = der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, &root).unwrap();
        (daemon, pem.into_bytes())
    };
    let daemon = run(&a, daemon, hsm.module(), pin, https);
    let code = audit_verify(&config);
    drop(daemon);
    code
}

/// `keyward audit verify` over the installation's chain after a run.
fn audit_verify(config: &Path) -> ExitCode {
    println!("==> audit chain after the run");
    let status = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["audit", "verify", "--config"])
        .arg(config)
        .status()
        .unwrap();
    if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The HTTP measurements against `daemon`, then `to_https` restarts it with
/// TLS and the HTTPS ones follow. Returns the daemon still running.
fn run(
    a: &Args,
    daemon: Daemon,
    module: &Path,
    pin: SecretString,
    to_https: impl FnOnce(Daemon) -> (Daemon, Vec<u8>),
) -> Daemon {
    let url = daemon.url.clone();
    let url = url.as_str();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ks: Arc<dyn KeyStore> = Arc::new(
            Pkcs11KeyStore::open(Pkcs11Settings {
                module: module.to_path_buf(),
                selector: TokenSelector::Label(LABEL.to_string()),
                pin,
                sessions: 2,
            })
            .await
            .unwrap(),
        );
        let raw_secs = a.seconds.min(5);
        let raw1 = raw_rate(ks.clone(), 1, raw_secs).await;
        println!("raw SoftHSM2 P-256 through the KeyStore, 1 signer:  {raw1:>8.0} sig/s");
        let raw2 = raw_rate(ks.clone(), 2, raw_secs).await;
        println!("raw SoftHSM2 P-256 through the KeyStore, 2 signers: {raw2:>8.0} sig/s");
        ks.close().await.unwrap();

        let bodies: Arc<Vec<String>> = Arc::new(
            csrs(4096)
                .into_iter()
                .map(|c| serde_json::json!({ "csr": c, "name": "bench-device", "group": "bench" }).to_string())
                .collect(),
        );
        // Warm-up: connections, page cache, SQLite.
        let plain = http_client(None, 64, true);
        e2e(&plain, url, bodies.clone(), 16, 2).await;
        let mut runs = Vec::new();
        for c in [1, 16, 64] {
            let r = e2e(&plain, url, bodies.clone(), c, a.seconds).await;
            println!(
                "end-to-end issuance, concurrency {:>2}: {:>7.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} certificates)",
                r.concurrency, r.rate, r.p50_ms, r.p99_ms, r.count
            );
            runs.push(r);
        }
        let at16 = runs.iter().find(|r| r.concurrency == 16).map(|r| r.rate).unwrap_or(0.0);
        let ratio = at16 / raw2;
        println!("ratio end-to-end@16 / raw 2-signer: {ratio:.2} (target >= 0.30)");

        // Attested enrollment, auto-approved, at concurrency 16: a bootstrap
        // token (HMAC lookup + a counted use in the commit), a JWT (ES256
        // verification + a jti row in the commit).
        let admin = std::fs::read_to_string(
            PathBuf::from(std::env::var_os(WORK_DIR).unwrap()).join("admin.token"),
        )
        .unwrap();
        let minted: serde_json::Value = plain
            .post(format!("{url}/v1/admin/tokens"))
            .bearer_auth(admin.trim())
            .json(&serde_json::json!({ "group": "bench-token", "uses": 100000, "ttl_seconds": 86400 }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let secret = minted["secret"].as_str().unwrap().to_string();
        let token_bodies: Arc<Vec<String>> = Arc::new(
            csrs(1024)
                .into_iter()
                .map(|c| serde_json::json!({ "csr": c, "name": "bench-device",
                    "attestation": { "method": "bootstrap-token", "token": secret } }).to_string())
                .collect(),
        );
        let token_run = e2e(&plain, url, token_bodies, 16, a.seconds).await;
        println!(
            "attested issuance (bootstrap token), concurrency 16: {:>7.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
            token_run.rate, token_run.p50_ms, token_run.p99_ms
        );
        // Each JWT is usable once (replay): enough for the run at 3x the plain rate.
        let needed = ((at16 * 3.0) as usize * a.seconds as usize).max(2000);
        let csr_pool = csrs(1024);
        let jwt_bodies: Arc<Vec<String>> = Arc::new(
            jwts(needed)
                .into_iter()
                .enumerate()
                .map(|(i, t)| serde_json::json!({ "csr": csr_pool[i % csr_pool.len()], "name": "bench-device",
                    "attestation": { "method": "jwt", "token": t } }).to_string())
                .collect(),
        );
        let jwt_run = e2e(&plain, url, jwt_bodies, 16, a.seconds).await;
        println!(
            "attested issuance (JWT, ES256), concurrency 16: {:>7.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
            jwt_run.rate, jwt_run.p50_ms, jwt_run.p99_ms
        );
        let cost = |r: &Run| (1.0 - r.rate / at16) * 100.0;
        println!(
            "attestation cost against plain issuance@16: bootstrap token {:+.1}%, JWT {:+.1}% (target under 20%)",
            cost(&token_run),
            cost(&jwt_run)
        );

        // Issuance while the issuing CA's key rotates: the rotation starts a
        // third into the window; every request must still succeed (e2e
        // asserts 201 on each). Compared with a plain run just before it, on
        // the same (grown) database: the earlier runs had a smaller one.
        let before_rotation = e2e(&plain, url, bodies.clone(), 16, a.seconds).await;
        let rotation_cost = |r: &Run| (1.0 - r.rate / before_rotation.rate) * 100.0;
        let rotating = {
            let (client, url, admin) = (plain.clone(), url.to_string(), admin.trim().to_string());
            let delay = Duration::from_secs_f64(a.seconds as f64 / 3.0);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let t = Instant::now();
                let started: serde_json::Value = client
                    .post(format!("{url}/v1/admin/rotations"))
                    .bearer_auth(&admin)
                    .json(&serde_json::json!({ "purpose": "issuing-ca", "target": "devices", "reason": "benchmark" }))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let id = started["id"].as_str().unwrap().to_string();
                loop {
                    let r: serde_json::Value = client
                        .get(format!("{url}/v1/admin/rotations/{id}"))
                        .bearer_auth(&admin)
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    if ["activated", "retired", "destroyed"].contains(&r["step"].as_str().unwrap_or("")) {
                        return t.elapsed();
                    }
                    assert_eq!(r["attempts"], 0, "rotation step failed: {r}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let rotation_run = e2e(&plain, url, bodies.clone(), 16, a.seconds).await;
        let rotation_took = rotating.await.unwrap();
        println!(
            "issuance during an issuing-CA rotation, concurrency 16: {:>7.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms ({:+.1}% against {:.0}/s just before; rotation to activation {:.2} s; no request failed)",
            rotation_run.rate, rotation_run.p50_ms, rotation_run.p99_ms, -rotation_cost(&rotation_run), before_rotation.rate, rotation_took.as_secs_f64()
        );

        let (cert, issuer) = device_and_issuer(&plain, url, &bodies[0]).await;
        let verify = verify_rate(&cert, &issuer, a.seconds.min(3));
        // CPU the daemon spends re-verifying at the concurrency-16 rate, in cores.
        let verify_cores = at16 / verify;
        println!(
            "device certificate signature check (ring, 1 thread): {verify:>8.0}/s ({:.1} us each; {verify_cores:.2} core at the concurrency-16 rate)",
            1e6 / verify
        );

        // The same over HTTPS (rustls, server key in the same SoftHSM2 token).
        let (daemon, root) = tokio::task::block_in_place(|| to_https(daemon));
        let https_url = daemon.url.clone();
        assert!(https_url.starts_with("https://"), "{https_url}");
        let tls = http_client(Some(&root), 64, true);
        e2e(&tls, &https_url, bodies.clone(), 16, 2).await;
        let mut tls_runs = Vec::new();
        for c in [1, 16, 64] {
            let r = e2e(&tls, &https_url, bodies.clone(), c, a.seconds).await;
            println!(
                "end-to-end issuance over HTTPS, concurrency {:>2}: {:>7.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} certificates)",
                r.concurrency, r.rate, r.p50_ms, r.p99_ms, r.count
            );
            tls_runs.push(r);
        }
        // Every request on a new connection: a TLS handshake each (resumed
        // when the client offers its session, as a returning device would).
        let fresh = http_client(Some(&root), 16, false);
        let fresh_run = e2e(&fresh, &https_url, bodies.clone(), 16, a.seconds).await;
        println!(
            "end-to-end issuance over HTTPS, new connection per request, concurrency 16: {:>7.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
            fresh_run.rate, fresh_run.p50_ms, fresh_run.p99_ms
        );
        let tls16 = tls_runs.iter().find(|r| r.concurrency == 16).map(|r| r.rate).unwrap_or(0.0);
        let tls_ratio = tls16 / raw2;
        let change = (tls_ratio / ratio - 1.0) * 100.0;
        println!(
            "ratio end-to-end@16 over HTTPS / raw 2-signer: {tls_ratio:.2} ({change:+.1}% against plain HTTP; target within 15%)"
        );

        if let Some(out) = &a.out {
            let mut md = String::new();
            md.push_str(&format!(
                "\n## Issuance — {} \n\nMachine: {}. Daemon: `keyward serve` (release) as its own process, SQLite (WAL, synchronous=FULL, group commit), 2 PKCS#11 sessions; load generator in a second process on the same 2 cores. {} s per step.\n\n",
                time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap(),
                machine(),
                a.seconds
            ));
            md.push_str("| measurement | result |\n|---|---|\n");
            md.push_str(&format!("| raw SoftHSM2 ECDSA P-256 via KeyStore, 1 signer | {raw1:.0} sig/s |\n"));
            md.push_str(&format!("| raw SoftHSM2 ECDSA P-256 via KeyStore, 2 signers | {raw2:.0} sig/s |\n"));
            for r in &runs {
                md.push_str(&format!(
                    "| end-to-end issuance over HTTP, concurrency {} | {:.0}/s, p50 {:.2} ms, p99 {:.2} ms |\n",
                    r.concurrency, r.rate, r.p50_ms, r.p99_ms
                ));
            }
            md.push_str(&format!("| ratio end-to-end@16 / raw 2-signer (target ≥ 0.30) | {ratio:.2} |\n"));
            md.push_str(&format!(
                "| attested issuance, bootstrap token, auto-approved, concurrency 16 | {:.0}/s, p50 {:.2} ms, p99 {:.2} ms ({:.1}% below plain; target < 20%) |\n",
                token_run.rate, token_run.p50_ms, token_run.p99_ms, cost(&token_run)
            ));
            md.push_str(&format!(
                "| attested issuance, JWT (ES256, JWKS file), auto-approved, concurrency 16 | {:.0}/s, p50 {:.2} ms, p99 {:.2} ms ({:.1}% below plain; target < 20%) |\n",
                jwt_run.rate, jwt_run.p50_ms, jwt_run.p99_ms, cost(&jwt_run)
            ));
            md.push_str(&format!(
                "| issuance during an issuing-CA rotation (started a third into the window), concurrency 16 | {:.0}/s, p50 {:.2} ms, p99 {:.2} ms ({:+.1}% against {:.0}/s plain just before, same database; rotation to activation {:.2} s; no request failed) |\n",
                rotation_run.rate, rotation_run.p50_ms, rotation_run.p99_ms, -rotation_cost(&rotation_run), before_rotation.rate, rotation_took.as_secs_f64()
            ));
            md.push_str(&format!(
                "| device certificate signature check before storing (ring, 1 thread) | {verify:.0}/s, {:.1} µs each; {verify_cores:.2} core at the concurrency-16 rate |\n",
                1e6 / verify
            ));
            for r in &tls_runs {
                md.push_str(&format!(
                    "| end-to-end issuance over HTTPS (rustls, server key in the HSM, keep-alive), concurrency {} | {:.0}/s, p50 {:.2} ms, p99 {:.2} ms |\n",
                    r.concurrency, r.rate, r.p50_ms, r.p99_ms
                ));
            }
            md.push_str(&format!(
                "| end-to-end issuance over HTTPS, new connection per request (session resumption), concurrency 16 | {:.0}/s, p50 {:.2} ms, p99 {:.2} ms |\n",
                fresh_run.rate, fresh_run.p50_ms, fresh_run.p99_ms
            ));
            md.push_str(&format!(
                "| ratio end-to-end@16 over HTTPS / raw 2-signer (target: within 15% of plain HTTP) | {tls_ratio:.2} ({change:+.1}%) |\n"
            ));
            let mut existing = std::fs::read_to_string(out).unwrap_or_else(|_| {
                "# keyward benchmarks\n\nProduced by `scripts/bench.sh`; newest run last. Numbers from one machine on one day: compare runs on the same machine only.\n".to_string()
            });
            existing.push_str(&md);
            std::fs::write(out, existing).unwrap();
        }
        daemon
    })
}

/// What signing audit checkpoints costs issuance: end-to-end issuance at
/// concurrency 16 with the daemon restarted under three `[audit]` settings,
/// in alternating rounds (the database grows as the run goes on):
/// - baseline: no checkpoint is ever due (10,000,000 events, one day);
/// - default: every 10,000 events or 60 s;
/// - worst case: `checkpoint_every_events = 1`, i.e. a checkpoint on each
///   poll of the checkpoint job (1 s) that finds new events.
///
/// The periodic tail verification is set to a day in all three, so only
/// checkpointing differs. Checkpoints made are counted in the store.
fn checkpoint_cost(a: &Args, daemon: Daemon, hsm: &SoftHsm, config: &Path, dir: &Path) {
    stop_gracefully(daemon);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let base = std::fs::read_to_string(config).unwrap();
    let variants = [
        (
            "baseline (none due)",
            "checkpoint_every_events = 10000000\ncheckpoint_interval_secs = 86400\n",
        ),
        ("default (10,000 events / 60 s)", ""),
        (
            "worst case (every_events = 1)",
            "checkpoint_every_events = 1\n",
        ),
    ];
    let checkpoints = || -> i64 {
        rusqlite::Connection::open(dir.join("keyward.db"))
            .unwrap()
            .query_row("SELECT COUNT(*) FROM audit_checkpoints", [], |r| r.get(0))
            .unwrap()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bodies: Arc<Vec<String>> = Arc::new(
        csrs(4096)
            .into_iter()
            .map(|c| {
                serde_json::json!({ "csr": c, "name": "bench-device", "group": "bench" })
                    .to_string()
            })
            .collect(),
    );
    let client = http_client(None, 16, true);
    let rounds = 3;
    // Per variant: rates, checkpoints made, issuances.
    let mut results: Vec<(Vec<f64>, i64, usize)> = vec![(Vec::new(), 0, 0); variants.len()];
    for round in 0..rounds {
        for (i, (name, audit)) in variants.iter().enumerate() {
            std::fs::write(
                config,
                format!("{base}[audit]\nverify_interval_secs = 86400\n{audit}"),
            )
            .unwrap();
            let daemon = start(hsm, config);
            let before = checkpoints();
            let r = rt.block_on(async {
                e2e(&client, &daemon.url, bodies.clone(), 16, 2).await;
                e2e(&client, &daemon.url, bodies.clone(), 16, a.seconds).await
            });
            let made = checkpoints() - before;
            println!(
                "round {}: {name:<32} {:>7.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} issuances, {made} checkpoints signed)",
                round + 1,
                r.rate,
                r.p50_ms,
                r.p99_ms,
                r.count
            );
            results[i].0.push(r.rate);
            results[i].1 += made;
            results[i].2 += r.count;
            stop_gracefully(daemon);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let base_rate = mean(&results[0].0);
    let mut md = format!(
        "\n## Audit checkpoint cost on issuance — {}\n\nMachine: {}. `keyward serve` (release) as in the issuance benchmark; end-to-end issuance over HTTP at concurrency 16 (3 audit events per issuance), daemon restarted per setting, {rounds} alternating rounds of {} s (plus 2 s warm-up) each; `[audit] verify_interval_secs = 86400` in all. The checkpoint job polls once a second, so `checkpoint_every_events = 1` signs at most one checkpoint a second (each covering every event since the last).\n\n| setting | issuance/s (mean of rounds) | against baseline | checkpoints signed | rounds |\n|---|---|---|---|---|\n",
        time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap(),
        machine(),
        a.seconds
    );
    for ((name, _), (rates, made, count)) in variants.iter().zip(&results) {
        let m = mean(rates);
        let rounds_text: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
        println!(
            "{name:<32} mean {m:>7.0}/s  ratio {:.3} ({:+.1}%)  {made} checkpoints over {count} issuances",
            m / base_rate,
            (m / base_rate - 1.0) * 100.0
        );
        md.push_str(&format!(
            "| {name} | {m:.0} | {:.3} ({:+.1}%; target: cost < 5%) | {made} | {} |\n",
            m / base_rate,
            (m / base_rate - 1.0) * 100.0,
            rounds_text.join(", ")
        ));
    }
    if let Some(out) = &a.out {
        let mut existing = std::fs::read_to_string(out).unwrap_or_default();
        existing.push_str(&md);
        std::fs::write(out, existing).unwrap();
    }
}

/// SIGTERM, by PID, and wait: the daemon gives up the scheduler's leader
/// lease on the way out, so the next one leads (and checkpoints) at once
/// instead of after the lease's time to live.
fn stop_gracefully(mut daemon: Daemon) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(daemon.child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = daemon.child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Drop kills it.
}
