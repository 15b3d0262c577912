//! Device certificate renewal on a real `keyward serve`: the renewal hint
//! (and `Keyward-Renewal-Due`) in the registration status, the device
//! config and the renewal answer; the `device.renewal_due` notices job
//! (`[jobs] renewal_notice_interval_seconds = 1`) delivering once per
//! certificate to a webhook receiver started here; and the
//! `keyward certs expiring` report.
//!
//! A certificate is due at once when its profile's renewal window is longer
//! than what is left of it. Policies refuse a window as long as the
//! validity, so the test issues a 20-day certificate under a 10-day window
//! and then widens the profile to 30 days validity and a 25-day window (a
//! policy reload, as an operator would): the 20-day certificate's window
//! opened 5 days ago.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::{Env, call, metrics_text, one_approver_enrollment, openssl_csr, repo_file};
use reqwest::Method;
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "renewal-hook-secret-0123456789";
const DAY: i64 = 86_400;

/// Records every POST it receives (event header and JSON body).
#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<Vec<(String, Value)>>>,
}

async fn record(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let event = headers
        .get("keyward-event")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    r.hits.lock().unwrap().push((event, body));
    StatusCode::OK
}

impl Receiver {
    async fn start() -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let r = Receiver::default();
        let app = Router::new().fallback(record).with_state(r.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (r, url)
    }

    /// The renewal notices received (a pending registration raises its
    /// own kind, left out).
    fn hits(&self) -> Vec<(String, Value)> {
        let all = self.hits.lock().unwrap().clone();
        for (event, body) in &all {
            assert_eq!(event, body["type"].as_str().unwrap(), "{body}");
        }
        all.into_iter()
            .filter(|(e, _)| e != "registration.pending")
            .collect()
    }
}

fn short_profile(validity: u32, window: u32) -> String {
    format!(
        "\n[[profile]]\nname = \"short\"\nissuer = \"devices\"\nvalidity_days = {validity}\n\
         key_algorithms = [\"ecdsa-p256\"]\nextended_key_usage = [\"client-auth\"]\n\
         renewal_window_days = {window}\n"
    )
}

fn ca_policy(validity: u32, window: u32) -> String {
    format!(
        "{}{}",
        repo_file("policies/ca.toml"),
        short_profile(validity, window)
    )
}

