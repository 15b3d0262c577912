//! Hostile input bounded, against a real `keyward serve`: metric series that
//! made-up methods and paths cannot grow, per-source rate limits, aggregated
//! login-failure audit, background jobs, cached readiness, keyset pagination
//! through the real CLI, and the pending cap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Env, call, client, metrics_text, promtool_check};

/// The `keyward_http_*` sample lines of an exposition.
fn http_series(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("keyward_http_"))
        .map(|l| l.rsplit_once(' ').map(|(s, _)| s).unwrap_or(l).to_string())
        .collect()
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
    assert!(
        added.len() <= 8,
        "200 made-up requests added {} series: {added:#?}",
        added.len()
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
