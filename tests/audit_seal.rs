//! Sensitive audit details sealed with a data key the HSM unwraps, on a
//! real token and a real `keyward serve`.
//!
//! A registration submitted with device metadata from a client address,
//! approved with a comment: the audit rows hold none of it in the clear
//! (every column of every row scanned), `keyward audit verify` passes
//! without any key, and the details open again for an auditor
//! (`AuditService::reveal`) in a fresh process, where the data keys are
//! decrypted again by the HSM: one data key per daemon start, both still
//! readable after a restart. An altered ciphertext or an unknown data key
//! is a clear error, never a guess, and an altered ciphertext in the store
//! is what `audit verify` reports as edited.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once, at `C_Initialize`, so the in-process
//! part re-runs this test in a child process with the variable set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Env, add_admin, call, openssl_csr};
use keyward::app::App;
use keyward::audit::AuditEvent;
use keyward::config::Config;
use keyward::store::AuditQuery;
use serde_json::{Value, json};
use std::path::PathBuf;

const CHILD: &str = "KEYWARD_TEST_SEAL_CONFIG";

const NAME_A: &str = "sealdev-name-7f3k";
const LOCATION_A: &str = "cellar-9q-location";
const COMMENT_A: &str = "approve-comment-zx81-serial-ok";
const ADDR_A: &str = "198.51.100.77";
const NAME_B: &str = "sealdev-name-b4tt";
const COMMENT_B: &str = "deny-comment-qq42-unknown-unit";
const ADDR_B: &str = "203.0.113.66";

