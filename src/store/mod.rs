//! The `Store` port: all persistent state, changed only through [`Change`]s
//! that carry their audit events, so no change lands without its event.

pub mod records;
pub mod sqlite;

pub use records::*;

use crate::audit::{AuditDraft, AuditEvent};
use async_trait::async_trait;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A conditional write found the row in another state (a concurrent
    /// decision, a duplicate). Nothing of the change was applied.
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error(
        "database schema version {found} is newer than this keyward ({supported}); upgrade keyward"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("the store writer has stopped")]
    WriterGone,
}

/// One domain write. Conditional writes (`from` states) fail the whole
/// change with [`StoreError::Conflict`] when the row is not as expected.
#[derive(Debug, Clone)]
pub enum Write {
    InsertKey(KeyRecord),
    /// Confirms a key recorded as `generating`: stores its public key and
    /// makes it active. Conflicts unless the key is still `generating`.
    CompleteKeyGeneration {
        id: Uuid,
        public_key_der: Vec<u8>,
        at: i64,
    },
    SetKeyState {
        id: Uuid,
        from: KeyState,
        to: KeyState,
        at: i64,
    },
    InsertCa(CaRecord),
    InsertAdmin(AdminRecord),
    InsertRegistration(RegistrationRecord),
    SetRegistrationStatus {
        id: Uuid,
        from: RegistrationStatus,
        to: RegistrationStatus,
        at: i64,
        certificate_serial: Option<String>,
    },
    /// Disables an admin account; conflicts if it is already disabled.
    DisableAdmin {
        id: Uuid,
    },
    /// Marks one-time credentials as delivered; conflicts if already delivered.
    MarkCredentialsFetched {
        id: Uuid,
        at: i64,
    },
    /// Conflicts if this admin already decided this registration.
    InsertApproval(ApprovalRecord),
    InsertDevice(DeviceRecord),
    InsertCertificate(CertificateRecord),
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

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies a change atomically and returns the sequence numbers of its
    /// audit events. Backends may group concurrent changes into one
    /// transaction; each change still succeeds or fails on its own.
    async fn commit(&self, change: Change) -> Result<Vec<i64>, StoreError>;

    async fn health(&self) -> Result<(), StoreError>;

    async fn get_key(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError>;
    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError>;

    async fn get_ca(&self, name: &str) -> Result<Option<CaRecord>, StoreError>;
    async fn list_cas(&self) -> Result<Vec<CaRecord>, StoreError>;

    async fn admin_by_token_hash(&self, hash: &[u8]) -> Result<Option<AdminRecord>, StoreError>;
    async fn list_admins(&self) -> Result<Vec<AdminRecord>, StoreError>;

    async fn get_registration(&self, id: Uuid) -> Result<Option<RegistrationRecord>, StoreError>;
    async fn list_registrations(
        &self,
        status: Option<RegistrationStatus>,
        limit: u32,
    ) -> Result<Vec<RegistrationRecord>, StoreError>;
    async fn approvals(&self, registration: Uuid) -> Result<Vec<ApprovalRecord>, StoreError>;

    async fn get_device(&self, id: Uuid) -> Result<Option<DeviceRecord>, StoreError>;
    async fn get_certificate(&self, serial: &str) -> Result<Option<CertificateRecord>, StoreError>;

    /// Audit events in sequence order from `from_seq`, at most `limit`.
    async fn audit_events(&self, q: AuditQuery) -> Result<Vec<AuditEvent>, StoreError>;
    /// Number of audit events and the highest sequence number.
    async fn audit_head(&self) -> Result<(i64, Vec<u8>), StoreError>;

    /// Row counts of every table, for tests and operators.
    async fn counts(&self) -> Result<std::collections::BTreeMap<String, i64>, StoreError>;
}
