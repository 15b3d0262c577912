//! The HSM failing in the middle of an issuing-CA rotation: the executor
//! records each failed step, backs off, alerts through the Notifier port
//! (a real webhook to a receiver the test runs), never skips a step, and
//! finishes once the HSM is back. In process, on a real SoftHSM2 token
//! behind `Flaky`, a fault injector that fails key generation or signing
//! on demand (the one part that is not real: SoftHSM2 cannot be made to
//! fail on cue).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use async_trait::async_trait;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use common::Env;
use keyward::ca::CaService;
use keyward::ca::crls::CrlPublisher;
use keyward::ca::responder::{Responder, ResponderSettings};
use keyward::clock::{Clock, ManualClock, SystemClock};
use keyward::config::Config;
use keyward::jobs::Job;
use keyward::jobs::rotation::RotationJob;
use keyward::keystore::{
    Capabilities, GeneratedKey, KeyAlgorithm, KeyHandle, KeySpec, KeyStore, KeyStoreError,
    KeyStores,
};
use keyward::model::{KeyPurpose, KeyState, RotationStep};
use keyward::notify::{Backend, Notifiers, WebhookNotifier, WebhookSettings, WebhookUrl};
use keyward::ratelimit::{Limit, memory::InProcessRateLimiter};
use keyward::rotation::Rotator;
use keyward::store::AuditQuery;
use secrecy::SecretString;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use time::OffsetDateTime;

const CHILD: &str = "KEYWARD_TEST_INPROCESS_CONFIG";

/// The real key store, failing generation and/or signing while told to.
struct Flaky {
    inner: Arc<dyn KeyStore>,
    fail_generate: AtomicBool,
    fail_sign: AtomicBool,
}

fn unavailable() -> KeyStoreError {
    // As a PKCS#11 token that stopped answering looks to keyward.
    KeyStoreError::Busy(Duration::from_secs(5))
}

#[async_trait]
impl KeyStore for Flaky {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }
    fn planned_handle(&self, spec: &KeySpec) -> KeyHandle {
        self.inner.planned_handle(spec)
    }
    async fn generate(&self, spec: &KeySpec) -> Result<GeneratedKey, KeyStoreError> {
        if self.fail_generate.load(Ordering::SeqCst) {
            return Err(unavailable());
        }
        self.inner.generate(spec).await
    }
    async fn public_key(&self, handle: &KeyHandle) -> Result<Vec<u8>, KeyStoreError> {
        self.inner.public_key(handle).await
    }
    async fn sign(
        &self,
        handle: &KeyHandle,
        algorithm: KeyAlgorithm,
        message: &[u8],
    ) -> Result<Vec<u8>, KeyStoreError> {
        if self.fail_sign.load(Ordering::SeqCst) {
            return Err(unavailable());
        }
        self.inner.sign(handle, algorithm, message).await
    }
    async fn exists(&self, handle: &KeyHandle) -> Result<bool, KeyStoreError> {
        self.inner.exists(handle).await
    }
    async fn destroy(&self, handle: &KeyHandle) -> Result<(), KeyStoreError> {
        self.inner.destroy(handle).await
    }
    async fn health(&self) -> Result<(), KeyStoreError> {
        self.inner.health().await
    }
    async fn close(&self) -> Result<(), KeyStoreError> {
        self.inner.close().await
    }
}

/// Webhook bodies received, in order.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Value>>>);

async fn record(State(r): State<Received>, body: Bytes) -> &'static str {
    r.0.lock()
        .unwrap()
        .push(serde_json::from_slice(&body).unwrap());
    "ok"
}

impl Received {
    async fn start() -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let r = Received::default();
        let app = Router::new().fallback(record).with_state(r.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (r, url)
    }

    async fn wait_for(&self, kind: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got: Vec<Value> = self
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|v| v["type"] == kind)
                .cloned()
                .collect();
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "{n} × {kind}: {got:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn child_config(test: &str) -> Option<PathBuf> {
    if let Some(cfg) = std::env::var_os(CHILD) {
        return Some(PathBuf::from(cfg));
    }
    let env = Env::new();
    env.init();
    let status = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture"])
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .env(CHILD, &env.config)
        .status()
        .unwrap();
    assert!(status.success(), "{test} failed in its child process");
    None
}

/// The services a rotation needs, in process, on the test's token.
struct Rig {
    clock: Arc<ManualClock>,
    metrics: Arc<keyward::metrics::Metrics>,
    flaky: Arc<Flaky>,
    store: Arc<dyn keyward::store::Store>,
    ca: Arc<CaService>,
    received: Received,
    rotator: Arc<Rotator>,
}

