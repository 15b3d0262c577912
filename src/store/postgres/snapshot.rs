//! PostgreSQL snapshots: export inside one `REPEATABLE READ READ ONLY`
//! transaction in the backend-neutral row encoding of
//! [`crate::store::snapshot`], and [`PgImporter`], which loads a snapshot
//! (from either backend) into an empty PostgreSQL database with `COPY`.
//!
//! Backend-neutral means: the same tables in the same order with the same
//! columns as the SQLite exporter writes, booleans as the integers 0/1 (what
//! SQLite stores), `BYTEA` as `{"b": base64}`. A snapshot of either backend
//! restores into the other.

use crate::audit::{AuditEvent, GENESIS_HASH};
use crate::model::{KeyHandle, KeyPurpose, KeyState};
use crate::store::records::KeyRecord;
use crate::store::snapshot::{CHUNK_BYTES, NOT_SNAPSHOTTED, SnapshotInfo, SnapshotSink, TableInfo};
use crate::store::sqlite::snapshot::ImportedCa;
use crate::store::{Change, DatabaseError, StoreError};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures::SinkExt as _;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::pin::Pin;
use tokio_postgres::{Client, CopyInSink, GenericClient, IsolationLevel, Row, Transaction};

type R<T> = Result<T, StoreError>;

fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError::Database(DatabaseError::Postgres(e))
}

fn sink_err(e: std::io::Error) -> StoreError {
    StoreError::Database(DatabaseError::Snapshot(e))
}

/// The snapshot's table order: the SQLite exporter's (creation order across
/// the SQLite migrations, `sqlite_master` rowid), so that a snapshot lists
/// its tables the same way whichever backend wrote it. A unit test compares
/// it with both schemas; a new table is added here in the SQLite order.
pub const TABLE_ORDER: &[&str] = &[
    "keys",
    "cas",
    "admins",
    "approvals",
    "devices",
    "certificates",
    "audit_events",
    "admin_requests",
    "crls",
    "service_certificates",
    "renewal_allowances",
    "registrations",
    "enrollment_tokens",
    "device_identities",
    "jwt_replay",
    "broker_outbox",
    "rotations",
    "leases",
    "backups",
    "backup_replicas",
    "audit_checkpoints",
    "audit_data_keys",
];

/// The PostgreSQL backend's own bookkeeping (schema versions), not state:
/// never exported, never imported.
const BOOKKEEPING: &[&str] = &["keyward_schema"];

/// A column type as the snapshot encoding knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColType {
    BigInt,
    Int,
    SmallInt,
    Text,
    Bytea,
    Bool,
    Double,
    Real,
}

impl ColType {
    fn from_information_schema(table: &str, column: &str, data_type: &str) -> R<Self> {
        Ok(match data_type {
            "bigint" => Self::BigInt,
            "integer" => Self::Int,
            "smallint" => Self::SmallInt,
            "text" | "character varying" => Self::Text,
            "bytea" => Self::Bytea,
            "boolean" => Self::Bool,
            "double precision" => Self::Double,
            "real" => Self::Real,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "column {table}.{column} has type `{other}`, which snapshots cannot encode"
                )));
            }
        })
    }
}

/// Table → (column, type) in column order, for the tables of the current
/// schema (bookkeeping left out).
async fn catalogue<C: GenericClient>(c: &C) -> R<BTreeMap<String, Vec<(String, ColType)>>> {
    let rows = c
        .query(
            "SELECT table_name::text, column_name::text, data_type::text
             FROM information_schema.columns
             WHERE table_schema = current_schema()
             ORDER BY table_name, ordinal_position",
            &[],
        )
        .await
        .map_err(pg)?;
    let mut out: BTreeMap<String, Vec<(String, ColType)>> = BTreeMap::new();
    for r in rows {
        let (table, column, ty): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        if BOOKKEEPING.contains(&table.as_str()) {
            continue;
        }
        let ty = ColType::from_information_schema(&table, &column, &ty)?;
        out.entry(table).or_default().push((column, ty));
    }
    Ok(out)
}

