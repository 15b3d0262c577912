//! The OCSP responder as relying parties meet it: `openssl ocsp` against a
//! real `keyward serve` (SoftHSM2 token, delegated signer), the GET form
//! with curl, the pre-signed cache proven with metrics, every bad request
//! with its code; revocation, holds and signer rotation in-process (the
//! revocation CLI lives on another branch; the store write plus the
//! `RevocationObserver` call is what it does), served on a real socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Env, client, metrics_text, write};
use keyward::app::App;
use keyward::audit::AuditDraft;
use keyward::ca::RevocationObserver;
use keyward::ca::responder::{RequestForm, Responder};
use keyward::clock::{Clock, ManualClock};
use keyward::config::Config;
use keyward::jobs::Job;
use keyward::jobs::ocsp::OcspSignerRotation;
use keyward::registry::Submission;
use keyward::store::{Change, KeyPurpose, KeyState, RevocationReason, Store, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

const AUTO_GROUP: &str = "[[group]]\nname = \"auto\"\nprofile = \"device\"\napproval = \"auto\"\nopen_enrollment = true\n";

/// `openssl ARGS` in `dir`: (success, stdout + stderr).
fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// `openssl ocsp -url` for `cert` (a file in `dir`), issuer and trust files in `dir`.
fn ask(dir: &Path, url: &str, cert: &str, extra: &[&str]) -> String {
    let target = format!("{url}/v1/ocsp");
    let mut args = vec!["ocsp", "-issuer", "issuing.pem"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-cert", cert, "-url", &target, "-CAfile", "root.pem"]);
    let (ok, out) = openssl(dir, &args);
    assert!(ok, "openssl ocsp {args:?}: {out}");
    assert!(out.contains("Response verify OK"), "{out}");
    out
}

/// The value of one sample line of `/metrics` (0 if absent).
async fn metric(url: &str, sample: &str) -> f64 {
    metrics_text(url)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

const HITS: &str = "keyward_ocsp_cache_total{result=\"hit\"}";
const MISSES: &str = "keyward_ocsp_cache_total{result=\"miss\"}";
const SIGNS: &str =
    "keyward_hsm_operations_total{keystore=\"default\",operation=\"sign\",result=\"ok\"}";

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

fn ocsp_signer_creations(env: &Env) -> usize {
    env.audit_after(0)
        .iter()
        .filter(|(_, a, _)| a == "ocsp.signer.create")
        .count()
}

async fn post_raw(url: &str, body: Vec<u8>) -> (u16, String, Vec<u8>) {
    let r = client()
        .post(format!("{url}/v1/ocsp"))
        .header("content-type", "application/ocsp-request")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert_eq!(r.headers()["content-type"], "application/ocsp-response");
    let code = r
        .headers()
        .get("keyward-error-code")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, code, r.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn openssl_gets_good_unknown_and_unauthorized_and_bad_requests_get_their_codes() {
    let env = Env::with_extra_group(AUTO_GROUP);
    env.init();
    let mut daemon = env.serve();
    let url = daemon.url.clone();
    let d = env.dir.path();
    assert_eq!(ocsp_signer_creations(&env), 1, "one signer for `devices`");

    let enrolled = env
        .keyward()
        .args(["enroll", "--url", &url, "--name", "d1", "--group", "auto"])
        .arg("--out")
        .arg(env.path("dev1"))
        .output()
        .unwrap();
    assert!(
        enrolled.status.success(),
        "{}",
        String::from_utf8_lossy(&enrolled.stderr)
    );
    trust_files(&url, d).await;

    // With a nonce (openssl's default): signed fresh, nonce echoed and checked.
    let out = ask(d, &url, "dev1/cert.pem", &[]);
    assert!(out.contains("dev1/cert.pem: good"), "{out}");
    assert!(!out.contains("WARNING"), "nonce not echoed? {out}");
    assert!(out.contains("Next Update:"), "{out}");

    // Without a nonce: signed once, then from the cache (no HSM signature).
    let (hits0, misses0) = (metric(&url, HITS).await, metric(&url, MISSES).await);
    let out = ask(d, &url, "dev1/cert.pem", &["-no_nonce"]);
    assert!(out.contains("dev1/cert.pem: good"), "{out}");
    assert_eq!(metric(&url, MISSES).await, misses0 + 1.0);
    let signs = metric(&url, SIGNS).await;
    for _ in 0..3 {
        let out = ask(d, &url, "dev1/cert.pem", &["-no_nonce"]);
        assert!(out.contains("dev1/cert.pem: good"), "{out}");
    }
    assert_eq!(metric(&url, HITS).await, hits0 + 3.0);
    assert_eq!(metric(&url, MISSES).await, misses0 + 1.0);
    assert_eq!(
        metric(&url, SIGNS).await,
        signs,
        "cache hits signed nothing"
    );
    // A SHA-256 CertID is its own cache entry, and answered too.
    let out = ask(d, &url, "dev1/cert.pem", &["-no_nonce", "-sha256"]);
    assert!(out.contains("dev1/cert.pem: good"), "{out}");

    // GET form (RFC 6960 A.1) with curl, from openssl's request.
    let (ok, out) = openssl(
        d,
        &[
            "ocsp",
            "-issuer",
            "issuing.pem",
            "-cert",
            "dev1/cert.pem",
            "-no_nonce",
            "-reqout",
            "get.req",
        ],
    );
    assert!(ok, "{out}");
    let req = std::fs::read(env.path("get.req")).unwrap();
    let b64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(&req)
    };
    let encoded = b64
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D");
    let curl = Command::new("curl")
        .args(["-sS", "-D", "get.headers", "-o", "get.resp"])
        .arg(format!("{url}/v1/ocsp/{encoded}"))
        .current_dir(d)
        .output()
        .unwrap();
    assert!(
        curl.status.success(),
        "{}",
        String::from_utf8_lossy(&curl.stderr)
    );
    let headers = std::fs::read_to_string(env.path("get.headers"))
        .unwrap()
        .to_lowercase();
    assert!(headers.starts_with("http/1.1 200"), "{headers}");
    assert!(
        headers.contains("content-type: application/ocsp-response"),
        "{headers}"
    );
    let max_age: u64 = headers
        .split("cache-control: max-age=")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (3000..=3600).contains(&max_age),
        "max-age until nextUpdate (60 min): {max_age}"
    );
    let (ok, out) = openssl(
        d,
        &[
            "ocsp",
            "-respin",
            "get.resp",
            "-issuer",
            "issuing.pem",
            "-cert",
            "dev1/cert.pem",
            "-CAfile",
            "root.pem",
            "-no_nonce",
        ],
    );
    assert!(ok && out.contains("Response verify OK"), "{out}");
    assert!(out.contains("dev1/cert.pem: good"), "{out}");

    // A serial keyward never issued under this CA.
    let target = format!("{url}/v1/ocsp");
    let (ok, out) = openssl(
        d,
        &[
            "ocsp",
            "-issuer",
            "issuing.pem",
            "-serial",
            "0x0123456789ABCDEF",
            "-url",
            &target,
            "-CAfile",
            "root.pem",
        ],
    );
    assert!(ok && out.contains("0x0123456789ABCDEF: unknown"), "{out}");

    // A CertID of an issuer keyward does not run: the RFC's `unauthorized`.
    let (ok, out) = openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=Foreign CA",
            "-keyout",
            "foreign.key",
            "-out",
            "foreign.pem",
        ],
    );
    assert!(ok, "{out}");
    let (_, out) = openssl(
        d,
        &[
            "ocsp",
            "-issuer",
            "foreign.pem",
            "-serial",
            "0x01",
            "-url",
            &target,
            "-CAfile",
            "root.pem",
        ],
    );
    assert!(out.contains("Responder Error: unauthorized (6)"), "{out}");
    // So is the root's own CertID (it has no delegated signer).
    let (_, out) = openssl(
        d,
        &[
            "ocsp",
            "-issuer",
            "root.pem",
            "-cert",
            "issuing.pem",
            "-url",
            &target,
            "-CAfile",
            "root.pem",
        ],
    );
    assert!(out.contains("Responder Error: unauthorized (6)"), "{out}");

    // Bad requests: the documented status, code and OCSP body; nothing changes.
    let before = env.counts();
    let malformed = vec![0x30, 0x03, 0x0a, 0x01, 0x01];
    let (status, code, body) = post_raw(&url, b"not an OCSP request".to_vec()).await;
    assert_eq!((status, code.as_str()), (400, "ocsp_request_malformed"));
    assert_eq!(body, malformed, "status-only malformedRequest");
    let (status, code, body) = post_raw(&url, vec![0x30; 5000]).await;
    assert_eq!((status, code.as_str()), (413, "ocsp_request_too_large"));
    assert_eq!(body, malformed);
    let mut trailing = req.clone();
    trailing.extend_from_slice(&[0, 0, 7]);
    let (status, code, _) = post_raw(&url, trailing).await;
    assert_eq!((status, code.as_str()), (400, "ocsp_request_trailing_data"));
    let mut many = vec!["ocsp", "-issuer", "issuing.pem", "-reqout", "many.req"];
    let serials: Vec<String> = (1..=11).map(|i| format!("0x{i:02X}")).collect();
    for s in &serials {
        many.extend_from_slice(&["-serial", s]);
    }
    let (ok, out) = openssl(d, &many);
    assert!(ok, "{out}");
    let (status, code, _) = post_raw(&url, std::fs::read(env.path("many.req")).unwrap()).await;
    assert_eq!((status, code.as_str()), (400, "ocsp_too_many_cert_ids"));
    let r = client()
        .get(format!("{url}/v1/ocsp/%zz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(r.headers()["keyward-error-code"], "ocsp_get_encoding");
    let r = client()
        .post(format!("{url}/v1/ocsp"))
        .header("content-type", "application/json")
        .body(req.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unsupported_media_type");
    assert_eq!(env.counts(), before);
    let m = metrics_text(&url).await;
    for s in [
        "keyward_ocsp_responses_total{status=\"good\"}",
        "keyward_ocsp_responses_total{status=\"unknown\"} 1",
        "keyward_ocsp_responses_total{status=\"unauthorized\"} 2",
        "keyward_ocsp_responses_total{status=\"malformed\"} 5",
        "keyward_ocsp_signer_not_after_timestamp_seconds{ca=\"devices\"}",
    ] {
        assert!(m.contains(s), "{s} in\n{m}");
    }
    common::promtool_check(&m);

    // A restart loads the active signer; it does not make another.
    daemon.stop();
    let daemon = env.serve();
    let out = ask(d, &daemon.url, "dev1/cert.pem", &[]);
    assert!(out.contains("dev1/cert.pem: good"), "{out}");
    assert_eq!(ocsp_signer_creations(&env), 1);
}

// ---- In-process: the App on a real socket, its store and clock at hand.

const CHILD: &str = "KEYWARD_TEST_OCSP_CONFIG";

/// In the parent: an installation with the `auto` group, `keyward init`, and
/// `test` re-run in a child with `SOFTHSM2_CONF` set (SoftHSM2 reads it
/// once per process). In the child: the config path.
fn child_config(test: &str) -> Option<(PathBuf, PathBuf)> {
    if let Some(cfg) = std::env::var_os(CHILD) {
        let cfg = PathBuf::from(cfg);
        let dir = cfg.parent().unwrap().to_path_buf();
        return Some((cfg, dir));
    }
    let env = Env::with_extra_group(AUTO_GROUP);
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

/// Issues a device certificate through the `auto` group; writes it to
/// `dir/name.pem` and returns its serial (upper-case hex).
async fn issue(app: &App, dir: &Path, name: &str) -> String {
    let (csr, _) = common::openssl_csr(dir, "ec");
    let s = app
        .state
        .registry
        .submit(
            Submission {
                csr: Some(csr.into_bytes()),
                evidence: keyward::registry::Evidence::None,
                age_recipient: None,
                name: name.to_string(),
                device_type: None,
                location: None,
                firmware: None,
                group: Some("auto".to_string()),
                client_addr: None,
            },
            None,
        )
        .await
        .unwrap();
    let serial = s.registration.certificate_serial.unwrap();
    let cert = app
        .state
        .store
        .get_certificate(&serial)
        .await
        .unwrap()
        .unwrap();
    std::fs::write(
        dir.join(format!("{name}.pem")),
        keyward::ca::x509::to_pem(&cert.der).unwrap(),
    )
    .unwrap();
    serial
}

/// What the revocation service does: one audited store write, then
/// (with `notify`) the observers.
async fn set_revoked(
    store: &Arc<dyn Store>,
    ocsp: &Responder,
    serial: &str,
    reason: RevocationReason,
    notify: bool,
) {
    let at = OffsetDateTime::now_utc().unix_timestamp();
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
                    format!("cert:{serial}"),
                )),
        )
        .await
        .unwrap();
    if notify {
        ocsp.revocation_changed("devices", &[serial.to_string()]);
    }
}

/// Serves `app` on a loopback port; returns the URL and the shutdown trigger.
async fn serve(app: App) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        app.serve_on(listener, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (url, tx)
}

#[test]
fn revocation_and_hold_reach_openssl_once_the_observer_is_told() {
    let Some((config, dir)) =
        child_config("revocation_and_hold_reach_openssl_once_the_observer_is_told")
    else {
        return;
    };
    runtime().block_on(async {
        let config = Config::load(&config).unwrap();
        let app = App::build(config).await.unwrap();
        app.state.ocsp.refresh_signers("system").await.unwrap();
        let d = dir.as_path();
        let revoked = issue(&app, d, "revoked").await;
        let held = issue(&app, d, "held").await;
        let ocsp = app.state.ocsp.clone();
        let store = app.state.store.clone();
        let metrics = app.state.metrics.clone();
        let (url, stop) = serve(app).await;
        trust_files(&url, d).await;

        // Concurrent misses for one CertID sign once.
        let (ok, out) = openssl(
            d,
            &[
                "ocsp",
                "-issuer",
                "issuing.pem",
                "-cert",
                "held.pem",
                "-no_nonce",
                "-reqout",
                "held.req",
            ],
        );
        assert!(ok, "{out}");
        let req = Arc::new(std::fs::read(d.join("held.req")).unwrap());
        let before = metrics.render();
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (ocsp, req) = (ocsp.clone(), req.clone());
                tokio::spawn(async move { ocsp.respond(RequestForm::Der(&req), None).await })
            })
            .collect();
        let mut bodies = std::collections::BTreeSet::new();
        for t in tasks {
            let a = t.await.unwrap();
            assert!(a.refused.is_none());
            bodies.insert(a.body.to_vec());
        }
        assert_eq!(bodies.len(), 1, "32 answers, one signed response");
        let count = |text: &str, sample: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
                .unwrap_or(0.0)
        };
        let after = metrics.render();
        assert_eq!(count(&after, MISSES) - count(&before, MISSES), 1.0);
        assert_eq!(count(&after, SIGNS) - count(&before, SIGNS), 1.0);

        // Good and cached; a revocation written without telling the
        // responder is not seen (the cache is what answers) ...
        let out = ask(d, &url, "revoked.pem", &["-no_nonce"]);
        assert!(out.contains("revoked.pem: good"), "{out}");
        set_revoked(
            &store,
            &ocsp,
            &revoked,
            RevocationReason::KeyCompromise,
            false,
        )
        .await;
        let out = ask(d, &url, "revoked.pem", &["-no_nonce"]);
        assert!(out.contains("revoked.pem: good"), "still cached: {out}");
        // ... a nonce asks the store, and the observer call drops the entry.
        let out = ask(d, &url, "revoked.pem", &[]);
        assert!(out.contains("revoked.pem: revoked"), "{out}");
        ocsp.revocation_changed("devices", std::slice::from_ref(&revoked));
        let out = ask(d, &url, "revoked.pem", &["-no_nonce"]);
        assert!(out.contains("revoked.pem: revoked"), "{out}");
        assert!(out.contains("Reason: keyCompromise"), "{out}");
        assert!(out.contains("Revocation Time:"), "{out}");

        // A hold is revoked with certificateHold; released, good again.
        let out = ask(d, &url, "held.pem", &["-no_nonce"]);
        assert!(out.contains("held.pem: good"), "{out}");
        set_revoked(
            &store,
            &ocsp,
            &held,
            RevocationReason::CertificateHold,
            true,
        )
        .await;
        let out = ask(d, &url, "held.pem", &["-no_nonce"]);
        assert!(out.contains("held.pem: revoked"), "{out}");
        assert!(out.contains("Reason: certificateHold"), "{out}");
        store
            .commit(
                Change::new()
                    .write(Write::ReleaseCertificateHold {
                        serial: held.clone(),
                        at: OffsetDateTime::now_utc().unix_timestamp(),
                    })
                    .audit(AuditDraft::new(
                        "test",
                        "certificate.resume",
                        format!("cert:{held}"),
                    )),
            )
            .await
            .unwrap();
        ocsp.revocation_changed("devices", std::slice::from_ref(&held));
        let out = ask(d, &url, "held.pem", &["-no_nonce", "-sha256"]);
        assert!(out.contains("held.pem: good"), "{out}");
        let _ = stop.send(());
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
}

