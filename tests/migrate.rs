//! `keyward migrate --from sqlite: --to postgres:`: a real daemon's store
//! (admins, registrations, approvals, issuance, revocation, a CRL, signed
//! audit checkpoints) moved into a fresh PostgreSQL database; row counts and
//! every audit event compared through `psql`, the chain recomputed by an
//! independent Python script; every refusal leaves the target as it was.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/postgres.rs"]
mod postgres;

use common::{Env, add_admin, call, issue_device, keyward_bin};
use keyward::store::Store as _;
use keyward::store::snapshot::{SnapshotInfo, SnapshotSink};
use postgres::TestDb;
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every snapshotted table (the SQLite exporter's order).
fn tables() -> Vec<&'static str> {
    keyward::store::postgres::snapshot::TABLE_ORDER
        .iter()
        .copied()
        .filter(|t| !keyward::store::snapshot::NOT_SNAPSHOTTED.contains(t))
        .collect()
}

fn migrate(args: &[&str]) -> Output {
    Command::new(keyward_bin())
        .arg("migrate")
        .args(args)
        .env_remove("KEYWARD_PG_PASSWORD")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sqlite_count(db: &Path, table: &str) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row(&format!("SELECT COUNT(*) FROM \"{table}\""), [], |r| {
        r.get(0)
    })
    .unwrap()
}

/// Every audit event of the SQLite file as JSON arrays (hashes hex), the
/// details text as stored.
fn sqlite_events(db: &Path) -> Vec<Value> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut stmt = c
        .prepare(
            "SELECT seq, at_ms, actor, action, target, outcome, details, hex(prev_hash), hex(hash), version, source, sealed
             FROM audit_events ORDER BY seq",
        )
        .unwrap();
    stmt.query_map([], |r| {
        Ok(json!([
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, String>(5)?,
            r.get::<_, String>(6)?,
            r.get::<_, String>(7)?.to_lowercase(),
            r.get::<_, String>(8)?.to_lowercase(),
            r.get::<_, i64>(9)?,
            r.get::<_, Option<String>>(10)?,
            r.get::<_, Option<String>>(11)?,
        ]))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// The same, read by `psql` from PostgreSQL.
fn pg_events(db: &TestDb) -> Vec<Value> {
    let out = db.psql(
        "SELECT COALESCE(json_agg(json_build_array(seq, at_ms, actor, action, target, outcome, details,
                encode(prev_hash, 'hex'), encode(hash, 'hex'), version, source, sealed) ORDER BY seq), '[]')
         FROM audit_events",
    );
    serde_json::from_str::<Vec<Value>>(&out).unwrap()
}

