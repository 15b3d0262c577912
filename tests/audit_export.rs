//! Audit reports, the signed export and the live sink, against a real
//! `keyward serve` on a SoftHSM2 token.
//!
//! - `GET /v1/admin/audit` filters (time, actor, action exact and `prefix.*`,
//!   target), pages by keyset without repeats or gaps, and refuses bad input
//!   with 400; `keyward audit report` follows pages.
//! - `keyward audit export` writes JSON lines closed by a checkpoint signed
//!   in the HSM; the procedure in docs/audit.md ("Exporting to a SIEM"),
//!   run as written with sh, jq, sha256sum, base64 and openssl, accepts it,
//!   fails on an edited line (digest) and on an edited checkpoint (openssl
//!   "Verification failure").
//! - `[audit.sink]`: a file sink holds each event once its change returns;
//!   `fail-closed` on /dev/full refuses the change (nothing written);
//!   `buffer` lets it through, shows it in metrics and delivers once the
//!   sink recovers; syslog over UDP gets RFC 5424 messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Env, add_admin, call, metrics_text};
use reqwest::Method;
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

fn head_seq(env: &Env) -> i64 {
    let c = rusqlite::Connection::open(&env.db).unwrap();
    c.query_row("SELECT COALESCE(MAX(seq), 0) FROM audit_events", [], |r| {
        r.get(0)
    })
    .unwrap()
}

/// Every stored event after `after`, as the store holds it.
fn events_after(env: &Env, after: i64) -> Vec<keyward::audit::AuditEvent> {
    let store = keyward::store::sqlite::SqliteStore::open_read_only(&env.db).unwrap();
    futures_block(async move {
        use keyward::store::Store;
        store
            .audit_events(keyward::store::AuditQuery {
                from_seq: after + 1,
                limit: 100_000,
            })
            .await
            .unwrap()
    })
}

fn futures_block<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .join()
    .unwrap()
}

async fn invite(url: &str, token: &str, name: &str) -> (u16, Value) {
    call(
        Method::POST,
        &format!("{url}/v1/admin/invitations"),
        Some(token),
        Some(json!({ "name": name, "role": "auditor" })),
    )
    .await
}

async fn get(url: &str, token: Option<&str>, path: &str) -> (u16, Value) {
    call(Method::GET, &format!("{url}{path}"), token, None).await
}

