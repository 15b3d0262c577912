//! The metrics catalogue (issue 11, item 6) against a real daemon: keyward
//! wired in-process with a manual clock (`App::build_with_clock`, served by
//! `App::serve_on` on a loopback socket as `keyward serve` does), the CA
//! keys in a real SoftHSM2 token, driven over HTTP.
//!
//! It checks that every metric the daemon renders is in `docs/metrics.md`
//! with its type, that `promtool check metrics` accepts the exposition,
//! that the series alerts read exist at 0 from the start, and that the new
//! metrics move with real actions: a pending registration (queue length and
//! the age of the oldest, exact under the manual clock), a denial and an
//! approval, an issuance, a revocation, a renewal, a device suspension and
//! revocation (which carry every unexpired certificate of the device along),
//! certificates by time to expiry as the clock moves.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once, at `C_Initialize`, so the test
//! re-runs itself in a child process with the variable set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine;
use common::{Env, call, openssl_csr, promtool_check};
use keyward::app::App;
use keyward::clock::ManualClock;
use keyward::config::Config;
use reqwest::Method;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

const CHILD: &str = "KEYWARD_TEST_METRICS_CONFIG";
const DAY: i64 = 86_400;

/// In the parent: prepares the token, config and database, and runs `test`
/// again in a child with `SOFTHSM2_CONF` set; `None` then. In the child:
/// the config path.
fn child_config(test: &str) -> Option<PathBuf> {
    if let Some(cfg) = std::env::var_os(CHILD) {
        return Some(PathBuf::from(cfg));
    }
    let env = Env::with_extra_group(
        "[[group]]\nname = \"auto\"\nprofile = \"device\"\napproval = \"auto\"\nopen_enrollment = true\napprover_role = \"approver\"\n",
    );
    // The store-derived gauges refresh every second, so the test waits
    // little for them (it polls; it asserts values, never durations).
    env.append_config("[jobs]\nmetrics_refresh_interval_seconds = 1\n");
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

async fn scrape(url: &str) -> String {
    common::metrics_text(url).await
}

/// The value of one series, written exactly as the exposition writes it
/// (labels in alphabetical order).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// Scrapes until every `(series, want)` holds (store-derived gauges move at
/// the next refresh); panics with the last exposition after 30 s.
async fn wait_for(url: &str, want: &[(&str, f64)]) -> String {
    let mut last = String::new();
    for _ in 0..300 {
        last = scrape(url).await;
        if want.iter().all(|(s, v)| value(&last, s) == Some(*v)) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got: Vec<_> = want.iter().map(|(s, _)| (s, value(&last, s))).collect();
    panic!("wanted {want:?}, got {got:?} in:\n{last}");
}

/// Every metric rendered is in `docs/metrics.md` with the same type, and
/// `promtool check metrics` accepts the exposition.
fn check_exposition(text: &str) {
    promtool_check(text);
    let documented = keyward::metrics::documented_metrics(&common::repo_file("docs/metrics.md"));
    let rendered = keyward::metrics::rendered_types(text);
    assert!(rendered.len() >= 30, "{rendered:?}");
    for (name, kind) in &rendered {
        assert_eq!(
            documented.get(name),
            Some(kind),
            "`{name}` ({kind}) is rendered but not in docs/metrics.md with that type"
        );
    }
    // No per-device label: no label value is a UUID (device, registration).
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let labels = line.split('{').nth(1).unwrap_or("");
        for v in labels.split('"').skip(1).step_by(2) {
            assert!(uuid::Uuid::parse_str(v).is_err(), "per-id label in {line}");
        }
    }
}

fn pem_der(pem: &str) -> Vec<u8> {
    der::pem::decode_vec(pem.trim().as_bytes()).unwrap().1
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// A device certificate from the `auto` group (issued at submission).
struct Device {
    id: uuid::Uuid,
    key_pem: String,
    key_file: PathBuf,
    cert_pem: String,
}

async fn submit(url: &str, dir: &Path, group: &str) -> (String, String, String) {
    let (csr, key) = openssl_csr(dir, "ec");
    let (s, v) = call(
        Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(json!({ "csr": csr, "name": format!("m-{group}"), "group": group })),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    (
        v["id"].as_str().unwrap().to_string(),
        v["secret"].as_str().unwrap().to_string(),
        key,
    )
}

async fn auto_device(url: &str, token: &str, dir: &Path) -> Device {
    let (id, secret, key_pem) = submit(url, dir, "auto").await;
    let (s, creds) = call(
        Method::GET,
        &format!("{url}/v1/registrations/{id}/credentials"),
        Some(&secret),
        None,
    )
    .await;
    assert_eq!(s, 200, "{creds}");
    let (s, reg) = call(
        Method::GET,
        &format!("{url}/v1/admin/registrations/{id}"),
        Some(token),
        None,
    )
    .await;
    assert_eq!(s, 200, "{reg}");
    let key_file = dir.join(format!("{id}.key"));
    std::fs::write(&key_file, &key_pem).unwrap();
    Device {
        id: reg["device_id"].as_str().unwrap().parse().unwrap(),
        key_pem,
        key_file,
        cert_pem: creds["certificate_pem"].as_str().unwrap().to_string(),
    }
}

/// Renews `d` with a nonce signed by its current key (same key, CN = id).
async fn renew(url: &str, d: &Device) -> (u16, Value) {
    let (s, v) = call(
        Method::GET,
        &format!("{url}/v1/devices/{}/renew/nonce", d.id),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let nonce = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(v["nonce"].as_str().unwrap())
        .unwrap();
    let out = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-subj",
            &format!("/CN={}", d.id),
            "-outform",
            "DER",
            "-key",
        ])
        .arg(&d.key_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csr_der = out.stdout;
    let signer = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &pem_der(&d.key_pem),
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let msg = keyward::ca::renewal::proof_message(d.id, &nonce, &csr_der);
    let sig = signer.sign(&ring::rand::SystemRandom::new(), &msg).unwrap();
    call(
        Method::POST,
        &format!("{url}/v1/devices/{}/renew", d.id),
        None,
        Some(json!({
            "csr": der::pem::encode_string("CERTIFICATE REQUEST", der::pem::LineEnding::LF, &csr_der).unwrap(),
            "nonce": b64(&nonce),
            "signature": b64(sig.as_ref()),
            "certificate": d.cert_pem,
        })),
    )
    .await
}

const PENDING: &str = "keyward_registrations_pending";
const OLDEST: &str = "keyward_registrations_pending_oldest_age_seconds";
const APPROVED: &str = "keyward_approvals_total{decision=\"approve\"}";
const DENIED: &str = "keyward_approvals_total{decision=\"deny\"}";
const RENEWED: &str = "keyward_certificate_renewals_total{ca=\"devices\"}";
const EXPIRY_INF: &str = "keyward_certificates_by_expiry{within_days=\"inf\"}";
const EXPIRY_90: &str = "keyward_certificates_by_expiry{within_days=\"90\"}";
const EXPIRY_30: &str = "keyward_certificates_by_expiry{within_days=\"30\"}";
const EXPIRY_7: &str = "keyward_certificates_by_expiry{within_days=\"7\"}";

fn revoked(reason: &str) -> String {
    format!("keyward_certificates_revoked_total{{reason=\"{reason}\"}}")
}

#[test]
fn new_metrics_exist_from_the_start_and_move_with_real_actions() {
    let Some(config) = child_config("new_metrics_exist_from_the_start_and_move_with_real_actions")
    else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = config.parent().unwrap().to_path_buf();
        let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let clock = Arc::new(ManualClock::new(t0));
        let app = App::build_with_clock(Config::load(&config).unwrap(), clock.clone())
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.serve_on(listener, async {
            let _ = stopped.await;
        }));
        let token = std::fs::read_to_string(dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        let work = dir.join("work");
        std::fs::create_dir_all(&work).unwrap();

        // ---- From the start: the series alerts read exist, at 0.
        let m = scrape(&url).await;
        check_exposition(&m);
        for series in [
            PENDING,
            OLDEST,
            APPROVED,
            DENIED,
            RENEWED,
            EXPIRY_INF,
            EXPIRY_90,
            EXPIRY_30,
            EXPIRY_7,
            "keyward_certificates_by_expiry{within_days=\"1\"}",
            "keyward_hsm_operations_total{keystore=\"default\",operation=\"sign\",result=\"error\"}",
            "keyward_hsm_sessions_in_use{keystore=\"default\"}",
        ] {
            assert_eq!(must(&m, series), 0.0, "{series}");
        }
        for reason in keyward::metrics::ops::REVOCATION_REASONS {
            assert_eq!(must(&m, &revoked(reason)), 0.0, "{reason}");
        }
        // The pool is the config's `sessions = 2`; no YubiKey is configured.
        assert_eq!(must(&m, "keyward_hsm_sessions_max{keystore=\"default\"}"), 2.0);
        assert!(!m.contains("keyward_yubikey_queue_depth{"), "{m}");
        // Key gauges from the rotation policy (issuing CA: 1095 days; roots
        // have no rule).
        assert_eq!(
            must(&m, "keyward_key_max_age_seconds{purpose=\"issuing-ca\",target=\"devices\"}"),
            (1095 * DAY) as f64
        );
        assert_eq!(
            must(&m, "keyward_key_max_age_seconds{purpose=\"root-ca\",target=\"root\"}"),
            0.0
        );
        assert_eq!(
            must(&m, "keyward_key_max_age_seconds{purpose=\"ocsp-signing\",target=\"devices\"}"),
            (30 * DAY) as f64
        );
        // The CRL served: thisUpdate at start-up (manual clock), before nextUpdate.
        let this_update = must(&m, "keyward_crl_this_update_timestamp_seconds{ca=\"devices\"}");
        assert_eq!(this_update, t0.unix_timestamp() as f64);
        assert!(
            must(&m, "keyward_crl_next_update_timestamp_seconds{ca=\"devices\"}") > this_update
        );

        // ---- The approval queue: one pending registration, two minutes old.
        let (r1, _, _) = submit(&url, &work, "default").await;
        clock.advance(time::Duration::seconds(120));
        wait_for(&url, &[(PENDING, 1.0), (OLDEST, 120.0)]).await;
        let (r2, _, _) = submit(&url, &work, "default").await;
        wait_for(&url, &[(PENDING, 2.0), (OLDEST, 120.0)]).await;

        // ---- Decisions are counted once committed; a refused one is not.
        let (s, v) = call(
            Method::POST,
            &format!("{url}/v1/admin/registrations/{r2}/deny"),
            Some(&token),
            Some(json!({ "comment": "unknown device" })),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let m = scrape(&url).await;
        assert_eq!((must(&m, DENIED), must(&m, APPROVED)), (1.0, 0.0));
        let (s, v) = call(
            Method::POST,
            &format!("{url}/v1/admin/registrations/{r2}/approve"),
            Some(&token),
            None,
        )
        .await;
        assert_eq!(s, 409, "a denied registration cannot be approved: {v}");
        let (s, v) = call(
            Method::POST,
            &format!("{url}/v1/admin/registrations/{r1}/approve"),
            Some(&token),
            None,
        )
        .await;
        assert_eq!((s, v["status"].as_str()), (200, Some("issued")), "{v}");
        let m = scrape(&url).await;
        assert_eq!((must(&m, DENIED), must(&m, APPROVED)), (1.0, 1.0));
        assert_eq!(must(&m, "keyward_registrations_total{outcome=\"issued\"}"), 1.0);
        // The queue is empty again: the age is 0, not the last one's.
        wait_for(
            &url,
            &[(PENDING, 0.0), (OLDEST, 0.0), (EXPIRY_INF, 1.0), (EXPIRY_90, 0.0)],
        )
        .await;

        // ---- A second device (auto-approved), then revoke the first one's certificate.
        let d = auto_device(&url, &token, &work).await;
        wait_for(&url, &[(EXPIRY_INF, 2.0)]).await;
        let (s, r1_admin) = call(
            Method::GET,
            &format!("{url}/v1/admin/registrations/{r1}"),
            Some(&token),
            None,
        )
        .await;
        assert_eq!(s, 200, "{r1_admin}");
        let serial = r1_admin["certificate_serial"].as_str().unwrap();
        let (s, v) = call(
            Method::POST,
            &format!("{url}/v1/admin/certs/{serial}/revoke"),
            Some(&token),
            Some(json!({ "reason": "key-compromise" })),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(must(&scrape(&url).await, &revoked("key-compromise")), 1.0);
        // Refused: a revoked certificate cannot be revoked again; nothing counted.
        let (s, v) = call(
            Method::POST,
            &format!("{url}/v1/admin/certs/{serial}/revoke"),
            Some(&token),
            Some(json!({ "reason": "key-compromise" })),
        )
        .await;
        assert_eq!(s, 409, "{v}");
        assert_eq!(must(&scrape(&url).await, &revoked("key-compromise")), 1.0);
        wait_for(&url, &[(EXPIRY_INF, 1.0)]).await;

        // ---- Time passes: the device's certificate (365 days) enters the
        // 30-day bucket, not the 7-day one.
        clock.advance(time::Duration::days(340));
        wait_for(
            &url,
            &[(EXPIRY_INF, 1.0), (EXPIRY_90, 1.0), (EXPIRY_30, 1.0), (EXPIRY_7, 0.0)],
        )
        .await;

        // ---- A renewal: counted per issuing CA; the new certificate leaves the 30-day bucket.
        let (s, v) = renew(&url, &d).await;
        assert_eq!(s, 201, "{v}");
        assert_eq!(must(&scrape(&url).await, RENEWED), 1.0);
        wait_for(&url, &[(EXPIRY_INF, 1.0), (EXPIRY_30, 0.0)]).await;

        // ---- Suspension holds both unexpired certificates (the new one and
        // the superseded one); revocation then makes both permanent.
        let (s, v) = call(
            Method::POST,
            &format!("{url}/v1/admin/devices/{}/suspend", d.id),
            Some(&token),
            Some(json!({ "comment": "lost" })),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(must(&scrape(&url).await, &revoked("certificate-hold")), 2.0);
        let (s, v) = call(
            Method::POST,
            &format!("{url}/v1/admin/devices/{}/revoke", d.id),
            Some(&token),
            Some(json!({ "reason": "cessation-of-operation" })),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let m = scrape(&url).await;
        assert_eq!(must(&m, &revoked("cessation-of-operation")), 2.0);
        assert_eq!(must(&m, &revoked("certificate-hold")), 2.0);
        // Refused: a revoked device cannot be revoked again; nothing counted.
        let (s, v) = call(
            Method::POST,
            &format!("{url}/v1/admin/devices/{}/revoke", d.id),
            Some(&token),
            Some(json!({ "reason": "cessation-of-operation" })),
        )
        .await;
        assert_eq!(s, 409, "{v}");
        wait_for(&url, &[(EXPIRY_INF, 0.0), (&revoked("cessation-of-operation"), 2.0)]).await;

        // ---- Latency histograms count the same events as the counters.
        let m = scrape(&url).await;
        assert_eq!(
            must(&m, "keyward_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/registrations\"}"),
            3.0
        );
        assert_eq!(
            must(&m, "keyward_http_requests_total{method=\"POST\",route=\"/v1/registrations\",status=\"201\"}"),
            3.0
        );
        let signs = must(
            &m,
            "keyward_hsm_operations_total{keystore=\"default\",operation=\"sign\",result=\"ok\"}",
        );
        assert!(signs >= 3.0, "three device certificates at least: {signs}");
        assert_eq!(
            must(&m, "keyward_hsm_operation_duration_seconds_count{keystore=\"default\",operation=\"sign\"}"),
            signs
        );
        assert!(
            must(&m, "keyward_hsm_sessions_in_use{keystore=\"default\"}")
                <= must(&m, "keyward_hsm_sessions_max{keystore=\"default\"}")
        );
        check_exposition(&m);

        let _ = stop.send(());
        server.await.unwrap().unwrap();
    });
}
