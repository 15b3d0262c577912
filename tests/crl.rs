//! CRLs end to end, on a real SoftHSM2 token and SQLite store, checked with
//! the stock `openssl crl` and `openssl verify -crl_check`.
//!
//! - In-process with a manual clock (the CRL job's `tick(now)`; no test
//!   waits for time to pass): numbering without gaps, the CA's own AKI,
//!   reason codes, debounce of a burst of revocations, the due refresh
//!   before nextUpdate, a good certificate accepted and a revoked one
//!   refused by openssl, CDP/AIA from `server.public_url`, and a CRL whose
//!   HSM signature does not verify stored nowhere.
//! - Against `keyward serve`: DER by default, PEM by `Accept`, cache
//!   headers, unknown CA 404, the CA certificate route, publishing through
//!   the admin route and `keyward ca crl`, the CRL kept across a restart.
//!
//! Revocations are written straight to the store here (this branch has no
//! revocation service yet) and reported to the publisher the way the
//! revocation service's observer hook does.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once, at `C_Initialize`, so in-process
//! tests re-run themselves in a child process with the variable set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use async_trait::async_trait;
use common::{Env, openssl_csr};
use keyward::app::App;
use keyward::audit::AuditDraft;
use keyward::ca::crls::CrlPublisher;
use keyward::ca::{CaError, CaService, RevocationObserver, x509};
use keyward::clock::{Clock, ManualClock};
use keyward::config::Config;
use keyward::jobs::Job;
use keyward::jobs::crl::CrlJob;
use keyward::keystore::{
    Capabilities, GeneratedKey, KeyAlgorithm, KeyHandle, KeySpec, KeyStore, KeyStoreError,
    KeyStores,
};
use keyward::model::RevocationReason;
use keyward::registry::Submission;
use keyward::store::{Change, Store, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use time::OffsetDateTime;

const CHILD: &str = "KEYWARD_TEST_INPROCESS_CONFIG";
const PUBLIC_URL: &str = "http://pki.keyward.test:8080";

/// An installation with an auto-issuing group and `server.public_url`.
fn env() -> Env {
    let env = Env::with_extra_group(
        "[[group]]\nname = \"auto\"\nprofile = \"device\"\napproval = \"auto\"\nopen_enrollment = true\n",
    );
    let text = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        text.replacen(
            "[server]\n",
            &format!("[server]\npublic_url = \"{PUBLIC_URL}/\"\n"),
            1,
        ),
    )
    .unwrap();
    env
}

/// In the parent: makes an installation, runs `keyward init`, and re-runs
/// `test` in a child with `SOFTHSM2_CONF` set. In the child: the config.
fn child_config(test: &str) -> Option<(PathBuf, PathBuf)> {
    if let Some(cfg) = std::env::var_os(CHILD) {
        let cfg = PathBuf::from(cfg);
        let dir = cfg.parent().unwrap().to_path_buf();
        return Some((cfg, dir));
    }
    let env = env();
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs openssl in `dir`; (success, stdout + stderr).
fn openssl(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl missing: run scripts/test.sh");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn colon_hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The `crlNumber` of a CRL file (PEM, or DER with `-inform DER` first in `form`), as openssl reads it.
fn crl_number_in(file: &str, form: &[&str], dir: &Path) -> u64 {
    let mut args = vec!["crl"];
    args.extend_from_slice(form);
    args.extend_from_slice(&["-in", file, "-noout", "-crlnumber"]);
    let (ok, out) = openssl(&args, dir);
    assert!(ok, "{out}");
    let hex = out
        .trim()
        .trim_start_matches("crlNumber=")
        .trim_start_matches("0x");
    u64::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("{out}"))
}

fn crl_number(file: &str, dir: &Path) -> u64 {
    crl_number_in(file, &[], dir)
}

async fn revoke(store: &dyn Store, serial: &str, reason: RevocationReason, at: i64) {
    store
        .commit(
            Change::new()
                .write(Write::RevokeCertificate {
                    serial: serial.to_string(),
                    reason,
                    at,
                })
                .audit(AuditDraft::new(
                    "test",
                    "certificate.revoke",
                    format!("certificate:{serial}"),
                )),
        )
        .await
        .unwrap();
}

async fn crl_events(store: &dyn Store) -> Vec<serde_json::Value> {
    store
        .audit_events(keyward::store::AuditQuery {
            from_seq: 0,
            limit: 10_000,
        })
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "crl.publish")
        .map(|e| e.details)
        .collect()
}