/// The catalogue's tables in [`TABLE_ORDER`]; a table missing from the
/// order (a schema change that forgot it) or from the database is an error,
/// not a snapshot that silently lacks it.
fn ordered(cat: &BTreeMap<String, Vec<(String, ColType)>>) -> R<Vec<String>> {
    if let Some(t) = cat.keys().find(|t| !TABLE_ORDER.contains(&t.as_str())) {
        return Err(StoreError::Corrupt(format!(
            "table `{t}` is not in the snapshot table order (src/store/postgres/snapshot.rs)"
        )));
    }
    if let Some(t) = TABLE_ORDER.iter().find(|t| !cat.contains_key(**t)) {
        return Err(StoreError::Corrupt(format!(
            "the database lacks table `{t}` of the snapshot table order"
        )));
    }
    Ok(TABLE_ORDER.iter().map(|t| t.to_string()).collect())
}

/// The schema version recorded in `keyward_schema` (0: no keyward schema).
async fn schema_version<C: GenericClient>(c: &C) -> R<i64> {
    let exists: bool = c
        .query_one("SELECT to_regclass('keyward_schema') IS NOT NULL", &[])
        .await
        .map_err(pg)?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(c.query_one(
        "SELECT COALESCE(MAX(version), 0)::bigint FROM keyward_schema",
        &[],
    )
    .await
    .map_err(pg)?
    .get(0))
}

/// The primary key's columns of `table`, in key order (the export's row
/// order; SQLite's is insertion order, which no reader relies on).
async fn primary_key<C: GenericClient>(c: &C, table: &str) -> R<Vec<String>> {
    let rows = c
        .query(
            "SELECT a.attname::text
             FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
             WHERE i.indrelid = to_regclass(quote_ident($1)) AND i.indisprimary
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&table],
        )
        .await
        .map_err(pg)?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// What the exporting task hands the blocking sink thread.
enum Chunk {
    Table(String, Vec<String>),
    Rows(String, Vec<u8>, u64),
}

/// Rows fetched per round trip (a portal keeps memory bounded: a plain
/// query would buffer a whole table client-side).
const FETCH_ROWS: i32 = 2000;

/// Exports every table but [`NOT_SNAPSHOTTED`] to `sink` from one
/// `REPEATABLE READ READ ONLY` transaction (one moment's state, taking no
/// lock that blocks writers). The sink is synchronous and may block: it runs
/// on a blocking thread fed through a small channel, so a slow sink holds
/// the transaction open and nothing else.
pub async fn export(client: &mut Client, sink: Box<dyn SnapshotSink>) -> R<SnapshotInfo> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg)?;
    let (chunks, mut rx) = tokio::sync::mpsc::channel::<Chunk>(2);
    let worker = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut sink = sink;
        while let Some(c) = rx.blocking_recv() {
            match c {
                Chunk::Table(t, cols) => sink.table(&t, &cols)?,
                Chunk::Rows(t, buf, n) => sink.rows(&t, buf, n)?,
            }
        }
        Ok(())
    });
    let produced = export_in_tx(&tx, &chunks).await;
    drop(chunks);
    let sunk = worker
        .await
        .map_err(|e| StoreError::Database(DatabaseError::ReaderTask(e)))?;
    // Nothing was written: ending the read transaction releases its snapshot.
    let _ = tx.rollback().await;
    // The sink's own error explains a closed channel better than the channel.
    sunk.map_err(sink_err)?;
    produced
}

