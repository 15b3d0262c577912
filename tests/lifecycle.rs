//! Renewal and revocation against a real daemon on a loopback socket, with
//! the CA keys in a real SoftHSM2 token and a manual clock (the daemon is
//! wired in-process by `App::build_with_clock` and serves through
//! `App::serve_on`, the path `keyward serve` takes), driven by HTTP, the
//! `keyward` CLI (`enroll`, `renew --dir`, `devices`, `certs`) and checked
//! with `openssl verify`.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once, at `C_Initialize`, so the test
//! re-runs itself in a child process with the variable set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine;
use common::{Env, call, openssl_verify, write};
use der::Decode;
use keyward::app::App;
use keyward::ca::{RenewalProof, RevocationObserver};
use keyward::clock::ManualClock;
use keyward::config::Config;
use reqwest::Method;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use time::OffsetDateTime;

const CHILD: &str = "KEYWARD_TEST_LIFECYCLE_CONFIG";
const DAY: i64 = 86_400;

fn child_config(test: &str) -> Option<PathBuf> {
    if let Some(cfg) = std::env::var_os(CHILD) {
        return Some(PathBuf::from(cfg));
    }
    let env = Env::with_extra_group(
        "[[group]]\nname = \"auto\"\nprofile = \"device\"\napproval = \"auto\"\nopen_enrollment = true\napprover_role = \"approver\"\n",
    );
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

#[derive(Default)]
struct Recorder(Mutex<Vec<(String, Vec<String>)>>);

impl RevocationObserver for Recorder {
    fn revocation_changed(&self, issuer_ca: &str, serials: &[String]) {
        self.0
            .lock()
            .unwrap()
            .push((issuer_ca.to_string(), serials.to_vec()));
    }
}

struct Ctx {
    url: String,
    dir: PathBuf,
    token: String,
    softhsm_conf: std::ffi::OsString,
}

impl Ctx {
    fn keyward(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(args)
            .env("KEYWARD_URL", &self.url)
            .env("KEYWARD_TOKEN", &self.token)
            .env("SOFTHSM2_CONF", &self.softhsm_conf)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// `keyward enroll` into DIR/name in the auto-approved group; the device id.
    fn enroll(&self, name: &str) -> (PathBuf, uuid::Uuid) {
        let out = self.dir.join(name);
        let (ok, _, err) = self.keyward(&[
            "enroll",
            "--url",
            &self.url,
            "--name",
            name,
            "--out",
            out.to_str().unwrap(),
            "--group",
            "auto",
            "--timeout",
            "30",
        ]);
        assert!(ok, "enroll {name}: {err}");
        let id = device_of(&std::fs::read(out.join("cert.pem")).unwrap());
        (out, id)
    }
}

fn pem_der(pem: &[u8]) -> Vec<u8> {
    der::pem::decode_vec(String::from_utf8_lossy(pem).trim().as_bytes())
        .unwrap()
        .1
}

fn device_of(cert_pem: &[u8]) -> uuid::Uuid {
    let cert = x509_cert::Certificate::from_der(&pem_der(cert_pem)).unwrap();
    let cn = cert
        .tbs_certificate()
        .subject()
        .iter()
        .find(|a| a.oid == const_oid::db::rfc4519::CN)
        .map(|a| String::from_utf8_lossy(a.value.value()).to_string())
        .unwrap();
    uuid::Uuid::parse_str(&cn).unwrap()
}

fn key_of(dir: &Path) -> EcdsaKeyPair {
    let pkcs8 = pem_der(&std::fs::read(dir.join("key.pem")).unwrap());
    EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &pkcs8,
        &ring::rand::SystemRandom::new(),
    )
    .unwrap()
}

/// A CSR by the stock openssl CLI with the key in `dir`, subject CN `cn`.
fn csr_with_key(dir: &Path, cn: &str) -> Vec<u8> {
    let out = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-subj",
            &format!("/CN={cn}"),
            "-outform",
            "DER",
            "-key",
        ])
        .arg(dir.join("key.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn pem(label: &str, der: &[u8]) -> String {
    der::pem::encode_string(label, der::pem::LineEnding::LF, der).unwrap()
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

async fn nonce(url: &str, id: uuid::Uuid) -> Vec<u8> {
    let (s, v) = call(
        Method::GET,
        &format!("{url}/v1/devices/{id}/renew/nonce"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(v["nonce"].as_str().unwrap())
        .unwrap()
}

/// POSTs a renewal with a signed-nonce proof made by `signer`.
async fn renew(
    url: &str,
    id: uuid::Uuid,
    csr_der: &[u8],
    nonce: &[u8],
    signer: &EcdsaKeyPair,
    certificate: Option<&str>,
) -> (u16, Value) {
    let msg = keyward::ca::renewal::proof_message(id, nonce, csr_der);
    let sig = signer.sign(&ring::rand::SystemRandom::new(), &msg).unwrap();
    call(
        Method::POST,
        &format!("{url}/v1/devices/{id}/renew"),
        None,
        Some(json!({
            "csr": pem("CERTIFICATE REQUEST", csr_der),
            "nonce": b64(nonce),
            "signature": b64(sig.as_ref()),
            "certificate": certificate,
        })),
    )
    .await
}

#[test]
fn renewal_and_revocation_end_to_end() {
    let Some(config) = child_config("renewal_and_revocation_end_to_end") else {
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
        let recorder = Arc::new(Recorder::default());
        app.state.ca.add_revocation_observer(recorder.clone());
        let state = app.state.clone();
        let store = state.store.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.serve_on(listener, async {
            let _ = stopped.await;
        }));
        let cx = Ctx {
            url: url.clone(),
            dir: dir.clone(),
            token: std::fs::read_to_string(dir.join("admin.token")).unwrap().trim().to_string(),
            softhsm_conf: std::env::var_os("SOFTHSM2_CONF").unwrap(),
        };
        let token = cx.token.clone();
        let (dir_a, a) = cx.enroll("alpha");
        let (dir_b, b) = cx.enroll("bravo");
        let key_a = key_of(&dir_a);
        let key_b = key_of(&dir_b);
        let cert_a = std::fs::read_to_string(dir_a.join("cert.pem")).unwrap();
        let cert_b = std::fs::read_to_string(dir_b.join("cert.pem")).unwrap();
        let csr_a = csr_with_key(&dir_a, &a.to_string());

        // ---- Bad input: a clear 4xx with a stable code, nothing changed.
        let snapshot = || {
            let store = store.clone();
            async move {
                // Checkpoints are signed in the background whenever due:
                // not a change a request made.
                let mut counts = store.counts().await.unwrap();
                counts.remove("audit_checkpoints");
                (counts, store.audit_head().await.unwrap())
            }
        };
        let before = snapshot().await;
        let refused = |r: (u16, Value), status: u16, code: &str| {
            assert_eq!((r.0, r.1["error"]["code"].as_str()), (status, Some(code)), "{}", r.1);
        };
        // Outside the renewal window (365-day profile, 30-day window).
        let n = nonce(&url, a).await;
        refused(renew(&url, a, &csr_a, &n, &key_a, Some(&cert_a)).await, 409, "outside_renewal_window");
        // Replayed nonce (it was taken by the refused attempt).
        refused(renew(&url, a, &csr_a, &n, &key_a, None).await, 403, "invalid_nonce");
        // A nonce nobody issued.
        refused(renew(&url, a, &csr_a, &[9u8; 32], &key_a, None).await, 403, "invalid_nonce");
        // Another device's nonce.
        let nb = nonce(&url, b).await;
        refused(renew(&url, a, &csr_a, &nb, &key_a, None).await, 403, "invalid_nonce");
        // Signed with another key.
        let n = nonce(&url, a).await;
        refused(renew(&url, a, &csr_a, &n, &key_b, None).await, 403, "proof_signature_invalid");
        // Another device's certificate claimed as current.
        let n = nonce(&url, a).await;
        refused(renew(&url, a, &csr_a, &n, &key_a, Some(&cert_b)).await, 403, "not_current_certificate");
        // A CSR naming another device.
        let csr_other = csr_with_key(&dir_a, &b.to_string());
        let n = nonce(&url, a).await;
        refused(renew(&url, a, &csr_other, &n, &key_a, None).await, 422, "csr_device_mismatch");
        // A malformed CSR.
        let n = nonce(&url, a).await;
        let r = call(
            Method::POST,
            &format!("{url}/v1/devices/{a}/renew"),
            None,
            Some(json!({ "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "nonce": b64(&n), "signature": b64(b"x") })),
        )
        .await;
        refused(r, 400, "invalid_csr");
        // No proof at all; unknown device.
        let r = call(Method::POST, &format!("{url}/v1/devices/{a}/renew"), None, Some(json!({ "csr": pem("CERTIFICATE REQUEST", &csr_a) }))).await;
        refused(r, 401, "proof_required");
        let ghost = uuid::Uuid::now_v7();
        refused(call(Method::GET, &format!("{url}/v1/devices/{ghost}/renew/nonce"), None, None).await, 404, "device_not_found");
        // The mTLS proof (the TLS layer hands the service the client leaf):
        // another device's certificate, or one from another CA, is refused.
        let foreign = pem_der(cert_b.as_bytes());
        let e = state.ca.renew(a, &csr_a, RenewalProof::ClientCertificate(foreign), None).await.unwrap_err();
        assert_eq!(e.code(), "not_current_certificate");
        let self_signed = Command::new("openssl")
            .args(["req", "-x509", "-new", "-subj", &format!("/CN={a}"), "-days", "1", "-outform", "DER", "-key"])
            .arg(dir_a.join("key.pem"))
            .output()
            .unwrap();
        assert!(self_signed.status.success());
        let e = state.ca.renew(a, &csr_a, RenewalProof::ClientCertificate(self_signed.stdout), None).await.unwrap_err();
        assert_eq!(e.code(), "not_current_certificate");
        assert_eq!(snapshot().await, before, "refused renewals changed nothing");

        // ---- Forced by an admin's allowance: once.
        let (ok, out, err) = cx.keyward(&["devices", "allow-renewal", &a.to_string(), "--hours", "2", "--output", "json"]);
        assert!(ok, "{err}");
        assert!(out.contains("expires_at"), "{out}");
        let (ok, new_serial, err) = cx.keyward(&["renew", "--dir", dir_a.to_str().unwrap()]);
        assert!(ok, "renew --dir: {err}");
        let new_serial = new_serial.trim().to_string();
        let old_cert = x509_cert::Certificate::from_der(&pem_der(cert_a.as_bytes())).unwrap();
        let old_serial = hex::encode_upper(old_cert.tbs_certificate().serial_number().as_bytes());
        assert_eq!(std::fs::read_to_string(dir_a.join("cert.pem.prev")).unwrap(), cert_a);
        let (s, old) = call(Method::GET, &format!("{url}/v1/admin/certs/{old_serial}"), Some(&token), None).await;
        assert_eq!((s, old["status"].as_str(), old["superseded_by"].as_str()), (200, Some("superseded"), Some(new_serial.as_str())), "{old}");
        let events = store.audit_events(keyward::store::AuditQuery { from_seq: before.1.0 + 1, limit: 100 }).await.unwrap();
        let renew_ev = events.iter().find(|e| e.action == "certificate.renew").unwrap();
        assert_eq!(renew_ev.details["forced"], true);
        assert_eq!(renew_ev.details["rekey"], false);
        assert_eq!(renew_ev.details["proof"], "signed-nonce");
        assert_eq!(renew_ev.details["old_serial"], old_serial.as_str());
        // The new chain verifies with openssl.
        let chain = std::fs::read_to_string(dir_a.join("chain.pem")).unwrap();
        let root_start = chain.rfind("-----BEGIN CERTIFICATE-----").unwrap();
        let root = write(&dir, "root.pem", &chain[root_start..]);
        let (ok, out) = openssl_verify(&root, &dir_a.join("chain.pem"), &dir_a.join("cert.pem"));
        assert!(ok, "{out}");
        // The allowance is used up.
        let cert_a2 = std::fs::read_to_string(dir_a.join("cert.pem")).unwrap();
        let n = nonce(&url, a).await;
        refused(renew(&url, a, &csr_a, &n, &key_a, Some(&cert_a2)).await, 409, "outside_renewal_window");
        // The superseded certificate is no proof any more.
        let n = nonce(&url, a).await;
        refused(renew(&url, a, &csr_a, &n, &key_a, Some(&cert_a)).await, 403, "not_current_certificate");

        // ---- Inside the window: re-key through the reference client.
        clock.advance(time::Duration::days(340));
        let (ok, _, err) = cx.keyward(&["renew", "--dir", dir_a.to_str().unwrap(), "--rekey"]);
        assert!(ok, "renew --rekey: {err}");
        let new_key = std::fs::read(dir_a.join("key.pem")).unwrap();
        assert_ne!(new_key, std::fs::read(dir_a.join("key.pem.prev")).unwrap());
        use std::os::unix::fs::PermissionsExt;
        for f in ["key.pem", "key.pem.prev"] {
            let mode = std::fs::metadata(dir_a.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        // The daemon's clock is 340 days ahead: verify at that time.
        let at = (t0 + time::Duration::days(340)).unix_timestamp().to_string();
        let out = Command::new("openssl")
            .args(["verify", "-attime", &at, "-CAfile"])
            .arg(&root)
            .arg("-untrusted")
            .arg(dir_a.join("chain.pem"))
            .arg(dir_a.join("cert.pem"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let events = store.audit_events(keyward::store::AuditQuery { from_seq: 1, limit: 10_000 }).await.unwrap();
        let last = events.iter().rev().find(|e| e.action == "certificate.renew").unwrap();
        assert_eq!((last.details["rekey"].clone(), last.details["forced"].clone()), (json!(true), json!(false)));

        // ---- Revocation through the CLI.
        let (dir_c, c) = cx.enroll("charlie");
        let (_, d) = cx.enroll("delta");
        let key_c = key_of(&dir_c);
        let csr_c = csr_with_key(&dir_c, &c.to_string());
        let cid = c.to_string();
        let (ok, _, err) = cx.keyward(&["devices", "suspend", &cid, "--comment", "lost in transit"]);
        assert!(ok, "{err}");
        refused(call(Method::GET, &format!("{url}/v1/devices/{c}/renew/nonce"), None, None).await, 409, "device_suspended");
        let (ok, out, _) = cx.keyward(&["devices", "show", &cid, "--output", "json"]);
        assert!(ok);
        let shown: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(shown["status"], "suspended");
        assert_eq!(shown["certificates"][0]["revocation_reason"], "certificate-hold");
        assert_eq!(shown["certificates"][0]["revocation_reason_code"], 6);
        let c_serial = shown["certificates"][0]["serial"].as_str().unwrap().to_string();
        assert!(recorder.0.lock().unwrap().iter().any(|(_, s)| s.contains(&c_serial)), "observer told");
        // A held certificate of a suspended device is released by resuming the device.
        let (ok, _, err) = cx.keyward(&["certs", "release-hold", &c_serial]);
        assert!(!ok && err.contains("device_suspended"), "{err}");
        let (ok, _, err) = cx.keyward(&["devices", "resume", &cid]);
        assert!(ok, "{err}");
        let (_, v) = call(Method::GET, &format!("{url}/v1/admin/certs/{c_serial}"), Some(&token), None).await;
        assert_eq!(v["status"], "valid");
        let (ok, _, err) = cx.keyward(&["devices", "resume", &cid]);
        assert!(!ok && err.contains("not_suspended"), "{err}");
        // Suspend, then revoke: final, with the hold's time kept.
        assert!(cx.keyward(&["devices", "suspend", &cid]).0);
        let (_, held) = call(Method::GET, &format!("{url}/v1/admin/certs/{c_serial}"), Some(&token), None).await;
        clock.advance(time::Duration::hours(1));
        let (ok, _, err) = cx.keyward(&["devices", "revoke", &cid, "--reason", "keyCompromise"]);
        assert!(ok, "{err}");
        let (_, v) = call(Method::GET, &format!("{url}/v1/admin/certs/{c_serial}"), Some(&token), None).await;
        assert_eq!((v["status"].as_str(), v["revocation_reason"].as_str(), v["revocation_reason_code"].as_u64()), (Some("revoked"), Some("key-compromise"), Some(1)));
        assert_eq!(v["revoked_at"], held["revoked_at"]);
        for verb in ["resume", "suspend"] {
            let (ok, _, err) = cx.keyward(&["devices", verb, &cid]);
            assert!(!ok && err.contains("device_revoked"), "{verb}: {err}");
        }
        let (ok, _, err) = cx.keyward(&["devices", "revoke", &cid, "--reason", "certificate-hold"]);
        assert!(!ok, "{err}");
        // The revoked device can neither renew nor register its key again.
        let n_err = call(Method::GET, &format!("{url}/v1/devices/{c}/renew/nonce"), None, None).await;
        refused(n_err, 409, "device_revoked");
        let e = state.ca.renew(c, &csr_c, RenewalProof::ClientCertificate(pem_der(&std::fs::read(dir_c.join("cert.pem")).unwrap())), None).await.unwrap_err();
        assert_eq!(e.code(), "device_revoked");
        let before = snapshot().await;
        let r = call(Method::POST, &format!("{url}/v1/registrations"), None, Some(json!({ "csr": pem("CERTIFICATE REQUEST", &csr_c), "name": "charlie again", "group": "auto" }))).await;
        refused(r, 403, "key_revoked");
        // Nor re-key into a revoked key: alpha asks for charlie's key.
        let cert_a3 = std::fs::read_to_string(dir_a.join("cert.pem")).unwrap();
        let key_a3 = key_of(&dir_a);
        let csr_c_for_a = csr_with_key(&dir_c, &a.to_string());
        let n = nonce(&url, a).await;
        refused(renew(&url, a, &csr_c_for_a, &n, &key_a3, Some(&cert_a3)).await, 403, "key_revoked");
        let _ = key_c;

        // ---- A single certificate: hold, release, revoke.
        let (ok, out, _) = cx.keyward(&["certs", "list", "--device", &d.to_string(), "--output", "json"]);
        assert!(ok);
        let listed: Value = serde_json::from_str(&out).unwrap();
        let d_serial = listed["items"][0]["serial"].as_str().unwrap().to_string();
        let (ok, _, err) = cx.keyward(&["certs", "revoke", &d_serial, "--reason", "certificateHold"]);
        assert!(ok, "{err}");
        let (ok, out, err) = cx.keyward(&["certs", "release-hold", &d_serial, "--output", "json"]);
        assert!(ok, "{err}");
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["status"], "valid");
        let (ok, _, err) = cx.keyward(&["certs", "release-hold", &d_serial]);
        assert!(!ok && err.contains("not_on_hold"), "{err}");
        let (ok, _, err) = cx.keyward(&["certs", "revoke", &d_serial, "--reason", "key-compromise"]);
        assert!(ok, "{err}");
        let (ok, _, err) = cx.keyward(&["certs", "revoke", &d_serial, "--reason", "superseded"]);
        assert!(!ok && err.contains("certificate_not_revocable"), "{err}");
        let (ok, _, err) = cx.keyward(&["certs", "revoke", &d_serial, "--reason", "bogus"]);
        assert!(!ok && err.contains("unknown reason"), "{err}");
        let r = call(Method::GET, &format!("{url}/v1/devices/{d}/renew/nonce"), None, None).await;
        assert_eq!(r.0, 200, "the device itself is still active");
        let dir_d = dir.join("delta");
        let csr_d = csr_with_key(&dir_d, &d.to_string());
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(r.1["nonce"].as_str().unwrap()).unwrap();
        refused(renew(&url, d, &csr_d, &n, &key_of(&dir_d), None).await, 403, "certificate_revoked");
        let after = snapshot().await.0;
        for t in ["certificates", "registrations", "devices"] {
            assert_eq!(after[t], before.0[t], "refusals stored no {t}");
        }

        // ---- Expired: bravo's certificate ran out.
        clock.advance(time::Duration::days(30));
        let csr_b = csr_with_key(&dir_b, &b.to_string());
        let n = nonce(&url, b).await;
        let before = snapshot().await;
        refused(renew(&url, b, &csr_b, &n, &key_b, None).await, 403, "certificate_expired");
        // The month's jump makes the CRL job publish fresh CRLs meanwhile;
        // apart from those, the refusal changed nothing.
        let after = snapshot().await;
        let without_crls = |m: &std::collections::BTreeMap<String, i64>| {
            let mut m = m.clone();
            m.remove("crls");
            m.remove("audit_events");
            m
        };
        assert_eq!(without_crls(&after.0), without_crls(&before.0));
        let events = store
            .audit_events(keyward::store::AuditQuery { from_seq: before.1.0 + 1, limit: 1000 })
            .await
            .unwrap();
        assert!(
            events.iter().all(|e| e.action == "crl.publish"),
            "{:?}",
            events.iter().map(|e| &e.action).collect::<Vec<_>>()
        );
        let _ = DAY;

        let _ = stop.send(());
        server.await.unwrap().unwrap();
    });
}
