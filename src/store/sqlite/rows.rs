//! Row ↔ record mapping for the SQLite backend.

use super::db;
use crate::audit::{AuditEvent, Checkpoint, Outcome};
use crate::model::CaKind;
use crate::model::{KeyAlgorithm, KeyHandle};
use crate::store::records::*;
use crate::store::{DatabaseError, StoreError};
use rusqlite::{Connection, OptionalExtension, Params, Row};
use uuid::Uuid;

type R<T> = rusqlite::Result<T>;

fn bad(idx: usize, what: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        idx,
        rusqlite::types::Type::Text,
        format!("invalid {what} `{value}`").into(),
    )
}

fn uuid(r: &Row<'_>, idx: usize) -> R<Uuid> {
    let s: String = r.get(idx)?;
    Uuid::parse_str(&s).map_err(|_| bad(idx, "uuid", &s))
}

fn opt_uuid(r: &Row<'_>, idx: usize) -> R<Option<Uuid>> {
    let s: Option<String> = r.get(idx)?;
    s.map(|s| Uuid::parse_str(&s).map_err(|_| bad(idx, "uuid", &s)))
        .transpose()
}

fn parsed<T>(r: &Row<'_>, idx: usize, what: &str, f: impl Fn(&str) -> Option<T>) -> R<T> {
    let s: String = r.get(idx)?;
    f(&s).ok_or_else(|| bad(idx, what, &s))
}

fn opt_parsed<T>(
    r: &Row<'_>,
    idx: usize,
    what: &str,
    f: impl Fn(&str) -> Option<T>,
) -> R<Option<T>> {
    let s: Option<String> = r.get(idx)?;
    s.map(|s| f(&s).ok_or_else(|| bad(idx, what, &s)))
        .transpose()
}

/// Stored reasons are the stable names only.
fn reason(s: &str) -> Option<RevocationReason> {
    RevocationReason::ALL.into_iter().find(|r| r.as_str() == s)
}

fn algorithm(r: &Row<'_>, idx: usize) -> R<KeyAlgorithm> {
    parsed(r, idx, "algorithm", |s| s.parse().ok())
}

pub(super) fn ca_kind_str(k: CaKind) -> &'static str {
    match k {
        CaKind::Root => "root",
        CaKind::Issuing => "issuing",
    }
}

