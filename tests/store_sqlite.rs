//! The Store conformance suite against SQLite on a real file in a temp dir,
//! plus what only the SQLite backend has (schema versions, file modes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "common/store_suite.rs"]
mod store_suite;

use futures::future::BoxFuture;
use keyward::clock::ManualClock;
use keyward::store::Store;
use keyward::store::sqlite::SqliteStore;
use std::sync::Arc;
use store_suite::Cx;

/// A fresh database file in its own temp dir; a small batch size so that
/// concurrent cases span several group commits.
fn open(clock: Arc<ManualClock>) -> BoxFuture<'static, Cx> {
    Box::pin(async move {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyward.db");
        let store = SqliteStore::open(&path, 8, clock.clone()).unwrap();
        Cx::new(
            Arc::new(store),
            clock,
            move || {
                let path = path.clone();
                Box::pin(async move {
                    Arc::new(SqliteStore::open_read_only(&path).unwrap()) as Arc<dyn Store>
                })
            },
            dir,
        )
    })
}

mod conformance {
    use super::*;
    store_suite!(open);
}

/// Database files and secrets are owner-only from their first byte.
#[cfg(unix)]
mod files {
    use super::*;
    use keyward::audit::AuditDraft;
    use keyward::clock::SystemClock;
    use keyward::store::Change;
    use keyward::store::files::{PrivateFileError, prepare_database_files, write_private};
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::process::Command;

