//! Admin endpoints: registrations queue, decisions, admin accounts.

use super::parse_id;
use crate::auth::Role;
use crate::clock::{from_unix, rfc3339};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::extract::{Admin, ApiQuery, ClientAddr};
use crate::http::page::{PageView, page_in_memory, page_request, status_filter};
use crate::http::views::{AdminView, ApprovalView, RegistrationView};
use crate::store::{Decision, RegistrationFilter, RegistrationStatus};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
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

/// `GET /v1/admin/registrations?status=&group=&cursor=&limit=&order=`:
/// newest first by default, keyset-paginated.
pub async fn list_registrations(
    State(state): State<AppState>,
    admin: Admin,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<PageView<RegistrationView>>, ApiError> {
    admin.require(Role::Auditor)?;
    let status = status_filter(
        q.status.as_deref(),
        RegistrationStatus::parse,
        "pending, approved, issued, denied, expired",
    )?;
    let page = page_request(q.cursor.as_deref(), q.limit, q.order.as_deref())?;
    let filter = RegistrationFilter {
        status,
        group: q.group.filter(|g| !g.is_empty()),
    };
    let regs = state.registry.list(&filter, &page).await?;
    Ok(Json(PageView::map(regs, |r| RegistrationView::from(r))))
}

#[derive(Serialize)]
pub struct RegistrationDetail {
    #[serde(flatten)]
    registration: RegistrationView,
    approvals: Vec<ApprovalView>,
}

pub async fn show_registration(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<RegistrationDetail>, ApiError> {
    admin.require(Role::Auditor)?;
    let id = parse_id(&id)?;
    let reg = state.registry.get(id).await?;
    let approvals = state.registry.approvals(&reg).await?;
    Ok(Json(RegistrationDetail {
        registration: RegistrationView::from(&reg),
        approvals: approvals.iter().map(ApprovalView::from).collect(),
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DecisionBody {
    #[serde(default)]
    comment: Option<String>,
}

#[derive(Serialize)]
pub struct DecisionResponse {
    #[serde(flatten)]
    registration: RegistrationView,
    approvals: u32,
    approvals_required: u32,
}

/// Decision bodies are optional: an empty body means no comment.
fn optional_body(body: &[u8]) -> Result<DecisionBody, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DecisionBody::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))
}

async fn decide(
    state: AppState,
    admin: Admin,
    client: ClientAddr,
    id: String,
    decision: Decision,
    body: DecisionBody,
) -> Result<Json<DecisionResponse>, ApiError> {
    let id = parse_id(&id)?;
    let result = state
        .registry
        .decide(
            id,
            &admin.0,
            decision,
            body.comment,
            client.as_string().as_deref(),
        )
        .await?;
    if result.registration.status == crate::store::RegistrationStatus::Issued {
        // Its broker topics are queued in the issuing commit: apply them now.
        state.broker.wake();
    }
    Ok(Json(DecisionResponse {
        registration: RegistrationView::from(&result.registration),
        approvals: result.approvals,
        approvals_required: result.approvals_required,
    }))
}

pub async fn approve(
    State(state): State<AppState>,
    admin: Admin,
    client: ClientAddr,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<DecisionResponse>, ApiError> {
    decide(
        state,
        admin,
        client,
        id,
        Decision::Approve,
        optional_body(&body)?,
    )
    .await
}

pub async fn deny(
    State(state): State<AppState>,
    admin: Admin,
    client: ClientAddr,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<DecisionResponse>, ApiError> {
    decide(
        state,
        admin,
        client,
        id,
        Decision::Deny,
        optional_body(&body)?,
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    order: Option<String>,
}

/// `GET /v1/admin/admins?cursor=&limit=&order=`.
pub async fn list_admins(
    State(state): State<AppState>,
    admin: Admin,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<PageView<AdminView>>, ApiError> {
    admin.require(Role::Admin)?;
    let page = page_request(q.cursor.as_deref(), q.limit, q.order.as_deref())?;
    let admins = state.admins.page(&page).await?;
    Ok(Json(PageView::map(admins, |a| AdminView::from(a))))
}

/// `POST /v1/admin/admins/{id}/disable` (id or name; role admin).
pub async fn disable_admin(
    State(state): State<AppState>,
    admin: Admin,
    client: ClientAddr,
    Path(who): Path<String>,
) -> Result<Json<AdminView>, ApiError> {
    let me = admin.require(Role::Admin)?.clone();
    let disabled = state
        .admins
        .disable(&me, &who, client.as_string().as_deref())
        .await?;
    state
        .invalidate(crate::cache::Invalidation::Admin { id: disabled.id })
        .await;
    Ok(Json(AdminView::from(&disabled)))
}

#[derive(Serialize)]
pub struct CaView {
    name: String,
    kind: String,
    algorithm: String,
    key_id: String,
    not_after: String,
}

/// `GET /v1/admin/cas?cursor=&limit=&order=`: keyset-paginated like every
/// list, by key id (time-ordered), newest first.
pub async fn list_cas(
    State(state): State<AppState>,
    admin: Admin,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<PageView<CaView>>, ApiError> {
    admin.require(Role::Auditor)?;
    let page = page_request(q.cursor.as_deref(), q.limit, q.order.as_deref())?;
    let cas = page_in_memory(state.ca.issuers(), |i| i.key_id, &page);
    Ok(Json(PageView::map(cas, |i| CaView {
        name: i.name.clone(),
        kind: format!("{:?}", i.kind).to_lowercase(),
        algorithm: i.algorithm.to_string(),
        key_id: i.key_id.to_string(),
        not_after: rfc3339(from_unix(i.not_after)),
    })))
}
