//! Separation of duties and the races that used to break it, against a real
//! `keyward serve` on a loopback socket with a SoftHSM2 token: concurrent
//! approvals, approve racing deny, admins disabling each other, approvals of
//! disabled admins, invitations and role changes that need a second admin,
//! client addresses, credential re-fetch, and display-unsafe names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Env, add_admin, add_admin_approved, call, openssl_csr};
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::sync::Barrier;

const GROUPS: &str = "
[[group]]
name = \"pair\"
profile = \"device\"
approvals_required = 2

[[group]]
name = \"trio\"
profile = \"device\"
approvals_required = 3
";

async fn submit(url: &str, csr: &str, group: &str) -> Value {
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(json!({ "csr": csr, "name": "sensor", "group": group })),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    v
}

async fn decide(url: &str, token: &str, id: &str, verb: &str) -> (u16, Value) {
    call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/registrations/{id}/{verb}"),
        Some(token),
        None,
    )
    .await
}

fn sql_i64(env: &Env, sql: &str) -> i64 {
    let c = rusqlite::Connection::open(&env.db).unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn assert_error(status: u16, v: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{v}");
    assert_eq!(v["error"]["code"], want_code, "{v}");
}

/// Defect 1: approvals recorded at the same moment used to leave the
/// registration pending for ever. Every registration must end issued with
/// exactly one certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_approvals_reach_the_quorum_exactly_once() {
    let env = Env::with_extra_group(GROUPS);
    let bootstrap = env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();
    let mut approvers = Vec::new();
    for name in ["ann", "ben", "cat"] {
        approvers.push(add_admin(&url, &bootstrap, name, "approver").await);
    }
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let mut regs = Vec::new();
    for i in 0..24 {
        let group = if i % 3 == 0 { "trio" } else { "pair" };
        let v = submit(&url, &csr, group).await;
        regs.push((v["id"].as_str().unwrap().to_string(), group));
    }
    let mut tasks = Vec::new();
    for (id, group) in &regs {
        let n = if *group == "trio" { 3 } else { 2 };
        let barrier = Arc::new(Barrier::new(n));
        for token in approvers.iter().take(n) {
            let (url, id, token, barrier) =
                (url.clone(), id.clone(), token.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                decide(&url, &token, &id, "approve").await
            }));
        }
    }
    for t in tasks {
        let (s, v) = t.await.unwrap();
        assert_eq!(s, 200, "every approval is accepted: {v}");
    }
    for (id, _) in &regs {
        let (_, v) = call(
            reqwest::Method::GET,
            &format!("{url}/v1/admin/registrations/{id}"),
            Some(&bootstrap),
            None,
        )
        .await;
        assert_eq!(v["status"], "issued", "{v}");
    }
    assert_eq!(
        sql_i64(
            &env,
            "SELECT COUNT(*) FROM certificates WHERE device_id IS NOT NULL"
        ),
        regs.len() as i64
    );
    assert_eq!(
        sql_i64(
            &env,
            "SELECT COUNT(*) FROM (SELECT device_id FROM certificates WHERE device_id IS NOT NULL GROUP BY device_id HAVING COUNT(*) > 1)"
        ),
        0,
        "a device got two certificates"
    );
    assert_eq!(
        sql_i64(&env, "SELECT COUNT(*) FROM approvals"),
        8 * 3 + 16 * 2
    );
    let out = env.run(&["audit", "verify", "--config", env.config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// An approve racing a deny resolves to exactly one outcome, and no
/// decision is recorded on a registration that is no longer pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approve_racing_deny_resolves_to_one_outcome() {
    let env = Env::new();
    let bootstrap = env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();
    let ann = add_admin(&url, &bootstrap, "ann", "approver").await;
    let ben = add_admin(&url, &bootstrap, "ben", "approver").await;
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(
            submit(&url, &csr, "default").await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut tasks = Vec::new();
    for id in &ids {
        let barrier = Arc::new(Barrier::new(2));
        for (token, verb) in [(ann.clone(), "approve"), (ben.clone(), "deny")] {
            let (url, id, barrier) = (url.clone(), id.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                (id.clone(), verb, decide(&url, &token, &id, verb).await)
            }));
        }
    }
    let mut winners = std::collections::BTreeMap::new();
    for t in tasks {
        let (id, verb, (s, v)) = t.await.unwrap();
        if s == 200 {
            assert!(winners.insert(id, verb).is_none(), "two winners");
        } else {
            assert_error(s, &v, 409, "not_pending");
        }
    }
    assert_eq!(
        winners.len(),
        ids.len(),
        "every registration has one outcome"
    );
    for (id, verb) in &winners {
        let status: String = rusqlite::Connection::open(&env.db)
            .unwrap()
            .query_row(
                "SELECT status FROM registrations WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            status,
            if *verb == "approve" {
                "issued"
            } else {
                "denied"
            }
        );
    }
    let issued = winners.values().filter(|v| **v == "approve").count() as i64;
    assert_eq!(
        sql_i64(
            &env,
            "SELECT COUNT(*) FROM certificates WHERE device_id IS NOT NULL"
        ),
        issued
    );
    assert_eq!(
        sql_i64(&env, "SELECT COUNT(*) FROM approvals"),
        ids.len() as i64,
        "only the winning decision is recorded"
    );
}