pub(super) fn one<T, P: Params>(
    c: &Connection,
    sql: &str,
    p: P,
    f: fn(&Row<'_>) -> R<T>,
) -> Result<Option<T>, StoreError> {
    let mut stmt = c.prepare_cached(sql).map_err(db)?;
    stmt.query_row(p, f).optional().map_err(corrupt)
}

pub(super) fn many<T, P: Params>(
    c: &Connection,
    sql: &str,
    p: P,
    f: fn(&Row<'_>) -> R<T>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = c.prepare_cached(sql).map_err(db)?;
    let rows = stmt.query_map(p, f).map_err(db)?;
    rows.collect::<R<Vec<T>>>().map_err(corrupt)
}

fn corrupt(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::FromSqlConversionFailure(..) => DatabaseError::InvalidRow(e).into(),
        other => db(other),
    }
}

pub(super) const KEY_SELECT: &str = "SELECT id, label, purpose, algorithm, backend, handle, public_key, state, ca_name, created_at, updated_at, keystore FROM keys";

pub(super) fn key(r: &Row<'_>) -> R<KeyRecord> {
    Ok(KeyRecord {
        id: uuid(r, 0)?,
        label: r.get(1)?,
        purpose: parsed(r, 2, "key purpose", KeyPurpose::parse)?,
        algorithm: algorithm(r, 3)?,
        backend: r.get(4)?,
        handle: KeyHandle(r.get(5)?),
        public_key_der: r.get(6)?,
        state: parsed(r, 7, "key state", KeyState::parse)?,
        ca_name: r.get(8)?,
        created_at: r.get(9)?,
        updated_at: r.get(10)?,
        keystore: r.get(11)?,
    })
}

pub(super) const CA_SELECT: &str =
    "SELECT name, kind, parent, key_id, certificate, created_at FROM cas";

pub(super) fn ca(r: &Row<'_>) -> R<CaRecord> {
    Ok(CaRecord {
        name: r.get(0)?,
        kind: parsed(r, 1, "CA kind", |s| match s {
            "root" => Some(CaKind::Root),
            "issuing" => Some(CaKind::Issuing),
            _ => None,
        })?,
        parent: r.get(2)?,
        key_id: uuid(r, 3)?,
        certificate_der: r.get(4)?,
        created_at: r.get(5)?,
    })
}

pub(super) const ADMIN_SELECT: &str =
    "SELECT id, name, role, token_hash, disabled, created_at, disabled_at FROM admins";

pub(super) fn admin(r: &Row<'_>) -> R<AdminRecord> {
    Ok(AdminRecord {
        id: uuid(r, 0)?,
        name: r.get(1)?,
        role: parsed(r, 2, "role", |s| s.parse().ok())?,
        token_hash: r.get(3)?,
        disabled: r.get(4)?,
        created_at: r.get(5)?,
        disabled_at: r.get(6)?,
    })
}

pub(super) const REGISTRATION_SELECT: &str = "SELECT id, device_id, group_name, status, name, device_type, location, firmware, csr,
    key_algorithm, secret_hash, submitted_by, submitted_at, expires_at, decided_at, certificate_serial, credentials_fetched_at,
    credentials_confirmed_at, client_addr, attestation, attested_identity, attestation_details, enrollment_token_id,
    token_minted_by, reenrollment, key_source, age_recipient, server_key_id, key_delivered_at FROM registrations";

pub(super) fn registration(r: &Row<'_>) -> R<RegistrationRecord> {
    Ok(RegistrationRecord {
        id: uuid(r, 0)?,
        device_id: uuid(r, 1)?,
        group: r.get(2)?,
        status: parsed(r, 3, "registration status", RegistrationStatus::parse)?,
        name: r.get(4)?,
        device_type: r.get(5)?,
        location: r.get(6)?,
        firmware: r.get(7)?,
        csr_der: r.get(8)?,
        key_algorithm: algorithm(r, 9)?,
        secret_hash: r.get(10)?,
        submitted_by: opt_uuid(r, 11)?,
        submitted_at: r.get(12)?,
        expires_at: r.get(13)?,
        decided_at: r.get(14)?,
        certificate_serial: r.get(15)?,
        credentials_fetched_at: r.get(16)?,
        credentials_confirmed_at: r.get(17)?,
        client_addr: r.get(18)?,
        attestation: parsed(r, 19, "attestation method", AttestationMethod::parse)?,
        attested_identity: r.get(20)?,
        attestation_details: json_opt(r, 21)?,
        enrollment_token_id: opt_uuid(r, 22)?,
        token_minted_by: opt_uuid(r, 23)?,
        reenrollment: r.get(24)?,
        key_source: parsed(r, 25, "key source", KeySource::parse)?,
        age_recipient: r.get(26)?,
        server_key_id: opt_uuid(r, 27)?,
        key_delivered_at: r.get(28)?,
    })
}

fn json_opt(r: &Row<'_>, i: usize) -> R<Option<serde_json::Value>> {
    let text: Option<String> = r.get(i)?;
    match text {
        None => Ok(None),
        Some(t) => serde_json::from_str(&t).map(Some).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
        }),
    }
}

pub(super) const ENROLLMENT_TOKEN_SELECT: &str = "SELECT id, kind, token_hash, group_name, device_id, device_name,
    uses_allowed, uses, created_by, created_at, expires_at, revoked_at, revoked_by, last_used_at FROM enrollment_tokens";