/// Recomputes the chain from `psql` output with Python's hashlib and json:
/// SHA-256(prev_hash ‖ canonical JSON of the other fields), the canonical
/// form being {v, seq, at_ms, actor, action, target, outcome, details,
/// source?, sealed?} compact, with the stored details text verbatim.
/// Prints `ok <n>` or the first broken seq.
fn python_verify(db: &TestDb) -> String {
    let dump = pg_events(db);
    let script = r#"
import hashlib, json, sys
events = json.load(sys.stdin)
prev = bytes(32)
expected_seq = 1
for e in events:
    seq, at_ms, actor, action, target, outcome, details, prev_hex, hash_hex, v, source, sealed = e
    if seq != expected_seq:
        print("gap at", expected_seq); sys.exit(0)
    if bytes.fromhex(prev_hex) != prev:
        print("prev_hash broken at", seq); sys.exit(0)
    d = lambda x: json.dumps(x, ensure_ascii=False, separators=(",", ":"))
    body = '{"v":%d,"seq":%d,"at_ms":%d,"actor":%s,"action":%s,"target":%s,"outcome":%s,"details":%s' % (
        v, seq, at_ms, d(actor), d(action), d(target), d(outcome), details)
    if source is not None: body += ',"source":' + d(source)
    if sealed is not None: body += ',"sealed":' + d(sealed)
    body += '}'
    h = hashlib.sha256(prev + body.encode()).digest()
    if h.hex() != hash_hex:
        print("hash broken at", seq); sys.exit(0)
    prev = h
    expected_seq += 1
print("ok", len(events))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(serde_json::to_string(&dump).unwrap().as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Tables of the target's schema (`public`), sorted.
fn pg_tables(db: &TestDb) -> String {
    db.psql("SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public'")
}

/// Table → (columns, JSON lines).
type Lines = BTreeMap<String, (Vec<String>, Vec<String>)>;

/// A snapshot sink that keeps every table's lines, and the table order.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Lines>>, Arc<Mutex<Vec<String>>>);

impl SnapshotSink for Collect {
    fn table(&mut self, table: &str, columns: &[String]) -> std::io::Result<()> {
        self.1.lock().unwrap().push(table.to_string());
        self.0
            .lock()
            .unwrap()
            .insert(table.to_string(), (columns.to_vec(), Vec::new()));
        Ok(())
    }

    fn rows(&mut self, table: &str, jsonl: Vec<u8>, rows: u64) -> std::io::Result<()> {
        let text = String::from_utf8(jsonl).unwrap();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        assert_eq!(lines.len() as u64, rows);
        self.0
            .lock()
            .unwrap()
            .get_mut(table)
            .unwrap()
            .1
            .extend(lines);
        Ok(())
    }
}

async fn pg_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_sqlite_deployment_moves_to_postgres_with_its_chain() {
    let env = Env::new();
    env.append_config("[audit]\ncheckpoint_every_events = 3\ncheckpoint_interval_secs = 2\n");
    let root = env.init();
    let mut daemon = env.serve();
    let url = daemon.url.clone();
    let alice = add_admin(&url, &root, "alice", "approver").await;
    let _carol = add_admin(&url, &root, "carol", "auditor").await;
    let mut devices = Vec::new();
    for i in 0..3 {
        devices.push(
            issue_device(
                &url,
                &alice,
                &env.path(&format!("dev{i}")),
                &format!("dev-{i}"),
            )
            .await,
        );
    }
    // A denied registration.
    let (csr, _) = common::openssl_csr(env.dir.path(), "ec");
    let (s, sub) = call(
        Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(json!({ "csr": csr, "name": "denied", "group": "default" })),
    )
    .await;
    assert_eq!(s, 201, "{sub}");
    let (s, v) = call(
        Method::POST,
        &format!(
            "{url}/v1/admin/registrations/{}/deny",
            sub["id"].as_str().unwrap()
        ),
        Some(&alice),
        Some(json!({ "comment": "not ours" })),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    // A revocation and a CRL that lists it.
    let (s, v) = call(
        Method::POST,
        &format!("{url}/v1/admin/devices/{}/revoke", devices[0].device_id),
        Some(&root),
        Some(json!({ "reason": "key-compromise" })),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = call(
        Method::POST,
        &format!("{url}/v1/admin/cas/devices/crl"),
        Some(&root),
        None,
    )
    .await;
    assert!(s == 200 || s == 201, "{s} {v}");
    // Signed checkpoints (every 3 events or 2 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    while sqlite_count(&env.db, "audit_checkpoints") < 2 {
        assert!(
            Instant::now() < deadline,
            "no audit checkpoints were signed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // While the daemon runs, the migration is refused and writes nothing.
    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    let from = format!("sqlite:{}", env.db.display());
    let to = format!("postgres:{}", db.url);
    let out = migrate(&["--from", &from, "--to", &to]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop every `keyward serve`"),
        "{}",
        text(&out)
    );
    assert_eq!(pg_tables(&db), "");

    assert!(daemon.stop().success());
    // A broker outbox row in the source (its identity sequence must move on
    // in the target): the daemon here has no broker, so it is added as a
    // broker-enabled daemon would have left it.
    {
        let c = rusqlite::Connection::open(&env.db).unwrap();
        c.execute(
            "INSERT INTO broker_outbox (id, device_id, op, rules, created_at, attempts, next_attempt_at)
             VALUES (41, ?1, 'revoke', NULL, 1, 0, 1)",
            [&devices[0].device_id],
        )
        .unwrap();
    }
    let source_events = sqlite_events(&env.db);
    let source_counts: BTreeMap<&str, i64> = tables()
        .into_iter()
        .map(|t| (t, sqlite_count(&env.db, t)))
        .collect();
    for t in [
        "keys",
        "cas",
        "admins",
        "registrations",
        "approvals",
        "devices",
        "certificates",
        "crls",
        "audit_checkpoints",
        "broker_outbox",
    ] {
        assert!(
            source_counts[t] > 0,
            "the source has no {t}: the test would prove little"
        );
    }

    let started = Instant::now();
    let out = migrate(&["--from", &from, "--to", &to]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{stdout}migrate took {took:?}");
    assert!(
        stdout.contains("store.migrated recorded as seq"),
        "{stdout}"
    );

    // Row counts, table by table, as psql sees them.
    for t in tables() {
        let n: i64 = db
            .psql(&format!("SELECT COUNT(*) FROM {t}"))
            .parse()
            .unwrap();
        let want = source_counts[t] + i64::from(t == "audit_events");
        assert_eq!(n, want, "table {t}");
    }
    // Every event byte-identical, then exactly one more: store.migrated.
    let target_events = pg_events(&db);
    assert_eq!(target_events.len(), source_events.len() + 1);
    assert_eq!(&target_events[..source_events.len()], &source_events[..]);
    let last = target_events.last().unwrap();
    let head = source_events.last().unwrap();
    assert_eq!(last[0], json!(head[0].as_i64().unwrap() + 1));
    assert_eq!(last[2], "cli:migrate");
    assert_eq!(last[3], "store.migrated");
    assert_eq!(last[7], head[8], "store.migrated chains on the source head");
    let details: Value = serde_json::from_str(last[6].as_str().unwrap()).unwrap();
    assert_eq!(details["from"]["backend"], "sqlite");
    assert_eq!(details["to"]["backend"], "postgres");
    assert_eq!(details["source_head_seq"], head[0]);
    assert_eq!(details["source_head_hash"], head[8]);
    assert_eq!(
        details["rows"]["certificates"],
        json!(source_counts["certificates"])
    );
    assert!(!last[6].as_str().unwrap().contains("password"));

    // The chain, recomputed by Python from psql's output.
    assert_eq!(python_verify(&db), format!("ok {}", target_events.len()));
    // ... and by keyward's own verifier reading through PgStore.
    let store = keyward::store::postgres::PgStore::open_read_only(&db.url, None)
        .await
        .unwrap();
    let mut verifier = keyward::audit::ChainVerifier::default();
    let mut from_seq = 1;
    loop {
        let page = store
            .audit_events(keyward::store::AuditQuery {
                from_seq,
                limit: 500,
            })
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        from_seq = last.seq + 1;
        for e in &page {
            verifier.push(e).unwrap();
        }
    }
    assert_eq!(verifier.verified as usize, target_events.len());
    // Checkpoints carried over byte for byte.
    let cps = db.psql("SELECT string_agg(seq || ':' || encode(hash, 'hex') || ':' || encode(signature, 'hex'), ',' ORDER BY seq) FROM audit_checkpoints");
    let c = rusqlite::Connection::open(&env.db).unwrap();
    let want: String = c
        .query_row(
            "SELECT group_concat(x, ',') FROM (SELECT seq || ':' || lower(hex(hash)) || ':' || lower(hex(signature)) AS x FROM audit_checkpoints ORDER BY seq)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(cps, want);
    // Booleans are booleans, and the outbox's next id comes after the imported one.
    assert_eq!(db.psql("SELECT COUNT(*) FROM admins WHERE ever_admin"), "1");
    assert_eq!(
        db.psql("SELECT nextval(pg_get_serial_sequence('broker_outbox', 'id'))"),
        "42"
    );

    // Backend-neutral: the PostgreSQL export holds the SQLite export's
    // tables in the same order, with the same columns and the same lines.
    let sqlite_snap = Collect::default();
    let sqlite_store = keyward::store::sqlite::SqliteStore::open_read_only(&env.db).unwrap();
    let sqlite_info: SnapshotInfo = sqlite_store
        .export_snapshot(Box::new(sqlite_snap.clone()))
        .await
        .unwrap();
    let pg_snap = Collect::default();
    let mut client = pg_client(&db.url).await;
    let pg_info =
        keyward::store::postgres::snapshot::export(&mut client, Box::new(pg_snap.clone()))
            .await
            .unwrap();
    assert_eq!(pg_info.backend, "postgres");
    assert_eq!(pg_info.schema_version, sqlite_info.schema_version);
    assert_eq!(
        *pg_snap.1.lock().unwrap(),
        *sqlite_snap.1.lock().unwrap(),
        "table order"
    );
    let (a, b) = (sqlite_snap.0.lock().unwrap(), pg_snap.0.lock().unwrap());
    for (table, (cols, lines)) in a.iter() {
        let (pg_cols, pg_lines) = &b[table];
        assert_eq!(pg_cols, cols, "columns of {table}");
        let mut want = lines.clone();
        let mut got = pg_lines.clone();
        if table == "audit_events" {
            // Ordered by seq in both; the target has store.migrated last.
            assert_eq!(&got[..want.len()], &want[..]);
            assert_eq!(got.len(), want.len() + 1);
            continue;
        }
        want.sort();
        got.sort();
        assert_eq!(got, want, "rows of {table}");
    }
    assert_eq!(pg_info.keys.len(), sqlite_info.keys.len());
    assert_eq!(pg_info.audit_head_seq, sqlite_info.audit_head_seq + 1);

    // A second run finds the target in use: refused, nothing written.
    let out = migrate(&["--from", &from, "--to", &to]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not empty"),
        "{}",
        text(&out)
    );
    assert_eq!(pg_events(&db).len(), target_events.len());
}

/// A small source store made through the library (no HSM needed):
/// `events` audit events in commits of up to 1000.
async fn small_source(dir: &Path, events: usize) -> std::path::PathBuf {
    let path = dir.join("source.db");
    let clock: Arc<dyn keyward::clock::Clock> = Arc::new(keyward::clock::SystemClock);
    let store = keyward::store::sqlite::SqliteStore::open(&path, 256, clock).unwrap();
    let mut left = events;
    let mut n = 0;
    while left > 0 {
        let take = left.min(1000);
        let mut change = keyward::store::Change::new();
        for _ in 0..take {
            n += 1;
            change = change.audit(
                keyward::audit::AuditDraft::new("system", "test.event", format!("thing:{n}"))
                    .details(json!({ "n": n, "text": "tab\there, newline\nthere, backslash \\ and ünïcode" })),
            );
        }
        store.commit(change).await.unwrap();
        left -= take;
    }
    drop(store);
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_bad_inputs_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let source = small_source(dir.path(), 5).await;
    let from = format!("sqlite:{}", source.display());

    // Missing source: bad argument.
    let out = migrate(&[
        "--from",
        "sqlite:/nonexistent/keyward.db",
        "--to",
        "postgres://u@127.0.0.1:1/x",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{}",
        text(&out)
    );
    // Unknown backends: bad arguments.
    let out = migrate(&[
        "--from",
        "postgres:postgres://u@127.0.0.1:1/x",
        "--to",
        "postgres://u@127.0.0.1:1/x",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = migrate(&["--from", &from, "--to", "mysql://u@127.0.0.1:1/x"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    // A password in the URL: refused, and not echoed.
    let out = migrate(&[
        "--from",
        &from,
        "--to",
        "postgres:postgres://keyward:hunter2secret@127.0.0.1:1/keyward",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("password in the URL is refused"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("hunter2secret"));
    // A password file that is not there.
    let out = migrate(&[
        "--from",
        &from,
        "--to",
        "postgres://u@127.0.0.1:1/x",
        "--password-file",
        "/nonexistent/pw",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    // Unreachable server: a closed loopback port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = migrate(&[
        "--from",
        &from,
        "--to",
        &format!("postgres://keyward@127.0.0.1:{port}/keyward"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{}",
        text(&out)
    );

    // A database holding someone else's table: refused, left as it was.
    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    db.psql("CREATE TABLE other_app (x int)");
    let to = format!("postgres:{}", db.url);
    let out = migrate(&["--from", &from, "--to", &to]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not keyward's"),
        "{}",
        text(&out)
    );
    assert_eq!(pg_tables(&db), "other_app");

    // A target at another schema version: refused, left as it was.
    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    db.psql("CREATE TABLE keyward_schema (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)");
    db.psql("INSERT INTO keyward_schema VALUES (11, 0)");
    let to = format!("postgres:{}", db.url);
    let out = migrate(&["--from", &from, "--to", &to]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("schema version mismatch"),
        "{}",
        text(&out)
    );
    assert_eq!(pg_tables(&db), "keyward_schema");
    assert_eq!(
        db.psql("SELECT string_agg(version::text, ',') FROM keyward_schema"),
        "11"
    );

    // A source at an older schema version: refused, nothing written.
    let old = dir.path().join("old.db");
    std::fs::copy(&source, &old).unwrap();
    rusqlite::Connection::open(&old)
        .unwrap()
        .execute_batch("PRAGMA user_version = 11")
        .unwrap();
    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    let to = format!("postgres:{}", db.url);
    let out = migrate(&["--from", &format!("sqlite:{}", old.display()), "--to", &to]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("version 11 cannot be loaded"),
        "{}",
        text(&out)
    );
    assert_eq!(pg_tables(&db), "");
    // ... or at a newer one.
    rusqlite::Connection::open(&old)
        .unwrap()
        .execute_batch(&format!(
            "PRAGMA user_version = {}",
            keyward::store::sqlite::SCHEMA_VERSION + 1
        ))
        .unwrap();
    let out = migrate(&["--from", &format!("sqlite:{}", old.display()), "--to", &to]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "version {} cannot be loaded",
            keyward::store::sqlite::SCHEMA_VERSION + 1
        )),
        "{}",
        text(&out)
    );
    assert_eq!(pg_tables(&db), "");

    // A dry run checks everything and writes nothing.
    let out = migrate(&["--from", &from, "--to", &to, "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing was written"),
        "{}",
        text(&out)
    );
    assert_eq!(pg_tables(&db), "");

    // An empty keyward schema (a daemon started once, never initialised)
    // is a valid target; the password file is read (trust auth ignores it).
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "not-needed-here\n").unwrap();
    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    drop(
        keyward::store::postgres::PgStore::open(
            &db.url,
            None,
            8,
            Arc::new(keyward::clock::SystemClock),
        )
        .await
        .unwrap(),
    );
    let to = format!("postgres:{}", db.url);
    let out = migrate(&[
        "--from",
        &from,
        "--to",
        &to,
        "--password-file",
        pw.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(db.psql("SELECT COUNT(*) FROM audit_events"), "6");
    assert_eq!(python_verify(&db), "ok 6");
    // Text with tabs, newlines and backslashes survived COPY.
    assert_eq!(
        db.psql("SELECT details FROM audit_events WHERE seq = 1"),
        sqlite_events(&source)[0][6].as_str().unwrap()
    );
    // The target keeps working as a store: the next commit chains on.
    let store = keyward::store::postgres::PgStore::open(
        &db.url,
        None,
        8,
        Arc::new(keyward::clock::SystemClock),
    )
    .await
    .unwrap();
    let seqs = store
        .commit(
            keyward::store::Change::new().audit(keyward::audit::AuditDraft::new(
                "system",
                "test.after",
                "x",
            )),
        )
        .await
        .unwrap();
    assert_eq!(seqs, vec![7]);
    drop(store);
    assert_eq!(python_verify(&db), "ok 7");

    // An export whose sink fails reports the sink's error.
    let mut client = pg_client(&db.url).await;
    let err = keyward::store::postgres::snapshot::export(&mut client, Box::new(Failing))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "snapshot_write_failed", "{err}");
    assert!(err.to_string().contains("disk full"), "{err}");

    // Rows that do not fit the target's types are refused, and the
    // import rolls back: the database stays empty.
    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    let mut client = pg_client(&db.url).await;
    for (columns, row, why) in [
        (
            vec!["id", "name", "role", "token_hash", "disabled", "created_at"],
            r#"["a", "n", "admin", {"b": "AAE="}, 2, 1]"#,
            "boolean",
        ),
        (
            vec!["id", "name", "role", "token_hash", "disabled", "created_at"],
            r#"["a", "n", "admin", "not a blob", 0, 1]"#,
            "does not fit",
        ),
        (
            vec!["id", "name", "role", "token_hash", "disabled", "created_at"],
            r#"["a", "n", "admin", {"b": "AAE="}, 0]"#,
            "5 values for 6 columns",
        ),
        (vec!["id", "nickname"], r#"["a", "n"]"#, "column `nickname`"),
    ] {
        let mut imp = keyward::store::postgres::snapshot::PgImporter::create(
            &mut client,
            keyward::store::sqlite::SCHEMA_VERSION,
        )
        .await
        .unwrap();
        let cols: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
        let err = match imp.table("admins", &cols).await {
            Err(e) => e,
            Ok(()) => imp.rows(format!("{row}\n").as_bytes()).await.unwrap_err(),
        };
        assert!(err.to_string().contains(why), "{err}");
        drop(imp);
    }
    // A row whose reference is not in the snapshot fails at the end.
    let mut imp = keyward::store::postgres::snapshot::PgImporter::create(
        &mut client,
        keyward::store::sqlite::SCHEMA_VERSION,
    )
    .await
    .unwrap();
    let cols: Vec<String> = [
        "registration_id",
        "admin_id",
        "decision",
        "comment",
        "decided_at",
    ]
    .iter()
    .map(|c| c.to_string())
    .collect();
    imp.table("approvals", &cols).await.unwrap();
    imp.rows(b"[\"r\", \"a\", \"approve\", null, 1]\n")
        .await
        .unwrap();
    let err = imp
        .finish(keyward::store::Change::new(), 0)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("refer to rows it does not hold"),
        "{err}"
    );
    assert_eq!(pg_tables(&db), "");
}

/// A sink on a full disk.
struct Failing;

impl SnapshotSink for Failing {
    fn table(&mut self, _: &str, _: &[String]) -> std::io::Result<()> {
        Ok(())
    }

    fn rows(&mut self, _: &str, _: Vec<u8>, _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("disk full"))
    }
}

/// Throughput on a 100k-event store (printed; run with --nocapture).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_events_move_in_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let source = small_source(dir.path(), 100_000).await;
    eprintln!("made the 100k-event source in {:?}", t.elapsed());
    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    let started = Instant::now();
    let out = migrate(&[
        "--from",
        &format!("sqlite:{}", source.display()),
        "--to",
        &format!("postgres:{}", db.url),
    ]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    eprintln!(
        "{}migrate of 100,000 events: {took:?} wall ({:.0} events/s)",
        String::from_utf8_lossy(&out.stdout),
        100_000f64 / took.as_secs_f64()
    );
    assert_eq!(db.psql("SELECT COUNT(*) FROM audit_events"), "100001");
    assert_eq!(python_verify(&db), "ok 100001");
}