async fn rig(config: &std::path::Path) -> Rig {
    let config = Config::load(config).unwrap();
    let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
    let metrics = Arc::new(keyward::metrics::Metrics::new().unwrap());
    let flaky = Arc::new(Flaky {
        inner: keyward::app::open_keystore("default", &config.keystore)
            .await
            .unwrap(),
        fail_generate: AtomicBool::new(false),
        fail_sign: AtomicBool::new(false),
    });
    let store = keyward::app::open_store(&config, clock.clone(), metrics.clone())
        .await
        .unwrap();
    let policies = Arc::new(keyward::policy::Policies::load(&config.policies.dir).unwrap());
    let ca = Arc::new(
        CaService::new(
            KeyStores::new(flaky.clone()),
            store.clone(),
            clock.clone(),
            policies,
        )
        .await
        .unwrap(),
    );
    let crls = Arc::new(CrlPublisher::new(
        ca.clone(),
        store.clone(),
        clock.clone(),
        metrics.clone(),
    ));
    let limiter = Arc::new(InProcessRateLimiter::new(clock.clone(), 1000));
    let ocsp = Arc::new(Responder::new(
        ca.clone(),
        store.clone(),
        clock.clone(),
        limiter,
        metrics.clone(),
        ResponderSettings {
            cache_entries: 100,
            fresh_per_source: Limit::new(10, Duration::from_secs(1)),
        },
    ));
    ocsp.refresh_signers("test").await.unwrap();
    // From here on, the HSM stops generating keys.
    flaky.fail_generate.store(true, Ordering::SeqCst);
    let (received, hook) = Received::start().await;
    let webhook = WebhookNotifier::new(
        "notify[0].secret",
        WebhookSettings {
            url: WebhookUrl::parse(&hook).unwrap(),
            secret: SecretString::from("webhook-secret-0123456789abcdef".to_string()),
            timeout: Duration::from_secs(5),
            max_attempts: 3,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        },
        Arc::new(SystemClock),
    )
    .unwrap();
    let notifiers = Notifiers::start(
        vec![Backend::new(Arc::new(webhook), 100)],
        clock.clone(),
        metrics.clone(),
    );
    let rotator = Rotator::new(
        ca.clone(),
        store.clone(),
        clock.clone(),
        crls,
        ocsp,
        notifiers,
        metrics.clone(),
    );
    Rig {
        clock,
        metrics,
        flaky,
        store,
        ca,
        received,
        rotator: Arc::new(rotator),
    }
}

#[test]
fn an_hsm_failing_mid_rotation_is_retried_with_backoff_alerted_and_no_step_is_skipped() {
    let Some(config) = child_config(
        "an_hsm_failing_mid_rotation_is_retried_with_backoff_alerted_and_no_step_is_skipped",
    ) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let Rig {
            clock,
            metrics,
            flaky,
            store,
            ca,
            received,
            rotator,
        } = rig(&config).await;
        let old_key = ca.issuer("devices").unwrap().key_id;
        let r = rotator
            .start(KeyPurpose::IssuingCa, "devices", "admin:test", "manual")
            .await
            .unwrap();
        let show = || async { store.get_rotation(r.id).await.unwrap().unwrap() };

        // Key generation fails: recorded, retried after 30 s, then 60 s.
        rotator.run_due().await.unwrap();
        let got = show().await;
        assert_eq!((got.step, got.attempts), (RotationStep::Planned, 1));
        assert!(
            got.last_error.as_deref().unwrap().contains("busy"),
            "{got:?}"
        );
        let first_retry = got.next_attempt_at;
        assert_eq!(first_retry, clock.now().unix_timestamp() + 30);
        // Not retried before its time.
        rotator.run_due().await.unwrap();
        assert_eq!(show().await.attempts, 1);
        clock.advance(time::Duration::seconds(30));
        rotator.run_due().await.unwrap();
        let got = show().await;
        assert_eq!((got.step, got.attempts), (RotationStep::Planned, 2));
        assert_eq!(got.next_attempt_at, clock.now().unix_timestamp() + 60);
        // The failed generations left no key behind, in the store or the HSM.
        let keys = store.list_keys().await.unwrap();
        let issuing: Vec<_> = keys
            .iter()
            .filter(|k| k.purpose == KeyPurpose::IssuingCa && k.state != KeyState::Destroyed)
            .collect();
        assert_eq!(issuing.len(), 1, "{issuing:?}");
        // Each failure went out as an alert.
        let alerts = received.wait_for("rotation.failed", 2).await;
        assert_eq!(alerts[0]["data"]["target"], "devices", "{alerts:?}");
        assert_eq!(alerts[0]["data"]["step"], "planned", "{alerts:?}");

        // The HSM answers again for generation, but not for signing: the
        // certification fails and the rotation waits at `key-generated`.
        flaky.fail_generate.store(false, Ordering::SeqCst);
        flaky.fail_sign.store(true, Ordering::SeqCst);
        clock.advance(time::Duration::seconds(60));
        rotator.run_due().await.unwrap();
        let got = show().await;
        assert_eq!(
            (got.step, got.attempts),
            (RotationStep::KeyGenerated, 1),
            "{got:?}"
        );
        assert_eq!(
            ca.issuer("devices").unwrap().key_id,
            old_key,
            "still issuing with the old key"
        );
        received.wait_for("rotation.failed", 3).await;

        // Back: the rotation resumes where it stopped and runs to the end.
        flaky.fail_sign.store(false, Ordering::SeqCst);
        clock.advance(time::Duration::seconds(30));
        rotator.run_due().await.unwrap();
        let got = show().await;
        assert_eq!(got.step, RotationStep::Destroyed, "{got:?}");
        assert_ne!(ca.issuer("devices").unwrap().key_id, old_key);
        let done = received.wait_for("rotation.completed", 1).await;
        assert_eq!(done[0]["data"]["step"], "activated");
        let text = metrics.render();
        for line in [
            "keyward_rotations_total{outcome=\"failed\",purpose=\"issuing-ca\"} 3",
            "keyward_rotations_total{outcome=\"completed\",purpose=\"issuing-ca\"} 1",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }

        // Every step exactly once, in order, and three audited failures.
        let events = store
            .audit_events(AuditQuery {
                from_seq: 0,
                limit: 10_000,
            })
            .await
            .unwrap();
        let target = format!("rotation:{}", r.id);
        let actions: Vec<&str> = events
            .iter()
            .filter(|e| e.target == target)
            .map(|e| e.action.as_str())
            .collect();
        assert_eq!(
            actions,
            [
                "rotation.start",
                "rotation.step_failed",
                "rotation.step_failed",
                "rotation.key_generated",
                "rotation.step_failed",
                "rotation.certified",
                "rotation.published",
                "rotation.activated",
                "rotation.retired",
                "rotation.destroyed",
            ]
        );
    });
}

