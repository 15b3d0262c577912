//! `keyward serve` with `[redis]`, against a real `redis-server` the test
//! starts on a free port and kills by PID:
//! - Redis dies mid-run: requests keep being answered 2xx, `/readyz` stays
//!   200 and says `"redis": "degraded"`, `keyward_redis_up 0`, leader-only
//!   jobs pause (the lock cannot be renewed), a revocation made during the
//!   outage still reaches this daemon's OCSP answers (checked with
//!   `openssl ocsp`); Redis restarted on the same port: everything recovers
//!   within seconds;
//! - two daemons on one store and one Redis: an OCSP answer one signed is
//!   served by the other from the shared cache, a revocation on one reaches
//!   the other's OCSP answers within 1 s, a policy reload on one reloads
//!   the other.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/redis_server.rs"]
mod redis_server;

use common::{Daemon, Env, call, client, issue_device, metrics_text, write};
use redis_server::RedisServer;
use reqwest::Method;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn redis_env(server: &RedisServer, prefix: &str) -> Env {
    let env = Env::new();
    env.append_config(&format!(
        "[redis]\nurl = \"{}\"\nkey_prefix = \"{prefix}\"\n\n[scheduler]\nlease_seconds = 2\n",
        server.url()
    ));
    env
}

async fn value(url: &str, series: &str) -> f64 {
    metrics_text(url)
        .await
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

async fn readyz(url: &str) -> (u16, Value) {
    call(Method::GET, &format!("{url}/readyz"), None, None).await
}

/// Polls `check` every 100 ms until it holds; panics after `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes root.pem and issuing.pem from the daemon's public chain.
async fn trust_files(url: &str, dir: &Path) {
    let chain = client()
        .get(format!("{url}/v1/ca/devices/chain"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut certs = chain.split_inclusive("-----END CERTIFICATE-----\n");
    write(dir, "issuing.pem", certs.next().unwrap());
    write(dir, "root.pem", certs.next().unwrap());
}

/// `openssl ocsp` (no nonce: the cacheable form) for `cert`: `good` or `revoked`.
fn ocsp_status(dir: &Path, url: &str, cert: &Path) -> String {
    let out = Command::new("openssl")
        .args([
            "ocsp",
            "-no_nonce",
            "-issuer",
            "issuing.pem",
            "-CAfile",
            "root.pem",
            "-cert",
        ])
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
    let line = text
        .lines()
        .find(|l| l.contains(": good") || l.contains(": revoked"))
        .unwrap_or_else(|| panic!("no status in {text}"));
    line.rsplit(": ").next().unwrap().trim().to_string()
}

/// Requests of several kinds in a loop until stopped; counts non-2xx.
type Traffic = (
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<Vec<String>>,
);

fn traffic(
    url: String,
    token: String,
    csr_dir: std::path::PathBuf,
    stop: Arc<AtomicBool>,
) -> Traffic {
    let ok = Arc::new(AtomicUsize::new(0));
    let bad = Arc::new(AtomicUsize::new(0));
    let (ok2, bad2) = (ok.clone(), bad.clone());
    let handle = tokio::spawn(async move {
        let mut failures = Vec::new();
        let c = client();
        while !stop.load(Ordering::SeqCst) {
            for (path, auth) in [
                ("/v1/ca/devices/chain", false),
                ("/v1/admin/devices?limit=5", true),
                ("/healthz", false),
                ("/v1/admin/registrations?limit=5", true),
            ] {
                let mut rb = c.get(format!("{url}{path}"));
                if auth {
                    rb = rb.bearer_auth(&token);
                }
                match rb.send().await {
                    Ok(r) if r.status().is_success() => {
                        ok2.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => {
                        bad2.fetch_add(1, Ordering::SeqCst);
                        failures.push(format!("{path}: {}", r.status()));
                    }
                    Err(e) => {
                        bad2.fetch_add(1, Ordering::SeqCst);
                        failures.push(format!("{path}: {e}"));
                    }
                }
            }
            // A registration: rate limited through Redis, or in process
            // while Redis is down.
            let (csr, _) = common::openssl_csr(&csr_dir, "ec");
            let r = c
                .post(format!("{url}/v1/registrations"))
                .json(&serde_json::json!({ "csr": csr, "name": "load", "group": "default" }))
                .send()
                .await;
            match r {
                Ok(r) if r.status().as_u16() == 201 => {
                    ok2.fetch_add(1, Ordering::SeqCst);
                }
                Ok(r) => {
                    bad2.fetch_add(1, Ordering::SeqCst);
                    failures.push(format!("registration: {}", r.status()));
                }
                Err(e) => {
                    bad2.fetch_add(1, Ordering::SeqCst);
                    failures.push(format!("registration: {e}"));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        failures
    });
    (ok, bad, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dies_mid_run_and_the_daemon_serves_degraded_then_recovers() {
    let mut redis = RedisServer::start();
    let env = redis_env(&redis, "kwtest:");
    // Each registration occupies 8.64 s of the bucket: its key stays in Redis a while.
    env.append_config(
        "[limits]\nregistrations_per_source = 100000\nregistrations_window_secs = 864000\n",
    );
    let token = env.init();
    let daemon: Daemon = env.serve();
    let url = daemon.url.clone();

    let (status, r) = readyz(&url).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["redis"], "ok", "{r}");
    assert_eq!(value(&url, "keyward_redis_up").await, 1.0);
    assert_eq!(value(&url, "keyward_scheduler_leader").await, 1.0);
    let holder = redis.cli(&["GET", "kwtest:lock:scheduler"]);
    assert!(
        holder.contains(':'),
        "the scheduler lock is in Redis: {holder:?}"
    );

    // A device and its OCSP answer, signed once and shared through Redis.
    let dir = env.path("dev");
    let device = issue_device(&url, &token, &dir, "sensor-1").await;
    trust_files(&url, &dir).await;
    assert_eq!(ocsp_status(&dir, &url, &device.cert), "good");
    let keys = redis.cli(&["--scan", "--pattern", "kwtest:cache:ocsp:*"]);
    assert!(
        keys.contains(&device.serial.to_uppercase()) || keys.contains(&device.serial),
        "the OCSP answer is shared: {keys:?}"
    );

    std::fs::create_dir_all(env.path("load")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad, load) = traffic(url.clone(), token.clone(), env.path("load"), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ok.load(Ordering::SeqCst);
    assert!(before > 0);

    // Redis dies.
    redis.kill();
    let noticed = eventually(
        "readyz says redis degraded",
        Duration::from_secs(5),
        || async {
            let (s, r) = readyz(&url).await;
            assert_eq!(s, 200, "still ready: {r}");
            r["redis"] == "degraded"
        },
    )
    .await;
    eprintln!("outage noticed by /readyz after {noticed:?}");
    assert_eq!(value(&url, "keyward_redis_up").await, 0.0);
    // A revocation during the outage still reaches this daemon's OCSP answers.
    let (s, v) = call(
        Method::POST,
        &format!("{url}/v1/admin/devices/{}/revoke", device.device_id),
        Some(&token),
        Some(serde_json::json!({ "reason": "key-compromise" })),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(ocsp_status(&dir, &url, &device.cert), "revoked");
    // No daemon can renew the lock: leader-only jobs pause (lease 2 s).
    let stepped_down = eventually("leader steps down", Duration::from_secs(6), || async {
        value(&url, "keyward_scheduler_leader").await == 0.0
    })
    .await;
    eprintln!("leader stepped down after {stepped_down:?}");
    let during = ok.load(Ordering::SeqCst);
    assert!(
        during > before,
        "requests kept being served during the outage"
    );
    assert!(value(&url, "keyward_redis_errors_total{op=\"ratelimit\"}").await >= 1.0);

    // Redis comes back (empty) on the same port.
    redis.restart();
    let recovered = eventually(
        "redis back in /readyz and metrics",
        Duration::from_secs(5),
        || async {
            let (s, r) = readyz(&url).await;
            s == 200 && r["redis"] == "ok" && value(&url, "keyward_redis_up").await == 1.0
        },
    )
    .await;
    eprintln!("recovered after {recovered:?}");
    eventually("leader again", Duration::from_secs(6), || async {
        value(&url, "keyward_scheduler_leader").await == 1.0
    })
    .await;
    assert_eq!(redis.cli(&["GET", "kwtest:lock:scheduler"]), holder);
    // The revocation made during the outage fenced the shared OCSP answer
    // once Redis was back (retried until it answered).
    eventually(
        "the OCSP marker of the revoked serial is written",
        Duration::from_secs(5),
        || async {
            redis
                .cli(&["--scan", "--pattern", "kwtest:cache:ocsp-gen:*"])
                .to_lowercase()
                .contains(&device.serial.to_lowercase())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let failures = load.await.unwrap();
    assert_eq!(
        bad.load(Ordering::SeqCst),
        0,
        "non-2xx answers: {failures:?}"
    );
    assert!(ok.load(Ordering::SeqCst) > during);
    // Rate limits are shared through Redis again.
    let keys = redis.cli(&["--scan", "--pattern", "kwtest:rl:*"]);
    assert!(keys.contains("kwtest:rl:registrations:"), "{keys:?}");
    eprintln!(
        "requests answered: {} (none failed); redis errors: {}",
        ok.load(Ordering::SeqCst),
        value(&url, "keyward_redis_errors_total{op=\"ping\"}").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_share_ocsp_answers_and_invalidations() {
    let redis = RedisServer::start();
    let env = redis_env(&redis, "kwpair:");
    let token = env.init();
    let a = env.serve();
    let b = env.serve();
    let dir = env.path("dev");
    let device = issue_device(&a.url, &token, &dir, "sensor-2").await;
    trust_files(&a.url, &dir).await;

    // Signed by A, served by B from the shared cache (no signature on B).
    assert_eq!(ocsp_status(&dir, &a.url, &device.cert), "good");
    let sign =
        "keyward_hsm_operations_total{keystore=\"default\",operation=\"sign\",result=\"ok\"}";
    let b_signs = value(&b.url, sign).await;
    assert_eq!(ocsp_status(&dir, &b.url, &device.cert), "good");
    assert_eq!(value(&b.url, sign).await, b_signs, "B signed nothing");
    assert_eq!(
        value(
            &b.url,
            "keyward_cache_requests_total{cache=\"ocsp\",result=\"hit\"}"
        )
        .await,
        1.0
    );
    // B now holds it in memory too: a repeat is a local hit.
    assert_eq!(ocsp_status(&dir, &b.url, &device.cert), "good");
    // Speed of the in-memory level with Redis configured (a hit touches
    // neither Redis, the store nor the HSM): 200 POSTs of one request.
    let out = Command::new("openssl")
        .args(["ocsp", "-no_nonce", "-issuer", "issuing.pem", "-cert"])
        .arg(&device.cert)
        .args(["-reqout", "req.der"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let der = std::fs::read(dir.join("req.der")).unwrap();
    let c = client();
    let hits = "keyward_ocsp_cache_total{result=\"hit\"}";
    let shared_lookups = "keyward_cache_requests_total{cache=\"ocsp\",result=\"hit\"}";
    let shared_before = value(&b.url, shared_lookups).await;
    let before = value(&b.url, hits).await;
    let start = Instant::now();
    for _ in 0..200 {
        let r = c
            .post(format!("{}/v1/ocsp", b.url))
            .header("content-type", "application/ocsp-request")
            .body(der.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let took = start.elapsed();
    assert_eq!(value(&b.url, hits).await - before, 200.0);
    assert_eq!(
        value(&b.url, shared_lookups).await,
        shared_before,
        "an in-memory hit asks Redis nothing"
    );
    assert_eq!(
        value(&b.url, sign).await,
        b_signs,
        "still no signature on B"
    );
    eprintln!(
        "OCSP in-memory hit over HTTP with [redis]: {:?} per request",
        took / 200
    );

    // Revoked on A: B answers revoked within 1 s.
    let (s, v) = call(
        Method::POST,
        &format!("{}/v1/admin/devices/{}/revoke", a.url, device.device_id),
        Some(&token),
        Some(serde_json::json!({ "reason": "key-compromise" })),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let took = eventually("B answers revoked", Duration::from_secs(1), || async {
        ocsp_status(&dir, &b.url, &device.cert) == "revoked"
    })
    .await;
    eprintln!("revocation on A reached B's OCSP answers in {took:?}");

    // A policy reload on A reloads B's files (B audits its own reload).
    let enrollment = env.path("policies/enrollment.toml");
    let mut text = std::fs::read_to_string(&enrollment).unwrap();
    text.push_str("\n[[group]]\nname = \"added\"\nprofile = \"device\"\napproval = \"auto\"\nopen_enrollment = true\n");
    std::fs::write(&enrollment, text).unwrap();
    let (s, v) = call(
        Method::POST,
        &format!("{}/v1/admin/policies/reload", a.url),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    eventually("B reloaded", Duration::from_secs(2), || async {
        env.audit_after(0).iter().any(|(actor, action, outcome)| {
            actor == "system:invalidation" && action == "policy.reload" && outcome == "success"
        })
    })
    .await;
    // Once: A did not reload a second time on its own message.
    let reloads = env
        .audit_after(0)
        .into_iter()
        .filter(|(_, action, _)| action == "policy.reload")
        .count();
    assert_eq!(reloads, 2, "{:?}", env.audit_after(0));
}