#[test]
fn crls_number_debounce_refresh_and_satisfy_openssl() {
    let Some((config, dir)) = child_config("crls_number_debounce_refresh_and_satisfy_openssl")
    else {
        return;
    };
    runtime().block_on(async {
        // A minute in the past, so that openssl (on the wall clock) finds
        // the CRLs' thisUpdate passed after the test moved time forward.
        let t0 =
            OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - time::Duration::minutes(1);
        let clock = Arc::new(ManualClock::new(t0));
        let app = App::build_with_clock(Config::load(&config).unwrap(), clock.clone())
            .await
            .unwrap();
        let s = &app.state;
        let crls = s.crls.clone();
        let policy = crls.policy().clone();
        assert_eq!(policy.crl_debounce_ms, 1000, "the shipped policy");
        let job = CrlJob::new(crls.clone(), Duration::from_secs(60));

        // Nothing served before start; start gives every CA its first CRL.
        assert!(matches!(
            crls.current("devices"),
            Err(CaError::CrlUnavailable(_))
        ));
        assert!(matches!(crls.current("nope"), Err(CaError::UnknownCa(_))));
        crls.start(clock.now()).await.unwrap();
        assert_eq!(crls.current("devices").unwrap().number, 1);
        assert_eq!(crls.current("root").unwrap().number, 1);
        assert_eq!(crls.current("devices").unwrap().entries, 0);
        // Not due, not dirty: a tick publishes nothing.
        job.tick(clock.now()).await.unwrap();
        assert_eq!(crls.current("devices").unwrap().number, 1);

        // Four device certificates.
        let (csr, _) = openssl_csr(&dir, "ec");
        let mut serials = Vec::new();
        for i in 0..4 {
            let sub = s
                .registry
                .submit(
                    Submission {
                        csr: Some(csr.clone().into_bytes()),
                        evidence: keyward::registry::Evidence::None,
                        age_recipient: None,
                        name: format!("dev-{i}"),
                        device_type: None,
                        location: None,
                        firmware: None,
                        group: Some("auto".into()),
                        client_addr: None,
                    },
                    None,
                )
                .await
                .unwrap();
            serials.push(sub.registration.certificate_serial.unwrap());
        }
        let cert = |serial: &str| {
            let store = s.store.clone();
            let serial = serial.to_string();
            async move { store.get_certificate(&serial).await.unwrap().unwrap().der }
        };

        // A burst: two revocations inside the debounce window share one CRL.
        let now = clock.now().unix_timestamp();
        revoke(
            s.store.as_ref(),
            &serials[1],
            RevocationReason::KeyCompromise,
            now,
        )
        .await;
        crls.revocation_changed("devices", &[serials[1].clone()]);
        job.tick(clock.now()).await.unwrap();
        assert_eq!(crls.current("devices").unwrap().number, 1, "debounced");
        clock.advance(time::Duration::milliseconds(600));
        revoke(
            s.store.as_ref(),
            &serials[2],
            RevocationReason::CertificateHold,
            now,
        )
        .await;
        crls.revocation_changed("devices", &[serials[2].clone()]);
        clock.advance(time::Duration::milliseconds(300));
        job.tick(clock.now()).await.unwrap();
        assert_eq!(
            crls.current("devices").unwrap().number,
            1,
            "still inside the window"
        );
        clock.advance(time::Duration::milliseconds(100));
        job.tick(clock.now()).await.unwrap();
        let second = crls.current("devices").unwrap();
        assert_eq!(second.number, 2, "one CRL for the burst");
        assert_eq!(second.entries, 2);
        assert_eq!(crls.current("root").unwrap().number, 1, "root untouched");
        // Nothing more to do.
        clock.advance(time::Duration::seconds(5));
        job.tick(clock.now()).await.unwrap();
        assert_eq!(crls.current("devices").unwrap().number, 2);

        // A revocation of an unspecified reason, alone: its own CRL.
        revoke(
            s.store.as_ref(),
            &serials[3],
            RevocationReason::Unspecified,
            clock.now().unix_timestamp(),
        )
        .await;
        crls.revocation_changed("devices", &[serials[3].clone()]);
        // A report about an unknown CA is ignored.
        crls.revocation_changed("nope", &[serials[3].clone()]);
        clock.advance(time::Duration::seconds(1));
        job.tick(clock.now()).await.unwrap();
        let third = crls.current("devices").unwrap();
        assert_eq!((third.number, third.entries), (3, 3));

        // The stored CRL is the one served.
        let stored = s.store.latest_crl("devices").await.unwrap().unwrap();
        assert_eq!(stored.number, 3);
        assert_eq!(stored.der, third.der.to_vec());
        assert_eq!(
            third.next_update - third.this_update,
            i64::from(policy.crl_validity_hours) * 3600
        );
        // Audited: one event per CRL, gap-free numbers per CA.
        let events = crl_events(s.store.as_ref()).await;
        let devices: Vec<i64> = events
            .iter()
            .filter(|e| e["ca"] == "devices")
            .map(|e| e["number"].as_i64().unwrap())
            .collect();
        assert_eq!(devices, vec![1, 2, 3]);
        assert_eq!(events.last().unwrap()["entries"], 3);
        assert_eq!(events.last().unwrap()["next_update"], third.next_update);

        // ---- Stock openssl.
        let d = dir.as_path();
        let root = s.ca.issuer("root").unwrap();
        let devices = s.ca.issuer("devices").unwrap();
        let pem = |der: &[u8]| x509::to_pem(der).unwrap();
        std::fs::write(d.join("root.pem"), pem(&root.cert_der)).unwrap();
        std::fs::write(d.join("devices.pem"), pem(&devices.cert_der)).unwrap();
        std::fs::write(
            d.join("chain.pem"),
            format!("{}{}", pem(&root.cert_der), pem(&devices.cert_der)),
        )
        .unwrap();
        std::fs::write(d.join("devices.crl"), &third.pem).unwrap();
        std::fs::write(d.join("root.crl"), &crls.current("root").unwrap().pem).unwrap();
        std::fs::write(d.join("second.crl"), &second.pem).unwrap();
        for (i, serial) in serials.iter().enumerate() {
            std::fs::write(d.join(format!("dev{i}.pem")), pem(&cert(serial).await)).unwrap();
        }
        for crl in ["devices.crl", "root.crl"] {
            let (ok, out) = openssl(
                &[
                    "crl",
                    "-in",
                    crl,
                    "-CAfile",
                    "chain.pem",
                    "-verify",
                    "-noout",
                ],
                d,
            );
            assert!(ok && out.contains("verify OK"), "{crl}: {out}");
        }
        assert_eq!(crl_number("second.crl", d), 2);
        assert_eq!(crl_number("devices.crl", d), 3);
        let (ok, text) = openssl(&["crl", "-in", "devices.crl", "-text", "-noout"], d);
        assert!(ok, "{text}");
        assert!(text.contains(&colon_hex(&devices.ski)), "own AKI: {text}");
        assert!(
            !text.contains(&colon_hex(&root.ski)),
            "not the root's: {text}"
        );
        assert!(text.contains("Key Compromise"), "{text}");
        assert!(text.contains("Certificate Hold"), "{text}");
        for serial in &serials[1..] {
            assert!(text.contains(serial.as_str()), "{serial}: {text}");
        }
        assert!(!text.contains(serials[0].as_str()), "{text}");
        let verify = |cert: &str| {
            openssl(
                &[
                    "verify",
                    "-crl_check_all",
                    "-CAfile",
                    "root.pem",
                    "-untrusted",
                    "devices.pem",
                    "-CRLfile",
                    "devices.crl",
                    "-CRLfile",
                    "root.crl",
                    cert,
                ],
                d,
            )
        };
        let (ok, out) = verify("dev0.pem");
        assert!(ok && out.contains("dev0.pem: OK"), "{out}");
        for c in ["dev1.pem", "dev2.pem", "dev3.pem"] {
            let (ok, out) = verify(c);
            assert!(!ok && out.contains("certificate revoked"), "{c}: {out}");
        }

        // CDP and AIA from server.public_url (its trailing slash dropped).
        let (ok, text) = openssl(&["x509", "-in", "dev0.pem", "-text", "-noout"], d);
        assert!(ok, "{text}");
        // The CRL and CA-certificate URLs name the key that signed (a rotation
        // keeps one CRL per key).
        let key = devices.key_id;
        for uri in [
            format!("URI:{PUBLIC_URL}/v1/ca/devices/keys/{key}/crl"),
            format!("OCSP - URI:{PUBLIC_URL}/v1/ocsp"),
            format!("CA Issuers - URI:{PUBLIC_URL}/v1/ca/devices/keys/{key}/certificate"),
        ] {
            assert!(text.contains(&uri), "{uri}: {text}");
        }
        // The issuing CA's certificate points at the root's CRL.
        let (ok, text) = openssl(&["x509", "-in", "devices.pem", "-text", "-noout"], d);
        assert!(ok, "{text}");
        assert!(
            text.contains(&format!(
                "URI:{PUBLIC_URL}/v1/ca/root/keys/{}/crl",
                root.key_id
            )),
            "{text}"
        );

        // ---- Due refresh: crl_refresh_before_hours before nextUpdate.
        let due_at = third.next_update - i64::from(policy.crl_refresh_before_hours) * 3600;
        clock.set(OffsetDateTime::from_unix_timestamp(due_at - 60).unwrap());
        job.tick(clock.now()).await.unwrap();
        assert_eq!(crls.current("devices").unwrap().number, 3, "not due yet");
        clock.set(OffsetDateTime::from_unix_timestamp(due_at).unwrap());
        job.tick(clock.now()).await.unwrap();
        let fourth = crls.current("devices").unwrap();
        assert_eq!((fourth.number, fourth.entries), (4, 3));
        assert_eq!(fourth.this_update, due_at);
        // The root's first CRL was made before the devices' third: due as well.
        assert_eq!(crls.current("root").unwrap().number, 2);

        // Metrics follow the CRL served.
        let m = s.metrics.render();
        for line in [
            "keyward_crl_number{ca=\"devices\"} 4".to_string(),
            "keyward_crl_entries{ca=\"devices\"} 3".to_string(),
            format!(
                "keyward_crl_next_update_timestamp_seconds{{ca=\"devices\"}} {}",
                fourth.next_update
            ),
        ] {
            assert!(m.contains(&line), "{line} missing from:\n{m}");
        }

        // Under the scheduler, a dirty mark wakes the job before its
        // (hour-long) interval: the CRL follows once the window has passed.
        let mut scheduler = keyward::jobs::Scheduler::new(clock.clone(), s.metrics.clone());
        scheduler.spawn(Arc::new(CrlJob::new(
            crls.clone(),
            Duration::from_secs(3600),
        )));
        crls.revocation_changed("devices", &[serials[3].clone()]);
        clock.advance(time::Duration::seconds(1));
        let mut waited = 0;
        while crls.current("devices").unwrap().number == 4 && waited < 100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            waited += 1;
        }
        assert_eq!(crls.current("devices").unwrap().number, 5, "woken early");
        scheduler.shutdown().await;

        // A restart loads the stored CRLs and publishes none that is not due.
        drop(app);
        let app = App::build_with_clock(Config::load(&config).unwrap(), clock.clone())
            .await
            .unwrap();
        app.state.crls.start(clock.now()).await.unwrap();
        let loaded = app.state.crls.current("devices").unwrap();
        assert_eq!(loaded.number, 5);
        assert_eq!(crl_events(app.state.store.as_ref()).await.len(), 5 + 2);
    });
}

