//! Row ↔ record mapping for the PostgreSQL backend: the same columns in
//! the same order as SQLite's (`src/store/sqlite/rows.rs`), decoded from
//! PostgreSQL's types (BOOLEAN flags, BIGINT numbers, BYTEA blobs).

use crate::audit::{AuditEvent, Checkpoint, Outcome};
use crate::model::CaKind;
use crate::model::{KeyAlgorithm, KeyHandle};
use crate::store::records::*;
use crate::store::{DatabaseError, StoreError};
use tokio_postgres::Row;
use tokio_postgres::types::FromSql;
use uuid::Uuid;

type R<T> = Result<T, StoreError>;

/// A value that does not decode: tampering or a bug, never transient.
pub(super) fn bad(idx: usize, what: &str, value: &str) -> StoreError {
    DatabaseError::PostgresRow(format!("column {idx}: invalid {what} `{value}`")).into()
}

/// Column `idx` as `T`; a type mismatch or unexpected NULL is a bad row.
pub(super) fn get<'a, T: FromSql<'a>>(r: &'a Row, idx: usize) -> R<T> {
    r.try_get(idx)
        .map_err(|e| DatabaseError::PostgresRow(format!("column {idx}: {e}")).into())
}

/// A BIGINT column that holds a count (`u32` in the record).
fn count(r: &Row, idx: usize) -> R<u32> {
    let n: i64 = get(r, idx)?;
    u32::try_from(n).map_err(|_| bad(idx, "count", &n.to_string()))
}

fn uuid(r: &Row, idx: usize) -> R<Uuid> {
    let s: String = get(r, idx)?;
    Uuid::parse_str(&s).map_err(|_| bad(idx, "uuid", &s))
}

fn opt_uuid(r: &Row, idx: usize) -> R<Option<Uuid>> {
    let s: Option<String> = get(r, idx)?;
    s.map(|s| Uuid::parse_str(&s).map_err(|_| bad(idx, "uuid", &s)))
        .transpose()
}

fn parsed<T>(r: &Row, idx: usize, what: &str, f: impl Fn(&str) -> Option<T>) -> R<T> {
    let s: String = get(r, idx)?;
    f(&s).ok_or_else(|| bad(idx, what, &s))
}

fn opt_parsed<T>(r: &Row, idx: usize, what: &str, f: impl Fn(&str) -> Option<T>) -> R<Option<T>> {
    let s: Option<String> = get(r, idx)?;
    s.map(|s| f(&s).ok_or_else(|| bad(idx, what, &s)))
        .transpose()
}

/// Stored reasons are the stable names only.
fn reason(s: &str) -> Option<RevocationReason> {
    RevocationReason::ALL.into_iter().find(|r| r.as_str() == s)
}

fn algorithm(r: &Row, idx: usize) -> R<KeyAlgorithm> {
    parsed(r, idx, "algorithm", |s| s.parse().ok())
}

pub(super) fn ca_kind_str(k: CaKind) -> &'static str {
    match k {
        CaKind::Root => "root",
        CaKind::Issuing => "issuing",
    }
}

fn json_opt(r: &Row, i: usize) -> R<Option<serde_json::Value>> {
    let text: Option<String> = get(r, i)?;
    match text {
        None => Ok(None),
        Some(t) => serde_json::from_str(&t)
            .map(Some)
            .map_err(|e| bad(i, "JSON", &e.to_string())),
    }
}

/// A device id column (`device_for_identity`).
pub(super) fn first_uuid(r: &Row) -> R<Uuid> {
    uuid(r, 0)
}

pub(super) const KEY_SELECT: &str = "SELECT id, label, purpose, algorithm, backend, handle, public_key, state, ca_name, created_at, updated_at, keystore FROM keys";

