//! PostgreSQL backend (for several daemons sharing one store): the same
//! semantics as the SQLite backend, translated.
//!
//! `migrate` versions the schema, `writer` runs this daemon's group-commit
//! task (batches, savepoints, audit chaining under a cluster-wide advisory
//! lock), `writes` applies each domain write, `reads` holds the queries and
//! `rows` maps rows to records. This file connects, pools the reader
//! connections and routes the `Store` calls.
//!
//! Every write transaction of every daemon first takes one transaction-scoped
//! advisory lock ([`writer::WRITE_LOCK`]): writes are serialised across the
//! cluster as SQLite's single writer serialises them, so the conditions
//! checked inside a transaction (`READ COMMITTED`) hold at commit, and the
//! audit chain has one total order without gaps.

mod migrate;
mod reads;
mod rows;
pub mod snapshot;
mod writer;
mod writes;

pub use migrate::SUPPORTED as SCHEMA_VERSION;
pub use writer::BatchObserver;

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
use secrecy::{ExposeSecret, SecretString};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, NoTls, Row, Statement};
use uuid::Uuid;
use writer::{LeaseOp, Writer};

/// Maps a PostgreSQL error: only a unique violation (23505) is a conflict
/// the caller can explain. Every other failure, a serialization failure or
/// deadlock included, is a database error, never a domain conflict.
pub(super) fn pg(e: tokio_postgres::Error) -> StoreError {
    if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
        tracing::debug!(error = %e, "unique constraint");
        return StoreError::Conflict(Conflict::Duplicate { entity: "row" });
    }
    StoreError::Database(DatabaseError::Postgres(e))
}

/// [`pg`], naming a duplicate as `entity`.
pub(super) fn dup(entity: &'static str) -> impl Fn(StoreError) -> StoreError {
    move |e| match e {
        StoreError::Conflict(Conflict::Duplicate { .. }) => {
            StoreError::Conflict(Conflict::Duplicate { entity })
        }
        other => other,
    }
}

/// Prepared statements of one connection, by SQL text. Statements are
/// protocol-level objects: they outlive the transactions that prepared them.
#[derive(Default)]
pub(super) struct StmtCache(Mutex<HashMap<String, Statement>>);

/// Above this many distinct statements the cache starts over (dynamic
/// filters make a bounded but large set).
const CACHE_MAX: usize = 512;

/// A client (or transaction) with its connection's statement cache.
pub(super) struct Db<'a, C> {
    c: &'a C,
    cache: &'a StmtCache,
}

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

impl<'a, C: GenericClient + Sync> Db<'a, C> {
    pub(super) fn new(c: &'a C, cache: &'a StmtCache) -> Self {
        Self { c, cache }
    }

    async fn stmt(&self, sql: &str) -> Result<Statement, StoreError> {
        let cached = self
            .cache
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sql)
            .cloned();
        if let Some(s) = cached {
            return Ok(s);
        }
        let s = self.c.prepare(sql).await.map_err(pg)?;
        let mut cache = self.cache.0.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    /// Rows changed.
    pub(super) async fn exec(&self, sql: &str, p: Params<'_>) -> Result<u64, StoreError> {
        let s = self.stmt(sql).await?;
        self.c.execute(&s, p).await.map_err(pg)
    }

    pub(super) async fn opt(&self, sql: &str, p: Params<'_>) -> Result<Option<Row>, StoreError> {
        let s = self.stmt(sql).await?;
        self.c.query_opt(&s, p).await.map_err(pg)
    }

    pub(super) async fn row(&self, sql: &str, p: Params<'_>) -> Result<Row, StoreError> {
        let s = self.stmt(sql).await?;
        self.c.query_one(&s, p).await.map_err(pg)
    }

    pub(super) async fn all(&self, sql: &str, p: Params<'_>) -> Result<Vec<Row>, StoreError> {
        let s = self.stmt(sql).await?;
        self.c.query(&s, p).await.map_err(pg)
    }

    /// The first row mapped by `f`, if any.
    pub(super) async fn one<T>(
        &self,
        sql: &str,
        p: Params<'_>,
        f: fn(&Row) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        self.opt(sql, p).await?.as_ref().map(f).transpose()
    }