async fn export_in_tx(
    tx: &Transaction<'_>,
    chunks: &tokio::sync::mpsc::Sender<Chunk>,
) -> R<SnapshotInfo> {
    let stopped = || sink_err(std::io::Error::other("the snapshot sink stopped"));
    let schema_version = schema_version(tx).await?;
    if schema_version == 0 {
        return Err(StoreError::Corrupt(
            "the database holds no keyward schema".into(),
        ));
    }
    let cat = catalogue(tx).await?;
    let mut info = SnapshotInfo {
        backend: "postgres".into(),
        schema_version,
        tables: Vec::new(),
        audit_head_seq: 0,
        audit_head_hash: String::new(),
        keys: Vec::new(),
    };
    for table in ordered(&cat)? {
        if NOT_SNAPSHOTTED.contains(&table.as_str()) {
            continue;
        }
        let cols = cat.get(&table).cloned().unwrap_or_default();
        let names: Vec<String> = cols.iter().map(|(n, _)| n.clone()).collect();
        chunks
            .send(Chunk::Table(table.clone(), names.clone()))
            .await
            .map_err(|_| stopped())?;
        let key = primary_key(tx, &table).await?;
        let order = if key.is_empty() {
            String::new()
        } else {
            let k: Vec<String> = key.iter().map(|c| quote(c)).collect();
            format!(" ORDER BY {}", k.join(", "))
        };
        let select: Vec<String> = names.iter().map(|c| quote(c)).collect();
        let stmt = tx
            .prepare(&format!(
                "SELECT {} FROM {}{order}",
                select.join(", "),
                quote(&table)
            ))
            .await
            .map_err(pg)?;
        let portal = tx.bind(&stmt, &[]).await.map_err(pg)?;
        let mut buf: Vec<u8> = Vec::with_capacity(CHUNK_BYTES + 64 * 1024);
        let (mut in_chunk, mut total) = (0u64, 0u64);
        loop {
            let rows = tx.query_portal(&portal, FETCH_ROWS).await.map_err(pg)?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                buf.push(b'[');
                for (i, (_, ty)) in cols.iter().enumerate() {
                    if i > 0 {
                        buf.push(b',');
                    }
                    write_value(&mut buf, row, i, *ty)?;
                }
                buf.extend_from_slice(b"]\n");
                in_chunk += 1;
                total += 1;
                if buf.len() >= CHUNK_BYTES {
                    let full =
                        std::mem::replace(&mut buf, Vec::with_capacity(CHUNK_BYTES + 64 * 1024));
                    chunks
                        .send(Chunk::Rows(table.clone(), full, in_chunk))
                        .await
                        .map_err(|_| stopped())?;
                    in_chunk = 0;
                }
            }
            if rows.len() < FETCH_ROWS as usize {
                break;
            }
        }
        if in_chunk > 0 {
            chunks
                .send(Chunk::Rows(table.clone(), buf, in_chunk))
                .await
                .map_err(|_| stopped())?;
        }
        info.tables.push(TableInfo {
            name: table,
            columns: names,
            rows: total,
        });
    }
    // The keys and the chain head as this same transaction sees them.
    info.keys = list_keys(tx).await?;
    if let Some(r) = tx
        .query_opt(
            "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(pg)?
    {
        info.audit_head_seq = r.get(0);
        info.audit_head_hash = hex::encode(r.get::<_, Vec<u8>>(1));
    }
    Ok(info)
}