/// The rotation job on a manual clock: nothing is due on a fresh
/// installation; three years on (issuing CA key past max age − margin, OCSP
/// signer long past its own), the nightly schedule fires, both rotate, the
/// root is reported and never touched, and the key gauges follow.
#[test]
fn the_schedule_rotates_what_policy_says_is_due_and_never_a_root() {
    let Some(config) =
        child_config("the_schedule_rotates_what_policy_says_is_due_and_never_a_root")
    else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let Rig {
            clock,
            metrics,
            flaky,
            store,
            ca,
            rotator,
            ..
        } = rig(&config).await;
        flaky.fail_generate.store(false, Ordering::SeqCst);
        let job = RotationJob::new(rotator.clone(), metrics.clone(), Duration::from_secs(60));
        let root_key = ca.issuer("root").unwrap().key_id;
        let devices_key = ca.issuer("devices").unwrap().key_id;

        // Fresh: the first tick only notes the time; a day later the
        // schedule has fired but nothing is due.
        job.tick(clock.now()).await.unwrap();
        clock.advance(time::Duration::days(1));
        job.tick(clock.now()).await.unwrap();
        assert!(store.list_rotations(false, 10).await.unwrap().is_empty());
        let plan = rotator.plan(clock.now().unix_timestamp()).await.unwrap();
        let root = plan
            .items
            .iter()
            .find(|i| i.purpose == KeyPurpose::RootCa)
            .unwrap();
        assert_eq!(root.action.kind(), "manual", "{plan:?}");
        let text = metrics.render();
        assert!(
            text.contains(
                "keyward_key_next_rotation_timestamp_seconds{purpose=\"root-ca\",target=\"root\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "keyward_key_created_timestamp_seconds{purpose=\"issuing-ca\",target=\"devices\"}"
            ),
            "{text}"
        );

        // 1,070 days on (past 1,095 − 30): the next firing rotates.
        clock.advance(time::Duration::days(1_069));
        job.tick(clock.now()).await.unwrap();
        let rotations = store.list_rotations(false, 10).await.unwrap();
        let mut started: Vec<(KeyPurpose, String)> = rotations
            .iter()
            .map(|r| (r.purpose, r.target.clone()))
            .collect();
        started.sort();
        assert_eq!(
            started,
            [
                (KeyPurpose::IssuingCa, "devices".to_string()),
                (KeyPurpose::OcspSigning, "devices".to_string()),
            ]
        );
        for r in &rotations {
            assert!(r.reason.starts_with("schedule: "), "{r:?}");
            assert_eq!(r.actor, "system");
            assert_eq!(r.step, RotationStep::Destroyed, "{r:?}");
        }
        assert_ne!(ca.issuer("devices").unwrap().key_id, devices_key);
        assert_eq!(
            ca.issuer("root").unwrap().key_id,
            root_key,
            "roots are never rotated"
        );
        // The next firing starts nothing new: the new keys are young.
        clock.advance(time::Duration::days(1));
        job.tick(clock.now()).await.unwrap();
        assert_eq!(store.list_rotations(false, 10).await.unwrap().len(), 2);
    });
}