    /// Every row mapped by `f`.
    pub(super) async fn many<T>(
        &self,
        sql: &str,
        p: Params<'_>,
        f: fn(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.all(sql, p).await?.iter().map(f).collect()
    }
}

/// One pooled connection.
pub(super) struct Conn {
    client: Client,
    cache: StmtCache,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    fn db(&self) -> Db<'_, Client> {
        Db::new(&self.client, &self.cache)
    }
}

/// How to reach the database.
#[derive(Clone)]
pub(super) struct Target {
    config: tokio_postgres::Config,
    read_only: bool,
}

impl Target {
    /// Connects, driving the connection on the current runtime.
    pub(super) async fn connect(&self) -> Result<Client, StoreError> {
        let (client, connection) = self.config.connect(NoTls).await.map_err(pg)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "PostgreSQL connection closed");
            }
        });
        if self.read_only {
            client
                .batch_execute("SET default_transaction_read_only = on")
                .await
                .map_err(pg)?;
        }
        Ok(client)
    }
}

/// Reader connections: at most `pool_size` at once, kept while healthy.
struct Pool {
    target: Target,
    idle: Mutex<Vec<(Client, StmtCache)>>,
    permits: Arc<Semaphore>,
}

impl Pool {
    async fn get(&self) -> Result<Conn, StoreError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::WriterGone)?;
        loop {
            let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match idle {
                Some((client, _)) if client.is_closed() => continue,
                Some((client, cache)) => {
                    return Ok(Conn {
                        client,
                        cache,
                        _permit: permit,
                    });
                }
                None => break,
            }
        }
        let client = self.target.connect().await?;
        Ok(Conn {
            client,
            cache: StmtCache::default(),
            _permit: permit,
        })
    }

    fn put(&self, c: Conn) {
        if !c.client.is_closed() {
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((c.client, c.cache));
        }
    }
}

/// Runs `$body` (a future using the [`Db`] `$c`) on a pooled reader.
macro_rules! read {
    ($self:ident, $c:ident => $body:expr) => {{
        let conn = $self.pool.get().await?;
        let out = {
            let $c = conn.db();
            $body.await
        };
        $self.pool.put(conn);
        out
    }};
}

pub struct PgStore {
    read_only: bool,
    pool: Pool,
    /// `None` when opened read-only.
    writer: Option<Writer>,
    /// Seals each audit draft's sensitive details before it is chained
    /// (see [`Store::install_sealer`]); `None`: stored in the clear.
    sealer: std::sync::RwLock<Option<Arc<dyn DraftSealer>>>,
}

/// Parses `url` and adds `password` (never taken from the URL by the
/// config; see `config::PostgresConfig`).
fn target(
    url: &str,
    password: Option<&SecretString>,
    read_only: bool,
) -> Result<Target, StoreError> {
    let mut config: tokio_postgres::Config = url.parse().map_err(pg)?;
    if let Some(p) = password {
        config.password(p.expose_secret());
    }
    if config.get_application_name().is_none() {
        config.application_name("keyward");
    }
    // Every daemon's writes queue behind one advisory lock: a peer that
    // vanished (half-open socket) or hangs mid-transaction must not stall
    // the deployment for the kernel's keepalive (hours). Defaults unless
    // the URL sets its own.
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(5));
    }
    config.keepalives(true);
    config.keepalives_idle(std::time::Duration::from_secs(10));
    #[cfg(target_os = "linux")]
    config.tcp_user_timeout(std::time::Duration::from_secs(30));
    if config.get_options().is_none() {
        config.options("-c lock_timeout=30s -c idle_in_transaction_session_timeout=300s");
    }
    Ok(Target { config, read_only })
}