/// Eight admins of role admin, every one disabling every other one at the
/// same moment (56 requests behind one barrier); returns a survivor's token.
/// Without the in-transaction guard this locked everyone out about every
/// other run, so the test runs it three times.
async fn disable_storm(env: &Env, url: &str, bootstrap: &str) -> String {
    let (url, bootstrap) = (url.to_string(), bootstrap.to_string());
    // Eight admins of role admin, then every one of them disables every
    // other one at the same moment (56 requests behind one barrier).
    let first = add_admin(&url, &bootstrap, "admin-0", "admin").await;
    let mut admins = vec![
        ("bootstrap".to_string(), bootstrap.clone()),
        ("admin-0".to_string(), first.clone()),
    ];
    for i in 1..7 {
        let name = format!("admin-{i}");
        let token = add_admin_approved(&url, &bootstrap, Some(&first), &name, "admin").await;
        admins.push((name, token));
    }
    let barrier = Arc::new(Barrier::new(admins.len() * (admins.len() - 1)));
    let mut tasks = Vec::new();
    for (me, token) in &admins {
        for (target, _) in admins.iter().filter(|(n, _)| n != me) {
            let (url, token, target, barrier) =
                (url.clone(), token.clone(), target.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let r = call(
                    reqwest::Method::POST,
                    &format!("{url}/v1/admin/admins/{target}/disable"),
                    Some(&token),
                    None,
                )
                .await;
                (token, r)
            }));
        }
    }
    let mut refused_last = 0;
    for t in tasks {
        let (_, (s, v)) = t.await.unwrap();
        match (s, v["error"]["code"].as_str()) {
            (200, _) | (401, Some("unauthorized")) | (409, Some("already_disabled")) => {}
            (409, Some("last_active_admin")) => refused_last += 1,
            _ => panic!("unexpected {s}: {v}"),
        }
    }
    let active = sql_i64(
        env,
        "SELECT COUNT(*) FROM admins WHERE role = 'admin' AND disabled = 0",
    );
    assert!(active >= 1, "everyone is locked out");
    let active_names: Vec<String> = {
        let c = rusqlite::Connection::open(&env.db).unwrap();
        let mut st = c
            .prepare("SELECT name FROM admins WHERE role = 'admin' AND disabled = 0")
            .unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let survivor: String = admins
        .iter()
        .find(|(n, _)| active_names.contains(n))
        .unwrap()
        .1
        .clone();
    let out = env.run(&["audit", "verify", "--config", env.config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!("{active} admin(s) left active, {refused_last} disable(s) refused as the last");
    // With one admin left, disabling it is refused and changes nothing.
    if active == 1 {
        let before = env.counts();
        let (s, v) = call(
            reqwest::Method::POST,
            &format!("{url}/v1/admin/admins/{}/disable", active_names[0]),
            Some(&survivor),
            None,
        )
        .await;
        assert_error(s, &v, 403, "self_action");
        assert_eq!(env.counts(), before);
    }
    survivor
}

/// Defect 3: two admins disabling each other at the same moment used to
/// leave no active admin; approvals of an admin disabled later counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admins_cannot_lock_everyone_out_and_disabled_approvals_stop_counting() {
    let mut last = None;
    for _ in 0..3 {
        let env = Env::with_extra_group(GROUPS);
        // The storm presents many disabled admins' tokens from one address:
        // failed logins, which past the per-source limit would get 429.
        env.append_config("[limits]\nadmin_login_failures_per_source = 10000\n");
        let bootstrap = env.init();
        let daemon = env.serve();
        let survivor = disable_storm(&env, &daemon.url, &bootstrap).await;
        last = Some((env, daemon, survivor));
    }
    let (env, daemon, survivor) = last.unwrap();
    let url = daemon.url.clone();

    // Approvals of an admin disabled later do not count toward the quorum.
    // Alone after the storm, the survivor needs a second admin for roster
    // changes: the local break-glass gives one.
    let out = env.run(&[
        "admins",
        "break-glass",
        "--config",
        env.config.to_str().unwrap(),
        "--name",
        "second",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    let ann = add_admin_approved(&url, &survivor, Some(&second), "ann", "approver").await;
    let ben = add_admin_approved(&url, &survivor, Some(&second), "ben", "approver").await;
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let id = submit(&url, &csr, "pair").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = decide(&url, &ann, &id, "approve").await;
    assert_eq!((s, v["approvals"].clone()), (200, json!(1)), "{v}");
    let (s, _) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/admins/ann/disable"),
        Some(&survivor),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, v) = decide(&url, &ben, &id, "approve").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["status"], "pending",
        "ann's approval no longer counts: {v}"
    );
    assert_eq!(v["approvals"], 1);
    let (_, detail) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/registrations/{id}"),
        Some(&survivor),
        None,
    )
    .await;
    let counted: Vec<bool> = detail["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["counted"].as_bool().unwrap())
        .collect();
    assert_eq!(counted.iter().filter(|c| !**c).count(), 1, "{detail}");
    let (s, v) = decide(&url, &survivor, &id, "approve").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "issued", "{v}");
    // A disabled admin cannot decide.
    let id2 = submit(&url, &csr, "pair").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = decide(&url, &ann, &id2, "approve").await;
    assert_error(s, &v, 401, "unauthorized");
}