pub(super) fn key(r: &Row) -> R<KeyRecord> {
    Ok(KeyRecord {
        id: uuid(r, 0)?,
        label: get(r, 1)?,
        purpose: parsed(r, 2, "key purpose", KeyPurpose::parse)?,
        algorithm: algorithm(r, 3)?,
        backend: get(r, 4)?,
        handle: KeyHandle(get(r, 5)?),
        public_key_der: get(r, 6)?,
        state: parsed(r, 7, "key state", KeyState::parse)?,
        ca_name: get(r, 8)?,
        created_at: get(r, 9)?,
        updated_at: get(r, 10)?,
        keystore: get(r, 11)?,
    })
}

pub(super) const CA_SELECT: &str =
    "SELECT name, kind, parent, key_id, certificate, created_at FROM cas";

pub(super) fn ca(r: &Row) -> R<CaRecord> {
    Ok(CaRecord {
        name: get(r, 0)?,
        kind: parsed(r, 1, "CA kind", |s| match s {
            "root" => Some(CaKind::Root),
            "issuing" => Some(CaKind::Issuing),
            _ => None,
        })?,
        parent: get(r, 2)?,
        key_id: uuid(r, 3)?,
        certificate_der: get(r, 4)?,
        created_at: get(r, 5)?,
    })
}

pub(super) const ADMIN_SELECT: &str =
    "SELECT id, name, role, token_hash, disabled, created_at, disabled_at FROM admins";

pub(super) fn admin(r: &Row) -> R<AdminRecord> {
    Ok(AdminRecord {
        id: uuid(r, 0)?,
        name: get(r, 1)?,
        role: parsed(r, 2, "role", |s| s.parse().ok())?,
        token_hash: get(r, 3)?,
        disabled: get(r, 4)?,
        created_at: get(r, 5)?,
        disabled_at: get(r, 6)?,
    })
}

pub(super) const REGISTRATION_SELECT: &str = "SELECT id, device_id, group_name, status, name, device_type, location, firmware, csr,
    key_algorithm, secret_hash, submitted_by, submitted_at, expires_at, decided_at, certificate_serial, credentials_fetched_at,
    credentials_confirmed_at, client_addr, attestation, attested_identity, attestation_details, enrollment_token_id,
    token_minted_by, reenrollment, key_source, age_recipient, server_key_id, key_delivered_at FROM registrations";

pub(super) fn registration(r: &Row) -> R<RegistrationRecord> {
    Ok(RegistrationRecord {
        id: uuid(r, 0)?,
        device_id: uuid(r, 1)?,
        group: get(r, 2)?,
        status: parsed(r, 3, "registration status", RegistrationStatus::parse)?,
        name: get(r, 4)?,
        device_type: get(r, 5)?,
        location: get(r, 6)?,
        firmware: get(r, 7)?,
        csr_der: get(r, 8)?,
        key_algorithm: algorithm(r, 9)?,
        secret_hash: get(r, 10)?,
        submitted_by: opt_uuid(r, 11)?,
        submitted_at: get(r, 12)?,
        expires_at: get(r, 13)?,
        decided_at: get(r, 14)?,
        certificate_serial: get(r, 15)?,
        credentials_fetched_at: get(r, 16)?,
        credentials_confirmed_at: get(r, 17)?,
        client_addr: get(r, 18)?,
        attestation: parsed(r, 19, "attestation method", AttestationMethod::parse)?,
        attested_identity: get(r, 20)?,
        attestation_details: json_opt(r, 21)?,
        enrollment_token_id: opt_uuid(r, 22)?,
        token_minted_by: opt_uuid(r, 23)?,
        reenrollment: get(r, 24)?,
        key_source: parsed(r, 25, "key source", KeySource::parse)?,
        age_recipient: get(r, 26)?,
        server_key_id: opt_uuid(r, 27)?,
        key_delivered_at: get(r, 28)?,
    })
}

pub(super) const ENROLLMENT_TOKEN_SELECT: &str = "SELECT id, kind, token_hash, group_name, device_id, device_name,
    uses_allowed, uses, created_by, created_at, expires_at, revoked_at, revoked_by, last_used_at FROM enrollment_tokens";