pub(super) fn enrollment_token(r: &Row<'_>) -> R<EnrollmentTokenRecord> {
    Ok(EnrollmentTokenRecord {
        id: uuid(r, 0)?,
        kind: parsed(r, 1, "enrollment token kind", EnrollmentTokenKind::parse)?,
        token_hash: r.get(2)?,
        group: r.get(3)?,
        device_id: opt_uuid(r, 4)?,
        device_name: r.get(5)?,
        uses_allowed: r.get(6)?,
        uses: r.get(7)?,
        created_by: uuid(r, 8)?,
        created_at: r.get(9)?,
        expires_at: r.get(10)?,
        revoked_at: r.get(11)?,
        revoked_by: opt_uuid(r, 12)?,
        last_used_at: r.get(13)?,
    })
}

pub(super) fn approval(r: &Row<'_>) -> R<ApprovalRecord> {
    Ok(ApprovalRecord {
        registration_id: uuid(r, 0)?,
        admin_id: uuid(r, 1)?,
        decision: parsed(r, 2, "decision", Decision::parse)?,
        comment: r.get(3)?,
        decided_at: r.get(4)?,
        counted: r.get(5)?,
        admin_role: parsed(r, 6, "role", |s| s.parse().ok())?,
    })
}

pub(super) const ADMIN_REQUEST_SELECT: &str = "SELECT id, kind, name, admin_id, role, requested_by, status, decided_by,
    requester_secret_hash, approver_secret_hash, client_addr, created_at, expires_at, decided_at, redeemed_at
    FROM admin_requests";

pub(super) fn admin_request(r: &Row<'_>) -> R<AdminRequestRecord> {
    Ok(AdminRequestRecord {
        id: uuid(r, 0)?,
        kind: parsed(r, 1, "admin request kind", AdminRequestKind::parse)?,
        name: r.get(2)?,
        admin_id: opt_uuid(r, 3)?,
        role: parsed(r, 4, "role", |s| s.parse().ok())?,
        requested_by: uuid(r, 5)?,
        status: parsed(r, 6, "admin request status", AdminRequestStatus::parse)?,
        decided_by: opt_uuid(r, 7)?,
        requester_secret_hash: r.get(8)?,
        approver_secret_hash: r.get(9)?,
        client_addr: r.get(10)?,
        created_at: r.get(11)?,
        expires_at: r.get(12)?,
        decided_at: r.get(13)?,
        redeemed_at: r.get(14)?,
    })
}

pub(super) const DEVICE_SELECT: &str = "SELECT id, name, device_type, location, firmware, group_name, status, created_at, updated_at FROM devices";

pub(super) fn device(r: &Row<'_>) -> R<DeviceRecord> {
    Ok(DeviceRecord {
        id: uuid(r, 0)?,
        name: r.get(1)?,
        device_type: r.get(2)?,
        location: r.get(3)?,
        firmware: r.get(4)?,
        group: r.get(5)?,
        status: parsed(r, 6, "device status", DeviceStatus::parse)?,
        created_at: r.get(7)?,
        updated_at: r.get(8)?,
    })
}

pub(super) const CERT_SELECT: &str =
    "SELECT serial, device_id, issuer_ca, issuer_key_id, subject, not_before, not_after,
    fingerprint, der, status, revoked_at, revocation_reason, created_at, superseded_by, spki_sha256 FROM certificates";

pub(super) fn certificate(r: &Row<'_>) -> R<CertificateRecord> {
    Ok(CertificateRecord {
        serial: r.get(0)?,
        device_id: opt_uuid(r, 1)?,
        issuer_ca: r.get(2)?,
        issuer_key_id: uuid(r, 3)?,
        subject: r.get(4)?,
        not_before: r.get(5)?,
        not_after: r.get(6)?,
        fingerprint_sha256: r.get(7)?,
        der: r.get(8)?,
        status: parsed(r, 9, "certificate status", CertificateStatus::parse)?,
        revoked_at: r.get(10)?,
        revocation_reason: opt_parsed(r, 11, "revocation reason", reason)?,
        created_at: r.get(12)?,
        superseded_by: r.get(13)?,
        spki_sha256: r.get(14)?,
    })
}

