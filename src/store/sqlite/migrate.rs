//! Schema versioning: `PRAGMA user_version` is the number of migrations
//! applied; each migration runs in its own exclusive transaction.

use super::db;
use crate::store::StoreError;
use rusqlite::{Connection, TransactionBehavior};

const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/sqlite/0001_init.sql"),
    include_str!("../../../migrations/sqlite/0002_keystores.sql"),
    include_str!("../../../migrations/sqlite/0003_quorum_invitations.sql"),
    include_str!("../../../migrations/sqlite/0004_ever_admin.sql"),
    include_str!("../../../migrations/sqlite/0005_lifecycle.sql"),
    include_str!("../../../migrations/sqlite/0006_renewal_allowances.sql"),
    include_str!("../../../migrations/sqlite/0007_enrollment.sql"),
    include_str!("../../../migrations/sqlite/0008_broker_outbox.sql"),
    include_str!("../../../migrations/sqlite/0009_rotation.sql"),
    include_str!("../../../migrations/sqlite/0010_backups.sql"),
    include_str!("../../../migrations/sqlite/0011_audit.sql"),
    include_str!("../../../migrations/sqlite/0012_metrics_indexes.sql"),
    include_str!("../../../migrations/sqlite/0013_device_indexes.sql"),
];

/// The schema version this build writes and reads.
pub const SUPPORTED: i64 = MIGRATIONS.len() as i64;

/// The database's schema version, refused if newer than this build knows.
pub(super) fn check_version(conn: &Connection) -> Result<i64, StoreError> {
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db)?;
    if found > SUPPORTED {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SUPPORTED,
        });
    }
    Ok(found)
}

/// Applies the migrations the database lacks.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    migrate_to(conn, SUPPORTED)
}

/// Applies the migrations the database lacks up to version `target` (a
/// restore builds a snapshot's own schema version before loading it).
pub(super) fn migrate_to(conn: &mut Connection, target: i64) -> Result<(), StoreError> {
    if !(1..=SUPPORTED).contains(&target) {
        return Err(StoreError::SchemaTooNew {
            found: target,
            supported: SUPPORTED,
        });
    }
    let current = check_version(conn)?;
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(current as usize)
        .take((target - current).max(0) as usize)
    {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Exclusive)
            .map_err(db)?;
        tx.execute_batch(sql).map_err(db)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
            .map_err(db)?;
        tx.commit().map_err(db)?;
    }
    Ok(())
}
