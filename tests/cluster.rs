//! Several daemons, one deployment (issue 12): two real `keyward serve`
//! processes on one installation (config, policies, one SoftHSM2 token),
//! one PostgreSQL database (`TestDb`, a private cluster) and one
//! redis-server started here on a free port, each daemon on its own
//! loopback port. Load goes to both at once: registrations submitted on one
//! daemon, polled on the other, approved (and issued) on the first,
//! credentials fetched from the second; revocations on either. Checked with
//! tools keyward did not write where possible:
//! - no serial twice (`psql`), every certificate verifies once with
//!   `openssl verify`, and its serial (`openssl x509`) is the one stored;
//! - `keyward audit verify` exits 0; `seq` is gap-free from 1; each
//!   request's event (submit, approve, issue, revoke) is there exactly once;
//! - an approval made on A is seen at once by the device polling B;
//! - a revocation on A turns B's cached OCSP "good" into "revoked"
//!   (`openssl ocsp`) within 1 s;
//! - exactly one scheduler leader; SIGKILL to it (by PID) hands the lead
//!   to the other within the lease bound, audited as `scheduler.leader`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/postgres.rs"]
mod postgres;
#[path = "common/redis_server.rs"]
mod redis_server;

use common::{Daemon, Env, call, client, metrics_text, openssl_csr, write};
use postgres::TestDb;
use redis_server::RedisServer;
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The daemons' scheduler lease.
const LEASE: Duration = Duration::from_secs(2);
/// Devices issued under load (half submitted on each daemon).
const DEVICES: usize = 40;
/// Devices enrolled on the survivor while the leader is being killed.
const DURING_KILL: usize = 6;
/// Requests in flight at once across both daemons.
const CONCURRENCY: usize = 12;
/// The deployment's namespace in Redis.
const PREFIX: &str = "kw-cluster-test:";

/// The store both daemons share, read back with its own stock client.
enum Shared {
    /// A fresh database on a PostgreSQL of the test (`psql`).
    Postgres(TestDb),
    /// The installation's SQLite file (`sqlite3`): several daemons on one host.
    Sqlite(PathBuf),
}

