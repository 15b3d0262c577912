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