/// Defect 4: one admin used to create approvers and receive their tokens,
/// meeting any quorum alone.
#[tokio::test]
async fn roster_changes_need_a_second_admin_and_only_the_invitee_redeems() {
    let env = Env::new();
    let bootstrap = env.init();
    let mut daemon = env.serve();
    let url = daemon.url.clone();
    let post = reqwest::Method::POST;

    // The first admin alone may invite (nobody else exists): no approval code.
    let (s, inv) = call(
        post.clone(),
        &format!("{url}/v1/admin/invitations"),
        Some(&bootstrap),
        Some(json!({"name": "carol", "role": "admin"})),
    )
    .await;
    assert_eq!(s, 201, "{inv}");
    assert_eq!(inv["second_admin_required"], false);
    assert!(
        inv.get("token").is_none(),
        "the inviter never sees a token: {inv}"
    );
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/invitations/redeem"),
        None,
        Some(json!({"invitation_code": format!("{}x", inv["invitation_code"].as_str().unwrap())})),
    )
    .await;
    assert_error(s, &v, 401, "invalid_invitation");
    let (s, carol) = call(
        post.clone(),
        &format!("{url}/v1/invitations/redeem"),
        None,
        Some(json!({"invitation_code": inv["invitation_code"]})),
    )
    .await;
    assert_eq!(s, 201, "{carol}");
    let carol = carol["token"].as_str().unwrap().to_string();
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/invitations/redeem"),
        None,
        Some(json!({"invitation_code": inv["invitation_code"]})),
    )
    .await;
    assert_error(s, &v, 401, "invalid_invitation");

    // Two active admins: an invitation waits for the other one.
    let before = env.counts();
    let (s, inv) = call(
        post.clone(),
        &format!("{url}/v1/admin/invitations"),
        Some(&bootstrap),
        Some(json!({"name": "dave", "role": "approver"})),
    )
    .await;
    assert_eq!(s, 201, "{inv}");
    assert_eq!(inv["second_admin_required"], true);
    assert_eq!(inv["status"], "pending");
    let req = inv["id"].as_str().unwrap();
    // Not redeemable yet, not approvable by the requester, not twice for one name.
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/invitations/redeem"),
        None,
        Some(json!({"invitation_code": inv["invitation_code"]})),
    )
    .await;
    assert_error(s, &v, 401, "invalid_invitation");
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/admin/requests/{req}/approve"),
        Some(&bootstrap),
        None,
    )
    .await;
    assert_error(s, &v, 403, "self_approval");
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/admin/invitations"),
        Some(&carol),
        Some(json!({"name": "dave", "role": "admin"})),
    )
    .await;
    assert_error(s, &v, 409, "duplicate_invitation");
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/admin/requests/{req}/approve"),
        Some(&carol),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let approval_code = v["approval_code"].as_str().unwrap().to_string();
    // The invitation code alone is not enough, nor the approval code alone.
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/invitations/redeem"),
        None,
        Some(json!({"invitation_code": inv["invitation_code"]})),
    )
    .await;
    assert_error(s, &v, 401, "invalid_invitation");
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/invitations/redeem"),
        None,
        Some(json!({"invitation_code": approval_code})),
    )
    .await;
    assert_error(s, &v, 401, "invalid_invitation");
    assert_eq!(
        env.counts()["admins"],
        before["admins"],
        "a refused redemption creates nobody"
    );

    // The invitee redeems through the CLI with both codes from the environment.
    let token_file = env.path("dave.token");
    let out = env
        .keyward()
        .env("KEYWARD_URL", &url)
        .env(
            "KEYWARD_INVITATION_CODE",
            inv["invitation_code"].as_str().unwrap(),
        )
        .env("KEYWARD_APPROVAL_CODE", &approval_code)
        .args(["admins", "redeem", "--token-out"])
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dave = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let (s, v) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/registrations"),
        Some(&dave),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");

    // Raising a role waits for a second admin; lowering one does not.
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/admin/admins/dave/role"),
        Some(&bootstrap),
        Some(json!({"role": "admin"})),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let role_req = v["request"]["id"].as_str().unwrap().to_string();
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/admin/requests/{role_req}/approve"),
        Some(&dave),
        None,
    )
    .await;
    assert_error(s, &v, 403, "forbidden_role");
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/admin/requests/{role_req}/approve"),
        Some(&carol),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let role: String = rusqlite::Connection::open(&env.db)
        .unwrap()
        .query_row("SELECT role FROM admins WHERE name = 'dave'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(role, "admin");
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/admin/admins/dave/role"),
        Some(&carol),
        Some(json!({"role": "auditor"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["admin"]["role"], "auditor");
    // Denied invitations cannot be redeemed.
    let (_, inv) = call(
        post.clone(),
        &format!("{url}/v1/admin/invitations"),
        Some(&carol),
        Some(json!({"name": "eve", "role": "admin"})),
    )
    .await;
    let req = inv["id"].as_str().unwrap();
    let (s, _) = call(
        post.clone(),
        &format!("{url}/v1/admin/requests/{req}/deny"),
        Some(&bootstrap),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/invitations/redeem"),
        None,
        Some(json!({"invitation_code": inv["invitation_code"]})),
    )
    .await;
    assert_error(s, &v, 401, "invalid_invitation");
    // An auditor cannot invite; a helper still works with a second admin.
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/admin/invitations"),
        Some(&dave),
        Some(json!({"name": "frank", "role": "admin"})),
    )
    .await;
    assert_error(s, &v, 403, "forbidden_role");
    add_admin_approved(&url, &bootstrap, Some(&carol), "gina", "approver").await;
    // The CLI lists the requests with their status.
    let out = env
        .keyward()
        .env("KEYWARD_URL", &url)
        .env("KEYWARD_TOKEN", &carol)
        .args(["admins", "requests", "--status", "denied"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("eve") && !text.contains("gina"),
        "{text}"
    );

    // Refused redemptions are failed logins: counted per source and
    // audited as one aggregated event, written at the latest on shutdown.
    assert!(daemon.stop().success());
    let refused: i64 = env
        .audit_details_after(0)
        .into_iter()
        .filter(|(action, _, _, _)| action == "admin.login_failed")
        .map(|(_, _, _, d)| d["reasons"]["invalid_invitation"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(refused, 6, "six refused redemptions were counted");
    let audit: Vec<String> = env.audit_after(0).into_iter().map(|(_, a, _)| a).collect();
    for needed in [
        "admin.invite",
        "admin.invite_approved",
        "admin.invite_denied",
        "admin.create",
        "admin.role_change_requested",
        "admin.set_role",
    ] {
        assert!(
            audit.iter().any(|a| a == needed),
            "missing {needed}: {audit:?}"
        );
    }
}

/// Defect 4 (second half): the client address is recorded on the
/// registration and its audit events and shown to approvers; a forwarded
/// address is believed only from a configured trusted proxy.
#[tokio::test]
async fn client_addresses_are_recorded_and_forwarded_for_needs_a_trusted_proxy() {
    let env = Env::new();
    let bootstrap = env.init();
    let forwarded = |daemon_url: &str, csr: &str| {
        let url = format!("{daemon_url}/v1/registrations");
        let body = json!({ "csr": csr, "name": "proxied" });
        async move {
            let resp = common::client()
                .post(url)
                .header("x-forwarded-for", "203.0.113.9, 198.51.100.7")
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 201);
            resp.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let addr_of = |id: &str| -> Option<String> {
        rusqlite::Connection::open(&env.db)
            .unwrap()
            .query_row(
                "SELECT client_addr FROM registrations WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap()
    };
    {
        let daemon = env.serve();
        let id = forwarded(&daemon.url, &csr).await;
        assert_eq!(
            addr_of(&id).as_deref(),
            Some("127.0.0.1"),
            "untrusted peer: the header is ignored"
        );
        let (_, v) = call(
            reqwest::Method::GET,
            &format!("{}/v1/admin/registrations/{id}", daemon.url),
            Some(&bootstrap),
            None,
        )
        .await;
        assert_eq!(v["client_addr"], "127.0.0.1", "{v}");
    }
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replacen(
            "[server]\n",
            "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
            1,
        ),
    )
    .unwrap();
    let daemon = env.serve();
    let id = forwarded(&daemon.url, &csr).await;
    assert_eq!(
        addr_of(&id).as_deref(),
        Some("198.51.100.7"),
        "nearest untrusted hop"
    );
    // In the audit event the address is sealed (detail encryption is on by
    // default): no clear `source`, a `sealed` value instead (tests/audit_seal.rs
    // opens it).
    let (source, sealed): (Option<String>, Option<String>) = rusqlite::Connection::open(&env.db)
        .unwrap()
        .query_row("SELECT source, sealed FROM audit_events WHERE action = 'registration.submit' ORDER BY seq DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap();
    assert_eq!(source, None);
    assert!(sealed.is_some_and(|s| s.starts_with("v1.") && !s.contains("198.51.100.7")));
    // The CLI shows it to approvers.
    let out = env
        .keyward()
        .env("KEYWARD_URL", &daemon.url)
        .env("KEYWARD_TOKEN", &bootstrap)
        .args(["registrations", "list", "--status", "pending"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("submitted from 198.51.100.7"), "{text}");
    // A bad proxy entry is refused at start with the key named.
    std::fs::write(
        &env.config,
        config.replacen(
            "[server]\n",
            "[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
            1,
        ),
    )
    .unwrap();
    let out = env.run(&["config", "check", "--config", env.config.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("trusted_proxies"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Defect 7: a lost credentials response used to lock the device out.
#[tokio::test]
async fn credentials_can_be_fetched_again_until_confirmed_or_the_window_closes() {
    let env = Env::new();
    let bootstrap = env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();
    let ann = add_admin(&url, &bootstrap, "ann", "approver").await;
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let fetch = |id: String, secret: String| {
        let url = url.clone();
        async move {
            call(
                reqwest::Method::GET,
                &format!("{url}/v1/registrations/{id}/credentials"),
                Some(&secret),
                None,
            )
            .await
        }
    };
    let confirm = |id: String, secret: String| {
        let url = url.clone();
        async move {
            call(
                reqwest::Method::POST,
                &format!("{url}/v1/registrations/{id}/credentials/confirm"),
                Some(&secret),
                None,
            )
            .await
        }
    };
    let mut regs = Vec::new();
    for _ in 0..2 {
        let v = submit(&url, &csr, "default").await;
        let (id, secret) = (
            v["id"].as_str().unwrap().to_string(),
            v["secret"].as_str().unwrap().to_string(),
        );
        // Not issued yet: nothing to fetch or confirm.
        let (s, e) = fetch(id.clone(), secret.clone()).await;
        assert_error(s, &e, 409, "not_issued");
        let (s, e) = confirm(id.clone(), secret.clone()).await;
        assert_error(s, &e, 409, "not_issued");
        let (s, _) = decide(&url, &ann, &id, "approve").await;
        assert_eq!(s, 200);
        regs.push((id, secret));
    }
    let (id, secret) = regs[0].clone();
    let (s, first) = fetch(id.clone(), secret.clone()).await;
    assert_eq!(s, 200, "{first}");
    // The response was "lost": the same credentials again.
    let (s, again) = fetch(id.clone(), secret.clone()).await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(first["certificate_pem"], again["certificate_pem"]);
    // A wrong secret gets nothing.
    let (s, e) = fetch(id.clone(), "kwr_wrong".into()).await;
    assert_error(s, &e, 401, "unauthorized");
    let (s, _) = confirm(id.clone(), secret.clone()).await;
    assert_eq!(s, 204);
    let (s, e) = fetch(id.clone(), secret.clone()).await;
    assert_error(s, &e, 410, "credentials_already_delivered");
    let (s, e) = confirm(id.clone(), secret.clone()).await;
    assert_error(s, &e, 409, "already_confirmed");

    // The re-fetch window closes on its own: move the first delivery back 16
    // minutes in the database (the window is 15).
    let (id, secret) = regs[1].clone();
    let (s, _) = fetch(id.clone(), secret.clone()).await;
    assert_eq!(s, 200);
    rusqlite::Connection::open(&env.db)
        .unwrap()
        .execute("UPDATE registrations SET credentials_fetched_at = credentials_fetched_at - 960 WHERE id = ?1", [&id])
        .unwrap();
    let (s, e) = fetch(id.clone(), secret.clone()).await;
    assert_error(s, &e, 410, "credentials_already_delivered");
    let delivered = env
        .audit_after(0)
        .into_iter()
        .filter(|(_, a, _)| a == "registration.credentials_delivered")
        .count();
    assert_eq!(delivered, 3, "every delivery is audited");
}

/// Names that display differently from what they are (bidi overrides,
/// zero-width characters) are refused and nothing is stored.
#[tokio::test]
async fn display_unsafe_names_and_comments_are_refused() {
    let env = Env::new();
    let bootstrap = env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let before = env.counts();
    for (field, value) in [
        ("name", "sensor\u{202E}7-lab"),
        ("name", "sen\u{200B}sor"),
        ("location", "hall\u{2066}B"),
        ("firmware", "1.0\u{FEFF}"),
        ("device_type", "thermo\u{200D}"),
    ] {
        let mut body = json!({ "csr": csr, "name": "ok" });
        body[field] = json!(value);
        let (s, v) = call(
            reqwest::Method::POST,
            &format!("{url}/v1/registrations"),
            None,
            Some(body),
        )
        .await;
        assert_error(s, &v, 400, "invalid_field");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{v}"
        );
    }
    assert_eq!(env.counts(), before);
    let id = submit(&url, &csr, "default").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let before = env.counts();
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/registrations/{id}/approve"),
        Some(&bootstrap),
        Some(json!({ "comment": "looks fine\u{202E}" })),
    )
    .await;
    assert_error(s, &v, 400, "invalid_field");
    assert_eq!(env.counts(), before);
}

async fn invite(url: &str, token: &str, name: &str, role: &str) -> Value {
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/invitations"),
        Some(token),
        Some(json!({ "name": name, "role": role })),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    v
}

async fn redeem(url: &str, inv: &Value, approval_code: Option<&str>) -> (u16, Value) {
    call(
        reqwest::Method::POST,
        &format!("{url}/v1/invitations/redeem"),
        None,
        Some(json!({ "invitation_code": inv["invitation_code"], "approval_code": approval_code })),
    )
    .await
}

/// Review findings: one admin must not end up holding a second admin
/// identity, neither by keeping an early invitation nor by disabling or
/// lowering the other admin; a demoted approver's approval stops counting;
/// a disabled admin's approval of an invitation dies with the account.
#[tokio::test]
async fn the_one_admin_shortcut_closes_for_good() {
    let env = Env::with_extra_group(
        "[[group]]\nname = \"admins-only\"\nprofile = \"device\"\napprovals_required = 2\napprover_role = \"admin\"\n",
    );
    let bootstrap = env.init();
    let mut daemon = env.serve();
    let url = daemon.url.clone();
    let post = reqwest::Method::POST;

    // Alone, A invites a real second admin and a puppet; both need no approval.
    let bob_inv = invite(&url, &bootstrap, "bob", "admin").await;
    let puppet_inv = invite(&url, &bootstrap, "puppet", "admin").await;
    assert_eq!(puppet_inv["second_admin_required"], false);
    let (s, bob) = redeem(&url, &bob_inv, None).await;
    assert_eq!(s, 201, "{bob}");
    let bob = bob["token"].as_str().unwrap().to_string();
    let (s, _) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/requests"),
        Some(&bob),
        None,
    )
    .await;
    assert_eq!(s, 200, "bob is an admin");
    // Bob exists: the puppet's one-admin invitation is dead.
    let before = env.counts();
    let (s, v) = redeem(&url, &puppet_inv, None).await;
    assert_error(s, &v, 401, "invalid_invitation");
    assert_eq!(env.counts()["admins"], before["admins"]);

    // A disables Bob: alone again, but the shortcut stays closed.
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/admin/admins/bob/disable"),
        Some(&bootstrap),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let again = invite(&url, &bootstrap, "puppet2", "admin").await;
    assert_eq!(again["second_admin_required"], true, "{again}");
    let (s, v) = redeem(&url, &again, None).await;
    assert_error(s, &v, 401, "invalid_invitation");

    // The local, audited break-glass restores a second admin; refused once two are active.
    let carol_file = env.path("carol.token");
    let out = env.run(&[
        "admins",
        "break-glass",
        "--config",
        env.config.to_str().unwrap(),
        "--name",
        "carol",
        "--token-out",
        carol_file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let carol = std::fs::read_to_string(&carol_file)
        .unwrap()
        .trim()
        .to_string();
    let out = env.run(&[
        "admins",
        "break-glass",
        "--config",
        env.config.to_str().unwrap(),
        "--name",
        "dave",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("two or more are active"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Carol approves an invitation, then is disabled: her approval dies with her.
    let erin_inv = invite(&url, &bootstrap, "erin", "approver").await;
    let req = erin_inv["id"].as_str().unwrap();
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/admin/requests/{req}/approve"),
        Some(&carol),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let code = v["approval_code"].as_str().unwrap().to_string();
    // Two admins are active (A, Carol): a third admin to disable Carol with.
    let frank = add_admin_approved(&url, &bootstrap, Some(&carol), "frank", "admin").await;
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/admin/admins/carol/disable"),
        Some(&frank),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = redeem(&url, &erin_inv, Some(&code)).await;
    assert_error(s, &v, 401, "invalid_invitation");
    let status: String = rusqlite::Connection::open(&env.db)
        .unwrap()
        .query_row(
            "SELECT status FROM admin_requests WHERE id = ?1",
            [req],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(status, "expired");

    // A demoted admin's approval of a registration stops counting.
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let id = submit(&url, &csr, "admins-only").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = decide(&url, &frank, &id, "approve").await;
    assert_eq!((s, v["approvals"].clone()), (200, json!(1)), "{v}");
    let (s, v) = call(
        post.clone(),
        &format!("{url}/v1/admin/admins/frank/role"),
        Some(&bootstrap),
        Some(json!({"role": "approver"})),
    )
    .await;
    assert_eq!(s, 200, "lowering applies at once: {v}");
    // Frank, an approver now, cannot approve roster requests either.
    let hank = invite(&url, &bootstrap, "hank", "auditor").await;
    let (s, v) = call(
        post.clone(),
        &format!(
            "{url}/v1/admin/requests/{}/approve",
            hank["id"].as_str().unwrap()
        ),
        Some(&frank),
        None,
    )
    .await;
    assert_error(s, &v, 403, "forbidden_role");
    let (_, detail) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/registrations/{id}"),
        Some(&bootstrap),
        None,
    )
    .await;
    assert_eq!(detail["approvals"][0]["counted"], false, "{detail}");
    let (s, v) = decide(&url, &bootstrap, &id, "approve").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["status"], "pending",
        "frank's approval no longer counts: {v}"
    );

    assert!(daemon.stop().success());
    let audit: Vec<String> = env.audit_after(0).into_iter().map(|(_, a, _)| a).collect();
    assert!(audit.iter().any(|a| a == "admin.break_glass"), "{audit:?}");
    let out = env.run(&["audit", "verify", "--config", env.config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
