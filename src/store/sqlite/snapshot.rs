//! SQLite snapshots: export inside one read transaction (WAL readers see
//! one moment and never block the writer), and import into a fresh
//! database file for a restore.

use super::{db, migrate, reads};
use crate::store::snapshot::{CHUNK_BYTES, NOT_SNAPSHOTTED, SnapshotInfo, SnapshotSink, TableInfo};
use crate::store::{DatabaseError, StoreError};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, params_from_iter};
use std::io::Write as _;

type R<T> = Result<T, StoreError>;

fn sink_err(e: std::io::Error) -> StoreError {
    StoreError::Database(DatabaseError::Snapshot(e))
}

/// The tables a snapshot holds, in creation order.
fn tables(c: &Connection) -> R<Vec<String>> {
    let mut stmt = c
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid",
        )
        .map_err(db)?;
    let names = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    Ok(names
        .into_iter()
        .filter(|n| !NOT_SNAPSHOTTED.contains(&n.as_str()))
        .collect())
}

fn columns(c: &Connection, table: &str) -> R<Vec<String>> {
    let stmt = c
        .prepare(&format!("SELECT * FROM \"{table}\" LIMIT 0"))
        .map_err(db)?;
    Ok(stmt.column_names().iter().map(|s| s.to_string()).collect())
}

/// Exports every table to `sink` inside one read transaction.
pub(super) fn export(c: &Connection, sink: &mut dyn SnapshotSink) -> R<SnapshotInfo> {
    c.execute_batch("BEGIN DEFERRED").map_err(db)?;
    let out = export_in_tx(c, sink);
    // A read transaction: nothing to keep; ending it releases the snapshot.
    let _ = c.execute_batch("COMMIT");
    out
}

fn export_in_tx(c: &Connection, sink: &mut dyn SnapshotSink) -> R<SnapshotInfo> {
    let schema_version = migrate::check_version(c)?;
    let mut info = SnapshotInfo {
        backend: "sqlite".into(),
        schema_version,
        tables: Vec::new(),
        audit_head_seq: 0,
        audit_head_hash: String::new(),
        keys: Vec::new(),
    };
    for table in tables(c)? {
        let cols = columns(c, &table)?;
        sink.table(&table, &cols).map_err(sink_err)?;
        let mut stmt = c
            .prepare(&format!("SELECT * FROM \"{table}\" ORDER BY rowid"))
            .map_err(db)?;
        let n = cols.len();
        let mut rows = stmt.query([]).map_err(db)?;
        let mut buf: Vec<u8> = Vec::with_capacity(CHUNK_BYTES + 64 * 1024);
        let (mut in_chunk, mut total) = (0u64, 0u64);
        while let Some(row) = rows.next().map_err(db)? {
            buf.push(b'[');
            for i in 0..n {
                if i > 0 {
                    buf.push(b',');
                }
                write_value(&mut buf, row.get_ref(i).map_err(db)?)?;
            }
            buf.extend_from_slice(b"]\n");
            in_chunk += 1;
            total += 1;
            if buf.len() >= CHUNK_BYTES {
                let full = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK_BYTES + 64 * 1024));
                sink.rows(&table, full, in_chunk).map_err(sink_err)?;
                in_chunk = 0;
            }
        }
        if in_chunk > 0 {
            sink.rows(&table, buf, in_chunk).map_err(sink_err)?;
        }
        info.tables.push(TableInfo {
            name: table,
            columns: cols,
            rows: total,
        });
    }
    // The keys and the chain head as this same transaction sees them.
    info.keys = reads::list_keys(c)?;
    let head: Option<(i64, Vec<u8>)> = c
        .query_row(
            "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .map_err(db)?;
    if let Some((seq, hash)) = head {
        info.audit_head_seq = seq;
        info.audit_head_hash = hex::encode(hash);
    }
    Ok(info)
}

fn write_value(buf: &mut Vec<u8>, v: ValueRef<'_>) -> R<()> {
    let io = |e: std::io::Error| sink_err(e);
    match v {
        ValueRef::Null => buf.extend_from_slice(b"null"),
        ValueRef::Integer(i) => write!(buf, "{i}").map_err(io)?,
        ValueRef::Real(f) => {
            if !f.is_finite() {
                return Err(StoreError::Corrupt(format!(
                    "a non-finite real ({f}) cannot be exported"
                )));
            }
            // Always with a fraction or exponent, so that it reads back as a real.
            let s = format!("{f:?}");
            buf.extend_from_slice(s.as_bytes());
        }
        ValueRef::Text(t) => {
            let s = std::str::from_utf8(t)
                .map_err(|e| StoreError::Corrupt(format!("text that is not UTF-8: {e}")))?;
            serde_json::to_writer(&mut *buf, s)
                .map_err(|e| StoreError::Corrupt(format!("text: {e}")))?;
        }
        ValueRef::Blob(b) => {
            buf.extend_from_slice(b"{\"b\":\"");
            let start = buf.len();
            let len = base64::encoded_len(b.len(), true)
                .ok_or_else(|| StoreError::Corrupt("a blob too large to encode".into()))?;
            buf.resize(start + len, 0);
            let written = B64
                .encode_slice(b, &mut buf[start..])
                .map_err(|e| StoreError::Corrupt(format!("blob: {e}")))?;
            buf.truncate(start + written);
            buf.extend_from_slice(b"\"}");
        }
    }
    Ok(())
}

