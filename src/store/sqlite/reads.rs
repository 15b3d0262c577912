//! The `Store` reads as SQL on one connection (the store runs them on a
//! pooled reader off the async runtime), and keyset pagination.

use super::{db, rows};
use crate::audit::{AuditEvent, Checkpoint, GENESIS_HASH};
use crate::store::records::*;
use crate::store::{
    ActionMatch, AuditFilter, AuditQuery, CertificateFilter, DeviceFilter, EnrollmentTokenFilter,
    ExpiringQuery, Order, Page, PageRequest, RegistrationFilter, SerialPageRequest, StoreError,
};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::BTreeMap;
use uuid::Uuid;

type R<T> = Result<T, StoreError>;

/// Tables [`counts`] reports, one entry each.
const TABLES: [&str; 18] = [
    "keys",
    "cas",
    "admins",
    "registrations",
    "approvals",
    "admin_requests",
    "devices",
    "certificates",
    "crls",
    "service_certificates",
    "renewal_allowances",
    "broker_outbox",
    "rotations",
    "backups",
    "backup_replicas",
    "audit_events",
    "audit_checkpoints",
    "audit_data_keys",
];

/// One keyset page of `select` (a `SELECT ... FROM table` whose table has a
/// UUIDv7 `id`), filtered by `conds` (SQL with one `?` each, and its value).
pub(super) fn keyset<T>(
    c: &Connection,
    select: &str,
    conds: &[(&str, String)],
    page: &PageRequest,
    map: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    id_of: fn(&T) -> Uuid,
) -> Result<Page<T>, StoreError> {
    let (items, next) = keyset_by(
        c,
        select,
        "id",
        conds,
        page.after.map(|a| a.to_string()),
        page.limit,
        page.order,
        map,
    )?;
    Ok(Page {
        next: if next { items.last().map(id_of) } else { None },
        items,
    })
}

/// One keyset page ordered by `key` (a unique column), starting after
/// `after`. Returns the items and whether another page exists.
#[allow(clippy::too_many_arguments)]
fn keyset_by<T>(
    c: &Connection,
    select: &str,
    key: &str,
    conds: &[(&str, String)],
    after: Option<String>,
    limit: u32,
    order: Order,
    map: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<(Vec<T>, bool), StoreError> {
    let limit = limit.clamp(1, 1000);
    let (cmp, dir) = match order {
        Order::NewestFirst => ("<", "DESC"),
        Order::OldestFirst => (">", "ASC"),
    };
    let mut clauses: Vec<String> = conds.iter().map(|(c, _)| c.to_string()).collect();
    let mut values: Vec<String> = conds.iter().map(|(_, v)| v.clone()).collect();
    if let Some(after) = after {
        clauses.push(format!("{key} {cmp} ?"));
        values.push(after);
    }
    let where_ = if clauses.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", clauses.join(" AND "))
    };
    // One more than asked tells whether a next page exists.
    let sql = format!("{select}{where_} ORDER BY {key} {dir} LIMIT {}", limit + 1);
    let mut items = rows::many(c, &sql, rusqlite::params_from_iter(values.iter()), map)?;
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    Ok((items, more))
}

pub(super) fn list_devices(
    c: &Connection,
    f: &DeviceFilter,
    page: &PageRequest,
) -> R<Page<DeviceRecord>> {
    let mut conds: Vec<(&str, String)> = Vec::new();
    if let Some(s) = f.status {
        conds.push(("status = ?", s.as_str().to_string()));
    }
    if let Some(g) = &f.group {
        conds.push(("group_name = ?", g.clone()));
    }
    keyset(c, rows::DEVICE_SELECT, &conds, page, rows::device, |d| d.id)
}

pub(super) fn list_enrollment_tokens(
    c: &Connection,
    f: &EnrollmentTokenFilter,
    page: &PageRequest,
) -> R<Page<EnrollmentTokenRecord>> {
    let mut conds: Vec<(&str, String)> = Vec::new();
    if let Some(k) = f.kind {
        conds.push(("kind = ?", k.as_str().to_string()));
    }
    if let Some(g) = &f.group {
        conds.push(("group_name = ?", g.clone()));
    }
    if let Some(d) = f.device {
        conds.push(("device_id = ?", d.to_string()));
    }
    keyset(
        c,
        rows::ENROLLMENT_TOKEN_SELECT,
        &conds,
        page,
        rows::enrollment_token,
        |t| t.id,
    )
}