/// A key store whose signatures turn bad on demand, as a faulty HSM's would.
struct Faulty {
    inner: Arc<dyn KeyStore>,
    spoil: AtomicBool,
}

#[async_trait]
impl KeyStore for Faulty {
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
        let mut sig = self.inner.sign(handle, algorithm, message).await?;
        if self.spoil.load(Ordering::SeqCst) {
            let last = sig.len() - 1;
            sig[last] ^= 0x01;
        }
        Ok(sig)
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

#[test]
fn a_crl_whose_hsm_signature_does_not_verify_is_neither_stored_nor_served() {
    let Some((config, _)) =
        child_config("a_crl_whose_hsm_signature_does_not_verify_is_neither_stored_nor_served")
    else {
        return;
    };
    runtime().block_on(async {
        let config = Config::load(&config).unwrap();
        let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
        let metrics = Arc::new(keyward::metrics::Metrics::new().unwrap());
        let faulty = Arc::new(Faulty {
            inner: keyward::app::open_keystore("default", &config.keystore)
                .await
                .unwrap(),
            spoil: AtomicBool::new(true),
        });
        let store = keyward::app::open_store(&config, clock.clone(), metrics.clone())
            .await
            .unwrap();
        let policies = Arc::new(keyward::policy::Policies::load(&config.policies.dir).unwrap());
        let ca = Arc::new(
            CaService::new(
                KeyStores::new(faulty.clone()),
                store.clone(),
                clock.clone(),
                policies,
            )
            .await
            .unwrap(),
        );
        let crls = CrlPublisher::new(ca, store.clone(), clock.clone(), metrics.clone());
        let (events_before, _) = store.audit_head().await.unwrap();

        let err = crls.publish("devices", "test").await.unwrap_err();
        assert!(matches!(err, CaError::CrlSignatureInvalid(_)), "{err}");
        assert_eq!(err.code(), "hsm_signature_invalid");
        assert!(store.latest_crl("devices").await.unwrap().is_none());
        assert!(matches!(
            crls.current("devices"),
            Err(CaError::CrlUnavailable(_))
        ));
        assert_eq!(store.audit_head().await.unwrap().0, events_before);
        assert!(
            metrics
                .render()
                .contains("keyward_crl_publish_failures_total{ca=\"devices\"} 1")
        );
        // The job reports the failure and retries the dirty CA later.
        crls.mark_dirty("devices");
        clock.advance(time::Duration::seconds(2));
        let failed = crls.publish_due(clock.now()).await;
        assert!(failed.iter().any(|(ca, _)| ca == "devices"), "{failed:?}");
        assert!(crls.next_dirty_deadline().is_some(), "retried later");

        // A healthy HSM again: the first CRL is number 1 (no gap left behind).
        faulty.spoil.store(false, Ordering::SeqCst);
        let crl = crls.publish("devices", "test").await.unwrap();
        assert_eq!(crl.number, 1);
        assert_eq!(
            store.latest_crl("devices").await.unwrap().unwrap().number,
            1
        );
    });
}

// ---------------------------------------------------------------------------
// Against `keyward serve`.

#[tokio::test]
async fn the_daemon_serves_crls_der_and_pem_and_publishes_on_demand() {
    let env = env();
    let token = env.init();
    let mut daemon = env.serve();
    let url = daemon.url.clone();
    let http = common::client();
    let d = env.dir.path();

    // DER by default, with cache headers until nextUpdate.
    let resp = http
        .get(format!("{url}/v1/ca/devices/crl"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["content-type"], "application/pkix-crl");
    let cache = h["cache-control"].to_str().unwrap().to_string();
    let max_age: i64 = cache
        .split(", ")
        .find_map(|p| p.strip_prefix("max-age="))
        .unwrap()
        .parse()
        .unwrap();
    assert!((86_000..=86_400).contains(&max_age), "{cache}");
    assert!(h["expires"].to_str().unwrap().ends_with(" GMT"));
    std::fs::write(d.join("served.der"), resp.bytes().await.unwrap()).unwrap();
    assert_eq!(crl_number_in("served.der", &["-inform", "DER"], d), 1);

    // PEM with Accept: application/x-pem-file.
    let resp = http
        .get(format!("{url}/v1/ca/devices/crl"))
        .header("accept", "application/x-pem-file")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-pem-file");
    let pem = resp.text().await.unwrap();
    assert!(pem.starts_with("-----BEGIN X509 CRL-----\n"), "{pem}");

    // Unknown CA: 404 unknown_ca, for the CRL and the certificate.
    for p in ["crl", "certificate"] {
        let (status, v) = common::call(
            reqwest::Method::GET,
            &format!("{url}/v1/ca/nope/{p}"),
            None,
            None,
        )
        .await;
        assert_eq!(status, 404, "{v}");
        assert_eq!(v["error"]["code"], "unknown_ca");
    }

    // The CA certificate, DER: the first certificate of the chain.
    let resp = http
        .get(format!("{url}/v1/ca/devices/certificate"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/pkix-cert");
    let der = resp.bytes().await.unwrap();
    let chain = http
        .get(format!("{url}/v1/ca/devices/chain"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(chain.starts_with(&x509::to_pem(&der).unwrap()));

    // `keyward ca crl --publish --pem --out`: a new number, in a file a relying party reads.
    std::fs::write(d.join("admin.tok"), &token).unwrap();
    let out = env
        .keyward()
        .args(["ca", "crl", "devices", "--publish", "--pem", "--out"])
        .arg(d.join("devices.crl"))
        .arg("--token-file")
        .arg(d.join("admin.tok"))
        .env("KEYWARD_URL", &url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("published CRL 2 of CA devices"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(crl_number("devices.crl", d), 2);
    // DER to stdout without --out; no token needed without --publish.
    let out = env
        .keyward()
        .args(["ca", "crl", "root"])
        .env("KEYWARD_URL", &url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout[0], 0x30, "DER");
    let out = env
        .keyward()
        .args(["ca", "crl", "nope"])
        .env("KEYWARD_URL", &url)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_ca"));

    // Metrics for the served CRL, lint-clean.
    let m = common::metrics_text(&url).await;
    assert!(m.contains("keyward_crl_number{ca=\"devices\"} 2"), "{m}");
    assert!(m.contains("keyward_crl_number{ca=\"root\"} 1"), "{m}");
    common::promtool_check(&m);

    // A restart serves the stored CRL; it is not due, so none is published.
    assert!(daemon.stop().success());
    let daemon = env.serve();
    let pem2 = http
        .get(format!("{}/v1/ca/devices/crl", daemon.url))
        .header("accept", "application/x-pem-file")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        pem2,
        std::fs::read_to_string(d.join("devices.crl")).unwrap()
    );
    let audited: Vec<_> = env
        .audit_details_after(0)
        .into_iter()
        .filter(|(action, ..)| action == "crl.publish")
        .collect();
    assert_eq!(audited.len(), 3, "root 1, devices 1 and 2: {audited:?}");
}

/// Registers a device in the auto-issuing group; returns (device id, cert PEM, chain PEM).
async fn auto_device(url: &str, dir: &Path, name: &str) -> (String, String, String) {
    let (csr, _) = openssl_csr(dir, "ec");
    let (status, sub) = common::call(
        reqwest::Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(serde_json::json!({ "csr": csr, "name": name, "group": "auto" })),
    )
    .await;
    assert_eq!(status, 201, "{sub}");
    assert_eq!(sub["status"], "issued", "{sub}");
    let (status, creds) = common::call(
        reqwest::Method::GET,
        &format!(
            "{url}/v1/registrations/{}/credentials",
            sub["id"].as_str().unwrap()
        ),
        Some(sub["secret"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(status, 200, "{creds}");
    (
        sub["device_id"].as_str().unwrap().to_string(),
        creds["certificate_pem"].as_str().unwrap().to_string(),
        creds["chain_pem"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn a_revocation_through_the_cli_reaches_the_served_crl_within_seconds() {
    let env = env();
    let token = env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();
    let d = env.dir.path();
    let (good_id, good, chain) = auto_device(&url, d, "good").await;
    let (bad_id, bad, _) = auto_device(&url, d, "bad").await;
    assert_ne!(good_id, bad_id);
    std::fs::write(d.join("good.pem"), good).unwrap();
    std::fs::write(d.join("bad.pem"), bad).unwrap();
    std::fs::write(d.join("chain.pem"), &chain).unwrap();
    let root = chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .last()
        .unwrap();
    std::fs::write(d.join("root.pem"), root).unwrap();
    let fetch = |ca: &'static str| {
        let url = url.clone();
        let path = d.join(format!("{ca}.crl"));
        async move {
            let pem = common::client()
                .get(format!("{url}/v1/ca/{ca}/crl"))
                .header("accept", "application/x-pem-file")
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            std::fs::write(&path, pem).unwrap();
        }
    };
    fetch("devices").await;
    fetch("root").await;
    assert_eq!(crl_number("devices.crl", d), 1);
    let verify = |cert: &str| {
        openssl(
            &[
                "verify",
                "-crl_check_all",
                "-CAfile",
                "root.pem",
                "-untrusted",
                "chain.pem",
                "-CRLfile",
                "devices.crl",
                "-CRLfile",
                "root.crl",
                cert,
            ],
            d,
        )
    };
    for c in ["good.pem", "bad.pem"] {
        let (ok, out) = verify(c);
        assert!(ok, "{c}: {out}");
    }

    let out = env
        .keyward()
        .env("KEYWARD_URL", &url)
        .env("KEYWARD_TOKEN", &token)
        .args(["devices", "revoke", &bad_id, "--reason", "keyCompromise"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Debounced (1 s), then published by the woken job: no admin action.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        fetch("devices").await;
        if crl_number("devices.crl", d) == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new CRL after the revocation"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, text) = openssl(&["crl", "-in", "devices.crl", "-noout", "-text"], d);
    assert!(ok && text.contains("Key Compromise"), "{text}");
    let (ok, out) = verify("good.pem");
    assert!(ok && out.contains("good.pem: OK"), "{out}");
    let (ok, out) = verify("bad.pem");
    assert!(!ok && out.contains("certificate revoked"), "{out}");
    // One CRL for the revocation, by the scheduler.
    let published: Vec<_> = env
        .audit_details_after(0)
        .into_iter()
        .filter(|(action, ..)| action == "crl.publish")
        .map(|(.., details)| details)
        .collect();
    assert_eq!(published.len(), 3, "{published:?}");
    assert_eq!(published[2]["number"], 2);
    assert_eq!(published[2]["entries"], 1);
}
