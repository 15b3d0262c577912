//! Notifications against a real HTTP receiver started here (axum on
//! 127.0.0.1:0) that records every request: a pending registration on a real
//! `keyward serve` fans out to a log and three webhooks (signature checked
//! with ring and with the stock `openssl dgst`), retries on 503 and 429,
//! no retry on 400, per-attempt timeouts, and the queue's bounds (full queue,
//! shutdown drain).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use common::{Env, call, metrics_text, openssl_csr};
use keyward::clock::{Clock, SystemClock};
use keyward::metrics::Metrics;
use keyward::notify::{
    Backend, Notification, Notifiers, WebhookNotifier, WebhookSettings, WebhookUrl,
};
use secrecy::SecretString;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET_A: &str = "webhook-secret-a-0123456789abcdef";
const SECRET_B: &str = "webhook-secret-b-fedcba9876543210";

#[derive(Debug, Clone)]
struct Hit {
    path: String,
    signature: String,
    event: String,
    delivery: String,
    content_type: String,
    body: Vec<u8>,
    at: Instant,
}

impl Hit {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// Records every request; answers by path: `/a`, `/b`, `/ok` 200; `/flaky`
/// 503 twice then 200; `/throttle` 429 with `Retry-After: 1` once then 200;
/// `/bad` 400; `/hang...` never.
#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
    base: String,
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = Receiver {
            base: format!("http://{}", listener.local_addr().unwrap()),
            ..Default::default()
        };
        let app = Router::new().fallback(record).with_state(r.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        r
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn hits(&self, path: &str) -> Vec<Hit> {
        let h = self.hits.lock().unwrap();
        h.iter().filter(|x| x.path == path).cloned().collect()
    }
}

async fn record(State(r): State<Receiver>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let path = uri.path().to_string();
    let n = {
        let mut hits = r.hits.lock().unwrap();
        hits.push(Hit {
            path: path.clone(),
            signature: header("keyward-signature"),
            event: header("keyward-event"),
            delivery: header("keyward-delivery"),
            content_type: header("content-type"),
            body: body.to_vec(),
            at: Instant::now(),
        });
        hits.iter().filter(|h| h.path == path).count()
    };
    match path.as_str() {
        "/a" | "/b" | "/ok" => StatusCode::OK.into_response(),
        "/flaky" if n <= 2 => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        "/flaky" => StatusCode::NO_CONTENT.into_response(),
        "/throttle" if n == 1 => {
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response()
        }
        "/throttle" => StatusCode::OK.into_response(),
        "/bad" => StatusCode::BAD_REQUEST.into_response(),
        p if p.starts_with("/hang") => std::future::pending().await,
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `(t, v1)` of a `Keyward-Signature` header.
fn parse_signature(header: &str) -> (String, String) {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v.to_string()),
            Some(("v1", v)) => v1 = Some(v.to_string()),
            _ => panic!("unexpected part {part:?} in {header:?}"),
        }
    }
    (t.unwrap(), v1.unwrap())
}

/// Recomputes the HMAC with ring.
fn signature_verifies(secret: &str, hit: &Hit) -> bool {
    let (t, v1) = parse_signature(&hit.signature);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(&hit.body);
    ring::hmac::verify(&key, &signed, &hex::decode(v1).unwrap()).is_ok()
}