pub(super) fn list_certificates(
    c: &Connection,
    f: &CertificateFilter,
    page: &SerialPageRequest,
) -> R<Page<CertificateRecord, String>> {
    let mut conds: Vec<(&str, String)> = Vec::new();
    if let Some(d) = f.device {
        conds.push(("device_id = ?", d.to_string()));
    }
    if let Some(s) = f.status {
        conds.push(("status = ?", s.as_str().to_string()));
    }
    if let Some(i) = &f.issuer_ca {
        conds.push(("issuer_ca = ?", i.clone()));
    }
    let (items, next) = keyset_by(
        c,
        rows::CERT_SELECT,
        "serial",
        &conds,
        page.after.clone(),
        page.limit,
        page.order,
        rows::certificate,
    )?;
    Ok(Page {
        next: if next {
            items.last().map(|c| c.serial.clone())
        } else {
            None
        },
        items,
    })
}

/// Walks the `certificates(not_after)` index over the window; the keyset
/// cursor is (not_after, serial), serials being unique.
pub(super) fn expiring_device_certificates(
    c: &Connection,
    q: &ExpiringQuery,
) -> R<Page<ExpiringCertificate, (i64, String)>> {
    let limit = q.limit.clamp(1, 1000);
    let mut sql = format!(
        "{} WHERE c.status = 'valid' AND d.status = 'active'
           AND c.not_after > ?1 AND c.not_after <= ?2",
        rows::EXPIRING_SELECT
    );
    if q.unnotified_only {
        sql.push_str(" AND c.renewal_notified_at IS NULL");
    }
    let (after_t, after_s) = match &q.after {
        Some((t, s)) => {
            sql.push_str(" AND (c.not_after > ?3 OR (c.not_after = ?3 AND c.serial > ?4))");
            (*t, s.clone())
        }
        None => (0, String::new()),
    };
    sql.push_str(&format!(
        " ORDER BY c.not_after, c.serial LIMIT {}",
        limit + 1
    ));
    let mut items = if q.after.is_some() {
        rows::many(
            c,
            &sql,
            params![q.not_after_from, q.not_after_to, after_t, after_s],
            rows::expiring,
        )?
    } else {
        rows::many(
            c,
            &sql,
            params![q.not_after_from, q.not_after_to],
            rows::expiring,
        )?
    };
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    Ok(Page {
        next: if more {
            items.last().map(|e| (e.not_after, e.serial.clone()))
        } else {
            None
        },
        items,
    })
}

pub(super) fn certificates_by_spki(c: &Connection, spki: &str) -> R<Vec<CertificateRecord>> {
    rows::many(
        c,
        &format!(
            "{} WHERE spki_sha256 = ?1 ORDER BY serial",
            rows::CERT_SELECT
        ),
        params![spki],
        rows::certificate,
    )
}

pub(super) fn revoked_certificates(c: &Connection, issuer: &str, now: i64) -> R<Vec<RevokedEntry>> {
    rows::many(
        c,
        "SELECT serial, revoked_at, revocation_reason FROM certificates
         WHERE issuer_ca = ?1 AND status = 'revoked' AND not_after > ?2 ORDER BY serial",
        params![issuer, now],
        rows::revoked_entry,
    )
}

pub(super) fn revoked_certificates_by_key(
    c: &Connection,
    key_id: Uuid,
    now: i64,
) -> R<Vec<RevokedEntry>> {
    rows::many(
        c,
        "SELECT serial, revoked_at, revocation_reason FROM certificates
         WHERE issuer_key_id = ?1 AND status = 'revoked' AND not_after > ?2 ORDER BY serial",
        params![key_id.to_string(), now],
        rows::revoked_entry,
    )
}

pub(super) fn latest_crl_of_key(
    c: &Connection,
    issuer: &str,
    key_id: Uuid,
) -> R<Option<CrlRecord>> {
    rows::one(
        c,
        &format!(
            "{} WHERE issuer_ca = ?1 AND issuer_key_id = ?2 ORDER BY number DESC LIMIT 1",
            rows::CRL_SELECT
        ),
        params![issuer, key_id.to_string()],
        rows::crl,
    )
}

pub(super) fn last_expiry_issued_by(c: &Connection, key_id: Uuid) -> R<Option<i64>> {
    c.prepare_cached(
        "SELECT MAX(not_after) FROM certificates c WHERE issuer_key_id = ?1
           AND NOT EXISTS (SELECT 1 FROM service_certificates s WHERE s.serial = c.serial
                           AND (s.retired_at IS NOT NULL OR s.purpose = 'ocsp-signing'))",
    )
    .map_err(db)?
    .query_row(params![key_id.to_string()], |r| r.get(0))
    .map_err(db)
}

