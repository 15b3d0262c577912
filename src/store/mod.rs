//! The `Store` port: all persistent state, changed only through [`Change`]s
//! that carry their audit events, so no change lands without its event.

pub mod files;
pub mod postgres;
pub mod records;
pub mod snapshot;
pub mod sqlite;

pub use records::*;

use crate::audit::{AuditDraft, AuditEvent, Checkpoint};
use async_trait::async_trait;
use uuid::Uuid;

/// Why a conditional write was refused. Nothing of the change was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// A row was not in the state the write expected (a concurrent decision,
    /// an expired registration, an admin already disabled).
    #[error("{entity} {id} is no longer {expected}")]
    StateChanged {
        entity: &'static str,
        id: String,
        expected: &'static str,
    },
    /// The row already exists (a duplicate name, a second decision by one admin).
    #[error("{entity} already exists")]
    Duplicate { entity: &'static str },
    /// The approvals counted inside the transaction are not those the caller
    /// decided on: another decision landed first. Re-read and decide again.
    #[error("approvals changed concurrently")]
    ApprovalsChanged,
    /// The write would leave no active admin with role `admin`.
    #[error("refusing to leave no active admin")]
    LastActiveAdmin,
    /// An invitation approved without a second admin (the one-admin
    /// shortcut) cannot be redeemed once a second account has ever held
    /// role `admin`.
    #[error("a second admin must approve this invitation")]
    SecondAdminRequired,
    /// A configured cap is reached (pending registrations per group).
    #[error("limit of {limit} {what} reached")]
    LimitReached { what: &'static str, limit: u32 },
    /// The row the write refers to does not exist.
    #[error("{entity} {id} not found")]
    Missing { entity: &'static str, id: String },
    /// The public key belongs to a revoked or suspended device, or to a
    /// certificate revoked for good ([`Write::RefuseRevokedKey`]).
    #[error("the public key is revoked")]
    KeyRevoked,
    /// A bootstrap token or reclaim code cannot be used (any more).
    #[error("enrollment token {reason}")]
    TokenUnusable { reason: &'static str },
    /// Another rotation of this key is running.
    #[error("a rotation of {purpose} `{target}` is already running")]
    RotationRunning { purpose: String, target: String },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A conditional write was refused; nothing of the change was applied.
    #[error("conflict: {0}")]
    Conflict(#[from] Conflict),
    /// The backend could not do what was asked; the source says why.
    #[error("database error: {0}")]
    Database(#[from] DatabaseError),
    /// Stored rows contradict each other (a service names what it found;
    /// a row the backend cannot decode is [`DatabaseError::InvalidRow`]).
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error(
        "database schema version {found} is newer than this keyward ({supported}); upgrade keyward"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("the store writer has stopped")]
    WriterGone,
    /// A caller passed a value the operation cannot take (an empty lease
    /// name, a lease time that is not positive): a bug, refused before any write.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// An audit event's sensitive details could not be sealed: the change
    /// is refused (fail closed), nothing written.
    #[error("cannot seal the audit event's sensitive details: {0}")]
    Seal(#[from] crate::audit::seal::SealError),
    /// The backend cannot seal audit details (see [`Store::install_sealer`]).
    #[error("this store cannot seal audit details")]
    SealingUnsupported,
}

impl StoreError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Conflict(_) => "conflict",
            Self::Database(e) => e.code(),
            Self::WriterGone => "store_unavailable",
            Self::Corrupt(_) => "store_corrupt",
            Self::SchemaTooNew { .. } => "schema_too_new",
            Self::InvalidArgument(_) => "store_invalid_argument",
            Self::Seal(e) => e.code(),
            Self::SealingUnsupported => "audit_sealing_unsupported",
        }
    }
}

/// Why the backend failed, with the underlying error as the source.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("SQLite: {0}")]
    Sqlite(#[source] rusqlite::Error),
    /// PostgreSQL refused or failed (connection lost, a serialization
    /// failure, a constraint other than a duplicate). A constraint or
    /// trigger refusal (SQLSTATE class 23) has code `store_constraint`,
    /// anything else is `store_unavailable`: never a domain conflict.
    #[error("PostgreSQL: {0}")]
    Postgres(#[source] tokio_postgres::Error),
    /// A PostgreSQL row does not decode (a bad enum string, a malformed
    /// id, an unexpected type): tampering or a bug.
    #[error("a stored row cannot be read: {0}")]
    PostgresRow(String),
    /// The PostgreSQL database holds no keyward schema (opened read-only
    /// before `keyward init`).
    #[error("the database has no keyward schema (run `keyward init`)")]
    NoSchema,
    /// This backend cannot do this (yet).
    #[error("{0}")]
    Unsupported(&'static str),
    /// A stored value does not decode (a bad enum string, a malformed id):
    /// tampering or a bug, never a transient failure.
    #[error("a stored row cannot be read: {0}")]
    InvalidRow(#[source] rusqlite::Error),
    /// A foreign key, NOT NULL, CHECK or trigger refused a write: a bug or
    /// tampering (a duplicate is a [`Conflict`] instead).
    #[error("a database constraint refused the write: {0}")]
    Constraint(#[source] rusqlite::Error),
    #[error("cannot create {}: {source}", path.display())]
    Create {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database {} does not exist", .0.display())]
    NotFound(std::path::PathBuf),
    #[error("cannot start the store writer thread: {0}")]
    WriterThread(#[source] std::io::Error),
    #[error("a store reader task failed: {0}")]
    ReaderTask(#[source] tokio::task::JoinError),
    #[error("cannot encode audit event details: {0}")]
    AuditDetails(#[source] serde_json::Error),
    /// The transaction holding this change (and the others committed with
    /// it) failed as a whole; every change in it reports the same cause.
    #[error("the batch commit failed: {0}")]
    Batch(#[source] std::sync::Arc<DatabaseError>),
    /// No audit event, no change: a caller bug, refused before any write.
    #[error("a change with writes but no audit event is refused")]
    Unaudited,
    /// The store was opened read-only (`audit verify`).
    #[error("the store is open read-only")]
    ReadOnly,
    /// A snapshot's sink (the backup archive being written) failed.
    #[error("the snapshot could not be written: {0}")]
    Snapshot(#[source] std::io::Error),
    /// A `fail-closed` audit sink could not take the batch's events: the
    /// batch is rolled back, every change in it refused.
    #[error("the audit sink refused the events, so the change was rolled back: {0}")]
    AuditSink(#[source] crate::audit::sink::SinkError),
}

impl DatabaseError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRow(_) | Self::PostgresRow(_) => "store_corrupt",
            Self::Postgres(e) if e.code().is_some_and(|c| c.code().starts_with("23")) => {
                "store_constraint"
            }
            Self::Constraint(_) => "store_constraint",
            Self::Unaudited => "change_unaudited",
            Self::ReadOnly => "store_read_only",
            Self::Batch(inner) => inner.code(),
            Self::Sqlite(_)
            | Self::Postgres(_)
            | Self::NoSchema
            | Self::Create { .. }
            | Self::NotFound(_)
            | Self::WriterThread(_)
            | Self::ReaderTask(_)
            | Self::AuditDetails(_) => "store_unavailable",
            Self::Snapshot(_) => "snapshot_write_failed",
            Self::Unsupported(_) => "store_unsupported",
            Self::AuditSink(_) => "audit_sink_failed",
        }
    }
}

/// One domain write. Conditional writes (`from` states) fail the whole
/// change with [`StoreError::Conflict`] when the row is not as expected.
#[derive(Debug, Clone)]
pub enum Write {
    InsertKey(KeyRecord),
    /// Confirms a key recorded as `generating`: stores its public key and
    /// moves it to `state` (`active`, or `pre-active` for a key that a
    /// rotation will activate later). Conflicts unless the key is still
    /// `generating`.
    CompleteKeyGeneration {
        id: Uuid,
        public_key_der: Vec<u8>,
        state: KeyState,
        at: i64,
    },
    SetKeyState {
        id: Uuid,
        from: KeyState,
        to: KeyState,
        at: i64,
    },
    /// A restore put key `id` onto another device (a fresh token whose
    /// label differs): its handle is now `handle`. Conflicts (`Missing`)
    /// if there is no such key.
    SetKeyHandle {
        id: Uuid,
        handle: KeyHandle,
        at: i64,
    },
    InsertCa(CaRecord),
    /// Conflicts (`Duplicate`) on an existing name.
    InsertAdmin(AdminRecord),
    /// Inserts a `pending` registration. With `max_pending_in_group`, the
    /// number of `pending` registrations of its group is counted inside the
    /// transaction and the insert conflicts with `LimitReached` at the cap.
    InsertRegistration {
        record: Box<RegistrationRecord>,
        max_pending_in_group: Option<u32>,
    },
    SetRegistrationStatus {
        id: Uuid,
        from: RegistrationStatus,
        to: RegistrationStatus,
        at: i64,
        certificate_serial: Option<String>,
    },
    /// Disables an admin account. Conflicts with `StateChanged` if it is
    /// already disabled, and with `LastActiveAdmin` if, counted inside the
    /// transaction, no other active admin of role `admin` would remain.
    /// In the same transaction, the open admin requests (pending, or
    /// approved and not yet redeemed) it made or approved are `expired`:
    /// a disabled admin's word no longer counts anywhere.
    DisableAdmin {
        id: Uuid,
        at: i64,
    },
    /// Changes an admin's role. Conflicts unless the admin is active and
    /// still has role `from`; `LastActiveAdmin` if it would leave no active
    /// admin of role `admin`. With `without_second_admin` (a raise no second
    /// admin approved), conflicts with `SecondAdminRequired` when, counted
    /// in the transaction, two accounts have ever held role `admin`.
    SetAdminRole {
        id: Uuid,
        from: Role,
        to: Role,
        without_second_admin: bool,
    },
    /// Records the first delivery of credentials (sets
    /// `credentials_fetched_at` if unset; a no-op when already set).
    /// Conflicts once the device has confirmed (a fetch racing a confirm).
    MarkCredentialsFetched {
        id: Uuid,
        at: i64,
    },
    /// The device confirms it holds its credentials: no more re-fetch.
    /// Conflicts if already confirmed.
    ConfirmCredentials {
        id: Uuid,
        at: i64,
    },
    /// Records one admin's approval or denial of a registration. Inside the
    /// transaction it checks, and conflicts otherwise, that:
    /// - the registration is `pending` (`StateChanged`);
    /// - the deciding admin is active and holds at least `min_role`
    ///   (`StateChanged` on the admin);
    /// - this admin has not decided it before (`Duplicate`);
    /// - the number of counted approvals (decision `approve` by admins that
    ///   are still active and still hold at least `min_role`) equals
    ///   `expect_counted_approvals` (`ApprovalsChanged`).
    ///
    /// The caller decides (quorum reached or not, issue or not) from that
    /// count; the check makes the decision hold at commit, or fail whole.
    RecordDecision {
        approval: ApprovalRecord,
        expect_counted_approvals: u32,
        min_role: Role,
    },
    InsertDevice(DeviceRecord),
    InsertCertificate(CertificateRecord),
    /// Conflicts (`Duplicate`) if a pending or approved request already
    /// names the same invitee (`kind = invite`) or the same admin (`set-role`).
    InsertAdminRequest(AdminRequestRecord),
    /// Approves or denies a pending admin request. Conflicts unless it is
    /// still `pending` and `at < expires_at`, and (`StateChanged`) when
    /// `decided_by` is not an active admin of role `admin`. `approver_secret_hash` is stored for invitations.
    DecideAdminRequest {
        id: Uuid,
        to: AdminRequestStatus,
        decided_by: Uuid,
        at: i64,
        approver_secret_hash: Option<Vec<u8>>,
    },
    /// Turns an `approved` invitation into an admin account, once: sets the
    /// request `redeemed` with `admin_id`, inserts `admin` (conflicts on a
    /// duplicate name), all or nothing. Conflicts unless the request is
    /// `approved`, `at < expires_at`, and its requester (and approver, if
    /// any) are still active (`StateChanged`); an invitation that no second
    /// admin approved conflicts with `SecondAdminRequired` once two accounts
    /// have ever held role `admin`.
    RedeemInvitation {
        id: Uuid,
        at: i64,
        admin: AdminRecord,
    },
    /// Marks a `pending` or `approved` admin request `expired`.
    ExpireAdminRequest {
        id: Uuid,
        at: i64,
    },
    /// A guard, checked inside the transaction: conflicts with `KeyRevoked`
    /// if a certificate of this public key (SHA-256 of its SPKI, lower-case
    /// hex) is revoked other than by a hold, or belongs to a device that is
    /// suspended or revoked. Writes nothing.
    RefuseRevokedKey {
        spki_sha256: String,
    },
    /// A renewal: marks `serial` `superseded` by `by` (inserted in the same
    /// change). Conflicts unless the certificate is `valid`.
    SupersedeCertificate {
        serial: String,
        by: String,
        at: i64,
    },
    /// Revokes one certificate: from `valid` or `superseded`, or from a hold
    /// (`revoked` with `certificate-hold`) to a permanent reason. Conflicts
    /// (`StateChanged`) otherwise, `Missing` if there is no such serial.
    RevokeCertificate {
        serial: String,
        reason: RevocationReason,
        at: i64,
    },
    /// Lifts a hold: `revoked` with `certificate-hold` becomes `superseded`
    /// if a renewal replaced it, else `valid`. Conflicts unless on hold and,
    /// for a device's certificate, unless that device is `active` (checked
    /// in the transaction: a suspension committing first wins).
    ReleaseCertificateHold {
        serial: String,
        at: i64,
    },
    /// Changes a device's status; conflicts unless it is `from` and the
    /// step is one of active → suspended | revoked, suspended → active |
    /// revoked (revocation is final). Its
    /// unexpired certificates (`not_after > at`) follow in the same
    /// transaction:
    /// - to `revoked`: each `valid`, `superseded` or held one is revoked with
    ///   `reason` (which must not be `certificate-hold`);
    /// - to `suspended`: each `valid` or `superseded` one is put on hold;
    /// - `suspended` to `active`: the held ones are released.
    SetDeviceStatus {
        id: Uuid,
        from: DeviceStatus,
        to: DeviceStatus,
        reason: RevocationReason,
        at: i64,
    },
    /// Stores a signed CRL. Conflicts (`StateChanged`) unless its number is
    /// one more than the issuer's highest (1 for the first). Keeps the
    /// newest `keep` CRLs of the issuer and deletes older ones.
    PublishCrl {
        record: CrlRecord,
        keep: u32,
    },
    /// Links a certificate inserted in the same change to a service.
    InsertServiceCertificate(ServiceCertificateRecord),
    /// Lets a device renew once outside its renewal window, until
    /// `record.expires_at`; replaces an open allowance of the device.
    /// Conflicts with `Missing` if there is no such device and
    /// `StateChanged` unless the device is `active` (checked here, in the
    /// transaction).
    AllowRenewal(RenewalAllowanceRecord),
    /// Uses the device's allowance (deletes it). Conflicts (`StateChanged`)
    /// unless one exists with `expires_at > at`: two early renewals racing
    /// on one allowance cannot both commit.
    ConsumeRenewalAllowance {
        device_id: Uuid,
        at: i64,
    },
    /// Retires a service certificate (a successor took over). Conflicts
    /// unless it is not retired yet.
    RetireServiceCertificate {
        serial: String,
        at: i64,
    },
    /// Conflicts (`Duplicate`) on an existing id or secret hash.
    InsertEnrollmentToken(EnrollmentTokenRecord),
    /// Revokes a bootstrap token or reclaim code. Conflicts (`Missing`) if
    /// there is none, (`StateChanged`) if it is already revoked.
    RevokeEnrollmentToken {
        id: Uuid,
        by: Uuid,
        at: i64,
    },
    /// Uses a token once (counts the use). Conflicts with `TokenUnusable`
    /// unless, inside the transaction, it exists, is of `kind`, is not
    /// revoked, `at < expires_at` and `uses < uses_allowed`: two devices
    /// racing on a token's last use cannot both commit.
    ConsumeEnrollmentToken {
        id: Uuid,
        kind: EnrollmentTokenKind,
        at: i64,
    },
    /// Binds an attested identity to a device for good: inserts the
    /// mapping, or refreshes `last_enrolled_at` if it already names
    /// `device_id`; conflicts (`StateChanged`) if it names another device
    /// (a concurrent first enrollment of the same identity won).
    ClaimIdentity {
        identity: String,
        device_id: Uuid,
        method: AttestationMethod,
        at: i64,
    },
    /// Records a JWT id until `expires_at`. Conflicts (`Duplicate`) if the
    /// issuer's jti is already recorded and unexpired: a replay. Expired
    /// records are purged on the way.
    RecordJwtId {
        issuer: String,
        jti: String,
        expires_at: i64,
        at: i64,
    },
    /// An existing device enrolls again (re-provisioning, reclaim). Conflicts
    /// (`Missing`) without the device and (`StateChanged`) unless it is
    /// `active`. In the same transaction its unexpired `valid` or
    /// `superseded` certificates other than `keep_serial` are revoked with
    /// reason `superseded`, and its group and name are updated.
    ReenrollDevice {
        id: Uuid,
        group: String,
        name: String,
        keep_serial: String,
        at: i64,
    },
    /// A server-generated key was delivered: once. Conflicts
    /// (`StateChanged`) if it already was.
    MarkKeyDelivered {
        registration_id: Uuid,
        at: i64,
    },
    /// Links the HSM key generated for a registration's device.
    SetServerKey {
        registration_id: Uuid,
        key_id: Uuid,
    },
    /// Queues a broker update for a device, due at once (`at`). A pending
    /// update of the same device is replaced: the newest op wins.
    EnqueueBrokerUpdate {
        device_id: Uuid,
        op: BrokerOp,
        at: i64,
    },
    /// The broker applied outbox entry `id`: it is deleted. A no-op if a
    /// later enqueue already replaced it (that one stays queued).
    CompleteBrokerUpdate {
        id: i64,
    },
    /// An attempt on outbox entry `id` failed: `attempts` + 1, the error
    /// kept, not retried before `next_attempt_at`. A no-op if the entry was
    /// replaced meanwhile.
    FailBrokerUpdate {
        id: i64,
        next_attempt_at: i64,
        error: String,
    },
    /// Starts a rotation. Conflicts (`RotationRunning`) while another
    /// rotation of the same purpose and target is running.
    InsertRotation(RotationRecord),
    /// Moves rotation `id` from step `from` to step `to` (conflicts with
    /// `StateChanged` if it is not at `from`), setting the fields given and
    /// clearing the failure count. `to` being final sets `finished_at`.
    AdvanceRotation {
        id: Uuid,
        from: RotationStep,
        to: RotationStep,
        new_key_id: Option<Uuid>,
        new_serial: Option<String>,
        destroy_after: Option<i64>,
        at: i64,
    },
    /// An attempt at the step after `step` failed: `attempts` + 1, the
    /// error kept, not tried again before `next_attempt_at`. Conflicts if
    /// the rotation is no longer at `step`.
    FailRotationAttempt {
        id: Uuid,
        step: RotationStep,
        error: String,
        next_attempt_at: i64,
        at: i64,
    },
    /// Records that the `device.renewal_due` notification for each of
    /// `serials` went out at `at`. Conflicts (`StateChanged`) unless every
    /// serial names a certificate not marked yet: two schedulers racing on
    /// one batch cannot both mark (and notify) it. An empty list writes
    /// nothing.
    MarkRenewalNotified {
        serials: Vec<String>,
        at: i64,
    },
    /// Records a backup archive and one `pending` replica per location
    /// (due at `record.created_at`). Conflicts (`Duplicate`) on a reused id
    /// or file name.
    RecordBackup {
        record: BackupRecord,
        locations: Vec<String>,
    },
    /// Replica (`backup_id`, `location`) was uploaded and its checksum read
    /// back: `stored`, failures cleared. Conflicts (`Missing`) if there is
    /// no such replica, (`StateChanged`) if it was pruned.
    ReplicaStored {
        backup_id: Uuid,
        location: String,
        at: i64,
    },
    /// An upload attempt failed: `failed`, `attempts` + 1, the error kept,
    /// retried at `next_attempt_at`. Conflicts as [`Write::ReplicaStored`].
    ReplicaFailed {
        backup_id: Uuid,
        location: String,
        error: String,
        next_attempt_at: i64,
        at: i64,
    },
    /// A verification of the replica ran: `error` `None` sets
    /// `verified_at` and clears `verify_error`; `Some` keeps `verified_at`
    /// and records the error. Conflicts (`Missing`) if there is no such replica.
    ReplicaVerified {
        backup_id: Uuid,
        location: String,
        error: Option<String>,
        at: i64,
    },
    /// Retention removed backup `id`: `pruned_at` set, every replica
    /// `pruned`. Conflicts (`StateChanged`) if it was already pruned.
    PruneBackup {
        id: Uuid,
        at: i64,
    },
    /// Records a data key that encrypts audit details, wrapped by an HSM
    /// key. Conflicts (`Duplicate`) on a reused id.
    InsertAuditDataKey(crate::store::records::AuditDataKeyRecord),
    /// Points CA `ca` at its new key and certificate. Conflicts
    /// (`StateChanged`) unless the CA's key is `from_key`.
    ActivateCaKey {
        ca: String,
        from_key: Uuid,
        to_key: Uuid,
        certificate_der: Vec<u8>,
    },
}

/// An atomic unit: all writes and all audit events, or none.
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub writes: Vec<Write>,
    pub audit: Vec<AuditDraft>,
}

impl Change {
    pub fn new() -> Self {
        Self::default()
    }

    /// This change followed by `other`'s writes and events, in one commit.
    pub fn merge(mut self, other: Change) -> Self {
        self.writes.extend(other.writes);
        self.audit.extend(other.audit);
        self
    }

    pub fn write(mut self, w: Write) -> Self {
        self.writes.push(w);
        self
    }

    pub fn audit(mut self, a: AuditDraft) -> Self {
        self.audit.push(a);
        self
    }
}

/// Filter for audit queries.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub from_seq: i64,
    pub limit: u32,
}

/// Filter for audit reports ([`Store::audit_report`]): every field that is
/// set must match. Kept apart from [`AuditQuery`] (the verifier's plain
/// sequence scan) so that scan stays as it is.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Events at or after this time (Unix ms).
    pub since_ms: Option<i64>,
    /// Events before this time (Unix ms, exclusive).
    pub until_ms: Option<i64>,
    /// Exact actor (`admin:<id>`, `system`, ...).
    pub actor: Option<String>,
    /// Exact action (`registration.approve`), or a prefix form `key.*`
    /// (every action starting with `key.`). See [`audit_action_filter`].
    pub action: Option<String>,
    /// Exact target.
    pub target: Option<String>,
    /// Keyset cursor: the `next` of the previous page, a sequence number;
    /// the page starts after it in the listing order.
    pub after: Option<i64>,
    /// 1..=1000; backends clamp.
    pub limit: u32,
    /// Newest first by default.
    pub order: Order,
}

/// How an [`AuditFilter::action`] matches: `Exact(a)`, or `Prefix(p)` for
/// `p*` where `p` ends with a dot (`key.*` → every `key.…` action).
/// `InvalidArgument` for an empty action, or a `*` anywhere but after a
/// final dot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionMatch<'a> {
    Exact(&'a str),
    Prefix(&'a str),
}

pub fn audit_action_filter(action: &str) -> Result<ActionMatch<'_>, StoreError> {
    if action.is_empty() {
        return Err(StoreError::InvalidArgument("the action filter is empty"));
    }
    match action.strip_suffix('*') {
        Some(prefix) if prefix.ends_with('.') && prefix.len() > 1 && !prefix.contains('*') => {
            Ok(ActionMatch::Prefix(prefix))
        }
        Some(_) => Err(StoreError::InvalidArgument(
            "an action pattern is `prefix.*` (a `*` only after a final dot)",
        )),
        None if action.contains('*') => Err(StoreError::InvalidArgument(
            "an action pattern is `prefix.*` (a `*` only after a final dot)",
        )),
        None => Ok(ActionMatch::Exact(action)),
    }
}

/// Listing order. Ids are UUIDv7, so id order is creation order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Order {
    #[default]
    NewestFirst,
    OldestFirst,
}

/// Keyset pagination: `after` is the `next` of the previous page (an id),
/// never an offset, so rows inserted meanwhile neither repeat nor vanish.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    pub after: Option<Uuid>,
    /// 1..=1000; backends clamp.
    pub limit: u32,
    pub order: Order,
}

/// One page; `next` is `None` on the last page.
#[derive(Debug, Clone)]
pub struct Page<T, C = Uuid> {
    pub items: Vec<T>,
    pub next: Option<C>,
}

/// Keyset pagination over certificates, by serial. Serials start with a
/// millisecond timestamp, so serial order is issuance order.
#[derive(Debug, Clone, Default)]
pub struct SerialPageRequest {
    pub after: Option<String>,
    /// 1..=1000; backends clamp.
    pub limit: u32,
    pub order: Order,
}

#[derive(Debug, Clone, Default)]
pub struct EnrollmentTokenFilter {
    pub kind: Option<EnrollmentTokenKind>,
    pub group: Option<String>,
    pub device: Option<Uuid>,
}

#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    pub status: Option<DeviceStatus>,
    pub group: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct CertificateFilter {
    pub device: Option<Uuid>,
    pub status: Option<CertificateStatus>,
    pub issuer_ca: Option<String>,
}

/// Valid device certificates of active devices whose notAfter lies in
/// (`not_after_from`, `not_after_to`], ordered by (notAfter, serial), keyset
/// after `after` (the last (notAfter, serial) of the previous page).
#[derive(Debug, Clone, Default)]
pub struct ExpiringQuery {
    /// Exclusive lower bound (typically now: expired certificates are out).
    pub not_after_from: i64,
    /// Inclusive upper bound.
    pub not_after_to: i64,
    /// Only certificates not yet notified (`renewal_notified_at` unset).
    pub unnotified_only: bool,
    pub after: Option<(i64, String)>,
    /// 1..=1000; backends clamp.
    pub limit: u32,
}

/// The approval queue at a glance ([`Store::pending_registrations_summary`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PendingSummary {
    /// Registrations in status `pending`.
    pub count: i64,
    /// `submitted_at` of the oldest of them; `None` when none is pending.
    pub oldest_submitted_at: Option<i64>,
}

/// Active device certificates by time to expiry
/// ([`Store::certificate_expiry_counts`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpiryCounts {
    /// One count per requested bound, in the order asked.
    pub within: Vec<i64>,
    /// Every active device certificate (no upper bound).
    pub active: i64,
}

#[derive(Debug, Clone, Default)]
pub struct RegistrationFilter {
    pub status: Option<RegistrationStatus>,
    pub group: Option<String>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies a change atomically and returns the sequence numbers of its
    /// audit events. Backends may group concurrent changes into one
    /// transaction; each change still succeeds or fails on its own.
    async fn commit(&self, change: Change) -> Result<Vec<i64>, StoreError>;

    /// Installs the sealer that every later commit passes its audit drafts
    /// through before they are chained (sensitive details and the client
    /// address encrypted into `sealed`). The one place sealing happens:
    /// every change goes through `commit`. A backend that cannot keeps
    /// this default and start-up fails while detail encryption is on,
    /// rather than store the details in the clear.
    fn install_sealer(
        &self,
        sealer: std::sync::Arc<dyn crate::audit::seal::DraftSealer>,
    ) -> Result<(), StoreError> {
        let _ = sealer;
        Err(StoreError::SealingUnsupported)
    }

    async fn health(&self) -> Result<(), StoreError>;

    async fn get_key(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError>;
    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError>;

    async fn get_ca(&self, name: &str) -> Result<Option<CaRecord>, StoreError>;
    async fn list_cas(&self) -> Result<Vec<CaRecord>, StoreError>;

    async fn admin_by_token_hash(&self, hash: &[u8]) -> Result<Option<AdminRecord>, StoreError>;
    async fn get_admin(&self, id: Uuid) -> Result<Option<AdminRecord>, StoreError>;
    async fn admin_by_name(&self, name: &str) -> Result<Option<AdminRecord>, StoreError>;
    async fn list_admins(&self, page: &PageRequest) -> Result<Page<AdminRecord>, StoreError>;
    /// Active (not disabled) admins of role `admin`.
    async fn count_active_admins(&self) -> Result<u32, StoreError>;
    /// Accounts that have ever held role `admin`, disabled or lowered since
    /// included. Two or more: every roster change needs a second admin.
    async fn count_ever_admins(&self) -> Result<u32, StoreError>;

    async fn get_registration(&self, id: Uuid) -> Result<Option<RegistrationRecord>, StoreError>;
    async fn list_registrations(
        &self,
        filter: &RegistrationFilter,
        page: &PageRequest,
    ) -> Result<Page<RegistrationRecord>, StoreError>;
    /// `pending` registrations with `expires_at <= now`, oldest first, at most `limit`.
    async fn expired_pending_registrations(
        &self,
        now: i64,
        limit: u32,
    ) -> Result<Vec<RegistrationRecord>, StoreError>;
    /// Number of `pending` registrations per group.
    async fn pending_counts(&self) -> Result<std::collections::BTreeMap<String, i64>, StoreError>;
    /// Number of `pending` registrations (expired ones the sweeper has not
    /// marked yet included) and when the oldest was submitted, for the
    /// queue gauges. One indexed read, whatever the queue's length.
    async fn pending_registrations_summary(&self) -> Result<PendingSummary, StoreError>;
    /// Active device certificates (status `valid`: neither revoked, held
    /// nor superseded; a device id; `not_after > now`) counted whole
    /// (`active`) and, per bound `b` of `within_secs`, those with
    /// `not_after <= now + b` (`within`, same order). A negative bound is
    /// `InvalidArgument`. Unix seconds.
    async fn certificate_expiry_counts(
        &self,
        now: i64,
        within_secs: &[i64],
    ) -> Result<ExpiryCounts, StoreError>;
    /// Decisions on a registration in time order; `counted` says whether the
    /// deciding admin is still active (an approval by a since-disabled admin
    /// does not count toward a quorum).
    async fn approvals(&self, registration: Uuid) -> Result<Vec<ApprovalRecord>, StoreError>;

    async fn get_admin_request(&self, id: Uuid) -> Result<Option<AdminRequestRecord>, StoreError>;
    async fn list_admin_requests(
        &self,
        status: Option<AdminRequestStatus>,
        page: &PageRequest,
    ) -> Result<Page<AdminRequestRecord>, StoreError>;

    async fn get_device(&self, id: Uuid) -> Result<Option<DeviceRecord>, StoreError>;
    /// The device's open early-renewal allowance, if any (expired ones
    /// included; the caller compares `expires_at`).
    async fn renewal_allowance(
        &self,
        device_id: Uuid,
    ) -> Result<Option<RenewalAllowanceRecord>, StoreError>;
    async fn list_devices(
        &self,
        filter: &DeviceFilter,
        page: &PageRequest,
    ) -> Result<Page<DeviceRecord>, StoreError>;
    async fn enrollment_token_by_hash(
        &self,
        hash: &[u8],
    ) -> Result<Option<EnrollmentTokenRecord>, StoreError>;
    async fn get_enrollment_token(
        &self,
        id: Uuid,
    ) -> Result<Option<EnrollmentTokenRecord>, StoreError>;
    /// Newest first unless `page.order` says otherwise.
    async fn list_enrollment_tokens(
        &self,
        filter: &EnrollmentTokenFilter,
        page: &PageRequest,
    ) -> Result<Page<EnrollmentTokenRecord>, StoreError>;
    /// The device an attested identity is bound to ([`Write::ClaimIdentity`]).
    async fn device_for_identity(&self, identity: &str) -> Result<Option<Uuid>, StoreError>;
    async fn get_certificate(&self, serial: &str) -> Result<Option<CertificateRecord>, StoreError>;
    async fn list_certificates(
        &self,
        filter: &CertificateFilter,
        page: &SerialPageRequest,
    ) -> Result<Page<CertificateRecord, String>, StoreError>;
    /// One page of [`ExpiringQuery`]; `next` is the cursor of the next page.
    async fn expiring_device_certificates(
        &self,
        q: &ExpiringQuery,
    ) -> Result<Page<ExpiringCertificate, (i64, String)>, StoreError>;
    /// Every certificate whose SubjectPublicKeyInfo hashes to `spki_sha256`.
    async fn certificates_by_spki(
        &self,
        spki_sha256: &str,
    ) -> Result<Vec<CertificateRecord>, StoreError>;
    /// The `revoked` certificates `issuer_ca` signed that have not expired
    /// at `now` (`not_after > now`), in serial order: a CRL's entries.
    async fn revoked_certificates(
        &self,
        issuer_ca: &str,
        now: i64,
    ) -> Result<Vec<RevokedEntry>, StoreError>;
    /// The issuer's CRL with the highest number.
    async fn latest_crl(&self, issuer_ca: &str) -> Result<Option<CrlRecord>, StoreError>;
    /// Unexpired revoked certificates signed by CA key `key_id` (what that
    /// key's CRL lists).
    async fn revoked_certificates_by_key(
        &self,
        key_id: Uuid,
        now: i64,
    ) -> Result<Vec<RevokedEntry>, StoreError>;
    /// The newest CRL of `issuer_ca` signed by `key_id`.
    async fn latest_crl_of_key(
        &self,
        issuer_ca: &str,
        key_id: Uuid,
    ) -> Result<Option<CrlRecord>, StoreError>;
    /// The latest notAfter among the certificates CA key `key_id` signed,
    /// leaving out retired service certificates and the CA's delegated OCSP
    /// signer certificates (nobody relies on those once the key retires):
    /// until then the key must keep signing CRLs. `None`: it signed none.
    async fn last_expiry_issued_by(&self, key_id: Uuid) -> Result<Option<i64>, StoreError>;
    async fn get_rotation(&self, id: Uuid) -> Result<Option<RotationRecord>, StoreError>;
    /// Streams every table (but [`snapshot::NOT_SNAPSHOTTED`]) to `sink`
    /// from one read transaction: a consistent moment, without blocking
    /// writers. Returns the sink's tables and the key rows of that moment.
    async fn export_snapshot(
        &self,
        sink: Box<dyn snapshot::SnapshotSink>,
    ) -> Result<snapshot::SnapshotInfo, StoreError>;
    /// Backups with their replicas, newest first; `include_pruned` adds
    /// those retention removed.
    async fn list_backups(
        &self,
        include_pruned: bool,
        limit: u32,
    ) -> Result<Vec<BackupRecord>, StoreError>;
    async fn get_backup(&self, id: Uuid) -> Result<Option<BackupRecord>, StoreError>;
    /// Replicas `pending` or `failed` whose `next_attempt_at` is at or before `now`.
    async fn due_replicas(&self, now: i64) -> Result<Vec<ReplicaRecord>, StoreError>;
    /// Newest first; `open_only`: those not finished.
    async fn list_rotations(
        &self,
        open_only: bool,
        limit: u32,
    ) -> Result<Vec<RotationRecord>, StoreError>;
    /// Service certificates not retired, of `purpose`, newest first.
    async fn service_certificates(
        &self,
        purpose: KeyPurpose,
    ) -> Result<Vec<ServiceCertificateRecord>, StoreError>;

    /// Broker outbox entries due at `now` (`next_attempt_at <= now`), in
    /// enqueue order, at most `limit`.
    async fn pending_broker_updates(
        &self,
        now: i64,
        limit: u32,
    ) -> Result<Vec<BrokerOutboxRecord>, StoreError>;
    /// The device's queued broker update, due or not.
    async fn broker_update_for_device(
        &self,
        device_id: Uuid,
    ) -> Result<Option<BrokerOutboxRecord>, StoreError>;
    /// Number of queued broker updates (due or backing off).
    async fn broker_outbox_len(&self) -> Result<i64, StoreError>;

    /// Audit events in sequence order from `from_seq`, at most `limit`.
    async fn audit_events(&self, q: AuditQuery) -> Result<Vec<AuditEvent>, StoreError>;
    /// Audit events matching `q`, ordered by sequence number (newest first
    /// by default), keyset-paginated by sequence number: `next` is the
    /// last sequence of the page, `None` on the last page. The time bounds
    /// use the event's `at_ms`. `InvalidArgument` for a malformed action
    /// pattern or `since_ms >= until_ms`.
    async fn audit_report(&self, q: AuditFilter) -> Result<Page<AuditEvent, i64>, StoreError>;
    /// Number of audit events and the highest sequence number.
    async fn audit_head(&self) -> Result<(i64, Vec<u8>), StoreError>;

    /// Stores a signed checkpoint of the chain. Not a [`Write`]: a
    /// checkpoint authenticates itself by its signature, and an audit event
    /// about it would move the head it signs. Refused (`InvalidArgument`,
    /// nothing stored) unless event `cp.seq` exists with hash `cp.hash` and
    /// `cp.seq` is above every stored checkpoint's, checked in the same
    /// transaction as the insert.
    async fn record_audit_checkpoint(&self, cp: &Checkpoint) -> Result<(), StoreError>;
    /// Checkpoints with `seq >= from_seq`, in sequence order, at most `limit`.
    async fn audit_checkpoints(
        &self,
        from_seq: i64,
        limit: u32,
    ) -> Result<Vec<Checkpoint>, StoreError>;
    /// The checkpoint with the highest sequence number.
    async fn last_audit_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError>;
    /// Every audit data key, oldest first.
    async fn audit_data_keys(
        &self,
    ) -> Result<Vec<crate::store::records::AuditDataKeyRecord>, StoreError>;

    /// Row counts of every table, for tests and operators.
    async fn counts(&self) -> Result<std::collections::BTreeMap<String, i64>, StoreError>;

    // ------------------------------------------------------------ leases
    //
    // Coordination state between daemons sharing this store (the scheduler's
    // leader lease, `jobs::leader`): not domain data, so not a [`Write`] and
    // not audited per call (the scheduler audits each change of leader).
    // Times are Unix milliseconds of the callers' clock: `expires_at` and
    // `acquired_at` are stored in ms.

    /// One atomic step on lease `name` for `holder` as of `now_ms`: takes it
    /// if nobody holds it, takes it over if the holder's lease expired
    /// (`expires_at <= now_ms`), extends it to `now_ms + ttl_ms` if `holder`
    /// already holds it (never shortening it). Returns whether `holder`
    /// holds the lease after the call. Correct across processes sharing the
    /// store (one database transaction). `InvalidArgument` for an empty name
    /// or holder or a `ttl_ms` that is not positive; nothing is changed then.
    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError>;
    /// Gives lease `name` up if `holder` holds it (expired or not): it
    /// expires at once (`expires_at` becomes 0), so anyone takes it at their
    /// next try, and it still names its last holder. A lease held by another
    /// holder, or none, is left as it is.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;
    /// Who holds lease `name` at `now_ms` (`expires_at > now_ms`); `None` if
    /// nobody or the lease expired. `now_ms = i64::MIN` reads the last
    /// holder, expired or released.
    async fn lease_holder(&self, name: &str, now_ms: i64) -> Result<Option<String>, StoreError>;
}
