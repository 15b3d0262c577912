//! Broker ACL provisioning against a real Mosquitto with the
//! dynamic-security plugin, started by the test on free loopback ports: a
//! device listener that requires keyward-issued client certificates (the CN,
//! i.e. the device id, is the username) and a TLS admin listener keyward
//! drives the plugin through (`[broker] type = "mosquitto"`, `mqtts://`).
//! Devices publish with the stock `mosquitto_pub` (MQTT v5: a refused publish
//! gets PUBACK reason 135); `mosquitto_sub` as the admin observes what the
//! broker delivered; `mosquitto_ctrl` reads the plugin's state.
//!
//! One broker and one daemon for every case: the provisioner's own semantics
//! (grant replaces exactly, idempotent grant and revoke), then the device
//! lifecycle through the daemon (suspend, resume, revoke), then a broker
//! outage (the revocation is committed and reported `pending`, the outbox
//! keeps it across the outage, the drainer applies it once the broker is back).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/mosquitto.rs"]
mod mosquitto;

use common::{Env, IssuedDevice, call, issue_device, metrics_text, one_approver_enrollment};
use keyward::broker::BrokerProvisioner;
use keyward::broker::mosquitto::MosquittoProvisioner;
use keyward::config::{BrokerBackendConfig, Config};
use keyward::model::{BrokerAccess, BrokerAclRule};
use mosquitto::DynsecBroker;
use reqwest::Method;
use serde_json::Value;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The shipped policies with the `default` group granted the seed-001 topics.
fn enrollment() -> String {
    let text = one_approver_enrollment();
    let acl = "[[group.broker_acl]]\ntopic = \"dt/v1/{device_id}/#\"\naccess = \"publish\"\n\n\
               [[group.broker_acl]]\ntopic = \"cmd/v1/{device_id}/req\"\naccess = \"subscribe\"\n\n\
               # Field installations";
    let out = text.replacen("# Field installations", acl, 1);
    assert_ne!(out, text, "the shipped enrollment policy changed shape");
    out
}

fn rule(topic: &str, access: BrokerAccess) -> BrokerAclRule {
    BrokerAclRule {
        topic: topic.to_string(),
        access,
    }
}

/// Publishes each `(topic, allowed)` as `device` while the admin observes
/// `dt/#`; asserts the broker's PUBACK verdict and what was delivered.
fn check_publishes(broker: &DynsecBroker, device: &IssuedDevice, cases: &[(&str, bool)]) {
    let observer = broker.observe("dt/#", 3);
    let mut expected = Vec::new();
    for (topic, allowed) in cases {
        let message = format!("m-{}", Uuid::new_v4().simple());
        let out = broker.publish(&device.cert, &device.key, topic, &message);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            stdout.contains("received CONNACK (0)"),
            "the device must connect: {stdout}{stderr}\n{}",
            broker.log_text()
        );
        assert_eq!(
            !stderr.contains("Not authorized"),
            *allowed,
            "publish to {topic}: {stdout}{stderr}"
        );
        expected.push((format!("{topic} {message}"), *allowed));
    }
    let seen = observer.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&seen.stdout).to_string();
    for (line, allowed) in expected {
        assert_eq!(
            seen.lines().any(|l| l == line),
            allowed,
            "delivery of `{line}`; the observer saw:\n{seen}"
        );
    }
}

/// `mosquitto_ctrl dynsec getClient`: the output names the client and its
/// roles, or says it is not found.
fn get_client(broker: &DynsecBroker, device_id: &str) -> String {
    let (ok, out) = broker.dynsec(&["getClient", device_id]);
    assert!(ok, "{out}");
    out
}

fn role_of(device_id: &str) -> String {
    format!("keyward-device-{device_id}")
}

