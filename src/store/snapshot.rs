//! Consistent logical snapshots of the whole store, for backups: every
//! table's rows as JSON lines, read inside one read transaction so that
//! they are one moment's state (an audit chain that ends where the rows do).
//!
//! Row encoding (one JSON array per line, values in column order): SQL NULL
//! is `null`, an integer a JSON integer, a real a JSON number with a
//! fraction or exponent, text a JSON string, a blob `{"b": "<base64>"}`.
//! Backends without SQLite's dynamic typing map their types onto these.

use crate::store::KeyRecord;
use serde::{Deserialize, Serialize};

/// Where snapshot rows go, chunk by chunk (the backup writes them into the
/// archive as they come). Runs on the store's blocking reader thread: a
/// slow sink holds the read transaction open, nothing else.
pub trait SnapshotSink: Send + 'static {
    /// The rows of `table` follow, with these columns.
    fn table(&mut self, table: &str, columns: &[String]) -> std::io::Result<()>;
    /// `rows` rows of `table` as JSON lines (each line ends with `\n`).
    fn rows(&mut self, table: &str, jsonl: Vec<u8>, rows: u64) -> std::io::Result<()>;
}

/// Rows per table and what else the backup needs to know about the moment
/// the snapshot shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The backend that wrote it (`sqlite`).
    pub backend: String,
    pub schema_version: i64,
    /// Table name → rows, in the order they were written.
    pub tables: Vec<TableInfo>,
    /// The audit chain's last sequence number and hash (hex) in the snapshot.
    pub audit_head_seq: i64,
    pub audit_head_hash: String,
    /// The key rows as the snapshot holds them (the backup wraps these).
    #[serde(skip)]
    pub keys: Vec<KeyRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TableInfo {
    pub name: String,
    pub columns: Vec<String>,
    pub rows: u64,
}

/// Tables left out of snapshots: state that belongs to the running
/// deployment, not to what it has done (the scheduler lease).
pub const NOT_SNAPSHOTTED: &[&str] = &["leases"];

/// A chunk ends once it holds this many bytes (rows are never split).
pub const CHUNK_BYTES: usize = 8 << 20;
