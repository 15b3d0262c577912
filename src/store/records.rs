//! Rows as the services see them. Times are Unix seconds unless named `_ms`.

pub use crate::model::{
    AdminRequestKind, AdminRequestStatus, AttestationMethod, BackupTrigger, BrokerAccess,
    BrokerAclRule, CaKind, CertificateStatus, Decision, DeviceStatus, EnrollmentTokenKind,
    KeyAlgorithm, KeyHandle, KeyPurpose, KeySource, KeyState, RegistrationStatus, ReplicaState,
    RevocationReason, Role, RotationStep,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: Uuid,
    pub label: String,
    pub purpose: KeyPurpose,
    pub algorithm: KeyAlgorithm,
    /// Backend type (`pkcs11`, `yubikey`).
    pub backend: String,
    /// Name of the configured key store holding it (`default` or `keystores.NAME`).
    pub keystore: String,
    pub handle: KeyHandle,
    /// DER SubjectPublicKeyInfo; empty while `generating`.
    #[serde(skip)]
    pub public_key_der: Vec<u8>,
    pub state: KeyState,
    pub ca_name: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaRecord {
    pub name: String,
    pub kind: CaKind,
    pub parent: Option<String>,
    pub key_id: Uuid,
    #[serde(skip)]
    pub certificate_der: Vec<u8>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminRecord {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    #[serde(skip)]
    pub token_hash: Vec<u8>,
    pub disabled: bool,
    pub created_at: i64,
    pub disabled_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistrationRecord {
    pub id: Uuid,
    pub device_id: Uuid,
    pub group: String,
    pub status: RegistrationStatus,
    pub name: String,
    pub device_type: Option<String>,
    pub location: Option<String>,
    pub firmware: Option<String>,
    #[serde(skip)]
    pub csr_der: Vec<u8>,
    pub key_algorithm: KeyAlgorithm,
    #[serde(skip)]
    pub secret_hash: Vec<u8>,
    /// The admin who submitted it on a device's behalf, if any.
    pub submitted_by: Option<Uuid>,
    pub submitted_at: i64,
    pub expires_at: i64,
    pub decided_at: Option<i64>,
    pub certificate_serial: Option<String>,
    /// First delivery of the credentials; re-fetch is allowed until the
    /// device confirms or the re-fetch window after this time closes.
    pub credentials_fetched_at: Option<i64>,
    pub credentials_confirmed_at: Option<i64>,
    /// Client address of the submitting request (after trusted proxies).
    pub client_addr: Option<String>,
    /// How the device proved who it is.
    pub attestation: AttestationMethod,
    /// The attested identity (manufacturer certificate, JWT claim) that maps
    /// to this device for good, if the method names one.
    pub attested_identity: Option<String>,
    /// What the attestation showed (manufacturer serial and subject, JWT
    /// issuer and jti, token id), as audited.
    pub attestation_details: Option<serde_json::Value>,
    /// The bootstrap token or reclaim code used.
    pub enrollment_token_id: Option<Uuid>,
    /// The admin who minted that token: may not approve this registration.
    pub token_minted_by: Option<Uuid>,
    /// The device existed before (re-provisioning or reclaim).
    pub reenrollment: bool,
    pub key_source: KeySource,
    /// Server keys: the age recipient the bundle is for (`None`: PKCS#12
    /// with a one-time password).
    pub age_recipient: Option<String>,
    /// Server keys: the key in the keys table (HSM).
    pub server_key_id: Option<Uuid>,
    /// Server keys: when the key was delivered (once).
    pub key_delivered_at: Option<i64>,
}

/// An admin-minted enrollment secret: a bootstrap token for a group, or a
/// reclaim code for one device. Only the HMAC of the secret is stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollmentTokenRecord {
    pub id: Uuid,
    pub kind: EnrollmentTokenKind,
    #[serde(skip)]
    pub token_hash: Vec<u8>,
    /// Bootstrap tokens: the group they attest to.
    pub group: Option<String>,
    /// Reclaim codes: the device they re-bind.
    pub device_id: Option<Uuid>,
    /// Bootstrap tokens: the device name every registration must use, if set.
    pub device_name: Option<String>,
    pub uses_allowed: u32,
    pub uses: u32,
    pub created_by: Uuid,
    pub created_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
    pub revoked_by: Option<Uuid>,
    pub last_used_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApprovalRecord {
    pub registration_id: Uuid,
    pub admin_id: Uuid,
    pub decision: Decision,
    pub comment: Option<String>,
    pub decided_at: i64,
    /// Set by reads: whether the deciding admin is still active, so that the
    /// decision counts toward a quorum. Ignored on insert.
    #[serde(default = "yes")]
    pub counted: bool,
    /// Set by reads: the deciding admin's role now (an approval counts only
    /// while its admin still holds the group's `approver_role`). Ignored on insert.
    #[serde(default = "approver")]
    pub admin_role: Role,
}

fn yes() -> bool {
    true
}

fn approver() -> Role {
    Role::Approver
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: Uuid,
    pub name: String,
    pub device_type: Option<String>,
    pub location: Option<String>,
    pub firmware: Option<String>,
    pub group: String,
    pub status: DeviceStatus,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateRecord {
    /// Upper-case hex of the DER serial number.
    pub serial: String,
    pub device_id: Option<Uuid>,
    pub issuer_ca: String,
    pub issuer_key_id: Uuid,
    pub subject: String,
    pub not_before: i64,
    pub not_after: i64,
    /// SHA-256 of the DER certificate, lower-case hex.
    pub fingerprint_sha256: String,
    #[serde(skip)]
    pub der: Vec<u8>,
    pub status: CertificateStatus,
    pub revoked_at: Option<i64>,
    pub revocation_reason: Option<RevocationReason>,
    pub created_at: i64,
    /// The serial of the certificate that renewed this one.
    pub superseded_by: Option<String>,
    /// SHA-256 of the DER SubjectPublicKeyInfo, lower-case hex (unset on
    /// rows written before schema v5).
    pub spki_sha256: Option<String>,
}

impl CertificateRecord {
    /// Whether the certificate is revoked with `certificate-hold` (suspended).
    pub fn on_hold(&self) -> bool {
        self.status == CertificateStatus::Revoked
            && self.revocation_reason == Some(RevocationReason::CertificateHold)
    }
}

/// A valid device certificate nearing its end, with its device: what the
/// renewal notices and the expiring-certificates report read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiringCertificate {
    pub serial: String,
    pub device_id: Uuid,
    pub device_name: String,
    /// The device's enrollment group (its profile sets the renewal window).
    pub group: String,
    pub issuer_ca: String,
    pub not_after: i64,
    /// When the `device.renewal_due` notification went out (`None`: not yet).
    pub renewal_notified_at: Option<i64>,
}

/// One entry of a CRL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedEntry {
    /// Upper-case hex of the DER serial number.
    pub serial: String,
    pub revoked_at: i64,
    pub reason: RevocationReason,
}

/// A signed CRL as published.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CrlRecord {
    pub issuer_ca: String,
    /// The CA key that signed it: after a rotation each key of a CA signs
    /// the CRL of the certificates it issued.
    pub issuer_key_id: Uuid,
    /// The cRLNumber: 1 for an issuer's first CRL, then +1 each time.
    pub number: i64,
    pub this_update: i64,
    pub next_update: i64,
    pub entries: i64,
    #[serde(skip)]
    pub der: Vec<u8>,
    pub created_at: i64,
}

/// keyward's own certificate for one of its services (a CA's delegated OCSP
/// signer, the TLS server). The certificate itself is a [`CertificateRecord`]
/// with the same serial; the key is a [`KeyRecord`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceCertificateRecord {
    pub serial: String,
    /// `ocsp-signing` or `tls-server`.
    pub purpose: KeyPurpose,
    pub issuer_ca: String,
    pub key_id: Uuid,
    pub not_after: i64,
    pub retired_at: Option<i64>,
    pub created_at: i64,
}

