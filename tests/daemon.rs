//! The daemon as operators and devices meet it: a real `keyward serve`
//! process on a loopback socket, a real SoftHSM2 token, and results checked
//! with openssl and pkcs11-tool.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    Env, PIN, add_admin, call, client, corrupt_signature, openssl_csr, openssl_verify, write,
};
use serde_json::{Value, json};
use std::process::Command;

async fn submit(url: &str, csr: &str, token: Option<&str>, group: &str) -> (u16, Value) {
    call(
        reqwest::Method::POST,
        &format!("{url}/v1/registrations"),
        token,
        Some(json!({ "csr": csr, "name": "sensor-7", "device_type": "thermo", "location": "lab", "firmware": "1.2.3", "group": group })),
    )
    .await
}

fn assert_error(status: u16, v: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{v}");
    assert_eq!(v["error"]["code"], want_code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

#[tokio::test]
async fn register_approve_fetch_credentials_and_verify_chain_with_openssl() {
    let env = Env::new();
    let bootstrap = env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();

    // The reference client makes its key and CSR, registers and waits.
    let out_dir = env.path("device");
    let mut enroll = env
        .keyward()
        .args(["enroll", "--url", &url, "--name", "sensor-1", "--out"])
        .arg(&out_dir)
        .args(["--poll-interval", "1", "--timeout", "60"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut id = String::new();
    for _ in 0..100 {
        let (_, list) = call(
            reqwest::Method::GET,
            &format!("{url}/v1/admin/registrations?status=pending"),
            Some(&bootstrap),
            None,
        )
        .await;
        if let Some(r) = list["items"].as_array().and_then(|a| a.first()) {
            id = r["id"].as_str().unwrap().to_string();
            assert_eq!(r["name"], "sensor-1");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(!id.is_empty(), "registration never appeared");

    let approver = add_admin(&url, &bootstrap, "alice", "approver").await;
    let (status, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/registrations/{id}/approve"),
        Some(&approver),
        Some(json!({ "comment": "serial matches the delivery note" })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "issued");

    let status = enroll.wait().unwrap();
    assert!(status.success());
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(out_dir.join("key.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);

    let (status, root) = {
        let resp = client()
            .get(format!("{url}/v1/ca/root/chain"))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    };
    assert_eq!(status, 200);
    let root_pem = write(env.dir.path(), "root.pem", &root);
    let chain = std::fs::read_to_string(out_dir.join("chain.pem")).unwrap();
    assert_eq!(
        chain.matches("BEGIN CERTIFICATE").count(),
        2,
        "chain.pem must hold the issuing CA then the root"
    );
    assert!(
        chain.ends_with(&root),
        "chain.pem must end with the root certificate"
    );
    let issuing = chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap();
    let issuing_pem = write(env.dir.path(), "issuing.pem", issuing);
    let (ok, msg) = openssl_verify(&root_pem, &issuing_pem, &out_dir.join("cert.pem"));
    assert!(ok, "{msg}");
    let (ok, msg) = openssl_verify(
        &root_pem,
        &out_dir.join("chain.pem"),
        &out_dir.join("cert.pem"),
    );
    assert!(ok, "{msg}");

    // The certificate matches the device's key, names the device, and is for client auth.
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(out_dir.join("cert.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    let (_, reg) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/registrations/{id}"),
        Some(&bootstrap),
        None,
    )
    .await;
    let device_id = reg["device_id"].as_str().unwrap();
    assert!(
        text.contains(&format!("Subject: CN = {device_id}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("URI:urn:uuid:{device_id}")),
        "{text}"
    );
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    let cert_pub = Command::new("openssl")
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(out_dir.join("cert.pem"))
        .output()
        .unwrap()
        .stdout;
    let key_pub = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(out_dir.join("key.pem"))
        .output()
        .unwrap()
        .stdout;
    assert_eq!(cert_pub, key_pub);

    // Credentials are delivered once.
    let reg_file: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("registration.json")).unwrap())
            .unwrap();
    let secret = reg_file["secret"].as_str().unwrap();
    let (status, v) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/registrations/{id}/credentials"),
        Some(secret),
        None,
    )
    .await;
    assert_error(status, &v, 410, "credentials_already_delivered");

    // CA keys are sensitive, read back by OpenSC's pkcs11-tool. The root and
    // the OCSP signer are never extractable; the issuing CA's policy default
    // is wrap-only (backups carry it wrapped inside the HSM), never readable.
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .arg("--module")
        .arg(common::softhsm_module())
        .args([
            "--token-label",
            &env.label,
            "--login",
            "--pin",
            PIN,
            "--list-objects",
            "--type",
            "privkey",
        ])
        .output()
        .expect("pkcs11-tool (opensc) missing: run scripts/test.sh");
    let listing = String::from_utf8_lossy(&out.stdout);
    let keys: Vec<&str> = listing.split("Private Key Object").skip(1).collect();
    // Root, issuing CA, the issuing CA's delegated OCSP signer (made at
    // serve), the audit checkpoint key, the audit-encryption key and the
    // token-signing key (all three made at init).
    assert_eq!(keys.len(), 6, "{listing}");
    for k in keys {
        assert!(k.contains("sensitive"), "{k}");
        if k.contains("keyward-ca-devices-")
            || k.contains("keyward-audit")
            || k.contains("keyward-token-signing")
        {
            assert!(k.contains("extractable"), "{k}");
            assert!(!k.contains("never extractable"), "{k}");
        } else {
            assert!(k.contains("never extractable"), "{k}");
            assert!(!k.contains("Access:     extractable"), "{k}");
        }
    }

    // The audit chain covers all of it and verifies.
    let out = env.run(&["audit", "verify", "--config", env.config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let actions: Vec<String> = env.audit_after(0).into_iter().map(|(_, a, _)| a).collect();
    for needed in [
        "ca.create",
        "registration.submit",
        "registration.approve",
        "certificate.issue",
        "registration.credentials_delivered",
    ] {
        assert!(
            actions.iter().any(|a| a == needed),
            "missing {needed} in {actions:?}"
        );
    }
}

#[tokio::test]
async fn bad_inputs_get_clear_errors_and_change_nothing() {
    let env = Env::new();
    let bootstrap = env.init();
    let mut daemon = env.serve();
    let url = daemon.url.clone();
    let auditor = add_admin(&url, &bootstrap, "audrey", "auditor").await;
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let (status, pending) = submit(&url, &csr, None, "default").await;
    assert_eq!(status, 201, "{pending}");
    let id = pending["id"].as_str().unwrap().to_string();
    let before = env.counts();

    // A CSR whose signature does not verify.
    let (s, v) = submit(&url, &corrupt_signature(&csr), None, "default").await;
    assert_error(s, &v, 422, "csr_signature_invalid");
    // Not a CSR at all.
    let (s, v) = submit(
        &url,
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        None,
        "default",
    )
    .await;
    assert_error(s, &v, 400, "invalid_csr");
    // A key size the profile does not allow (RSA-1024), and a key type it does not list (Ed25519).
    let (rsa1024, _) = openssl_csr(env.dir.path(), "rsa:1024");
    let (s, v) = submit(&url, &rsa1024, None, "default").await;
    assert_error(s, &v, 422, "key_size_not_allowed");
    let (ed, _) = openssl_csr(env.dir.path(), "ed25519");
    let (s, v) = submit(&url, &ed, None, "default").await;
    assert_error(s, &v, 422, "key_algorithm_not_allowed");
    // Unknown group, unknown field, empty name.
    let (s, v) = submit(&url, &csr, None, "no-such-group").await;
    assert_error(s, &v, 400, "unknown_group");
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(json!({ "csr": csr, "name": "x", "is_ca": true })),
    )
    .await;
    assert_error(s, &v, 422, "invalid_json");
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(json!({ "csr": csr, "name": "" })),
    )
    .await;
    assert_error(s, &v, 400, "invalid_field");
    // A body over the limit (16 KiB in the test config).
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(json!({ "csr": csr, "name": "x".repeat(20_000) })),
    )
    .await;
    assert_error(s, &v, 413, "payload_too_large");
    // Admin calls without a token.
    let (s, v) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/registrations"),
        None,
        None,
    )
    .await;
    assert_error(s, &v, 401, "unauthorized");
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/registrations/{id}/approve"),
        None,
        None,
    )
    .await;
    assert_error(s, &v, 401, "unauthorized");
    // A role that may not approve, or create admins.
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/registrations/{id}/approve"),
        Some(&auditor),
        None,
    )
    .await;
    assert_error(s, &v, 403, "forbidden_role");
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/invitations"),
        Some(&auditor),
        Some(json!({ "name": "mallory", "role": "admin" })),
    )
    .await;
    assert_error(s, &v, 403, "forbidden_role");
    // Malformed ids and registration secrets.
    let (s, v) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/registrations/not-a-uuid"),
        Some("kwr_x"),
        None,
    )
    .await;
    assert_error(s, &v, 400, "invalid_id");
    let (s, v) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/registrations/{id}"),
        Some("kwr_wrong"),
        None,
    )
    .await;
    assert_error(s, &v, 401, "unauthorized");
    let (s, v) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/registrations/{id}/credentials"),
        Some(pending["secret"].as_str().unwrap()),
        None,
    )
    .await;
    assert_error(s, &v, 409, "not_issued");

    assert_eq!(
        env.counts(),
        before,
        "a rejected request changed the store or the audit chain"
    );

    // A wrong admin token is an authentication failure: 401, nothing else
    // changes; it is audited aggregated per source and window (see
    // tests/daemon_limits.rs), at the latest when the daemon shuts down cleanly.
    let seq = before["audit_events"];
    let (s, v) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/registrations"),
        Some("kwa_forged"),
        None,
    )
    .await;
    assert_error(s, &v, 401, "unauthorized");
    assert_eq!(env.counts(), before);
    daemon.stop();
    let after = env.counts();
    assert_eq!(after["audit_events"], seq + 1);
    assert_eq!(
        env.audit_after(seq),
        vec![(
            "anonymous".into(),
            "admin.login_failed".into(),
            "denied".into()
        )]
    );
    let mut rest = after.clone();
    rest.remove("audit_events");
    let mut rest_before = before.clone();
    rest_before.remove("audit_events");
    assert_eq!(rest, rest_before);
}