fn seqs(v: &Value) -> Vec<i64> {
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn reports_filter_page_and_refuse_bad_input() {
    let env = Env::new();
    let root = env.init();
    let d = env.serve();
    let url = &d.url;
    let carol = add_admin(url, &root, "carol", "auditor").await;
    for i in 0..3 {
        let (s, v) = invite(url, &root, &format!("inv-{i}")).await;
        assert_eq!(s, 201, "{v}");
    }
    let head = head_seq(&env);

    // Everything, newest first.
    let (s, all) = get(url, Some(&root), "/v1/admin/audit?limit=1000").await;
    assert_eq!(s, 200, "{all}");
    let all_seqs = seqs(&all);
    assert_eq!(all_seqs.len() as i64, head);
    assert!(all_seqs.windows(2).all(|w| w[0] > w[1]), "{all_seqs:?}");
    assert!(all.get("next_cursor").is_none());

    // Keyset pages of 2 in both orders: the same events, no repeats.
    for order in ["newest", "oldest"] {
        let mut got = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(a) => format!("/v1/admin/audit?limit=2&order={order}&after={a}"),
                None => format!("/v1/admin/audit?limit=2&order={order}"),
            };
            let (s, v) = get(url, Some(&root), &path).await;
            assert_eq!(s, 200, "{v}");
            got.extend(seqs(&v));
            match v["next_cursor"].as_str() {
                Some(c) => after = Some(c.to_string()),
                None => break,
            }
        }
        let mut want = all_seqs.clone();
        if order == "oldest" {
            want.reverse();
        }
        assert_eq!(got, want, "{order}");
    }

    // Exact action, prefix action, actor, target.
    let (_, v) = get(url, Some(&root), "/v1/admin/audit?action=admin.invite").await;
    let n_invites = v["items"].as_array().unwrap().len();
    assert!(n_invites >= 4, "{v}");
    assert!(
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["action"] == "admin.invite")
    );
    let (_, v) = get(url, Some(&root), "/v1/admin/audit?action=admin.*").await;
    let items = v["items"].as_array().unwrap();
    assert!(items.len() > n_invites, "{v}");
    assert!(
        items
            .iter()
            .all(|e| e["action"].as_str().unwrap().starts_with("admin."))
    );
    let newest = &all["items"][0];
    let actor = newest["actor"].as_str().unwrap();
    let (_, v) = get(
        url,
        Some(&root),
        &format!("/v1/admin/audit?actor={}", urlencode(actor)),
    )
    .await;
    assert!(!v["items"].as_array().unwrap().is_empty());
    assert!(
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"] == actor)
    );
    let target = newest["target"].as_str().unwrap();
    let (_, v) = get(
        url,
        Some(&root),
        &format!("/v1/admin/audit?target={}", urlencode(target)),
    )
    .await;
    assert!(
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["target"] == target)
    );
    assert!(seqs(&v).contains(&newest["seq"].as_i64().unwrap()));

    // Time bounds: RFC 3339 and Unix seconds; the newest event's time.
    let at_ms = newest["at_ms"].as_i64().unwrap();
    let (_, v) = get(
        url,
        Some(&root),
        &format!("/v1/admin/audit?since={}", at_ms / 1000),
    )
    .await;
    assert!(seqs(&v).contains(&newest["seq"].as_i64().unwrap()));
    assert!(
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["at_ms"].as_i64().unwrap() >= at_ms / 1000 * 1000)
    );
    let (_, v) = get(
        url,
        Some(&root),
        "/v1/admin/audit?until=2000-01-01T00:00:00Z",
    )
    .await;
    assert!(v["items"].as_array().unwrap().is_empty(), "{v}");
    let (_, v) = get(
        url,
        Some(&root),
        "/v1/admin/audit?since=2999-01-01T00:00:00Z",
    )
    .await;
    assert!(v["items"].as_array().unwrap().is_empty(), "{v}");

    // Auditors read reports too (role auditor); no token: 401.
    let (s, v) = get(url, Some(&carol), "/v1/admin/audit?limit=5").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), 5);
    assert!(v["items"][0].get("reveal_error").is_none());
    let (s, _) = get(url, None, "/v1/admin/audit").await;
    assert_eq!(s, 401);

    // A sealed event (written here beside the daemon, as the detail
    // encryption does): other roles see it redacted; an auditor gets it
    // opened, or redacted with the reason when it cannot be opened.
    let db = env.db.clone();
    futures_block(async move {
        use keyward::store::Store;
        let store = keyward::store::sqlite::SqliteStore::open(
            &db,
            1,
            std::sync::Arc::new(keyward::clock::SystemClock),
        )
        .unwrap();
        let mut draft = keyward::audit::AuditDraft::new("system", "test.sealed", "t-sealed");
        draft.sealed = Some("v1:ciphertext".into());
        store
            .commit(keyward::store::Change::new().audit(draft))
            .await
            .unwrap();
    });
    let (s, v) = get(url, Some(&root), "/v1/admin/audit?target=t-sealed").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["items"][0]["sealed"], "redacted", "{v}");
    assert!(v["items"][0].get("reveal_error").is_none(), "{v}");
    let (s, v) = get(url, Some(&carol), "/v1/admin/audit?target=t-sealed").await;
    assert_eq!(s, 200, "{v}");
    let item = &v["items"][0];
    if item.get("reveal_error").is_some() {
        assert_eq!(item["sealed"], "redacted", "{v}");
        assert!(item["reveal_error"]["code"].is_string(), "{v}");
    } else {
        assert!(item.get("sealed").is_none(), "opened for the auditor: {v}");
    }
    let head = head_seq(&env);

    // Bad input: 400 invalid_query, and nothing is written.
    for bad in [
        "limit=0",
        "limit=1001",
        "after=abc",
        "after=-3",
        "since=yesterday",
        "until=2026-13-01T00:00:00Z",
        "since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
        "action=a*",
        "action=*",
        "action=key.*.x",
        "action=.*",
        "order=sideways",
        "bogus=1",
    ] {
        let (s, v) = get(url, Some(&root), &format!("/v1/admin/audit?{bad}")).await;
        assert_eq!(s, 400, "{bad}: {v}");
        assert_eq!(v["error"]["code"], "invalid_query", "{bad}: {v}");
    }
    assert_eq!(head_seq(&env), head, "reports write nothing");

    // The CLI follows pages (--limit 3 of them at most).
    let out = env
        .keyward()
        .env("KEYWARD_URL", url)
        .env("KEYWARD_TOKEN", &carol)
        .args(["audit", "report", "--action", "admin.*", "--output", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli["items"].as_array().unwrap().len(), items.len());
    let out = env
        .keyward()
        .env("KEYWARD_URL", url)
        .env("KEYWARD_TOKEN", &carol)
        .args(["audit", "report", "--limit", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("more: repeat with --after"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env
        .keyward()
        .env("KEYWARD_URL", url)
        .env("KEYWARD_TOKEN", &carol)
        .args(["audit", "report", "--action", "x*"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_query"));
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            o => format!("%{o:02X}"),
        })
        .collect()
}

/// The verification script of docs/audit.md, "Exporting to a SIEM", as shipped.
fn doc_script() -> String {
    let doc = common::repo_file("docs/audit.md");
    let start = doc
        .find("<!-- verify-export.sh -->")
        .expect("docs/audit.md marks the verification script");
    let rest = &doc[start..];
    let open = rest.find("```sh\n").unwrap() + "```sh\n".len();
    let close = rest[open..].find("```").unwrap();
    rest[open..open + close].to_string()
}

/// Runs the documented procedure in `dir` on `export` with `pem`.
fn run_doc_procedure(dir: &Path, export: &Path, pem: &Path) -> std::process::Output {
    let script = dir.join("verify-export.sh");
    std::fs::write(&script, doc_script()).unwrap();
    std::process::Command::new("sh")
        .arg(&script)
        .arg(export)
        .arg(pem)
        .current_dir(dir)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_export_verifies_with_openssl_and_catches_edits() {
    let env = Env::new();
    let root = env.init();
    let d = env.serve();
    let url = &d.url;
    let carol = add_admin(url, &root, "carol", "auditor").await;
    for i in 0..5 {
        assert_eq!(invite(url, &root, &format!("inv-{i}")).await.0, 201);
    }
    let head = head_seq(&env);

    let export = env.path("export.jsonl");
    let out = env
        .keyward()
        .env("KEYWARD_URL", url)
        .env("KEYWARD_TOKEN", &carol)
        .args(["audit", "export", "--out", export.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("exported {head} events")));

    // Every line but the last is a stored event, byte-identical in meaning
    // and with a chain hash that recomputes.
    let text = std::fs::read_to_string(&export).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len() as i64, head + 1);
    let stored = events_after(&env, 0);
    for (line, want) in lines.iter().zip(&stored) {
        let e: keyward::audit::AuditEvent = serde_json::from_str(line).unwrap();
        assert_eq!(&e, want);
        assert_eq!(e.expected_hash(), e.hash);
    }
    let cp: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(cp["type"], "export-checkpoint");
    assert_eq!(cp["from_seq"], 1);
    assert_eq!(cp["to_seq"], head);
    assert_eq!(cp["events"], head);
    assert_eq!(cp["head_hash"], hex::encode(&stored.last().unwrap().hash));
    assert!(
        cp["message"]
            .as_str()
            .unwrap()
            .starts_with("keyward-audit-export-v1\n")
    );

    // The public key as an operator hands it over.
    let pem = env.path("audit.pub.pem");
    let out = env.run(&[
        "audit",
        "public-key",
        "--config",
        env.config.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&pem, &out.stdout).unwrap();

    let work = env.path("verify");
    std::fs::create_dir_all(&work).unwrap();
    let ok = run_doc_procedure(&work, &export, &pem);
    let ok_out =
        String::from_utf8_lossy(&ok.stdout).to_string() + &String::from_utf8_lossy(&ok.stderr);
    assert!(ok.status.success(), "{ok_out}");
    assert!(ok_out.contains("Verified OK"), "{ok_out}");
    assert!(ok_out.contains("export intact"), "{ok_out}");

    // One event line changed: the signature still verifies (the checkpoint
    // is untouched) but the digest does not match.
    let edited = env.path("edited.jsonl");
    let mut bad = lines.clone();
    let changed = bad[1].replacen("\"outcome\":\"success\"", "\"outcome\":\"failure\"", 1);
    assert_ne!(changed, bad[1]);
    bad[1] = &changed;
    std::fs::write(&edited, bad.join("\n") + "\n").unwrap();
    let r = run_doc_procedure(&work, &edited, &pem);
    let r_out =
        String::from_utf8_lossy(&r.stdout).to_string() + &String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "{r_out}");
    assert!(r_out.contains("lines_sha256 does not match"), "{r_out}");

    // A line removed: the digest fails too.
    let cut = env.path("cut.jsonl");
    let mut fewer = lines.clone();
    fewer.remove(2);
    std::fs::write(&cut, fewer.join("\n") + "\n").unwrap();
    let r = run_doc_procedure(&work, &cut, &pem);
    assert!(!r.status.success());

    // The checkpoint's signed text changed (a forger claims fewer events
    // and a digest of their own): openssl refuses the signature.
    let forged = env.path("forged.jsonl");
    let mut cp2 = cp.clone();
    let msg = cp["message"].as_str().unwrap().replacen(
        &format!("to_seq={head}\n"),
        &format!("to_seq={}\n", head - 1),
        1,
    );
    assert_ne!(msg, cp["message"].as_str().unwrap());
    cp2["message"] = Value::String(msg);
    let mut f = lines[..lines.len() - 1].to_vec();
    let cp2_line = cp2.to_string();
    f.push(&cp2_line);
    std::fs::write(&forged, f.join("\n") + "\n").unwrap();
    let r = run_doc_procedure(&work, &forged, &pem);
    let r_out =
        String::from_utf8_lossy(&r.stdout).to_string() + &String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "{r_out}");
    assert!(r_out.contains("Verification failure"), "{r_out}");

    // A time-bounded export: only events in range, bounds signed.
    let future = env.path("future.jsonl");
    let out = env
        .keyward()
        .env("KEYWARD_URL", url)
        .env("KEYWARD_TOKEN", &carol)
        .args([
            "audit",
            "export",
            "--since",
            "2999-01-01T00:00:00Z",
            "--out",
            future.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = std::fs::read_to_string(&future).unwrap();
    assert_eq!(t.lines().count(), 1, "{t}");
    let cp: Value = serde_json::from_str(t.trim()).unwrap();
    assert_eq!(cp["events"], 0);
    assert!(
        cp["message"]
            .as_str()
            .unwrap()
            .contains("\nsince_ms=32472144000000\n")
    );
    let r = run_doc_procedure(&work, &future, &pem);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    // Bad input through the CLI: refused, no file left behind.
    let never = env.path("never.jsonl");
    let out = env
        .keyward()
        .env("KEYWARD_URL", url)
        .env("KEYWARD_TOKEN", &carol)
        .args([
            "audit",
            "export",
            "--since",
            "never",
            "--out",
            never.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_query"));
    assert!(!never.exists());

    // Bad input: 400 and no file content from the daemon.
    let (s, v) = get(url, Some(&carol), "/v1/admin/audit/export?since=never").await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = get(url, Some(&carol), "/v1/admin/audit/export?actor=x").await;
    assert_eq!(s, 400, "{v}");
    let (s, _) = get(url, None, "/v1/admin/audit/export").await;
    assert_eq!(s, 401);
    assert_eq!(head_seq(&env), head, "exports write nothing");

    // A trail that no longer verifies is never signed by the HSM: the
    // export ends without its signed line and the CLI keeps no file.
    let c = rusqlite::Connection::open(&env.db).unwrap();
    c.execute_batch(
        "DROP TRIGGER audit_events_no_update; UPDATE audit_events SET target = 'forged' WHERE seq = 2;",
    )
    .unwrap();
    drop(c);
    let forged = env.path("forged.jsonl");
    let out = env
        .keyward()
        .env("KEYWARD_URL", url)
        .env("KEYWARD_TOKEN", &carol)
        .args(["audit", "export", "--out", forged.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an edited trail was exported: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!forged.exists());
}

fn sink_lines(path: &Path) -> Vec<keyward::audit::AuditEvent> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn file_sink_holds_each_event_when_its_change_returns() {
    let env = Env::new();
    let root = env.init();
    env.append_config(
        "[audit.sink]\ntype = \"file\"\npath = \"audit-sink.jsonl\"\npolicy = \"fail-closed\"\n",
    );
    let before = head_seq(&env);
    let d = env.serve();
    for i in 0..4 {
        let (s, v) = invite(&d.url, &root, &format!("inv-{i}")).await;
        assert_eq!(s, 201, "{v}");
        // Fail-closed: written and fsynced before the change committed.
        let sink = sink_lines(&env.path("audit-sink.jsonl"));
        assert_eq!(sink.last().unwrap().seq, head_seq(&env));
    }
    let sink = sink_lines(&env.path("audit-sink.jsonl"));
    let stored = events_after(&env, before);
    assert_eq!(sink, stored, "the sink holds exactly the committed events");
    let m = metrics_text(&d.url).await;
    assert!(
        !m.contains("audit_sink_failures_total{sink=\"file\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_closed_sink_that_cannot_write_refuses_the_change() {
    let env = Env::new();
    let root = env.init();
    // A sink that cannot write from the start: the daemon's own start-up
    // changes are refused, so it does not start.
    let good = "[audit.sink]\ntype = \"file\"\npath = \"sink.jsonl\"\npolicy = \"fail-closed\"\n";
    let config = std::fs::read_to_string(&env.config).unwrap();
    env.append_config(&good.replace("sink.jsonl", "/dev/full"));
    let before_counts = env.counts();
    let out = env
        .keyward()
        .args(["serve", "--config", env.config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("audit sink"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.counts(), before_counts, "nothing changed");

    // A sink that fails once the daemon runs: its path now leads to /dev/full (ENOSPC).
    std::fs::write(&env.config, &config).unwrap();
    env.append_config(good);
    let d = env.serve();
    let before_counts = env.counts();
    let before = head_seq(&env);
    let sink = env.path("sink.jsonl");
    let held = sink_lines(&sink);
    assert_eq!(held.last().unwrap().seq, before);
    std::fs::rename(&sink, env.path("sink.jsonl.1")).unwrap();
    std::os::unix::fs::symlink("/dev/full", &sink).unwrap();
    let (s, v) = invite(&d.url, &root, "dora").await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "audit_sink_failed", "{v}");
    assert_eq!(head_seq(&env), before, "no event");
    assert_eq!(env.counts(), before_counts, "nothing changed");
    let c = rusqlite::Connection::open(&env.db).unwrap();
    let n: i64 = c
        .query_row("SELECT COUNT(*) FROM admin_requests", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0, "no invitation stored");
    let m = metrics_text(&d.url).await;
    assert!(
        metric(&m, "keyward_audit_sink_failures_total{sink=\"file\"}") >= 1.0,
        "{m}"
    );

    // The sink back (a fresh file, as after log rotation): changes go through.
    std::fs::remove_file(&sink).unwrap();
    let (s, v) = invite(&d.url, &root, "dora").await;
    assert_eq!(s, 201, "{v}");
    let fresh = sink_lines(&sink);
    assert_eq!(fresh, events_after(&env, before));
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn buffer_sink_commits_and_delivers_once_the_sink_recovers() {
    let env = Env::new();
    let root = env.init();
    // The sink's directory does not exist yet: every write fails.
    env.append_config(
        "[audit.sink]\ntype = \"file\"\npath = \"sinkdir/audit.jsonl\"\npolicy = \"buffer\"\nbuffer_max = 1000\n",
    );
    let before = head_seq(&env);
    let d = env.serve();
    for i in 0..3 {
        let (s, v) = invite(&d.url, &root, &format!("inv-{i}")).await;
        assert_eq!(s, 201, "{v}");
    }
    let head = head_seq(&env);
    assert!(head > before);
    let m = metrics_text(&d.url).await;
    assert!(metric(&m, "keyward_audit_sink_buffered") > 0.0, "{m}");
    assert!(
        metric(&m, "keyward_audit_sink_failures_total{sink=\"file\"}") >= 1.0,
        "{m}"
    );

    // The sink comes back: everything is delivered, in order, once.
    std::fs::create_dir(env.path("sinkdir")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got = sink_lines(&env.path("sinkdir/audit.jsonl"));
        if got.last().is_some_and(|e| e.seq >= head) {
            assert_eq!(got, events_after(&env, before));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the buffered events were not delivered: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The gauge follows right after the write.
    loop {
        let m = metrics_text(&d.url).await;
        if metric(&m, "keyward_audit_sink_buffered") == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn syslog_sink_sends_rfc5424_over_udp() {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let port = sock.local_addr().unwrap().port();
    let env = Env::new();
    let root = env.init();
    env.append_config(&format!(
        "[audit.sink]\ntype = \"syslog\"\naddress = \"127.0.0.1:{port}\"\npolicy = \"fail-closed\"\n"
    ));
    let before = head_seq(&env);
    let d = env.serve();
    let (s, v) = invite(&d.url, &root, "erin").await;
    assert_eq!(s, 201, "{v}");
    let stored = events_after(&env, before);
    assert!(!stored.is_empty());
    let re = regex_parts;
    let mut got = Vec::new();
    while got.len() < stored.len() {
        let mut buf = vec![0u8; 65536];
        let n = sock.recv(&mut buf).expect("a syslog datagram");
        let msg = String::from_utf8(buf[..n].to_vec()).unwrap();
        let (pri, version, ts, host, app, procid, msgid, sd, body) = re(&msg);
        assert!(pri == 110 || pri == 109, "{msg}");
        assert_eq!(version, "1", "{msg}");
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| panic!("timestamp in {msg}"));
        assert!(!host.is_empty() && host.is_ascii());
        assert_eq!(app, "keyward");
        assert!(procid.parse::<u32>().is_ok(), "{msg}");
        assert_eq!(sd, "-");
        let e: keyward::audit::AuditEvent = serde_json::from_str(body).unwrap();
        assert_eq!(msgid, e.action);
        got.push(e);
    }
    assert_eq!(got, stored);
}

/// Splits `<PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG`.
#[allow(clippy::type_complexity)]
fn regex_parts(msg: &str) -> (u32, &str, &str, &str, &str, &str, &str, &str, &str) {
    let rest = msg.strip_prefix('<').unwrap();
    let (pri, rest) = rest.split_once('>').unwrap();
    let mut it = rest.splitn(8, ' ');
    let mut next = || it.next().unwrap();
    let (v, ts, host, app, procid, msgid, sd, body) = (
        next(),
        next(),
        next(),
        next(),
        next(),
        next(),
        next(),
        next(),
    );
    (
        pri.parse().unwrap(),
        v,
        ts,
        host,
        app,
        procid,
        msgid,
        sd,
        body,
    )
}
