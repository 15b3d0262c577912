//! Applies one domain [`Write`] inside the writer's transaction, with the
//! conditions (`from` states, guards, caps) checked in that same transaction.

use super::{db, rows};
use crate::store::records::*;
use crate::store::{Conflict, StoreError, Write};
use rusqlite::{OptionalExtension, Transaction, params};
use uuid::Uuid;

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
fn insert_admin(tx: &Transaction<'_>, a: &AdminRecord) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO admins (id, name, role, token_hash, disabled, created_at, disabled_at, ever_admin) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .map_err(db)?
    .execute(params![a.id.to_string(), a.name, a.role.as_str(), a.token_hash, a.disabled, a.created_at, a.disabled_at, a.role == Role::Admin])
    .map_err(|e| match db(e) {
        StoreError::Conflict(_) => StoreError::Conflict(Conflict::Duplicate { entity: "admin" }),
        other => other,
    })?;
    Ok(())
}

/// SQL rank of a role column, to compare with [`role_rank`].
const ROLE_RANK: &str = "CASE role WHEN 'admin' THEN 2 WHEN 'approver' THEN 1 ELSE 0 END";

fn role_rank(r: Role) -> i64 {
    match r {
        Role::Auditor => 0,
        Role::Approver => 1,
        Role::Admin => 2,
    }
}

/// Whether `id` is an active admin holding at least `min`.
fn active_with_role(tx: &Transaction<'_>, id: &Uuid, min: Role) -> Result<bool, StoreError> {
    let ok: Option<bool> = tx
        .prepare_cached(&format!(
            "SELECT disabled = 0 AND {ROLE_RANK} >= ?2 FROM admins WHERE id = ?1"
        ))
        .map_err(db)?
        .query_row(params![id.to_string(), role_rank(min)], |r| r.get(0))
        .optional()
        .map_err(db)?;
    Ok(ok == Some(true))
}

/// Accounts that have ever held role `admin`, counted inside the transaction.
fn ever_admins(tx: &Transaction<'_>) -> Result<i64, StoreError> {
    tx.prepare_cached("SELECT COUNT(*) FROM admins WHERE ever_admin = 1")
        .map_err(db)?
        .query_row([], |r| r.get(0))
        .map_err(db)
}

/// Active admins of role `admin`, counted inside the transaction.
fn active_admins(tx: &Transaction<'_>) -> Result<i64, StoreError> {
    tx.prepare_cached("SELECT COUNT(*) FROM admins WHERE role = 'admin' AND disabled = 0")
        .map_err(db)?
        .query_row([], |r| r.get(0))
        .map_err(db)
}

