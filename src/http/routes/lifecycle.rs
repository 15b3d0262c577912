//! Admin endpoints for devices and certificates: listings, revocation,
//! suspension, holds and early-renewal allowances. Reads take any admin
//! role; changes take role `admin`.

use super::parse_id;
use crate::auth::Role;
use crate::ca::DeviceChanged;
use crate::clock::{from_unix, rfc3339};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::extract::{Admin, ApiQuery, ClientAddr};
use crate::http::page::{PageView, page_request, status_filter};
use crate::http::views::{CertificateView, DeviceView};
use crate::model::RevocationReason;
use crate::store::{
    CertificateFilter, CertificateStatus, DeviceFilter, DeviceStatus, SerialPageRequest,
};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Bodies of the action routes are optional: an empty body means defaults.
fn optional_body<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))
}

fn reason(
    value: Option<&str>,
    default: Option<RevocationReason>,
) -> Result<RevocationReason, ApiError> {
    match value {
        Some(s) => RevocationReason::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_reason",
                format!(
                    "unknown revocation reason `{s}` ({})",
                    RevocationReason::ALL.map(|r| r.as_str()).join(", ")
                ),
            )
        }),
        None => {
            default.ok_or_else(|| ApiError::bad_request("invalid_reason", "`reason` is required"))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceListQuery {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    order: Option<String>,
}

/// `GET /v1/admin/devices?status=&group=&cursor=&limit=&order=`.
pub async fn list_devices(
    State(state): State<AppState>,
    admin: Admin,
    ApiQuery(q): ApiQuery<DeviceListQuery>,
) -> Result<Json<PageView<DeviceView>>, ApiError> {
    admin.require(Role::Auditor)?;
    let status = status_filter(
        q.status.as_deref(),
        DeviceStatus::parse,
        "active, suspended, revoked",
    )?;
    let page = page_request(q.cursor.as_deref(), q.limit, q.order.as_deref())?;
    let filter = DeviceFilter {
        status,
        group: q.group.filter(|g| !g.is_empty()),
    };
    let devices = state.store.list_devices(&filter, &page).await?;
    Ok(Json(PageView::map(devices, |d| DeviceView::from(d))))
}

#[derive(Serialize)]
pub struct AllowanceView {
    granted_by: String,
    granted_at: String,
    expires_at: String,
}

#[derive(Serialize)]
pub struct DeviceDetail {
    #[serde(flatten)]
    device: DeviceView,
    /// Newest first.
    certificates: Vec<CertificateView>,
    /// An open early-renewal allowance, if any.
    renewal_allowance: Option<AllowanceView>,
}

/// `GET /v1/admin/devices/{id}`: the device and its certificates.
pub async fn show_device(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<DeviceDetail>, ApiError> {
    admin.require(Role::Auditor)?;
    let id = parse_id(&id)?;
    let device = state
        .store
        .get_device(id)
        .await?
        .ok_or(crate::ca::LifecycleError::DeviceNotFound)?;
    let certificates = state.ca.device_certificates(id).await?;
    let now = state.ca.now();
    let allowance = state
        .store
        .renewal_allowance(id)
        .await?
        .filter(|a| a.expires_at > now);
    Ok(Json(DeviceDetail {
        device: DeviceView::from(&device),
        certificates: certificates.iter().map(CertificateView::from).collect(),
        renewal_allowance: allowance.map(|a| AllowanceView {
            granted_by: format!("admin:{}", a.granted_by),
            granted_at: rfc3339(from_unix(a.granted_at)),
            expires_at: rfc3339(from_unix(a.expires_at)),
        }),
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    /// RFC 5280 reason name (`key-compromise` or `keyCompromise`).
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    comment: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CommentBody {
    #[serde(default)]
    comment: Option<String>,
}

#[derive(Serialize)]
pub struct DeviceChangeResponse {
    #[serde(flatten)]
    device: DeviceView,
    /// Serials of the device's unexpired certificates the change carried along.
    certificates: Vec<String>,
    /// The device's broker ACL update: `done`, `pending` (committed and
    /// queued; the broker did not confirm in time, keyward keeps retrying)
    /// or `not-configured`.
    broker: &'static str,
}

/// The response once the broker update the change queued has been applied,
/// or `broker.flush_timeout_secs` has passed. The change itself is
/// committed either way (a revocation cannot wait for a broker).
async fn device_change(state: &AppState, c: DeviceChanged) -> Json<DeviceChangeResponse> {
    let broker = state
        .broker
        .flush_device(c.device.id, state.broker.flush_timeout())
        .await;
    Json(DeviceChangeResponse {
        device: DeviceView::from(&c.device),
        certificates: c.serials.into_values().flatten().collect(),
        broker: broker.as_str(),
    })
}

/// `POST /v1/admin/devices/{id}/revoke` `{"reason", "comment"}` (reason
/// defaults to `unspecified`; `certificate-hold` is refused: suspend).
pub async fn revoke_device(
    State(state): State<AppState>,
    admin: Admin,
    client: ClientAddr,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<DeviceChangeResponse>, ApiError> {
    let me = admin.require(Role::Admin)?;
    let id = parse_id(&id)?;
    let body: RevokeBody = optional_body(&body)?;
    let reason = reason(body.reason.as_deref(), Some(RevocationReason::Unspecified))?;
    let changed = state
        .ca
        .revoke_device(
            me,
            id,
            reason,
            body.comment.as_deref(),
            client.as_string().as_deref(),
        )
        .await?;
    state
        .invalidate(crate::cache::Invalidation::Device { id })
        .await;
    Ok(device_change(&state, changed).await)
}

/// `POST /v1/admin/devices/{id}/suspend` `{"comment"}`.
pub async fn suspend_device(
    State(state): State<AppState>,
    admin: Admin,
    client: ClientAddr,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<DeviceChangeResponse>, ApiError> {
    let me = admin.require(Role::Admin)?;
    let id = parse_id(&id)?;
    let body: CommentBody = optional_body(&body)?;
    let changed = state
        .ca
        .suspend_device(
            me,
            id,
            body.comment.as_deref(),
            client.as_string().as_deref(),
        )
        .await?;
    state
        .invalidate(crate::cache::Invalidation::Device { id })
        .await;
    Ok(device_change(&state, changed).await)
}

/// `POST /v1/admin/devices/{id}/resume` `{"comment"}`.
pub async fn resume_device(
    State(state): State<AppState>,
    admin: Admin,
    client: ClientAddr,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<DeviceChangeResponse>, ApiError> {
    let me = admin.require(Role::Admin)?;
    let id = parse_id(&id)?;
    let body: CommentBody = optional_body(&body)?;
    let changed = state
        .ca
        .resume_device(
            me,
            id,
            body.comment.as_deref(),
            client.as_string().as_deref(),
        )
        .await?;
    state
        .invalidate(crate::cache::Invalidation::Device { id })
        .await;
    Ok(device_change(&state, changed).await)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AllowRenewalBody {
    /// How long the allowance may be used, 1..=720 hours (default 24).
    #[serde(default)]
    valid_for_hours: Option<u32>,
    #[serde(default)]
    comment: Option<String>,
}

#[derive(Serialize)]
pub struct AllowRenewalResponse {
    device_id: String,
    expires_at: String,
}

/// `POST /v1/admin/devices/{id}/allow-renewal` `{"valid_for_hours", "comment"}`:
/// the device may renew once before its renewal window opens.
pub async fn allow_renewal(
    State(state): State<AppState>,
    admin: Admin,
    client: ClientAddr,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<AllowRenewalResponse>, ApiError> {
    let me = admin.require(Role::Admin)?;
    let id = parse_id(&id)?;
    let body: AllowRenewalBody = optional_body(&body)?;
    let hours = body.valid_for_hours.unwrap_or(24);
    if !(1..=720).contains(&hours) {
        return Err(ApiError::bad_request(
            "invalid_field",
            "`valid_for_hours` must be 1-720",
        ));
    }
    let a = state
        .ca
        .allow_renewal(
            me,
            id,
            i64::from(hours) * 3600,
            body.comment.as_deref(),
            client.as_string().as_deref(),
        )
        .await?;
    Ok(Json(AllowRenewalResponse {
        device_id: a.device_id.to_string(),
        expires_at: rfc3339(from_unix(a.expires_at)),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertListQuery {
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    order: Option<String>,
}

/// `GET /v1/admin/certs?device=&status=&issuer=&cursor=&limit=&order=`:
/// keyset-paginated by serial (serials are time-ordered).
pub async fn list_certificates(
    State(state): State<AppState>,
    admin: Admin,
    ApiQuery(q): ApiQuery<CertListQuery>,
) -> Result<Json<PageView<CertificateView>>, ApiError> {
    admin.require(Role::Auditor)?;
    let status = status_filter(
        q.status.as_deref(),
        CertificateStatus::parse,
        "valid, revoked, superseded",
    )?;
    let device = match q.device.as_deref() {
        None | Some("") => None,
        Some(d) => Some(
            uuid::Uuid::parse_str(d)
                .map_err(|_| ApiError::bad_request("invalid_query", "`device` is not a UUID"))?,
        ),
    };
    // The UUID cursor rules of the other lists, then a serial cursor.
    let page = page_request(None, q.limit, q.order.as_deref())?;
    let after = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) if c.len() <= 64 && c.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(c.to_ascii_uppercase())
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "`cursor` is not a cursor this server issued",
            ));
        }
    };
    let filter = CertificateFilter {
        device,
        status,
        issuer_ca: q.issuer.filter(|i| !i.is_empty()),
    };
    let certs = state
        .store
        .list_certificates(
            &filter,
            &SerialPageRequest {
                after,
                limit: page.limit,
                order: page.order,
            },
        )
        .await?;
    Ok(Json(PageView {
        items: certs.items.iter().map(CertificateView::from).collect(),
        next_cursor: certs.next,
    }))
}

/// Most `within` accepted: ten years.
const MAX_WITHIN_SECS: i64 = 3650 * 86_400;

/// `30d`, `12h`, `90m`: a positive count and one unit, at most ten years.
fn parse_within(text: &str) -> Result<i64, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "invalid_within",
            format!(
                "`within` must be a positive number of days, hours or minutes such as 30d, 12h or 90m (at most 3650d), not `{text}`"
            ),
        )
    };
    let Some(unit) = text.chars().last() else {
        return Err(bad());
    };
    let num = &text[..text.len() - unit.len_utf8()];
    let mult = match unit {
        'd' => 86_400,
        'h' => 3_600,
        'm' => 60,
        _ => return Err(bad()),
    };
    if num.is_empty() || num.len() > 9 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: i64 = num.parse().map_err(|_| bad())?;
    match n.checked_mul(mult) {
        Some(s) if s > 0 && s <= MAX_WITHIN_SECS => Ok(s),
        _ => Err(bad()),
    }
}

/// `NOTAFTER.SERIAL`, the keyset cursor of the expiring report.
fn expiring_cursor(text: &str) -> Result<(i64, String), ApiError> {
    let bad = || {
        ApiError::bad_request(
            "invalid_query",
            "`cursor` is not a cursor this server issued",
        )
    };
    let (t, serial) = text.split_once('.').ok_or_else(bad)?;
    let t: i64 = t.parse().map_err(|_| bad())?;
    if serial.is_empty() || serial.len() > 64 || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok((t, serial.to_ascii_uppercase()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpiringQueryParams {
    within: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

#[derive(Serialize)]
pub struct ExpiringView {
    serial: String,
    device_id: String,
    device_name: String,
    group: String,
    issuer: String,
    not_after: String,
    /// When the device's renewal window opens(ed); `null` when its group's
    /// profile is gone from the policies.
    window_opens_at: Option<String>,
    /// The renewal window is open: the device may (and should) renew.
    renewal_due: bool,
    /// When the `device.renewal_due` notification went out.
    notified_at: Option<String>,
}

/// `GET /v1/admin/certs/expiring?within=30d&cursor=&limit=`: valid
/// certificates of active devices that expire within `within` (expired
/// ones excluded), soonest first, keyset-paginated on (notAfter, serial).
pub async fn list_expiring(
    State(state): State<AppState>,
    admin: Admin,
    ApiQuery(q): ApiQuery<ExpiringQueryParams>,
) -> Result<Json<PageView<ExpiringView>>, ApiError> {
    admin.require(Role::Auditor)?;
    let within = parse_within(q.within.as_deref().unwrap_or("30d"))?;
    let page = page_request(None, q.limit, None)?;
    let after = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(expiring_cursor(c)?),
    };
    let now = state.ca.now();
    let certs = state
        .store
        .expiring_device_certificates(&crate::store::ExpiringQuery {
            not_after_from: now,
            not_after_to: now.saturating_add(within),
            unnotified_only: false,
            after,
            limit: page.limit,
        })
        .await?;
    let policies = state.ca.policies();
    let items = certs
        .items
        .iter()
        .map(|c| {
            let hint = crate::ca::renewal::renewal_window_secs(&policies, &c.group)
                .map(|w| crate::ca::RenewalHint::new(c.not_after, w, now));
            ExpiringView {
                serial: c.serial.clone(),
                device_id: c.device_id.to_string(),
                device_name: c.device_name.clone(),
                group: c.group.clone(),
                issuer: c.issuer_ca.clone(),
                not_after: rfc3339(from_unix(c.not_after)),
                window_opens_at: hint.map(|h| rfc3339(from_unix(h.window_opens_at))),
                renewal_due: hint.is_some_and(|h| h.due),
                notified_at: c.renewal_notified_at.map(|t| rfc3339(from_unix(t))),
            }
        })
        .collect();
    Ok(Json(PageView {
        items,
        next_cursor: certs.next.map(|(t, s)| format!("{t}.{s}")),
    }))
}

#[derive(Serialize)]
pub struct CertificateDetail {
    #[serde(flatten)]
    certificate: CertificateView,
    certificate_pem: String,
}

async fn detail(state: &AppState, serial: &str) -> Result<Json<CertificateDetail>, ApiError> {
    let c = state.ca.certificate(serial).await?;
    let pem = crate::ca::x509::to_pem(&c.der)
        .map_err(|e| ApiError::from(crate::ca::CaError::Encoding(e)))?;
    Ok(Json(CertificateDetail {
        certificate: CertificateView::from(&c),
        certificate_pem: pem,
    }))
}

/// `GET /v1/admin/certs/{serial}`.
pub async fn show_certificate(
    State(state): State<AppState>,
    admin: Admin,
    Path(serial): Path<String>,
) -> Result<Json<CertificateDetail>, ApiError> {
    admin.require(Role::Auditor)?;
    detail(&state, &serial).await
}

/// `POST /v1/admin/certs/{serial}/revoke` `{"reason", "comment"}`: any
/// reason, `certificate-hold` included (a hold on this certificate).
pub async fn revoke_certificate(
    State(state): State<AppState>,
    admin: Admin,
    client: ClientAddr,
    Path(serial): Path<String>,
    body: Bytes,
) -> Result<Json<CertificateDetail>, ApiError> {
    let me = admin.require(Role::Admin)?;
    let body: RevokeBody = optional_body(&body)?;
    let reason = reason(body.reason.as_deref(), None)?;
    let c = state
        .ca
        .revoke_certificate(
            me,
            &serial,
            reason,
            body.comment.as_deref(),
            client.as_string().as_deref(),
        )
        .await?;
    detail(&state, &c.serial).await
}

/// `POST /v1/admin/certs/{serial}/release-hold` `{"comment"}`.
pub async fn release_hold(
    State(state): State<AppState>,
    admin: Admin,
    client: ClientAddr,
    Path(serial): Path<String>,
    body: Bytes,
) -> Result<Json<CertificateDetail>, ApiError> {
    let me = admin.require(Role::Admin)?;
    let body: CommentBody = optional_body(&body)?;
    let c = state
        .ca
        .release_certificate_hold(
            me,
            &serial,
            body.comment.as_deref(),
            client.as_string().as_deref(),
        )
        .await?;
    detail(&state, &c.serial).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_takes_days_hours_minutes_only() {
        assert_eq!(parse_within("30d").unwrap(), 30 * 86_400);
        assert_eq!(parse_within("12h").unwrap(), 12 * 3_600);
        assert_eq!(parse_within("90m").unwrap(), 90 * 60);
        assert_eq!(parse_within("3650d").unwrap(), MAX_WITHIN_SECS);
        for bad in [
            "",
            "d",
            "30",
            "30s",
            "0d",
            "-1d",
            "+1d",
            "1.5d",
            "30D",
            " 30d",
            "30d ",
            "3651d",
            "99999999999d",
            "1w",
            "3\u{0663}d",
            "30\u{e9}",
            "\u{e9}",
        ] {
            let e = parse_within(bad).unwrap_err();
            assert_eq!(e.code, "invalid_within", "{bad:?}");
        }
    }

    #[test]
    fn expiring_cursors_round_trip_and_refuse_garbage() {
        assert_eq!(
            expiring_cursor("1900000000.0a1b").unwrap(),
            (1_900_000_000, "0A1B".to_string())
        );
        for bad in ["", "1900000000", "x.0A", "1.", "1.zz", "1.0A.0B"] {
            assert!(expiring_cursor(bad).is_err(), "{bad:?}");
        }
    }
}
