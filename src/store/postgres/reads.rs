//! The `Store` reads as SQL on a pooled connection, and keyset pagination:
//! the SQLite backend's queries (`src/store/sqlite/reads.rs`) in
//! PostgreSQL's dialect, with the same orders, clamps and bounds.

use super::Db;
use super::rows::{self, get};
use crate::audit::{AuditEvent, Checkpoint, GENESIS_HASH};
use crate::store::records::*;
use crate::store::{
    ActionMatch, AuditFilter, AuditQuery, CertificateFilter, DeviceFilter, EnrollmentTokenFilter,
    ExpiringQuery, Order, Page, PageRequest, RegistrationFilter, SerialPageRequest, StoreError,
};
use std::collections::BTreeMap;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};
use uuid::Uuid;

type R<T> = Result<T, StoreError>;
type Rd<'a> = Db<'a, Client>;
type Map<T> = fn(&Row) -> R<T>;

/// Tables [`counts`] reports, one entry each (the same list as SQLite's).
pub(super) const TABLES: [&str; 18] = [
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

/// A clamped limit as the BIGINT `LIMIT` takes it.
fn lim(limit: u32, max: u32) -> i64 {
    i64::from(limit.clamp(1, max))
}

/// One keyset page of `select` (a `SELECT ... FROM table` whose table has a
/// UUIDv7 `id`), filtered by `conds` (a column name each, and its value).
async fn keyset<T>(
    c: &Rd<'_>,
    select: &str,
    conds: &[(&str, String)],
    page: &PageRequest,
    map: Map<T>,
    id_of: fn(&T) -> Uuid,
) -> R<Page<T>> {
    let (items, next) = keyset_by(
        c,
        select,
        "id",
        conds,
        page.after.map(|a| a.to_string()),
        page.limit,
        page.order,
        map,
    )
    .await?;
    Ok(Page {
        next: if next { items.last().map(id_of) } else { None },
        items,
    })
}

/// One keyset page ordered by `key` (a unique column), starting after
/// `after`. Returns the items and whether another page exists.
#[allow(clippy::too_many_arguments)]
async fn keyset_by<T>(
    c: &Rd<'_>,
    select: &str,
    key: &str,
    conds: &[(&str, String)],
    after: Option<String>,
    limit: u32,
    order: Order,
    map: Map<T>,
) -> R<(Vec<T>, bool)> {
    let limit = limit.clamp(1, 1000);
    let (cmp, dir) = match order {
        Order::NewestFirst => ("<", "DESC"),
        Order::OldestFirst => (">", "ASC"),
    };
    let mut clauses: Vec<String> = Vec::new();
    let mut values: Vec<String> = Vec::new();
    for (col, v) in conds {
        values.push(v.clone());
        clauses.push(format!("{col} = ${}", values.len()));
    }
    if let Some(after) = after {
        values.push(after);
        clauses.push(format!("{key} {cmp} ${}", values.len()));
    }
    let where_ = if clauses.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", clauses.join(" AND "))
    };
    // One more than asked tells whether a next page exists.
    let sql = format!("{select}{where_} ORDER BY {key} {dir} LIMIT {}", limit + 1);
    let params: Vec<&(dyn ToSql + Sync)> =
        values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    let mut items = c.many(&sql, &params, map).await?;
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    Ok((items, more))
}

pub(super) async fn list_devices(
    c: &Rd<'_>,
    f: &DeviceFilter,
    page: &PageRequest,
) -> R<Page<DeviceRecord>> {
    let mut conds: Vec<(&str, String)> = Vec::new();
    if let Some(s) = f.status {
        conds.push(("status", s.as_str().to_string()));
    }
    if let Some(g) = &f.group {
        conds.push(("group_name", g.clone()));
    }
    keyset(c, rows::DEVICE_SELECT, &conds, page, rows::device, |d| d.id).await
}