fn write_value(buf: &mut Vec<u8>, row: &Row, i: usize, ty: ColType) -> R<()> {
    let io = |e: std::io::Error| sink_err(e);
    let get = |e: tokio_postgres::Error| pg(e);
    match ty {
        ColType::BigInt => match row.try_get::<_, Option<i64>>(i).map_err(get)? {
            Some(v) => write!(buf, "{v}").map_err(io)?,
            None => buf.extend_from_slice(b"null"),
        },
        ColType::Int => match row.try_get::<_, Option<i32>>(i).map_err(get)? {
            Some(v) => write!(buf, "{v}").map_err(io)?,
            None => buf.extend_from_slice(b"null"),
        },
        ColType::SmallInt => match row.try_get::<_, Option<i16>>(i).map_err(get)? {
            Some(v) => write!(buf, "{v}").map_err(io)?,
            None => buf.extend_from_slice(b"null"),
        },
        // SQLite stores flags as the integers 0 and 1: so does the snapshot.
        ColType::Bool => match row.try_get::<_, Option<bool>>(i).map_err(get)? {
            Some(v) => buf.push(if v { b'1' } else { b'0' }),
            None => buf.extend_from_slice(b"null"),
        },
        ColType::Double | ColType::Real => {
            let v = if ty == ColType::Double {
                row.try_get::<_, Option<f64>>(i).map_err(get)?
            } else {
                row.try_get::<_, Option<f32>>(i)
                    .map_err(get)?
                    .map(f64::from)
            };
            match v {
                Some(f) if !f.is_finite() => {
                    return Err(StoreError::Corrupt(format!(
                        "a non-finite real ({f}) cannot be exported"
                    )));
                }
                // As the SQLite exporter: always with a fraction or exponent.
                Some(f) => buf.extend_from_slice(format!("{f:?}").as_bytes()),
                None => buf.extend_from_slice(b"null"),
            }
        }
        ColType::Text => match row.try_get::<_, Option<&str>>(i).map_err(get)? {
            Some(s) => serde_json::to_writer(&mut *buf, s)
                .map_err(|e| StoreError::Corrupt(format!("text: {e}")))?,
            None => buf.extend_from_slice(b"null"),
        },
        ColType::Bytea => match row.try_get::<_, Option<&[u8]>>(i).map_err(get)? {
            Some(b) => {
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
            None => buf.extend_from_slice(b"null"),
        },
    }
    Ok(())
}

/// The key rows (the backup wraps these), decoded as the stores decode them.
async fn list_keys<C: GenericClient>(c: &C) -> R<Vec<KeyRecord>> {
    let rows = c
        .query(
            "SELECT id, label, purpose, algorithm, backend, handle, public_key, state, ca_name,
                    created_at, updated_at, keystore
             FROM keys ORDER BY id",
            &[],
        )
        .await
        .map_err(pg)?;
    let bad = |what: &str, v: &str| StoreError::Corrupt(format!("key row: invalid {what} `{v}`"));
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let id: String = r.try_get(0).map_err(pg)?;
        let purpose: String = r.try_get(2).map_err(pg)?;
        let algorithm: String = r.try_get(3).map_err(pg)?;
        let state: String = r.try_get(7).map_err(pg)?;
        out.push(KeyRecord {
            id: uuid::Uuid::parse_str(&id).map_err(|_| bad("id", &id))?,
            label: r.try_get(1).map_err(pg)?,
            purpose: KeyPurpose::parse(&purpose).ok_or_else(|| bad("purpose", &purpose))?,
            algorithm: algorithm
                .parse()
                .map_err(|_| bad("algorithm", &algorithm))?,
            backend: r.try_get(4).map_err(pg)?,
            handle: KeyHandle(r.try_get(5).map_err(pg)?),
            public_key_der: r.try_get(6).map_err(pg)?,
            state: KeyState::parse(&state).ok_or_else(|| bad("state", &state))?,
            ca_name: r.try_get(8).map_err(pg)?,
            created_at: r.try_get(9).map_err(pg)?,
            updated_at: r.try_get(10).map_err(pg)?,
            keystore: r.try_get(11).map_err(pg)?,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Import.

/// Why an import was refused before anything was loaded. The transaction is
/// rolled back: the target is left exactly as it was.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the target database is not empty ({0}); import only into an empty database")]
    NotEmpty(String),
    #[error(
        "the target database holds tables that are not keyward's ({0}); import only into an empty database"
    )]
    ForeignTables(String),
    #[error(
        "schema version mismatch: the snapshot is at version {snapshot}, the target database at version {target}"
    )]
    SchemaMismatch { snapshot: i64, target: i64 },
    #[error(
        "this build creates PostgreSQL schema version {supported}; a snapshot at version {found} cannot be loaded (bring the source to version {supported} first)"
    )]
    SchemaUnsupported { found: i64, supported: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ImportError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotEmpty(_) => "target_not_empty",
            Self::ForeignTables(_) => "target_not_empty",
            Self::SchemaMismatch { .. } => "schema_mismatch",
            Self::SchemaUnsupported { .. } => "schema_mismatch",
            Self::Store(e) => e.code(),
        }
    }
}

/// The table being loaded.
struct Loading {
    table: String,
    types: Vec<ColType>,
    sink: Pin<Box<CopyInSink<Bytes>>>,
}

