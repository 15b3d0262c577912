//! Attested enrollment against a real `keyward serve` (SoftHSM2 token,
//! SQLite): bootstrap tokens (minted with the CLI, counted, expiring,
//! revocable, group-bound, minter kept out of the quorum), reclaim codes,
//! `GET /v1/devices/me/config`, and policy reload over the API and SIGHUP.
//! Certificates are checked with the stock `openssl`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use std::path::Path;

const PLANT: &str = r#"
[[group]]
name = "plant"
profile = "device"
attestation = { method = "bootstrap-token" }
approval = "quorum"
approvals_required = 1
"#;

fn cli(env: &Env, url: &str, token: &str, args: &[&str]) -> Value {
    let out = env
        .keyward()
        .env("KEYWARD_URL", url)
        .env("KEYWARD_TOKEN", token)
        .args(args)
        .args(["--output", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keyward {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn register(url: &str, body: Value) -> (u16, Value) {
    call(
        Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(body),
    )
    .await
}

fn csr(dir: &Path) -> String {
    openssl_csr(dir, "ec").0
}

fn token_body(csr: &str, name: &str, token: &str) -> Value {
    json!({
        "csr": csr,
        "name": name,
        "attestation": { "method": "bootstrap-token", "token": token },
    })
}

/// Registrations, devices and certificates, which a refused request must not change.
fn enrollment_rows(env: &Env) -> (i64, i64, i64) {
    let c = env.counts();
    (c["registrations"], c["devices"], c["certificates"])
}

#[tokio::test(flavor = "multi_thread")]
async fn bootstrap_tokens_attest_count_expire_and_keep_the_minter_out() {
    let env = Env::with_extra_group(PLANT);
    let root = env.init();
    let d = env.serve();
    let url = d.url.clone();
    let alice = add_admin(&url, &root, "alice", "approver").await;
    let work = env.path("work");
    std::fs::create_dir_all(&work).unwrap();

    // Minted with the CLI: the secret is shown once; two uses for `field`.
    let minted = cli(
        &env,
        &url,
        &root,
        &[
            "tokens", "create", "--group", "field", "--uses", "2", "--ttl", "24h",
        ],
    );
    let secret = minted["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("kwb_"), "{minted}");
    assert_eq!(minted["uses_allowed"], 2);

    // The reference client enrolls with it (token from a file, never argv):
    // the group is auto-approved, so the certificate comes at once.
    let token_file = write(&work, "token", &secret);
    let out_dir = env.path("pump-1");
    let out = env
        .keyward()
        .env("KEYWARD_URL", &url)
        .args([
            "enroll",
            "--name",
            "pump-1",
            "--out",
            out_dir.to_str().unwrap(),
            "--token-file",
            token_file.to_str().unwrap(),
            "--timeout",
            "30",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "enroll: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, why) = openssl_verify(
        &out_dir.join("chain.pem"),
        &out_dir.join("chain.pem"),
        &out_dir.join("cert.pem"),
    );
    assert!(ok, "{why}");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("device-config.json")).unwrap())
            .unwrap();
    let reg_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (_, reg) = call(
        Method::GET,
        &format!("{url}/v1/admin/registrations/{reg_id}"),
        Some(&root),
        None,
    )
    .await;
    assert_eq!(reg["attestation"], "bootstrap-token", "{reg}");
    assert_eq!(reg["group"], "field");
    let device_id = reg["device_id"].as_str().unwrap();
    // `{device_id}` is substituted in the rendered configuration.
    assert_eq!(
        config["status_topic"],
        format!("dt/v1/{device_id}/status"),
        "{config}"
    );

    // Second use: issued. Third: refused, nothing stored.
    let (status, v) = register(&url, token_body(&csr(&work), "pump-2", &secret)).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["status"], "issued");
    let before = enrollment_rows(&env);
    let (status, v) = register(&url, token_body(&csr(&work), "pump-3", &secret)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("enrollment_token_invalid")),
        "{v}"
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("used up"),
        "{v}"
    );
    assert_eq!(enrollment_rows(&env), before);

    // A field device without a token, a token naming another group, a
    // made-up token: refused, nothing stored.
    let fresh = cli(&env, &url, &root, &["tokens", "create", "--group", "field"]);
    let fresh_secret = fresh["secret"].as_str().unwrap();
    for (body, status, code) in [
        (
            json!({ "csr": csr(&work), "name": "x", "group": "field" }),
            401,
            "attestation_required",
        ),
        (
            json!({
                "csr": csr(&work), "name": "x", "group": "default",
                "attestation": { "method": "bootstrap-token", "token": fresh_secret },
            }),
            400,
            "group_mismatch",
        ),
        (
            token_body(&csr(&work), "x", "kwb_notarealtoken"),
            401,
            "enrollment_token_invalid",
        ),
        (
            json!({ "name": "x", "attestation": { "method": "bootstrap-token", "token": fresh_secret } }),
            400,
            "csr_required",
        ),
    ] {
        let (got, v) = register(&url, body).await;
        assert_eq!(
            (got, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{v}"
        );
    }
    assert_eq!(enrollment_rows(&env), before);
    // The refused attempts did not spend the fresh token.
    let (status, v) = register(&url, token_body(&csr(&work), "pump-4", fresh_secret)).await;
    assert_eq!(status, 201, "{v}");

    // Revoked with the CLI: refused afterwards.
    let revoked = cli(&env, &url, &root, &["tokens", "create", "--group", "field"]);
    cli(
        &env,
        &url,
        &root,
        &["tokens", "revoke", revoked["id"].as_str().unwrap()],
    );
    let before = enrollment_rows(&env);
    let (status, v) = register(
        &url,
        token_body(&csr(&work), "x", revoked["secret"].as_str().unwrap()),
    )
    .await;
    assert_eq!(status, 401, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("revoked"),
        "{v}"
    );

    // Expired.
    let short = cli(
        &env,
        &url,
        &root,
        &["tokens", "create", "--group", "field", "--ttl", "1s"],
    );
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (status, v) = register(
        &url,
        token_body(&csr(&work), "x", short["secret"].as_str().unwrap()),
    )
    .await;
    assert_eq!(status, 401, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("expired"),
        "{v}"
    );

    // A token minted for one device name registers only that name.
    let named = cli(
        &env,
        &url,
        &root,
        &[
            "tokens",
            "create",
            "--group",
            "field",
            "--device-name",
            "gw-7",
        ],
    );
    let (status, v) = register(
        &url,
        token_body(&csr(&work), "gw-8", named["secret"].as_str().unwrap()),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("device_name_mismatch")),
        "{v}"
    );
    assert_eq!(enrollment_rows(&env), before);

    // Tokens only for groups that take them; bad requests name the problem.
    for body in [
        json!({ "group": "default" }),
        json!({ "group": "field", "uses": 0 }),
        json!({ "group": "field", "ttl_seconds": 8 * 86400 }),
        json!({ "group": "field", "device_id": device_id }),
        json!({ "kind": "reclaim" }),
    ] {
        let (status, v) = call(
            Method::POST,
            &format!("{url}/v1/admin/tokens"),
            Some(&root),
            Some(body),
        )
        .await;
        assert_eq!(status, 400, "{v}");
    }
    // An approver may not mint (a token is the power to enroll).
    let (status, _) = call(
        Method::POST,
        &format!("{url}/v1/admin/tokens"),
        Some(&alice),
        Some(json!({ "group": "field" })),
    )
    .await;
    assert_eq!(status, 403);

    // Separation of duties: the admin who minted a token cannot approve a
    // registration that used it; another admin can.
    let plant = cli(&env, &url, &root, &["tokens", "create", "--group", "plant"]);
    let (status, sub) = register(
        &url,
        token_body(&csr(&work), "press-1", plant["secret"].as_str().unwrap()),
    )
    .await;
    assert_eq!(
        (status, sub["status"].as_str()),
        (201, Some("pending")),
        "{sub}"
    );
    let rid = sub["id"].as_str().unwrap();
    let (status, v) = call(
        Method::POST,
        &format!("{url}/v1/admin/registrations/{rid}/approve"),
        Some(&root),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("token_minter_cannot_approve")),
        "{v}"
    );
    let (status, v) = call(
        Method::POST,
        &format!("{url}/v1/admin/registrations/{rid}/approve"),
        Some(&alice),
        Some(json!({})),
    )
    .await;
    assert_eq!((status, v["status"].as_str()), (200, Some("issued")), "{v}");

    // The listing shows the counts.
    let list = cli(
        &env,
        &url,
        &alice,
        &["tokens", "list", "--kind", "bootstrap"],
    );
    let first = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == minted["id"])
        .unwrap()
        .clone();
    assert_eq!(
        (first["uses"].as_u64(), first["uses_allowed"].as_u64()),
        (Some(2), Some(2))
    );

    // Every mint and revocation is audited; no event holds a secret.
    let events = env.audit_details_after(0);
    assert!(events.iter().any(|(a, ..)| a == "enrollment_token.create"));
    assert!(events.iter().any(|(a, ..)| a == "enrollment_token.revoke"));
    let all = serde_json::to_string(&events.iter().map(|e| &e.3).collect::<Vec<_>>()).unwrap();
    assert!(
        !all.contains(&secret) && !all.contains("kwb_"),
        "a token leaked into the audit trail"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reclaim_codes_rebind_a_device_and_config_follows_approval() {
    let env = Env::new();
    let root = env.init();
    let d = env.serve();
    let url = d.url.clone();
    let work = env.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let token = cli(
        &env,
        &url,
        &root,
        &["tokens", "create", "--group", "field", "--uses", "5"],
    );
    let secret = token["secret"].as_str().unwrap();

    // An issued field device reads its configuration with its registration secret.
    let (status, a) = register(&url, token_body(&csr(&work), "gw-a", secret)).await;
    assert_eq!(status, 201, "{a}");
    let (a_id, a_secret, a_device) = (
        a["id"].as_str().unwrap(),
        a["secret"].as_str().unwrap(),
        a["device_id"].as_str().unwrap().to_string(),
    );
    let (status, cfg) = call(
        Method::GET,
        &format!("{url}/v1/devices/me/config?registration={a_id}"),
        Some(a_secret),
        None,
    )
    .await;
    assert_eq!(status, 200, "{cfg}");
    assert_eq!(cfg["device_id"], a_device.as_str());
    assert_eq!(
        cfg["device_config"]["command_topic"],
        format!("cmd/v1/{a_device}/req")
    );
    assert_eq!(
        cfg["broker_acl"],
        json!([
            { "topic": format!("dt/v1/{a_device}/#"), "access": "publish" },
            { "topic": format!("cmd/v1/{a_device}/req"), "access": "subscribe" },
        ])
    );
    let chain = write(&work, "chain.pem", cfg["chain_pem"].as_str().unwrap());
    let cert = write(&work, "a.pem", cfg["certificate_pem"].as_str().unwrap());
    assert!(openssl_verify(&chain, &chain, &cert).0);
    let old_serial = cfg["certificate_serial"].as_str().unwrap().to_string();

    // A default-group registration waits for approvers: 202 + Retry-After.
    let (status, p) = register(&url, json!({ "csr": csr(&work), "name": "slow" })).await;
    assert_eq!(status, 201, "{p}");
    let resp = client()
        .get(format!(
            "{url}/v1/devices/me/config?registration={}",
            p["id"].as_str().unwrap()
        ))
        .bearer_auth(p["secret"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    assert_eq!(resp.headers()["retry-after"], "30");
    // Without credentials, or with the wrong secret: 401.
    let (status, _) = call(
        Method::GET,
        &format!("{url}/v1/devices/me/config"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = call(
        Method::GET,
        &format!("{url}/v1/devices/me/config?registration={a_id}"),
        Some("kwr_wrong"),
        None,
    )
    .await;
    assert_eq!(status, 401);

    // A second device, for the wrong-device case.
    let (_, b) = register(&url, token_body(&csr(&work), "gw-b", secret)).await;
    let b_device = b["device_id"].as_str().unwrap().to_string();

    // The operator issues a reclaim code for device A out of band.
    let code = cli(
        &env,
        &url,
        &root,
        &["tokens", "create", "--reclaim", &a_device, "--ttl", "1h"],
    );
    let code_secret = code["secret"].as_str().unwrap();
    assert!(code_secret.starts_with("kwc_"), "{code}");
    let reclaim = |device: &str| {
        json!({
            "csr": csr(&work),
            "name": "gw-a (replaced)",
            "attestation": { "method": "reclaim", "device_id": device, "code": code_secret },
        })
    };
    // Presented for device B: refused, nothing stored.
    let before = enrollment_rows(&env);
    let (status, v) = register(&url, reclaim(&b_device)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("reclaim_code_wrong_device")),
        "{v}"
    );
    assert_eq!(enrollment_rows(&env), before);

    // For device A: the same identity, a new key, the old certificate revoked as superseded.
    let (status, r) = register(&url, reclaim(&a_device)).await;
    assert_eq!((status, r["status"].as_str()), (201, Some("issued")), "{r}");
    assert_eq!(r["device_id"], a_device.as_str());
    assert_ne!(r["certificate_serial"], old_serial.as_str());
    let (_, old) = call(
        Method::GET,
        &format!("{url}/v1/admin/certs/{old_serial}"),
        Some(&root),
        None,
    )
    .await;
    assert_eq!(
        (old["status"].as_str(), old["revocation_reason"].as_str()),
        (Some("revoked"), Some("superseded")),
        "{old}"
    );
    // The new certificate is now the device's current one.
    let (_, cfg) = call(
        Method::GET,
        &format!(
            "{url}/v1/devices/me/config?registration={}",
            r["id"].as_str().unwrap()
        ),
        Some(r["secret"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(cfg["certificate_serial"], r["certificate_serial"]);
    // Used once: a second reclaim is refused.
    let before = enrollment_rows(&env);
    let (status, v) = register(&url, reclaim(&a_device)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("enrollment_token_invalid")),
        "{v}"
    );
    assert_eq!(enrollment_rows(&env), before);

    let events = env.audit_details_after(0);
    let reclaimed = events
        .iter()
        .find(|(a, ..)| a == "device.reclaim")
        .expect("device.reclaim audited");
    assert_eq!(reclaimed.3["superseded"], json!([old_serial]));
    assert!(events.iter().any(|(a, ..)| a == "reclaim_code.create"));
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_reload_validates_first_and_is_audited() {
    let env = Env::new();
    let root = env.init();
    let d = env.serve();
    let url = d.url.clone();
    let work = env.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let en_path = env.path("policies/enrollment.toml");
    let original = std::fs::read_to_string(&en_path).unwrap();
    let reload_url = format!("{url}/v1/admin/policies/reload");
    let reload = || call(Method::POST, &reload_url, Some(&root), None);
    let lab = |name: &str| {
        format!(
            "{original}\n[[group]]\nname = \"{name}\"\nprofile = \"device\"\napproval = \"quorum\"\napprovals_required = 1\n\
             [group.device_config]\ntopic = \"lab/{{device_id}}\"\n"
        )
    };
    let submit_to = |group: &str| {
        let body = json!({ "csr": csr(&work), "name": "probe", "group": group });
        let url = url.clone();
        async move { register(&url, body).await }
    };

    // Invalid: a template with an unknown placeholder. Refused, nothing
    // changes, and the attempt is audited.
    std::fs::write(&en_path, lab("lab").replace("{device_id}", "{imei}")).unwrap();
    let (status, v) = reload().await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("policy_invalid")),
        "{v}"
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("{imei}"),
        "{v}"
    );
    let (status, v) = submit_to("lab").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("unknown_group")),
        "{v}"
    );

    // A CA change needs a restart: refused too.
    let ca_path = env.path("policies/ca.toml");
    let ca = std::fs::read_to_string(&ca_path).unwrap();
    std::fs::write(
        &ca_path,
        ca.replacen("validity_days = 365", "validity_days = 300", 1),
    )
    .unwrap();
    std::fs::write(&en_path, lab("lab")).unwrap();
    // (a profile change is fine; a [[ca]] change is not)
    let (status, v) = reload().await;
    assert_eq!(status, 200, "profile changes reload: {v}");
    std::fs::write(
        &ca_path,
        ca.replacen("validity_days = 7300", "validity_days = 7000", 1),
    )
    .unwrap();
    let (status, v) = reload().await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("policy_invalid")),
        "{v}"
    );
    std::fs::write(&ca_path, &ca).unwrap();

    // Valid: swapped in, with both hashes in the answer and the audit trail.
    let (status, v) = reload().await;
    assert_eq!(status, 200, "{v}");
    let (status, sub) = submit_to("lab").await;
    assert_eq!(status, 201, "{sub}");
    let events = env.audit_details_after(0);
    let reloads: Vec<_> = events
        .iter()
        .filter(|(a, ..)| a == "policy.reload")
        .collect();
    assert_eq!(
        reloads.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(),
        ["failure", "success", "failure", "success"]
    );
    let first_ok = &reloads[1].3;
    assert_ne!(first_ok["old"]["enrollment"], first_ok["new"]["enrollment"]);
    assert_eq!(first_ok["changed"], true);

    // SIGHUP reloads too (signal sent to this test's own daemon, by PID).
    std::fs::write(
        &en_path,
        lab("lab").replace("name = \"lab\"", "name = \"lab2\""),
    )
    .unwrap();
    let pid = d.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut accepted = false;
    for _ in 0..50 {
        let (status, _) = submit_to("lab2").await;
        if status == 201 {
            accepted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(accepted, "SIGHUP did not reload the policies");
    let events = env.audit_details_after(0);
    assert!(events.iter().any(|(a, _, _, d)| {
        a == "policy.reload"
            && d["changed"] == true
            && d["groups"]
                .as_array()
                .is_some_and(|g| g.iter().any(|n| n == "lab2"))
    }));
}

/// `policies/rotation.toml`: `config check` validates it, a reload swaps a
/// valid change in (no restart) with its hash audited, an invalid one is
/// refused and changes nothing, and removing the file falls back to the
/// defaults (hash `null`).
#[tokio::test(flavor = "multi_thread")]
async fn rotation_policy_is_checked_reloaded_and_audited() {
    let env = Env::new();
    let ro_path = env.path("policies/rotation.toml");
    let shipped = std::fs::read_to_string(&ro_path).unwrap();
    assert_eq!(shipped, repo_file("policies/rotation.toml"));
    let check = || env.run(&["config", "check", "--config", env.config.to_str().unwrap()]);
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let out = check();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("rotation policy from rotation.toml"),
        "{}",
        text(&out)
    );

    // Bad files: config check names the file and the key.
    for (bad, key) in [
        (
            shipped.replacen("rotate_before_days = 14", "rotate_before_days = 90", 1),
            "keys.tls-server.rotate_before_days",
        ),
        (
            shipped.replacen("schedule = \"0 3 * * *\"", "schedule = \"0 3 * *\"", 1),
            "schedule",
        ),
        (
            format!("{shipped}\n[keys.root-ca]\nmax_age_days = 3650\nrotate_before_days = 30\n"),
            "keys.root-ca",
        ),
        (
            shipped.replacen("max_age_days = 1095", "max_age_days = 1500", 1),
            "keys.issuing-ca.max_age_days",
        ),
    ] {
        std::fs::write(&ro_path, &bad).unwrap();
        let out = check();
        assert!(!out.status.success(), "accepted: {bad}");
        let t = text(&out);
        assert!(t.contains("rotation.toml") && t.contains(key), "{key}: {t}");
    }
    std::fs::write(&ro_path, &shipped).unwrap();

    let root = env.init();
    let d = env.serve();
    let reload_url = format!("{}/v1/admin/policies/reload", d.url);
    let reload = || call(Method::POST, &reload_url, Some(&root), None);
    let sha = |t: &str| hex::encode(ring::digest::digest(&ring::digest::SHA256, t.as_bytes()));

    let (status, v) = reload().await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["new"]["rotation"], json!(sha(&shipped)), "{v}");
    assert_eq!(v["changed"], false, "{v}");

    // A valid change: swapped in without a restart.
    let changed = shipped.replacen("max_age_days = 90", "max_age_days = 60", 1);
    std::fs::write(&ro_path, &changed).unwrap();
    let (status, v) = reload().await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (
            v["old"]["rotation"].clone(),
            v["new"]["rotation"].clone(),
            v["changed"].clone()
        ),
        (json!(sha(&shipped)), json!(sha(&changed)), json!(true)),
        "{v}"
    );

    // Invalid: refused, the policy in force stays (a reload of the same
    // valid file afterwards reports no change).
    std::fs::write(
        &ro_path,
        changed.replacen("rotate_before_days = 7", "rotate_before_days = 30", 1),
    )
    .unwrap();
    let (status, v) = reload().await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("policy_invalid")),
        "{v}"
    );
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("rotation.toml")
            && message.contains("keys.ocsp-signing.rotate_before_days"),
        "{v}"
    );
    std::fs::write(&ro_path, &changed).unwrap();
    let (status, v) = reload().await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["changed"], false, "{v}");

    // Removed: the defaults, and a null hash.
    std::fs::remove_file(&ro_path).unwrap();
    let (status, v) = reload().await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["new"]["rotation"], Value::Null, "{v}");
    assert_eq!(v["changed"], true, "{v}");

    let reloads: Vec<_> = env
        .audit_details_after(0)
        .into_iter()
        .filter(|(a, ..)| a == "policy.reload")
        .collect();
    assert_eq!(
        reloads.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(),
        ["success", "success", "failure", "success", "success"]
    );
    assert_eq!(reloads[1].3["new"]["rotation"], json!(sha(&changed)));
    assert_eq!(reloads[2].3["old"]["rotation"], json!(sha(&changed)));
    assert_eq!(reloads[4].3["new"]["rotation"], Value::Null);
}