#[test]
fn signer_rotation_follows_policy_on_the_manual_clock() {
    let Some((config, dir)) = child_config("signer_rotation_follows_policy_on_the_manual_clock")
    else {
        return;
    };
    runtime().block_on(async {
        let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let clock = Arc::new(ManualClock::new(t0));
        let app = App::build_with_clock(Config::load(&config).unwrap(), clock.clone())
            .await
            .unwrap();
        let s = &app.state;
        assert_eq!(s.ocsp.refresh_signers("system").await.unwrap(), ["devices"]);
        let first = s.ocsp.signers().pop().unwrap();
        // Policy: 30 days, replaced 7 days before expiry.
        assert_eq!(first.not_after - first.not_before, 30 * 86_400 + 300);
        let d = dir.as_path();
        issue(&app, d, "dev").await;
        let ca_chain = s.ca.issuer("devices").unwrap().chain_pem.clone();
        let mut certs = ca_chain.split_inclusive("-----END CERTIFICATE-----\n");
        write(d, "issuing.pem", certs.next().unwrap());
        write(d, "root.pem", certs.next().unwrap());
        let (ok, out) = openssl(
            d,
            &[
                "ocsp",
                "-issuer",
                "issuing.pem",
                "-cert",
                "dev.pem",
                "-no_nonce",
                "-reqout",
                "dev.req",
            ],
        );
        assert!(ok, "{out}");
        let req = std::fs::read(d.join("dev.req")).unwrap();
        let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        let a = s.ocsp.respond(RequestForm::Der(&req), None).await;
        assert!(contains(&a.body, &first.cert_der));

        let job = OcspSignerRotation::new(s.ocsp.clone(), Duration::from_secs(900));
        let seq0 = s.store.audit_head().await.unwrap().0;
        // One second before the renewal time: nothing happens.
        clock.set(
            t0 + time::Duration::seconds(first.not_after - t0.unix_timestamp() - 7 * 86_400 - 1),
        );
        job.tick(clock.now()).await.unwrap();
        assert_eq!(s.ocsp.signers()[0].serial, first.serial);
        assert_eq!(s.store.audit_head().await.unwrap().0, seq0);
        // At it: a new signer, the old one retired, all audited.
        clock.advance(time::Duration::seconds(1));
        job.tick(clock.now()).await.unwrap();
        let second = s.ocsp.signers().pop().unwrap();
        assert_ne!(second.serial, first.serial);
        assert_eq!(second.issuer_ca, "devices");
        let old_key = s.store.get_key(first.key_id).await.unwrap().unwrap();
        assert_eq!(old_key.state, KeyState::Retired);
        let new_key = s.store.get_key(second.key_id).await.unwrap().unwrap();
        assert_eq!(new_key.state, KeyState::Active);
        assert_eq!(new_key.purpose, KeyPurpose::OcspSigning);
        let active = s
            .store
            .service_certificates(KeyPurpose::OcspSigning)
            .await
            .unwrap();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].serial, second.serial);
        let events: Vec<String> = s
            .store
            .audit_events(keyward::store::AuditQuery {
                from_seq: seq0 + 1,
                limit: 100,
            })
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.action)
            .collect();
        for want in [
            "key.generate_started",
            "key.generate",
            "ocsp.signer.create",
            "ocsp.signer.retire",
        ] {
            assert!(events.iter().any(|e| e == want), "{want} in {events:?}");
        }
        // Responses now carry the new signer's certificate (the cache was emptied).
        let b = s.ocsp.respond(RequestForm::Der(&req), None).await;
        assert!(b.refused.is_none());
        assert!(contains(&b.body, &second.cert_der));
        assert!(!contains(&b.body, &first.cert_der));
        std::fs::write(d.join("dev.resp"), &b.body).unwrap();
        let (_, out) = openssl(
            d,
            &["ocsp", "-respin", "dev.resp", "-resp_text", "-noverify"],
        );
        assert!(out.contains("keyward OCSP responder for devices"), "{out}");
        // A second tick changes nothing.
        let seq1 = s.store.audit_head().await.unwrap().0;
        job.tick(clock.now()).await.unwrap();
        assert_eq!(s.store.audit_head().await.unwrap().0, seq1);
    });
}