pub(super) fn apply_write(tx: &Transaction<'_>, w: &Write) -> Result<(), StoreError> {
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
            state,
            at,
        } => {
            let n = tx
                .prepare_cached(
                    "UPDATE keys SET state = ?4, public_key = ?1, updated_at = ?2 WHERE id = ?3 AND state = 'generating'",
                )
                .map_err(db)?
                .execute(params![public_key_der, at, id.to_string(), state.as_str()])
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
        Write::SetKeyHandle { id, handle, at } => {
            let n = tx
                .prepare_cached("UPDATE keys SET handle = ?1, updated_at = ?2 WHERE id = ?3")
                .map_err(db)?
                .execute(params![handle.0, at, id.to_string()])
                .map_err(db)?;
            expect_one(n, || Conflict::Missing {
                entity: "key",
                id: id.to_string(),
            })?;
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
                   credentials_fetched_at, credentials_confirmed_at, client_addr, attestation, attested_identity,
                   attestation_details, enrollment_token_id, token_minted_by, reenrollment, key_source, age_recipient,
                   server_key_id, key_delivered_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
                   ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29)",
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
                r.client_addr,
                r.attestation.as_str(),
                r.attested_identity,
                r.attestation_details.as_ref().map(|v| v.to_string()),
                r.enrollment_token_id.map(|u| u.to_string()),
                r.token_minted_by.map(|u| u.to_string()),
                r.reenrollment,
                r.key_source.as_str(),
                r.age_recipient,
                r.server_key_id.map(|u| u.to_string()),
                r.key_delivered_at
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
            tx.prepare_cached(
                "UPDATE admin_requests SET status = 'expired', decided_at = COALESCE(decided_at, ?2)
                 WHERE status IN ('pending', 'approved') AND (requested_by = ?1 OR decided_by = ?1)",
            )
            .map_err(db)?
            .execute(params![id.to_string(), at])
            .map_err(db)?;
        }
        Write::SetAdminRole {
            id,
            from,
            to,
            without_second_admin,
        } => {
            if *without_second_admin && *to > *from && ever_admins(tx)? >= 2 {
                return Err(Conflict::SecondAdminRequired.into());
            }
            let n = tx
                .prepare_cached(
                    "UPDATE admins SET role = ?1, ever_admin = MAX(ever_admin, ?1 = 'admin')
                     WHERE id = ?2 AND role = ?3 AND disabled = 0",
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
                     WHERE id = ?2 AND status = 'issued' AND credentials_confirmed_at IS NULL",
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
            min_role,
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
            if !active_with_role(tx, &a.admin_id, *min_role)? {
                return Err(state_changed("admin", &a.admin_id, "active").into());
            }
            let (decided, counted): (i64, i64) = tx
                .prepare_cached(&format!(
                    "SELECT COALESCE(SUM(ap.admin_id = ?2), 0),
                            COALESCE(SUM(ap.decision = 'approve' AND ad.disabled = 0 AND {} >= ?3), 0)
                     FROM approvals ap JOIN admins ad ON ad.id = ap.admin_id
                     WHERE ap.registration_id = ?1",
                    ROLE_RANK.replace("role", "ad.role")
                ))
                .map_err(db)?
                .query_row(
                    params![rid, a.admin_id.to_string(), role_rank(*min_role)],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
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
            if !active_with_role(tx, decided_by, Role::Admin)? {
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
            // Whoever asked (and approved) must still be an active admin, and
            // an invitation without a second approver is only good while no
            // second account has ever held role `admin`.
            let unapproved: Option<bool> = tx
                .prepare_cached(
                    "SELECT decided_by IS NULL FROM admin_requests r
                     WHERE id = ?1 AND EXISTS (
                       SELECT 1 FROM admins a WHERE a.id = r.requested_by AND a.disabled = 0 AND a.role = 'admin')
                     AND (decided_by IS NULL OR EXISTS (
                       SELECT 1 FROM admins a WHERE a.id = r.decided_by AND a.disabled = 0 AND a.role = 'admin'))",
                )
                .map_err(db)?
                .query_row(params![id.to_string()], |r| r.get(0))
                .optional()
                .map_err(db)?;
            match unapproved {
                None => {
                    return Err(state_changed("invitation", id, "backed by active admins").into());
                }
                Some(true) => {
                    if ever_admins(tx)? >= 2 {
                        return Err(Conflict::SecondAdminRequired.into());
                    }
                }
                Some(false) => {}
            }
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
                   fingerprint, der, status, revoked_at, revocation_reason, created_at, superseded_by, spki_sha256)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
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
                c.revocation_reason.map(|r| r.as_str()),
                c.created_at,
                c.superseded_by,
                c.spki_sha256
            ])
            .map_err(|e| match db(e) {
                StoreError::Conflict(_) => StoreError::Conflict(Conflict::Duplicate {
                    entity: "certificate",
                }),
                other => other,
            })?;
        }
        Write::RefuseRevokedKey { spki_sha256 } => {
            let barred: bool = tx
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM certificates c LEFT JOIN devices d ON d.id = c.device_id
                     WHERE c.spki_sha256 = ?1
                       AND ((c.status = 'revoked' AND c.revocation_reason IS NOT 'certificate-hold')
                            OR d.status IN ('suspended', 'revoked')))",
                )
                .map_err(db)?
                .query_row(params![spki_sha256], |r| r.get(0))
                .map_err(db)?;
            if barred {
                return Err(Conflict::KeyRevoked.into());
            }
        }
        Write::SupersedeCertificate { serial, by, at } => {
            let _ = at;
            let n = tx
                .prepare_cached(
                    "UPDATE certificates SET status = 'superseded', superseded_by = ?1
                     WHERE serial = ?2 AND status = 'valid'",
                )
                .map_err(db)?
                .execute(params![by, serial])
                .map_err(db)?;
            expect_cert(tx, n, serial, "valid")?;
        }
        Write::RevokeCertificate { serial, reason, at } => {
            // A hold may become a permanent revocation (RFC 5280 §5.3.1);
            // the original revocation time is kept then.
            let n = tx
                .prepare_cached(
                    "UPDATE certificates
                     SET status = 'revoked', revocation_reason = ?1,
                         revoked_at = CASE WHEN status = 'revoked' THEN revoked_at ELSE ?2 END
                     WHERE serial = ?3 AND (status IN ('valid', 'superseded')
                       OR (status = 'revoked' AND revocation_reason = 'certificate-hold' AND ?1 <> 'certificate-hold'))",
                )
                .map_err(db)?
                .execute(params![reason.as_str(), at, serial])
                .map_err(db)?;
            expect_cert(tx, n, serial, "valid, superseded or on hold")?;
        }
        Write::ReleaseCertificateHold { serial, at } => {
            let _ = at;
            let n = tx
                .prepare_cached(
                    "UPDATE certificates
                     SET status = CASE WHEN superseded_by IS NULL THEN 'valid' ELSE 'superseded' END,
                         revocation_reason = NULL, revoked_at = NULL
                     WHERE serial = ?1 AND status = 'revoked' AND revocation_reason = 'certificate-hold'
                       AND NOT EXISTS (SELECT 1 FROM devices d
                                       WHERE d.id = certificates.device_id AND d.status <> 'active')",
                )
                .map_err(db)?
                .execute(params![serial])
                .map_err(db)?;
            expect_cert(tx, n, serial, "on hold, of an active device")?;
        }
        Write::SetDeviceStatus {
            id,
            from,
            to,
            reason,
            at,
        } => set_device_status(tx, id, *from, *to, *reason, *at)?,
        Write::PublishCrl { record, keep } => {
            let highest: i64 = tx
                .prepare_cached("SELECT COALESCE(MAX(number), 0) FROM crls WHERE issuer_ca = ?1")
                .map_err(db)?
                .query_row(params![record.issuer_ca], |r| r.get(0))
                .map_err(db)?;
            if record.number != highest + 1 {
                return Err(Conflict::StateChanged {
                    entity: "CRL number of",
                    id: record.issuer_ca.clone(),
                    expected: "one below the new CRL's number",
                }
                .into());
            }
            tx.prepare_cached(
                "INSERT INTO crls (issuer_ca, number, this_update, next_update, entries, der, created_at, issuer_key_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .map_err(db)?
            .execute(params![
                record.issuer_ca,
                record.number,
                record.this_update,
                record.next_update,
                record.entries,
                record.der,
                record.created_at,
                record.issuer_key_id.to_string()
            ])
            .map_err(db)?;
            // `keep` CRLs per signing key: the CRLs of a retired key (numbered
            // in the CA's one sequence) are not pushed out by its successor's.
            tx.prepare_cached(
                "DELETE FROM crls WHERE issuer_ca = ?1 AND issuer_key_id = ?2 AND number NOT IN
                   (SELECT number FROM crls WHERE issuer_ca = ?1 AND issuer_key_id = ?2 ORDER BY number DESC LIMIT ?3)",
            )
            .map_err(db)?
            .execute(params![
                record.issuer_ca,
                record.issuer_key_id.to_string(),
                i64::from((*keep).max(1))
            ])
            .map_err(db)?;
        }
        Write::InsertServiceCertificate(c) => {
            tx.prepare_cached(
                "INSERT INTO service_certificates (serial, purpose, issuer_ca, key_id, not_after, retired_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(db)?
            .execute(params![
                c.serial,
                c.purpose.as_str(),
                c.issuer_ca,
                c.key_id.to_string(),
                c.not_after,
                c.retired_at,
                c.created_at
            ])
            .map_err(|e| match db(e) {
                StoreError::Conflict(_) => StoreError::Conflict(Conflict::Duplicate {
                    entity: "service certificate",
                }),
                other => other,
            })?;
        }
        Write::AllowRenewal(a) => {
            require_active_device(tx, &a.device_id)?;
            let device = a.device_id.to_string();
            tx.prepare_cached(
                "INSERT OR REPLACE INTO renewal_allowances (device_id, granted_by, granted_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .map_err(db)?
            .execute(params![
                device,
                a.granted_by.to_string(),
                a.granted_at,
                a.expires_at
            ])
            .map_err(db)?;
        }
        Write::ConsumeRenewalAllowance { device_id, at } => {
            let n = tx
                .prepare_cached(
                    "DELETE FROM renewal_allowances WHERE device_id = ?1 AND expires_at > ?2",
                )
                .map_err(db)?
                .execute(params![device_id.to_string(), at])
                .map_err(db)?;
            expect_one(n, || {
                state_changed("renewal allowance of device", device_id, "open")
            })?;
        }
        Write::RetireServiceCertificate { serial, at } => {
            let n = tx
                .prepare_cached(
                    "UPDATE service_certificates SET retired_at = ?1 WHERE serial = ?2 AND retired_at IS NULL",
                )
                .map_err(db)?
                .execute(params![at, serial])
                .map_err(db)?;
            expect_one(n, || Conflict::StateChanged {
                entity: "service certificate",
                id: serial.clone(),
                expected: "in service",
            })?;
        }
        Write::InsertEnrollmentToken(_)
        | Write::RevokeEnrollmentToken { .. }
        | Write::ConsumeEnrollmentToken { .. }
        | Write::ClaimIdentity { .. }
        | Write::RecordJwtId { .. }
        | Write::ReenrollDevice { .. }
        | Write::MarkKeyDelivered { .. }
        | Write::SetServerKey { .. } => enrollment_write(tx, w)?,
        Write::EnqueueBrokerUpdate { device_id, op, at } => {
            let exists: Option<i64> = tx
                .prepare_cached("SELECT 1 FROM devices WHERE id = ?1")
                .map_err(db)?
                .query_row(params![device_id.to_string()], |r| r.get(0))
                .optional()
                .map_err(db)?;
            if exists.is_none() {
                return Err(Conflict::Missing {
                    entity: "device",
                    id: device_id.to_string(),
                }
                .into());
            }
            let rules = match op {
                BrokerOp::Grant(rules) => Some(serde_json::to_string(rules).map_err(|e| {
                    StoreError::Corrupt(format!("cannot encode broker rules: {e}"))
                })?),
                BrokerOp::Revoke => None,
            };
            // The newest op supersedes a pending one: delete, then insert
            // (a new, larger id; a drainer holding the old id completes
            // nothing).
            tx.prepare_cached("DELETE FROM broker_outbox WHERE device_id = ?1")
                .map_err(db)?
                .execute(params![device_id.to_string()])
                .map_err(db)?;
            tx.prepare_cached(
                "INSERT INTO broker_outbox (device_id, op, rules, created_at, attempts, next_attempt_at, last_error)
                 VALUES (?1, ?2, ?3, ?4, 0, ?4, NULL)",
            )
            .map_err(db)?
            .execute(params![device_id.to_string(), op.as_str(), rules, at])
            .map_err(db)?;
        }
        Write::CompleteBrokerUpdate { id } => {
            tx.prepare_cached("DELETE FROM broker_outbox WHERE id = ?1")
                .map_err(db)?
                .execute(params![id])
                .map_err(db)?;
        }
        Write::FailBrokerUpdate {
            id,
            next_attempt_at,
            error,
        } => {
            tx.prepare_cached(
                "UPDATE broker_outbox SET attempts = attempts + 1, next_attempt_at = ?1, last_error = ?2 WHERE id = ?3",
            )
            .map_err(db)?
            .execute(params![next_attempt_at, error, id])
            .map_err(db)?;
        }
        Write::InsertRotation(r) => {
            tx.prepare_cached(
                "INSERT INTO rotations (id, purpose, target, step, old_key_id, new_key_id, new_serial, reason, actor,
                   destroy_after, attempts, last_error, next_attempt_at, created_at, updated_at, finished_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )
            .map_err(db)?
            .execute(params![
                r.id.to_string(),
                r.purpose.as_str(),
                r.target,
                r.step.as_str(),
                r.old_key_id.map(|k| k.to_string()),
                r.new_key_id.map(|k| k.to_string()),
                r.new_serial,
                r.reason,
                r.actor,
                r.destroy_after,
                r.attempts,
                r.last_error,
                r.next_attempt_at,
                r.created_at,
                r.updated_at,
                r.finished_at
            ])
            .map_err(|e| match db(e) {
                StoreError::Conflict(_) => StoreError::Conflict(Conflict::RotationRunning {
                    purpose: r.purpose.as_str().to_string(),
                    target: r.target.clone(),
                }),
                other => other,
            })?;
        }
        Write::MarkRenewalNotified { serials, at } => {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE certificates SET renewal_notified_at = ?1
                     WHERE serial = ?2 AND renewal_notified_at IS NULL",
                )
                .map_err(db)?;
            for serial in serials {
                let n = stmt.execute(params![at, serial]).map_err(db)?;
                if n != 1 {
                    return Err(StoreError::Conflict(Conflict::StateChanged {
                        entity: "certificate",
                        id: serial.clone(),
                        expected: "not yet notified of its renewal",
                    }));
                }
            }
        }
        Write::AdvanceRotation {
            id,
            from,
            to,
            new_key_id,
            new_serial,
            destroy_after,
            at,
        } => {
            let finished = to.finished().then_some(*at);
            let n = tx
                .prepare_cached(
                    "UPDATE rotations SET step = ?1,
                       new_key_id = COALESCE(?2, new_key_id),
                       new_serial = COALESCE(?3, new_serial),
                       destroy_after = COALESCE(?4, destroy_after),
                       attempts = 0, last_error = NULL, next_attempt_at = ?5,
                       updated_at = ?5, finished_at = ?6
                     WHERE id = ?7 AND step = ?8",
                )
                .map_err(db)?
                .execute(params![
                    to.as_str(),
                    new_key_id.map(|k| k.to_string()),
                    new_serial,
                    destroy_after,
                    at,
                    finished,
                    id.to_string(),
                    from.as_str()
                ])
                .map_err(|e| match db(e) {
                    // Moving an abandoned rotation back to running collides
                    // with a newer running one.
                    StoreError::Conflict(_) => StoreError::Conflict(Conflict::StateChanged {
                        entity: "rotation",
                        id: id.to_string(),
                        expected: from.as_str(),
                    }),
                    other => other,
                })?;
            expect_one(n, || state_changed("rotation", id, from.as_str()))?;
        }
        Write::FailRotationAttempt {
            id,
            step,
            error,
            next_attempt_at,
            at,
        } => {
            let n = tx
                .prepare_cached(
                    "UPDATE rotations SET attempts = attempts + 1, last_error = ?1, next_attempt_at = ?2, updated_at = ?3
                     WHERE id = ?4 AND step = ?5",
                )
                .map_err(db)?
                .execute(params![error, next_attempt_at, at, id.to_string(), step.as_str()])
                .map_err(db)?;
            expect_one(n, || state_changed("rotation", id, step.as_str()))?;
        }
        Write::RecordBackup { record, locations } => {
            let summary = serde_json::to_string(&record.summary)
                .map_err(|e| StoreError::Corrupt(format!("backup summary: {e}")))?;
            tx.prepare_cached(
                "INSERT INTO backups (id, file_name, created_at, sha256, size_bytes, format_version, schema_version,
                   trigger, actor, summary, pruned_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, NULL)",
            )
            .map_err(db)?
            .execute(params![
                record.id.to_string(),
                record.file_name,
                record.created_at,
                record.sha256,
                record.size_bytes,
                record.format_version,
                record.schema_version,
                record.trigger.as_str(),
                record.actor,
                summary
            ])
            .map_err(db)?;
            for location in locations {
                tx.prepare_cached(
                    "INSERT INTO backup_replicas (backup_id, location, state, attempts, next_attempt_at, updated_at)
                     VALUES (?1, ?2, 'pending', 0, ?3, ?3)",
                )
                .map_err(db)?
                .execute(params![record.id.to_string(), location, record.created_at])
                .map_err(db)?;
            }
        }
        Write::ReplicaStored {
            backup_id,
            location,
            at,
        } => {
            replica_exists(tx, backup_id, location)?;
            let n = tx
                .prepare_cached(
                    "UPDATE backup_replicas SET state = 'stored', attempts = 0, last_error = NULL, stored_at = ?1, updated_at = ?1
                     WHERE backup_id = ?2 AND location = ?3 AND state != 'pruned'",
                )
                .map_err(db)?
                .execute(params![at, backup_id.to_string(), location])
                .map_err(db)?;
            expect_one(n, || state_changed("backup replica", backup_id, "unpruned"))?;
        }
        Write::ReplicaFailed {
            backup_id,
            location,
            error,
            next_attempt_at,
            at,
        } => {
            replica_exists(tx, backup_id, location)?;
            let n = tx
                .prepare_cached(
                    "UPDATE backup_replicas SET state = 'failed', attempts = attempts + 1, last_error = ?1,
                       next_attempt_at = ?2, updated_at = ?3
                     WHERE backup_id = ?4 AND location = ?5 AND state != 'pruned'",
                )
                .map_err(db)?
                .execute(params![error, next_attempt_at, at, backup_id.to_string(), location])
                .map_err(db)?;
            expect_one(n, || state_changed("backup replica", backup_id, "unpruned"))?;
        }
        Write::ReplicaVerified {
            backup_id,
            location,
            error,
            at,
        } => {
            replica_exists(tx, backup_id, location)?;
            let sql = if error.is_none() {
                "UPDATE backup_replicas SET verified_at = ?1, verify_error = ?2, updated_at = ?1
                 WHERE backup_id = ?3 AND location = ?4"
            } else {
                "UPDATE backup_replicas SET verify_error = ?2, updated_at = ?1
                 WHERE backup_id = ?3 AND location = ?4"
            };
            tx.prepare_cached(sql)
                .map_err(db)?
                .execute(params![at, error, backup_id.to_string(), location])
                .map_err(db)?;
        }
        Write::PruneBackup { id, at } => {
            let n = tx
                .prepare_cached(
                    "UPDATE backups SET pruned_at = ?1 WHERE id = ?2 AND pruned_at IS NULL",
                )
                .map_err(db)?
                .execute(params![at, id.to_string()])
                .map_err(db)?;
            expect_one(n, || state_changed("backup", id, "unpruned"))?;
            tx.prepare_cached(
                "UPDATE backup_replicas SET state = 'pruned', updated_at = ?1 WHERE backup_id = ?2",
            )
            .map_err(db)?
            .execute(params![at, id.to_string()])
            .map_err(db)?;
        }
        Write::InsertAuditDataKey(k) => {
            tx.prepare_cached(
                "INSERT INTO audit_data_keys (id, key_id, wrapped, created_at) VALUES (?1, ?2, ?3, ?4)",
            )
            .map_err(db)?
            .execute(params![
                k.id.to_string(),
                k.key_id.to_string(),
                k.wrapped,
                k.created_at
            ])
            .map_err(|e| match db(e) {
                StoreError::Conflict(_) => StoreError::Conflict(Conflict::Duplicate {
                    entity: "audit data key",
                }),
                other => other,
            })?;
        }
        Write::ActivateCaKey {
            ca,
            from_key,
            to_key,
            certificate_der,
        } => {
            let n = tx
                .prepare_cached(
                    "UPDATE cas SET key_id = ?1, certificate = ?2 WHERE name = ?3 AND key_id = ?4",
                )
                .map_err(db)?
                .execute(params![
                    to_key.to_string(),
                    certificate_der,
                    ca,
                    from_key.to_string()
                ])
                .map_err(db)?;
            expect_one(n, || Conflict::StateChanged {
                entity: "CA",
                id: ca.clone(),
                expected: "on the key the rotation replaces",
            })?;
        }
    }
    Ok(())
}