#[path = "common/plaintext_scan.rs"]
mod plaintext_scan;

const SERVER_KEY_GROUPS: &str = r#"
[[group]]
name = "sealed"
profile = "device"
attestation = { method = "bootstrap-token" }
approval = "auto"
key_source = "server"

[[group]]
name = "vault"
profile = "device"
attestation = { method = "bootstrap-token" }
approval = "auto"
key_source = "server"
escrow = true
"#;

fn sh(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The public key (PEM) of a private key file and of a certificate, by openssl.
fn same_public_key(key: &Path, cert: &Path) {
    let a = sh(
        "openssl",
        &["pkey", "-in", key.to_str().unwrap(), "-pubout"],
    )
    .stdout;
    let b = sh(
        "openssl",
        &["x509", "-in", cert.to_str().unwrap(), "-noout", "-pubkey"],
    )
    .stdout;
    assert_eq!(a, b, "the delivered key does not match the certificate");
}

fn key_rows(env: &Env) -> Vec<(String, String)> {
    let c = rusqlite::Connection::open(&env.db).unwrap();
    let mut stmt = c
        .prepare("SELECT id, state FROM keys WHERE purpose = 'device' ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn server_generated_keys_are_delivered_once_encrypted_and_never_stored() {
    let env = Env::with_extra_group(SERVER_KEY_GROUPS);
    let root = env.init();
    let tmp = env.path("daemon-tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let d = env.serve_with_env(&[("TMPDIR", tmp.as_os_str())]);
    let url = d.url.clone();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let token = cli(
        &env,
        &url,
        &root,
        &["tokens", "create", "--group", "sealed", "--uses", "5"],
    );
    let secret = token["secret"].as_str().unwrap().to_string();

    // 1. An age bundle, through the reference client, decrypted by the stock age CLI.
    sh("age-keygen", &["-o", w.join("id.txt").to_str().unwrap()]);
    let identity = std::fs::read_to_string(w.join("id.txt")).unwrap();
    let recipient = identity
        .lines()
        .find_map(|l| l.strip_prefix("# public key: "))
        .unwrap()
        .to_string();
    let token_file = write(w, "token", &secret);
    let out_dir = w.join("dev-age");
    let out = env
        .keyward()
        .env("KEYWARD_URL", &url)
        .args([
            "enroll",
            "--name",
            "meter-1",
            "--out",
            out_dir.to_str().unwrap(),
            "--token-file",
            token_file.to_str().unwrap(),
            "--server-key",
            "--age-recipient",
            &recipient,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "enroll: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out_dir.join("key.pem").exists(),
        "no local key with --server-key"
    );
    let plain = sh(
        "age",
        &[
            "-d",
            "-i",
            w.join("id.txt").to_str().unwrap(),
            out_dir.join("key.age").to_str().unwrap(),
        ],
    )
    .stdout;
    let bundle = String::from_utf8(plain).unwrap();
    let key_pem = &bundle[..bundle.find("-----END PRIVATE KEY-----").unwrap() + 25];
    let key_file = write(w, "age-key.pem", key_pem);
    same_public_key(&key_file, &out_dir.join("cert.pem"));
    let (ok, why) = openssl_verify(
        &out_dir.join("chain.pem"),
        &out_dir.join("chain.pem"),
        &out_dir.join("cert.pem"),
    );
    assert!(ok, "{why}");
    let age_pkcs8 = der::pem::decode_vec(key_pem.as_bytes()).unwrap().1;

    // 2. A PKCS#12 under a one-time password, read by openssl pkcs12.
    let (status, sub) = register(
        &url,
        json!({ "name": "meter-2", "attestation": { "method": "bootstrap-token", "token": secret } }),
    )
    .await;
    assert_eq!(
        (status, sub["status"].as_str()),
        (201, Some("issued")),
        "{sub}"
    );
    let creds_url = format!(
        "{url}/v1/registrations/{}/credentials",
        sub["id"].as_str().unwrap()
    );
    let reg_secret = sub["secret"].as_str().unwrap();
    let (status, creds) = call(Method::GET, &creds_url, Some(reg_secret), None).await;
    assert_eq!(status, 200, "{creds}");
    assert_eq!(creds["key_bundle"]["format"], "pkcs12", "{creds}");
    let p12 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(creds["key_bundle"]["data"].as_str().unwrap())
            .unwrap()
    };
    std::fs::write(w.join("dev.p12"), p12).unwrap();
    let pw = write(w, "pw", creds["key_bundle"]["password"].as_str().unwrap());
    let pem = sh(
        "openssl",
        &[
            "pkcs12",
            "-in",
            w.join("dev.p12").to_str().unwrap(),
            "-passin",
            &format!("file:{}", pw.display()),
            "-nodes",
            "-nocerts",
        ],
    )
    .stdout;
    let p12_key = write(w, "p12-key.pem", &String::from_utf8(pem).unwrap());
    let cert = write(
        w,
        "p12-cert.pem",
        creds["certificate_pem"].as_str().unwrap(),
    );
    same_public_key(&p12_key, &cert);
    // The wrong password does not open it.
    let wrong = write(w, "wrong", "not-the-password");
    let bad = std::process::Command::new("openssl")
        .args([
            "pkcs12",
            "-in",
            w.join("dev.p12").to_str().unwrap(),
            "-passin",
            &format!("file:{}", wrong.display()),
            "-nodes",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());

    // 3. Once: a re-fetch gets the certificate but never the key again.
    let (status, again) = call(Method::GET, &creds_url, Some(reg_secret), None).await;
    assert_eq!(status, 200, "{again}");
    assert!(again["key_bundle"].is_null(), "{again}");
    assert_eq!(again["key_delivered"], true);

    // 4. The HSM copies are destroyed after delivery (audited); an escrow
    //    group keeps its copy.
    let rows = key_rows(&env);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|(_, s)| s == "destroyed"), "{rows:?}");
    let vault = cli(&env, &url, &root, &["tokens", "create", "--group", "vault"]);
    let (_, v) = register(
        &url,
        json!({
            "name": "meter-3", "age_recipient": recipient,
            "attestation": { "method": "bootstrap-token", "token": vault["secret"] },
        }),
    )
    .await;
    let (status, creds) = call(
        Method::GET,
        &format!(
            "{url}/v1/registrations/{}/credentials",
            v["id"].as_str().unwrap()
        ),
        Some(v["secret"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(
        (status, creds["key_bundle"]["format"].as_str()),
        (200, Some("age")),
        "{creds}"
    );
    let rows = key_rows(&env);
    assert_eq!(
        rows.iter().filter(|(_, s)| s == "active").count(),
        1,
        "{rows:?}"
    );
    let events = env.audit_details_after(0);
    let count = |action: &str| events.iter().filter(|(a, ..)| a == action).count();
    assert_eq!(count("device_key.deliver"), 3);
    assert_eq!(count("key.destroy"), 2);

    // 5. Bad input: a malformed recipient, a CSR to a server-key group.
    let before = enrollment_rows(&env);
    for (body, code) in [
        (
            json!({ "name": "x", "age_recipient": "age1notarecipient",
                    "attestation": { "method": "bootstrap-token", "token": secret } }),
            "malformed_age_recipient",
        ),
        (
            json!({ "name": "x", "csr": csr(w),
                    "attestation": { "method": "bootstrap-token", "token": secret } }),
            "csr_not_expected",
        ),
    ] {
        let (status, v) = register(&url, body).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some(code)),
            "{v}"
        );
    }
    assert_eq!(enrollment_rows(&env), before);

    // 6. No plaintext private key in the daemon's state or temporary
    //    directories (database, WAL, token files, policies, TMPDIR).
    drop(d);
    let p12_pkcs8 =
        der::pem::decode_vec(std::fs::read_to_string(&p12_key).unwrap().trim().as_bytes())
            .unwrap()
            .1;
    for pkcs8 in [&age_pkcs8, &p12_pkcs8] {
        let found = plaintext_scan::files_holding(env.dir.path(), pkcs8);
        assert!(found.is_empty(), "plaintext key found in {found:?}");
    }
}