    const CHILD_DIR: &str = "KEYWARD_TEST_STORE_DIR";

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    fn set_mode(path: &Path, m: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m)).unwrap();
    }

    fn umask_of_this_process() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        u32::from_str_radix(line.trim_start_matches("Umask:").trim(), 8).unwrap()
    }

    /// The body of `database_files_are_0600_under_umask_022`, run in a child
    /// process whose umask the parent set (the umask is process-wide, so the
    /// test must not change it in this process); a no-op elsewhere.
    #[test]
    fn child_opens_a_store() {
        let Some(dir) = std::env::var_os(CHILD_DIR) else {
            return;
        };
        let dir = Path::new(&dir);
        assert_eq!(umask_of_this_process(), 0o022);
        // What the umask gives a file whose creator does not ask for 0600.
        std::fs::write(dir.join("plain"), b"x").unwrap();
        assert_eq!(mode(&dir.join("plain")), 0o644);

        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let path = dir.join("sub/keyward.db");
            let store = SqliteStore::open(&path, 8, Arc::new(SystemClock)).unwrap();
            store
                .commit(Change::new().audit(AuditDraft::new("test", "t.one", "x")))
                .await
                .unwrap();
            // While the store is open, all three files exist.
            for suffix in ["", "-wal", "-shm"] {
                let f = dir.join(format!("sub/keyward.db{suffix}"));
                assert_eq!(mode(&f), 0o600, "{}", f.display());
            }
            let ro = SqliteStore::open_read_only(&path).unwrap();
            ro.audit_head().await.unwrap();
        });
        println!("child checked the database files");
    }

    #[test]
    fn database_files_are_0600_under_umask_022() {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(r#"umask 022 && exec "$0" --exact files::child_opens_a_store --nocapture --test-threads 1"#)
            .arg(std::env::current_exe().unwrap())
            .env(CHILD_DIR, dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("child checked the database files"),
            "{stdout}"
        );
    }

    /// The database file exists, empty and 0600, before SQLite writes a byte.
    #[test]
    fn database_file_is_created_owner_only_before_sqlite_opens_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        prepare_database_files(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.len(), mode(&path)), (0, 0o600));
        // Running it again on the file changes nothing.
        prepare_database_files(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
    }

    /// Files left by an older keyward with the umask's mode are narrowed
    /// before SQLite opens them; a narrower mode is kept.
    #[test]
    fn existing_wide_database_files_are_narrowed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        for (suffix, m) in [("", 0o644), ("-wal", 0o664), ("-shm", 0o666)] {
            let f = dir.path().join(format!("k.db{suffix}"));
            std::fs::write(&f, b"bytes").unwrap();
            set_mode(&f, m);
        }
        prepare_database_files(&path).unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let f = dir.path().join(format!("k.db{suffix}"));
            assert_eq!(mode(&f), 0o600, "{}", f.display());
            assert_eq!(std::fs::read(&f).unwrap(), b"bytes");
        }
        set_mode(&path, 0o400);
        prepare_database_files(&path).unwrap();
        assert_eq!(mode(&path), 0o400, "a narrower mode is kept");
        assert!(
            !dir.path().join("k.db-journal").exists(),
            "nothing else created"
        );
    }

    /// A database left by a crash with a live `-wal` (which SQLite does not
    /// re-mode: it is not empty) and wide modes is narrowed by `open`.
    #[test]
    fn open_narrows_files_left_wide_by_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live.db");
        let crashed = dir.path().join("crashed.db");
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let store = SqliteStore::open(&live, 8, Arc::new(SystemClock)).unwrap();
            store
                .commit(Change::new().audit(AuditDraft::new("test", "t.one", "x")))
                .await
                .unwrap();
            // Copies taken while the store is open: the event is only in the WAL.
            for suffix in ["", "-wal", "-shm"] {
                let (from, to) = (format!("live.db{suffix}"), format!("crashed.db{suffix}"));
                std::fs::copy(dir.path().join(from), dir.path().join(&to)).unwrap();
                set_mode(&dir.path().join(to), 0o644);
            }
            assert!(
                std::fs::metadata(dir.path().join("crashed.db-wal"))
                    .unwrap()
                    .len()
                    > 0
            );
            let store = SqliteStore::open(&crashed, 8, Arc::new(SystemClock)).unwrap();
            assert_eq!(
                store.audit_head().await.unwrap().0,
                1,
                "the WAL was recovered"
            );
            for suffix in ["", "-wal", "-shm"] {
                let f = dir.path().join(format!("crashed.db{suffix}"));
                assert_eq!(mode(&f), 0o600, "{}", f.display());
            }
        });
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_private_creates_0600_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        write_private(&path, b"secret\n").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"secret\n");
        assert_eq!(entries(dir.path()), ["admin.token"], "no temp file left");
        write_private(&path, b"second\n").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"second\n");
        assert_eq!(entries(dir.path()), ["admin.token"]);
    }

    /// A pre-existing 0644 file is replaced by an owner-only one: its own
    /// inode never receives the new bytes, so a reader that opened it before
    /// cannot read them.
    #[test]
    fn write_private_never_puts_bytes_in_a_wide_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        std::fs::write(&path, b"old").unwrap();
        set_mode(&path, 0o644);
        let mut early_reader = std::fs::File::open(&path).unwrap();
        write_private(&path, b"new private key").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"new private key");
        let mut seen = String::new();
        early_reader.read_to_string(&mut seen).unwrap();
        assert_eq!(seen, "old");
    }

    #[test]
    fn write_private_keeps_a_narrower_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        std::fs::write(&path, b"old").unwrap();
        set_mode(&path, 0o400);
        write_private(&path, b"new").unwrap();
        assert_eq!(mode(&path), 0o400);
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn write_private_refuses_links_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        set_mode(&target, 0o644);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = write_private(&link, b"x").unwrap_err();
        assert!(
            matches!(err, PrivateFileError::NotARegularFile { .. }),
            "{err:?}"
        );
        assert_eq!(err.code(), "not_a_regular_file");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert_eq!(mode(&target), 0o644);

        let err = write_private(dir.path(), b"x").unwrap_err();
        assert!(
            matches!(err, PrivateFileError::NotARegularFile { .. }),
            "{err:?}"
        );

        let err = write_private(&dir.path().join("missing/dir/f"), b"x").unwrap_err();
        assert!(matches!(err, PrivateFileError::Io { .. }), "{err:?}");
        assert_eq!(err.code(), "file_io");
        assert!(err.to_string().contains("missing/dir/f"), "{err}");
        assert_eq!(entries(dir.path()), ["link", "target"]);
    }
}

/// What only the SQLite backend has: schema versions, typed errors with
/// their SQLite source.
mod sqlite {
    use super::*;
    use keyward::clock::SystemClock;
    use keyward::store::sqlite::SCHEMA_VERSION;
    use keyward::store::{Change, DatabaseError, StoreError, Write};
    use std::error::Error as _;