pub(super) fn enrollment_token(r: &Row) -> R<EnrollmentTokenRecord> {
    Ok(EnrollmentTokenRecord {
        id: uuid(r, 0)?,
        kind: parsed(r, 1, "enrollment token kind", EnrollmentTokenKind::parse)?,
        token_hash: get(r, 2)?,
        group: get(r, 3)?,
        device_id: opt_uuid(r, 4)?,
        device_name: get(r, 5)?,
        uses_allowed: count(r, 6)?,
        uses: count(r, 7)?,
        created_by: uuid(r, 8)?,
        created_at: get(r, 9)?,
        expires_at: get(r, 10)?,
        revoked_at: get(r, 11)?,
        revoked_by: opt_uuid(r, 12)?,
        last_used_at: get(r, 13)?,
    })
}

pub(super) fn approval(r: &Row) -> R<ApprovalRecord> {
    Ok(ApprovalRecord {
        registration_id: uuid(r, 0)?,
        admin_id: uuid(r, 1)?,
        decision: parsed(r, 2, "decision", Decision::parse)?,
        comment: get(r, 3)?,
        decided_at: get(r, 4)?,
        counted: get(r, 5)?,
        admin_role: parsed(r, 6, "role", |s| s.parse().ok())?,
    })
}

pub(super) const ADMIN_REQUEST_SELECT: &str = "SELECT id, kind, name, admin_id, role, requested_by, status, decided_by,
    requester_secret_hash, approver_secret_hash, client_addr, created_at, expires_at, decided_at, redeemed_at
    FROM admin_requests";

pub(super) fn admin_request(r: &Row) -> R<AdminRequestRecord> {
    Ok(AdminRequestRecord {
        id: uuid(r, 0)?,
        kind: parsed(r, 1, "admin request kind", AdminRequestKind::parse)?,
        name: get(r, 2)?,
        admin_id: opt_uuid(r, 3)?,
        role: parsed(r, 4, "role", |s| s.parse().ok())?,
        requested_by: uuid(r, 5)?,
        status: parsed(r, 6, "admin request status", AdminRequestStatus::parse)?,
        decided_by: opt_uuid(r, 7)?,
        requester_secret_hash: get(r, 8)?,
        approver_secret_hash: get(r, 9)?,
        client_addr: get(r, 10)?,
        created_at: get(r, 11)?,
        expires_at: get(r, 12)?,
        decided_at: get(r, 13)?,
        redeemed_at: get(r, 14)?,
    })
}

pub(super) const DEVICE_SELECT: &str = "SELECT id, name, device_type, location, firmware, group_name, status, created_at, updated_at FROM devices";

pub(super) fn device(r: &Row) -> R<DeviceRecord> {
    Ok(DeviceRecord {
        id: uuid(r, 0)?,
        name: get(r, 1)?,
        device_type: get(r, 2)?,
        location: get(r, 3)?,
        firmware: get(r, 4)?,
        group: get(r, 5)?,
        status: parsed(r, 6, "device status", DeviceStatus::parse)?,
        created_at: get(r, 7)?,
        updated_at: get(r, 8)?,
    })
}

pub(super) const CERT_SELECT: &str =
    "SELECT serial, device_id, issuer_ca, issuer_key_id, subject, not_before, not_after,
    fingerprint, der, status, revoked_at, revocation_reason, created_at, superseded_by, spki_sha256 FROM certificates";

pub(super) fn certificate(r: &Row) -> R<CertificateRecord> {
    Ok(CertificateRecord {
        serial: get(r, 0)?,
        device_id: opt_uuid(r, 1)?,
        issuer_ca: get(r, 2)?,
        issuer_key_id: uuid(r, 3)?,
        subject: get(r, 4)?,
        not_before: get(r, 5)?,
        not_after: get(r, 6)?,
        fingerprint_sha256: get(r, 7)?,
        der: get(r, 8)?,
        status: parsed(r, 9, "certificate status", CertificateStatus::parse)?,
        revoked_at: get(r, 10)?,
        revocation_reason: opt_parsed(r, 11, "revocation reason", reason)?,
        created_at: get(r, 12)?,
        superseded_by: get(r, 13)?,
        spki_sha256: get(r, 14)?,
    })
}