pub(super) fn get_rotation(c: &Connection, id: Uuid) -> R<Option<RotationRecord>> {
    rows::one(
        c,
        &format!("{} WHERE id = ?1", rows::ROTATION_SELECT),
        params![id.to_string()],
        rows::rotation,
    )
}

pub(super) fn list_rotations(
    c: &Connection,
    open_only: bool,
    limit: u32,
) -> R<Vec<RotationRecord>> {
    rows::many(
        c,
        &format!(
            "{} WHERE (?1 = 0 OR finished_at IS NULL) ORDER BY id DESC LIMIT ?2",
            rows::ROTATION_SELECT
        ),
        params![open_only, limit.clamp(1, 1000)],
        rows::rotation,
    )
}

pub(super) fn latest_crl(c: &Connection, issuer: &str) -> R<Option<CrlRecord>> {
    rows::one(
        c,
        &format!(
            "{} WHERE issuer_ca = ?1 ORDER BY number DESC LIMIT 1",
            rows::CRL_SELECT
        ),
        params![issuer],
        rows::crl,
    )
}

pub(super) fn service_certificates(
    c: &Connection,
    purpose: KeyPurpose,
) -> R<Vec<ServiceCertificateRecord>> {
    rows::many(
        c,
        &format!(
            "{} WHERE purpose = ?1 AND retired_at IS NULL ORDER BY created_at DESC, serial DESC",
            rows::SERVICE_CERT_SELECT
        ),
        params![purpose.as_str()],
        rows::service_certificate,
    )
}

pub(super) fn health(c: &Connection) -> R<()> {
    c.query_row("SELECT 1", [], |_| Ok(())).map_err(db)
}

pub(super) fn get_key(c: &Connection, id: Uuid) -> R<Option<KeyRecord>> {
    rows::one(
        c,
        &format!("{} WHERE id = ?1", rows::KEY_SELECT),
        params![id.to_string()],
        rows::key,
    )
}

pub(super) fn list_keys(c: &Connection) -> R<Vec<KeyRecord>> {
    rows::many(
        c,
        &format!("{} ORDER BY created_at, id", rows::KEY_SELECT),
        [],
        rows::key,
    )
}

pub(super) fn get_ca(c: &Connection, name: &str) -> R<Option<CaRecord>> {
    rows::one(
        c,
        &format!("{} WHERE name = ?1", rows::CA_SELECT),
        params![name],
        rows::ca,
    )
}

pub(super) fn list_cas(c: &Connection) -> R<Vec<CaRecord>> {
    rows::many(
        c,
        &format!("{} ORDER BY created_at, name", rows::CA_SELECT),
        [],
        rows::ca,
    )
}

pub(super) fn admin_by_token_hash(c: &Connection, hash: &[u8]) -> R<Option<AdminRecord>> {
    rows::one(
        c,
        &format!("{} WHERE token_hash = ?1", rows::ADMIN_SELECT),
        params![hash],
        rows::admin,
    )
}

pub(super) fn get_admin(c: &Connection, id: Uuid) -> R<Option<AdminRecord>> {
    rows::one(
        c,
        &format!("{} WHERE id = ?1", rows::ADMIN_SELECT),
        params![id.to_string()],
        rows::admin,
    )
}

pub(super) fn admin_by_name(c: &Connection, name: &str) -> R<Option<AdminRecord>> {
    rows::one(
        c,
        &format!("{} WHERE name = ?1", rows::ADMIN_SELECT),
        params![name],
        rows::admin,
    )
}

pub(super) fn list_admins(c: &Connection, page: &PageRequest) -> R<Page<AdminRecord>> {
    keyset(c, rows::ADMIN_SELECT, &[], page, rows::admin, |a| a.id)
}

pub(super) fn count_active_admins(c: &Connection) -> R<u32> {
    let n: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM admins WHERE role = 'admin' AND disabled = 0",
            [],
            |r| r.get(0),
        )
        .map_err(db)?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

pub(super) fn count_ever_admins(c: &Connection) -> R<u32> {
    let n: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM admins WHERE ever_admin = 1",
            [],
            |r| r.get(0),
        )
        .map_err(db)?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