impl Shared {
    /// One row per line, columns separated by `|`.
    fn rows(&self, sql: &str) -> Vec<String> {
        let text = match self {
            Shared::Postgres(db) => db.psql(sql),
            Shared::Sqlite(path) => {
                let out = Command::new("sqlite3")
                    .args(["-batch", "-noheader"])
                    .arg(path)
                    .arg(sql)
                    .output()
                    .expect("sqlite3 (Debian package sqlite3) missing");
                assert!(
                    out.status.success(),
                    "sqlite3 `{sql}`: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8(out.stdout).unwrap()
            }
        };
        text.lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect()
    }
}

/// Points `env`'s config at the shared store and `redis`, with a short lease.
fn cluster_config(env: &Env, shared: &Shared, redis: &RedisServer) {
    if let Shared::Postgres(db) = shared {
        env.set_store(&format!(
            "type = \"postgres\"\nurl = \"{}\"\npool_size = 4",
            db.url
        ));
    }
    // Every device of the test comes from 127.0.0.1, and the registration
    // bucket is shared by both daemons through Redis: raise it.
    env.append_config(&format!(
        "[redis]\nurl = \"{}\"\nkey_prefix = \"{PREFIX}\"\n\n\
         [scheduler]\nlease_seconds = {}\n\n\
         [limits]\nreadiness_max_age_secs = 3\nregistrations_per_source = 1000\n",
        redis.url(),
        LEASE.as_secs_f64()
    ));
}

/// `keyward_scheduler_leader` on `d`'s `/metrics`.
async fn leader_gauge(url: &str) -> i64 {
    let text = metrics_text(url).await;
    text.lines()
        .find_map(|l| l.strip_prefix("keyward_scheduler_leader "))
        .unwrap_or_else(|| panic!("no keyward_scheduler_leader on {url}"))
        .trim()
        .parse()
        .unwrap()
}

/// One sample of `d`'s `/metrics` (0 if absent).
async fn metric(url: &str, sample: &str) -> f64 {
    metrics_text(url)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A device issued through the two daemons.
struct Issued {
    registration: String,
    device_id: String,
    serial: String,
    cert: PathBuf,
    chain: PathBuf,
}

/// One device's life across the daemons: submit on `here`, the device
/// polls `there` (pending), an admin approves on `here`, and the very next
/// poll on `there` sees it issued; credentials come from `there`.
async fn enroll(here: &str, there: &str, admin: &str, csr: String, dir: PathBuf) -> Issued {
    let (status, sub) = call(
        Method::POST,
        &format!("{here}/v1/registrations"),
        None,
        Some(json!({ "csr": csr, "name": "cluster-device", "group": "default" })),
    )
    .await;
    assert_eq!(status, 201, "submit on {here}: {sub}");
    let id = sub["id"].as_str().unwrap().to_string();
    let secret = sub["secret"].as_str().unwrap().to_string();
    let poll = format!("{there}/v1/registrations/{id}");
    let (status, v) = call(Method::GET, &poll, Some(&secret), None).await;
    assert_eq!(status, 200, "poll on {there}: {v}");
    assert_eq!(v["status"], "pending", "{v}");

    let (status, v) = call(
        Method::POST,
        &format!("{here}/v1/admin/registrations/{id}/approve"),
        Some(admin),
        Some(json!({ "comment": "cluster test" })),
    )
    .await;
    assert_eq!(status, 200, "approve on {here}: {v}");
    assert_eq!(v["status"], "issued", "{v}");
    // No retry: the approval's commit returned before its answer, and the
    // other daemon reads PostgreSQL, not a copy of its own.
    let (status, v) = call(Method::GET, &poll, Some(&secret), None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["status"], "issued",
        "approval on {here} not seen on {there}: {v}"
    );

    let (status, creds) = call(
        Method::GET,
        &format!("{there}/v1/registrations/{id}/credentials"),
        Some(&secret),
        None,
    )
    .await;
    assert_eq!(status, 200, "credentials from {there}: {creds}");
    let (status, reg) = call(
        Method::GET,
        &format!("{there}/v1/admin/registrations/{id}"),
        Some(admin),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reg}");
    std::fs::create_dir_all(&dir).unwrap();
    Issued {
        registration: id,
        device_id: reg["device_id"].as_str().unwrap().to_string(),
        serial: reg["certificate_serial"].as_str().unwrap().to_string(),
        cert: write(&dir, "cert.pem", creds["certificate_pem"].as_str().unwrap()),
        chain: write(&dir, "chain.pem", creds["chain_pem"].as_str().unwrap()),
    }
}

/// The device's signed-nonce proof for `POST /v1/auth/token`, signed by the
/// stock openssl CLI with the device's key.
fn sign_token_proof(dir: &Path, device: &str, nonce_b64: &str, key: &Path) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut msg = b"keyward-token-v1\0".to_vec();
    msg.extend_from_slice(device.as_bytes());
    msg.push(0);
    msg.extend_from_slice(&b64.decode(nonce_b64).unwrap());
    let id = uuid::Uuid::new_v4();
    let (m, sig) = (dir.join(format!("{id}.msg")), dir.join(format!("{id}.sig")));
    std::fs::write(&m, &msg).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .arg("-out")
        .arg(&sig)
        .arg(&m)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b64.encode(std::fs::read(sig).unwrap())
}

/// A nonce handed out by one daemon is taken on the other (the shared
/// cache's atomic take), and only once: no load-balancer affinity between
/// `POST /v1/auth/nonce` and `POST /v1/auth/token`.
async fn nonce_on_one_daemon_token_on_the_other(a: &str, b: &str, admin: &str, dir: PathBuf) {
    std::fs::create_dir_all(&dir).unwrap();
    let (csr, key) = openssl_csr(&dir, "ec");
    let key = write(&dir, "device.key", &key);
    let dev = enroll(a, b, admin, csr, dir.join("device")).await;
    for (first, second) in [(a, b), (b, a)] {
        let (s, v) = call(
            Method::POST,
            &format!("{first}/v1/auth/nonce"),
            None,
            Some(json!({ "device_id": dev.device_id })),
        )
        .await;
        assert_eq!(s, 200, "nonce from {first}: {v}");
        let nonce = v["nonce"].as_str().unwrap().to_string();
        let sig = sign_token_proof(&dir, &dev.device_id, &nonce, &key);
        let body = json!({ "device_id": dev.device_id, "nonce": nonce, "signature": sig });
        let (s, v) = call(
            Method::POST,
            &format!("{second}/v1/auth/token"),
            None,
            Some(body.clone()),
        )
        .await;
        assert_eq!(s, 200, "nonce from {first} used on {second}: {v}");
        assert!(
            v["access_token"]
                .as_str()
                .is_some_and(|t| t.split('.').count() == 3),
            "{v}"
        );
        for replay_on in [first, second] {
            let (s, v) = call(
                Method::POST,
                &format!("{replay_on}/v1/auth/token"),
                None,
                Some(body.clone()),
            )
            .await;
            assert_eq!(s, 401, "a nonce used once is refused on {replay_on}: {v}");
        }
    }
}

async fn revoke(url: &str, admin: &str, device_id: &str) {
    let (status, v) = call(
        Method::POST,
        &format!("{url}/v1/admin/devices/{device_id}/revoke"),
        Some(admin),
        Some(json!({ "reason": "cessation-of-operation", "comment": "cluster test" })),
    )
    .await;
    assert_eq!(status, 200, "revoke on {url}: {v}");
}

/// `openssl ocsp -no_nonce` (the cacheable form) for `cert` against `url`:
/// the status line it prints for the certificate.
fn ocsp_status(dir: &Path, url: &str, cert: &Path) -> String {
    let out = Command::new("openssl")
        .args([
            "ocsp",
            "-no_nonce",
            "-issuer",
            "issuing.pem",
            "-CAfile",
            "root.pem",
        ])
        .arg("-cert")
        .arg(cert)
        .args(["-url", &format!("{url}/v1/ocsp")])
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "openssl ocsp: {text}");
    assert!(text.contains("Response verify OK"), "{text}");
    text.lines()
        .filter_map(|l| l.split_once(": ").map(|(_, s)| s.trim().to_string()))
        .find(|s| ["good", "revoked", "unknown"].contains(&s.as_str()))
        .unwrap_or_else(|| panic!("no status in: {text}"))
}

