//! SQLite backend (the embedded default): WAL, one writer thread doing group
//! commit, a small pool of reader connections.
//!
//! The writer takes every queued change, applies each inside its own
//! SAVEPOINT (so one conflicting change does not fail its neighbours), chains
//! their audit events from the head it reads inside the transaction, and
//! commits the batch with one fsync.

mod rows;

use super::{
    AuditQuery, Change, Conflict, Order, Page, PageRequest, RegistrationFilter, Store, StoreError,
    Write,
};
use crate::audit::{AuditEvent, GENESIS_HASH};
use crate::clock::Clock;
use crate::store::records::*;
use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/sqlite/0001_init.sql"),
    include_str!("../../../migrations/sqlite/0002_keystores.sql"),
    include_str!("../../../migrations/sqlite/0003_quorum_invitations.sql"),
];

type Reply = oneshot::Sender<Result<Vec<i64>, StoreError>>;

/// Told the size and duration of every batch the writer commits (metrics).
pub type BatchObserver = Arc<dyn Fn(usize, std::time::Duration) + Send + Sync>;

struct Job {
    change: Change,
    reply: Reply,
}

pub struct SqliteStore {
    path: PathBuf,
    read_only: bool,
    readers: Arc<Mutex<Vec<Connection>>>,
    jobs: mpsc::Sender<Job>,
}

fn db(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, msg)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            tracing::debug!(constraint = ?msg, "constraint violated");
            StoreError::Conflict(Conflict::Duplicate { entity: "row" })
        }
        other => StoreError::Database(other.to_string()),
    }
}

fn connect(path: &Path, read_only: bool) -> Result<Connection, StoreError> {
    if read_only {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db)?;
        conn.execute_batch("PRAGMA busy_timeout = 10000;")
            .map_err(db)?;
        return Ok(conn);
    }
    let conn = Connection::open(path).map_err(db)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA busy_timeout = 10000;
         PRAGMA cache_size = -65536;
         PRAGMA temp_store = MEMORY;",
    )
    .map_err(db)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db)?;
    let supported = MIGRATIONS.len() as i64;
    if current > supported {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
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

impl SqliteStore {
    /// Opens (creating if needed) the database, applies migrations and starts
    /// the writer thread.
    pub fn open(path: &Path, batch_max: usize, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        Self::open_observed(path, batch_max, clock, Arc::new(|_, _| {}))
    }

    /// Like [`SqliteStore::open`], reporting each batch to `observer`.
    pub fn open_observed(
        path: &Path,
        batch_max: usize,
        clock: Arc<dyn Clock>,
        observer: BatchObserver,
    ) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Database(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let mut writer = connect(path, false)?;
        restrict_permissions(path);
        migrate(&mut writer)?;
        let (tx, rx) = mpsc::channel::<Job>(batch_max.max(1) * 4);
        let batch_max = batch_max.max(1);
        std::thread::Builder::new()
            .name("keyward-store-writer".into())
            .spawn(move || writer_loop(writer, rx, batch_max, clock, observer))
            .map_err(|e| StoreError::Database(format!("cannot start writer thread: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            read_only: false,
            readers: Arc::new(Mutex::new(Vec::new())),
            jobs: tx,
        })
    }

    /// Opens an existing database for reading only: no migrations, no
    /// writer, nothing created or changed on disk. Used by `audit verify`,
    /// which must not trust (or touch) what it checks. Commits fail.
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Database(format!(
                "database {} does not exist",
                path.display()
            )));
        }
        let conn = connect(path, true)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db)?;
        if version > MIGRATIONS.len() as i64 {
            return Err(StoreError::SchemaTooNew {
                found: version,
                supported: MIGRATIONS.len() as i64,
            });
        }
        let (jobs, _) = mpsc::channel(1);
        Ok(Self {
            path: path.to_path_buf(),
            read_only: true,
            readers: Arc::new(Mutex::new(vec![conn])),
            jobs,
        })
    }

    /// Runs a read on a pooled connection off the async runtime.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let readers = self.readers.clone();
        let path = self.path.clone();
        let read_only = self.read_only;
        tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().ok().and_then(|mut r| r.pop());
            let conn = match pooled {
                Some(c) => c,
                None => connect(&path, read_only)?,
            };
            let out = f(&conn);
            if let Ok(mut r) = readers.lock()
                && r.len() < 8
            {
                r.push(conn);
            }
            out
        })
        .await
        .map_err(|e| StoreError::Database(format!("reader task failed: {e}")))?
    }
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