pub(super) const EXPIRING_SELECT: &str =
    "SELECT c.serial, c.device_id, d.name, d.group_name, c.issuer_ca, c.not_after, c.renewal_notified_at
     FROM certificates c JOIN devices d ON d.id = c.device_id";

pub(super) fn expiring(r: &Row<'_>) -> R<ExpiringCertificate> {
    Ok(ExpiringCertificate {
        serial: r.get(0)?,
        device_id: uuid(r, 1)?,
        device_name: r.get(2)?,
        group: r.get(3)?,
        issuer_ca: r.get(4)?,
        not_after: r.get(5)?,
        renewal_notified_at: r.get(6)?,
    })
}

pub(super) const CRL_SELECT: &str = "SELECT issuer_ca, number, this_update, next_update, entries, der, created_at, issuer_key_id FROM crls";

pub(super) fn crl(r: &Row<'_>) -> R<CrlRecord> {
    Ok(CrlRecord {
        issuer_ca: r.get(0)?,
        number: r.get(1)?,
        this_update: r.get(2)?,
        next_update: r.get(3)?,
        entries: r.get(4)?,
        der: r.get(5)?,
        created_at: r.get(6)?,
        issuer_key_id: uuid(r, 7)?,
    })
}

pub(super) const SERVICE_CERT_SELECT: &str = "SELECT serial, purpose, issuer_ca, key_id, not_after, retired_at, created_at FROM service_certificates";

pub(super) fn service_certificate(r: &Row<'_>) -> R<ServiceCertificateRecord> {
    Ok(ServiceCertificateRecord {
        serial: r.get(0)?,
        purpose: parsed(r, 1, "key purpose", KeyPurpose::parse)?,
        issuer_ca: r.get(2)?,
        key_id: uuid(r, 3)?,
        not_after: r.get(4)?,
        retired_at: r.get(5)?,
        created_at: r.get(6)?,
    })
}

pub(super) fn revoked_entry(r: &Row<'_>) -> R<RevokedEntry> {
    Ok(RevokedEntry {
        serial: r.get(0)?,
        revoked_at: r.get(1)?,
        reason: opt_parsed(r, 2, "revocation reason", reason)?
            .unwrap_or(RevocationReason::Unspecified),
    })
}

pub(super) fn audit(r: &Row<'_>) -> R<AuditEvent> {
    let details: String = r.get(6)?;
    Ok(AuditEvent {
        seq: r.get(0)?,
        at_ms: r.get(1)?,
        actor: r.get(2)?,
        action: r.get(3)?,
        target: r.get(4)?,
        outcome: parsed(r, 5, "outcome", Outcome::parse)?,
        // An unparsable details column is tampering too: verification will flag the hash.
        details: serde_json::from_str(&details).unwrap_or(serde_json::Value::String(details)),
        prev_hash: r.get(7)?,
        hash: r.get(8)?,
        version: r.get(9)?,
        source: r.get(10)?,
        sealed: r.get(11)?,
    })
}

pub(super) fn checkpoint(r: &Row<'_>) -> R<Checkpoint> {
    Ok(Checkpoint {
        seq: r.get(0)?,
        hash: r.get(1)?,
        at_ms: r.get(2)?,
        key_id: uuid(r, 3)?,
        signature: r.get(4)?,
    })
}

pub(super) fn audit_data_key(r: &Row<'_>) -> R<AuditDataKeyRecord> {
    Ok(AuditDataKeyRecord {
        id: uuid(r, 0)?,
        key_id: uuid(r, 1)?,
        wrapped: r.get(2)?,
        created_at: r.get(3)?,
    })
}

pub(super) fn renewal_allowance(r: &Row<'_>) -> R<RenewalAllowanceRecord> {
    Ok(RenewalAllowanceRecord {
        device_id: uuid(r, 0)?,
        granted_by: uuid(r, 1)?,
        granted_at: r.get(2)?,
        expires_at: r.get(3)?,
    })
}