pub(super) async fn list_enrollment_tokens(
    c: &Rd<'_>,
    f: &EnrollmentTokenFilter,
    page: &PageRequest,
) -> R<Page<EnrollmentTokenRecord>> {
    let mut conds: Vec<(&str, String)> = Vec::new();
    if let Some(k) = f.kind {
        conds.push(("kind", k.as_str().to_string()));
    }
    if let Some(g) = &f.group {
        conds.push(("group_name", g.clone()));
    }
    if let Some(d) = f.device {
        conds.push(("device_id", d.to_string()));
    }
    keyset(
        c,
        rows::ENROLLMENT_TOKEN_SELECT,
        &conds,
        page,
        rows::enrollment_token,
        |t| t.id,
    )
    .await
}

pub(super) async fn enrollment_token_by_hash(
    c: &Rd<'_>,
    hash: &[u8],
) -> R<Option<EnrollmentTokenRecord>> {
    c.one(
        &format!("{} WHERE token_hash = $1", rows::ENROLLMENT_TOKEN_SELECT),
        &[&hash],
        rows::enrollment_token,
    )
    .await
}

pub(super) async fn get_enrollment_token(c: &Rd<'_>, id: Uuid) -> R<Option<EnrollmentTokenRecord>> {
    c.one(
        &format!("{} WHERE id = $1", rows::ENROLLMENT_TOKEN_SELECT),
        &[&id.to_string()],
        rows::enrollment_token,
    )
    .await
}

pub(super) async fn device_for_identity(c: &Rd<'_>, identity: &str) -> R<Option<Uuid>> {
    c.one(
        "SELECT device_id FROM device_identities WHERE identity = $1",
        &[&identity],
        rows::first_uuid,
    )
    .await
}