    fn store_error<T>(r: Result<T, StoreError>) -> StoreError {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    /// Two stores on one file (two connections, two writer threads, as two
    /// daemons have) racing for one lease: exactly one wins each round,
    /// because the lease step holds SQLite's write lock, not a process lock.
    #[test]
    fn lease_race_across_connections_has_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let stores: Vec<Arc<dyn Store>> = (0..2)
                .map(|_| {
                    Arc::new(SqliteStore::open(&path, 8, Arc::new(SystemClock)).unwrap())
                        as Arc<dyn Store>
                })
                .collect();
            for round in 0..20i64 {
                let now = 1_900_000_000_000 + round * 10_000;
                let tries = (0..8).map(|i| {
                    let s = stores[i % 2].clone();
                    tokio::spawn(async move {
                        let holder = format!("d{i}");
                        let won = s.try_lease("scheduler", &holder, now, 5_000).await.unwrap();
                        (holder, won)
                    })
                });
                let mut winners = Vec::new();
                for t in tries {
                    let (holder, won) = t.await.unwrap();
                    if won {
                        winners.push(holder);
                    }
                }
                assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
                for s in &stores {
                    assert_eq!(
                        s.lease_holder("scheduler", now).await.unwrap(),
                        Some(winners[0].clone())
                    );
                }
            }
        });
    }

    /// A database written by a newer keyward is refused, for writing and
    /// for reading, and left as it was.
    #[test]
    fn newer_schema_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(&format!("PRAGMA user_version = {}", SCHEMA_VERSION + 1))
            .unwrap();
        drop(conn);
        let err = store_error(SqliteStore::open(&path, 8, Arc::new(SystemClock)));
        assert!(
            matches!(err, StoreError::SchemaTooNew { found, supported }
                if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
            "{err:?}"
        );
        assert_eq!(err.code(), "schema_too_new");
        let err = store_error(SqliteStore::open_read_only(&path));
        assert!(matches!(err, StoreError::SchemaTooNew { .. }), "{err:?}");
        let conn = rusqlite::Connection::open(&path).unwrap();
        let tables: i64 = conn
            .query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tables, 0, "no migration ran");
    }

    #[test]
    fn read_only_open_of_a_missing_database_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.db");
        let err = store_error(SqliteStore::open_read_only(&path));
        assert!(
            matches!(&err, StoreError::Database(DatabaseError::NotFound(p)) if *p == path),
            "{err:?}"
        );
        assert_eq!(err.code(), "store_unavailable");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// A path SQLite cannot open reports SQLite's own error as the source.
    #[test]
    fn sqlite_failures_keep_their_source() {
        let dir = tempfile::tempdir().unwrap();
        let err = store_error(SqliteStore::open(dir.path(), 8, Arc::new(SystemClock)));
        assert!(
            matches!(err, StoreError::Database(DatabaseError::Sqlite(_))),
            "{err:?}"
        );
        let source = err.source().expect("the database error");
        let sqlite = source.source().expect("SQLite's error");
        assert!(
            sqlite.downcast_ref::<rusqlite::Error>().is_some(),
            "{sqlite:?}"
        );
    }

    /// A stored value that does not decode is corruption, not an outage.
    #[test]
    fn undecodable_rows_are_invalid_not_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let store = SqliteStore::open(&path, 8, Arc::new(SystemClock)).unwrap();
            let a = store_suite::admin("alice", keyward::store::Role::Admin);
            store
                .commit(
                    Change::new()
                        .write(Write::InsertAdmin(a.clone()))
                        .audit(store_suite::ev("admin.add")),
                )
                .await
                .unwrap();
            let tamper = rusqlite::Connection::open(&path).unwrap();
            tamper
                .execute("UPDATE admins SET role = 'wizard'", [])
                .unwrap();
            let err = store_error(store.get_admin(a.id).await);
            assert!(
                matches!(err, StoreError::Database(DatabaseError::InvalidRow(_))),
                "{err:?}"
            );
            assert_eq!(err.code(), "store_corrupt");
            assert!(err.to_string().contains("wizard"), "{err}");
        });
    }

    /// `restrict_umask` (for `main`) makes later files and directories
    /// owner-only; run in a child process, the umask being process-wide.
    #[cfg(unix)]
    #[test]
    fn restrict_umask_makes_new_files_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        const CHILD: &str = "KEYWARD_TEST_UMASK_DIR";
        if let Some(dir) = std::env::var_os(CHILD) {
            let dir = std::path::Path::new(&dir);
            assert_eq!(keyward::store::files::restrict_umask(), 0o022);
            std::fs::write(dir.join("f"), b"x").unwrap();
            std::fs::create_dir(dir.join("d")).unwrap();
            let mode =
                |p: &str| std::fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
            assert_eq!((mode("f"), mode("d")), (0o600, 0o700));
            println!("child restricted the umask");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(r#"umask 022 && exec "$0" --exact sqlite::restrict_umask_makes_new_files_owner_only --nocapture --test-threads 1"#)
            .arg(std::env::current_exe().unwrap())
            .env(CHILD, dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("child restricted the umask"), "{stdout}");
    }
}

