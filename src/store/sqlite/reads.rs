//! The `Store` reads as SQL on one connection (the store runs them on a
//! pooled reader off the async runtime), and keyset pagination.

use super::{db, rows};
use crate::audit::{AuditEvent, GENESIS_HASH};
use crate::store::records::*;
use crate::store::{AuditQuery, Order, Page, PageRequest, RegistrationFilter, StoreError};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::BTreeMap;
use uuid::Uuid;

type R<T> = Result<T, StoreError>;

/// Tables [`counts`] reports, one entry each.
const TABLES: [&str; 9] = [
    "keys",
    "cas",
    "admins",
    "registrations",
    "approvals",
    "admin_requests",
    "devices",
    "certificates",
    "audit_events",
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
    let limit = page.limit.clamp(1, 1000);
    let (cmp, dir) = match page.order {
        Order::NewestFirst => ("<", "DESC"),
        Order::OldestFirst => (">", "ASC"),
    };
    let mut clauses: Vec<String> = conds.iter().map(|(c, _)| c.to_string()).collect();
    let mut values: Vec<String> = conds.iter().map(|(_, v)| v.clone()).collect();
    if let Some(after) = page.after {
        clauses.push(format!("id {cmp} ?"));
        values.push(after.to_string());
    }
    let where_ = if clauses.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", clauses.join(" AND "))
    };
    // One more than asked tells whether a next page exists.
    let sql = format!("{select}{where_} ORDER BY id {dir} LIMIT {}", limit + 1);
    let mut items = rows::many(c, &sql, rusqlite::params_from_iter(values.iter()), map)?;
    let next = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(id_of)
    } else {
        None
    };
    Ok(Page { items, next })
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
        "SELECT seq, at_ms, actor, action, target, outcome, details, prev_hash, hash, version, source
         FROM audit_events WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
        params![q.from_seq, q.limit],
        rows::audit,
    )
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