/// The HMAC as the stock tool computes it (docs/notifications.md).
fn openssl_hmac(dir: &std::path::Path, secret: &str, t: &str, body: &[u8]) -> String {
    let file = dir.join("signed-payload");
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    std::fs::write(&file, signed).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", secret, "-r"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sample(metrics: &str, backend: &str, result: &str) -> u64 {
    let series =
        format!("keyward_notifications_total{{backend=\"{backend}\",result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("{series} missing"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_registration_is_signed_and_fanned_out_and_auto_issue_is_silent() {
    let receiver = Receiver::start().await;
    let env = Env::with_extra_group(
        "[[group]]\nname = \"auto\"\nprofile = \"device\"\napproval = \"auto\"\nopen_enrollment = true\n",
    );
    env.init();
    std::fs::write(env.path("hook.secret"), format!("{SECRET_A}\n")).unwrap();
    env.append_config(&format!(
        "[[notify]]\ntype = \"log\"\n\n\
         [[notify]]\ntype = \"webhook\"\nurl = \"{}\"\nsecret_file = \"hook.secret\"\n\n\
         [[notify]]\ntype = \"webhook\"\nurl = \"{}\"\nsecret_env = \"KW_TEST_HOOK_SECRET\"\n\n\
         [[notify]]\ntype = \"webhook\"\nurl = \"{}\"\nsecret_file = \"hook.secret\"\n\
         timeout_seconds = 1\nmax_attempts = 2\ninitial_backoff_ms = 50\n",
        receiver.url("/a"),
        receiver.url("/b"),
        receiver.url("/hang"),
    ));
    let check = env.run(&["config", "check", "--config", env.config.to_str().unwrap()]);
    assert!(
        !check.status.success(),
        "config check must read the env secret, unset here"
    );
    assert!(
        String::from_utf8_lossy(&check.stderr).contains("KW_TEST_HOOK_SECRET"),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let check = env
        .keyward()
        .env("KW_TEST_HOOK_SECRET", SECRET_B)
        .args(["config", "check", "--config", env.config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let mut daemon = env.serve_with_env(&[("KW_TEST_HOOK_SECRET", SECRET_B.as_ref())]);
    let url = daemon.url.clone();

    // Auto-issued: nobody needs to act, nothing is sent.
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let (status, auto) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(json!({ "csr": csr, "name": "auto-device", "group": "auto" })),
    )
    .await;
    assert_eq!(status, 201, "{auto}");
    assert_eq!(auto["status"], "issued", "{auto}");

    // Pending: one notification to every backend. The answer does not wait
    // for the receiver that never answers.
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let (status, sub) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(json!({ "csr": csr, "name": "pump-7", "group": "default" })),
    )
    .await;
    assert_eq!(status, 201, "{sub}");
    let registration_id = sub["id"].as_str().unwrap().to_string();

    // The hanging receiver: two attempts, each cut off by the 1 s timeout, then failed.
    wait_for("the /hang webhook to give up", || {
        receiver.hits("/hang").len() == 2
    })
    .await;
    let mut metrics = String::new();
    for _ in 0..250 {
        metrics = metrics_text(&url).await;
        if sample(&metrics, "webhook", "failed") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sample(&metrics, "webhook", "failed"), 1, "{metrics}");
    assert_eq!(sample(&metrics, "webhook", "delivered"), 2, "{metrics}");
    assert_eq!(sample(&metrics, "webhook", "dropped"), 0, "{metrics}");
    assert_eq!(
        sample(&metrics, "log", "delivered"),
        1,
        "auto-issue notified: {metrics}"
    );
    assert_eq!(receiver.hits("/hang").len(), 2, "max_attempts = 2");

    let a = receiver.hits("/a");
    let b = receiver.hits("/b");
    assert_eq!(
        (a.len(), b.len()),
        (1, 1),
        "one call each, none for auto-issue"
    );
    let (a, b) = (&a[0], &b[0]);
    let body = a.json();
    assert_eq!(body["type"], "registration.pending");
    assert_eq!(body["data"]["registration_id"], registration_id.as_str());
    assert_eq!(body["data"]["group"], "default");
    assert_eq!(body["data"]["device_name"], "pump-7");
    assert_eq!(body["data"]["attestation"], "none");
    assert_eq!(body["data"]["approvals_required"], 1);
    assert!(
        body["data"]["device_id"].as_str().unwrap().len() == 36,
        "{body}"
    );
    let id = uuid::Uuid::parse_str(body["id"].as_str().unwrap()).unwrap();
    assert_eq!(id.get_version_num(), 7);
    time::OffsetDateTime::parse(
        body["time"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    // Same notification (same id) to every backend; headers name it.
    assert_eq!(b.json(), body);
    assert_eq!(a.delivery, id.to_string());
    assert_eq!(a.event, "registration.pending");
    assert_eq!(a.content_type, "application/json");

    // Each webhook signs with its own secret; ring and openssl agree.
    assert!(signature_verifies(SECRET_A, a));
    assert!(signature_verifies(SECRET_B, b));
    assert!(
        !signature_verifies(SECRET_B, a),
        "a's body verified under b's secret"
    );
    let (t, v1) = parse_signature(&a.signature);
    assert_eq!(openssl_hmac(env.dir.path(), SECRET_A, &t, &a.body), v1);
    let mut tampered = a.body.clone();
    tampered[10] ^= 1;
    assert_ne!(openssl_hmac(env.dir.path(), SECRET_A, &t, &tampered), v1);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now - t.parse::<i64>().unwrap()).abs() < 120, "t={t}");

    // The secrets are nowhere in what the daemon wrote (its warnings about
    // the failed webhook included).
    assert!(daemon.stop().success());
    let mut logged = String::new();
    std::io::Read::read_to_string(&mut daemon.child.stderr.take().unwrap(), &mut logged).unwrap();
    assert!(logged.contains("notification not delivered"), "{logged}");
    for s in [SECRET_A, SECRET_B] {
        assert!(!logged.contains(s), "secret in the daemon's log");
    }
}

fn webhook(
    receiver: &Receiver,
    path: &str,
    secret: &str,
    tweak: impl FnOnce(&mut WebhookSettings),
) -> Backend {
    let mut s = WebhookSettings {
        url: WebhookUrl::parse(&receiver.url(path)).unwrap(),
        secret: SecretString::from(secret.to_string()),
        timeout: Duration::from_secs(5),
        max_attempts: 5,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_secs(5),
    };
    tweak(&mut s);
    Backend::new(
        Arc::new(WebhookNotifier::new("notify[0].secret", s, Arc::new(SystemClock)).unwrap()),
        100,
    )
}

fn pending(name: &str) -> Notification {
    Notification::RegistrationPending {
        registration_id: uuid::Uuid::now_v7(),
        device_id: uuid::Uuid::now_v7(),
        group: "default".into(),
        device_name: name.into(),
        attestation: "none".into(),
        submitted_at: SystemClock.now().unix_timestamp(),
        approvals_required: 2,
    }
}

fn count(m: &Metrics, result: &str) -> u64 {
    m.notifications
        .with_label_values(&["webhook", result])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_503_and_429_but_not_on_400() {
    let receiver = Receiver::start().await;
    let metrics = Arc::new(Metrics::new().unwrap());
    let notifiers = Notifiers::start(
        vec![
            webhook(&receiver, "/flaky", SECRET_A, |_| {}),
            webhook(&receiver, "/bad", SECRET_A, |_| {}),
            webhook(&receiver, "/throttle", SECRET_A, |s| {
                s.initial_backoff = Duration::from_millis(10)
            }),
        ],
        Arc::new(SystemClock),
        metrics.clone(),
    );
    notifiers.send(pending("flaky-device"));
    wait_for("three outcomes", || {
        count(&metrics, "delivered") + count(&metrics, "failed") == 3
    })
    .await;
    assert_eq!(count(&metrics, "delivered"), 2, "/flaky and /throttle");
    assert_eq!(count(&metrics, "failed"), 1, "/bad");

    // 503, 503, then delivered on the third attempt: the same notification
    // each time, each attempt signed afresh.
    let flaky = receiver.hits("/flaky");
    assert_eq!(flaky.len(), 3);
    for h in &flaky {
        assert_eq!(h.delivery, flaky[0].delivery);
        assert_eq!(h.body, flaky[0].body);
        assert!(signature_verifies(SECRET_A, h));
    }
    // Backoff 50 ms, then doubled.
    assert!(flaky[1].at - flaky[0].at >= Duration::from_millis(50));
    assert!(flaky[2].at - flaky[1].at >= Duration::from_millis(100));
    // 400 is final: one attempt.
    assert_eq!(receiver.hits("/bad").len(), 1);
    // 429 with Retry-After: 1 waits that long instead of the 10 ms backoff.
    let throttle = receiver.hits("/throttle");
    assert_eq!(throttle.len(), 2);
    assert!(throttle[1].at - throttle[0].at >= Duration::from_millis(900));
    notifiers.shutdown(Duration::from_secs(5)).await;
    assert_eq!(count(&metrics, "dropped"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_the_newest_and_shutdown_is_bounded() {
    let receiver = Receiver::start().await;
    let metrics = Arc::new(Metrics::new().unwrap());
    let mut hang = webhook(&receiver, "/hang-queue", SECRET_A, |s| {
        s.max_attempts = 1;
        s.timeout = Duration::from_secs(30);
    });
    hang.queue_capacity = 1;
    hang.in_flight = 1;
    let notifiers = Notifiers::start(vec![hang], Arc::new(SystemClock), metrics.clone());
    notifiers.send(pending("one"));
    wait_for("the first delivery in flight", || {
        receiver.hits("/hang-queue").len() == 1
    })
    .await;
    notifiers.send(pending("two")); // queued
    let sent = Instant::now();
    notifiers.send(pending("three")); // queue full: dropped, and send did not wait
    assert!(sent.elapsed() < Duration::from_secs(1));
    assert_eq!(count(&metrics, "dropped"), 1);
    // Shutdown gives up after its bound: "two" was never sent.
    notifiers.shutdown(Duration::from_millis(300)).await;
    assert_eq!(count(&metrics, "dropped"), 2);
    assert_eq!(receiver.hits("/hang-queue").len(), 1);
    notifiers.send(pending("four"));
    assert_eq!(count(&metrics, "dropped"), 3, "refused after shutdown");

    // A clean shutdown delivers what is queued.
    let metrics = Arc::new(Metrics::new().unwrap());
    let notifiers = Notifiers::start(
        vec![webhook(&receiver, "/ok", SECRET_B, |_| {})],
        Arc::new(SystemClock),
        metrics.clone(),
    );
    for i in 0..5 {
        notifiers.send(pending(&format!("drain-{i}")));
    }
    notifiers.shutdown(Duration::from_secs(10)).await;
    assert_eq!(count(&metrics, "delivered"), 5);
    assert_eq!(receiver.hits("/ok").len(), 5);
}
