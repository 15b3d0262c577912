//! SQLite backend (the embedded default): WAL, one writer thread doing group
//! commit, a small pool of reader connections.
//!
//! `migrate` versions the schema, `writer` runs the group-commit thread
//! (batches, savepoints, audit chaining), `writes` applies each domain write,
//! `reads` holds the queries and `rows` maps rows to records. This file opens
//! the database and routes the `Store` calls.

mod migrate;
mod reads;
mod rows;
pub mod snapshot;
mod writer;
mod writes;

pub use migrate::SUPPORTED as SCHEMA_VERSION;
pub use writer::BatchObserver;

use super::files;
use super::{
    AuditFilter, AuditQuery, CertificateFilter, Change, Conflict, DatabaseError, DeviceFilter,
    EnrollmentTokenFilter, ExpiringQuery, Page, PageRequest, RegistrationFilter, SerialPageRequest,
    Store, StoreError,
};
use crate::audit::seal::DraftSealer;
use crate::audit::{AuditEvent, Checkpoint};
use crate::clock::Clock;
use crate::store::records::*;
use async_trait::async_trait;
use rusqlite::Connection;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use uuid::Uuid;
use writer::{LeaseOp, Writer};

pub struct SqliteStore {
    path: PathBuf,
    read_only: bool,
    readers: Arc<Mutex<Vec<Connection>>>,
    /// `None` when opened read-only.
    writer: Option<Writer>,
    /// Seals each audit draft's sensitive details before it is chained
    /// (see [`Store::install_sealer`]); `None`: stored in the clear.
    sealer: std::sync::RwLock<Option<Arc<dyn DraftSealer>>>,
}