/// A snapshot being loaded into an empty PostgreSQL database, all in one
/// transaction: the schema (if the database has none), every row by `COPY`,
/// the foreign keys checked once at the end, the caller's audit events
/// chained after the imported head, one commit. Dropped before
/// [`PgImporter::finish`], it rolls back and leaves the database as it was.
///
/// Foreign keys are dropped for the load and added back (which validates
/// every row) by `finish`: the snapshot's table order is SQLite's creation
/// order, in which `approvals` comes before the `registrations` it refers to,
/// and the schema's constraints are not deferrable.
pub struct PgImporter<'c> {
    tx: Transaction<'c>,
    catalogue: BTreeMap<String, Vec<(String, ColType)>>,
    /// (table, constraint name, definition) of every foreign key dropped.
    foreign_keys: Vec<(String, String, String)>,
    loading: Option<Loading>,
    rows: BTreeMap<String, u64>,
    /// Time spent encoding and sending rows (logged at debug by `finish`).
    inserting: std::time::Duration,
}

impl<'c> PgImporter<'c> {
    /// Opens the import transaction on `client`: creates the schema at
    /// `schema_version` in a database without tables, or accepts one whose
    /// keyward schema is at that version and whose every table is empty.
    /// Anything else is refused, with nothing written.
    pub async fn create(client: &'c mut Client, schema_version: i64) -> Result<Self, ImportError> {
        if schema_version != super::migrate::SUPPORTED {
            return Err(ImportError::SchemaUnsupported {
                found: schema_version,
                supported: super::migrate::SUPPORTED,
            });
        }
        let tx = client.transaction().await.map_err(pg)?;
        // A daemon that writes meanwhile waits for the import to end (every
        // write transaction takes this lock before reading the chain head).
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&super::writer::WRITE_LOCK],
        )
        .await
        .map_err(pg)?;
        let tables: Vec<String> = tx
            .query(
                "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1",
                &[],
            )
            .await
            .map_err(pg)?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        if tables.is_empty() {
            // The schema, in this transaction and under the migration lock:
            // daemons starting on this database meanwhile wait for the
            // import to end instead of racing it.
            super::migrate::migrate_in(&tx).await?;
        } else {
            let found = schema_version_of(&tx).await?;
            if found == 0 {
                return Err(ImportError::ForeignTables(tables.join(", ")));
            }
            if found != schema_version {
                return Err(ImportError::SchemaMismatch {
                    snapshot: schema_version,
                    target: found,
                });
            }
        }
        let catalogue = catalogue(&tx).await?;
        ordered(&catalogue)?;
        // Every table empty, `leases` included: a lease row means a daemon
        // already runs on this database.
        let mut held = Vec::new();
        for t in catalogue.keys() {
            let n: i64 = tx
                .query_one(&format!("SELECT COUNT(*) FROM {}", quote(t)), &[])
                .await
                .map_err(pg)?
                .get(0);
            if n > 0 {
                held.push(format!("{t}: {n} rows"));
            }
        }
        if !held.is_empty() {
            return Err(ImportError::NotEmpty(held.join(", ")));
        }
        let foreign_keys: Vec<(String, String, String)> = tx
            .query(
                "SELECT c.relname::text, k.conname::text, pg_get_constraintdef(k.oid)
                 FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
                 WHERE k.contype = 'f' AND k.connamespace = current_schema()::regnamespace
                 ORDER BY c.relname, k.conname",
                &[],
            )
            .await
            .map_err(pg)?
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        for (table, name, _) in &foreign_keys {
            tx.batch_execute(&format!(
                "ALTER TABLE {} DROP CONSTRAINT {}",
                quote(table),
                quote(name)
            ))
            .await
            .map_err(pg)?;
        }
        Ok(Self {
            tx,
            catalogue,
            foreign_keys,
            loading: None,
            rows: BTreeMap::new(),
            inserting: std::time::Duration::ZERO,
        })
    }

    /// Ends the `COPY` of the table being loaded, if any.
    async fn end_copy(&mut self) -> R<()> {
        if let Some(mut l) = self.loading.take() {
            l.sink.as_mut().finish().await.map_err(pg)?;
        }
        Ok(())
    }

    /// The rows of `table` follow, with these columns (the snapshot's; a
    /// table or column this schema lacks is refused).
    pub async fn table(&mut self, table: &str, columns: &[String]) -> R<()> {
        self.end_copy().await?;
        if NOT_SNAPSHOTTED.contains(&table) {
            return Err(StoreError::Corrupt(format!(
                "the snapshot holds table `{table}`, which snapshots leave out"
            )));
        }
        let Some(known) = self.catalogue.get(table) else {
            return Err(StoreError::Corrupt(format!(
                "the snapshot has a table `{table}` this schema version lacks"
            )));
        };
        let mut types = Vec::with_capacity(columns.len());
        for c in columns {
            match known.iter().find(|(n, _)| n == c) {
                Some((_, ty)) => types.push(*ty),
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "the snapshot's table `{table}` has a column `{c}` this schema version lacks"
                    )));
                }
            }
        }
        let quoted: Vec<String> = columns.iter().map(|c| quote(c)).collect();
        let sink = self
            .tx
            .copy_in::<_, Bytes>(&format!(
                "COPY {} ({}) FROM STDIN",
                quote(table),
                quoted.join(", ")
            ))
            .await
            .map_err(pg)?;
        self.loading = Some(Loading {
            table: table.to_string(),
            types,
            sink: Box::pin(sink),
        });
        self.rows.entry(table.to_string()).or_insert(0);
        Ok(())
    }

    /// Loads JSON-lines rows of the current table; returns how many.
    pub async fn rows(&mut self, jsonl: &[u8]) -> R<u64> {
        let Some(l) = self.loading.as_mut() else {
            return Err(StoreError::Corrupt("rows before their table".into()));
        };
        let started = std::time::Instant::now();
        let counted = self.rows.get(&l.table).copied().unwrap_or(0);
        let mut out: Vec<u8> = Vec::with_capacity(jsonl.len() + jsonl.len() / 4);
        let mut n = 0u64;
        for line in jsonl.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let at = counted + n + 1;
            let values: Vec<serde_json::Value> =
                serde_json::from_slice(line).map_err(|e| bad_row(&l.table, at, e))?;
            if values.len() != l.types.len() {
                return Err(bad_row(
                    &l.table,
                    at,
                    format!("{} values for {} columns", values.len(), l.types.len()),
                ));
            }
            for (i, (v, ty)) in values.into_iter().zip(&l.types).enumerate() {
                if i > 0 {
                    out.push(b'\t');
                }
                copy_value(&mut out, *ty, v).map_err(|why| bad_row(&l.table, at, why))?;
            }
            out.push(b'\n');
            n += 1;
        }
        l.sink.send(Bytes::from(out)).await.map_err(pg)?;
        if let Some(c) = self.rows.get_mut(&l.table) {
            *c += n;
        }
        self.inserting += started.elapsed();
        Ok(n)
    }

    /// Every CA as imported, with its key's public key (for a restore's
    /// consistency and root-pin checks before the import is committed).
    pub async fn cas(&mut self) -> R<Vec<ImportedCa>> {
        self.end_copy().await?;
        let rows = self
            .tx
            .query(
                "SELECT c.name, c.kind, c.parent, c.certificate, k.public_key
                 FROM cas c JOIN keys k ON k.id = c.key_id ORDER BY c.created_at, c.name",
                &[],
            )
            .await
            .map_err(pg)?;
        rows.into_iter()
            .map(|r| {
                Ok(ImportedCa {
                    name: r.try_get(0).map_err(pg)?,
                    kind: r.try_get(1).map_err(pg)?,
                    parent: r.try_get(2).map_err(pg)?,
                    certificate_der: r.try_get(3).map_err(pg)?,
                    public_key_der: r.try_get(4).map_err(pg)?,
                })
            })
            .collect()
    }

    /// Rows imported per table so far.
    pub fn counts(&self) -> &BTreeMap<String, u64> {
        &self.rows
    }

    /// The imported audit chain's last (seq, hash), if it has events.
    pub async fn audit_head(&mut self) -> R<Option<(i64, Vec<u8>)>> {
        self.end_copy().await?;
        let r = self
            .tx
            .query_opt(
                "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1",
                &[],
            )
            .await
            .map_err(pg)?;
        Ok(r.map(|r| (r.get(0), r.get(1))))
    }

    /// Adds the foreign keys back (checking every imported row against
    /// them), moves identity sequences past the imported ids, appends
    /// `change`'s audit events chained after the imported head, and commits.
    /// Returns the new events' sequence numbers.
    ///
    /// `change` may carry audit events only: its writes would need the
    /// store's write path (PgStore), which a snapshot import does not hold.
    pub async fn finish(mut self, change: Change, at_ms: i64) -> R<Vec<i64>> {
        if !change.writes.is_empty() {
            return Err(StoreError::InvalidArgument(
                "a PostgreSQL snapshot import appends audit events only, not writes",
            ));
        }
        self.end_copy().await?;
        let t = std::time::Instant::now();
        for (table, name, def) in &self.foreign_keys {
            self.tx
                .batch_execute(&format!(
                    "ALTER TABLE {} ADD CONSTRAINT {} {def}",
                    quote(table),
                    quote(name)
                ))
                .await
                .map_err(|e| {
                    if e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) {
                        StoreError::Corrupt(format!(
                            "the snapshot's rows in `{table}` refer to rows it does not hold ({name})"
                        ))
                    } else {
                        pg(e)
                    }
                })?;
        }
        let fk_check = t.elapsed();
        // Rows arrived with their ids: the next id the database hands out
        // must come after them (`broker_outbox`).
        let identities: Vec<(String, String)> = self
            .tx
            .query(
                "SELECT table_name::text, column_name::text FROM information_schema.columns
                 WHERE table_schema = current_schema() AND is_identity = 'YES'",
                &[],
            )
            .await
            .map_err(pg)?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for (table, column) in identities {
            self.tx
                .query_one(
                    &format!(
                        "SELECT setval(pg_get_serial_sequence($1, $2), COALESCE((SELECT MAX({c}) FROM {t}), 0) + 1, false)",
                        c = quote(&column),
                        t = quote(&table)
                    ),
                    &[&quote(&table), &column],
                )
                .await
                .map_err(pg)?;
        }
        let (mut seq, mut prev) = self
            .audit_head()
            .await?
            .unwrap_or((0, GENESIS_HASH.to_vec()));
        let stmt = self
            .tx
            .prepare(
                "INSERT INTO audit_events (seq, at_ms, actor, action, target, outcome, details, prev_hash, hash, version, source, sealed)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .await
            .map_err(pg)?;
        let mut seqs = Vec::with_capacity(change.audit.len());
        for draft in change.audit {
            seq += 1;
            let e = AuditEvent::chain(draft, seq, at_ms, prev);
            let details = serde_json::to_string(&e.details).map_err(DatabaseError::AuditDetails)?;
            let version = i64::from(e.version);
            self.tx
                .execute(
                    &stmt,
                    &[
                        &e.seq,
                        &e.at_ms,
                        &e.actor,
                        &e.action,
                        &e.target,
                        &e.outcome.as_str(),
                        &details,
                        &e.prev_hash,
                        &e.hash,
                        &version,
                        &e.source,
                        &e.sealed,
                    ],
                )
                .await
                .map_err(pg)?;
            seqs.push(seq);
            prev = e.hash;
        }
        let t = std::time::Instant::now();
        self.tx.commit().await.map_err(pg)?;
        tracing::debug!(
            inserting_ms = self.inserting.as_millis() as u64,
            foreign_key_check_ms = fk_check.as_millis() as u64,
            commit_ms = t.elapsed().as_millis() as u64,
            "PostgreSQL snapshot import finished"
        );
        Ok(seqs)
    }
}