pub(super) const EXPIRING_SELECT: &str =
    "SELECT c.serial, c.device_id, d.name, d.group_name, c.issuer_ca, c.not_after, c.renewal_notified_at
     FROM certificates c JOIN devices d ON d.id = c.device_id";

pub(super) fn expiring(r: &Row) -> R<ExpiringCertificate> {
    Ok(ExpiringCertificate {
        serial: get(r, 0)?,
        device_id: uuid(r, 1)?,
        device_name: get(r, 2)?,
        group: get(r, 3)?,
        issuer_ca: get(r, 4)?,
        not_after: get(r, 5)?,
        renewal_notified_at: get(r, 6)?,
    })
}

pub(super) const CRL_SELECT: &str = "SELECT issuer_ca, number, this_update, next_update, entries, der, created_at, issuer_key_id FROM crls";

pub(super) fn crl(r: &Row) -> R<CrlRecord> {
    Ok(CrlRecord {
        issuer_ca: get(r, 0)?,
        number: get(r, 1)?,
        this_update: get(r, 2)?,
        next_update: get(r, 3)?,
        entries: get(r, 4)?,
        der: get(r, 5)?,
        created_at: get(r, 6)?,
        issuer_key_id: uuid(r, 7)?,
    })
}

pub(super) const SERVICE_CERT_SELECT: &str = "SELECT serial, purpose, issuer_ca, key_id, not_after, retired_at, created_at FROM service_certificates";

pub(super) fn service_certificate(r: &Row) -> R<ServiceCertificateRecord> {
    Ok(ServiceCertificateRecord {
        serial: get(r, 0)?,
        purpose: parsed(r, 1, "key purpose", KeyPurpose::parse)?,
        issuer_ca: get(r, 2)?,
        key_id: uuid(r, 3)?,
        not_after: get(r, 4)?,
        retired_at: get(r, 5)?,
        created_at: get(r, 6)?,
    })
}

pub(super) fn revoked_entry(r: &Row) -> R<RevokedEntry> {
    Ok(RevokedEntry {
        serial: get(r, 0)?,
        revoked_at: get(r, 1)?,
        reason: opt_parsed(r, 2, "revocation reason", reason)?
            .unwrap_or(RevocationReason::Unspecified),
    })
}

pub(super) fn audit(r: &Row) -> R<AuditEvent> {
    let details: String = get(r, 6)?;
    Ok(AuditEvent {
        seq: get(r, 0)?,
        at_ms: get(r, 1)?,
        actor: get(r, 2)?,
        action: get(r, 3)?,
        target: get(r, 4)?,
        outcome: parsed(r, 5, "outcome", Outcome::parse)?,
        // An unparsable details column is tampering too: verification will flag the hash.
        details: serde_json::from_str(&details).unwrap_or(serde_json::Value::String(details)),
        prev_hash: get(r, 7)?,
        hash: get(r, 8)?,
        version: count(r, 9)?,
        source: get(r, 10)?,
        sealed: get(r, 11)?,
    })
}

pub(super) fn checkpoint(r: &Row) -> R<Checkpoint> {
    Ok(Checkpoint {
        seq: get(r, 0)?,
        hash: get(r, 1)?,
        at_ms: get(r, 2)?,
        key_id: uuid(r, 3)?,
        signature: get(r, 4)?,
    })
}

pub(super) fn audit_data_key(r: &Row) -> R<AuditDataKeyRecord> {
    Ok(AuditDataKeyRecord {
        id: uuid(r, 0)?,
        key_id: uuid(r, 1)?,
        wrapped: get(r, 2)?,
        created_at: get(r, 3)?,
    })
}

pub(super) fn renewal_allowance(r: &Row) -> R<RenewalAllowanceRecord> {
    Ok(RenewalAllowanceRecord {
        device_id: uuid(r, 0)?,
        granted_by: uuid(r, 1)?,
        granted_at: get(r, 2)?,
        expires_at: get(r, 3)?,
    })
}