/// The value of one exposition line `name{labels} value`.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// (op, attempts, last_error) of the device's outbox entry, straight from SQLite.
fn outbox_entry(env: &Env, device_id: &str) -> Option<(String, i64, Option<String>)> {
    let c = rusqlite::Connection::open(&env.db).unwrap();
    let mut stmt = c
        .prepare("SELECT op, attempts, last_error FROM broker_outbox WHERE device_id = ?1")
        .unwrap();
    let mut rows = stmt
        .query_map([device_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap();
    rows.next().map(Result::unwrap)
}

fn outbox_len(env: &Env) -> i64 {
    let c = rusqlite::Connection::open(&env.db).unwrap();
    c.query_row("SELECT COUNT(*) FROM broker_outbox", [], |r| r.get(0))
        .unwrap()
}

fn last_seq(env: &Env) -> i64 {
    let c = rusqlite::Connection::open(&env.db).unwrap();
    c.query_row("SELECT COALESCE(MAX(seq), 0) FROM audit_events", [], |r| {
        r.get(0)
    })
    .unwrap()
}

async fn lifecycle(url: &str, admin: &str, device: &IssuedDevice, action: &str) -> Value {
    let (status, v) = call(
        Method::POST,
        &format!("{url}/v1/admin/devices/{}/{action}", device.device_id),
        Some(admin),
        Some(serde_json::json!({ "comment": "broker test" })),
    )
    .await;
    assert_eq!(status, 200, "{action}: {v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_acls_follow_issuance_policy_and_the_device_lifecycle() {
    let env = Env::with_policies(&common::repo_file("policies/ca.toml"), &enrollment());
    let mut broker = DynsecBroker::new(&env.path("broker"));
    env.append_config(&format!(
        "[broker]\ntype = \"mosquitto\"\nurl = \"mqtts://127.0.0.1:{}\"\nca_file = \"{}\"\n\
         username = \"{}\"\npassword_file = \"{}\"\ntimeout_secs = 5\nflush_timeout_secs = 5\n\
         retry_min_secs = 1\nretry_max_secs = 2\n",
        broker.admin_port,
        broker.server_ca.display(),
        broker.admin_user,
        broker.admin_password_file.display(),
    ));
    let check = env.run(&["config", "check", "--config", env.config.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "config check: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let admin = env.init();
    let mut daemon = env.serve();
    let url = daemon.url.clone();
    let a = issue_device(&url, &admin, &env.path("dev-a"), "sensor-a").await;
    let b = issue_device(&url, &admin, &env.path("dev-b"), "sensor-b").await;
    broker.start(&a.chain);

    // --- The provisioner itself (the port the issuance path uses).
    let config = Config::load(&env.config).unwrap();
    let BrokerBackendConfig::Mosquitto(m) = &config.broker.backend else {
        panic!("{:?}", config.broker.backend)
    };
    let p = MosquittoProvisioner::from_config(m).unwrap();
    let a_id: Uuid = a.device_id.parse().unwrap();
    // Revoking what the broker never knew is fine (idempotent).
    p.revoke(Uuid::now_v7()).await.unwrap();
    // Issuance queued each device's group topics in its issuing commit; the
    // broker was down then, so the drainer applies them once it is up
    // (retried with backoff, never skipped).
    let mut granted = false;
    for _ in 0..100 {
        let has = |d: &str| {
            let (ok, out) = broker.dynsec(&["getClient", d]);
            ok && out.contains(&role_of(d))
        };
        if has(&a.device_id) && has(&b.device_id) {
            granted = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(granted, "the issuance grant never reached the broker");
    check_publishes(
        &broker,
        &b,
        &[
            (&format!("dt/v1/{}/status", b.device_id), true),
            (&format!("dt/v1/{}/status", a.device_id), false),
            (&format!("cmd/v1/{}/req", b.device_id), false),
        ],
    );
    // Without its grant a device connects (its certificate is valid) but may
    // publish nowhere.
    p.revoke(a_id).await.unwrap();
    check_publishes(
        &broker,
        &a,
        &[(&format!("dt/v1/{}/status", a.device_id), false)],
    );
    let group = [
        rule(&format!("dt/v1/{}/#", a.device_id), BrokerAccess::Publish),
        rule(
            &format!("cmd/v1/{}/req", a.device_id),
            BrokerAccess::Subscribe,
        ),
    ];
    p.grant(a_id, &group).await.unwrap();
    p.grant(a_id, &group).await.unwrap();
    let out = get_client(&broker, &a.device_id);
    assert!(out.contains(&role_of(&a.device_id)), "{out}");
    check_publishes(
        &broker,
        &a,
        &[
            (&format!("dt/v1/{}/status", a.device_id), true),
            (&format!("dt/v1/{}/status", b.device_id), false),
            (&format!("cmd/v1/{}/req", a.device_id), false),
        ],
    );
    // A grant replaces the device's topics exactly.
    p.grant(
        a_id,
        &[rule(
            &format!("dt/v1/{}/other/#", a.device_id),
            BrokerAccess::PublishSubscribe,
        )],
    )
    .await
    .unwrap();
    check_publishes(
        &broker,
        &a,
        &[
            (&format!("dt/v1/{}/status", a.device_id), false),
            (&format!("dt/v1/{}/other/x", a.device_id), true),
        ],
    );
    p.grant(a_id, &group).await.unwrap();

    // --- Through the daemon: suspension removes, resumption grants the
    // group's topics as the policy renders them, revocation removes for good.
    let seq = last_seq(&env);
    let v = lifecycle(&url, &admin, &b, "suspend").await;
    assert_eq!(
        (v["status"].as_str(), v["broker"].as_str()),
        (Some("suspended"), Some("done")),
        "{v}"
    );
    let v = lifecycle(&url, &admin, &b, "resume").await;
    assert_eq!(
        (v["status"].as_str(), v["broker"].as_str()),
        (Some("active"), Some("done")),
        "{v}"
    );
    let out = get_client(&broker, &b.device_id);
    assert!(out.contains(&role_of(&b.device_id)), "{out}");
    check_publishes(
        &broker,
        &b,
        &[
            (&format!("dt/v1/{}/status", b.device_id), true),
            (&format!("dt/v1/{}/status", a.device_id), false),
        ],
    );
    // Bad input changes nothing, on the broker or in the outbox.
    let (status, v) = call(
        Method::POST,
        &format!("{url}/v1/admin/devices/{}/revoke", b.device_id),
        Some(&admin),
        Some(serde_json::json!({ "reason": "bored" })),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_reason")),
        "{v}"
    );
    assert_eq!(outbox_len(&env), 0);
    assert!(get_client(&broker, &b.device_id).contains(&role_of(&b.device_id)));

    let v = lifecycle(&url, &admin, &b, "revoke").await;
    assert_eq!(
        (v["status"].as_str(), v["broker"].as_str()),
        (Some("revoked"), Some("done")),
        "{v}"
    );
    // Removed before the revocation was reported done.
    let out = get_client(&broker, &b.device_id);
    assert!(out.contains("Client not found"), "{out}");
    let (_, roles) = broker.dynsec(&["listRoles"]);
    assert!(!roles.contains(&role_of(&b.device_id)), "{roles}");
    assert!(roles.contains(&role_of(&a.device_id)), "{roles}");
    check_publishes(
        &broker,
        &b,
        &[(&format!("dt/v1/{}/status", b.device_id), false)],
    );
    assert_eq!(outbox_len(&env), 0);
    let audit: Vec<String> = env
        .audit_details_after(seq)
        .into_iter()
        .map(|(action, ..)| action)
        // CRL publications interleave on their own schedule.
        .filter(|a| a.starts_with("device.") || a.starts_with("broker."))
        .collect();
    assert_eq!(
        audit,
        [
            "device.suspend",
            "broker.revoke",
            "device.resume",
            "broker.grant",
            "device.revoke",
            "broker.revoke"
        ],
        "each status change and its broker update, in order"
    );

    // --- The broker is down: the suspension is committed, reported
    // pending, kept in the outbox, counted, and applied once it is back.
    broker.stop();
    let seq = last_seq(&env);
    let v = lifecycle(&url, &admin, &a, "suspend").await;
    assert_eq!(
        (v["status"].as_str(), v["broker"].as_str()),
        (Some("suspended"), Some("pending")),
        "{v}"
    );
    let (op, attempts, error) = outbox_entry(&env, &a.device_id).expect("queued");
    assert_eq!(op, "revoke");
    assert!(attempts >= 1, "{attempts}");
    assert!(error.is_some_and(|e| e.contains("broker")));
    let text = metrics_text(&url).await;
    assert_eq!(metric(&text, "keyward_broker_outbox_pending"), 1.0);
    assert!(
        metric(
            &text,
            "keyward_broker_updates_total{op=\"revoke\",result=\"error\"}"
        ) >= 1.0
    );
    let failed = env.audit_details_after(seq);
    let f = failed
        .iter()
        .find(|(action, ..)| action == "broker.update_failed")
        .unwrap_or_else(|| panic!("{failed:?}"));
    assert_eq!(
        (f.1.as_str(), f.3["op"].as_str()),
        ("failure", Some("revoke"))
    );
    // Still queued after a few drainer rounds with the broker down.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(outbox_entry(&env, &a.device_id).is_some());

    broker.start(&a.chain);
    let deadline = Instant::now() + Duration::from_secs(30);
    while outbox_len(&env) > 0 {
        assert!(
            Instant::now() < deadline,
            "the drainer did not apply the queued revoke: {:?}",
            outbox_entry(&env, &a.device_id)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = get_client(&broker, &a.device_id);
    assert!(out.contains("Client not found"), "{out}");
    check_publishes(
        &broker,
        &a,
        &[(&format!("dt/v1/{}/status", a.device_id), false)],
    );
    let text = metrics_text(&url).await;
    assert_eq!(metric(&text, "keyward_broker_outbox_pending"), 0.0);
    assert!(
        metric(
            &text,
            "keyward_broker_updates_total{op=\"revoke\",result=\"ok\"}"
        ) >= 3.0
    );
    common::promtool_check(&text);

    // The outbox survives a restart of keyward too: queue while the broker
    // is down, restart the daemon, bring the broker back.
    broker.stop();
    let v = lifecycle(&url, &admin, &a, "resume").await;
    assert_eq!(v["broker"], "pending", "{v}");
    assert_eq!(daemon.stop().code(), Some(0));
    // Failures were logged; the broker password never was, nor the device ids
    // (`log.sensitive_details` is off).
    let mut log = String::new();
    std::io::Read::read_to_string(&mut daemon.child.stderr.take().unwrap(), &mut log).unwrap();
    assert!(log.contains("broker update failed"), "{log}");
    let password = std::fs::read_to_string(&broker.admin_password_file).unwrap();
    assert!(
        !log.contains(password.trim()),
        "the broker password was logged"
    );
    assert!(!log.contains(&a.device_id), "{log}");
    let daemon = env.serve();
    assert_eq!(
        outbox_entry(&env, &a.device_id).map(|e| e.0),
        Some("grant".into())
    );
    broker.start(&a.chain);
    let deadline = Instant::now() + Duration::from_secs(30);
    while outbox_len(&env) > 0 {
        assert!(Instant::now() < deadline, "not applied after the restart");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(get_client(&broker, &a.device_id).contains(&role_of(&a.device_id)));
    check_publishes(
        &broker,
        &a,
        &[
            (&format!("dt/v1/{}/status", a.device_id), true),
            (&format!("dt/v1/{}/status", b.device_id), false),
        ],
    );
    drop(daemon);
}
