//! The admin roster: invitations, role changes and the requests a second
//! admin approves (see `auth::requests` for the rules).

use super::parse_id;
use crate::auth::Role;
use crate::auth::requests::RoleChange;
use crate::clock::{from_unix, rfc3339};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::extract::{Admin, ApiJson, ApiQuery, ClientAddr};
use crate::http::page::{PageView, page_request, status_filter};
use crate::http::views::AdminView;
use crate::model::AdminRequestStatus;
use crate::store::AdminRequestRecord;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
pub struct AdminRequestView {
    id: String,
    kind: String,
    name: String,
    role: String,
    status: String,
    requested_by: String,
    decided_by: Option<String>,
    admin_id: Option<String>,
    client_addr: Option<String>,
    created_at: String,
    expires_at: String,
    decided_at: Option<String>,
    redeemed_at: Option<String>,
}

impl From<&AdminRequestRecord> for AdminRequestView {
    fn from(r: &AdminRequestRecord) -> Self {
        Self {
            id: r.id.to_string(),
            kind: r.kind.to_string(),
            name: r.name.clone(),
            role: r.role.to_string(),
            status: r.status.to_string(),
            requested_by: r.requested_by.to_string(),
            decided_by: r.decided_by.map(|u| u.to_string()),
            admin_id: r.admin_id.map(|u| u.to_string()),
            client_addr: r.client_addr.clone(),
            created_at: rfc3339(from_unix(r.created_at)),
            expires_at: rfc3339(from_unix(r.expires_at)),
            decided_at: r.decided_at.map(|t| rfc3339(from_unix(t))),
            redeemed_at: r.redeemed_at.map(|t| rfc3339(from_unix(t))),
        }
    }
}

fn parse_role(s: &str) -> Result<Role, ApiError> {
    s.parse()
        .map_err(|e: String| ApiError::bad_request("invalid_field", e))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InviteBody {
    name: String,
    role: String,
}

#[derive(Serialize)]
pub struct InvitationResponse {
    #[serde(flatten)]
    request: AdminRequestView,
    /// Give to the invitee. Shown once.
    invitation_code: String,
    /// Whether a second admin must approve before the invitee can redeem.
    second_admin_required: bool,
}

/// `POST /v1/admin/invitations` (role admin): invite an admin.
pub async fn invite(
    State(state): State<AppState>,
    admin: Admin,
    client: ClientAddr,
    ApiJson(body): ApiJson<InviteBody>,
) -> Result<(StatusCode, Json<InvitationResponse>), ApiError> {
    let me = admin.require(Role::Admin)?;
    let role = parse_role(&body.role)?;
    let inv = state
        .admins
        .invite(me, &body.name, role, client.as_string().as_deref())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(InvitationResponse {
            second_admin_required: inv.request.status == AdminRequestStatus::Pending,
            request: AdminRequestView::from(&inv.request),
            invitation_code: inv.code.expose_secret().to_string(),
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedeemBody {
    invitation_code: String,
    #[serde(default)]
    approval_code: Option<String>,
}

#[derive(Serialize)]
pub struct Redeemed {
    #[serde(flatten)]
    admin: AdminView,
    /// The new admin's own token. Shown once, only to the redeemer.
    token: String,
}

/// `POST /v1/invitations/redeem` (no token: the invitee has none yet).
pub async fn redeem(
    State(state): State<AppState>,
    client: ClientAddr,
    ApiJson(body): ApiJson<RedeemBody>,
) -> Result<(StatusCode, Json<Redeemed>), ApiError> {
    let (record, token) = state
        .login
        .redeem(
            &body.invitation_code,
            body.approval_code.as_deref(),
            client.0,
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(Redeemed {
            admin: AdminView::from(&record),
            token: token.expose_secret().to_string(),
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleBody {
    role: String,
}

#[derive(Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum RoleResponse {
    Applied { admin: AdminView },
    Pending { request: Box<AdminRequestView> },
}

/// `POST /v1/admin/admins/{id}/role` (role admin): 200 when applied, 202
/// when a second admin must approve.
pub async fn set_role(
    State(state): State<AppState>,
    admin: Admin,
    client: ClientAddr,
    Path(who): Path<String>,
    ApiJson(body): ApiJson<RoleBody>,
) -> Result<(StatusCode, Json<RoleResponse>), ApiError> {
    let me = admin.require(Role::Admin)?;
    let role = parse_role(&body.role)?;
    let change = state
        .admins
        .set_role(me, &who, role, client.as_string().as_deref())
        .await?;
    if let RoleChange::Applied(a) = &change {
        state
            .invalidate(crate::cache::Invalidation::Admin { id: a.id })
            .await;
    }
    Ok(match change {
        RoleChange::Applied(a) => (
            StatusCode::OK,
            Json(RoleResponse::Applied {
                admin: AdminView::from(&a),
            }),
        ),
        RoleChange::Pending(r) => (
            StatusCode::ACCEPTED,
            Json(RoleResponse::Pending {
                request: Box::new(AdminRequestView::from(&r)),
            }),
        ),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestsQuery {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    order: Option<String>,
}

/// `GET /v1/admin/requests?status=&cursor=&limit=&order=` (role admin).
pub async fn list_requests(
    State(state): State<AppState>,
    admin: Admin,
    ApiQuery(q): ApiQuery<RequestsQuery>,
) -> Result<Json<PageView<AdminRequestView>>, ApiError> {
    admin.require(Role::Admin)?;
    let status = status_filter(
        q.status.as_deref(),
        AdminRequestStatus::parse,
        "pending, approved, redeemed, denied, expired",
    )?;
    let page = page_request(q.cursor.as_deref(), q.limit, q.order.as_deref())?;
    let requests = state.admins.requests(status, &page).await?;
    Ok(Json(PageView::map(requests, |r| AdminRequestView::from(r))))
}

#[derive(Serialize)]
pub struct DecidedResponse {
    #[serde(flatten)]
    request: AdminRequestView,
    /// For an approved invitation: give to the invitee too. Shown once.
    #[serde(skip_serializing_if = "Option::is_none")]
    approval_code: Option<String>,
}

async fn decide(
    state: AppState,
    admin: Admin,
    client: ClientAddr,
    id: String,
    approve: bool,
) -> Result<Json<DecidedResponse>, ApiError> {
    let me = admin.require(Role::Admin)?;
    let id = parse_id(&id)?;
    let decided = state
        .admins
        .decide_request(me, id, approve, client.as_string().as_deref())
        .await?;
    // An approved role change took effect now.
    if let Some(target) = decided.request.admin_id.filter(|_| approve) {
        state
            .invalidate(crate::cache::Invalidation::Admin { id: target })
            .await;
    }
    Ok(Json(DecidedResponse {
        request: AdminRequestView::from(&decided.request),
        approval_code: decided.approval_code.map(|c| c.expose_secret().to_string()),
    }))
}

/// `POST /v1/admin/requests/{id}/approve` (role admin, not the requester).
pub async fn approve_request(
    State(state): State<AppState>,
    admin: Admin,
    client: ClientAddr,
    Path(id): Path<String>,
) -> Result<Json<DecidedResponse>, ApiError> {
    decide(state, admin, client, id, true).await
}

/// `POST /v1/admin/requests/{id}/deny` (role admin, not the requester).
pub async fn deny_request(
    State(state): State<AppState>,
    admin: Admin,
    client: ClientAddr,
    Path(id): Path<String>,
) -> Result<Json<DecidedResponse>, ApiError> {
    decide(state, admin, client, id, false).await
}
