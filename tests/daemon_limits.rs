//! Hostile input bounded, against a real `keyward serve`.
//!
//! Metric series that made-up methods and paths cannot grow, per-source rate
//! limits, aggregated login-failure audit, cached readiness (counted with
//! OpenSC's pkcs11-spy), keyset pagination through the real CLI, the pending cap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Env, call, client, metrics_text, openssl_csr, promtool_check};
use serde_json::{Value, json};

/// The `keyward_http_*` sample lines of an exposition.
/// The HTTP series, one entry per metric and label set: a latency
/// histogram's buckets, sum and count (one `le` per bucket) count as one.
fn http_series(metrics: &str) -> Vec<String> {
    let mut series: Vec<String> = metrics
        .lines()
        .filter(|l| l.starts_with("keyward_http_"))
        .map(|l| {
            let s = l.rsplit_once(' ').map(|(s, _)| s).unwrap_or(l);
            let s = match s.split_once(",le=\"") {
                Some((head, _)) => format!("{head}}}"),
                None => s.to_string(),
            };
            ["_bucket{", "_sum{", "_count{"]
                .iter()
                .fold(s, |s, suffix| s.replace(suffix, "{"))
        })
        .collect();
    series.sort();
    series.dedup();
    series
}

/// A random uppercase token, valid as an HTTP method.
fn random_method() -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
    // Method tokens may not start with a digit for readability; prefix a letter.
    format!("X{}", &hex[..10])
}

#[tokio::test]
async fn made_up_methods_and_paths_do_not_grow_the_metrics() {
    let env = Env::new();
    env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();
    // Warm up: one known route, one unknown path, one scrape.
    let (s, _) = call(reqwest::Method::GET, &format!("{url}/healthz"), None, None).await;
    assert_eq!(s, 200);
    let before = http_series(&metrics_text(&url).await);
    assert!(!before.is_empty());

    let http = client();
    let mut statuses = std::collections::BTreeSet::new();
    for i in 0..200 {
        let method = reqwest::Method::from_bytes(random_method().as_bytes()).unwrap();
        let path = match i % 4 {
            // Random paths, some under /v1, some with a known route's shape.
            0 => format!("/{}", uuid::Uuid::new_v4()),
            1 => format!("/v1/{}/{}", uuid::Uuid::new_v4(), uuid::Uuid::new_v4()),
            2 => format!("/v1/registrations/{}", uuid::Uuid::new_v4()),
            _ => "/healthz".to_string(),
        };
        let method = if i % 10 == 0 {
            reqwest::Method::GET
        } else {
            method
        };
        let resp = http
            .request(method, format!("{url}{path}"))
            .send()
            .await
            .unwrap();
        statuses.insert(resp.status().as_u16());
    }
    // The requests reached the server and were answered (404 unmatched, 405 wrong method, ...).
    assert!(
        statuses.iter().all(|s| (400..500).contains(s) || *s == 200),
        "{statuses:?}"
    );

    let metrics = metrics_text(&url).await;
    let after = http_series(&metrics);
    let added: Vec<&String> = after.iter().filter(|s| !before.contains(s)).collect();
    // Per metric family (the request counter, the latency histogram).
    for family in [
        "keyward_http_requests_total{",
        "keyward_http_request_duration_seconds{",
    ] {
        let n = added.iter().filter(|s| s.starts_with(family)).count();
        assert!(
            n <= 8,
            "200 made-up requests added {n} {family}..}} series: {added:#?}"
        );
    }
    assert!(
        added.iter().all(|s| s.starts_with("keyward_http_request")),
        "{added:#?}"
    );
    assert!(
        metrics.contains("method=\"other\""),
        "made-up methods are counted as `other`"
    );
    assert!(
        metrics.contains("route=\"unmatched\""),
        "unmatched paths are counted as `unmatched`"
    );
    assert!(
        !metrics.contains("method=\"X"),
        "a made-up method became a label value"
    );
    promtool_check(&metrics);
}

/// A request from `source` (through the trusted loopback proxy).
async fn call_from(
    source: &str,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Option<u64>, Value) {
    static HTTP: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let mut rb = HTTP
        .get_or_init(client)
        .request(method, url)
        .header("x-forwarded-for", source);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
    let text = resp.text().await.unwrap();
    (
        status,
        retry_after,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn assert_rate_limited(status: u16, retry_after: Option<u64>, v: &Value, max_wait: u64) {
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "rate_limited", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("retry in")),
        "{v}"
    );
    let secs = retry_after.expect("429 without Retry-After");
    assert!((1..=max_wait).contains(&secs), "Retry-After {secs}");
}