/// `openssl x509 -serial` of a PEM file, lower-case hex.
fn openssl_serial(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_ascii_lowercase()
}

/// `keyward audit verify` on the shared database: (exit code, output).
fn audit_verify(env: &Env) -> (Option<i32>, String) {
    let out = env.run(&["audit", "verify", "--config", env.config.to_str().unwrap()]);
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The holder named by each `scheduler.leader` event, and its previous one.
fn leader_events(db: &Shared) -> Vec<Value> {
    db.rows("SELECT details FROM audit_events WHERE action = 'scheduler.leader' ORDER BY seq")
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn pid_of_holder(event: &Value) -> u32 {
    let holder = event["holder"].as_str().unwrap();
    holder.split(':').nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_share_postgres_and_redis_under_load() {
    let env = Env::new();
    run_cluster(env, |_| Shared::Postgres(TestDb::create())).await;
}

/// The same on one SQLite file (several daemons on one host).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_share_sqlite_and_redis_under_load() {
    let env = Env::new();
    run_cluster(env, |env| Shared::Sqlite(env.db.clone())).await;
}

async fn run_cluster(env: Env, shared: impl FnOnce(&Env) -> Shared) {
    let started = Instant::now();
    let db = shared(&env);
    let redis = RedisServer::start();
    cluster_config(&env, &db, &redis);
    let admin = env.init();

    let a = env.serve();
    let b = env.serve();
    assert_ne!(a.url, b.url);
    let mut daemons: BTreeMap<u32, Daemon> = BTreeMap::new();
    let (url_a, url_b) = (a.url.clone(), b.url.clone());
    for d in [a, b] {
        daemons.insert(d.child.id(), d);
    }
    for url in [&url_a, &url_b] {
        let r = client().get(format!("{url}/readyz")).send().await.unwrap();
        let status = r.status().as_u16();
        assert_eq!(status, 200, "{url}: {}", r.text().await.unwrap());
    }

    // CSRs by the stock openssl, made before the load starts.
    let csr_dir = env.path("csrs");
    std::fs::create_dir_all(&csr_dir).unwrap();
    let csrs: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..DEVICES + 1 + DURING_KILL)
            .map(|_| s.spawn(|| openssl_csr(&csr_dir, "ec").0))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut csrs = csrs.into_iter();

    // --- Load at both daemons: enrol DEVICES, revoke every third. ---------
    let load_started = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..DEVICES {
        let (here, there) = if k % 2 == 0 {
            (url_a.clone(), url_b.clone())
        } else {
            (url_b.clone(), url_a.clone())
        };
        let (admin, csr, gate) = (admin.clone(), csrs.next().unwrap(), gate.clone());
        let dir = env.path(&format!("dev-{k}"));
        tasks.spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            let issued = enroll(&here, &there, &admin, csr, dir).await;
            let revoked = k % 3 == 0;
            if revoked {
                revoke(&there, &admin, &issued.device_id).await;
            }
            (issued, revoked)
        });
    }
    let mut issued = Vec::new();
    while let Some(r) = tasks.join_next().await {
        issued.push(r.unwrap());
    }
    let load_took = load_started.elapsed();
    assert_eq!(issued.len(), DEVICES);
    eprintln!(
        "cluster: {DEVICES} devices enrolled across 2 daemons in {load_took:?} \
         ({} revoked)",
        issued.iter().filter(|(_, r)| *r).count()
    );

    // --- Serials: unique in the store (psql), as issued, as openssl reads. -
    let dup =
        db.rows("SELECT serial, count(*) FROM certificates GROUP BY serial HAVING count(*) > 1");
    assert!(dup.is_empty(), "duplicated serials: {dup:?}");
    let ours: BTreeSet<&str> = issued.iter().map(|(i, _)| i.serial.as_str()).collect();
    assert_eq!(ours.len(), DEVICES, "the API handed out a serial twice");
    let device_certs =
        db.rows("SELECT serial FROM certificates WHERE device_id IS NOT NULL ORDER BY serial");
    assert_eq!(
        device_certs
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        ours,
        "device certificates in the store are not exactly the issued ones"
    );
    // Every certificate verifies, once each, with the stock openssl.
    for (i, _) in &issued {
        let root = write(
            i.chain.parent().unwrap(),
            "root.pem",
            i.chain_root_pem().as_str(),
        );
        let (ok, out) = common::openssl_verify(&root, &i.chain, &i.cert);
        assert!(ok, "openssl verify {}: {out}", i.serial);
        assert_eq!(openssl_serial(&i.cert), i.serial.to_ascii_lowercase());
    }
    let revoked_in_store = db
        .rows("SELECT serial FROM certificates WHERE device_id IS NOT NULL AND status = 'revoked'");
    let revoked: BTreeSet<&str> = issued
        .iter()
        .filter(|(_, r)| *r)
        .map(|(i, _)| i.serial.as_str())
        .collect();
    assert_eq!(
        revoked_in_store
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        revoked
    );

    // --- The audit chain: verifies, gap-free, each request's event once. ---
    let (code, out) = audit_verify(&env);
    assert_eq!(code, Some(0), "keyward audit verify: {out}");
    let span = db.rows("SELECT count(*), min(seq), max(seq) FROM audit_events");
    let span: Vec<i64> = span[0].split('|').map(|n| n.parse().unwrap()).collect();
    assert_eq!(span[1], 1, "the chain starts at 1");
    assert_eq!(span[0], span[2], "seq has gaps or repeats: {span:?}");
    let dups = db.rows(
        "SELECT action, target, count(*) FROM audit_events \
         WHERE action IN ('registration.submit', 'registration.approve', 'certificate.issue', 'device.revoke') \
         GROUP BY action, target HAVING count(*) > 1",
    );
    assert!(dups.is_empty(), "events recorded twice: {dups:?}");
    let targets = |action: &str| -> BTreeSet<String> {
        db.rows(&format!(
            "SELECT target FROM audit_events WHERE action = '{action}'"
        ))
        .into_iter()
        .collect()
    };
    let regs: BTreeSet<String> = issued
        .iter()
        .map(|(i, _)| format!("registration:{}", i.registration))
        .collect();
    assert_eq!(targets("registration.submit"), regs);
    assert_eq!(targets("registration.approve"), regs);
    assert_eq!(
        targets("certificate.issue")
            .into_iter()
            .filter(|t| ours.contains(t.trim_start_matches("certificate:")))
            .count(),
        DEVICES
    );
    let revoked_devices: BTreeSet<String> = issued
        .iter()
        .filter(|(_, r)| *r)
        .map(|(i, _)| i.device_id.clone())
        .collect();
    let revoke_events = targets("device.revoke");
    assert_eq!(
        revoke_events.len(),
        revoked_devices.len(),
        "{revoke_events:?}"
    );
    for d in &revoked_devices {
        assert!(
            revoke_events.iter().any(|t| t.contains(d.as_str())),
            "no device.revoke for {d}: {revoke_events:?}"
        );
    }

    // --- A signed-nonce token proof needs no affinity. --------------------
    nonce_on_one_daemon_token_on_the_other(&url_a, &url_b, &admin, env.path("nonce")).await;

    // --- Revocation on A reaches B's OCSP cache within 1 s. ----------------
    let ocsp_dir = env.path("ocsp");
    let probe = enroll(
        &url_a,
        &url_b,
        &admin,
        csrs.next().unwrap(),
        ocsp_dir.clone(),
    )
    .await;
    let chain = std::fs::read_to_string(&probe.chain).unwrap();
    let mut parts = chain.split_inclusive("-----END CERTIFICATE-----\n");
    write(&ocsp_dir, "issuing.pem", parts.next().unwrap());
    write(&ocsp_dir, "root.pem", parts.next().unwrap());
    const HITS: &str = "keyward_ocsp_cache_total{result=\"hit\"}";
    assert_eq!(ocsp_status(&ocsp_dir, &url_b, &probe.cert), "good");
    let hits = metric(&url_b, HITS).await;
    assert_eq!(ocsp_status(&ocsp_dir, &url_b, &probe.cert), "good");
    assert!(
        metric(&url_b, HITS).await > hits,
        "B answered the second request without its cache: the check below would prove nothing"
    );
    revoke(&url_a, &admin, &probe.device_id).await;
    let revoked_at = Instant::now();
    loop {
        let status = ocsp_status(&ocsp_dir, &url_b, &probe.cert);
        if status == "revoked" {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "B still answers {status} {:?} after the revocation on A",
            revoked_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ocsp_took = revoked_at.elapsed();
    eprintln!("cluster: revocation on A seen by OCSP on B after {ocsp_took:?}");

    // --- Exactly one scheduler leader; SIGKILL hands it over. -------------
    let watch = Instant::now();
    let mut leader_pid = None;
    while watch.elapsed() < LEASE + LEASE / 2 {
        let ga = leader_gauge(&url_a).await;
        let gb = leader_gauge(&url_b).await;
        assert_eq!(ga + gb, 1, "leader gauges a={ga} b={gb}");
        let pid = if ga == 1 {
            daemons.iter().find(|(_, d)| d.url == url_a)
        } else {
            daemons.iter().find(|(_, d)| d.url == url_b)
        }
        .map(|(pid, _)| *pid)
        .unwrap();
        assert!(
            leader_pid.is_none_or(|p| p == pid),
            "the lead moved without a failure"
        );
        leader_pid = Some(pid);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leader_pid = leader_pid.unwrap();
    let events = leader_events(&db);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(pid_of_holder(&events[0]), leader_pid, "{events:?}");
    // The lock itself, read with the stock redis-cli.
    let lock_key = format!("{PREFIX}lock:scheduler");
    assert_eq!(
        redis.cli(&["GET", &lock_key]),
        events[0]["holder"].as_str().unwrap()
    );

    let mut killed = daemons.remove(&leader_pid).unwrap();
    let (survivor_pid, survivor) = daemons.iter().next().unwrap();
    let survivor_url = survivor.url.clone();
    assert_eq!(leader_gauge(&survivor_url).await, 0);
    // Load on the survivor across the kill and the takeover.
    let mut during = tokio::task::JoinSet::new();
    for k in 0..DURING_KILL {
        let (url, admin, csr) = (survivor_url.clone(), admin.clone(), csrs.next().unwrap());
        let dir = env.path(&format!("during-kill-{k}"));
        during.spawn(async move { enroll(&url, &url, &admin, csr, dir).await });
    }
    killed.child.kill().unwrap(); // SIGKILL to that PID: no release
    killed.child.wait().unwrap();
    let killed_at = Instant::now();
    while leader_gauge(&survivor_url).await != 1 {
        // The lease runs out at most LEASE after the last renewal; the
        // survivor tries every quarter of it.
        assert!(
            killed_at.elapsed() < LEASE + LEASE / 4 + Duration::from_millis(500),
            "no takeover {:?} after the leader was killed",
            killed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let takeover = killed_at.elapsed();
    eprintln!("cluster: leader killed, the other daemon led after {takeover:?}");
    let mut events = Vec::new();
    for _ in 0..100 {
        events = leader_events(&db);
        if events.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(pid_of_holder(&events[1]), *survivor_pid, "{events:?}");
    assert_eq!(
        events[1]["previous_holder"], events[0]["holder"],
        "{events:?}"
    );

    // The survivor kept serving through the kill, and the chain still
    // verifies after it.
    let mut after = Vec::new();
    while let Some(r) = during.join_next().await {
        after.push(r.unwrap());
    }
    assert_eq!(after.len(), DURING_KILL);
    for i in &after {
        assert_eq!(
            db.rows(&format!(
                "SELECT count(*) FROM certificates WHERE serial = '{}'",
                i.serial
            )),
            ["1"]
        );
    }
    let (code, out) = audit_verify(&env);
    assert_eq!(code, Some(0), "keyward audit verify after the kill: {out}");
    let span = db.rows("SELECT count(*), max(seq) FROM audit_events");
    let span: Vec<i64> = span[0].split('|').map(|n| n.parse().unwrap()).collect();
    assert_eq!(span[0], span[1], "seq has gaps after the kill: {span:?}");

    drop(daemons);
    eprintln!(
        "cluster: whole test {:?} (load {load_took:?}, OCSP {ocsp_took:?}, takeover {takeover:?})",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "the cluster test should stay near a minute"
    );
}

impl Issued {
    /// The last certificate of the chain (the root).
    fn chain_root_pem(&self) -> String {
        let chain = std::fs::read_to_string(&self.chain).unwrap();
        chain
            .split_inclusive("-----END CERTIFICATE-----\n")
            .last()
            .unwrap()
            .to_string()
    }
}

/// systemd starts the daemons of a deployment at the same moment: two
/// `keyward serve` started together on a fresh deployment (after `keyward
/// init`, no OCSP signer yet) make one delegated OCSP signer per issuing
/// CA between them, reconcile nothing of each other's, and both answer
/// OCSP with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_started_together_make_one_ocsp_signer() {
    let env = Env::new();
    let db = Shared::Postgres(TestDb::create());
    let redis = RedisServer::start();
    cluster_config(&env, &db, &redis);
    let admin = env.init();
    assert_eq!(
        db.rows("SELECT count(*) FROM audit_events WHERE action = 'ocsp.signer.create'"),
        ["0"],
        "init made a signer already: this test would prove nothing"
    );
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| env.serve());
        let b = s.spawn(|| env.serve());
        (a.join().unwrap(), b.join().unwrap())
    });
    let signers = db.rows(
        "SELECT issuer_ca FROM service_certificates WHERE retired_at IS NULL ORDER BY issuer_ca",
    );
    let creates = db.rows("SELECT target FROM audit_events WHERE action = 'ocsp.signer.create'");
    assert_eq!(creates.len(), signers.len(), "{creates:?} {signers:?}");
    let unique: BTreeSet<&String> = signers.iter().collect();
    assert_eq!(
        unique.len(),
        signers.len(),
        "two active signers for one CA: {signers:?}"
    );
    assert_eq!(
        db.rows("SELECT count(*) FROM audit_events WHERE action = 'key.reconcile'"),
        ["0"],
        "one daemon's start-up reconciled the other's key generation"
    );
    let dir = env.path("ocsp");
    let device = enroll(
        &a.url,
        &b.url,
        &admin,
        openssl_csr(&env.path(""), "ec").0,
        dir.clone(),
    )
    .await;
    let chain = std::fs::read_to_string(&device.chain).unwrap();
    let mut parts = chain.split_inclusive("-----END CERTIFICATE-----\n");
    write(&dir, "issuing.pem", parts.next().unwrap());
    write(&dir, "root.pem", parts.next().unwrap());
    for d in [&a, &b] {
        assert_eq!(ocsp_status(&dir, &d.url, &device.cert), "good", "{}", d.url);
    }
    let (code, out) = audit_verify(&env);
    assert_eq!(code, Some(0), "keyward audit verify: {out}");
}
