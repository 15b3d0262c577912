//! The Store conformance suite against PostgreSQL (a fresh database per case
//! on a private cluster this test process starts), plus what only the
//! PostgreSQL backend has: migrations under an advisory lock, append-only
//! triggers, and several daemons sharing one audit chain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "common/store_suite.rs"]
mod store_suite;
#[path = "common/postgres.rs"]
mod postgres;

use futures::future::BoxFuture;
use keyward::audit::AuditDraft;
use keyward::clock::{ManualClock, SystemClock, from_unix};
use keyward::store::postgres::PgStore;
use keyward::store::{Change, DatabaseError, Store, StoreError, Write};
use postgres::TestDb;
use std::sync::Arc;
use store_suite::Cx;

/// A fresh database; a small batch size so that concurrent cases span
/// several group commits.
fn open(clock: Arc<ManualClock>) -> BoxFuture<'static, Cx> {
    Box::pin(async move {
        let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
        let store = PgStore::open(&db.url, None, 8, clock.clone())
            .await
            .unwrap();
        let url = db.url.clone();
        Cx::new(
            Arc::new(store),
            clock,
            move || {
                let url = url.clone();
                Box::pin(async move {
                    Arc::new(PgStore::open_read_only(&url, None).await.unwrap()) as Arc<dyn Store>
                })
            },
            db,
        )
    })
}