/// Why a snapshot line could not be imported.
fn bad_row(table: &str, line: u64, why: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("snapshot table {table}, row {line}: {why}"))
}

fn json_to_value(table: &str, line: u64, v: serde_json::Value) -> R<Value> {
    Ok(match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Integer(i)
            } else if let Some(f) = n.as_f64() {
                Value::Real(f)
            } else {
                return Err(bad_row(table, line, "a number out of range"));
            }
        }
        serde_json::Value::String(s) => Value::Text(s),
        serde_json::Value::Object(mut o) => match (o.remove("b"), o.is_empty()) {
            (Some(serde_json::Value::String(b)), true) => Value::Blob(
                B64.decode(b.as_bytes())
                    .map_err(|e| bad_row(table, line, format!("blob: {e}")))?,
            ),
            _ => return Err(bad_row(table, line, "an object that is not a blob")),
        },
        _ => return Err(bad_row(table, line, "a value of an unknown type")),
    })
}

/// A CA as a snapshot being imported holds it.
#[derive(Debug, Clone)]
pub struct ImportedCa {
    pub name: String,
    /// `root` or `issuing`.
    pub kind: String,
    pub parent: Option<String>,
    pub certificate_der: Vec<u8>,
    /// Its key's DER SubjectPublicKeyInfo.
    pub public_key_der: Vec<u8>,
}

/// A snapshot being loaded into a fresh database file: created at the
/// snapshot's schema version, filled inside one transaction, then migrated
/// to this build's version. Dropped before [`Import::finish`], it leaves a
/// file the caller deletes.
pub struct Import {
    conn: Connection,
    path: std::path::PathBuf,
    table: Option<(String, String, usize)>,
    rows: std::collections::BTreeMap<String, u64>,
    /// Time spent parsing and inserting rows (logged at debug by `finish`).
    inserting: std::time::Duration,
}