fn registration_body(csr: &str, name: &str, group: &str) -> Value {
    json!({ "csr": csr, "name": name, "group": group })
}

#[tokio::test]
async fn registrations_are_limited_per_source_and_refusals_store_nothing() {
    let env = Env::new();
    env.trust_loopback_proxy();
    env.append_config("[limits]\nregistrations_per_source = 3\nregistrations_window_secs = 3600\n");
    env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let submit = format!("{url}/v1/registrations");
    for i in 0..3 {
        let (s, _, v) = call_from(
            "203.0.113.1",
            reqwest::Method::POST,
            &submit,
            None,
            Some(registration_body(&csr, &format!("a-{i}"), "default")),
        )
        .await;
        assert_eq!(s, 201, "{v}");
    }
    let before = env.counts();
    // The fourth from the same source: 429 with Retry-After (3 per hour: one every 1200 s).
    let (s, ra, v) = call_from(
        "203.0.113.1",
        reqwest::Method::POST,
        &submit,
        None,
        Some(registration_body(&csr, "a-3", "default")),
    )
    .await;
    assert_rate_limited(s, ra, &v, 1200);
    assert!(ra.unwrap() > 1100, "{ra:?}");
    // Refused before the body is even read: a malformed body gets the same answer.
    let (s, ra, v) = call_from(
        "203.0.113.1",
        reqwest::Method::POST,
        &submit,
        None,
        Some(json!({ "nonsense": true })),
    )
    .await;
    assert_rate_limited(s, ra, &v, 1200);
    assert_eq!(
        env.counts(),
        before,
        "a refused submission changed the store"
    );

    // Another source is not affected.
    let (s, _, v) = call_from(
        "203.0.113.2",
        reqwest::Method::POST,
        &submit,
        None,
        Some(registration_body(&csr, "b-0", "default")),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let metrics = metrics_text(&url).await;
    assert!(
        metrics.contains("keyward_rate_limited_total{limit=\"registrations\"} 2"),
        "{metrics}"
    );
    promtool_check(&metrics);
}

#[tokio::test]
async fn a_thousand_bad_admin_tokens_make_a_handful_of_audit_rows_and_block_the_source() {
    let env = Env::new();
    env.trust_loopback_proxy();
    // The default limit (10 failures per 300 s) stretched so that no token
    // refills however slowly the machine runs this test; one audit window
    // per day for the same reason.
    env.append_config(
        "[limits]\nadmin_login_failures_window_secs = 3000000\nlogin_failure_audit_window_secs = 86400\n",
    );
    let bootstrap = env.init();
    let mut daemon = env.serve();
    let url = daemon.url.clone();
    let list = format!("{url}/v1/admin/registrations");
    let before = env.counts();
    let attacker = "198.51.100.66";
    // 10 failures per 3,000,000 s: one more every 300,000 s.
    let max_wait = 300_000;

    let mut unauthorized = 0;
    let mut limited = 0;
    for i in 0..1000 {
        let token = format!("kwa_guess_{i}");
        let (s, ra, v) = call_from(attacker, reqwest::Method::GET, &list, Some(&token), None).await;
        match s {
            401 => {
                assert_eq!(v["error"]["code"], "unauthorized", "{v}");
                assert_eq!(limited, 0, "a 401 after the source was blocked");
                unauthorized += 1;
            }
            429 => {
                assert_rate_limited(s, ra, &v, max_wait);
                limited += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!((unauthorized, limited), (10, 990));
    // Once blocked, the source is refused even with a good token...
    let (s, ra, v) = call_from(
        attacker,
        reqwest::Method::GET,
        &list,
        Some(&bootstrap),
        None,
    )
    .await;
    assert_rate_limited(s, ra, &v, max_wait);
    // ...while the same token from another source works.
    let (s, _, v) = call_from(
        "192.0.2.10",
        reqwest::Method::GET,
        &list,
        Some(&bootstrap),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    // A blocked source is refused on every admin route, even without a token;
    // such a request is not a guess and is not counted as a failed login.
    let (s, ra, v) = call_from(attacker, reqwest::Method::GET, &list, None, None).await;
    assert_rate_limited(s, ra, &v, max_wait);

    // Nothing was written per request.
    let mid = env.counts();
    assert!(
        mid["audit_events"] - before["audit_events"] <= 2,
        "{} audit rows for 1001 failures before the window closed",
        mid["audit_events"] - before["audit_events"]
    );

    // A clean shutdown writes the open windows: nothing is lost.
    let status = daemon.stop();
    assert!(status.success(), "{status:?}");
    let rows: Vec<_> = env
        .audit_details_after(before["audit_events"])
        .into_iter()
        .filter(|(action, ..)| action == "admin.login_failed")
        .collect();
    assert!(
        !rows.is_empty() && rows.len() <= 2,
        "{} admin.login_failed rows: {rows:#?}",
        rows.len()
    );
    let mut count = 0;
    let mut unknown = 0;
    let mut rate_limited = 0;
    for (_, outcome, source, d) in &rows {
        assert_eq!(outcome, "denied");
        // The client address field is sealed (detail encryption is on by
        // default); the address stays readable as the event's subject.
        assert_eq!(source.as_deref(), None);
        assert_eq!(d["source"], attacker);
        assert!(d["window_start"].as_str().unwrap() < d["window_end"].as_str().unwrap());
        count += d["count"].as_u64().unwrap();
        unknown += d["reasons"]["unknown_token"].as_u64().unwrap_or(0);
        rate_limited += d["reasons"]["rate_limited"].as_u64().unwrap_or(0);
    }
    // 1000 guesses and the good token refused while blocked; the token-less request is not a login.
    assert_eq!((count, unknown, rate_limited), (1001, 10, 991));
    // The chain, with the aggregated events in it, verifies with the stock command.
    let out = env.run(&["audit", "verify", "--config", env.config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn a_flood_of_distinct_sources_stays_bounded_and_keeps_a_blocked_source_blocked() {
    let env = Env::new();
    env.trust_loopback_proxy();
    env.append_config(
        "[limits]\ntracked_sources = 64\nadmin_login_failures_per_source = 3\n\
         admin_login_failures_window_secs = 3000000\nlogin_failure_audit_window_secs = 86400\n",
    );
    let bootstrap = env.init();
    let mut daemon = env.serve();
    let url = daemon.url.clone();
    let list = format!("{url}/v1/admin/registrations");
    let before = env.counts();
    let attacker = "198.51.100.66";
    for _ in 0..3 {
        let (s, _, _) = call_from(attacker, reqwest::Method::GET, &list, Some("kwa_x"), None).await;
        assert_eq!(s, 401);
    }
    let (s, ra, v) = call_from(attacker, reqwest::Method::GET, &list, Some("kwa_x"), None).await;
    assert_rate_limited(s, ra, &v, 1_000_000);
    // 2000 other sources, one wrong token each.
    for i in 0..2000 {
        let source = format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256);
        let (s, _, v) = call_from(&source, reqwest::Method::GET, &list, Some("kwa_y"), None).await;
        assert_eq!(s, 401, "{v}");
    }
    let metrics = metrics_text(&url).await;
    let keys: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keyward_rate_limiter_keys "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(keys <= 64, "the limiter remembers {keys} keys");
    // The flood did not buy the attacker a clean slate.
    let (s, ra, v) = call_from(
        attacker,
        reqwest::Method::GET,
        &list,
        Some(&bootstrap),
        None,
    )
    .await;
    assert_rate_limited(s, ra, &v, 1_000_000);

    daemon.stop();
    let rows: Vec<_> = env
        .audit_details_after(before["audit_events"])
        .into_iter()
        .filter(|(action, ..)| action == "admin.login_failed")
        .collect();
    // At most 64 named sources and one overflow row per window (two if midnight UTC passed).
    assert!(rows.len() <= 2 * 65, "{} rows", rows.len());
    let total: u64 = rows.iter().map(|r| r.3["count"].as_u64().unwrap()).sum();
    assert_eq!(total, 3 + 1 + 2000 + 1, "every failure is counted");
    assert!(
        rows.iter()
            .any(|r| r.3["overflow"] == true && r.2.is_none()),
        "sources beyond the bound are counted in an overflow row"
    );
}

/// OpenSC's PKCS#11 spy: a module that forwards to SoftHSM2 and logs every call.
fn pkcs11_spy() -> std::path::PathBuf {
    [
        "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so",
        "/usr/lib/aarch64-linux-gnu/pkcs11/pkcs11-spy.so",
        "/usr/lib/pkcs11/pkcs11-spy.so",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.exists())
    .expect("pkcs11-spy.so missing (package opensc-pkcs11): run scripts/test.sh")
}

/// PKCS#11 calls the spy has logged so far (`N: C_Function` lines).
fn pkcs11_calls(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(": C_"))
        .filter(|(n, _)| n.chars().all(|c| c.is_ascii_digit()))
        .map(|(_, f)| format!("C_{f}"))
        .collect()
}

#[tokio::test]
async fn readyz_answers_from_the_cache_without_touching_the_hsm() {
    let env = Env::new();
    env.init();
    // One background check at start, the next one only after 20 minutes.
    env.append_config("[limits]\nreadiness_max_age_secs = 3600\n");
    // The audit jobs sign a first checkpoint and verify once right after
    // start, then not for a day: they are waited for below.
    env.append_config(
        "[audit]\ncheckpoint_interval_secs = 86400\ncheckpoint_every_events = 10000000\nverify_interval_secs = 86400\n",
    );
    let module = common::softhsm_module();
    let text = std::fs::read_to_string(&env.config).unwrap().replace(
        &format!("module = \"{}\"", module.display()),
        &format!("module = \"{}\"", pkcs11_spy().display()),
    );
    std::fs::write(&env.config, text).unwrap();
    let log = env.path("pkcs11-spy.log");
    let daemon = env.serve_with_env(&[
        ("PKCS11SPY", module.as_os_str()),
        ("PKCS11SPY_OUTPUT", log.as_os_str()),
    ]);
    let url = daemon.url.clone();
    let (s, v) = call(reqwest::Method::GET, &format!("{url}/readyz"), None, None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "ready");
    assert_eq!(v["hsm"], "ok");
    assert_eq!(v["keystores"]["default"]["status"], "ok");
    assert_eq!(v["stale"], false);
    // The audit jobs' first round (a checkpoint signed, the tail verified
    // with the key read from the token) is HSM work of its own.
    let mut settled = false;
    for _ in 0..300 {
        let m = common::metrics_text(&url).await;
        let positive = |name: &str| {
            m.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
        };
        if positive("keyward_audit_checkpoint_sequence ")
            && positive("keyward_audit_last_verified_timestamp_seconds ")
        {
            settled = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(settled, "the audit jobs' first round did not finish");
    let before = pkcs11_calls(&log);
    // The daemon really talks to the token through the spy, and the start-up
    // readiness check was one of those calls.
    assert!(before.iter().any(|f| f == "C_Login"), "{before:?}");
    assert!(before.iter().any(|f| f == "C_GetSessionInfo"), "{before:?}");

    for _ in 0..200 {
        let (s, v) = call(reqwest::Method::GET, &format!("{url}/readyz"), None, None).await;
        assert_eq!(s, 200, "{v}");
    }
    let after = pkcs11_calls(&log);
    assert_eq!(
        after.len(),
        before.len(),
        "200 /readyz calls made PKCS#11 calls: {:?}",
        &after[before.len()..]
    );
    let metrics = metrics_text(&url).await;
    assert!(metrics.contains("keyward_ready 1"), "{metrics}");
    assert!(
        metrics.contains("keyward_hsm_up{keystore=\"default\"} 1"),
        "{metrics}"
    );
}

/// `keyward registrations list ...` (the real CLI binary) as the given admin.
fn cli_list(env: &Env, url: &str, token: &str, args: &[&str]) -> (Value, String, String) {
    let out = env
        .keyward()
        .env("KEYWARD_URL", url)
        .env("KEYWARD_TOKEN", token)
        .args(["registrations", "list"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stdout}{stderr}");
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (json, stdout, stderr)
}

#[tokio::test]
async fn pending_list_shows_a_genuine_registration_after_a_thousand_junk_ones() {
    let env = Env::with_extra_group(
        "[[group]]\nname = \"bulk\"\nprofile = \"device\"\napprovals_required = 1\nmax_pending = 5000\n",
    );
    // One source submits everything: its rate limit is raised for the test.
    env.append_config("[limits]\nregistrations_per_source = 100000\n");
    let bootstrap = env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let submit = format!("{url}/v1/registrations");
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..1000 {
        let (s, _, v) = call_from(
            "127.0.0.1",
            reqwest::Method::POST,
            &submit,
            None,
            Some(registration_body(&csr, &format!("junk-{i}"), "bulk")),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        ids.insert(v["id"].as_str().unwrap().to_string());
    }
    let (s, _, genuine) = call_from(
        "127.0.0.1",
        reqwest::Method::POST,
        &submit,
        None,
        Some(registration_body(&csr, "genuine-sensor", "default")),
    )
    .await;
    assert_eq!(s, 201, "{genuine}");
    let genuine_id = genuine["id"].as_str().unwrap().to_string();
    ids.insert(genuine_id.clone());

    // What an approver types first: the genuine one leads the first page.
    let (_, text, hint) = cli_list(&env, &url, &bootstrap, &["--status", "pending"]);
    let first_line = text.lines().next().unwrap();
    assert!(
        first_line.starts_with(&genuine_id) && first_line.contains("genuine-sensor"),
        "{first_line}"
    );
    assert!(hint.contains("more: repeat with --cursor"), "{hint}");
    let (page, _, _) = cli_list(
        &env,
        &url,
        &bootstrap,
        &["--status", "pending", "--output", "json"],
    );
    assert_eq!(page["items"][0]["id"], genuine_id.as_str());
    assert_eq!(page["items"].as_array().unwrap().len(), 100);

    // Walking every page with the cursor yields each registration exactly once,
    // newest first.
    for order in ["newest", "oldest"] {
        let mut seen: Vec<String> = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let mut args = vec![
                "--status", "pending", "--output", "json", "--limit", "250", "--order", order,
            ];
            if let Some(c) = &cursor {
                args.extend(["--cursor", c.as_str()]);
            }
            let (page, _, _) = cli_list(&env, &url, &bootstrap, &args);
            pages += 1;
            for r in page["items"].as_array().unwrap() {
                assert_eq!(r["status"], "pending");
                seen.push(r["id"].as_str().unwrap().to_string());
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        assert_eq!(pages, 5, "{order}");
        assert_eq!(seen.len(), 1001, "{order}");
        let unique: std::collections::BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(unique, ids, "{order}: every registration exactly once");
        let first = if order == "newest" {
            seen.first()
        } else {
            seen.last()
        };
        assert_eq!(first, Some(&genuine_id), "{order}");
    }

    // The CA list is paginated the same way.
    let (s, v) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/cas?limit=1"),
        Some(&bootstrap),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    let cursor = v["next_cursor"].as_str().unwrap();
    let (s, v2) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/cas?limit=1&cursor={cursor}"),
        Some(&bootstrap),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v2}");
    assert_ne!(v2["items"][0]["name"], v["items"][0]["name"]);
    assert!(
        v2["next_cursor"].is_null(),
        "two CAs in the shipped policy: {v2}"
    );
    let (s, e) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/cas?cursor=bogus"),
        Some(&bootstrap),
        None,
    )
    .await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["error"]["code"], "invalid_query");
}

#[tokio::test]
async fn the_pending_cap_answers_429_and_stores_nothing() {
    let env = Env::with_extra_group(
        "[[group]]\nname = \"capped\"\nprofile = \"device\"\napprovals_required = 1\nmax_pending = 3\n",
    );
    let bootstrap = env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let submit = format!("{url}/v1/registrations");
    let mut first = String::new();
    for i in 0..3 {
        let (s, v) = call(
            reqwest::Method::POST,
            &submit,
            None,
            Some(registration_body(&csr, &format!("c-{i}"), "capped")),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        if i == 0 {
            first = v["id"].as_str().unwrap().to_string();
        }
    }
    let before = env.counts();
    let resp = client()
        .post(&submit)
        .json(&registration_body(&csr, "c-3", "capped"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "pending_limit", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("capped"),
        "{v}"
    );
    assert_eq!(
        env.counts(),
        before,
        "a refused submission stored something"
    );
    // Other groups are not affected.
    let (s, v) = call(
        reqwest::Method::POST,
        &submit,
        None,
        Some(registration_body(&csr, "elsewhere", "default")),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    // A decision frees a place in the queue.
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/registrations/{first}/deny"),
        Some(&bootstrap),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = call(
        reqwest::Method::POST,
        &submit,
        None,
        Some(registration_body(&csr, "c-4", "capped")),
    )
    .await;
    assert_eq!(s, 201, "{v}");
}