mod conformance {
    use super::*;
    store_suite!(open);
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

fn ev(action: &str) -> AuditDraft {
    AuditDraft::new("test", action, "target")
}

/// Two daemons starting together on an empty database: both connect, the
/// schema is applied once, and a third start changes nothing.
#[test]
fn migrations_are_applied_once_under_concurrent_starts() {
    let db = TestDb::create();
    rt().block_on(async {
        let clock = Arc::new(SystemClock);
        let (a, b) = tokio::join!(
            PgStore::open(&db.url, None, 8, clock.clone()),
            PgStore::open(&db.url, None, 8, clock.clone()),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        a.commit(Change::new().audit(ev("t.a"))).await.unwrap();
        b.commit(Change::new().audit(ev("t.b"))).await.unwrap();
        let again = PgStore::open(&db.url, None, 8, clock).await.unwrap();
        assert_eq!(again.audit_head().await.unwrap().0, 2);
    });
    assert_eq!(
        db.psql("SELECT string_agg(version::text, ',' ORDER BY version) FROM keyward_schema"),
        (12..=keyward::store::postgres::SCHEMA_VERSION)
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(","),
        "each version applied once"
    );
}

/// A database a newer keyward migrated is refused, read-only too, and an
/// empty one cannot be opened read-only (nothing to verify).
#[test]
fn newer_or_missing_schema_is_refused() {
    let empty = TestDb::create();
    let db = TestDb::create();
    rt().block_on(async {
        match PgStore::open_read_only(&empty.url, None).await {
            Err(StoreError::Database(DatabaseError::NoSchema)) => {}
            Err(e) => panic!("expected NoSchema, got {e}"),
            Ok(_) => panic!("an empty database opened read-only"),
        }
        drop(
            PgStore::open(&db.url, None, 8, Arc::new(SystemClock))
                .await
                .unwrap(),
        );
    });
    db.psql("INSERT INTO keyward_schema (version, applied_at) VALUES (99, 0)");
    rt().block_on(async {
        for r in [
            PgStore::open(&db.url, None, 8, Arc::new(SystemClock))
                .await
                .map(drop),
            PgStore::open_read_only(&db.url, None).await.map(drop),
        ] {
            match r {
                Err(StoreError::SchemaTooNew { found: 99, .. }) => {}
                other => panic!("expected SchemaTooNew, got {:?}", other.err()),
            }
        }
    });
}

/// UPDATE, DELETE and TRUNCATE of the audit tables are refused by the
/// database itself, and the chain is unchanged afterwards.
#[test]
fn audit_tables_are_append_only() {
    let db = TestDb::create();
    rt().block_on(async {
        let store = PgStore::open(&db.url, None, 8, Arc::new(SystemClock))
            .await
            .unwrap();
        store
            .commit(Change::new().audit(ev("t.one")).audit(ev("t.two")))
            .await
            .unwrap();
        let key = uuid::Uuid::now_v7();
        store
            .commit(
                Change::new()
                    .write(Write::InsertAuditDataKey(
                        keyward::store::AuditDataKeyRecord {
                            id: uuid::Uuid::now_v7(),
                            key_id: key,
                            wrapped: vec![1, 2, 3],
                            created_at: 1,
                        },
                    ))
                    .audit(ev("t.key")),
            )
            .await
            .unwrap();
        let (seq, hash) = store.audit_head().await.unwrap();
        store
            .record_audit_checkpoint(&keyward::audit::Checkpoint {
                seq,
                hash: hash.clone(),
                at_ms: 1,
                key_id: key,
                signature: vec![9; 64],
            })
            .await
            .unwrap();
        let before = store_suite::verified_chain(&store).await;
        let c = raw(&db.url).await;
        for sql in [
            "UPDATE audit_events SET actor = 'mallory' WHERE seq = 1",
            "DELETE FROM audit_events WHERE seq = 3",
            "TRUNCATE audit_events",
            "UPDATE audit_checkpoints SET at_ms = 2",
            "DELETE FROM audit_checkpoints",
            "TRUNCATE audit_checkpoints",
            "UPDATE audit_data_keys SET wrapped = '\\x00'",
            "DELETE FROM audit_data_keys",
            "TRUNCATE audit_data_keys",
        ] {
            let err = c.batch_execute(sql).await.expect_err(sql);
            let msg = err
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_default();
            assert!(msg.contains("append-only"), "{sql}: {err}");
        }
        assert_eq!(store_suite::verified_chain(&store).await, before);
        assert_eq!(store.audit_checkpoints(0, 10).await.unwrap().len(), 1);
        assert_eq!(store.audit_data_keys().await.unwrap().len(), 1);
    });
}

/// Two stores (two daemons) on one database committing at once: one
/// gap-free chain that verifies, every change's events in it.
#[test]
fn two_daemons_share_one_gap_free_chain() {
    let db = TestDb::create();
    rt().block_on(async {
        let clock = Arc::new(SystemClock);
        let a = Arc::new(
            PgStore::open(&db.url, None, 8, clock.clone())
                .await
                .unwrap(),
        );
        let b = Arc::new(PgStore::open(&db.url, None, 8, clock).await.unwrap());
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s: Arc<dyn Store> = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                s.commit(
                    Change::new()
                        .audit(ev(&format!("t.{i}.one")))
                        .audit(ev(&format!("t.{i}.two"))),
                )
                .await
                .unwrap()
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            let s = t.await.unwrap();
            // A change's events are consecutive.
            assert_eq!(s.len(), 2);
            assert_eq!(s[1], s[0] + 1);
            seqs.extend(s);
        }
        seqs.sort();
        assert_eq!(seqs, (1..=400).collect::<Vec<i64>>());
        for s in [&a, &b] {
            let events = store_suite::verified_chain(s.as_ref()).await;
            assert_eq!(events.len(), 400);
        }
    });
}

/// A constraint other than a duplicate (here a foreign key) is a database
/// error with code `store_constraint`, never a conflict; the change is
/// refused whole and its neighbours in the batch commit.
#[test]
fn constraint_violations_are_not_conflicts() {
    let db = TestDb::create();
    rt().block_on(async {
        let clock = Arc::new(ManualClock::new(from_unix(store_suite::T0)));
        let store = Arc::new(PgStore::open(&db.url, None, 8, clock).await.unwrap());
        let orphan = store_suite::ca(
            "orphan",
            keyward::model::CaKind::Root,
            None,
            uuid::Uuid::now_v7(),
            1,
        );
        let bad = {
            let s = store.clone();
            tokio::spawn(async move {
                s.commit(
                    Change::new()
                        .write(Write::InsertCa(orphan))
                        .audit(ev("t.bad")),
                )
                .await
            })
        };
        let good = {
            let s = store.clone();
            tokio::spawn(async move { s.commit(Change::new().audit(ev("t.good"))).await })
        };
        let err = bad.await.unwrap().unwrap_err();
        assert!(
            matches!(err, StoreError::Database(DatabaseError::Postgres(_))),
            "{err:?}"
        );
        assert_eq!(err.code(), "store_constraint");
        assert_eq!(good.await.unwrap().unwrap(), vec![1]);
        assert_eq!(store_suite::verified_chain(store.as_ref()).await.len(), 1);
        assert!(store.list_cas().await.unwrap().is_empty());
    });
}

/// What the cluster-wide write lock costs: raw commits of one audit-sized
/// row with and without `pg_advisory_xact_lock`, and PgStore commits/s
/// with one daemon and with two sharing the database. Prints numbers;
/// run with `--ignored --nocapture`.
#[test]
#[ignore]
fn measure_write_lock_cost() {
    let db = TestDb::create();
    rt().block_on(async {
        let c = raw(&db.url).await;
        c.batch_execute("CREATE TABLE bench (seq BIGINT PRIMARY KEY, body TEXT NOT NULL)")
            .await
            .unwrap();
        let n = 2000i64;
        for (label, lock) in [("without lock", false), ("with lock", true)] {
            let start = std::time::Instant::now();
            let base = if lock { n } else { 0 };
            for i in 0..n {
                c.batch_execute("BEGIN").await.unwrap();
                if lock {
                    c.execute(
                        "SELECT pg_advisory_xact_lock($1)",
                        &[&0x6b65_7977_6172_6402i64],
                    )
                    .await
                    .unwrap();
                }
                c.execute(
                    "INSERT INTO bench (seq, body) VALUES ($1, repeat('x', 200))",
                    &[&(base + i)],
                )
                .await
                .unwrap();
                c.batch_execute("COMMIT").await.unwrap();
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "raw single-row transactions {label}: {:.0}/s ({:.1} µs each)",
                n as f64 / secs,
                secs * 1e6 / n as f64
            );
        }
        for daemons in [1usize, 2] {
            let mut stores: Vec<Arc<dyn Store>> = Vec::new();
            for _ in 0..daemons {
                stores.push(Arc::new(
                    PgStore::open(&db.url, None, 256, Arc::new(SystemClock))
                        .await
                        .unwrap(),
                ));
            }
            let total = 4000usize;
            let start = std::time::Instant::now();
            let mut tasks = Vec::new();
            for i in 0..total {
                let s = stores[i % daemons].clone();
                tasks.push(tokio::spawn(async move {
                    s.commit(Change::new().audit(ev("bench.commit")))
                        .await
                        .unwrap()
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "PgStore, {daemons} daemon(s), {total} concurrent commits: {:.0} commits/s",
                total as f64 / secs
            );
            store_suite::verified_chain(stores[0].as_ref()).await;
        }
    });
}

/// The server drops every connection of the store (a failover, a restart):
/// the next operation may fail as unavailable (never as a conflict), and
/// the writer and the readers reconnect by themselves; nothing is lost
/// from the chain.
#[test]
fn writer_and_readers_reconnect_after_the_server_drops_them() {
    let db = TestDb::create();
    rt().block_on(async {
        let store = PgStore::open(&db.url, None, 8, Arc::new(SystemClock))
            .await
            .unwrap();
        store
            .commit(Change::new().audit(ev("t.before")))
            .await
            .unwrap();
        assert_eq!(store.audit_head().await.unwrap().0, 1);
        let admin = raw(&db.url).await;
        let killed: i64 = admin
            .query_one(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            killed >= 2,
            "the writer and a reader were connected ({killed})"
        );
        let mut committed = None;
        for _ in 0..3 {
            match store.commit(Change::new().audit(ev("t.after"))).await {
                Ok(seqs) => {
                    committed = Some(seqs);
                    break;
                }
                Err(e) => assert_eq!(e.code(), "store_unavailable", "{e:?}"),
            }
        }
        assert_eq!(committed, Some(vec![2]));
        let mut head = None;
        for _ in 0..3 {
            if let Ok(h) = store.audit_head().await {
                head = Some(h.0);
                break;
            }
        }
        assert_eq!(head, Some(2));
        assert_eq!(store_suite::verified_chain(&store).await.len(), 2);
    });
}
