//! Schema versioning on PostgreSQL: the `keyward_schema` table records each
//! version applied. Migrations run in one transaction under a
//! transaction-scoped advisory lock, so two daemons starting together on an
//! empty database apply them once (the second waits, then finds them done).
//!
//! The version number is shared with SQLite (see
//! migrations/postgres/0012_schema.sql): the first file creates version 12
//! whole. A later version is one line in [`MIGRATIONS`].

use super::pg;
use crate::store::{DatabaseError, StoreError};
use tokio_postgres::{Client, Transaction};

/// (version it brings the database to, SQL).
const MIGRATIONS: &[(i64, &str)] = &[
    (
        12,
        include_str!("../../../migrations/postgres/0012_schema.sql"),
    ),
    (
        13,
        include_str!("../../../migrations/postgres/0013_device_indexes.sql"),
    ),
];

/// The schema version this build writes and reads.
pub const SUPPORTED: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Advisory lock key of migrations ("keyward" + 1 in ASCII-ish; any constant
/// the deployment does not use elsewhere).
const MIGRATE_LOCK: i64 = 0x6b65_7977_6172_6401;

const SCHEMA_TABLE: &str = "CREATE TABLE IF NOT EXISTS keyward_schema (
    version    BIGINT PRIMARY KEY,
    applied_at BIGINT NOT NULL
)";

/// The database's schema version (0: none), refused if newer than this
/// build knows. Reads only (a read-only handle may call it).
pub(super) async fn check_version(client: &Client) -> Result<i64, StoreError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('keyward_schema') IS NOT NULL", &[])
        .await
        .map_err(pg)?
        .try_get(0)
        .map_err(pg)?;
    if !exists {
        return Ok(0);
    }
    let found: i64 = client
        .query_one("SELECT COALESCE(MAX(version), 0) FROM keyward_schema", &[])
        .await
        .map_err(pg)?
        .try_get(0)
        .map_err(pg)?;
    if found > SUPPORTED {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SUPPORTED,
        });
    }
    Ok(found)
}

/// Applies the migrations the database lacks, all in one transaction.
pub(super) async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg)?;
    migrate_in(&tx).await?;
    tx.commit().await.map_err(pg)?;
    Ok(())
}

/// [`migrate`] inside the caller's transaction (a snapshot import creates
/// the schema and loads the rows in one transaction): takes the migration
/// lock until that transaction ends.
pub(super) async fn migrate_in(tx: &Transaction<'_>) -> Result<(), StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(pg)?;
    tx.batch_execute(SCHEMA_TABLE).await.map_err(pg)?;
    let current: i64 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM keyward_schema", &[])
        .await
        .map_err(pg)?
        .try_get(0)
        .map_err(pg)?;
    if current > SUPPORTED {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported: SUPPORTED,
        });
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql).await.map_err(pg)?;
        tx.execute(
            "INSERT INTO keyward_schema (version, applied_at) VALUES ($1, $2)",
            &[version, &now],
        )
        .await
        .map_err(pg)?;
    }
    Ok(())
}

/// Refuses a database without a schema (read-only opens do not create one).
pub(super) async fn require_schema(client: &Client) -> Result<i64, StoreError> {
    match check_version(client).await? {
        0 => Err(DatabaseError::NoSchema.into()),
        v => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_version_is_the_one_sqlite_has() {
        assert_eq!(SUPPORTED, crate::store::sqlite::SCHEMA_VERSION);
    }

    #[test]
    fn migrations_are_in_version_order() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