async fn submit(url: &str, csr: &str, name: &str, location: &str, addr: &str) -> String {
    let resp = common::client()
        .post(format!("{url}/v1/registrations"))
        .header("x-forwarded-for", addr)
        .json(&json!({
            "csr": csr,
            "name": name,
            "location": location,
            "firmware": "fw-1.2.3-seal",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Every column of every audit row, as bytes.
fn audit_row_bytes(db: &std::path::Path) -> Vec<(i64, String, Vec<u8>)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut stmt = c
        .prepare("SELECT * FROM audit_events ORDER BY seq")
        .unwrap();
    let n = stmt.column_count();
    stmt.query_map([], |r| {
        let mut bytes = Vec::new();
        for i in 0..n {
            match r.get_ref(i)? {
                rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                    bytes.extend_from_slice(t)
                }
                rusqlite::types::ValueRef::Integer(v) => {
                    bytes.extend_from_slice(v.to_string().as_bytes())
                }
                _ => {}
            }
            bytes.push(b'|');
        }
        Ok((r.get(0)?, r.get::<_, String>("action")?, bytes))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

fn row(
    db: &std::path::Path,
    action: &str,
    target: &str,
) -> (Option<String>, Option<String>, Value) {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row(
            "SELECT source, sealed, details FROM audit_events WHERE action = ?1 AND target = ?2",
            [action, target],
            |r| {
                let d: String = r.get(2)?;
                Ok((r.get(0)?, r.get(1)?, serde_json::from_str(&d).unwrap()))
            },
        )
        .unwrap()
}

fn verify(env: &Env) -> (i32, Value) {
    let out = env.run(&[
        "audit",
        "verify",
        "--config",
        env.config.to_str().unwrap(),
        "--output",
        "json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), v)
}

#[test]
fn sensitive_details_are_sealed_verified_without_the_key_and_revealed_by_the_hsm() {
    if let Some(cfg) = std::env::var_os(CHILD) {
        reveal_in_process(PathBuf::from(cfg));
        return;
    }
    let env = Env::new();
    env.trust_loopback_proxy();
    let bootstrap = env.init();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (csr, _) = openssl_csr(env.dir.path(), "ec");

    // Daemon 1: submit with metadata from a client, approve with a comment.
    let mut daemon = env.serve();
    let (reg_a, approver) = rt.block_on(async {
        let url = daemon.url.clone();
        let approver = add_admin(&url, &bootstrap, "alice", "approver").await;
        let id = submit(&url, &csr, NAME_A, LOCATION_A, ADDR_A).await;
        let (status, v) = call(
            reqwest::Method::POST,
            &format!("{url}/v1/admin/registrations/{id}/approve"),
            Some(&approver),
            Some(json!({ "comment": COMMENT_A })),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        (id, approver)
    });
    assert!(daemon.stop().success());

    // Daemon 2 (a restart: a new data key): another device, denied with a comment.
    let mut daemon = env.serve();
    let (csr_b, _) = openssl_csr(env.dir.path(), "ec");
    let reg_b = rt.block_on(async {
        let url = daemon.url.clone();
        let id = submit(&url, &csr_b, NAME_B, "loc-b", ADDR_B).await;
        let (status, v) = call(
            reqwest::Method::POST,
            &format!("{url}/v1/admin/registrations/{id}/deny"),
            Some(&approver),
            Some(json!({ "comment": COMMENT_B })),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        id
    });
    assert!(daemon.stop().success());

    // No audit row holds the comments, metadata or client addresses in the clear.
    let rows = audit_row_bytes(&env.db);
    assert!(rows.len() > 10);
    for needle in [
        NAME_A,
        LOCATION_A,
        COMMENT_A,
        ADDR_A,
        NAME_B,
        COMMENT_B,
        ADDR_B,
        "fw-1.2.3-seal",
    ] {
        for (seq, action, bytes) in &rows {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "audit event {seq} ({action}) holds `{needle}` in the clear"
            );
        }
    }
    let (source, sealed, details) = row(
        &env.db,
        "registration.submit",
        &format!("registration:{reg_a}"),
    );
    assert_eq!(source, None);
    let sealed_a = sealed.unwrap();
    assert!(sealed_a.starts_with("v1."), "{sealed_a}");
    assert_eq!(
        details["group"], "default",
        "non-sensitive details stay readable"
    );
    assert!(details.get("name").is_none() && details.get("location").is_none());
    let (_, sealed, details) = row(
        &env.db,
        "registration.approve",
        &format!("registration:{reg_a}"),
    );
    assert!(sealed.is_some());
    assert!(details.get("comment").is_none(), "{details}");
    assert_eq!(details["required"], 1);
    let (_, sealed_b, _) = row(
        &env.db,
        "registration.deny",
        &format!("registration:{reg_b}"),
    );
    let key_of = |s: &str| s.split('.').nth(1).unwrap().to_string();
    assert_ne!(
        key_of(&sealed_a),
        key_of(sealed_b.as_deref().unwrap()),
        "each daemon start seals with a new data key"
    );
    // Data keys: stored wrapped, each creation audited.
    let c = rusqlite::Connection::open(&env.db).unwrap();
    let data_keys: i64 = c
        .query_row("SELECT COUNT(*) FROM audit_data_keys", [], |r| r.get(0))
        .unwrap();
    assert!(data_keys >= 3, "init, serve, serve: {data_keys}");
    let created: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM audit_events WHERE action = 'audit.data_key_create'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(created, data_keys);
    let purpose: String = c
        .query_row(
            "SELECT purpose FROM keys WHERE label = 'keyward-audit-encryption'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(purpose, "audit-encryption");
    drop(c);

    // The chain verifies without any key to the details.
    let (code, report) = verify(&env);
    assert_eq!(code, 0, "{report}");

    // An auditor's view, in a fresh process: the HSM decrypts the data keys again.
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "sensitive_details_are_sealed_verified_without_the_key_and_revealed_by_the_hsm",
            "--exact",
            "--nocapture",
        ])
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .env(CHILD, &env.config)
        .env("KEYWARD_TEST_SEAL_REG_A", &reg_a)
        .env("KEYWARD_TEST_SEAL_REG_B", &reg_b)
        .status()
        .unwrap();
    assert!(status.success(), "the in-process reveal failed");
    assert!(
        env.path("revealed.ok").exists(),
        "the child did not run the reveal checks"
    );

    // Tamper with one sealed value in the store (triggers dropped, as an
    // attacker with file access would): verify names it as edited.
    let c = rusqlite::Connection::open(&env.db).unwrap();
    let seq: i64 = c
        .query_row(
            "SELECT seq FROM audit_events WHERE action = 'registration.approve' AND target = ?1",
            [format!("registration:{reg_a}")],
            |r| r.get(0),
        )
        .unwrap();
    let sealed: String = c
        .query_row(
            "SELECT sealed FROM audit_events WHERE seq = ?1",
            [seq],
            |r| r.get(0),
        )
        .unwrap();
    let mut bytes = sealed.into_bytes();
    let i = bytes.len() - 5;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(bytes).unwrap();
    c.execute_batch("DROP TRIGGER audit_events_no_update")
        .unwrap();
    c.execute(
        "UPDATE audit_events SET sealed = ?1 WHERE seq = ?2",
        rusqlite::params![tampered, seq],
    )
    .unwrap();
    drop(c);
    let (code, report) = verify(&env);
    assert_eq!(code, 1, "{report}");
    let text = report.to_string();
    assert!(text.contains("edited"), "{text}");
    assert!(text.contains(&format!("\"seq\":{seq}")), "{text}");
}

/// The child: builds the app on the same token and store (no daemon runs)
/// and reveals the sealed events.
fn reveal_in_process(config: PathBuf) {
    let reg_a = std::env::var("KEYWARD_TEST_SEAL_REG_A").unwrap();
    let reg_b = std::env::var("KEYWARD_TEST_SEAL_REG_B").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let app = App::build(Config::load(&config).unwrap()).await.unwrap();
        let audit = &app.state.audit;
        let events = app
            .state
            .store
            .audit_events(AuditQuery {
                from_seq: 1,
                limit: 100_000,
            })
            .await
            .unwrap();
        let find = |action: &str, reg: &str| -> AuditEvent {
            events
                .iter()
                .find(|e| e.action == action && e.target == format!("registration:{reg}"))
                .cloned()
                .unwrap()
        };

        // Opened: details merged back, source restored, sealed cleared.
        let mut submit_a = find("registration.submit", &reg_a);
        audit.reveal(&mut submit_a).await.unwrap();
        assert_eq!(submit_a.sealed, None);
        assert_eq!(submit_a.source.as_deref(), Some(ADDR_A));
        assert_eq!(submit_a.details["name"], NAME_A);
        assert_eq!(submit_a.details["location"], LOCATION_A);
        assert_eq!(submit_a.details["firmware"], "fw-1.2.3-seal");
        assert_eq!(submit_a.details["group"], "default");
        let mut approve_a = find("registration.approve", &reg_a);
        audit.reveal(&mut approve_a).await.unwrap();
        assert_eq!(approve_a.details["comment"], COMMENT_A);
        assert_eq!(approve_a.details["submitted_from"], ADDR_A);
        assert_eq!(approve_a.source.as_deref(), Some("127.0.0.1"));
        // Sealed by the second daemon, under its own data key.
        let mut deny_b = find("registration.deny", &reg_b);
        audit.reveal(&mut deny_b).await.unwrap();
        assert_eq!(deny_b.details["comment"], COMMENT_B);
        assert_eq!(deny_b.details["submitted_from"], ADDR_B);
        // An event with nothing sealed is left as it is.
        let mut plain = events.iter().find(|e| e.sealed.is_none()).cloned().unwrap();
        let before = plain.clone();
        audit.reveal(&mut plain).await.unwrap();
        assert_eq!(plain, before);

        // An altered ciphertext: a clear error, the event untouched.
        let original = find("registration.approve", &reg_a);
        let mut altered = original.clone();
        let s = altered.sealed.clone().unwrap();
        let mut bytes = s.into_bytes();
        let i = bytes.len() - 4;
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        altered.sealed = Some(String::from_utf8(bytes).unwrap());
        let kept = altered.clone();
        let err = audit.reveal(&mut altered).await.unwrap_err();
        assert_eq!(err.code(), "audit_sealed_invalid", "{err}");
        assert_eq!(altered, kept);
        // A data key nobody has: named, not guessed.
        let mut unknown = original.clone();
        let s = unknown.sealed.clone().unwrap();
        let id = s.split('.').nth(1).unwrap().to_string();
        let other = uuid::Uuid::now_v7().to_string();
        unknown.sealed = Some(s.replace(&id, &other));
        let err = audit.reveal(&mut unknown).await.unwrap_err();
        assert_eq!(err.code(), "audit_data_key_unknown", "{err}");
        assert!(err.to_string().contains(&other), "{err}");
        // Not a sealed value at all.
        let mut junk = original.clone();
        junk.sealed = Some("v9.whatever".into());
        let err = audit.reveal(&mut junk).await.unwrap_err();
        assert_eq!(err.code(), "audit_sealed_malformed", "{err}");
        // What other roles see.
        let mut redacted = original.clone();
        keyward::audit::service::AuditService::redact(&mut redacted);
        assert_eq!(redacted.sealed.as_deref(), Some("redacted"));
        assert!(audit.reveal(&mut redacted).await.is_err());
    });
    std::fs::write(config.parent().unwrap().join("revealed.ok"), "ok").unwrap();
}

/// `[audit] encrypt_details = false`: sensitive details are stored in the
/// clear (as documented), and nothing is sealed.
#[test]
fn with_encryption_off_details_are_stored_in_the_clear() {
    let env = Env::new();
    env.trust_loopback_proxy();
    env.append_config("[audit]\nencrypt_details = false\n");
    let bootstrap = env.init();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let daemon = env.serve();
    let reg = rt.block_on(async {
        let url = daemon.url.clone();
        let approver = add_admin(&url, &bootstrap, "alice", "approver").await;
        let id = submit(&url, &csr, NAME_A, LOCATION_A, ADDR_A).await;
        let (status, v) = call(
            reqwest::Method::POST,
            &format!("{url}/v1/admin/registrations/{id}/approve"),
            Some(&approver),
            Some(json!({ "comment": COMMENT_A })),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        id
    });
    drop(daemon);
    let (source, sealed, details) = row(
        &env.db,
        "registration.submit",
        &format!("registration:{reg}"),
    );
    assert_eq!(source.as_deref(), Some(ADDR_A));
    assert_eq!(sealed, None);
    assert_eq!(details["name"], NAME_A);
    let (_, sealed, details) = row(
        &env.db,
        "registration.approve",
        &format!("registration:{reg}"),
    );
    assert_eq!(sealed, None);
    assert_eq!(details["comment"], COMMENT_A);
    let c = rusqlite::Connection::open(&env.db).unwrap();
    let n: i64 = c
        .query_row("SELECT COUNT(*) FROM audit_data_keys", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
    let (code, report) = verify(&env);
    assert_eq!(code, 0, "{report}");
}
