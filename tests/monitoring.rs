//! The shipped monitoring (grafana/): the alert rules pass `promtool check
//! rules` and their unit tests, and every query of the dashboard returns data
//! from a real Prometheus (Debian's `prometheus` package) that scrapes a real
//! `keyward serve` on a SoftHSM2 token under load.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Env, call, client, issue_device};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn grafana_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn promtool(args: &[&str]) -> Output {
    Command::new("promtool")
        .args(args)
        .current_dir(grafana_dir())
        .output()
        .expect("promtool (package prometheus) missing: run scripts/test.sh")
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let out = promtool(&["check", "rules", "alerts.yml"]);
    assert!(out.status.success(), "promtool check rules: {}", text(&out));
    assert!(text(&out).contains("SUCCESS"), "{}", text(&out));
    let out = promtool(&["test", "rules", "alerts.test.yml"]);
    assert!(out.status.success(), "promtool test rules: {}", text(&out));
    assert!(text(&out).contains("SUCCESS"), "{}", text(&out));
}

/// Every rule in alerts.yml has a firing case (a non-empty `exp_alerts`) and
/// a not-firing case (`exp_alerts: []`) in alerts.test.yml, a severity, a
/// summary, a description and a runbook anchor that docs/monitoring.md has,
/// so a rule cannot be added without its tests and docs. (Both files are
/// ours and regular: read line by line, no YAML parser needed.)
#[test]
fn every_alert_rule_has_a_firing_and_a_not_firing_test_and_a_runbook() {
    let rules = std::fs::read_to_string(grafana_dir().join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(grafana_dir().join("alerts.test.yml")).unwrap();
    let docs = common::repo_file("docs/monitoring.md");
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for (i, l) in lines.iter().enumerate() {
        if let Some(name) = l.strip_prefix("alertname:") {
            let name = name.trim().to_string();
            match lines.get(i + 1).copied() {
                Some("exp_alerts: []") => quiet.insert(name),
                Some("exp_alerts:") => fires.insert(name),
                other => panic!("{name}: unexpected line after alertname: {other:?}"),
            };
        }
    }
    let blocks: Vec<&str> = rules.split("- alert:").skip(1).collect();
    assert!(blocks.len() >= 10, "{} rules", blocks.len());
    for block in blocks {
        let name = block.lines().next().unwrap().trim();
        assert!(fires.contains(name), "{name}: no firing test");
        assert!(quiet.contains(name), "{name}: no not-firing test");
        for key in ["expr:", "summary:", "description:"] {
            assert!(block.contains(key), "{name}: {key} missing");
        }
        assert!(
            block.contains("severity: critical") || block.contains("severity: warning"),
            "{name}: no severity"
        );
        let anchor = format!(
            "runbook_url: \"docs/monitoring.md#{}\"",
            name.to_lowercase()
        );
        assert!(block.contains(&anchor), "{name}: no {anchor}");
        assert!(
            docs.lines().any(|l| l.trim() == format!("### {name}")),
            "{name}: no `### {name}` heading in docs/monitoring.md"
        );
    }
    for name in fires.iter().chain(&quiet) {
        assert!(
            rules.contains(&format!("- alert: {name}\n")),
            "alerts.test.yml tests {name}, which alerts.yml does not have"
        );
    }
}

/// One query target of a dashboard panel.
#[derive(Debug, Clone)]
struct Target {
    panel: String,
    expr: String,
}

/// Every target `expr` of every panel, rows' nested panels included.
fn dashboard_targets(dashboard: &Value) -> Vec<Target> {
    fn walk(panels: &Value, out: &mut Vec<Target>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(Target {
                    panel: p["title"].as_str().unwrap_or("?").to_string(),
                    expr: t["expr"].as_str().unwrap_or("").to_string(),
                });
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The dashboard's variables replaced as Grafana would with "All" selected:
/// `$__rate_interval`, `$__interval` and `$__range` by `1m`, any other
/// `$var`, `${var}` or `${var:format}` by `.*`.
fn substitute(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(inner) = after.strip_prefix('{') {
            let end = inner.find('}').expect("unclosed ${");
            let name = inner[..end].split(':').next().unwrap_or("");
            (name, end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        assert!(!name.is_empty(), "a bare `$` in {expr}");
        out.push_str(match name {
            "__rate_interval" | "__interval" | "__range" => "1m",
            _ => ".*",
        });
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// Runs `expr` as an instant query; `Err` says why it is not usable on a
/// panel: the query failed, or it returned no series.
async fn query_has_data(prometheus: &str, expr: &str) -> Result<usize, String> {
    let url =
        reqwest::Url::parse_with_params(&format!("{prometheus}/api/v1/query"), &[("query", expr)])
            .map_err(|e| format!("bad URL: {e}"))?;
    let resp = client()
        .get(url)
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.map_err(|e| format!("not JSON: {e}"))?;
    if status != 200 || body["status"] != "success" {
        return Err(format!(
            "query error (HTTP {status}): {} {}",
            body["errorType"], body["error"]
        ));
    }
    let n = match body["data"]["resultType"].as_str() {
        Some("vector" | "matrix") => body["data"]["result"].as_array().map_or(0, Vec::len),
        Some("scalar" | "string") => 1,
        other => return Err(format!("unexpected result type {other:?}")),
    };
    if n == 0 {
        return Err("no series".into());
    }
    Ok(n)
}

/// Runs every target (variables substituted) once; one line per query that
/// errors or returns no series, naming its panel (audit_* panels listed in
/// [`ALLOW_PENDING`] may be empty, not broken).
async fn check_targets(prometheus: &str, targets: &[Target]) -> Vec<String> {
    let mut failures = Vec::new();
    for t in targets {
        let expr = substitute(&t.expr);
        if let Err(why) = query_has_data(prometheus, &expr).await {
            let pending_ok = ALLOW_PENDING.contains(&t.panel.as_str()) && why == "no series";
            if !pending_ok {
                failures.push(format!("panel {:?}: {why}\n    {expr}", t.panel));
            }
        }
    }
    failures
}

/// Panels allowed to be empty (none: every panel must show data).
const ALLOW_PENDING: &[&str] = &[];

/// A free loopback port (bound, then released for the child to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `prometheus` server started by the test; stopped by its own PID.
struct Prometheus {
    child: Child,
    url: String,
}

impl Prometheus {
    fn start(dir: &Path, target: &str) -> Self {
        let port = free_port();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: keyward\n    static_configs:\n      - targets: ['{target}']\n",
                grafana_dir().join("alerts.yml").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (package prometheus) missing: run scripts/test.sh");
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn wait_ready(&mut self, log: &Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "prometheus exited ({status}): {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            if let Ok(r) = client().get(format!("{}/-/ready", self.url)).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "prometheus not ready in 60 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SIGTERM to its own PID, then wait; SIGKILL if it does not stop.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).output();
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An age identity and its recipients file (the stock `age-keygen`).
fn backup_recipients(dir: &Path) -> PathBuf {
    let id = dir.join("officer.age");
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&id)
        .output()
        .expect("age-keygen (package age) missing: run scripts/test.sh");
    assert!(out.status.success(), "{}", text(&out));
    let out = Command::new("age-keygen")
        .arg("-y")
        .arg(&id)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let recipients = dir.join("recipients.txt");
    std::fs::write(&recipients, &out.stdout).unwrap();
    recipients
}

/// Drives the load that gives every panel data: issuance, a renewal, a
/// revocation, a denial, a registration left pending, OCSP (a miss then a
/// hit), a backup stored at one location and failing at another, its
/// verification, and failed admin logins up to the rate limit.
async fn drive_load(env: &Env, url: &str, token: &str) {
    let mut devices = Vec::new();
    for i in 0..3 {
        devices.push(
            issue_device(
                url,
                token,
                &env.path(&format!("dev-{i}")),
                &format!("mon-{i}"),
            )
            .await,
        );
    }
    // A denial, and one registration left waiting for approval.
    for (name, deny) in [("mon-denied", true), ("mon-pending", false)] {
        let (csr, _) = common::openssl_csr(env.dir.path(), "ec");
        let (status, sub) = call(
            Method::POST,
            &format!("{url}/v1/registrations"),
            None,
            Some(json!({ "csr": csr, "name": name, "group": "default" })),
        )
        .await;
        assert_eq!(status, 201, "{sub}");
        if deny {
            let id = sub["id"].as_str().unwrap();
            let (status, v) = call(
                Method::POST,
                &format!("{url}/v1/admin/registrations/{id}/deny"),
                Some(token),
                Some(json!({ "comment": "not ours" })),
            )
            .await;
            assert_eq!(status, 200, "{v}");
        }
    }
    // A renewal the admin allows, made by the reference client.
    let renewed = &devices[0];
    let (status, v) = call(
        Method::POST,
        &format!("{url}/v1/admin/devices/{}/allow-renewal", renewed.device_id),
        Some(token),
        Some(json!({ "valid_for_hours": 1 })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let dir = renewed.cert.parent().unwrap();
    let out = env
        .keyward()
        .env("KEYWARD_URL", url)
        .args(["renew", "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "keyward renew: {}", text(&out));
    // A revocation.
    let (status, v) = call(
        Method::POST,
        &format!("{url}/v1/admin/devices/{}/revoke", devices[2].device_id),
        Some(token),
        Some(json!({ "reason": "key-compromise", "comment": "lost" })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // OCSP by the stock openssl client: the first answer is signed (miss),
    // the second comes from the cache (hit).
    let good = &devices[1];
    for _ in 0..2 {
        let out = Command::new("openssl")
            .args(["ocsp", "-no_nonce", "-noverify", "-issuer"])
            .arg(&good.chain)
            .arg("-cert")
            .arg(&good.cert)
            .args(["-url", &format!("{url}/v1/ocsp")])
            .output()
            .unwrap();
        assert!(
            out.status.success() && text(&out).contains(": good"),
            "openssl ocsp: {}",
            text(&out)
        );
    }
    // A backup: stored in the spool and at `nas`, failing at `offsite`.
    let (status, v) = call(
        Method::POST,
        &format!("{url}/v1/admin/backups"),
        Some(token),
        None,
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, b) = call(
            Method::GET,
            &format!("{url}/v1/admin/backups/{id}"),
            Some(token),
            None,
        )
        .await;
        assert_eq!(status, 200, "{b}");
        if b["status"] != "running" {
            assert_eq!(b["status"], "done", "{b}");
            break;
        }
        assert!(Instant::now() < deadline, "backup still running: {b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, v) = call(
        Method::POST,
        &format!("{url}/v1/admin/backups/latest/verify"),
        Some(token),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // Last, as it locks this source out of the admin API for the window:
    // wrong admin tokens until the failed-login limit refuses the source.
    let mut refused = false;
    for _ in 0..20 {
        let (status, _) = call(
            Method::GET,
            &format!("{url}/v1/admin/registrations"),
            Some("kw_not-an-admin-token"),
            None,
        )
        .await;
        assert!(matches!(status, 401 | 429), "{status}");
        if status == 429 {
            refused = true;
            break;
        }
    }
    assert!(refused, "wrong admin tokens were never rate limited");
}

#[tokio::test]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let dashboard: Value =
        serde_json::from_str(&common::repo_file("grafana/keyward-overview.json")).unwrap();
    let targets = dashboard_targets(&dashboard);
    assert!(targets.len() >= 20, "{} targets", targets.len());
    for t in &targets {
        assert!(!t.expr.trim().is_empty(), "panel {:?}: empty expr", t.panel);
    }
    for title in ALLOW_PENDING {
        let own: Vec<_> = targets.iter().filter(|t| t.panel == *title).collect();
        assert!(!own.is_empty(), "allow_pending names no panel {title:?}");
        for t in own {
            // Only audit_* panels may be pending: every metric they read
            // is keyward_audit_*.
            let names: Vec<&str> = t
                .expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("keyward_"))
                .collect();
            assert!(
                !names.is_empty() && names.iter().all(|n| n.starts_with("keyward_audit_")),
                "panel {title:?} reads non-audit metrics: {}",
                t.expr
            );
        }
    }

    // --- keyward serve on SoftHSM2, with backups to a directory and to an
    // S3 endpoint on a closed port (its failures feed the failure panels).
    let env = Env::new();
    let recipients = backup_recipients(env.dir.path());
    std::fs::write(env.path("s3.id"), "keyward").unwrap();
    std::fs::write(env.path("s3.key"), "keyward-secret-0123456789").unwrap();
    let closed = free_port();
    env.append_config(&format!(
        "[backup]\ndir = \"backups\"\nrecipients_files = [\"{}\"]\nretry_min_secs = 1\nretry_max_secs = 2\n\n\
         [[backup.locations]]\nname = \"nas\"\ntype = \"dir\"\npath = \"{}\"\n\n\
         [[backup.locations]]\nname = \"offsite\"\ntype = \"s3\"\nbucket = \"keyward-backups\"\n\
         endpoint = \"http://127.0.0.1:{closed}\"\nregion = \"us-east-1\"\nallow_http = true\ntimeout_secs = 5\n\
         access_key_id_file = \"s3.id\"\nsecret_access_key_file = \"s3.key\"\n",
        recipients.display(),
        env.path("nas").display(),
    ));
    let token = env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();
    let target = url
        .strip_prefix("http://")
        .expect("the test daemon serves plain HTTP")
        .trim_end_matches('/')
        .to_string();

    // --- prometheus scraping it every second.
    let prom_dir = tempfile::tempdir().unwrap();
    let mut prometheus = Prometheus::start(prom_dir.path(), &target);
    prometheus
        .wait_ready(&prom_dir.path().join("prometheus.log"))
        .await;

    drive_load(&env, &url, &token).await;

    // --- Every target must return data. Periodic gauges (key ages after
    // the first rotation tick, store summaries) need up to a minute or two:
    // poll until all are there, then report the ones that are not.
    let prom = prometheus.url.clone();
    let deadline = Instant::now() + Duration::from_secs(180);
    let failures = loop {
        let failures = check_targets(&prom, &targets).await;
        if failures.is_empty() || Instant::now() > deadline {
            break failures;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert!(
        failures.is_empty(),
        "{} dashboard queries are broken or empty:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // The checker itself: the same dashboard with one panel's query on a
    // metric nobody exports fails, naming that panel and only that one.
    let mut broken = dashboard.clone();
    let first = broken["panels"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p["title"] == "Key stores up")
        .unwrap();
    first["targets"][0]["expr"] =
        json!("min by (keystore) (keyward_hsm_upp{keystore=~\"$keystore\"})");
    let failures = check_targets(&prom, &dashboard_targets(&broken)).await;
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(
        failures[0].starts_with("panel \"Key stores up\": no series"),
        "{failures:?}"
    );
    // A query on an unknown metric, a misspelt label matcher value, and a
    // syntax error are each reported, not passed.
    for bad in [
        "sum(rate(keyward_no_such_metric_total[1m]))",
        "keyward_hsm_up{keystore=\"no-such-store\"}",
        "sum(rate(keyward_http_requests_total[1m])",
    ] {
        let got = query_has_data(&prom, bad).await;
        assert!(got.is_err(), "{bad} passed the checker: {got:?}");
    }
    // The real Prometheus loaded the shipped rules and evaluates every one
    // of them without error.
    let rules: Value = client()
        .get(format!("{prom}/api/v1/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert!(loaded.len() >= 10, "{rules}");
    for r in loaded {
        assert_eq!(
            r["health"], "ok",
            "rule {} failed to evaluate: {r}",
            r["name"]
        );
    }
    drop(prometheus);
    drop(daemon);
}

/// The names of the `$var` / `${var}` / `${var:format}` references in `expr`.
fn variables(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        let after = &rest[i + 1..];
        let name: String = after
            .trim_start_matches('{')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.push(name);
        rest = after;
    }
    out
}

/// What Grafana needs to load the dashboard and what the query test relies
/// on: every panel on the datasource variable, unique panel ids and refIds,
/// a layout inside 24 columns, and every variable a query uses defined (a
/// misspelt `$instnce` would otherwise be replaced by `.*` here and pass).
#[test]
fn dashboard_is_well_formed() {
    let d: Value =
        serde_json::from_str(&common::repo_file("grafana/keyward-overview.json")).unwrap();
    assert_eq!(d["uid"], "keyward-overview");
    assert!(
        d["schemaVersion"]
            .as_u64()
            .is_some_and(|v| (36..=41).contains(&v)),
        "{}",
        d["schemaVersion"]
    );
    let vars: Vec<&Value> = d["templating"]["list"].as_array().unwrap().iter().collect();
    let defined: BTreeSet<&str> = vars.iter().map(|v| v["name"].as_str().unwrap()).collect();
    let ds = vars
        .iter()
        .find(|v| v["name"] == "DS_PROMETHEUS")
        .expect("no DS_PROMETHEUS variable");
    assert_eq!(
        (ds["type"].as_str(), ds["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );
    for v in &vars {
        if v["type"] == "query" {
            assert_eq!(
                v["datasource"]["uid"], "${DS_PROMETHEUS}",
                "variable {}",
                v["name"]
            );
            for used in variables(v["definition"].as_str().unwrap()) {
                assert!(
                    defined.contains(used.as_str()),
                    "variable {} uses undefined ${used}",
                    v["name"]
                );
            }
        }
    }
    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    let panels = d["panels"].as_array().unwrap();
    assert!(panels.iter().filter(|p| p["type"] == "row").count() >= 9);
    for p in panels {
        let title = p["title"].as_str().unwrap();
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate panel id in {title:?}"
        );
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "{title:?} is wider than the grid"
        );
        if p["type"] == "row" {
            continue;
        }
        assert!(titles.insert(title), "two panels titled {title:?}");
        assert!(
            p["description"].as_str().is_some_and(|s| !s.is_empty()),
            "{title:?}: no description"
        );
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{title:?}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title:?}: no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(
                refs.insert(t["refId"].as_str().unwrap()),
                "{title:?}: duplicate refId"
            );
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title:?}");
            let expr = t["expr"].as_str().unwrap();
            for used in variables(expr) {
                assert!(
                    defined.contains(used.as_str())
                        || ["__rate_interval", "__interval", "__range"].contains(&used.as_str()),
                    "{title:?} uses undefined ${used}: {expr}"
                );
            }
        }
    }
    // The dashboard provider serves the file from where the README installs it.
    let provider =
        std::fs::read_to_string(grafana_dir().join("provisioning/dashboards/keyward.yml")).unwrap();
    assert!(
        provider.contains("type: file")
            && provider.contains("path: /var/lib/grafana/dashboards/keyward")
    );
    let readme = std::fs::read_to_string(grafana_dir().join("README.md")).unwrap();
    assert!(readme.contains("/var/lib/grafana/dashboards/keyward/"));
}

#[test]
fn variables_are_substituted_like_grafana_with_all_selected() {
    assert_eq!(
        substitute(
            r#"rate(x{instance=~"$instance",ca=~"${ca}",k=~"${keystore:regex}"}[$__rate_interval])"#
        ),
        r#"rate(x{instance=~".*",ca=~".*",k=~".*"}[1m])"#
    );
    let d = json!({"panels": [
        {"type": "row", "title": "r", "panels": [{"title": "nested", "targets": [{"expr": "a"}]}]},
        {"title": "top", "targets": [{"expr": "b"}, {"expr": "c"}]}
    ]});
    let got: Vec<(String, String)> = dashboard_targets(&d)
        .into_iter()
        .map(|t| (t.panel, t.expr))
        .collect();
    assert_eq!(
        variables("rate(a{x=~\"$instance\",y=~\"${ca:regex}\"}[$__rate_interval])"),
        ["instance", "ca", "__rate_interval"]
    );
    assert_eq!(
        got,
        [("nested", "a"), ("top", "b"), ("top", "c")].map(|(a, b)| (a.to_string(), b.to_string()))
    );
}