/// A snapshot exported from a populated store and imported into a new
/// file is the same store: same rows per table, the same audit chain
/// (verified), with the import's own event chained after it.
mod snapshot_round_trip {
    use super::*;
    use keyward::audit::AuditDraft;
    use keyward::model::{CaKind, KeyState, Role};
    use keyward::store::snapshot::SnapshotSink;
    use keyward::store::sqlite::snapshot::Import;
    use keyward::store::{Change, Write};
    use std::sync::Mutex;

    type Chunks = Arc<Mutex<Vec<(String, Vec<String>, Vec<u8>)>>>;

    /// Collects the snapshot in memory: (table, columns, JSON lines).
    struct Collect(Chunks);

    impl SnapshotSink for Collect {
        fn table(&mut self, table: &str, columns: &[String]) -> std::io::Result<()> {
            self.0
                .lock()
                .unwrap()
                .push((table.to_string(), columns.to_vec(), Vec::new()));
            Ok(())
        }
        fn rows(&mut self, table: &str, jsonl: Vec<u8>, _rows: u64) -> std::io::Result<()> {
            let mut chunks = self.0.lock().unwrap();
            let last = chunks.last_mut().unwrap();
            assert_eq!(last.0, table);
            last.2.extend_from_slice(&jsonl);
            Ok(())
        }
    }

    #[tokio::test]
    async fn export_then_import_keeps_rows_and_the_audit_chain() {
        let clock = Arc::new(ManualClock::new(keyward::clock::from_unix(store_suite::T0)));
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("a.db"), 8, clock.clone()).unwrap();
        let k = store_suite::key(KeyState::Active);
        let b = store_suite::backup("keyward-x.age", store_suite::T0);
        store_suite::ok_all(
            &store,
            vec![
                Write::InsertKey(k.clone()),
                Write::InsertCa(store_suite::ca(
                    "issuing",
                    CaKind::Issuing,
                    None,
                    k.id,
                    store_suite::T0,
                )),
                Write::InsertAdmin(store_suite::admin("alice", Role::Admin)),
                Write::RecordBackup {
                    record: b.clone(),
                    locations: vec!["nas".into()],
                },
            ],
        )
        .await;
        for i in 0..5 {
            store_suite::ok(
                &store,
                Write::ReplicaFailed {
                    backup_id: b.id,
                    location: "nas".into(),
                    error: format!("try {i} \"quoted\" ünïcode"),
                    next_attempt_at: store_suite::T0 + i,
                    at: store_suite::T0 + i,
                },
            )
            .await;
        }
        let chunks: Chunks = Arc::default();
        let info = store
            .export_snapshot(Box::new(Collect(chunks.clone())))
            .await
            .unwrap();
        let before = store.counts().await.unwrap();
        let events_before = store_suite::verified_chain(&store).await;
        assert_eq!(info.audit_head_seq, events_before.len() as i64);

        let target = dir.path().join("b.db");
        let mut import = Import::create(&target, info.schema_version).unwrap();
        for (table, columns, jsonl) in chunks.lock().unwrap().iter() {
            import.table(table, columns).unwrap();
            import.rows(jsonl).unwrap();
        }
        let restore_event = Change::new().audit(AuditDraft::new("test", "backup.restore", "store"));
        let seqs = import
            .finish(restore_event.clone(), store_suite::T0 * 1000 + 1)
            .unwrap();
        assert_eq!(seqs, vec![events_before.len() as i64 + 1]);
        // Importing over an existing file is refused.
        assert!(Import::create(&target, info.schema_version).is_err());

        let restored = SqliteStore::open(&target, 8, clock.clone()).unwrap();
        let mut after = restored.counts().await.unwrap();
        *after.get_mut("audit_events").unwrap() -= 1;
        assert_eq!(after, before);
        let events_after = store_suite::verified_chain(&restored).await;
        assert_eq!(
            &events_after[..events_before.len()],
            &events_before[..],
            "the imported chain differs"
        );
        assert_eq!(events_after.last().unwrap().action, "backup.restore");
        assert_eq!(
            restored.get_backup(b.id).await.unwrap(),
            store.get_backup(b.id).await.unwrap()
        );
        let key_back = restored.get_key(k.id).await.unwrap().unwrap();
        assert_eq!(
            (key_back.handle, key_back.public_key_der, key_back.state),
            (k.handle, k.public_key_der, k.state)
        );
    }
}