pub(super) const BROKER_OUTBOX_SELECT: &str = "SELECT id, device_id, op, rules, created_at, attempts, next_attempt_at, last_error FROM broker_outbox";

pub(super) fn broker_outbox(r: &Row<'_>) -> R<BrokerOutboxRecord> {
    let op: String = r.get(2)?;
    let rules: Option<String> = r.get(3)?;
    let op = match (op.as_str(), rules) {
        ("grant", Some(json)) => {
            BrokerOp::Grant(serde_json::from_str(&json).map_err(|_| bad(3, "broker rules", &json))?)
        }
        ("revoke", None) => BrokerOp::Revoke,
        (other, _) => return Err(bad(2, "broker op", other)),
    };
    Ok(BrokerOutboxRecord {
        id: r.get(0)?,
        device_id: uuid(r, 1)?,
        op,
        created_at: r.get(4)?,
        attempts: r.get(5)?,
        next_attempt_at: r.get(6)?,
        last_error: r.get(7)?,
    })
}

pub(super) const ROTATION_SELECT: &str = "SELECT id, purpose, target, step, old_key_id, new_key_id, new_serial, reason, actor, destroy_after, attempts, last_error, next_attempt_at, created_at, updated_at, finished_at FROM rotations";

pub(super) fn rotation(r: &Row<'_>) -> R<RotationRecord> {
    Ok(RotationRecord {
        id: uuid(r, 0)?,
        purpose: parsed(r, 1, "key purpose", KeyPurpose::parse)?,
        target: r.get(2)?,
        step: parsed(r, 3, "rotation step", RotationStep::parse)?,
        old_key_id: opt_uuid(r, 4)?,
        new_key_id: opt_uuid(r, 5)?,
        new_serial: r.get(6)?,
        reason: r.get(7)?,
        actor: r.get(8)?,
        destroy_after: r.get(9)?,
        attempts: r.get(10)?,
        last_error: r.get(11)?,
        next_attempt_at: r.get(12)?,
        created_at: r.get(13)?,
        updated_at: r.get(14)?,
        finished_at: r.get(15)?,
    })
}

pub(super) const BACKUP_SELECT: &str = "SELECT id, file_name, created_at, sha256, size_bytes, format_version, schema_version, trigger, actor, summary, pruned_at FROM backups";

pub(super) fn backup(r: &Row<'_>) -> R<BackupRecord> {
    let summary: String = r.get(9)?;
    Ok(BackupRecord {
        id: uuid(r, 0)?,
        file_name: r.get(1)?,
        created_at: r.get(2)?,
        sha256: r.get(3)?,
        size_bytes: r.get(4)?,
        format_version: r.get(5)?,
        schema_version: r.get(6)?,
        trigger: parsed(r, 7, "backup trigger", BackupTrigger::parse)?,
        actor: r.get(8)?,
        summary: serde_json::from_str(&summary).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(9, rusqlite::types::Type::Text, Box::new(e))
        })?,
        pruned_at: r.get(10)?,
        replicas: Vec::new(),
    })
}

pub(super) const REPLICA_SELECT: &str = "SELECT backup_id, location, state, attempts, last_error, next_attempt_at, stored_at, verified_at, verify_error, updated_at FROM backup_replicas";

pub(super) fn replica(r: &Row<'_>) -> R<ReplicaRecord> {
    Ok(ReplicaRecord {
        backup_id: uuid(r, 0)?,
        location: r.get(1)?,
        state: parsed(r, 2, "replica state", ReplicaState::parse)?,
        attempts: r.get(3)?,
        last_error: r.get(4)?,
        next_attempt_at: r.get(5)?,
        stored_at: r.get(6)?,
        verified_at: r.get(7)?,
        verify_error: r.get(8)?,
        updated_at: r.get(9)?,
    })
}