async fn schema_version_of(tx: &Transaction<'_>) -> Result<i64, ImportError> {
    Ok(schema_version(tx).await?)
}

/// Why a snapshot line could not be imported.
fn bad_row(table: &str, line: u64, why: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("snapshot table {table}, row {line}: {why}"))
}

/// Appends `text` escaped for `COPY … FROM STDIN` text format.
fn copy_text(out: &mut Vec<u8>, text: &[u8]) {
    for &b in text {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(b),
        }
    }
}

/// One snapshot value as `COPY` text for a column of type `ty`; a value
/// that does not fit the column's type is refused (never coerced).
fn copy_value(out: &mut Vec<u8>, ty: ColType, v: serde_json::Value) -> Result<(), String> {
    use serde_json::Value as J;
    match (ty, v) {
        (_, J::Null) => out.extend_from_slice(b"\\N"),
        (ColType::BigInt | ColType::Int | ColType::SmallInt, J::Number(n)) => {
            let i = n.as_i64().ok_or_else(|| format!("{n} is not an integer"))?;
            let fits = match ty {
                ColType::Int => i32::try_from(i).is_ok(),
                ColType::SmallInt => i16::try_from(i).is_ok(),
                _ => true,
            };
            if !fits {
                return Err(format!("{i} is out of the column's range"));
            }
            out.extend_from_slice(i.to_string().as_bytes());
        }
        (ColType::Bool, J::Number(n)) => match n.as_i64() {
            Some(0) => out.push(b'f'),
            Some(1) => out.push(b't'),
            _ => return Err(format!("{n} in a boolean column (0 or 1 expected)")),
        },
        (ColType::Double | ColType::Real, J::Number(n)) => {
            let f = n.as_f64().ok_or_else(|| format!("{n} is not a number"))?;
            out.extend_from_slice(format!("{f:?}").as_bytes());
        }
        (ColType::Text, J::String(s)) => {
            if s.contains('\0') {
                return Err("text with a NUL character".into());
            }
            copy_text(out, s.as_bytes());
        }
        (ColType::Bytea, J::Object(mut o)) => match (o.remove("b"), o.is_empty()) {
            (Some(J::String(b)), true) => {
                let bytes = B64.decode(b.as_bytes()).map_err(|e| format!("blob: {e}"))?;
                // `\x<hex>` with its backslash escaped for COPY.
                out.extend_from_slice(b"\\\\x");
                out.extend_from_slice(hex::encode(bytes).as_bytes());
            }
            _ => return Err("an object that is not a blob".into()),
        },
        (ty, v) => return Err(format!("{v} does not fit a column of type {ty:?}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_values_are_escaped_and_typed() {
        let mut out = Vec::new();
        copy_value(&mut out, ColType::Text, serde_json::json!("a\tb\\c\nd")).unwrap();
        assert_eq!(out, b"a\\tb\\\\c\\nd");
        let mut out = Vec::new();
        copy_value(&mut out, ColType::Bytea, serde_json::json!({"b": "AAH/"})).unwrap();
        assert_eq!(out, b"\\\\x0001ff");
        let mut out = Vec::new();
        copy_value(&mut out, ColType::Bool, serde_json::json!(1)).unwrap();
        copy_value(&mut out, ColType::Bool, serde_json::json!(0)).unwrap();
        copy_value(&mut out, ColType::BigInt, serde_json::Value::Null).unwrap();
        assert_eq!(out, b"tf\\N");
        assert!(copy_value(&mut Vec::new(), ColType::Bool, serde_json::json!(2)).is_err());
        assert!(copy_value(&mut Vec::new(), ColType::BigInt, serde_json::json!("7")).is_err());
        assert!(copy_value(&mut Vec::new(), ColType::Text, serde_json::json!(7)).is_err());
        assert!(copy_value(&mut Vec::new(), ColType::Int, serde_json::json!(1i64 << 40)).is_err());
        assert!(
            copy_value(
                &mut Vec::new(),
                ColType::Bytea,
                serde_json::json!({"b": "x", "c": 1})
            )
            .is_err()
        );
    }

    /// The order is SQLite's creation order and names every table of the
    /// SQLite schema and of the PostgreSQL schema file.
    #[test]
    fn table_order_is_the_sqlite_exporters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let clock: std::sync::Arc<dyn crate::clock::Clock> =
            std::sync::Arc::new(crate::clock::SystemClock);
        drop(crate::store::sqlite::SqliteStore::open(&path, 1, clock).unwrap());
        let c = rusqlite::Connection::open(&path).unwrap();
        let mut stmt = c
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid")
            .unwrap();
        let sqlite: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(sqlite, TABLE_ORDER);
        let pg_file = include_str!("../../../migrations/postgres/0012_schema.sql");
        let mut created: Vec<&str> = pg_file
            .lines()
            .filter_map(|l| l.strip_prefix("CREATE TABLE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        created.sort_unstable();
        let mut order = TABLE_ORDER.to_vec();
        order.sort_unstable();
        assert_eq!(created, order);
    }
}