/// A change to the admin roster that may need a second admin's approval:
/// inviting an admin, or changing an admin's role.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminRequestRecord {
    pub id: Uuid,
    pub kind: AdminRequestKind,
    /// The invitee's name (`invite`) or the target admin's name (`set-role`).
    pub name: String,
    /// The target admin (`set-role`), or the admin created by redemption.
    pub admin_id: Option<Uuid>,
    pub role: Role,
    pub requested_by: Uuid,
    pub status: AdminRequestStatus,
    pub decided_by: Option<Uuid>,
    /// HMAC of the invitation code given to the requester (`invite`).
    #[serde(skip)]
    pub requester_secret_hash: Option<Vec<u8>>,
    /// HMAC of the approval code given to the approving admin (`invite`
    /// with a second admin); the invitee needs both codes.
    #[serde(skip)]
    pub approver_secret_hash: Option<Vec<u8>>,
    pub client_addr: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub decided_at: Option<i64>,
    pub redeemed_at: Option<i64>,
}

/// A one-time allowance to renew before the renewal window opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewalAllowanceRecord {
    pub device_id: Uuid,
    /// The admin who granted it.
    pub granted_by: Uuid,
    pub granted_at: i64,
    /// Unused after this time.
    pub expires_at: i64,
}

/// What the broker must be told about a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BrokerOp {
    /// The device's broker identity gets exactly these ACLs (replacing any
    /// it had).
    Grant(Vec<BrokerAclRule>),
    /// The device's broker identity and its ACLs are removed.
    Revoke,
}