/// `n == 1`, else `Missing` when there is no such certificate and
/// `StateChanged` when it is not in the `expected` state.
fn expect_cert(
    tx: &Transaction<'_>,
    n: usize,
    serial: &str,
    expected: &'static str,
) -> Result<(), StoreError> {
    if n == 1 {
        return Ok(());
    }
    let exists = tx
        .prepare_cached("SELECT 1 FROM certificates WHERE serial = ?1")
        .map_err(db)?
        .query_row(params![serial], |_| Ok(()))
        .optional()
        .map_err(db)?
        .is_some();
    Err(if exists {
        Conflict::StateChanged {
            entity: "certificate",
            id: serial.to_string(),
            expected,
        }
    } else {
        Conflict::Missing {
            entity: "certificate",
            id: serial.to_string(),
        }
    }
    .into())
}

fn enrollment_write(tx: &Transaction<'_>, w: &Write) -> Result<(), StoreError> {
    match w {
        Write::InsertEnrollmentToken(t) => {
            tx.prepare_cached(
                "INSERT INTO enrollment_tokens (id, kind, token_hash, group_name, device_id, device_name,
                   uses_allowed, uses, created_by, created_at, expires_at, revoked_at, revoked_by, last_used_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )
            .map_err(db)?
            .execute(params![
                t.id.to_string(),
                t.kind.as_str(),
                t.token_hash,
                t.group,
                t.device_id.map(|d| d.to_string()),
                t.device_name,
                t.uses_allowed,
                t.uses,
                t.created_by.to_string(),
                t.created_at,
                t.expires_at,
                t.revoked_at,
                t.revoked_by.map(|d| d.to_string()),
                t.last_used_at
            ])
            .map_err(|e| match db(e) {
                StoreError::Conflict(_) => StoreError::Conflict(Conflict::Duplicate {
                    entity: "enrollment token",
                }),
                other => other,
            })?;
        }
        Write::RevokeEnrollmentToken { id, by, at } => {
            let n = tx
                .prepare_cached(
                    "UPDATE enrollment_tokens SET revoked_at = ?1, revoked_by = ?2
                     WHERE id = ?3 AND revoked_at IS NULL",
                )
                .map_err(db)?
                .execute(params![at, by.to_string(), id.to_string()])
                .map_err(db)?;
            if n != 1 {
                let exists = tx
                    .prepare_cached("SELECT 1 FROM enrollment_tokens WHERE id = ?1")
                    .map_err(db)?
                    .query_row(params![id.to_string()], |_| Ok(()))
                    .optional()
                    .map_err(db)?
                    .is_some();
                return Err(if exists {
                    state_changed("enrollment token", id, "unrevoked")
                } else {
                    Conflict::Missing {
                        entity: "enrollment token",
                        id: id.to_string(),
                    }
                }
                .into());
            }
        }
        Write::ConsumeEnrollmentToken { id, kind, at } => {
            let row: Option<(String, Option<i64>, i64, i64, i64)> = tx
                .prepare_cached(
                    "SELECT kind, revoked_at, expires_at, uses, uses_allowed FROM enrollment_tokens WHERE id = ?1",
                )
                .map_err(db)?
                .query_row(params![id.to_string()], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .optional()
                .map_err(db)?;
            let reason = match row {
                None => Some("unknown"),
                Some((k, _, _, _, _)) if k != kind.as_str() => Some("unknown"),
                Some((_, Some(_), _, _, _)) => Some("revoked"),
                Some((_, _, exp, _, _)) if *at >= exp => Some("expired"),
                Some((_, _, _, uses, allowed)) if uses >= allowed => Some("used up"),
                Some(_) => None,
            };
            if let Some(reason) = reason {
                return Err(Conflict::TokenUnusable { reason }.into());
            }
            tx.prepare_cached(
                "UPDATE enrollment_tokens SET uses = uses + 1, last_used_at = ?1 WHERE id = ?2",
            )
            .map_err(db)?
            .execute(params![at, id.to_string()])
            .map_err(db)?;
        }
        Write::ClaimIdentity {
            identity,
            device_id,
            method,
            at,
        } => {
            let existing: Option<String> = tx
                .prepare_cached("SELECT device_id FROM device_identities WHERE identity = ?1")
                .map_err(db)?
                .query_row(params![identity], |r| r.get(0))
                .optional()
                .map_err(db)?;
            match existing {
                Some(d) if d == device_id.to_string() => {
                    tx.prepare_cached(
                        "UPDATE device_identities SET last_enrolled_at = ?1 WHERE identity = ?2",
                    )
                    .map_err(db)?
                    .execute(params![at, identity])
                    .map_err(db)?;
                }
                Some(_) => {
                    return Err(Conflict::StateChanged {
                        entity: "attested identity",
                        id: identity.clone(),
                        expected: "unbound or bound to this device",
                    }
                    .into());
                }
                None => {
                    tx.prepare_cached(
                        "INSERT INTO device_identities (identity, device_id, method, created_at, last_enrolled_at)
                         VALUES (?1, ?2, ?3, ?4, ?4)",
                    )
                    .map_err(db)?
                    .execute(params![identity, device_id.to_string(), method.as_str(), at])
                    .map_err(db)?;
                }
            }
        }
        Write::RecordJwtId {
            issuer,
            jti,
            expires_at,
            at,
        } => {
            tx.prepare_cached("DELETE FROM jwt_replay WHERE expires_at <= ?1")
                .map_err(db)?
                .execute(params![at])
                .map_err(db)?;
            tx.prepare_cached(
                "INSERT INTO jwt_replay (issuer, jti, expires_at) VALUES (?1, ?2, ?3)",
            )
            .map_err(db)?
            .execute(params![issuer, jti, expires_at])
            .map_err(|e| match db(e) {
                StoreError::Conflict(_) => {
                    StoreError::Conflict(Conflict::Duplicate { entity: "JWT id" })
                }
                other => other,
            })?;
        }
        Write::ReenrollDevice {
            id,
            group,
            name,
            keep_serial,
            at,
        } => {
            require_active_device(tx, id)?;
            let device = id.to_string();
            tx.prepare_cached(
                "UPDATE devices SET group_name = ?1, name = ?2, updated_at = ?3 WHERE id = ?4",
            )
            .map_err(db)?
            .execute(params![group, name, at, device])
            .map_err(db)?;
            tx.prepare_cached(
                "UPDATE certificates SET status = 'revoked', revoked_at = ?1, revocation_reason = 'superseded'
                 WHERE device_id = ?2 AND serial <> ?3 AND not_after > ?1 AND status IN ('valid', 'superseded')",
            )
            .map_err(db)?
            .execute(params![at, device, keep_serial])
            .map_err(db)?;
        }
        Write::MarkKeyDelivered {
            registration_id,
            at,
        } => {
            let n = tx
                .prepare_cached(
                    "UPDATE registrations SET key_delivered_at = ?1
                     WHERE id = ?2 AND key_delivered_at IS NULL AND server_key_id IS NOT NULL",
                )
                .map_err(db)?
                .execute(params![at, registration_id.to_string()])
                .map_err(db)?;
            expect_one(n, || {
                state_changed(
                    "registration",
                    registration_id,
                    "holding an undelivered key",
                )
            })?;
        }
        Write::SetServerKey {
            registration_id,
            key_id,
        } => {
            let n = tx
                .prepare_cached(
                    "UPDATE registrations SET server_key_id = ?1 WHERE id = ?2 AND server_key_id IS NULL",
                )
                .map_err(db)?
                .execute(params![key_id.to_string(), registration_id.to_string()])
                .map_err(db)?;
            expect_one(n, || {
                state_changed("registration", registration_id, "without a server key")
            })?;
        }
        _ => unreachable_write()?,
    }
    Ok(())
}

/// Conflicts with `Missing` without the device and `StateChanged` unless
/// it is `active` (read inside the transaction).
fn require_active_device(tx: &Transaction<'_>, id: &Uuid) -> Result<(), StoreError> {
    let status: Option<String> = tx
        .prepare_cached("SELECT status FROM devices WHERE id = ?1")
        .map_err(db)?
        .query_row(params![id.to_string()], |r| r.get(0))
        .optional()
        .map_err(db)?;
    match status.as_deref() {
        None => Err(Conflict::Missing {
            entity: "device",
            id: id.to_string(),
        }
        .into()),
        Some(s) if s != DeviceStatus::Active.as_str() => {
            Err(state_changed("device", id, "active").into())
        }
        Some(_) => Ok(()),
    }
}

fn unreachable_write() -> Result<(), StoreError> {
    Err(StoreError::Corrupt(
        "write routed to the wrong handler".into(),
    ))
}

/// [`Write::SetDeviceStatus`]: the device, then its unexpired certificates.
fn set_device_status(
    tx: &Transaction<'_>,
    id: &Uuid,
    from: DeviceStatus,
    to: DeviceStatus,
    reason: RevocationReason,
    at: i64,
) -> Result<(), StoreError> {
    use DeviceStatus::{Active, Revoked, Suspended};
    // Revocation is final; everything else moves one step.
    if !matches!(
        (from, to),
        (Active, Suspended) | (Active, Revoked) | (Suspended, Active) | (Suspended, Revoked)
    ) {
        return Err(state_changed("device", id, "in a state it can leave that way").into());
    }
    let n = tx
        .prepare_cached(
            "UPDATE devices SET status = ?1, updated_at = ?2 WHERE id = ?3 AND status = ?4",
        )
        .map_err(db)?
        .execute(params![to.as_str(), at, id.to_string(), from.as_str()])
        .map_err(db)?;
    if n != 1 {
        let exists = tx
            .prepare_cached("SELECT 1 FROM devices WHERE id = ?1")
            .map_err(db)?
            .query_row(params![id.to_string()], |_| Ok(()))
            .optional()
            .map_err(db)?
            .is_some();
        return Err(if exists {
            state_changed("device", id, from.as_str())
        } else {
            Conflict::Missing {
                entity: "device",
                id: id.to_string(),
            }
        }
        .into());
    }
    let device = id.to_string();
    match (from, to) {
        (_, DeviceStatus::Revoked) => {
            if reason.is_hold() {
                return Err(
                    state_changed("device", id, "revocable with a permanent reason").into(),
                );
            }
            tx.prepare_cached(
                "UPDATE certificates
                 SET revoked_at = CASE WHEN status = 'revoked' THEN revoked_at ELSE ?1 END,
                     status = 'revoked', revocation_reason = ?2
                 WHERE device_id = ?3 AND not_after > ?1 AND (status IN ('valid', 'superseded')
                   OR (status = 'revoked' AND revocation_reason = 'certificate-hold'))",
            )
            .map_err(db)?
            .execute(params![at, reason.as_str(), device])
            .map_err(db)?;
        }
        (_, DeviceStatus::Suspended) => {
            tx.prepare_cached(
                "UPDATE certificates SET status = 'revoked', revoked_at = ?1, revocation_reason = 'certificate-hold'
                 WHERE device_id = ?2 AND not_after > ?1 AND status IN ('valid', 'superseded')",
            )
            .map_err(db)?
            .execute(params![at, device])
            .map_err(db)?;
        }
        (DeviceStatus::Suspended, DeviceStatus::Active) => {
            tx.prepare_cached(
                "UPDATE certificates
                 SET status = CASE WHEN superseded_by IS NULL THEN 'valid' ELSE 'superseded' END,
                     revocation_reason = NULL, revoked_at = NULL
                 WHERE device_id = ?1 AND status = 'revoked' AND revocation_reason = 'certificate-hold'",
            )
            .map_err(db)?
            .execute(params![device])
            .map_err(db)?;
        }
        _ => {}
    }
    Ok(())
}

/// Refuses a replica write naming no replica (`Missing`), so that a typo'd
/// location cannot be mistaken for a state conflict.
fn replica_exists(
    tx: &rusqlite::Transaction<'_>,
    backup_id: &Uuid,
    location: &str,
) -> Result<(), StoreError> {
    let found: Option<i64> = tx
        .prepare_cached("SELECT 1 FROM backup_replicas WHERE backup_id = ?1 AND location = ?2")
        .map_err(db)?
        .query_row(params![backup_id.to_string(), location], |r| r.get(0))
        .optional()
        .map_err(db)?;
    match found {
        Some(_) => Ok(()),
        None => Err(Conflict::Missing {
            entity: "backup replica",
            id: format!("{backup_id}/{location}"),
        }
        .into()),
    }
}
