//! Applies one domain [`Write`] inside the writer's transaction, with the
//! conditions (`from` states, guards, caps) checked in that same transaction:
//! the SQLite backend's writes (`src/store/sqlite/writes.rs`) in
//! PostgreSQL's dialect. The transaction holds the cluster-wide write lock
//! (see `writer.rs`), so a count or state read here cannot change before
//! the commit, exactly as under SQLite's single writer.

use super::rows::{self, get};
use super::{Db, dup};
use crate::store::records::*;
use crate::store::{Conflict, StoreError, Write};
use tokio_postgres::Transaction;
use uuid::Uuid;

type R<T> = Result<T, StoreError>;
pub(super) type Wr<'a, 't> = Db<'a, Transaction<'t>>;

fn expect_one(n: u64, conflict: impl FnOnce() -> Conflict) -> R<()> {
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

/// Whether `sql` (a `SELECT 1 ... WHERE ...`) finds a row.
async fn exists(
    tx: &Wr<'_, '_>,
    sql: &str,
    p: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> R<bool> {
    Ok(tx.opt(sql, p).await?.is_some())
}

/// A `SELECT COUNT(*)`-like single BIGINT.
async fn scalar(
    tx: &Wr<'_, '_>,
    sql: &str,
    p: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> R<i64> {
    let row = tx.row(sql, p).await?;
    get(&row, 0)
}

/// Inserts `a`, naming a duplicate admin as such.
async fn insert_admin(tx: &Wr<'_, '_>, a: &AdminRecord) -> R<()> {
    tx.exec(
        "INSERT INTO admins (id, name, role, token_hash, disabled, created_at, disabled_at, ever_admin) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[&a.id.to_string(), &a.name, &a.role.as_str(), &a.token_hash, &a.disabled, &a.created_at, &a.disabled_at, &(a.role == Role::Admin)],
    )
    .await
    .map_err(dup("admin"))?;
    Ok(())
}

/// SQL rank of a role column, to compare with [`role_rank`].
const ROLE_RANK: &str = "(CASE role WHEN 'admin' THEN 2 WHEN 'approver' THEN 1 ELSE 0 END)::BIGINT";

fn role_rank(r: Role) -> i64 {
    match r {
        Role::Auditor => 0,
        Role::Approver => 1,
        Role::Admin => 2,
    }
}

/// Whether `id` is an active admin holding at least `min`.
async fn active_with_role(tx: &Wr<'_, '_>, id: &Uuid, min: Role) -> R<bool> {
    let row = tx
        .opt(
            &format!("SELECT NOT disabled AND {ROLE_RANK} >= $2::BIGINT FROM admins WHERE id = $1"),
            &[&id.to_string(), &role_rank(min)],
        )
        .await?;
    match row {
        Some(r) => get::<bool>(&r, 0),
        None => Ok(false),
    }
}

/// Accounts that have ever held role `admin`, counted inside the transaction.
async fn ever_admins(tx: &Wr<'_, '_>) -> R<i64> {
    scalar(tx, "SELECT COUNT(*) FROM admins WHERE ever_admin", &[]).await
}

/// Active admins of role `admin`, counted inside the transaction.
async fn active_admins(tx: &Wr<'_, '_>) -> R<i64> {
    scalar(
        tx,
        "SELECT COUNT(*) FROM admins WHERE role = 'admin' AND NOT disabled",
        &[],
    )
    .await
}

pub(super) async fn apply_write(tx: &Wr<'_, '_>, w: &Write) -> R<()> {
    match w {
        Write::InsertKey(k) => {
            tx.exec(
                "INSERT INTO keys (id, label, purpose, algorithm, backend, handle, public_key, state, ca_name, created_at, updated_at, keystore)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                &[
                    &k.id.to_string(),
                    &k.label,
                    &k.purpose.as_str(),
                    &k.algorithm.as_str(),
                    &k.backend,
                    &k.handle.0,
                    &k.public_key_der,
                    &k.state.as_str(),
                    &k.ca_name,
                    &k.created_at,
                    &k.updated_at,
                    &k.keystore,
                ],
            )
            .await?;
        }
        Write::CompleteKeyGeneration {
            id,
            public_key_der,
            state,
            at,
        } => {
            let n = tx
                .exec(
                    "UPDATE keys SET state = $4, public_key = $1, updated_at = $2 WHERE id = $3 AND state = 'generating'",
                    &[public_key_der, at, &id.to_string(), &state.as_str()],
                )
                .await?;
            expect_one(n, || state_changed("key", id, "generating"))?;
        }
        Write::SetKeyState { id, from, to, at } => {
            let n = tx
                .exec(
                    "UPDATE keys SET state = $1, updated_at = $2 WHERE id = $3 AND state = $4",
                    &[&to.as_str(), at, &id.to_string(), &from.as_str()],
                )
                .await?;
            expect_one(n, || state_changed("key", id, from.as_str()))?;
        }
        Write::SetKeyHandle { id, handle, at } => {
            let n = tx
                .exec(
                    "UPDATE keys SET handle = $1, updated_at = $2 WHERE id = $3",
                    &[&handle.0, at, &id.to_string()],
                )
                .await?;
            expect_one(n, || Conflict::Missing {
                entity: "key",
                id: id.to_string(),
            })?;
        }
        Write::InsertCa(c) => {
            tx.exec(
                "INSERT INTO cas (name, kind, parent, key_id, certificate, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &c.name,
                    &rows::ca_kind_str(c.kind),
                    &c.parent,
                    &c.key_id.to_string(),
                    &c.certificate_der,
                    &c.created_at,
                ],
            )
            .await?;
        }
        Write::InsertAdmin(a) => insert_admin(tx, a).await?,
        Write::InsertRegistration {
            record: r,
            max_pending_in_group,
        } => {
            if let Some(limit) = max_pending_in_group {
                let pending = scalar(
                    tx,
                    "SELECT COUNT(*) FROM registrations WHERE group_name = $1 AND status = 'pending'",
                    &[&r.group],
                )
                .await?;
                if pending >= i64::from(*limit) {
                    return Err(Conflict::LimitReached {
                        what: "pending registrations in the group",
                        limit: *limit,
                    }
                    .into());
                }
            }
            tx.exec(
                "INSERT INTO registrations (id, device_id, group_name, status, name, device_type, location, firmware, csr,
                   key_algorithm, secret_hash, submitted_by, submitted_at, expires_at, decided_at, certificate_serial,
                   credentials_fetched_at, credentials_confirmed_at, client_addr, attestation, attested_identity,
                   attestation_details, enrollment_token_id, token_minted_by, reenrollment, key_source, age_recipient,
                   server_key_id, key_delivered_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19,
                   $20, $21, $22, $23, $24, $25, $26, $27, $28, $29)",
                &[
                    &r.id.to_string(),
                    &r.device_id.to_string(),
                    &r.group,
                    &r.status.as_str(),
                    &r.name,
                    &r.device_type,
                    &r.location,
                    &r.firmware,
                    &r.csr_der,
                    &r.key_algorithm.as_str(),
                    &r.secret_hash,
                    &r.submitted_by.map(|u| u.to_string()),
                    &r.submitted_at,
                    &r.expires_at,
                    &r.decided_at,
                    &r.certificate_serial,
                    &r.credentials_fetched_at,
                    &r.credentials_confirmed_at,
                    &r.client_addr,
                    &r.attestation.as_str(),
                    &r.attested_identity,
                    &r.attestation_details.as_ref().map(|v| v.to_string()),
                    &r.enrollment_token_id.map(|u| u.to_string()),
                    &r.token_minted_by.map(|u| u.to_string()),
                    &r.reenrollment,
                    &r.key_source.as_str(),
                    &r.age_recipient,
                    &r.server_key_id.map(|u| u.to_string()),
                    &r.key_delivered_at,
                ],
            )
            .await?;
        }
        Write::SetRegistrationStatus {
            id,
            from,
            to,
            at,
            certificate_serial,
        } => {
            let n = tx
                .exec(
                    "UPDATE registrations SET status = $1, decided_at = COALESCE(decided_at, $2),
                       certificate_serial = COALESCE($3, certificate_serial)
                     WHERE id = $4 AND status = $5",
                    &[
                        &to.as_str(),
                        at,
                        certificate_serial,
                        &id.to_string(),
                        &from.as_str(),
                    ],
                )
                .await?;
            expect_one(n, || state_changed("registration", id, from.as_str()))?;
        }
        Write::DisableAdmin { id, at } => {
            let n = tx
                .exec(
                    "UPDATE admins SET disabled = TRUE, disabled_at = $2 WHERE id = $1 AND NOT disabled",
                    &[&id.to_string(), at],
                )
                .await?;
            expect_one(n, || state_changed("admin", id, "active"))?;
            if active_admins(tx).await? == 0 {
                return Err(Conflict::LastActiveAdmin.into());
            }
            tx.exec(
                "UPDATE admin_requests SET status = 'expired', decided_at = COALESCE(decided_at, $2)
                 WHERE status IN ('pending', 'approved') AND (requested_by = $1 OR decided_by = $1)",
                &[&id.to_string(), at],
            )
            .await?;
        }
        Write::SetAdminRole {
            id,
            from,
            to,
            without_second_admin,
        } => {
            if *without_second_admin && *to > *from && ever_admins(tx).await? >= 2 {
                return Err(Conflict::SecondAdminRequired.into());
            }
            let n = tx
                .exec(
                    "UPDATE admins SET role = $1, ever_admin = (ever_admin OR $1 = 'admin')
                     WHERE id = $2 AND role = $3 AND NOT disabled",
                    &[&to.as_str(), &id.to_string(), &from.as_str()],
                )
                .await?;
            expect_one(n, || state_changed("admin", id, from.as_str()))?;
            if active_admins(tx).await? == 0 {
                return Err(Conflict::LastActiveAdmin.into());
            }
        }
        Write::MarkCredentialsFetched { id, at } => {
            let n = tx
                .exec(
                    "UPDATE registrations SET credentials_fetched_at = COALESCE(credentials_fetched_at, $1)
                     WHERE id = $2 AND status = 'issued' AND credentials_confirmed_at IS NULL",
                    &[at, &id.to_string()],
                )
                .await?;
            expect_one(n, || state_changed("registration", id, "issued"))?;
        }
        Write::ConfirmCredentials { id, at } => {
            let n = tx
                .exec(
                    "UPDATE registrations SET credentials_confirmed_at = $1,
                       credentials_fetched_at = COALESCE(credentials_fetched_at, $1)
                     WHERE id = $2 AND status = 'issued' AND credentials_confirmed_at IS NULL",
                    &[at, &id.to_string()],
                )
                .await?;
            expect_one(n, || state_changed("registration", id, "unconfirmed"))?;
        }
        Write::RecordDecision {
            approval: a,
            expect_counted_approvals,
            min_role,
        } => {
            let rid = a.registration_id.to_string();
            let status: Option<String> = match tx
                .opt("SELECT status FROM registrations WHERE id = $1", &[&rid])
                .await?
            {
                Some(r) => Some(get(&r, 0)?),
                None => None,
            };
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
            if !active_with_role(tx, &a.admin_id, *min_role).await? {
                return Err(state_changed("admin", &a.admin_id, "active").into());
            }
            let row = tx
                .row(
                    &format!(
                        "SELECT COUNT(*) FILTER (WHERE ap.admin_id = $2),
                                COUNT(*) FILTER (WHERE ap.decision = 'approve' AND NOT ad.disabled AND {} >= $3::BIGINT)
                         FROM approvals ap JOIN admins ad ON ad.id = ap.admin_id
                         WHERE ap.registration_id = $1",
                        ROLE_RANK.replace("role", "ad.role")
                    ),
                    &[&rid, &a.admin_id.to_string(), &role_rank(*min_role)],
                )
                .await?;
            let (decided, counted): (i64, i64) = (get(&row, 0)?, get(&row, 1)?);
            if decided > 0 {
                return Err(Conflict::Duplicate { entity: "decision" }.into());
            }
            if counted != i64::from(*expect_counted_approvals) {
                return Err(Conflict::ApprovalsChanged.into());
            }
            tx.exec(
                "INSERT INTO approvals (registration_id, admin_id, decision, comment, decided_at) VALUES ($1, $2, $3, $4, $5)",
                &[
                    &rid,
                    &a.admin_id.to_string(),
                    &a.decision.as_str(),
                    &a.comment,
                    &a.decided_at,
                ],
            )
            .await?;
        }
        Write::InsertAdminRequest(r) => {
            tx.exec(
                "INSERT INTO admin_requests (id, kind, name, admin_id, role, requested_by, status, decided_by,
                   requester_secret_hash, approver_secret_hash, client_addr, created_at, expires_at, decided_at, redeemed_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
                &[
                    &r.id.to_string(),
                    &r.kind.as_str(),
                    &r.name,
                    &r.admin_id.map(|u| u.to_string()),
                    &r.role.as_str(),
                    &r.requested_by.to_string(),
                    &r.status.as_str(),
                    &r.decided_by.map(|u| u.to_string()),
                    &r.requester_secret_hash,
                    &r.approver_secret_hash,
                    &r.client_addr,
                    &r.created_at,
                    &r.expires_at,
                    &r.decided_at,
                    &r.redeemed_at,
                ],
            )
            .await
            .map_err(dup("open admin request"))?;
        }
        Write::DecideAdminRequest {
            id,
            to,
            decided_by,
            at,
            approver_secret_hash,
        } => {
            if !active_with_role(tx, decided_by, Role::Admin).await? {
                return Err(state_changed("admin", decided_by, "active").into());
            }
            let n = tx
                .exec(
                    "UPDATE admin_requests SET status = $1, decided_by = $2, decided_at = $3,
                       approver_secret_hash = COALESCE($4, approver_secret_hash)
                     WHERE id = $5 AND status = 'pending' AND expires_at > $3",
                    &[
                        &to.as_str(),
                        &decided_by.to_string(),
                        at,
                        approver_secret_hash,
                        &id.to_string(),
                    ],
                )
                .await?;
            expect_one(n, || state_changed("admin request", id, "pending"))?;
        }
        Write::RedeemInvitation { id, at, admin } => {
            // State first (so an unusable invitation reports as such), then
            // the account, then the link to it (admin_id references admins).
            let n = tx
                .exec(
                    "UPDATE admin_requests SET status = 'redeemed', redeemed_at = $1
                     WHERE id = $2 AND kind = 'invite' AND status = 'approved' AND expires_at > $1",
                    &[at, &id.to_string()],
                )
                .await?;
            expect_one(n, || state_changed("invitation", id, "open"))?;
            // Whoever asked (and approved) must still be an active admin, and
            // an invitation without a second approver is only good while no
            // second account has ever held role `admin`.
            let unapproved: Option<bool> = match tx
                .opt(
                    "SELECT decided_by IS NULL FROM admin_requests r
                     WHERE id = $1 AND EXISTS (
                       SELECT 1 FROM admins a WHERE a.id = r.requested_by AND NOT a.disabled AND a.role = 'admin')
                     AND (decided_by IS NULL OR EXISTS (
                       SELECT 1 FROM admins a WHERE a.id = r.decided_by AND NOT a.disabled AND a.role = 'admin'))",
                    &[&id.to_string()],
                )
                .await?
            {
                Some(r) => Some(get(&r, 0)?),
                None => None,
            };
            match unapproved {
                None => {
                    return Err(state_changed("invitation", id, "backed by active admins").into());
                }
                Some(true) => {
                    if ever_admins(tx).await? >= 2 {
                        return Err(Conflict::SecondAdminRequired.into());
                    }
                }
                Some(false) => {}
            }
            insert_admin(tx, admin).await?;
            tx.exec(
                "UPDATE admin_requests SET admin_id = $1 WHERE id = $2",
                &[&admin.id.to_string(), &id.to_string()],
            )
            .await?;
        }
        Write::ExpireAdminRequest { id, at } => {
            let n = tx
                .exec(
                    "UPDATE admin_requests SET status = 'expired', decided_at = COALESCE(decided_at, $1)
                     WHERE id = $2 AND status IN ('pending', 'approved')",
                    &[at, &id.to_string()],
                )
                .await?;
            expect_one(n, || state_changed("admin request", id, "open"))?;
        }
        Write::InsertDevice(d) => {
            tx.exec(
                "INSERT INTO devices (id, name, device_type, location, firmware, group_name, status, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &d.id.to_string(),
                    &d.name,
                    &d.device_type,
                    &d.location,
                    &d.firmware,
                    &d.group,
                    &d.status.as_str(),
                    &d.created_at,
                    &d.updated_at,
                ],
            )
            .await?;
        }
        Write::InsertCertificate(c) => {
            tx.exec(
                "INSERT INTO certificates (serial, device_id, issuer_ca, issuer_key_id, subject, not_before, not_after,
                   fingerprint, der, status, revoked_at, revocation_reason, created_at, superseded_by, spki_sha256)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
                &[
                    &c.serial,
                    &c.device_id.map(|u| u.to_string()),
                    &c.issuer_ca,
                    &c.issuer_key_id.to_string(),
                    &c.subject,
                    &c.not_before,
                    &c.not_after,
                    &c.fingerprint_sha256,
                    &c.der,
                    &c.status.as_str(),
                    &c.revoked_at,
                    &c.revocation_reason.map(|r| r.as_str()),
                    &c.created_at,
                    &c.superseded_by,
                    &c.spki_sha256,
                ],
            )
            .await
            .map_err(dup("certificate"))?;
        }
        Write::RefuseRevokedKey { spki_sha256 } => {
            let barred = exists(
                tx,
                "SELECT 1 FROM certificates c LEFT JOIN devices d ON d.id = c.device_id
                 WHERE c.spki_sha256 = $1
                   AND ((c.status = 'revoked' AND c.revocation_reason IS DISTINCT FROM 'certificate-hold')
                        OR d.status IN ('suspended', 'revoked'))
                 LIMIT 1",
                &[spki_sha256],
            )
            .await?;
            if barred {
                return Err(Conflict::KeyRevoked.into());
            }
        }
        Write::SupersedeCertificate { serial, by, at } => {
            let _ = at;
            let n = tx
                .exec(
                    "UPDATE certificates SET status = 'superseded', superseded_by = $1
                     WHERE serial = $2 AND status = 'valid'",
                    &[by, serial],
                )
                .await?;
            expect_cert(tx, n, serial, "valid").await?;
        }
        Write::RevokeCertificate { serial, reason, at } => {
            // A hold may become a permanent revocation (RFC 5280 §5.3.1);
            // the original revocation time is kept then.
            let n = tx
                .exec(
                    "UPDATE certificates
                     SET status = 'revoked', revocation_reason = $1::TEXT,
                         revoked_at = CASE WHEN status = 'revoked' THEN revoked_at ELSE $2::BIGINT END
                     WHERE serial = $3 AND (status IN ('valid', 'superseded')
                       OR (status = 'revoked' AND revocation_reason = 'certificate-hold' AND $1::TEXT <> 'certificate-hold'))",
                    &[&reason.as_str(), at, serial],
                )
                .await?;
            expect_cert(tx, n, serial, "valid, superseded or on hold").await?;
        }
        Write::ReleaseCertificateHold { serial, at } => {
            let _ = at;
            let n = tx
                .exec(
                    "UPDATE certificates
                     SET status = CASE WHEN superseded_by IS NULL THEN 'valid' ELSE 'superseded' END,
                         revocation_reason = NULL, revoked_at = NULL
                     WHERE serial = $1 AND status = 'revoked' AND revocation_reason = 'certificate-hold'
                       AND NOT EXISTS (SELECT 1 FROM devices d
                                       WHERE d.id = certificates.device_id AND d.status <> 'active')",
                    &[serial],
                )
                .await?;
            expect_cert(tx, n, serial, "on hold, of an active device").await?;
        }
        Write::SetDeviceStatus {
            id,
            from,
            to,
            reason,
            at,
        } => set_device_status(tx, id, *from, *to, *reason, *at).await?,
        Write::PublishCrl { record, keep } => {
            let highest = scalar(
                tx,
                "SELECT COALESCE(MAX(number), 0) FROM crls WHERE issuer_ca = $1",
                &[&record.issuer_ca],
            )
            .await?;
            if record.number != highest + 1 {
                return Err(Conflict::StateChanged {
                    entity: "CRL number of",
                    id: record.issuer_ca.clone(),
                    expected: "one below the new CRL's number",
                }
                .into());
            }
            tx.exec(
                "INSERT INTO crls (issuer_ca, number, this_update, next_update, entries, der, created_at, issuer_key_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &record.issuer_ca,
                    &record.number,
                    &record.this_update,
                    &record.next_update,
                    &record.entries,
                    &record.der,
                    &record.created_at,
                    &record.issuer_key_id.to_string(),
                ],
            )
            .await?;
            // `keep` CRLs per signing key: the CRLs of a retired key (numbered
            // in the CA's one sequence) are not pushed out by its successor's.
            tx.exec(
                "DELETE FROM crls WHERE issuer_ca = $1 AND issuer_key_id = $2 AND number NOT IN
                   (SELECT number FROM crls WHERE issuer_ca = $1 AND issuer_key_id = $2 ORDER BY number DESC LIMIT $3)",
                &[
                    &record.issuer_ca,
                    &record.issuer_key_id.to_string(),
                    &i64::from((*keep).max(1)),
                ],
            )
            .await?;
        }
        Write::InsertServiceCertificate(c) => {
            tx.exec(
                "INSERT INTO service_certificates (serial, purpose, issuer_ca, key_id, not_after, retired_at, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &c.serial,
                    &c.purpose.as_str(),
                    &c.issuer_ca,
                    &c.key_id.to_string(),
                    &c.not_after,
                    &c.retired_at,
                    &c.created_at,
                ],
            )
            .await
            .map_err(dup("service certificate"))?;
        }
        Write::AllowRenewal(a) => {
            require_active_device(tx, &a.device_id).await?;
            tx.exec(
                "INSERT INTO renewal_allowances (device_id, granted_by, granted_at, expires_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (device_id) DO UPDATE SET granted_by = excluded.granted_by,
                   granted_at = excluded.granted_at, expires_at = excluded.expires_at",
                &[
                    &a.device_id.to_string(),
                    &a.granted_by.to_string(),
                    &a.granted_at,
                    &a.expires_at,
                ],
            )
            .await?;
        }
        Write::ConsumeRenewalAllowance { device_id, at } => {
            let n = tx
                .exec(
                    "DELETE FROM renewal_allowances WHERE device_id = $1 AND expires_at > $2",
                    &[&device_id.to_string(), at],
                )
                .await?;
            expect_one(n, || {
                state_changed("renewal allowance of device", device_id, "open")
            })?;
        }
        Write::RetireServiceCertificate { serial, at } => {
            let n = tx
                .exec(
                    "UPDATE service_certificates SET retired_at = $1 WHERE serial = $2 AND retired_at IS NULL",
                    &[at, serial],
                )
                .await?;
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
        | Write::SetServerKey { .. } => enrollment_write(tx, w).await?,
        Write::EnqueueBrokerUpdate { device_id, op, at } => {
            if !exists(
                tx,
                "SELECT 1 FROM devices WHERE id = $1",
                &[&device_id.to_string()],
            )
            .await?
            {
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
            tx.exec(
                "DELETE FROM broker_outbox WHERE device_id = $1",
                &[&device_id.to_string()],
            )
            .await?;
            tx.exec(
                "INSERT INTO broker_outbox (device_id, op, rules, created_at, attempts, next_attempt_at, last_error)
                 VALUES ($1, $2, $3, $4, 0, $4, NULL)",
                &[&device_id.to_string(), &op.as_str(), &rules, at],
            )
            .await?;
        }
        Write::CompleteBrokerUpdate { id } => {
            tx.exec("DELETE FROM broker_outbox WHERE id = $1", &[id])
                .await?;
        }
        Write::FailBrokerUpdate {
            id,
            next_attempt_at,
            error,
        } => {
            tx.exec(
                "UPDATE broker_outbox SET attempts = attempts + 1, next_attempt_at = $1, last_error = $2 WHERE id = $3",
                &[next_attempt_at, error, id],
            )
            .await?;
        }
        Write::InsertRotation(r) => {
            tx.exec(
                "INSERT INTO rotations (id, purpose, target, step, old_key_id, new_key_id, new_serial, reason, actor,
                   destroy_after, attempts, last_error, next_attempt_at, created_at, updated_at, finished_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
                &[
                    &r.id.to_string(),
                    &r.purpose.as_str(),
                    &r.target,
                    &r.step.as_str(),
                    &r.old_key_id.map(|k| k.to_string()),
                    &r.new_key_id.map(|k| k.to_string()),
                    &r.new_serial,
                    &r.reason,
                    &r.actor,
                    &r.destroy_after,
                    &r.attempts,
                    &r.last_error,
                    &r.next_attempt_at,
                    &r.created_at,
                    &r.updated_at,
                    &r.finished_at,
                ],
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => StoreError::Conflict(Conflict::RotationRunning {
                    purpose: r.purpose.as_str().to_string(),
                    target: r.target.clone(),
                }),
                other => other,
            })?;
        }
        Write::MarkRenewalNotified { serials, at } => {
            for serial in serials {
                let n = tx
                    .exec(
                        "UPDATE certificates SET renewal_notified_at = $1
                         WHERE serial = $2 AND renewal_notified_at IS NULL",
                        &[at, serial],
                    )
                    .await?;
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
                .exec(
                    "UPDATE rotations SET step = $1,
                       new_key_id = COALESCE($2, new_key_id),
                       new_serial = COALESCE($3, new_serial),
                       destroy_after = COALESCE($4, destroy_after),
                       attempts = 0, last_error = NULL, next_attempt_at = $5,
                       updated_at = $5, finished_at = $6
                     WHERE id = $7 AND step = $8",
                    &[
                        &to.as_str(),
                        &new_key_id.map(|k| k.to_string()),
                        new_serial,
                        destroy_after,
                        at,
                        &finished,
                        &id.to_string(),
                        &from.as_str(),
                    ],
                )
                .await
                .map_err(|e| match e {
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
                .exec(
                    "UPDATE rotations SET attempts = attempts + 1, last_error = $1, next_attempt_at = $2, updated_at = $3
                     WHERE id = $4 AND step = $5",
                    &[error, next_attempt_at, at, &id.to_string(), &step.as_str()],
                )
                .await?;
            expect_one(n, || state_changed("rotation", id, step.as_str()))?;
        }
        Write::RecordBackup { record, locations } => {
            let summary = serde_json::to_string(&record.summary)
                .map_err(|e| StoreError::Corrupt(format!("backup summary: {e}")))?;
            tx.exec(
                "INSERT INTO backups (id, file_name, created_at, sha256, size_bytes, format_version, schema_version,
                   trigger, actor, summary, pruned_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL)",
                &[
                    &record.id.to_string(),
                    &record.file_name,
                    &record.created_at,
                    &record.sha256,
                    &record.size_bytes,
                    &record.format_version,
                    &record.schema_version,
                    &record.trigger.as_str(),
                    &record.actor,
                    &summary,
                ],
            )
            .await?;
            for location in locations {
                tx.exec(
                    "INSERT INTO backup_replicas (backup_id, location, state, attempts, next_attempt_at, updated_at)
                     VALUES ($1, $2, 'pending', 0, $3, $3)",
                    &[&record.id.to_string(), location, &record.created_at],
                )
                .await?;
            }
        }
        Write::ReplicaStored {
            backup_id,
            location,
            at,
        } => {
            replica_exists(tx, backup_id, location).await?;
            let n = tx
                .exec(
                    "UPDATE backup_replicas SET state = 'stored', attempts = 0, last_error = NULL, stored_at = $1, updated_at = $1
                     WHERE backup_id = $2 AND location = $3 AND state != 'pruned'",
                    &[at, &backup_id.to_string(), location],
                )
                .await?;
            expect_one(n, || state_changed("backup replica", backup_id, "unpruned"))?;
        }
        Write::ReplicaFailed {
            backup_id,
            location,
            error,
            next_attempt_at,
            at,
        } => {
            replica_exists(tx, backup_id, location).await?;
            let n = tx
                .exec(
                    "UPDATE backup_replicas SET state = 'failed', attempts = attempts + 1, last_error = $1,
                       next_attempt_at = $2, updated_at = $3
                     WHERE backup_id = $4 AND location = $5 AND state != 'pruned'",
                    &[error, next_attempt_at, at, &backup_id.to_string(), location],
                )
                .await?;
            expect_one(n, || state_changed("backup replica", backup_id, "unpruned"))?;
        }
        Write::ReplicaVerified {
            backup_id,
            location,
            error,
            at,
        } => {
            replica_exists(tx, backup_id, location).await?;
            let sql = if error.is_none() {
                "UPDATE backup_replicas SET verified_at = $1, verify_error = $2, updated_at = $1
                 WHERE backup_id = $3 AND location = $4"
            } else {
                "UPDATE backup_replicas SET verify_error = $2, updated_at = $1
                 WHERE backup_id = $3 AND location = $4"
            };
            tx.exec(sql, &[at, error, &backup_id.to_string(), location])
                .await?;
        }
        Write::PruneBackup { id, at } => {
            let n = tx
                .exec(
                    "UPDATE backups SET pruned_at = $1 WHERE id = $2 AND pruned_at IS NULL",
                    &[at, &id.to_string()],
                )
                .await?;
            expect_one(n, || state_changed("backup", id, "unpruned"))?;
            tx.exec(
                "UPDATE backup_replicas SET state = 'pruned', updated_at = $1 WHERE backup_id = $2",
                &[at, &id.to_string()],
            )
            .await?;
        }
        Write::InsertAuditDataKey(k) => {
            tx.exec(
                "INSERT INTO audit_data_keys (id, key_id, wrapped, created_at) VALUES ($1, $2, $3, $4)",
                &[
                    &k.id.to_string(),
                    &k.key_id.to_string(),
                    &k.wrapped,
                    &k.created_at,
                ],
            )
            .await
            .map_err(dup("audit data key"))?;
        }
        Write::ActivateCaKey {
            ca,
            from_key,
            to_key,
            certificate_der,
        } => {
            let n = tx
                .exec(
                    "UPDATE cas SET key_id = $1, certificate = $2 WHERE name = $3 AND key_id = $4",
                    &[
                        &to_key.to_string(),
                        certificate_der,
                        ca,
                        &from_key.to_string(),
                    ],
                )
                .await?;
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
async fn expect_cert(tx: &Wr<'_, '_>, n: u64, serial: &str, expected: &'static str) -> R<()> {
    if n == 1 {
        return Ok(());
    }
    let found = exists(
        tx,
        "SELECT 1 FROM certificates WHERE serial = $1",
        &[&serial],
    )
    .await?;
    Err(if found {
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

async fn enrollment_write(tx: &Wr<'_, '_>, w: &Write) -> R<()> {
    match w {
        Write::InsertEnrollmentToken(t) => {
            tx.exec(
                "INSERT INTO enrollment_tokens (id, kind, token_hash, group_name, device_id, device_name,
                   uses_allowed, uses, created_by, created_at, expires_at, revoked_at, revoked_by, last_used_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                &[
                    &t.id.to_string(),
                    &t.kind.as_str(),
                    &t.token_hash,
                    &t.group,
                    &t.device_id.map(|d| d.to_string()),
                    &t.device_name,
                    &i64::from(t.uses_allowed),
                    &i64::from(t.uses),
                    &t.created_by.to_string(),
                    &t.created_at,
                    &t.expires_at,
                    &t.revoked_at,
                    &t.revoked_by.map(|d| d.to_string()),
                    &t.last_used_at,
                ],
            )
            .await
            .map_err(dup("enrollment token"))?;
        }
        Write::RevokeEnrollmentToken { id, by, at } => {
            let n = tx
                .exec(
                    "UPDATE enrollment_tokens SET revoked_at = $1, revoked_by = $2
                     WHERE id = $3 AND revoked_at IS NULL",
                    &[at, &by.to_string(), &id.to_string()],
                )
                .await?;
            if n != 1 {
                let found = exists(
                    tx,
                    "SELECT 1 FROM enrollment_tokens WHERE id = $1",
                    &[&id.to_string()],
                )
                .await?;
                return Err(if found {
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
            let row = tx
                .opt(
                    "SELECT kind, revoked_at, expires_at, uses, uses_allowed FROM enrollment_tokens WHERE id = $1",
                    &[&id.to_string()],
                )
                .await?;
            let row: Option<(String, Option<i64>, i64, i64, i64)> = match row {
                Some(r) => Some((
                    get(&r, 0)?,
                    get(&r, 1)?,
                    get(&r, 2)?,
                    get(&r, 3)?,
                    get(&r, 4)?,
                )),
                None => None,
            };
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
            tx.exec(
                "UPDATE enrollment_tokens SET uses = uses + 1, last_used_at = $1 WHERE id = $2",
                &[at, &id.to_string()],
            )
            .await?;
        }
        Write::ClaimIdentity {
            identity,
            device_id,
            method,
            at,
        } => {
            let existing: Option<String> = match tx
                .opt(
                    "SELECT device_id FROM device_identities WHERE identity = $1",
                    &[identity],
                )
                .await?
            {
                Some(r) => Some(get(&r, 0)?),
                None => None,
            };
            match existing {
                Some(d) if d == device_id.to_string() => {
                    tx.exec(
                        "UPDATE device_identities SET last_enrolled_at = $1 WHERE identity = $2",
                        &[at, identity],
                    )
                    .await?;
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
                    tx.exec(
                        "INSERT INTO device_identities (identity, device_id, method, created_at, last_enrolled_at)
                         VALUES ($1, $2, $3, $4, $4)",
                        &[identity, &device_id.to_string(), &method.as_str(), at],
                    )
                    .await?;
                }
            }
        }
        Write::RecordJwtId {
            issuer,
            jti,
            expires_at,
            at,
        } => {
            tx.exec("DELETE FROM jwt_replay WHERE expires_at <= $1", &[at])
                .await?;
            tx.exec(
                "INSERT INTO jwt_replay (issuer, jti, expires_at) VALUES ($1, $2, $3)",
                &[issuer, jti, expires_at],
            )
            .await
            .map_err(dup("JWT id"))?;
        }
        Write::ReenrollDevice {
            id,
            group,
            name,
            keep_serial,
            at,
        } => {
            require_active_device(tx, id).await?;
            let device = id.to_string();
            tx.exec(
                "UPDATE devices SET group_name = $1, name = $2, updated_at = $3 WHERE id = $4",
                &[group, name, at, &device],
            )
            .await?;
            tx.exec(
                "UPDATE certificates SET status = 'revoked', revoked_at = $1, revocation_reason = 'superseded'
                 WHERE device_id = $2 AND serial <> $3 AND not_after > $1 AND status IN ('valid', 'superseded')",
                &[at, &device, keep_serial],
            )
            .await?;
        }
        Write::MarkKeyDelivered {
            registration_id,
            at,
        } => {
            let n = tx
                .exec(
                    "UPDATE registrations SET key_delivered_at = $1
                     WHERE id = $2 AND key_delivered_at IS NULL AND server_key_id IS NOT NULL",
                    &[at, &registration_id.to_string()],
                )
                .await?;
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
                .exec(
                    "UPDATE registrations SET server_key_id = $1 WHERE id = $2 AND server_key_id IS NULL",
                    &[&key_id.to_string(), &registration_id.to_string()],
                )
                .await?;
            expect_one(n, || {
                state_changed("registration", registration_id, "without a server key")
            })?;
        }
        _ => {
            return Err(StoreError::Corrupt(
                "write routed to the wrong handler".into(),
            ));
        }
    }
    Ok(())
}

/// Conflicts with `Missing` without the device and `StateChanged` unless
/// it is `active` (read inside the transaction).
async fn require_active_device(tx: &Wr<'_, '_>, id: &Uuid) -> R<()> {
    let status: Option<String> = match tx
        .opt(
            "SELECT status FROM devices WHERE id = $1",
            &[&id.to_string()],
        )
        .await?
    {
        Some(r) => Some(get(&r, 0)?),
        None => None,
    };
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

/// [`Write::SetDeviceStatus`]: the device, then its unexpired certificates.
async fn set_device_status(
    tx: &Wr<'_, '_>,
    id: &Uuid,
    from: DeviceStatus,
    to: DeviceStatus,
    reason: RevocationReason,
    at: i64,
) -> R<()> {
    use DeviceStatus::{Active, Revoked, Suspended};
    // Revocation is final; everything else moves one step.
    if !matches!(
        (from, to),
        (Active, Suspended) | (Active, Revoked) | (Suspended, Active) | (Suspended, Revoked)
    ) {
        return Err(state_changed("device", id, "in a state it can leave that way").into());
    }
    let device = id.to_string();
    let n = tx
        .exec(
            "UPDATE devices SET status = $1, updated_at = $2 WHERE id = $3 AND status = $4",
            &[&to.as_str(), &at, &device, &from.as_str()],
        )
        .await?;
    if n != 1 {
        let found = exists(tx, "SELECT 1 FROM devices WHERE id = $1", &[&device]).await?;
        return Err(if found {
            state_changed("device", id, from.as_str())
        } else {
            Conflict::Missing {
                entity: "device",
                id: device,
            }
        }
        .into());
    }
    match (from, to) {
        (_, DeviceStatus::Revoked) => {
            if reason.is_hold() {
                return Err(
                    state_changed("device", id, "revocable with a permanent reason").into(),
                );
            }
            tx.exec(
                "UPDATE certificates
                 SET revoked_at = CASE WHEN status = 'revoked' THEN revoked_at ELSE $1::BIGINT END,
                     status = 'revoked', revocation_reason = $2
                 WHERE device_id = $3 AND not_after > $1::BIGINT AND (status IN ('valid', 'superseded')
                   OR (status = 'revoked' AND revocation_reason = 'certificate-hold'))",
                &[&at, &reason.as_str(), &device],
            )
            .await?;
        }
        (_, DeviceStatus::Suspended) => {
            tx.exec(
                "UPDATE certificates SET status = 'revoked', revoked_at = $1, revocation_reason = 'certificate-hold'
                 WHERE device_id = $2 AND not_after > $1 AND status IN ('valid', 'superseded')",
                &[&at, &device],
            )
            .await?;
        }
        (DeviceStatus::Suspended, DeviceStatus::Active) => {
            tx.exec(
                "UPDATE certificates
                 SET status = CASE WHEN superseded_by IS NULL THEN 'valid' ELSE 'superseded' END,
                     revocation_reason = NULL, revoked_at = NULL
                 WHERE device_id = $1 AND status = 'revoked' AND revocation_reason = 'certificate-hold'",
                &[&device],
            )
            .await?;
        }
        _ => {}
    }
    Ok(())
}

/// Refuses a replica write naming no replica (`Missing`), so that a typo'd
/// location cannot be mistaken for a state conflict.
async fn replica_exists(tx: &Wr<'_, '_>, backup_id: &Uuid, location: &str) -> R<()> {
    if exists(
        tx,
        "SELECT 1 FROM backup_replicas WHERE backup_id = $1 AND location = $2",
        &[&backup_id.to_string(), &location],
    )
    .await?
    {
        Ok(())
    } else {
        Err(Conflict::Missing {
            entity: "backup replica",
            id: format!("{backup_id}/{location}"),
        }
        .into())
    }
}