pub(super) fn get_registration(c: &Connection, id: Uuid) -> R<Option<RegistrationRecord>> {
    rows::one(
        c,
        &format!("{} WHERE id = ?1", rows::REGISTRATION_SELECT),
        params![id.to_string()],
        rows::registration,
    )
}

pub(super) fn list_registrations(
    c: &Connection,
    filter: &RegistrationFilter,
    page: &PageRequest,
) -> R<Page<RegistrationRecord>> {
    let mut conds: Vec<(&str, String)> = Vec::new();
    if let Some(s) = filter.status {
        conds.push(("status = ?", s.as_str().to_string()));
    }
    if let Some(g) = &filter.group {
        conds.push(("group_name = ?", g.clone()));
    }
    keyset(
        c,
        rows::REGISTRATION_SELECT,
        &conds,
        page,
        rows::registration,
        |r| r.id,
    )
}

pub(super) fn expired_pending_registrations(
    c: &Connection,
    now: i64,
    limit: u32,
) -> R<Vec<RegistrationRecord>> {
    rows::many(
        c,
        &format!(
            "{} WHERE status = 'pending' AND expires_at <= ?1 ORDER BY expires_at, id LIMIT ?2",
            rows::REGISTRATION_SELECT
        ),
        params![now, limit.clamp(1, 10_000)],
        rows::registration,
    )
}

pub(super) fn pending_counts(c: &Connection) -> R<BTreeMap<String, i64>> {
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
}

/// Uses the partial index `registrations_pending_submitted` (migration
/// 0011): only pending rows are read, from the index alone.
pub(super) fn pending_registrations_summary(c: &Connection) -> R<crate::store::PendingSummary> {
    c.prepare_cached(
        "SELECT COUNT(*), MIN(submitted_at) FROM registrations WHERE status = 'pending'",
    )
    .map_err(db)?
    .query_row([], |r| {
        Ok(crate::store::PendingSummary {
            count: r.get(0)?,
            oldest_submitted_at: r.get(1)?,
        })
    })
    .map_err(db)
}

/// The condition of an active device certificate; matches the partial
/// index `certificates_active_device_not_after` (migration 0011), so each
/// count is a range scan of that index and reads no table row.
const ACTIVE_DEVICE_CERTIFICATE: &str =
    "status = 'valid' AND device_id IS NOT NULL AND not_after > ?1";

pub(super) fn certificate_expiry_counts(
    c: &Connection,
    now: i64,
    within_secs: &[i64],
) -> R<crate::store::ExpiryCounts> {
    let count = |sql: &str, upper: Option<i64>| -> R<i64> {
        let mut stmt = c.prepare_cached(sql).map_err(db)?;
        match upper {
            Some(u) => stmt.query_row(params![now, u], |r| r.get(0)),
            None => stmt.query_row(params![now], |r| r.get(0)),
        }
        .map_err(db)
    };
    let bounded = format!(
        "SELECT COUNT(*) FROM certificates WHERE {ACTIVE_DEVICE_CERTIFICATE} AND not_after <= ?2"
    );
    let within = within_secs
        .iter()
        .map(|b| count(&bounded, Some(now.saturating_add(*b))))
        .collect::<R<Vec<i64>>>()?;
    let active = count(
        &format!("SELECT COUNT(*) FROM certificates WHERE {ACTIVE_DEVICE_CERTIFICATE}"),
        None,
    )?;
    Ok(crate::store::ExpiryCounts { within, active })
}

pub(super) fn approvals(c: &Connection, registration: Uuid) -> R<Vec<ApprovalRecord>> {
    rows::many(
        c,
        "SELECT ap.registration_id, ap.admin_id, ap.decision, ap.comment, ap.decided_at, ad.disabled = 0, ad.role
         FROM approvals ap JOIN admins ad ON ad.id = ap.admin_id
         WHERE ap.registration_id = ?1 ORDER BY ap.decided_at, ap.admin_id",
        params![registration.to_string()],
        rows::approval,
    )
}

pub(super) fn get_admin_request(c: &Connection, id: Uuid) -> R<Option<AdminRequestRecord>> {
    rows::one(
        c,
        &format!("{} WHERE id = ?1", rows::ADMIN_REQUEST_SELECT),
        params![id.to_string()],
        rows::admin_request,
    )
}