impl BrokerOp {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Grant(_) => "grant",
            Self::Revoke => "revoke",
        }
    }
}

/// A broker update waiting in the outbox (`broker_outbox`): at most one
/// per device, the newest op (a later one supersedes a pending one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerOutboxRecord {
    /// Increasing: a later enqueue has a larger id.
    pub id: i64,
    pub device_id: Uuid,
    pub op: BrokerOp,
    pub created_at: i64,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Not tried again before this time.
    pub next_attempt_at: i64,
    /// Why the last attempt failed (no secrets: the provisioner's error text).
    pub last_error: Option<String>,
}

/// One rotation of one key, as the executor left it (see `crate::rotation`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotationRecord {
    pub id: Uuid,
    /// Which kind of key: `issuing-ca`, `ocsp-signing`, `tls-server`.
    pub purpose: KeyPurpose,
    /// What holds the key: the CA name (for `tls-server`, `server`).
    pub target: String,
    /// The last step committed.
    pub step: RotationStep,
    pub old_key_id: Option<Uuid>,
    pub new_key_id: Option<Uuid>,
    /// The new key's certificate, upper-case hex serial, once certified.
    pub new_serial: Option<String>,
    /// Why: `schedule: …` (the planner's reason) or `manual`.
    pub reason: String,
    pub actor: String,
    /// The old key may be destroyed after this time.
    pub destroy_after: Option<i64>,
    /// Failed attempts at the next step since the last step committed.
    pub attempts: i64,
    pub last_error: Option<String>,
    /// The next step is not tried before this time (backoff after a failure).
    pub next_attempt_at: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
}

/// A data key that encrypts the sensitive details of audit events, as the
/// HSM key `key_id` wrapped it. Never stored in the clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditDataKeyRecord {
    pub id: Uuid,
    /// The HSM key (`keys.id`) that unwraps it.
    pub key_id: Uuid,
    pub wrapped: Vec<u8>,
    pub created_at: i64,
}

/// One encrypted backup archive.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackupRecord {
    pub id: Uuid,
    /// The archive's file (object) name in every location.
    pub file_name: String,
    pub created_at: i64,
    /// Lower-case hex SHA-256 of the encrypted file.
    pub sha256: String,
    pub size_bytes: i64,
    pub format_version: i64,
    /// The store schema version of the snapshot inside.
    pub schema_version: i64,
    pub trigger: BackupTrigger,
    pub actor: String,
    /// What is inside: row counts, keys wrapped, keys bound to their hardware.
    pub summary: serde_json::Value,
    /// When retention removed it from every location.
    pub pruned_at: Option<i64>,
    /// Filled by the reads; ignored by [`crate::store::Write::RecordBackup`].
    pub replicas: Vec<ReplicaRecord>,
}

/// One backup in one location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaRecord {
    pub backup_id: Uuid,
    pub location: String,
    pub state: ReplicaState,
    /// Failed attempts since the last success.
    pub attempts: i64,
    pub last_error: Option<String>,
    pub next_attempt_at: i64,
    pub stored_at: Option<i64>,
    /// The last successful verification (downloaded, checksum matched and,
    /// with a verification identity, decrypted and every member hash checked).
    pub verified_at: Option<i64>,
    /// The last verification's failure; cleared by a success.
    pub verify_error: Option<String>,
    pub updated_at: i64,
}
