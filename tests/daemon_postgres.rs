//! The daemon on a PostgreSQL store, end to end: `keyward init` creates the
//! schema, keys and CAs; `keyward serve` registers, approves and issues a
//! device (the certificate checked with `openssl verify`); `keyward audit
//! verify` checks the chain from the database with the HSM audit key; and
//! the rows are where `psql`, not keyward, says they are.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/postgres.rs"]
mod postgres;

use common::{Env, issue_device, openssl_verify};
use postgres::TestDb;

fn postgres_env(db: &TestDb) -> Env {
    let env = Env::new();
    env.set_store(&format!(
        "type = \"postgres\"\nurl = \"{}\"\npool_size = 4",
        db.url
    ));
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn init_serve_issue_and_verify_on_postgres() {
    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    let env = postgres_env(&db);
    let config = env.config.to_str().unwrap().to_string();

    // Before init: serve refuses an empty database (it would look like a fresh CA).
    let out = env.run(&["serve", "--config", &config]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keyward init"), "{err}");
    assert_eq!(
        db.psql("SELECT to_regclass('audit_events') IS NULL"),
        "t",
        "serve created the schema"
    );

    let token = env.init();
    assert!(
        !env.db.exists(),
        "a SQLite file was created beside PostgreSQL"
    );
    let daemon = env.serve();
    let dev = issue_device(&daemon.url, &token, &env.path("dev"), "pg-device").await;
    // The chain is issuing CA then root: the root alone is the trust anchor.
    let chain = std::fs::read_to_string(&dev.chain).unwrap();
    let root_start = chain.rfind("-----BEGIN CERTIFICATE-----").unwrap();
    assert!(
        root_start > 0,
        "the chain holds the issuing CA and the root"
    );
    let root = common::write(&env.path("dev"), "root.pem", &chain[root_start..]);
    let (ok, out) = openssl_verify(&root, &dev.chain, &dev.cert);
    assert!(ok, "{out}");
    drop(daemon);

    // What psql sees: the device, its certificate, an approval, a chain.
    assert_eq!(
        db.psql(&format!(
            "SELECT status FROM certificates WHERE serial = '{}'",
            dev.serial
        )),
        "valid"
    );
    assert_eq!(db.psql("SELECT COUNT(*) FROM approvals"), "1");
    let events: i64 = db
        .psql("SELECT COUNT(*) FROM audit_events")
        .parse()
        .unwrap();
    assert!(events >= 5, "{events} audit events");
    assert_eq!(
        db.psql("SELECT COUNT(*) FROM audit_events a JOIN audit_events b ON b.seq = a.seq + 1 WHERE b.prev_hash <> a.hash"),
        "0"
    );

    let out = env.run(&["audit", "verify", "--config", &config]);
    assert!(
        out.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A tampered row (the append-only trigger bypassed by its owner) fails it.
    db.psql("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only");
    db.psql("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2");
    let out = env.run(&["audit", "verify", "--config", &config]);
    assert!(
        !out.status.success(),
        "audit verify passed a tampered chain: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
