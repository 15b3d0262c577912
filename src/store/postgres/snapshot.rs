//! Consistent snapshots of a PostgreSQL store (backups, `keyward migrate`).
//!
//! Placeholder: the export is written on the `pgmigrate` branch (it replaces
//! this file). Until it is merged, a snapshot of a PostgreSQL store is
//! refused with a clear error instead of writing a partial backup.

use crate::store::snapshot::{SnapshotInfo, SnapshotSink};
use crate::store::{DatabaseError, StoreError};

/// Streams every table to `sink` from one read transaction.
pub async fn export(
    client: &mut tokio_postgres::Client,
    sink: Box<dyn SnapshotSink>,
) -> Result<SnapshotInfo, StoreError> {
    let _ = (client, sink);
    Err(DatabaseError::Unsupported(
        "snapshots (backups) of a PostgreSQL store are not supported by this build yet",
    )
    .into())
}