pub(super) fn list_admin_requests(
    c: &Connection,
    status: Option<AdminRequestStatus>,
    page: &PageRequest,
) -> R<Page<AdminRequestRecord>> {
    let conds: Vec<(&str, String)> = status
        .map(|s| vec![("status = ?", s.as_str().to_string())])
        .unwrap_or_default();
    keyset(
        c,
        rows::ADMIN_REQUEST_SELECT,
        &conds,
        page,
        rows::admin_request,
        |r| r.id,
    )
}

pub(super) fn get_device(c: &Connection, id: Uuid) -> R<Option<DeviceRecord>> {
    rows::one(
        c,
        &format!("{} WHERE id = ?1", rows::DEVICE_SELECT),
        params![id.to_string()],
        rows::device,
    )
}

pub(super) fn renewal_allowance(c: &Connection, device: Uuid) -> R<Option<RenewalAllowanceRecord>> {
    rows::one(
        c,
        "SELECT device_id, granted_by, granted_at, expires_at FROM renewal_allowances WHERE device_id = ?1",
        params![device.to_string()],
        rows::renewal_allowance,
    )
}

pub(super) fn pending_broker_updates(
    c: &Connection,
    now: i64,
    limit: u32,
) -> R<Vec<BrokerOutboxRecord>> {
    rows::many(
        c,
        &format!(
            "{} WHERE next_attempt_at <= ?1 ORDER BY id LIMIT ?2",
            rows::BROKER_OUTBOX_SELECT
        ),
        params![now, limit.clamp(1, 1000)],
        rows::broker_outbox,
    )
}

pub(super) fn broker_update_for_device(
    c: &Connection,
    device: Uuid,
) -> R<Option<BrokerOutboxRecord>> {
    rows::one(
        c,
        &format!("{} WHERE device_id = ?1", rows::BROKER_OUTBOX_SELECT),
        params![device.to_string()],
        rows::broker_outbox,
    )
}

pub(super) fn broker_outbox_len(c: &Connection) -> R<i64> {
    c.prepare_cached("SELECT COUNT(*) FROM broker_outbox")
        .map_err(db)?
        .query_row([], |r| r.get(0))
        .map_err(db)
}

/// Serials are stored upper-case; any case finds them.
pub(super) fn get_certificate(c: &Connection, serial: &str) -> R<Option<CertificateRecord>> {
    rows::one(
        c,
        &format!("{} WHERE serial = ?1", rows::CERT_SELECT),
        params![serial.to_uppercase()],
        rows::certificate,
    )
}

pub(super) fn audit_events(c: &Connection, q: &AuditQuery) -> R<Vec<AuditEvent>> {
    rows::many(
        c,
        "SELECT seq, at_ms, actor, action, target, outcome, details, prev_hash, hash, version, source, sealed
         FROM audit_events WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
        params![q.from_seq, q.limit],
        rows::audit,
    )
}

/// Audit events matching `q` (see [`crate::store::Store::audit_report`]).
/// Every filter is a bound parameter; the action prefix form is a range
/// (`action >= 'key.' AND action < 'key/'`, `/` sorting right after `.`),
/// so no LIKE escaping is needed.
pub(super) fn audit_report(c: &Connection, q: &AuditFilter) -> R<Page<AuditEvent, i64>> {
    use rusqlite::types::Value as V;
    let limit = q.limit.clamp(1, 1000);
    let mut clauses: Vec<&str> = Vec::new();
    let mut args: Vec<V> = Vec::new();
    if let (Some(s), Some(u)) = (q.since_ms, q.until_ms)
        && s >= u
    {
        return Err(StoreError::InvalidArgument(
            "the report's start is not before its end",
        ));
    }
    if let Some(s) = q.since_ms {
        clauses.push("at_ms >= ?");
        args.push(V::Integer(s));
    }
    if let Some(u) = q.until_ms {
        clauses.push("at_ms < ?");
        args.push(V::Integer(u));
    }
    if let Some(a) = &q.actor {
        clauses.push("actor = ?");
        args.push(V::Text(a.clone()));
    }
    if let Some(a) = &q.action {
        match crate::store::audit_action_filter(a)? {
            ActionMatch::Exact(a) => {
                clauses.push("action = ?");
                args.push(V::Text(a.to_string()));
            }
            ActionMatch::Prefix(p) => {
                clauses.push("action >= ? AND action < ?");
                args.push(V::Text(p.to_string()));
                // The prefix ends with '.'; '/' is the next byte.
                let mut end = p[..p.len() - 1].to_string();
                end.push('/');
                args.push(V::Text(end));
            }
        }
    }
    if let Some(t) = &q.target {
        clauses.push("target = ?");
        args.push(V::Text(t.clone()));
    }
    let (cmp, dir) = match q.order {
        Order::NewestFirst => ("seq < ?", "DESC"),
        Order::OldestFirst => ("seq > ?", "ASC"),
    };
    if let Some(after) = q.after {
        clauses.push(cmp);
        args.push(V::Integer(after));
    }
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    args.push(V::Integer(i64::from(limit) + 1));
    let sql = format!(
        "SELECT seq, at_ms, actor, action, target, outcome, details, prev_hash, hash, version, source, sealed
         FROM audit_events {filter} ORDER BY seq {dir} LIMIT ?"
    );
    let mut items = rows::many(c, &sql, rusqlite::params_from_iter(args), rows::audit)?;
    let next = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|e| e.seq)
    } else {
        None
    };
    Ok(Page { items, next })
}