/// Maps a SQLite error; constraint violations are conflicts.
pub(super) fn db(e: rusqlite::Error) -> StoreError {
    match e {
        // Only a UNIQUE or PRIMARY KEY clash is a duplicate, i.e. a conflict
        // the caller can explain; a foreign key, NOT NULL, CHECK or trigger
        // refusal is a bug or tampering, never a 409.
        rusqlite::Error::SqliteFailure(f, ref msg)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
        {
            tracing::debug!(constraint = ?msg, "unique constraint");
            StoreError::Conflict(Conflict::Duplicate { entity: "row" })
        }
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Database(DatabaseError::Constraint(e))
        }
        other => StoreError::Database(DatabaseError::Sqlite(other)),
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
        Self::open_with_sink(path, batch_max, clock, observer, None)
    }

    /// Like [`SqliteStore::open_observed`], handing every batch's events to
    /// the live audit `sink` before it commits (see [`crate::audit::sink`]).
    pub fn open_with_sink(
        path: &Path,
        batch_max: usize,
        clock: Arc<dyn Clock>,
        observer: BatchObserver,
        sink: Option<Arc<crate::audit::sink::AuditSink>>,
    ) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            files::create_private_dir(parent).map_err(|source| DatabaseError::Create {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        // Before SQLite touches the path: it would create the file with the
        // umask's mode, and it gives -wal and -shm the database file's mode.
        files::prepare_database_files(path).map_err(|source| DatabaseError::Create {
            path: path.to_path_buf(),
            source,
        })?;
        let mut conn = connect(path, false)?;
        migrate::migrate(&mut conn)?;
        let writer = Writer::spawn(conn, batch_max, clock, observer, sink)?;
        Ok(Self {
            path: path.to_path_buf(),
            read_only: false,
            readers: Arc::new(Mutex::new(Vec::new())),
            writer: Some(writer),
            sealer: std::sync::RwLock::new(None),
        })
    }

    /// Opens an existing database for reading only: no migrations, no
    /// writer, nothing created or changed on disk. Used by `audit verify`,
    /// which must not trust (or touch) what it checks. Commits fail with
    /// [`DatabaseError::ReadOnly`].
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(DatabaseError::NotFound(path.to_path_buf()).into());
        }
        let conn = connect(path, true)?;
        migrate::check_version(&conn)?;
        Ok(Self {
            path: path.to_path_buf(),
            read_only: true,
            readers: Arc::new(Mutex::new(vec![conn])),
            writer: None,
            sealer: std::sync::RwLock::new(None),
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
        .map_err(DatabaseError::ReaderTask)?
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn commit(&self, mut change: Change) -> Result<Vec<i64>, StoreError> {
        let Some(w) = &self.writer else {
            return Err(DatabaseError::ReadOnly.into());
        };
        // Sealed here, on the caller's task, before the writer chains the
        // events: the writer thread stays free of crypto, and no draft
        // reaches the chain unsealed once a sealer is installed. A draft
        // that cannot be sealed refuses the whole change.
        let sealer = self
            .sealer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(sealer) = sealer {
            for draft in &mut change.audit {
                sealer.seal(draft)?;
            }
        }
        w.submit(change).await
    }

    fn install_sealer(&self, sealer: Arc<dyn DraftSealer>) -> Result<(), StoreError> {
        *self.sealer.write().unwrap_or_else(|p| p.into_inner()) = Some(sealer);
        Ok(())
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.read(reads::health).await
    }

    async fn get_key(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        self.read(move |c| reads::get_key(c, id)).await
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.read(reads::list_keys).await
    }

    async fn get_ca(&self, name: &str) -> Result<Option<CaRecord>, StoreError> {
        let name = name.to_string();
        self.read(move |c| reads::get_ca(c, &name)).await
    }

    async fn list_cas(&self) -> Result<Vec<CaRecord>, StoreError> {
        self.read(reads::list_cas).await
    }

    async fn admin_by_token_hash(&self, hash: &[u8]) -> Result<Option<AdminRecord>, StoreError> {
        let hash = hash.to_vec();
        self.read(move |c| reads::admin_by_token_hash(c, &hash))
            .await
    }

    async fn get_admin(&self, id: Uuid) -> Result<Option<AdminRecord>, StoreError> {
        self.read(move |c| reads::get_admin(c, id)).await
    }

    async fn admin_by_name(&self, name: &str) -> Result<Option<AdminRecord>, StoreError> {
        let name = name.to_string();
        self.read(move |c| reads::admin_by_name(c, &name)).await
    }

    async fn list_admins(&self, page: &PageRequest) -> Result<Page<AdminRecord>, StoreError> {
        let page = page.clone();
        self.read(move |c| reads::list_admins(c, &page)).await
    }

    async fn count_active_admins(&self) -> Result<u32, StoreError> {
        self.read(reads::count_active_admins).await
    }

    async fn count_ever_admins(&self) -> Result<u32, StoreError> {
        self.read(reads::count_ever_admins).await
    }

    async fn get_registration(&self, id: Uuid) -> Result<Option<RegistrationRecord>, StoreError> {
        self.read(move |c| reads::get_registration(c, id)).await
    }

    async fn list_registrations(
        &self,
        filter: &RegistrationFilter,
        page: &PageRequest,
    ) -> Result<Page<RegistrationRecord>, StoreError> {
        let (filter, page) = (filter.clone(), page.clone());
        self.read(move |c| reads::list_registrations(c, &filter, &page))
            .await
    }

    async fn expired_pending_registrations(
        &self,
        now: i64,
        limit: u32,
    ) -> Result<Vec<RegistrationRecord>, StoreError> {
        self.read(move |c| reads::expired_pending_registrations(c, now, limit))
            .await
    }

    async fn pending_counts(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        self.read(reads::pending_counts).await
    }

    async fn pending_registrations_summary(
        &self,
    ) -> Result<crate::store::PendingSummary, StoreError> {
        self.read(reads::pending_registrations_summary).await
    }

    async fn certificate_expiry_counts(
        &self,
        now: i64,
        within_secs: &[i64],
    ) -> Result<crate::store::ExpiryCounts, StoreError> {
        if within_secs.iter().any(|b| *b < 0) {
            return Err(StoreError::InvalidArgument(
                "expiry bounds must not be negative",
            ));
        }
        let bounds = within_secs.to_vec();
        self.read(move |c| reads::certificate_expiry_counts(c, now, &bounds))
            .await
    }

    async fn approvals(&self, registration: Uuid) -> Result<Vec<ApprovalRecord>, StoreError> {
        self.read(move |c| reads::approvals(c, registration)).await
    }

    async fn get_admin_request(&self, id: Uuid) -> Result<Option<AdminRequestRecord>, StoreError> {
        self.read(move |c| reads::get_admin_request(c, id)).await
    }

    async fn list_admin_requests(
        &self,
        status: Option<AdminRequestStatus>,
        page: &PageRequest,
    ) -> Result<Page<AdminRequestRecord>, StoreError> {
        let page = page.clone();
        self.read(move |c| reads::list_admin_requests(c, status, &page))
            .await
    }

    async fn get_device(&self, id: Uuid) -> Result<Option<DeviceRecord>, StoreError> {
        self.read(move |c| reads::get_device(c, id)).await
    }

    async fn enrollment_token_by_hash(
        &self,
        hash: &[u8],
    ) -> Result<Option<EnrollmentTokenRecord>, StoreError> {
        let hash = hash.to_vec();
        self.read(move |c| {
            rows::one(
                c,
                &format!("{} WHERE token_hash = ?1", rows::ENROLLMENT_TOKEN_SELECT),
                rusqlite::params![hash],
                rows::enrollment_token,
            )
        })
        .await
    }

    async fn get_enrollment_token(
        &self,
        id: Uuid,
    ) -> Result<Option<EnrollmentTokenRecord>, StoreError> {
        self.read(move |c| {
            rows::one(
                c,
                &format!("{} WHERE id = ?1", rows::ENROLLMENT_TOKEN_SELECT),
                rusqlite::params![id.to_string()],
                rows::enrollment_token,
            )
        })
        .await
    }

    async fn list_enrollment_tokens(
        &self,
        filter: &EnrollmentTokenFilter,
        page: &PageRequest,
    ) -> Result<Page<EnrollmentTokenRecord>, StoreError> {
        let (filter, page) = (filter.clone(), page.clone());
        self.read(move |c| reads::list_enrollment_tokens(c, &filter, &page))
            .await
    }

    async fn device_for_identity(&self, identity: &str) -> Result<Option<Uuid>, StoreError> {
        let identity = identity.to_string();
        self.read(move |c| {
            rows::one(
                c,
                "SELECT device_id FROM device_identities WHERE identity = ?1",
                rusqlite::params![identity],
                |r| {
                    let s: String = r.get(0)?;
                    Uuid::parse_str(&s).map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            0,
                            rusqlite::types::Type::Text,
                            Box::new(e),
                        )
                    })
                },
            )
        })
        .await
    }

    async fn renewal_allowance(
        &self,
        device_id: Uuid,
    ) -> Result<Option<RenewalAllowanceRecord>, StoreError> {
        self.read(move |c| reads::renewal_allowance(c, device_id))
            .await
    }

    async fn list_devices(
        &self,
        filter: &DeviceFilter,
        page: &PageRequest,
    ) -> Result<Page<DeviceRecord>, StoreError> {
        let (filter, page) = (filter.clone(), page.clone());
        self.read(move |c| reads::list_devices(c, &filter, &page))
            .await
    }

    async fn get_certificate(&self, serial: &str) -> Result<Option<CertificateRecord>, StoreError> {
        let serial = serial.to_string();
        self.read(move |c| reads::get_certificate(c, &serial)).await
    }

    async fn list_certificates(
        &self,
        filter: &CertificateFilter,
        page: &SerialPageRequest,
    ) -> Result<Page<CertificateRecord, String>, StoreError> {
        let (filter, page) = (filter.clone(), page.clone());
        self.read(move |c| reads::list_certificates(c, &filter, &page))
            .await
    }

    async fn expiring_device_certificates(
        &self,
        q: &ExpiringQuery,
    ) -> Result<Page<ExpiringCertificate, (i64, String)>, StoreError> {
        let q = q.clone();
        self.read(move |c| reads::expiring_device_certificates(c, &q))
            .await
    }

    async fn certificates_by_spki(
        &self,
        spki_sha256: &str,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        let spki = spki_sha256.to_string();
        self.read(move |c| reads::certificates_by_spki(c, &spki))
            .await
    }

    async fn revoked_certificates(
        &self,
        issuer_ca: &str,
        now: i64,
    ) -> Result<Vec<RevokedEntry>, StoreError> {
        let issuer = issuer_ca.to_string();
        self.read(move |c| reads::revoked_certificates(c, &issuer, now))
            .await
    }

    async fn revoked_certificates_by_key(
        &self,
        key_id: Uuid,
        now: i64,
    ) -> Result<Vec<RevokedEntry>, StoreError> {
        self.read(move |c| reads::revoked_certificates_by_key(c, key_id, now))
            .await
    }

    async fn latest_crl_of_key(
        &self,
        issuer_ca: &str,
        key_id: Uuid,
    ) -> Result<Option<CrlRecord>, StoreError> {
        let issuer = issuer_ca.to_string();
        self.read(move |c| reads::latest_crl_of_key(c, &issuer, key_id))
            .await
    }

    async fn last_expiry_issued_by(&self, key_id: Uuid) -> Result<Option<i64>, StoreError> {
        self.read(move |c| reads::last_expiry_issued_by(c, key_id))
            .await
    }

    async fn get_rotation(&self, id: Uuid) -> Result<Option<RotationRecord>, StoreError> {
        self.read(move |c| reads::get_rotation(c, id)).await
    }

    async fn export_snapshot(
        &self,
        sink: Box<dyn crate::store::snapshot::SnapshotSink>,
    ) -> Result<crate::store::snapshot::SnapshotInfo, StoreError> {
        let mut sink = sink;
        self.read(move |c| snapshot::export(c, sink.as_mut())).await
    }

    async fn list_backups(
        &self,
        include_pruned: bool,
        limit: u32,
    ) -> Result<Vec<BackupRecord>, StoreError> {
        self.read(move |c| reads::list_backups(c, include_pruned, limit))
            .await
    }

    async fn get_backup(&self, id: Uuid) -> Result<Option<BackupRecord>, StoreError> {
        self.read(move |c| reads::get_backup(c, id)).await
    }

    async fn due_replicas(&self, now: i64) -> Result<Vec<ReplicaRecord>, StoreError> {
        self.read(move |c| reads::due_replicas(c, now)).await
    }

    async fn list_rotations(
        &self,
        open_only: bool,
        limit: u32,
    ) -> Result<Vec<RotationRecord>, StoreError> {
        self.read(move |c| reads::list_rotations(c, open_only, limit))
            .await
    }

    async fn latest_crl(&self, issuer_ca: &str) -> Result<Option<CrlRecord>, StoreError> {
        let issuer = issuer_ca.to_string();
        self.read(move |c| reads::latest_crl(c, &issuer)).await
    }

    async fn service_certificates(
        &self,
        purpose: KeyPurpose,
    ) -> Result<Vec<ServiceCertificateRecord>, StoreError> {
        self.read(move |c| reads::service_certificates(c, purpose))
            .await
    }

    async fn pending_broker_updates(
        &self,
        now: i64,
        limit: u32,
    ) -> Result<Vec<BrokerOutboxRecord>, StoreError> {
        self.read(move |c| reads::pending_broker_updates(c, now, limit))
            .await
    }

    async fn broker_update_for_device(
        &self,
        device_id: Uuid,
    ) -> Result<Option<BrokerOutboxRecord>, StoreError> {
        self.read(move |c| reads::broker_update_for_device(c, device_id))
            .await
    }

    async fn broker_outbox_len(&self) -> Result<i64, StoreError> {
        self.read(reads::broker_outbox_len).await
    }

    async fn audit_events(&self, q: AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        self.read(move |c| reads::audit_events(c, &q)).await
    }

    async fn audit_report(&self, q: AuditFilter) -> Result<Page<AuditEvent, i64>, StoreError> {
        self.read(move |c| reads::audit_report(c, &q)).await
    }

    async fn audit_head(&self) -> Result<(i64, Vec<u8>), StoreError> {
        self.read(reads::audit_head).await
    }

    async fn record_audit_checkpoint(&self, cp: &Checkpoint) -> Result<(), StoreError> {
        match &self.writer {
            Some(w) => w.checkpoint(cp.clone()).await,
            None => Err(DatabaseError::ReadOnly.into()),
        }
    }

    async fn audit_checkpoints(
        &self,
        from_seq: i64,
        limit: u32,
    ) -> Result<Vec<Checkpoint>, StoreError> {
        self.read(move |c| reads::audit_checkpoints(c, from_seq, limit))
            .await
    }

    async fn last_audit_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        self.read(reads::last_audit_checkpoint).await
    }

    async fn audit_data_keys(&self) -> Result<Vec<AuditDataKeyRecord>, StoreError> {
        self.read(reads::audit_data_keys).await
    }

    async fn counts(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        self.read(reads::counts).await
    }

    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        check_lease_names(name, holder)?;
        if ttl_ms <= 0 {
            return Err(StoreError::InvalidArgument("lease time must be positive"));
        }
        self.lease(LeaseOp::Try {
            name: name.to_string(),
            holder: holder.to_string(),
            now_ms,
            ttl_ms,
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        check_lease_names(name, holder)?;
        self.lease(LeaseOp::Release {
            name: name.to_string(),
            holder: holder.to_string(),
        })
        .await
        .map(drop)
    }

    async fn lease_holder(&self, name: &str, now_ms: i64) -> Result<Option<String>, StoreError> {
        let name = name.to_string();
        self.read(move |c| reads::lease_holder(c, &name, now_ms))
            .await
    }
}

/// Lease names and holders are non-empty.
fn check_lease_names(name: &str, holder: &str) -> Result<(), StoreError> {
    if name.is_empty() {
        return Err(StoreError::InvalidArgument("lease name must not be empty"));
    }
    if holder.is_empty() {
        return Err(StoreError::InvalidArgument(
            "lease holder must not be empty",
        ));
    }
    Ok(())
}

impl SqliteStore {
    /// Runs a lease operation on the writer thread.
    async fn lease(&self, op: LeaseOp) -> Result<bool, StoreError> {
        match &self.writer {
            Some(w) => w.lease(op).await,
            None => Err(DatabaseError::ReadOnly.into()),
        }
    }
}