impl Import {
    /// Creates `path` (absent, or an empty file) at `schema_version`.
    pub fn create(path: &std::path::Path, schema_version: i64) -> R<Self> {
        // An empty file is the caller's claim on the path (created
        // exclusively); anything with content is someone's database.
        if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
            return Err(StoreError::Corrupt(format!(
                "{} already exists; refusing to import over it",
                path.display()
            )));
        }
        let mut conn = super::connect(path, false)?;
        migrate::migrate_to(&mut conn, schema_version)?;
        // The file is new, private to this restore, deleted by the caller on
        // any failure, and only a finished import is moved into place (after
        // `finish` has synced it to disk). SQLite's journal and its fsyncs
        // would protect nothing here, and a WAL would hold the whole
        // multi-GB load a second time: off for the one-shot load. A larger
        // page cache keeps the random-keyed indexes (SPKI hashes) in memory.
        conn.execute_batch(
            "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;",
        )
        .map_err(db)?;
        // Foreign keys are checked once, at the end (rows arrive table by table).
        conn.execute_batch("PRAGMA foreign_keys = OFF; BEGIN IMMEDIATE")
            .map_err(db)?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
            table: None,
            rows: Default::default(),
            inserting: std::time::Duration::ZERO,
        })
    }

    /// The rows of `table` follow, with these columns (the snapshot's; a
    /// column this schema lacks is refused).
    pub fn table(&mut self, table: &str, columns: &[String]) -> R<()> {
        let have = tables(&self.conn)?;
        if !have.iter().any(|t| t == table) {
            return Err(StoreError::Corrupt(format!(
                "the snapshot has a table `{table}` this schema version lacks"
            )));
        }
        let known = super::snapshot::columns(&self.conn, table)?;
        if let Some(c) = columns.iter().find(|c| !known.contains(c)) {
            return Err(StoreError::Corrupt(format!(
                "the snapshot's table `{table}` has a column `{c}` this schema version lacks"
            )));
        }
        let quoted: Vec<String> = columns.iter().map(|c| format!("\"{c}\"")).collect();
        let marks: Vec<String> = (1..=columns.len()).map(|i| format!("?{i}")).collect();
        let sql = format!(
            "INSERT INTO \"{table}\" ({}) VALUES ({})",
            quoted.join(", "),
            marks.join(", ")
        );
        self.table = Some((table.to_string(), sql, columns.len()));
        self.rows.entry(table.to_string()).or_insert(0);
        Ok(())
    }

    /// Inserts JSON-lines rows of the current table.
    pub fn rows(&mut self, jsonl: &[u8]) -> R<u64> {
        let Some((table, sql, width)) = &self.table else {
            return Err(StoreError::Corrupt("rows before their table".into()));
        };
        let started = std::time::Instant::now();
        let mut stmt = self.conn.prepare_cached(sql).map_err(db)?;
        let counted = self.rows.get(table).copied().unwrap_or(0);
        let mut n = 0u64;
        for line in jsonl.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let at = counted + n + 1;
            let values: Vec<serde_json::Value> =
                serde_json::from_slice(line).map_err(|e| bad_row(table, at, e))?;
            if values.len() != *width {
                return Err(bad_row(
                    table,
                    at,
                    format!("{} values for {width} columns", values.len()),
                ));
            }
            let values = values
                .into_iter()
                .map(|v| json_to_value(table, at, v))
                .collect::<R<Vec<_>>>()?;
            stmt.execute(params_from_iter(values)).map_err(db)?;
            n += 1;
        }
        if let Some(c) = self.rows.get_mut(table) {
            *c += n;
        }
        drop(stmt);
        self.inserting += started.elapsed();
        Ok(n)
    }

    /// Every CA as imported, with its key's public key, for the restore's
    /// consistency and root-pin checks before the import is committed.
    pub fn cas(&self) -> R<Vec<ImportedCa>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT c.name, c.kind, c.parent, c.certificate, k.public_key
                 FROM cas c JOIN keys k ON k.id = c.key_id ORDER BY c.rowid",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(ImportedCa {
                    name: r.get(0)?,
                    kind: r.get(1)?,
                    parent: r.get(2)?,
                    certificate_der: r.get(3)?,
                    public_key_der: r.get(4)?,
                })
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(rows)
    }

    /// Rows imported per table so far.
    pub fn counts(&self) -> &std::collections::BTreeMap<String, u64> {
        &self.rows
    }

    /// Commits, checks every foreign key, migrates the file to this
    /// build's schema version, and commits `change` (the restore's own
    /// writes and audit event, chained after the imported chain) in a
    /// second transaction. The file is then a complete store; until this
    /// returns it is not one, and the caller deletes it on error.
    pub fn finish(self, change: crate::store::Change, at_ms: i64) -> R<Vec<i64>> {
        let mut conn = self.conn;
        let t = std::time::Instant::now();
        conn.execute_batch("COMMIT").map_err(db)?;
        let commit = t.elapsed();
        let t = std::time::Instant::now();
        let broken: Option<String> = conn
            .query_row("PRAGMA foreign_key_check", [], |r| r.get::<_, String>(0))
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })
            .map_err(db)?;
        if let Some(t) = broken {
            return Err(StoreError::Corrupt(format!(
                "the snapshot's rows in `{t}` refer to rows it does not hold"
            )));
        }
        let fk_check = t.elapsed();
        conn.execute_batch("PRAGMA foreign_keys = ON").map_err(db)?;
        let t = std::time::Instant::now();
        migrate::migrate(&mut conn)?;
        let migrating = t.elapsed();
        let t = std::time::Instant::now();
        // Keys whose generation had not completed when the snapshot was
        // taken: start-up reconciliation would destroy an HSM object with
        // their id, which on the original token may by now be a live key.
        // They are recorded as destroyed instead, and their objects left alone.
        let generating: Vec<String> = {
            let mut stmt = conn
                .prepare("SELECT id FROM keys WHERE state = 'generating'")
                .map_err(db)?;
            stmt.query_map([], |r| r.get::<_, String>(0))
                .map_err(db)?
                .collect::<Result<_, _>>()
                .map_err(db)?
        };
        let mut change = change;
        for id in generating {
            let id = uuid::Uuid::parse_str(&id)
                .map_err(|e| StoreError::Corrupt(format!("key id {id}: {e}")))?;
            change = change
                .write(crate::store::Write::SetKeyState {
                    id,
                    from: crate::model::KeyState::Generating,
                    to: crate::model::KeyState::Destroyed,
                    at: at_ms / 1000,
                })
                .audit(
                    crate::audit::AuditDraft::new("system", "key.reconcile", format!("key:{id}"))
                        .details(serde_json::json!({
                            "reason": "its generation had not completed when the backup was made; recorded destroyed by the restore, the HSM object (if any) left alone",
                            "hsm_object_destroyed": false,
                        })),
                );
        }
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db)?;
        let (seq, head): (i64, Vec<u8>) = tx
            .query_row(
                "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })
            .map_err(db)?
            .unwrap_or((0, crate::audit::GENESIS_HASH.to_vec()));
        let (seqs, _) = super::writer::apply(&tx, &change, seq, &head, at_ms)?;
        tx.commit().map_err(db)?;
        // Back to the daemon's journal, then onto the disk before the caller
        // renames the file into place.
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
            .map_err(db)?;
        // Closing checkpoints the WAL into the file; its failure (a full
        // disk) fails the restore.
        conn.close().map_err(|(_, e)| db(e))?;
        std::fs::File::open(&self.path)
            .and_then(|f| f.sync_all())
            .map_err(sink_err)?;
        let syncing = t.elapsed();
        tracing::debug!(
            inserting_ms = self.inserting.as_millis() as u64,
            commit_ms = commit.as_millis() as u64,
            foreign_key_check_ms = fk_check.as_millis() as u64,
            migrate_ms = migrating.as_millis() as u64,
            restore_event_and_sync_ms = syncing.as_millis() as u64,
            "snapshot import finished"
        );
        Ok(seqs)
    }
}