impl PgStore {
    /// Connects, applies migrations (under an advisory lock: daemons starting
    /// together apply them once) and starts this daemon's writer, handing
    /// every batch's events to the live audit `sink` before it commits.
    pub async fn connect(
        url: &str,
        password: Option<SecretString>,
        pool_size: usize,
        batch_max: usize,
        clock: Arc<dyn Clock>,
        observer: BatchObserver,
        sink: Option<Arc<crate::audit::sink::AuditSink>>,
    ) -> Result<Self, StoreError> {
        let target = target(url, password.as_ref(), false)?;
        let mut client = target.connect().await?;
        migrate::migrate(&mut client).await?;
        drop(client);
        let writer = Writer::spawn(target.clone(), batch_max, clock, observer, sink).await?;
        Ok(Self {
            read_only: false,
            pool: Pool {
                target,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(pool_size.clamp(1, 64))),
            },
            writer: Some(writer),
            sealer: std::sync::RwLock::new(None),
        })
    }

    /// [`PgStore::connect`] without observer and sink (tests, tools).
    pub async fn open(
        url: &str,
        password: Option<SecretString>,
        batch_max: usize,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        Self::connect(
            url,
            password,
            4,
            batch_max,
            clock,
            Arc::new(|_, _| {}),
            None,
        )
        .await
    }

    /// Opens an existing database for reading only: no migrations, no
    /// writer, every session `default_transaction_read_only`. Used by
    /// `audit verify`, which must not change what it checks. Commits fail
    /// with [`DatabaseError::ReadOnly`].
    pub async fn open_read_only(
        url: &str,
        password: Option<SecretString>,
    ) -> Result<Self, StoreError> {
        let target = target(url, password.as_ref(), true)?;
        let pool = Pool {
            target,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(2)),
        };
        let conn = pool.get().await?;
        migrate::require_schema(&conn.client).await?;
        pool.put(conn);
        Ok(Self {
            read_only: true,
            pool,
            writer: None,
            sealer: std::sync::RwLock::new(None),
        })
    }

    /// Whether this handle refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn writer(&self) -> Result<&Writer, StoreError> {
        self.writer
            .as_ref()
            .ok_or(StoreError::Database(DatabaseError::ReadOnly))
    }

    async fn lease(&self, op: LeaseOp) -> Result<bool, StoreError> {
        self.writer()?.lease(op).await
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

#[async_trait]
impl Store for PgStore {
    async fn commit(&self, mut change: Change) -> Result<Vec<i64>, StoreError> {
        let w = self.writer()?;
        // Sealed on the caller's task before the writer chains the events
        // (as in SQLite): a draft that cannot be sealed refuses the change.
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
        read!(self, c => reads::health(&c))
    }

    async fn get_key(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        read!(self, c => reads::get_key(&c, id))
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        read!(self, c => reads::list_keys(&c))
    }

    async fn get_ca(&self, name: &str) -> Result<Option<CaRecord>, StoreError> {
        read!(self, c => reads::get_ca(&c, name))
    }

    async fn list_cas(&self) -> Result<Vec<CaRecord>, StoreError> {
        read!(self, c => reads::list_cas(&c))
    }

    async fn admin_by_token_hash(&self, hash: &[u8]) -> Result<Option<AdminRecord>, StoreError> {
        read!(self, c => reads::admin_by_token_hash(&c, hash))
    }

    async fn get_admin(&self, id: Uuid) -> Result<Option<AdminRecord>, StoreError> {
        read!(self, c => reads::get_admin(&c, id))
    }

    async fn admin_by_name(&self, name: &str) -> Result<Option<AdminRecord>, StoreError> {
        read!(self, c => reads::admin_by_name(&c, name))
    }

    async fn list_admins(&self, page: &PageRequest) -> Result<Page<AdminRecord>, StoreError> {
        read!(self, c => reads::list_admins(&c, page))
    }

    async fn count_active_admins(&self) -> Result<u32, StoreError> {
        read!(self, c => reads::count_active_admins(&c))
    }

    async fn count_ever_admins(&self) -> Result<u32, StoreError> {
        read!(self, c => reads::count_ever_admins(&c))
    }

    async fn get_registration(&self, id: Uuid) -> Result<Option<RegistrationRecord>, StoreError> {
        read!(self, c => reads::get_registration(&c, id))
    }

    async fn list_registrations(
        &self,
        filter: &RegistrationFilter,
        page: &PageRequest,
    ) -> Result<Page<RegistrationRecord>, StoreError> {
        read!(self, c => reads::list_registrations(&c, filter, page))
    }

    async fn expired_pending_registrations(
        &self,
        now: i64,
        limit: u32,
    ) -> Result<Vec<RegistrationRecord>, StoreError> {
        read!(self, c => reads::expired_pending_registrations(&c, now, limit))
    }

    async fn pending_counts(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        read!(self, c => reads::pending_counts(&c))
    }

    async fn pending_registrations_summary(
        &self,
    ) -> Result<crate::store::PendingSummary, StoreError> {
        read!(self, c => reads::pending_registrations_summary(&c))
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
        read!(self, c => reads::certificate_expiry_counts(&c, now, within_secs))
    }

    async fn approvals(&self, registration: Uuid) -> Result<Vec<ApprovalRecord>, StoreError> {
        read!(self, c => reads::approvals(&c, registration))
    }

    async fn get_admin_request(&self, id: Uuid) -> Result<Option<AdminRequestRecord>, StoreError> {
        read!(self, c => reads::get_admin_request(&c, id))
    }

    async fn list_admin_requests(
        &self,
        status: Option<AdminRequestStatus>,
        page: &PageRequest,
    ) -> Result<Page<AdminRequestRecord>, StoreError> {
        read!(self, c => reads::list_admin_requests(&c, status, page))
    }

    async fn get_device(&self, id: Uuid) -> Result<Option<DeviceRecord>, StoreError> {
        read!(self, c => reads::get_device(&c, id))
    }

    async fn enrollment_token_by_hash(
        &self,
        hash: &[u8],
    ) -> Result<Option<EnrollmentTokenRecord>, StoreError> {
        read!(self, c => reads::enrollment_token_by_hash(&c, hash))
    }

    async fn get_enrollment_token(
        &self,
        id: Uuid,
    ) -> Result<Option<EnrollmentTokenRecord>, StoreError> {
        read!(self, c => reads::get_enrollment_token(&c, id))
    }

    async fn list_enrollment_tokens(
        &self,
        filter: &EnrollmentTokenFilter,
        page: &PageRequest,
    ) -> Result<Page<EnrollmentTokenRecord>, StoreError> {
        read!(self, c => reads::list_enrollment_tokens(&c, filter, page))
    }

    async fn device_for_identity(&self, identity: &str) -> Result<Option<Uuid>, StoreError> {
        read!(self, c => reads::device_for_identity(&c, identity))
    }

    async fn renewal_allowance(
        &self,
        device_id: Uuid,
    ) -> Result<Option<RenewalAllowanceRecord>, StoreError> {
        read!(self, c => reads::renewal_allowance(&c, device_id))
    }

    async fn list_devices(
        &self,
        filter: &DeviceFilter,
        page: &PageRequest,
    ) -> Result<Page<DeviceRecord>, StoreError> {
        read!(self, c => reads::list_devices(&c, filter, page))
    }

    async fn get_certificate(&self, serial: &str) -> Result<Option<CertificateRecord>, StoreError> {
        read!(self, c => reads::get_certificate(&c, serial))
    }

    async fn list_certificates(
        &self,
        filter: &CertificateFilter,
        page: &SerialPageRequest,
    ) -> Result<Page<CertificateRecord, String>, StoreError> {
        read!(self, c => reads::list_certificates(&c, filter, page))
    }

    async fn expiring_device_certificates(
        &self,
        q: &ExpiringQuery,
    ) -> Result<Page<ExpiringCertificate, (i64, String)>, StoreError> {
        read!(self, c => reads::expiring_device_certificates(&c, q))
    }

    async fn certificates_by_spki(
        &self,
        spki_sha256: &str,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        read!(self, c => reads::certificates_by_spki(&c, spki_sha256))
    }

    async fn revoked_certificates(
        &self,
        issuer_ca: &str,
        now: i64,
    ) -> Result<Vec<RevokedEntry>, StoreError> {
        read!(self, c => reads::revoked_certificates(&c, issuer_ca, now))
    }

    async fn latest_crl(&self, issuer_ca: &str) -> Result<Option<CrlRecord>, StoreError> {
        read!(self, c => reads::latest_crl(&c, issuer_ca))
    }

    async fn revoked_certificates_by_key(
        &self,
        key_id: Uuid,
        now: i64,
    ) -> Result<Vec<RevokedEntry>, StoreError> {
        read!(self, c => reads::revoked_certificates_by_key(&c, key_id, now))
    }

    async fn latest_crl_of_key(
        &self,
        issuer_ca: &str,
        key_id: Uuid,
    ) -> Result<Option<CrlRecord>, StoreError> {
        read!(self, c => reads::latest_crl_of_key(&c, issuer_ca, key_id))
    }

    async fn last_expiry_issued_by(&self, key_id: Uuid) -> Result<Option<i64>, StoreError> {
        read!(self, c => reads::last_expiry_issued_by(&c, key_id))
    }

    async fn get_rotation(&self, id: Uuid) -> Result<Option<RotationRecord>, StoreError> {
        read!(self, c => reads::get_rotation(&c, id))
    }

    async fn export_snapshot(
        &self,
        sink: Box<dyn crate::store::snapshot::SnapshotSink>,
    ) -> Result<crate::store::snapshot::SnapshotInfo, StoreError> {
        // A connection of its own: the export's REPEATABLE READ transaction
        // may run long and must not hold a pooled reader.
        let mut client = self.pool.target.connect().await?;
        snapshot::export(&mut client, sink).await
    }

    async fn list_backups(
        &self,
        include_pruned: bool,
        limit: u32,
    ) -> Result<Vec<BackupRecord>, StoreError> {
        read!(self, c => reads::list_backups(&c, include_pruned, limit))
    }

    async fn get_backup(&self, id: Uuid) -> Result<Option<BackupRecord>, StoreError> {
        read!(self, c => reads::get_backup(&c, id))
    }

    async fn due_replicas(&self, now: i64) -> Result<Vec<ReplicaRecord>, StoreError> {
        read!(self, c => reads::due_replicas(&c, now))
    }

    async fn list_rotations(
        &self,
        open_only: bool,
        limit: u32,
    ) -> Result<Vec<RotationRecord>, StoreError> {
        read!(self, c => reads::list_rotations(&c, open_only, limit))
    }

    async fn service_certificates(
        &self,
        purpose: KeyPurpose,
    ) -> Result<Vec<ServiceCertificateRecord>, StoreError> {
        read!(self, c => reads::service_certificates(&c, purpose))
    }

    async fn pending_broker_updates(
        &self,
        now: i64,
        limit: u32,
    ) -> Result<Vec<BrokerOutboxRecord>, StoreError> {
        read!(self, c => reads::pending_broker_updates(&c, now, limit))
    }

    async fn broker_update_for_device(
        &self,
        device_id: Uuid,
    ) -> Result<Option<BrokerOutboxRecord>, StoreError> {
        read!(self, c => reads::broker_update_for_device(&c, device_id))
    }

    async fn broker_outbox_len(&self) -> Result<i64, StoreError> {
        read!(self, c => reads::broker_outbox_len(&c))
    }

    async fn audit_events(&self, q: AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        read!(self, c => reads::audit_events(&c, &q))
    }

    async fn audit_report(&self, q: AuditFilter) -> Result<Page<AuditEvent, i64>, StoreError> {
        read!(self, c => reads::audit_report(&c, &q))
    }

    async fn audit_head(&self) -> Result<(i64, Vec<u8>), StoreError> {
        read!(self, c => reads::audit_head(&c))
    }

    async fn record_audit_checkpoint(&self, cp: &Checkpoint) -> Result<(), StoreError> {
        self.writer()?.checkpoint(cp.clone()).await
    }

    async fn audit_checkpoints(
        &self,
        from_seq: i64,
        limit: u32,
    ) -> Result<Vec<Checkpoint>, StoreError> {
        read!(self, c => reads::audit_checkpoints(&c, from_seq, limit))
    }

    async fn last_audit_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        read!(self, c => reads::last_audit_checkpoint(&c))
    }

    async fn audit_data_keys(&self) -> Result<Vec<AuditDataKeyRecord>, StoreError> {
        read!(self, c => reads::audit_data_keys(&c))
    }

    async fn counts(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        read!(self, c => reads::counts(&c))
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
        read!(self, c => reads::lease_holder(&c, name, now_ms))
    }
}