#[tokio::test]
async fn separation_of_duties_and_quorum_of_distinct_admins() {
    let env = Env::with_extra_group(
        "[[group]]\nname = \"critical\"\nprofile = \"device\"\napprovals_required = 2\napprover_role = \"approver\"\n",
    );
    let bootstrap = env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();
    let alice = add_admin(&url, &bootstrap, "alice", "approver").await;
    let bob = add_admin(&url, &bootstrap, "bob", "approver").await;

    // Alice submits on a device's behalf: she can never decide it.
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let (s, reg) = submit(&url, &csr, Some(&alice), "critical").await;
    assert_eq!(s, 201, "{reg}");
    let id = reg["id"].as_str().unwrap();
    let before = env.counts();
    let approve = |who: String| {
        let url = url.clone();
        let id = id.to_string();
        async move {
            call(
                reqwest::Method::POST,
                &format!("{url}/v1/admin/registrations/{id}/approve"),
                Some(&who),
                None,
            )
            .await
        }
    };
    let (s, v) = approve(alice.clone()).await;
    assert_error(s, &v, 403, "self_approval");
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/registrations/{id}/deny"),
        Some(&alice),
        None,
    )
    .await;
    assert_error(s, &v, 403, "self_approval");
    assert_eq!(env.counts(), before, "self-approval changed something");

    // Two distinct admins are needed; the same admin twice does not count.
    let (s, v) = approve(bob.clone()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "pending");
    assert_eq!(v["approvals"], 1);
    let (s, v) = approve(bob.clone()).await;
    assert_error(s, &v, 409, "already_decided");
    let (s, v) = approve(bootstrap.clone()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "issued");
    assert_eq!(v["approvals"], 2);
    let (s, v) = approve(bootstrap.clone()).await;
    assert_error(s, &v, 409, "not_pending");

    // A denial ends a registration; nobody can approve it afterwards.
    let (csr2, _) = openssl_csr(env.dir.path(), "ec");
    let (_, reg2) = submit(&url, &csr2, None, "critical").await;
    let id2 = reg2["id"].as_str().unwrap();
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/registrations/{id2}/deny"),
        Some(&bob),
        Some(json!({ "comment": "unknown serial" })),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "denied");
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/registrations/{id2}/approve"),
        Some(&alice),
        None,
    )
    .await;
    assert_error(s, &v, 409, "not_pending");
    let (s, v) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/registrations/{id2}"),
        Some(reg2["secret"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["status"], "denied");
}