pub(super) fn audit_head(c: &Connection) -> R<(i64, Vec<u8>)> {
    Ok(c.query_row(
        "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
    .map_err(db)?
    .unwrap_or((0, GENESIS_HASH.to_vec())))
}

pub(super) fn audit_checkpoints(c: &Connection, from_seq: i64, limit: u32) -> R<Vec<Checkpoint>> {
    rows::many(
        c,
        "SELECT seq, hash, at_ms, key_id, signature FROM audit_checkpoints
         WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
        params![from_seq, limit],
        rows::checkpoint,
    )
}

pub(super) fn last_audit_checkpoint(c: &Connection) -> R<Option<Checkpoint>> {
    rows::one(
        c,
        "SELECT seq, hash, at_ms, key_id, signature FROM audit_checkpoints ORDER BY seq DESC LIMIT 1",
        [],
        rows::checkpoint,
    )
}

pub(super) fn audit_data_keys(c: &Connection) -> R<Vec<AuditDataKeyRecord>> {
    rows::many(
        c,
        "SELECT id, key_id, wrapped, created_at FROM audit_data_keys ORDER BY id",
        [],
        rows::audit_data_key,
    )
}

pub(super) fn lease_holder(c: &Connection, name: &str, now_ms: i64) -> R<Option<String>> {
    c.prepare_cached("SELECT holder FROM leases WHERE name = ?1 AND expires_at > ?2")
        .map_err(db)?
        .query_row(params![name, now_ms], |r| r.get(0))
        .optional()
        .map_err(db)
}

pub(super) fn counts(c: &Connection) -> R<BTreeMap<String, i64>> {
    let mut out = BTreeMap::new();
    for t in TABLES {
        let n: i64 = c
            .query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0))
            .map_err(db)?;
        out.insert(t.to_string(), n);
    }
    Ok(out)
}

pub(super) fn list_backups(
    c: &Connection,
    include_pruned: bool,
    limit: u32,
) -> R<Vec<BackupRecord>> {
    let mut backups = rows::many(
        c,
        &format!(
            "{} WHERE (?1 = 1 OR pruned_at IS NULL) ORDER BY id DESC LIMIT ?2",
            rows::BACKUP_SELECT
        ),
        params![include_pruned, limit.clamp(1, 10_000)],
        rows::backup,
    )?;
    for b in &mut backups {
        b.replicas = replicas_of(c, b.id)?;
    }
    Ok(backups)
}

pub(super) fn get_backup(c: &Connection, id: Uuid) -> R<Option<BackupRecord>> {
    let Some(mut b) = rows::one(
        c,
        &format!("{} WHERE id = ?1", rows::BACKUP_SELECT),
        params![id.to_string()],
        rows::backup,
    )?
    else {
        return Ok(None);
    };
    b.replicas = replicas_of(c, b.id)?;
    Ok(Some(b))
}

fn replicas_of(c: &Connection, id: Uuid) -> R<Vec<ReplicaRecord>> {
    rows::many(
        c,
        &format!(
            "{} WHERE backup_id = ?1 ORDER BY location",
            rows::REPLICA_SELECT
        ),
        params![id.to_string()],
        rows::replica,
    )
}

pub(super) fn due_replicas(c: &Connection, now: i64) -> R<Vec<ReplicaRecord>> {
    rows::many(
        c,
        &format!(
            "{} WHERE state IN ('pending', 'failed') AND next_attempt_at <= ?1 ORDER BY backup_id, location",
            rows::REPLICA_SELECT
        ),
        params![now],
        rows::replica,
    )
}