pub(super) const BROKER_OUTBOX_SELECT: &str = "SELECT id, device_id, op, rules, created_at, attempts, next_attempt_at, last_error FROM broker_outbox";

pub(super) fn broker_outbox(r: &Row) -> R<BrokerOutboxRecord> {
    let op: String = get(r, 2)?;
    let rules: Option<String> = get(r, 3)?;
    let op = match (op.as_str(), rules) {
        ("grant", Some(json)) => {
            BrokerOp::Grant(serde_json::from_str(&json).map_err(|_| bad(3, "broker rules", &json))?)
        }
        ("revoke", None) => BrokerOp::Revoke,
        (other, _) => return Err(bad(2, "broker op", other)),
    };
    Ok(BrokerOutboxRecord {
        id: get(r, 0)?,
        device_id: uuid(r, 1)?,
        op,
        created_at: get(r, 4)?,
        attempts: count(r, 5)?,
        next_attempt_at: get(r, 6)?,
        last_error: get(r, 7)?,
    })
}

pub(super) const ROTATION_SELECT: &str = "SELECT id, purpose, target, step, old_key_id, new_key_id, new_serial, reason, actor, destroy_after, attempts, last_error, next_attempt_at, created_at, updated_at, finished_at FROM rotations";

pub(super) fn rotation(r: &Row) -> R<RotationRecord> {
    Ok(RotationRecord {
        id: uuid(r, 0)?,
        purpose: parsed(r, 1, "key purpose", KeyPurpose::parse)?,
        target: get(r, 2)?,
        step: parsed(r, 3, "rotation step", RotationStep::parse)?,
        old_key_id: opt_uuid(r, 4)?,
        new_key_id: opt_uuid(r, 5)?,
        new_serial: get(r, 6)?,
        reason: get(r, 7)?,
        actor: get(r, 8)?,
        destroy_after: get(r, 9)?,
        attempts: get(r, 10)?,
        last_error: get(r, 11)?,
        next_attempt_at: get(r, 12)?,
        created_at: get(r, 13)?,
        updated_at: get(r, 14)?,
        finished_at: get(r, 15)?,
    })
}

pub(super) const BACKUP_SELECT: &str = "SELECT id, file_name, created_at, sha256, size_bytes, format_version, schema_version, trigger, actor, summary, pruned_at FROM backups";

pub(super) fn backup(r: &Row) -> R<BackupRecord> {
    let summary: String = get(r, 9)?;
    Ok(BackupRecord {
        id: uuid(r, 0)?,
        file_name: get(r, 1)?,
        created_at: get(r, 2)?,
        sha256: get(r, 3)?,
        size_bytes: get(r, 4)?,
        format_version: get(r, 5)?,
        schema_version: get(r, 6)?,
        trigger: parsed(r, 7, "backup trigger", BackupTrigger::parse)?,
        actor: get(r, 8)?,
        summary: serde_json::from_str(&summary)
            .map_err(|e| bad(9, "backup summary", &e.to_string()))?,
        pruned_at: get(r, 10)?,
        replicas: Vec::new(),
    })
}

pub(super) const REPLICA_SELECT: &str = "SELECT backup_id, location, state, attempts, last_error, next_attempt_at, stored_at, verified_at, verify_error, updated_at FROM backup_replicas";

pub(super) fn replica(r: &Row) -> R<ReplicaRecord> {
    Ok(ReplicaRecord {
        backup_id: uuid(r, 0)?,
        location: get(r, 1)?,
        state: parsed(r, 2, "replica state", ReplicaState::parse)?,
        attempts: get(r, 3)?,
        last_error: get(r, 4)?,
        next_attempt_at: get(r, 5)?,
        stored_at: get(r, 6)?,
        verified_at: get(r, 7)?,
        verify_error: get(r, 8)?,
        updated_at: get(r, 9)?,
    })
}