#[cfg(not(unix))]
fn restrict_permissions(_: &Path) {}

fn writer_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    batch_max: usize,
    clock: Arc<dyn Clock>,
    observer: BatchObserver,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < batch_max {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let results = commit_batch(&mut conn, &batch, clock.as_ref());
        observer(batch.len(), started.elapsed());
        match results {
            Ok(per_job) => {
                for (job, r) in batch.into_iter().zip(per_job) {
                    let _ = job.reply.send(r);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(error = %msg, "store batch commit failed");
                for job in batch {
                    let _ = job.reply.send(Err(StoreError::Database(msg.clone())));
                }
            }
        }
    }
}

type JobResult = Result<Vec<i64>, StoreError>;

fn commit_batch(
    conn: &mut Connection,
    batch: &[Job],
    clock: &dyn Clock,
) -> Result<Vec<JobResult>, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db)?;
    // Read the head inside the write transaction: another process (the CLI)
    // may have appended since our last batch.
    let (mut seq, mut head): (i64, Vec<u8>) = tx
        .query_row(
            "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(db)?
        .unwrap_or((0, GENESIS_HASH.to_vec()));
    let at_ms = (clock.now().unix_timestamp_nanos() / 1_000_000) as i64;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        tx.prepare_cached("SAVEPOINT change")
            .map_err(db)?
            .execute([])
            .map_err(db)?;
        let applied = apply(&tx, &job.change, seq, &head, at_ms);
        match applied {
            Ok((seqs, new_head)) => {
                tx.prepare_cached("RELEASE change")
                    .map_err(db)?
                    .execute([])
                    .map_err(db)?;
                if let Some(last) = seqs.last() {
                    seq = *last;
                    head = new_head;
                }
                results.push(Ok(seqs));
            }
            Err(e) => {
                tx.execute_batch("ROLLBACK TO change; RELEASE change")
                    .map_err(db)?;
                results.push(Err(e));
            }
        }
    }
    tx.commit().map_err(db)?;
    Ok(results)
}

fn expect_one(n: usize, conflict: impl FnOnce() -> Conflict) -> Result<(), StoreError> {
    if n == 1 {
        Ok(())
    } else {
        Err(StoreError::Conflict(conflict()))
    }
}

fn state_changed(entity: &'static str, id: &Uuid, expected: &'static str) -> Conflict {
    Conflict::StateChanged {
        entity,
        id: id.to_string(),
        expected,
    }
}

/// Inserts `a`, naming a duplicate admin as such.
fn insert_admin(tx: &rusqlite::Transaction<'_>, a: &AdminRecord) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO admins (id, name, role, token_hash, disabled, created_at, disabled_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .map_err(db)?
    .execute(params![a.id.to_string(), a.name, a.role.as_str(), a.token_hash, a.disabled, a.created_at, a.disabled_at])
    .map_err(|e| match db(e) {
        StoreError::Conflict(_) => StoreError::Conflict(Conflict::Duplicate { entity: "admin" }),
        other => other,
    })?;
    Ok(())
}

/// Active admins of role `admin`, counted inside the transaction.
fn active_admins(tx: &rusqlite::Transaction<'_>) -> Result<i64, StoreError> {
    tx.prepare_cached("SELECT COUNT(*) FROM admins WHERE role = 'admin' AND disabled = 0")
        .map_err(db)?
        .query_row([], |r| r.get(0))
        .map_err(db)
}