#[test]
fn startup_and_config_errors_are_clear() {
    let env = Env::new();
    // Unknown config key: named, exit 1, before touching anything.
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("[store]\n", "[store]\npaht = \"x\"\n");
    let bad = write(env.dir.path(), "bad.toml", &text);
    let out = env.run(&["config", "check", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("paht"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Unknown key in a policy.
    let policies = env.path("policies/enrollment.toml");
    let good_policy = std::fs::read_to_string(&policies).unwrap();
    std::fs::write(
        &policies,
        good_policy.replace(
            "approvals_required = 1",
            "approvals_required = 1\napprovals = 2",
        ),
    )
    .unwrap();
    let out = env.run(&["config", "check", "--config", env.config.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("approvals"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&policies, good_policy).unwrap();
    let out = env.run(&["config", "check", "--config", env.config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Serving before init is refused.
    let out = env.run(&["serve", "--config", env.config.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("keyward init"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Wrong PIN.
    std::fs::write(env.path("hsm.pin"), "not-the-pin").unwrap();
    let out = env.run(&["init", "--config", env.config.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CKR_PIN_INCORRECT"), "{err}");
    std::fs::write(env.path("hsm.pin"), PIN).unwrap();

    // A pepper too short to be a key.
    std::fs::write(env.path("pepper"), "short").unwrap();
    let out = env.run(&["init", "--config", env.config.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at least 16 bytes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(env.path("pepper"), "test-pepper-0123456789").unwrap();

    // Missing token: says which tokens exist.
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace(&env.label, "no-such-token");
    let cfg = write(env.dir.path(), "notoken.toml", &text);
    let out = env.run(&["init", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-token") && err.contains(&env.label),
        "{err}"
    );

    // Missing module.
    let text = std::fs::read_to_string(&env.config).unwrap().replace(
        common::softhsm_module().to_str().unwrap(),
        "/nonexistent/libpkcs11.so",
    );
    let cfg = write(env.dir.path(), "nomodule.toml", &text);
    let out = env.run(&["init", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/libpkcs11.so"));

    // None of the failures above created a database row.
    assert!(
        !env.db.exists() || env.counts().values().all(|n| *n == 0),
        "{:?}",
        env.counts()
    );
}

#[test]
fn audit_verify_names_the_first_altered_event() {
    let env = Env::new();
    env.init();
    let out = env.run(&["audit", "verify", "--config", env.config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("intact"));

    // Accidental edits are refused by the database itself...
    let c = rusqlite::Connection::open(&env.db).unwrap();
    assert!(
        c.execute("UPDATE audit_events SET actor = 'x' WHERE seq = 3", [])
            .is_err()
    );
    assert!(
        c.execute("DELETE FROM audit_events WHERE seq = 3", [])
            .is_err()
    );
    // ...and a deliberate one (triggers dropped) is caught by the chain.
    c.execute_batch("DROP TRIGGER audit_events_no_update; UPDATE audit_events SET actor = 'admin:mallory' WHERE seq = 3;")
        .unwrap();
    drop(c);
    let out = env.run(&[
        "audit",
        "verify",
        "--config",
        env.config.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["intact"], false);
    assert_eq!(v["first_broken_seq"], 3);
    assert_eq!(v["broken"]["kind"], "edited", "{v}");
}

#[tokio::test]
async fn health_readiness_metrics_and_public_chain() {
    let env = Env::new();
    env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();
    let (s, v) = call(reqwest::Method::GET, &format!("{url}/healthz"), None, None).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    let (s, v) = call(reqwest::Method::GET, &format!("{url}/readyz"), None, None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["hsm"], "ok");
    assert_eq!(v["store"], "ok");
    let (s, v) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/ca/nope/chain"),
        None,
        None,
    )
    .await;
    assert_error(s, &v, 404, "unknown_ca");
    let metrics = client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("keyward_http_requests_total"), "{metrics}");
    assert!(
        metrics.contains("route=\"/v1/ca/{name}/chain\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("keyward_hsm_up{keystore=\"default\"} 1"),
        "{metrics}"
    );
    // Prometheus' own linter accepts the exposition.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (package prometheus) missing: run scripts/test.sh");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), metrics.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    // init's commits happened in another process; this daemon's only
    // commits so far are its start-up work before it announced its address:
    // the delegated OCSP signer (key recorded `generating`, then completed
    // with its certificate: two commits), its first CRLs (root and
    // devices: one or two batches) and, as its jobs start, the
    // `scheduler.leader` event of its lease (one commit; the lease itself is
    // not a batch), and the data key that seals this run's audit details
    // (`audit.data_key_create`: one commit).
    let batches: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keyward_store_batch_size_count "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no batch count in {metrics}"));
    assert!((5..=6).contains(&batches), "{batches} batches: {metrics}");
}

#[tokio::test]
async fn every_operation_in_the_openapi_document_is_routed() {
    let env = Env::new();
    let token = env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();
    // Without a [backup] section the backup routes say so (the OpenAPI
    // walk in tests/openapi.rs runs with one).
    for (m, path) in [
        (reqwest::Method::GET, "/v1/admin/backups"),
        (reqwest::Method::POST, "/v1/admin/backups"),
        (reqwest::Method::POST, "/v1/admin/backups/latest/verify"),
    ] {
        let (s, v) = call(m, &format!("{url}{path}"), Some(&token), None).await;
        assert_eq!(s, 404, "{path}: {v}");
        assert_eq!(v["error"]["code"], "backup_not_configured", "{path}: {v}");
    }
    let (s, doc) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/openapi.json"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 14, "{}", paths.len());
    let mut checked = 0;
    for (path, ops) in paths {
        let concrete = path
            .replace("{id}", &uuid::Uuid::new_v4().to_string())
            .replace("{name}", "root");
        for method in ops.as_object().unwrap().keys() {
            let m: reqwest::Method = method.to_uppercase().parse().unwrap();
            let body = (m == reqwest::Method::POST).then(|| json!({}));
            let resp = {
                let mut rb = client().request(m.clone(), format!("{url}{concrete}"));
                if let Some(b) = &body {
                    rb = rb.json(b);
                }
                rb.send().await.unwrap()
            };
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            // An unrouted path is a 404 `route_not_found`, a wrong method a 405
            // (tests/openapi.rs checks both directions in detail).
            assert!(
                !(status == 404 && v["error"]["code"] == "route_not_found"),
                "{method} {path} is documented but not routed"
            );
            assert_ne!(
                status, 405,
                "{method} {path} is documented but the method is not routed"
            );
            checked += 1;
        }
    }
    assert!(checked >= 15);
}

#[tokio::test]
async fn admins_can_be_disabled_and_their_tokens_stop_working_at_once() {
    let env = Env::new();
    let bootstrap = env.init();
    let mut daemon = env.serve();
    let url = daemon.url.clone();
    let bob = add_admin(&url, &bootstrap, "bob", "approver").await;
    let (s, _) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/registrations"),
        Some(&bob),
        None,
    )
    .await;
    assert_eq!(s, 200);

    // Refusals change nothing: yourself, the last active admin, someone who does not exist.
    let before = env.counts();
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/admins/bootstrap/disable"),
        Some(&bootstrap),
        None,
    )
    .await;
    assert_error(s, &v, 403, "self_action");
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/admins/nobody/disable"),
        Some(&bootstrap),
        None,
    )
    .await;
    assert_error(s, &v, 404, "not_found");
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/admins/bootstrap/disable"),
        Some(&bob),
        None,
    )
    .await;
    assert_error(s, &v, 403, "forbidden_role");
    assert_eq!(env.counts(), before);

    // The operator's CLI disables bob; his token is refused from then on.
    let out = env
        .keyward()
        .env("KEYWARD_URL", &url)
        .env("KEYWARD_TOKEN", &bootstrap)
        .args(["admins", "disable", "bob"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (s, v) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/registrations"),
        Some(&bob),
        None,
    )
    .await;
    assert_error(s, &v, 401, "unauthorized");
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/admins/bob/disable"),
        Some(&bootstrap),
        None,
    )
    .await;
    assert_error(s, &v, 409, "already_disabled");
    // Failed logins are audited aggregated, at the latest on clean shutdown.
    daemon.stop();
    let actions: Vec<(String, String, String)> = env.audit_after(before["audit_events"]);
    assert!(
        actions.iter().any(|(_, a, _)| a == "admin.disable"),
        "{actions:?}"
    );
    assert!(
        actions
            .iter()
            .any(|(_, a, o)| a == "admin.login_failed" && o == "denied"),
        "{actions:?}"
    );
}