/// The metrics gauges' reads (refreshed by every daemon every
/// `jobs.metrics_refresh_interval_seconds`) are answered from the partial
/// indexes of migration 0011 alone, whatever the table sizes: SQLite's own
/// query plan says so. The SQL is the reads' (`store::sqlite::reads`).
mod metrics_query_plans {
    use keyward::clock::SystemClock;
    use keyward::store::sqlite::SqliteStore;
    use std::sync::Arc;

    /// SQLite's plan for `sql`, with each `?N` bound to an integer.
    fn plan(conn: &rusqlite::Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let params = vec![1_900_000_000i64; stmt.parameter_count()];
        stmt.query_map(rusqlite::params_from_iter(params), |r| {
            r.get::<_, String>(3)
        })
        .unwrap()
        .map(Result::unwrap)
        .collect::<Vec<_>>()
        .join("\n")
    }

    #[test]
    fn gauge_reads_use_covering_partial_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        drop(SqliteStore::open(&path, 8, Arc::new(SystemClock)).unwrap());
        let conn = rusqlite::Connection::open(&path).unwrap();
        let pending = plan(
            &conn,
            "SELECT COUNT(*), MIN(submitted_at) FROM registrations WHERE status = 'pending'",
        );
        assert!(
            pending.contains("COVERING INDEX registrations_pending_submitted"),
            "{pending}"
        );
        for sql in [
            "SELECT COUNT(*) FROM certificates WHERE status = 'valid' AND device_id IS NOT NULL AND not_after > ?1 AND not_after <= ?2",
            "SELECT COUNT(*) FROM certificates WHERE status = 'valid' AND device_id IS NOT NULL AND not_after > ?1",
        ] {
            let p = plan(&conn, sql);
            assert!(
                p.contains("COVERING INDEX certificates_active_device_not_after"),
                "{sql}: {p}"
            );
        }
    }
}

/// Audit reports bounded in time read the `audit_events_at_ms` index
/// rather than the whole chain; an unbounded report walks the sequence
/// (primary key) without a sort.
#[test]
fn audit_report_queries_use_the_time_index() {
    let clock = Arc::new(ManualClock::new(keyward::clock::from_unix(store_suite::T0)));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.db");
    drop(SqliteStore::open(&path, 8, clock).unwrap());
    let c = rusqlite::Connection::open(&path).unwrap();
    let plan = |sql: &str| -> String {
        let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        stmt.query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let select = "SELECT seq, at_ms, actor, action, target, outcome, details, prev_hash, hash, version, source, sealed FROM audit_events";
    let p = plan(&format!(
        "{select} WHERE at_ms >= 1 AND at_ms < 2 AND actor = 'x' ORDER BY seq DESC LIMIT 101"
    ));
    assert!(p.contains("audit_events_at_ms"), "{p}");
    let p = plan(&format!(
        "{select} WHERE seq < 50 ORDER BY seq DESC LIMIT 101"
    ));
    assert!(!p.contains("TEMP B-TREE"), "{p}");
    assert!(
        p.contains("INTEGER PRIMARY KEY") || p.contains("rowid"),
        "{p}"
    );
}

/// Device listing filtered by status, group or both (`GET /v1/admin/devices`,
/// keyset by id, both orders) reads one range of the schema-13 index for
/// the filter, without a sort; without them a page of a rare status walks
/// the whole table (1,000,000 devices: BENCHMARKS.md "Issue 12").
#[test]
fn device_listing_uses_the_filter_indexes() {
    let clock = Arc::new(ManualClock::new(keyward::clock::from_unix(store_suite::T0)));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("devices.db");
    drop(SqliteStore::open(&path, 8, clock).unwrap());
    let c = rusqlite::Connection::open(&path).unwrap();
    let plan = |sql: &str| -> String {
        let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        stmt.query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let select = "SELECT id, name, device_type, location, firmware, group_name, status, created_at, updated_at FROM devices";
    for (filter, index) in [
        ("status = 'revoked'", "devices_status_id"),
        ("group_name = 'plant-7'", "devices_group_id"),
        (
            "status = 'revoked' AND group_name = 'plant-7'",
            "devices_group_status_id",
        ),
    ] {
        for (cmp, dir) in [("<", "DESC"), (">", "ASC")] {
            for after in ["", " AND id CMP '0190'"] {
                let after = after.replace("CMP", cmp);
                let p = plan(&format!(
                    "{select} WHERE {filter}{after} ORDER BY id {dir} LIMIT 51"
                ));
                assert!(p.contains(&format!("USING INDEX {index}")), "{p}");
                assert!(!p.contains("TEMP B-TREE"), "{p}");
            }
        }
    }
}