fn apply(
    tx: &rusqlite::Transaction<'_>,
    change: &Change,
    mut seq: i64,
    head: &[u8],
    at_ms: i64,
) -> Result<(Vec<i64>, Vec<u8>), StoreError> {
    for w in &change.writes {
        apply_write(tx, w)?;
    }
    let mut prev = head.to_vec();
    let mut seqs = Vec::with_capacity(change.audit.len());
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO audit_events (seq, at_ms, actor, action, target, outcome, details, prev_hash, hash, version, source)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .map_err(db)?;
    for draft in &change.audit {
        seq += 1;
        let e = AuditEvent::chain(draft.clone(), seq, at_ms, prev);
        let details =
            serde_json::to_string(&e.details).map_err(|x| StoreError::Corrupt(x.to_string()))?;
        stmt.execute(params![
            e.seq,
            e.at_ms,
            e.actor,
            e.action,
            e.target,
            e.outcome.as_str(),
            details,
            e.prev_hash,
            e.hash,
            e.version,
            e.source
        ])
        .map_err(db)?;
        prev = e.hash;
        seqs.push(seq);
    }
    Ok((seqs, prev))
}

fn apply_write(tx: &rusqlite::Transaction<'_>, w: &Write) -> Result<(), StoreError> {
    match w {
        Write::InsertKey(k) => {
            tx.prepare_cached(
                "INSERT INTO keys (id, label, purpose, algorithm, backend, handle, public_key, state, ca_name, created_at, updated_at, keystore)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )
            .map_err(db)?
            .execute(params![
                k.id.to_string(),
                k.label,
                k.purpose.as_str(),
                k.algorithm.as_str(),
                k.backend,
                k.handle.0,
                k.public_key_der,
                k.state.as_str(),
                k.ca_name,
                k.created_at,
                k.updated_at,
                k.keystore
            ])
            .map_err(db)?;
        }
        Write::CompleteKeyGeneration {
            id,
            public_key_der,
            at,
        } => {
            let n = tx
                .prepare_cached(
                    "UPDATE keys SET state = 'active', public_key = ?1, updated_at = ?2 WHERE id = ?3 AND state = 'generating'",
                )
                .map_err(db)?
                .execute(params![public_key_der, at, id.to_string()])
                .map_err(db)?;
            expect_one(n, || state_changed("key", id, "generating"))?;
        }
        Write::SetKeyState { id, from, to, at } => {
            let n = tx
                .prepare_cached(
                    "UPDATE keys SET state = ?1, updated_at = ?2 WHERE id = ?3 AND state = ?4",
                )
                .map_err(db)?
                .execute(params![to.as_str(), at, id.to_string(), from.as_str()])
                .map_err(db)?;
            expect_one(n, || state_changed("key", id, from.as_str()))?;
        }
        Write::InsertCa(c) => {
            tx.prepare_cached(
                "INSERT INTO cas (name, kind, parent, key_id, certificate, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(db)?
            .execute(params![
                c.name,
                rows::ca_kind_str(c.kind),
                c.parent,
                c.key_id.to_string(),
                c.certificate_der,
                c.created_at
            ])
            .map_err(db)?;
        }
        Write::InsertAdmin(a) => insert_admin(tx, a)?,
        Write::InsertRegistration {
            record: r,
            max_pending_in_group,
        } => {
            if let Some(limit) = max_pending_in_group {
                let pending: i64 = tx
                    .prepare_cached(
                        "SELECT COUNT(*) FROM registrations WHERE group_name = ?1 AND status = 'pending'",
                    )
                    .map_err(db)?
                    .query_row(params![r.group], |row| row.get(0))
                    .map_err(db)?;
                if pending >= i64::from(*limit) {
                    return Err(Conflict::LimitReached {
                        what: "pending registrations in the group",
                        limit: *limit,
                    }
                    .into());
                }
            }
            tx.prepare_cached(
                "INSERT INTO registrations (id, device_id, group_name, status, name, device_type, location, firmware, csr,
                   key_algorithm, secret_hash, submitted_by, submitted_at, expires_at, decided_at, certificate_serial,
                   credentials_fetched_at, credentials_confirmed_at, client_addr)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
            )
            .map_err(db)?
            .execute(params![
                r.id.to_string(),
                r.device_id.to_string(),
                r.group,
                r.status.as_str(),
                r.name,
                r.device_type,
                r.location,
                r.firmware,
                r.csr_der,
                r.key_algorithm.as_str(),
                r.secret_hash,
                r.submitted_by.map(|u| u.to_string()),
                r.submitted_at,
                r.expires_at,
                r.decided_at,
                r.certificate_serial,
                r.credentials_fetched_at,
                r.credentials_confirmed_at,
                r.client_addr
            ])
            .map_err(db)?;
        }
        Write::SetRegistrationStatus {
            id,
            from,
            to,
            at,
            certificate_serial,
        } => {
            let n = tx
                .prepare_cached(
                    "UPDATE registrations SET status = ?1, decided_at = COALESCE(decided_at, ?2),
                       certificate_serial = COALESCE(?3, certificate_serial)
                     WHERE id = ?4 AND status = ?5",
                )
                .map_err(db)?
                .execute(params![
                    to.as_str(),
                    at,
                    certificate_serial,
                    id.to_string(),
                    from.as_str()
                ])
                .map_err(db)?;
            expect_one(n, || state_changed("registration", id, from.as_str()))?;
        }
        Write::DisableAdmin { id, at } => {
            let n = tx
                .prepare_cached(
                    "UPDATE admins SET disabled = 1, disabled_at = ?2 WHERE id = ?1 AND disabled = 0",
                )
                .map_err(db)?
                .execute(params![id.to_string(), at])
                .map_err(db)?;
            expect_one(n, || state_changed("admin", id, "active"))?;
            if active_admins(tx)? == 0 {
                return Err(Conflict::LastActiveAdmin.into());
            }
        }
        Write::SetAdminRole { id, from, to } => {
            let n = tx
                .prepare_cached(
                    "UPDATE admins SET role = ?1 WHERE id = ?2 AND role = ?3 AND disabled = 0",
                )
                .map_err(db)?
                .execute(params![to.as_str(), id.to_string(), from.as_str()])
                .map_err(db)?;
            expect_one(n, || state_changed("admin", id, from.as_str()))?;
            if active_admins(tx)? == 0 {
                return Err(Conflict::LastActiveAdmin.into());
            }
        }
        Write::MarkCredentialsFetched { id, at } => {
            let n = tx
                .prepare_cached(
                    "UPDATE registrations SET credentials_fetched_at = COALESCE(credentials_fetched_at, ?1)
                     WHERE id = ?2 AND status = 'issued'",
                )
                .map_err(db)?
                .execute(params![at, id.to_string()])
                .map_err(db)?;
            expect_one(n, || state_changed("registration", id, "issued"))?;
        }
        Write::ConfirmCredentials { id, at } => {
            let n = tx
                .prepare_cached(
                    "UPDATE registrations SET credentials_confirmed_at = ?1,
                       credentials_fetched_at = COALESCE(credentials_fetched_at, ?1)
                     WHERE id = ?2 AND status = 'issued' AND credentials_confirmed_at IS NULL",
                )
                .map_err(db)?
                .execute(params![at, id.to_string()])
                .map_err(db)?;
            expect_one(n, || state_changed("registration", id, "unconfirmed"))?;
        }
        Write::RecordDecision {
            approval: a,
            expect_counted_approvals,
        } => {
            let rid = a.registration_id.to_string();
            let status: Option<String> = tx
                .prepare_cached("SELECT status FROM registrations WHERE id = ?1")
                .map_err(db)?
                .query_row(params![rid], |r| r.get(0))
                .optional()
                .map_err(db)?;
            match status.as_deref() {
                None => {
                    return Err(Conflict::Missing {
                        entity: "registration",
                        id: rid,
                    }
                    .into());
                }
                Some("pending") => {}
                Some(_) => {
                    return Err(state_changed("registration", &a.registration_id, "pending").into());
                }
            }
            let active: Option<bool> = tx
                .prepare_cached("SELECT disabled = 0 FROM admins WHERE id = ?1")
                .map_err(db)?
                .query_row(params![a.admin_id.to_string()], |r| r.get(0))
                .optional()
                .map_err(db)?;
            if active != Some(true) {
                return Err(state_changed("admin", &a.admin_id, "active").into());
            }
            let (decided, counted): (i64, i64) = tx
                .prepare_cached(
                    "SELECT COALESCE(SUM(ap.admin_id = ?2), 0),
                            COALESCE(SUM(ap.decision = 'approve' AND ad.disabled = 0), 0)
                     FROM approvals ap JOIN admins ad ON ad.id = ap.admin_id
                     WHERE ap.registration_id = ?1",
                )
                .map_err(db)?
                .query_row(params![rid, a.admin_id.to_string()], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .map_err(db)?;
            if decided > 0 {
                return Err(Conflict::Duplicate { entity: "decision" }.into());
            }
            if counted != i64::from(*expect_counted_approvals) {
                return Err(Conflict::ApprovalsChanged.into());
            }
            tx.prepare_cached(
                "INSERT INTO approvals (registration_id, admin_id, decision, comment, decided_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(db)?
            .execute(params![
                rid,
                a.admin_id.to_string(),
                a.decision.as_str(),
                a.comment,
                a.decided_at
            ])
            .map_err(db)?;
        }
        Write::InsertAdminRequest(r) => {
            tx.prepare_cached(
                "INSERT INTO admin_requests (id, kind, name, admin_id, role, requested_by, status, decided_by,
                   requester_secret_hash, approver_secret_hash, client_addr, created_at, expires_at, decided_at, redeemed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )
            .map_err(db)?
            .execute(params![
                r.id.to_string(),
                r.kind.as_str(),
                r.name,
                r.admin_id.map(|u| u.to_string()),
                r.role.as_str(),
                r.requested_by.to_string(),
                r.status.as_str(),
                r.decided_by.map(|u| u.to_string()),
                r.requester_secret_hash,
                r.approver_secret_hash,
                r.client_addr,
                r.created_at,
                r.expires_at,
                r.decided_at,
                r.redeemed_at
            ])
            .map_err(|e| match db(e) {
                StoreError::Conflict(_) => StoreError::Conflict(Conflict::Duplicate {
                    entity: "open admin request",
                }),
                other => other,
            })?;
        }
        Write::DecideAdminRequest {
            id,
            to,
            decided_by,
            at,
            approver_secret_hash,
        } => {
            let active: Option<bool> = tx
                .prepare_cached("SELECT disabled = 0 FROM admins WHERE id = ?1")
                .map_err(db)?
                .query_row(params![decided_by.to_string()], |r| r.get(0))
                .optional()
                .map_err(db)?;
            if active != Some(true) {
                return Err(state_changed("admin", decided_by, "active").into());
            }
            let n = tx
                .prepare_cached(
                    "UPDATE admin_requests SET status = ?1, decided_by = ?2, decided_at = ?3,
                       approver_secret_hash = COALESCE(?4, approver_secret_hash)
                     WHERE id = ?5 AND status = 'pending' AND expires_at > ?3",
                )
                .map_err(db)?
                .execute(params![
                    to.as_str(),
                    decided_by.to_string(),
                    at,
                    approver_secret_hash,
                    id.to_string()
                ])
                .map_err(db)?;
            expect_one(n, || state_changed("admin request", id, "pending"))?;
        }
        Write::RedeemInvitation { id, at, admin } => {
            // State first (so an unusable invitation reports as such), then
            // the account, then the link to it (admin_id references admins).
            let n = tx
                .prepare_cached(
                    "UPDATE admin_requests SET status = 'redeemed', redeemed_at = ?1
                     WHERE id = ?2 AND kind = 'invite' AND status = 'approved' AND expires_at > ?1",
                )
                .map_err(db)?
                .execute(params![at, id.to_string()])
                .map_err(db)?;
            expect_one(n, || state_changed("invitation", id, "open"))?;
            insert_admin(tx, admin)?;
            tx.prepare_cached("UPDATE admin_requests SET admin_id = ?1 WHERE id = ?2")
                .map_err(db)?
                .execute(params![admin.id.to_string(), id.to_string()])
                .map_err(db)?;
        }
        Write::ExpireAdminRequest { id, at } => {
            let n = tx
                .prepare_cached(
                    "UPDATE admin_requests SET status = 'expired', decided_at = COALESCE(decided_at, ?1)
                     WHERE id = ?2 AND status IN ('pending', 'approved')",
                )
                .map_err(db)?
                .execute(params![at, id.to_string()])
                .map_err(db)?;
            expect_one(n, || state_changed("admin request", id, "open"))?;
        }
        Write::InsertDevice(d) => {
            tx.prepare_cached(
                "INSERT INTO devices (id, name, device_type, location, firmware, group_name, status, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .map_err(db)?
            .execute(params![
                d.id.to_string(),
                d.name,
                d.device_type,
                d.location,
                d.firmware,
                d.group,
                d.status.as_str(),
                d.created_at,
                d.updated_at
            ])
            .map_err(db)?;
        }
        Write::InsertCertificate(c) => {
            tx.prepare_cached(
                "INSERT INTO certificates (serial, device_id, issuer_ca, issuer_key_id, subject, not_before, not_after,
                   fingerprint, der, status, revoked_at, revocation_reason, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )
            .map_err(db)?
            .execute(params![
                c.serial,
                c.device_id.map(|u| u.to_string()),
                c.issuer_ca,
                c.issuer_key_id.to_string(),
                c.subject,
                c.not_before,
                c.not_after,
                c.fingerprint_sha256,
                c.der,
                c.status.as_str(),
                c.revoked_at,
                c.revocation_reason,
                c.created_at
            ])
            .map_err(db)?;
        }
    }
    Ok(())
}

/// One keyset page of `select` (a `SELECT ... FROM table` whose table has a
/// UUIDv7 `id`), filtered by `conds` (SQL with one `?` each, and its value).
fn keyset<T>(
    c: &Connection,
    select: &str,
    conds: &[(&str, String)],
    page: &PageRequest,
    map: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    id_of: fn(&T) -> Uuid,
) -> Result<Page<T>, StoreError> {
    let limit = page.limit.clamp(1, 1000);
    let (cmp, dir) = match page.order {
        Order::NewestFirst => ("<", "DESC"),
        Order::OldestFirst => (">", "ASC"),
    };
    let mut clauses: Vec<String> = conds.iter().map(|(c, _)| c.to_string()).collect();
    let mut values: Vec<String> = conds.iter().map(|(_, v)| v.clone()).collect();
    if let Some(after) = page.after {
        clauses.push(format!("id {cmp} ?"));
        values.push(after.to_string());
    }
    let where_ = if clauses.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", clauses.join(" AND "))
    };
    // One more than asked tells whether a next page exists.
    let sql = format!("{select}{where_} ORDER BY id {dir} LIMIT {}", limit + 1);
    let mut items = rows::many(c, &sql, rusqlite::params_from_iter(values.iter()), map)?;
    let next = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(id_of)
    } else {
        None
    };
    Ok(Page { items, next })
}

#[async_trait]
impl Store for SqliteStore {
    async fn commit(&self, change: Change) -> Result<Vec<i64>, StoreError> {
        if change.audit.is_empty() && !change.writes.is_empty() {
            return Err(StoreError::Corrupt(
                "a change without an audit event is refused".into(),
            ));
        }
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job { change, reply })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.read(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(db))
            .await
    }

    async fn get_key(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        self.read(move |c| {
            rows::one(
                c,
                &format!("{} WHERE id = ?1", rows::KEY_SELECT),
                params![id.to_string()],
                rows::key,
            )
        })
        .await
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.read(|c| {
            rows::many(
                c,
                &format!("{} ORDER BY created_at, id", rows::KEY_SELECT),
                [],
                rows::key,
            )
        })
        .await
    }

    async fn get_ca(&self, name: &str) -> Result<Option<CaRecord>, StoreError> {
        let name = name.to_string();
        self.read(move |c| {
            rows::one(
                c,
                &format!("{} WHERE name = ?1", rows::CA_SELECT),
                params![name],
                rows::ca,
            )
        })
        .await
    }

    async fn list_cas(&self) -> Result<Vec<CaRecord>, StoreError> {
        self.read(|c| {
            rows::many(
                c,
                &format!("{} ORDER BY created_at, name", rows::CA_SELECT),
                [],
                rows::ca,
            )
        })
        .await
    }

    async fn admin_by_token_hash(&self, hash: &[u8]) -> Result<Option<AdminRecord>, StoreError> {
        let hash = hash.to_vec();
        self.read(move |c| {
            rows::one(
                c,
                &format!("{} WHERE token_hash = ?1", rows::ADMIN_SELECT),
                params![hash],
                rows::admin,
            )
        })
        .await
    }

    async fn get_admin(&self, id: Uuid) -> Result<Option<AdminRecord>, StoreError> {
        self.read(move |c| {
            rows::one(
                c,
                &format!("{} WHERE id = ?1", rows::ADMIN_SELECT),
                params![id.to_string()],
                rows::admin,
            )
        })
        .await
    }

    async fn admin_by_name(&self, name: &str) -> Result<Option<AdminRecord>, StoreError> {
        let name = name.to_string();
        self.read(move |c| {
            rows::one(
                c,
                &format!("{} WHERE name = ?1", rows::ADMIN_SELECT),
                params![name],
                rows::admin,
            )
        })
        .await
    }

    async fn list_admins(&self, page: &PageRequest) -> Result<Page<AdminRecord>, StoreError> {
        let page = page.clone();
        self.read(move |c| keyset(c, rows::ADMIN_SELECT, &[], &page, rows::admin, |a| a.id))
            .await
    }

    async fn count_active_admins(&self) -> Result<u32, StoreError> {
        self.read(|c| {
            let n: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM admins WHERE role = 'admin' AND disabled = 0",
                    [],
                    |r| r.get(0),
                )
                .map_err(db)?;
            Ok(u32::try_from(n).unwrap_or(u32::MAX))
        })
        .await
    }

    async fn get_registration(&self, id: Uuid) -> Result<Option<RegistrationRecord>, StoreError> {
        self.read(move |c| {
            rows::one(
                c,
                &format!("{} WHERE id = ?1", rows::REGISTRATION_SELECT),
                params![id.to_string()],
                rows::registration,
            )
        })
        .await
    }

    async fn list_registrations(
        &self,
        filter: &RegistrationFilter,
        page: &PageRequest,
    ) -> Result<Page<RegistrationRecord>, StoreError> {
        let filter = filter.clone();
        let page = page.clone();
        self.read(move |c| {
            let mut conds: Vec<(&str, String)> = Vec::new();
            if let Some(s) = filter.status {
                conds.push(("status = ?", s.as_str().to_string()));
            }
            if let Some(g) = filter.group {
                conds.push(("group_name = ?", g));
            }
            keyset(
                c,
                rows::REGISTRATION_SELECT,
                &conds,
                &page,
                rows::registration,
                |r| r.id,
            )
        })
        .await
    }

    async fn expired_pending_registrations(
        &self,
        now: i64,
        limit: u32,
    ) -> Result<Vec<RegistrationRecord>, StoreError> {
        self.read(move |c| {
            rows::many(
                c,
                &format!(
                    "{} WHERE status = 'pending' AND expires_at <= ?1 ORDER BY expires_at, id LIMIT ?2",
                    rows::REGISTRATION_SELECT
                ),
                params![now, limit.clamp(1, 10_000)],
                rows::registration,
            )
        })
        .await
    }

    async fn pending_counts(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT group_name, COUNT(*) FROM registrations WHERE status = 'pending' GROUP BY group_name",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(db)?;
            rows.collect::<rusqlite::Result<BTreeMap<_, _>>>()
                .map_err(db)
        })
        .await
    }

    async fn approvals(&self, registration: Uuid) -> Result<Vec<ApprovalRecord>, StoreError> {
        self.read(move |c| {
            rows::many(
                c,
                "SELECT ap.registration_id, ap.admin_id, ap.decision, ap.comment, ap.decided_at, ad.disabled = 0
                 FROM approvals ap JOIN admins ad ON ad.id = ap.admin_id
                 WHERE ap.registration_id = ?1 ORDER BY ap.decided_at, ap.admin_id",
                params![registration.to_string()],
                rows::approval,
            )
        })
        .await
    }

    async fn get_admin_request(&self, id: Uuid) -> Result<Option<AdminRequestRecord>, StoreError> {
        self.read(move |c| {
            rows::one(
                c,
                &format!("{} WHERE id = ?1", rows::ADMIN_REQUEST_SELECT),
                params![id.to_string()],
                rows::admin_request,
            )
        })
        .await
    }

    async fn list_admin_requests(
        &self,
        status: Option<AdminRequestStatus>,
        page: &PageRequest,
    ) -> Result<Page<AdminRequestRecord>, StoreError> {
        let page = page.clone();
        self.read(move |c| {
            let conds: Vec<(&str, String)> = status
                .map(|s| vec![("status = ?", s.as_str().to_string())])
                .unwrap_or_default();
            keyset(
                c,
                rows::ADMIN_REQUEST_SELECT,
                &conds,
                &page,
                rows::admin_request,
                |r| r.id,
            )
        })
        .await
    }

    async fn get_device(&self, id: Uuid) -> Result<Option<DeviceRecord>, StoreError> {
        self.read(move |c| {
            rows::one(
                c,
                &format!("{} WHERE id = ?1", rows::DEVICE_SELECT),
                params![id.to_string()],
                rows::device,
            )
        })
        .await
    }

    async fn get_certificate(&self, serial: &str) -> Result<Option<CertificateRecord>, StoreError> {
        let serial = serial.to_uppercase();
        self.read(move |c| {
            rows::one(
                c,
                &format!("{} WHERE serial = ?1", rows::CERT_SELECT),
                params![serial],
                rows::certificate,
            )
        })
        .await
    }

    async fn audit_events(&self, q: AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        self.read(move |c| {
            rows::many(
                c,
                "SELECT seq, at_ms, actor, action, target, outcome, details, prev_hash, hash, version, source
                 FROM audit_events WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
                params![q.from_seq, q.limit],
                rows::audit,
            )
        })
        .await
    }

    async fn audit_head(&self) -> Result<(i64, Vec<u8>), StoreError> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db)?
            .unwrap_or((0, GENESIS_HASH.to_vec())))
        })
        .await
    }

    async fn counts(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        self.read(|c| {
            let mut out = BTreeMap::new();
            for t in [
                "keys",
                "cas",
                "admins",
                "registrations",
                "approvals",
                "admin_requests",
                "devices",
                "certificates",
                "audit_events",
            ] {
                let n: i64 = c
                    .query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0))
                    .map_err(db)?;
                out.insert(t.to_string(), n);
            }
            Ok(out)
        })
        .await
    }
}