/// GET or POST with the registration secret or an admin token; returns
/// status, `Keyward-Renewal-Due` and the JSON body.
async fn call_h(
    method: Method,
    url: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    let mut rb = common::client().request(method, url);
    if let Some(t) = bearer {
        rb = rb.bearer_auth(t);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let due = resp
        .headers()
        .get("keyward-renewal-due")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.text().await.unwrap();
    (
        status,
        due,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn unix(rfc3339: &Value) -> i64 {
    time::OffsetDateTime::parse(
        rfc3339.as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
    .unix_timestamp()
}

/// `keyward_<name> ` sample value, 0 when absent.
fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{series} ")))
        .map(|v| v.parse().unwrap())
        .unwrap_or(0)
}

async fn job_runs(url: &str) -> u64 {
    sample(
        &metrics_text(url).await,
        "keyward_job_runs_total{job=\"renewal_notices\",result=\"ok\"}",
    )
}

/// Waits until the notices job has completed `n` more rounds.
async fn rounds(url: &str, n: u64) {
    let start = job_runs(url).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while job_runs(url).await < start + n {
        assert!(Instant::now() < deadline, "the notices job does not run");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Registered {
    id: String,
    secret: String,
    device_id: String,
    serial: String,
    key: std::path::PathBuf,
}

async fn register(url: &str, dir: &Path, name: &str, group: &str) -> Registered {
    let (csr, key) = openssl_csr(dir, "ec");
    let (status, v) = call(
        Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(json!({ "csr": csr, "name": name, "group": group })),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["status"], "issued", "{v}");
    Registered {
        id: v["id"].as_str().unwrap().to_string(),
        secret: v["secret"].as_str().unwrap().to_string(),
        device_id: v["device_id"].as_str().unwrap().to_string(),
        serial: v["certificate_serial"].as_str().unwrap().to_string(),
        key: common::write(dir, &format!("{name}.key"), &key),
    }
}

/// The renewal hint of `d`'s registration status and device config (both
/// must agree), with the `Keyward-Renewal-Due` header of each.
async fn hints(url: &str, d: &Registered) -> (Value, Option<String>, Option<String>) {
    let (status, h1, reg) = call_h(
        Method::GET,
        &format!("{url}/v1/registrations/{}", d.id),
        Some(&d.secret),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reg}");
    let (status, h2, cfg) = call_h(
        Method::GET,
        &format!("{url}/v1/devices/me/config?registration={}", d.id),
        Some(&d.secret),
        None,
    )
    .await;
    assert_eq!(status, 200, "{cfg}");
    assert_eq!(reg["renewal"], cfg["renewal"], "status and config disagree");
    assert_eq!(
        unix(&reg["renewal"]["not_after"]),
        cfg["not_after"].as_i64().unwrap()
    );
    (reg["renewal"].clone(), h1, h2)
}

fn openssl(args: &[&str], key: &Path, input: Option<&Path>) -> Vec<u8> {
    let mut c = Command::new("openssl");
    c.args(args).arg(key);
    if let Some(i) = input {
        c.arg(i);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Renews `d` with the same key by the signed-nonce proof, signed by the
/// stock openssl; returns the answer's status, header and body.
async fn renew(url: &str, dir: &Path, d: &Registered) -> (u16, Option<String>, Value) {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let csr = openssl(
        &[
            "req",
            "-new",
            "-subj",
            "/CN=renewal",
            "-outform",
            "DER",
            "-key",
        ],
        &d.key,
        None,
    );
    let (status, n) = call(
        Method::GET,
        &format!("{url}/v1/devices/{}/renew/nonce", d.device_id),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{n}");
    let nonce = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(n["nonce"].as_str().unwrap())
        .unwrap();
    let message = keyward::ca::renewal::proof_message(d.device_id.parse().unwrap(), &nonce, &csr);
    let msg_file = common::write(dir, "proof.bin", "");
    std::fs::write(&msg_file, message).unwrap();
    let signature = openssl(&["dgst", "-sha256", "-sign"], &d.key, Some(&msg_file));
    let csr_pem =
        der::pem::encode_string("CERTIFICATE REQUEST", der::pem::LineEnding::LF, &csr).unwrap();
    call_h(
        Method::POST,
        &format!("{url}/v1/devices/{}/renew", d.device_id),
        None,
        Some(json!({ "csr": csr_pem, "nonce": b64(&nonce), "signature": b64(&signature) })),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_notices_and_the_expiring_report() {
    let (receiver, hook) = Receiver::start().await;
    let enrollment = format!(
        "{}\n[[group]]\nname = \"soon\"\nprofile = \"short\"\napproval = \"auto\"\nopen_enrollment = true\n\n\
         [[group]]\nname = \"later\"\nprofile = \"device\"\napproval = \"auto\"\nopen_enrollment = true\n",
        one_approver_enrollment()
    );
    let env = Env::with_policies(&ca_policy(20, 10), &enrollment);
    let root = env.init();
    std::fs::write(env.path("hook.secret"), SECRET).unwrap();
    env.append_config(&format!(
        "[jobs]\nrenewal_notice_interval_seconds = 1\n\n\
         [[notify]]\ntype = \"webhook\"\nurl = \"{hook}\"\nsecret_file = \"hook.secret\"\n"
    ));
    let daemon = env.serve();
    let url = daemon.url.clone();
    let dir = env.dir.path();

    let soon = register(&url, dir, "soon-1", "soon").await;
    let later = register(&url, dir, "later-1", "later").await;

    // ---- Windows closed: hints say so, no header, nothing sent.
    let (h, h1, h2) = hints(&url, &soon).await;
    assert_eq!(h["due"], false, "{h}");
    assert_eq!((h1, h2), (None, None));
    let soon_not_after = unix(&h["not_after"]);
    assert_eq!(unix(&h["window_opens_at"]), soon_not_after - 10 * DAY);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((soon_not_after - (now + 20 * DAY)).abs() < 120, "{h}");
    rounds(&url, 2).await;
    assert!(receiver.hits().is_empty(), "{:?}", receiver.hits());
    // A pending registration has no certificate yet: no hint.
    let (csr, _) = openssl_csr(dir, "ec");
    let (_, pending) = call(
        Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(json!({ "csr": csr, "name": "waiting", "group": "default" })),
    )
    .await;
    assert_eq!(pending["status"], "pending", "{pending}");
    let (status, h, v) = call_h(
        Method::GET,
        &format!("{url}/v1/registrations/{}", pending["id"].as_str().unwrap()),
        Some(pending["secret"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!((status, h), (200, None));
    assert!(v.get("renewal").is_none(), "{v}");

    // ---- The operator widens the short profile: 30 days, 25-day window.
    std::fs::write(env.path("policies/ca.toml"), ca_policy(30, 25)).unwrap();
    let (status, v) = call(
        Method::POST,
        &format!("{url}/v1/admin/policies/reload"),
        Some(&root),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");

    // The 20-day certificate is inside its 25-day window: due, and told so.
    let (h, h1, h2) = hints(&url, &soon).await;
    assert_eq!(h["due"], true, "{h}");
    assert_eq!(unix(&h["not_after"]), soon_not_after);
    assert_eq!(unix(&h["window_opens_at"]), soon_not_after - 25 * DAY);
    assert_eq!((h1.as_deref(), h2.as_deref()), (Some("true"), Some("true")));
    // The 365-day one under the 30-day window is not.
    let (h, h1, h2) = hints(&url, &later).await;
    assert_eq!(h["due"], false, "{h}");
    assert_eq!(
        unix(&h["window_opens_at"]),
        unix(&h["not_after"]) - 30 * DAY
    );
    assert_eq!((h1, h2), (None, None));

    // ---- One notice, for the due certificate only, and only once.
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.hits().is_empty() {
        assert!(Instant::now() < deadline, "no renewal notice arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rounds(&url, 3).await;
    let hits = receiver.hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
    let (event, body) = &hits[0];
    assert_eq!(event, "device.renewal_due");
    assert_eq!(body["type"], "device.renewal_due");
    assert_eq!(body["data"]["serial"], soon.serial.as_str());
    assert_eq!(body["data"]["device_id"], soon.device_id.as_str());
    assert_eq!(unix(&body["data"]["not_after"]), soon_not_after);
    let metrics = metrics_text(&url).await;
    assert_eq!(
        sample(&metrics, "keyward_renewal_notices_total"),
        1,
        "{metrics}"
    );
    let audited: Vec<Value> = env
        .audit_details_after(0)
        .into_iter()
        .filter(|(action, ..)| action == "device.renewal_due")
        .map(|(_, outcome, _, details)| {
            assert_eq!(outcome, "success");
            details
        })
        .collect();
    assert_eq!(
        audited,
        vec![json!({ "count": 1, "serials": [soon.serial] })]
    );

    // ---- The report: exactly the due device within 30 days.
    let token_file = env.path("admin.token");
    let cli = |args: &[&str]| {
        env.keyward()
            .args(args)
            .args(["--url", &url, "--token-file", token_file.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = cli(&["certs", "expiring", "--within", "30d", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = report["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{report}");
    let item = &items[0];
    assert_eq!(item["serial"], soon.serial.as_str());
    assert_eq!(item["device_id"], soon.device_id.as_str());
    assert_eq!(item["device_name"], "soon-1");
    assert_eq!(item["group"], "soon");
    assert_eq!(item["issuer"], "devices");
    assert_eq!(item["renewal_due"], true);
    assert_eq!(unix(&item["not_after"]), soon_not_after);
    assert_eq!(unix(&item["window_opens_at"]), soon_not_after - 25 * DAY);
    assert!(!item["notified_at"].is_null(), "{item}");
    assert!(report.get("next_cursor").is_none());
    // Text output names it as due; 400 days take both devices, soonest first.
    let out = cli(&["certs", "expiring", "--within", "30d"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(&soon.serial) && text.contains(" due "),
        "{text}"
    );
    assert!(!text.contains(&later.serial), "{text}");
    let out = cli(&["certs", "expiring", "--within", "400d", "--json"]);
    let both: Value = serde_json::from_slice(&out.stdout).unwrap();
    let serials: Vec<&str> = both["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["serial"].as_str().unwrap())
        .collect();
    assert_eq!(serials, [soon.serial.as_str(), later.serial.as_str()]);
    assert_eq!(both["items"][1]["renewal_due"], false);
    assert!(both["items"][1]["notified_at"].is_null());
    // A `within` that is not d, h or m: 400 `invalid_within`, over HTTP and the CLI.
    for bad in ["30", "30s", "0d", "1w", "-1d", "3651d", "30%20d"] {
        let (status, v) = call(
            Method::GET,
            &format!("{url}/v1/admin/certs/expiring?within={bad}"),
            Some(&root),
            None,
        )
        .await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some("invalid_within")),
            "{bad}: {v}"
        );
    }
    for good in ["12h", "90m"] {
        let (status, v) = call(
            Method::GET,
            &format!("{url}/v1/admin/certs/expiring?within={good}"),
            Some(&root),
            None,
        )
        .await;
        assert_eq!((status, v["items"].clone()), (200, json!([])), "{good}");
    }
    let out = cli(&["certs", "expiring", "--within", "5s"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid_within"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // ---- Renewal: the new 30-day certificate's window opens in 5 days.
    let (status, h, renewed) = renew(&url, dir, &soon).await;
    assert_eq!(status, 201, "{renewed}");
    assert_eq!(renewed["previous_serial"], soon.serial.as_str());
    assert_eq!(renewed["renewal"]["due"], false, "{renewed}");
    assert_eq!(h, None);
    let new_not_after = unix(&renewed["renewal"]["not_after"]);
    assert_eq!(new_not_after, unix(&renewed["not_after"]));
    assert_eq!(
        unix(&renewed["renewal"]["window_opens_at"]),
        new_not_after - 25 * DAY
    );
    // The device's answers now speak of the new certificate.
    let (h, h1, h2) = hints(&url, &soon).await;
    assert_eq!((h["due"].clone(), h1, h2), (json!(false), None, None));
    assert_eq!(unix(&h["not_after"]), new_not_after);
    // Nothing more to notify: still the one notice.
    rounds(&url, 2).await;
    assert_eq!(receiver.hits().len(), 1, "{:?}", receiver.hits());
    drop(daemon);
}