pub(super) async fn list_certificates(
    c: &Rd<'_>,
    f: &CertificateFilter,
    page: &SerialPageRequest,
) -> R<Page<CertificateRecord, String>> {
    let mut conds: Vec<(&str, String)> = Vec::new();
    if let Some(d) = f.device {
        conds.push(("device_id", d.to_string()));
    }
    if let Some(s) = f.status {
        conds.push(("status", s.as_str().to_string()));
    }
    if let Some(i) = &f.issuer_ca {
        conds.push(("issuer_ca", i.clone()));
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
    )
    .await?;
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
pub(super) async fn expiring_device_certificates(
    c: &Rd<'_>,
    q: &ExpiringQuery,
) -> R<Page<ExpiringCertificate, (i64, String)>> {
    let limit = q.limit.clamp(1, 1000);
    let mut sql = format!(
        "{} WHERE c.status = 'valid' AND d.status = 'active'
           AND c.not_after > $1 AND c.not_after <= $2",
        rows::EXPIRING_SELECT
    );
    if q.unnotified_only {
        sql.push_str(" AND c.renewal_notified_at IS NULL");
    }
    let (after_t, after_s) = match &q.after {
        Some((t, s)) => {
            sql.push_str(" AND (c.not_after > $3 OR (c.not_after = $3 AND c.serial > $4))");
            (*t, s.clone())
        }
        None => (0, String::new()),
    };
    sql.push_str(&format!(
        " ORDER BY c.not_after, c.serial LIMIT {}",
        limit + 1
    ));
    let mut items = if q.after.is_some() {
        c.many(
            &sql,
            &[&q.not_after_from, &q.not_after_to, &after_t, &after_s],
            rows::expiring,
        )
        .await?
    } else {
        c.many(&sql, &[&q.not_after_from, &q.not_after_to], rows::expiring)
            .await?
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

pub(super) async fn certificates_by_spki(c: &Rd<'_>, spki: &str) -> R<Vec<CertificateRecord>> {
    c.many(
        &format!(
            "{} WHERE spki_sha256 = $1 ORDER BY serial",
            rows::CERT_SELECT
        ),
        &[&spki],
        rows::certificate,
    )
    .await
}

pub(super) async fn revoked_certificates(
    c: &Rd<'_>,
    issuer: &str,
    now: i64,
) -> R<Vec<RevokedEntry>> {
    c.many(
        "SELECT serial, revoked_at, revocation_reason FROM certificates
         WHERE issuer_ca = $1 AND status = 'revoked' AND not_after > $2 ORDER BY serial",
        &[&issuer, &now],
        rows::revoked_entry,
    )
    .await
}

pub(super) async fn revoked_certificates_by_key(
    c: &Rd<'_>,
    key_id: Uuid,
    now: i64,
) -> R<Vec<RevokedEntry>> {
    c.many(
        "SELECT serial, revoked_at, revocation_reason FROM certificates
         WHERE issuer_key_id = $1 AND status = 'revoked' AND not_after > $2 ORDER BY serial",
        &[&key_id.to_string(), &now],
        rows::revoked_entry,
    )
    .await
}

pub(super) async fn latest_crl_of_key(
    c: &Rd<'_>,
    issuer: &str,
    key_id: Uuid,
) -> R<Option<CrlRecord>> {
    c.one(
        &format!(
            "{} WHERE issuer_ca = $1 AND issuer_key_id = $2 ORDER BY number DESC LIMIT 1",
            rows::CRL_SELECT
        ),
        &[&issuer, &key_id.to_string()],
        rows::crl,
    )
    .await
}

pub(super) async fn last_expiry_issued_by(c: &Rd<'_>, key_id: Uuid) -> R<Option<i64>> {
    let row = c
        .row(
            "SELECT MAX(not_after) FROM certificates c WHERE issuer_key_id = $1
               AND NOT EXISTS (SELECT 1 FROM service_certificates s WHERE s.serial = c.serial
                               AND (s.retired_at IS NOT NULL OR s.purpose = 'ocsp-signing'))",
            &[&key_id.to_string()],
        )
        .await?;
    get(&row, 0)
}

pub(super) async fn get_rotation(c: &Rd<'_>, id: Uuid) -> R<Option<RotationRecord>> {
    c.one(
        &format!("{} WHERE id = $1", rows::ROTATION_SELECT),
        &[&id.to_string()],
        rows::rotation,
    )
    .await
}

pub(super) async fn list_rotations(
    c: &Rd<'_>,
    open_only: bool,
    limit: u32,
) -> R<Vec<RotationRecord>> {
    c.many(
        &format!(
            "{} WHERE (NOT $1::BOOLEAN OR finished_at IS NULL) ORDER BY id DESC LIMIT $2",
            rows::ROTATION_SELECT
        ),
        &[&open_only, &lim(limit, 1000)],
        rows::rotation,
    )
    .await
}

pub(super) async fn latest_crl(c: &Rd<'_>, issuer: &str) -> R<Option<CrlRecord>> {
    c.one(
        &format!(
            "{} WHERE issuer_ca = $1 ORDER BY number DESC LIMIT 1",
            rows::CRL_SELECT
        ),
        &[&issuer],
        rows::crl,
    )
    .await
}

pub(super) async fn service_certificates(
    c: &Rd<'_>,
    purpose: KeyPurpose,
) -> R<Vec<ServiceCertificateRecord>> {
    c.many(
        &format!(
            "{} WHERE purpose = $1 AND retired_at IS NULL ORDER BY created_at DESC, serial DESC",
            rows::SERVICE_CERT_SELECT
        ),
        &[&purpose.as_str()],
        rows::service_certificate,
    )
    .await
}

pub(super) async fn health(c: &Rd<'_>) -> R<()> {
    c.row("SELECT 1", &[]).await.map(drop)
}

pub(super) async fn get_key(c: &Rd<'_>, id: Uuid) -> R<Option<KeyRecord>> {
    c.one(
        &format!("{} WHERE id = $1", rows::KEY_SELECT),
        &[&id.to_string()],
        rows::key,
    )
    .await
}

pub(super) async fn list_keys(c: &Rd<'_>) -> R<Vec<KeyRecord>> {
    c.many(
        &format!("{} ORDER BY created_at, id", rows::KEY_SELECT),
        &[],
        rows::key,
    )
    .await
}

pub(super) async fn get_ca(c: &Rd<'_>, name: &str) -> R<Option<CaRecord>> {
    c.one(
        &format!("{} WHERE name = $1", rows::CA_SELECT),
        &[&name],
        rows::ca,
    )
    .await
}

pub(super) async fn list_cas(c: &Rd<'_>) -> R<Vec<CaRecord>> {
    c.many(
        &format!("{} ORDER BY created_at, name", rows::CA_SELECT),
        &[],
        rows::ca,
    )
    .await
}

pub(super) async fn admin_by_token_hash(c: &Rd<'_>, hash: &[u8]) -> R<Option<AdminRecord>> {
    c.one(
        &format!("{} WHERE token_hash = $1", rows::ADMIN_SELECT),
        &[&hash],
        rows::admin,
    )
    .await
}

pub(super) async fn get_admin(c: &Rd<'_>, id: Uuid) -> R<Option<AdminRecord>> {
    c.one(
        &format!("{} WHERE id = $1", rows::ADMIN_SELECT),
        &[&id.to_string()],
        rows::admin,
    )
    .await
}

pub(super) async fn admin_by_name(c: &Rd<'_>, name: &str) -> R<Option<AdminRecord>> {
    c.one(
        &format!("{} WHERE name = $1", rows::ADMIN_SELECT),
        &[&name],
        rows::admin,
    )
    .await
}

pub(super) async fn list_admins(c: &Rd<'_>, page: &PageRequest) -> R<Page<AdminRecord>> {
    keyset(c, rows::ADMIN_SELECT, &[], page, rows::admin, |a| a.id).await
}

async fn count_of(c: &Rd<'_>, sql: &str) -> R<i64> {
    let row = c.row(sql, &[]).await?;
    get(&row, 0)
}

pub(super) async fn count_active_admins(c: &Rd<'_>) -> R<u32> {
    let n = count_of(
        c,
        "SELECT COUNT(*) FROM admins WHERE role = 'admin' AND NOT disabled",
    )
    .await?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

pub(super) async fn count_ever_admins(c: &Rd<'_>) -> R<u32> {
    let n = count_of(c, "SELECT COUNT(*) FROM admins WHERE ever_admin").await?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

pub(super) async fn get_registration(c: &Rd<'_>, id: Uuid) -> R<Option<RegistrationRecord>> {
    c.one(
        &format!("{} WHERE id = $1", rows::REGISTRATION_SELECT),
        &[&id.to_string()],
        rows::registration,
    )
    .await
}

pub(super) async fn list_registrations(
    c: &Rd<'_>,
    filter: &RegistrationFilter,
    page: &PageRequest,
) -> R<Page<RegistrationRecord>> {
    let mut conds: Vec<(&str, String)> = Vec::new();
    if let Some(s) = filter.status {
        conds.push(("status", s.as_str().to_string()));
    }
    if let Some(g) = &filter.group {
        conds.push(("group_name", g.clone()));
    }
    keyset(
        c,
        rows::REGISTRATION_SELECT,
        &conds,
        page,
        rows::registration,
        |r| r.id,
    )
    .await
}

pub(super) async fn expired_pending_registrations(
    c: &Rd<'_>,
    now: i64,
    limit: u32,
) -> R<Vec<RegistrationRecord>> {
    c.many(
        &format!(
            "{} WHERE status = 'pending' AND expires_at <= $1 ORDER BY expires_at, id LIMIT $2",
            rows::REGISTRATION_SELECT
        ),
        &[&now, &lim(limit, 10_000)],
        rows::registration,
    )
    .await
}

pub(super) async fn pending_counts(c: &Rd<'_>) -> R<BTreeMap<String, i64>> {
    c.all(
        "SELECT group_name, COUNT(*) FROM registrations WHERE status = 'pending' GROUP BY group_name",
        &[],
    )
    .await?
    .iter()
    .map(|r| Ok((get::<String>(r, 0)?, get::<i64>(r, 1)?)))
    .collect()
}

/// Uses the partial index `registrations_pending_submitted`.
pub(super) async fn pending_registrations_summary(c: &Rd<'_>) -> R<crate::store::PendingSummary> {
    let r = c
        .row(
            "SELECT COUNT(*), MIN(submitted_at) FROM registrations WHERE status = 'pending'",
            &[],
        )
        .await?;
    Ok(crate::store::PendingSummary {
        count: get(&r, 0)?,
        oldest_submitted_at: get(&r, 1)?,
    })
}

/// The condition of an active device certificate; matches the partial
/// index `certificates_active_device_not_after`.
const ACTIVE_DEVICE_CERTIFICATE: &str =
    "status = 'valid' AND device_id IS NOT NULL AND not_after > $1";

pub(super) async fn certificate_expiry_counts(
    c: &Rd<'_>,
    now: i64,
    within_secs: &[i64],
) -> R<crate::store::ExpiryCounts> {
    let bounded = format!(
        "SELECT COUNT(*) FROM certificates WHERE {ACTIVE_DEVICE_CERTIFICATE} AND not_after <= $2"
    );
    let mut within = Vec::with_capacity(within_secs.len());
    for b in within_secs {
        let upper = now.saturating_add(*b);
        let r = c.row(&bounded, &[&now, &upper]).await?;
        within.push(get(&r, 0)?);
    }
    let r = c
        .row(
            &format!("SELECT COUNT(*) FROM certificates WHERE {ACTIVE_DEVICE_CERTIFICATE}"),
            &[&now],
        )
        .await?;
    Ok(crate::store::ExpiryCounts {
        within,
        active: get(&r, 0)?,
    })
}

pub(super) async fn approvals(c: &Rd<'_>, registration: Uuid) -> R<Vec<ApprovalRecord>> {
    c.many(
        "SELECT ap.registration_id, ap.admin_id, ap.decision, ap.comment, ap.decided_at, NOT ad.disabled, ad.role
         FROM approvals ap JOIN admins ad ON ad.id = ap.admin_id
         WHERE ap.registration_id = $1 ORDER BY ap.decided_at, ap.admin_id",
        &[&registration.to_string()],
        rows::approval,
    )
    .await
}

pub(super) async fn get_admin_request(c: &Rd<'_>, id: Uuid) -> R<Option<AdminRequestRecord>> {
    c.one(
        &format!("{} WHERE id = $1", rows::ADMIN_REQUEST_SELECT),
        &[&id.to_string()],
        rows::admin_request,
    )
    .await
}

pub(super) async fn list_admin_requests(
    c: &Rd<'_>,
    status: Option<AdminRequestStatus>,
    page: &PageRequest,
) -> R<Page<AdminRequestRecord>> {
    let conds: Vec<(&str, String)> = status
        .map(|s| vec![("status", s.as_str().to_string())])
        .unwrap_or_default();
    keyset(
        c,
        rows::ADMIN_REQUEST_SELECT,
        &conds,
        page,
        rows::admin_request,
        |r| r.id,
    )
    .await
}

pub(super) async fn get_device(c: &Rd<'_>, id: Uuid) -> R<Option<DeviceRecord>> {
    c.one(
        &format!("{} WHERE id = $1", rows::DEVICE_SELECT),
        &[&id.to_string()],
        rows::device,
    )
    .await
}

pub(super) async fn renewal_allowance(
    c: &Rd<'_>,
    device: Uuid,
) -> R<Option<RenewalAllowanceRecord>> {
    c.one(
        "SELECT device_id, granted_by, granted_at, expires_at FROM renewal_allowances WHERE device_id = $1",
        &[&device.to_string()],
        rows::renewal_allowance,
    )
    .await
}

pub(super) async fn pending_broker_updates(
    c: &Rd<'_>,
    now: i64,
    limit: u32,
) -> R<Vec<BrokerOutboxRecord>> {
    c.many(
        &format!(
            "{} WHERE next_attempt_at <= $1 ORDER BY id LIMIT $2",
            rows::BROKER_OUTBOX_SELECT
        ),
        &[&now, &lim(limit, 1000)],
        rows::broker_outbox,
    )
    .await
}

pub(super) async fn broker_update_for_device(
    c: &Rd<'_>,
    device: Uuid,
) -> R<Option<BrokerOutboxRecord>> {
    c.one(
        &format!("{} WHERE device_id = $1", rows::BROKER_OUTBOX_SELECT),
        &[&device.to_string()],
        rows::broker_outbox,
    )
    .await
}

pub(super) async fn broker_outbox_len(c: &Rd<'_>) -> R<i64> {
    count_of(c, "SELECT COUNT(*) FROM broker_outbox").await
}

/// Serials are stored upper-case; any case finds them.
pub(super) async fn get_certificate(c: &Rd<'_>, serial: &str) -> R<Option<CertificateRecord>> {
    c.one(
        &format!("{} WHERE serial = $1", rows::CERT_SELECT),
        &[&serial.to_uppercase()],
        rows::certificate,
    )
    .await
}

const AUDIT_SELECT: &str = "SELECT seq, at_ms, actor, action, target, outcome, details, prev_hash, hash, version, source, sealed
         FROM audit_events";

pub(super) async fn audit_events(c: &Rd<'_>, q: &AuditQuery) -> R<Vec<AuditEvent>> {
    c.many(
        &format!("{AUDIT_SELECT} WHERE seq >= $1 ORDER BY seq LIMIT $2"),
        &[&q.from_seq, &i64::from(q.limit)],
        rows::audit,
    )
    .await
}

/// One bound value of [`audit_report`].
enum Arg {
    Int(i64),
    Text(String),
}

/// Audit events matching `q` (see [`crate::store::Store::audit_report`]).
/// Every filter is a bound parameter; the action prefix form is a range
/// compared in the "C" collation (`action >= 'key.' AND action < 'key/'`,
/// `/` sorting right after `.` byte-wise, whatever the database's locale).
pub(super) async fn audit_report(c: &Rd<'_>, q: &AuditFilter) -> R<Page<AuditEvent, i64>> {
    let limit = q.limit.clamp(1, 1000);
    if let (Some(s), Some(u)) = (q.since_ms, q.until_ms)
        && s >= u
    {
        return Err(StoreError::InvalidArgument(
            "the report's start is not before its end",
        ));
    }
    let mut clauses: Vec<String> = Vec::new();
    let mut args: Vec<Arg> = Vec::new();
    let mut push = |clause: &str, a: Arg, clauses: &mut Vec<String>| {
        args.push(a);
        clauses.push(clause.replace('?', &format!("${}", args.len())));
    };
    if let Some(s) = q.since_ms {
        push("at_ms >= ?", Arg::Int(s), &mut clauses);
    }
    if let Some(u) = q.until_ms {
        push("at_ms < ?", Arg::Int(u), &mut clauses);
    }
    if let Some(a) = &q.actor {
        push("actor = ?", Arg::Text(a.clone()), &mut clauses);
    }
    if let Some(a) = &q.action {
        match crate::store::audit_action_filter(a)? {
            ActionMatch::Exact(a) => push("action = ?", Arg::Text(a.to_string()), &mut clauses),
            ActionMatch::Prefix(p) => {
                push(
                    "action COLLATE \"C\" >= ?",
                    Arg::Text(p.to_string()),
                    &mut clauses,
                );
                // The prefix ends with '.'; '/' is the next byte.
                let mut end = p[..p.len() - 1].to_string();
                end.push('/');
                push("action COLLATE \"C\" < ?", Arg::Text(end), &mut clauses);
            }
        }
    }
    if let Some(t) = &q.target {
        push("target = ?", Arg::Text(t.clone()), &mut clauses);
    }
    let (cmp, dir) = match q.order {
        Order::NewestFirst => ("seq < ?", "DESC"),
        Order::OldestFirst => ("seq > ?", "ASC"),
    };
    if let Some(after) = q.after {
        push(cmp, Arg::Int(after), &mut clauses);
    }
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    let sql = format!(
        "{AUDIT_SELECT} {filter} ORDER BY seq {dir} LIMIT {}",
        i64::from(limit) + 1
    );
    let params: Vec<&(dyn ToSql + Sync)> = args
        .iter()
        .map(|a| match a {
            Arg::Int(i) => i as &(dyn ToSql + Sync),
            Arg::Text(t) => t as &(dyn ToSql + Sync),
        })
        .collect();
    let mut items = c.many(&sql, &params, rows::audit).await?;
    let next = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|e| e.seq)
    } else {
        None
    };
    Ok(Page { items, next })
}

pub(super) async fn audit_head(c: &Rd<'_>) -> R<(i64, Vec<u8>)> {
    head_of(c).await
}

/// The chain's last (seq, hash), or (0, genesis) when empty.
pub(super) async fn head_of<C: tokio_postgres::GenericClient + Sync>(
    c: &Db<'_, C>,
) -> R<(i64, Vec<u8>)> {
    let row = c
        .opt(
            "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await?;
    match row {
        Some(r) => Ok((get(&r, 0)?, get(&r, 1)?)),
        None => Ok((0, GENESIS_HASH.to_vec())),
    }
}

pub(super) async fn audit_checkpoints(c: &Rd<'_>, from_seq: i64, limit: u32) -> R<Vec<Checkpoint>> {
    c.many(
        "SELECT seq, hash, at_ms, key_id, signature FROM audit_checkpoints
         WHERE seq >= $1 ORDER BY seq LIMIT $2",
        &[&from_seq, &i64::from(limit)],
        rows::checkpoint,
    )
    .await
}

pub(super) async fn last_audit_checkpoint(c: &Rd<'_>) -> R<Option<Checkpoint>> {
    c.one(
        "SELECT seq, hash, at_ms, key_id, signature FROM audit_checkpoints ORDER BY seq DESC LIMIT 1",
        &[],
        rows::checkpoint,
    )
    .await
}

pub(super) async fn audit_data_keys(c: &Rd<'_>) -> R<Vec<AuditDataKeyRecord>> {
    c.many(
        "SELECT id, key_id, wrapped, created_at FROM audit_data_keys ORDER BY id",
        &[],
        rows::audit_data_key,
    )
    .await
}

pub(super) async fn lease_holder(c: &Rd<'_>, name: &str, now_ms: i64) -> R<Option<String>> {
    match c
        .opt(
            "SELECT holder FROM leases WHERE name = $1 AND expires_at > $2",
            &[&name, &now_ms],
        )
        .await?
    {
        Some(r) => Ok(Some(get(&r, 0)?)),
        None => Ok(None),
    }
}

pub(super) async fn counts(c: &Rd<'_>) -> R<BTreeMap<String, i64>> {
    let mut out = BTreeMap::new();
    for t in TABLES {
        let n = count_of(c, &format!("SELECT COUNT(*) FROM {t}")).await?;
        out.insert(t.to_string(), n);
    }
    Ok(out)
}

pub(super) async fn list_backups(
    c: &Rd<'_>,
    include_pruned: bool,
    limit: u32,
) -> R<Vec<BackupRecord>> {
    let mut backups = c
        .many(
            &format!(
                "{} WHERE ($1::BOOLEAN OR pruned_at IS NULL) ORDER BY id DESC LIMIT $2",
                rows::BACKUP_SELECT
            ),
            &[&include_pruned, &lim(limit, 10_000)],
            rows::backup,
        )
        .await?;
    for b in &mut backups {
        b.replicas = replicas_of(c, b.id).await?;
    }
    Ok(backups)
}

pub(super) async fn get_backup(c: &Rd<'_>, id: Uuid) -> R<Option<BackupRecord>> {
    let Some(mut b) = c
        .one(
            &format!("{} WHERE id = $1", rows::BACKUP_SELECT),
            &[&id.to_string()],
            rows::backup,
        )
        .await?
    else {
        return Ok(None);
    };
    b.replicas = replicas_of(c, b.id).await?;
    Ok(Some(b))
}

async fn replicas_of(c: &Rd<'_>, id: Uuid) -> R<Vec<ReplicaRecord>> {
    c.many(
        &format!(
            "{} WHERE backup_id = $1 ORDER BY location",
            rows::REPLICA_SELECT
        ),
        &[&id.to_string()],
        rows::replica,
    )
    .await
}

pub(super) async fn due_replicas(c: &Rd<'_>, now: i64) -> R<Vec<ReplicaRecord>> {
    c.many(
        &format!(
            "{} WHERE state IN ('pending', 'failed') AND next_attempt_at <= $1 ORDER BY backup_id, location",
            rows::REPLICA_SELECT
        ),
        &[&now],
        rows::replica,
    )
    .await
}
