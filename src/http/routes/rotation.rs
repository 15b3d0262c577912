//! Key rotations (`/v1/admin/rotations`): start one (role admin; `dry_run`
//! shows the plan), list and show them (role auditor). The rotation job
//! carries a started rotation out; clients poll its record.

use crate::auth::Role;
use crate::clock::{from_unix, rfc3339};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::extract::{Admin, ApiJson, ApiQuery};
use crate::model::KeyPurpose;
use crate::store::RotationRecord;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRotation {
    /// `issuing-ca` or `ocsp-signing`.
    purpose: String,
    /// The CA whose key (or OCSP signer) rotates.
    target: String,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Serialize)]
pub struct RotationView {
    id: Uuid,
    purpose: &'static str,
    target: String,
    step: &'static str,
    running: bool,
    old_key_id: Option<Uuid>,
    new_key_id: Option<Uuid>,
    new_serial: Option<String>,
    reason: String,
    actor: String,
    destroy_after: Option<String>,
    attempts: i64,
    last_error: Option<String>,
    next_attempt_at: String,
    created_at: String,
    updated_at: String,
    finished_at: Option<String>,
}

impl From<RotationRecord> for RotationView {
    fn from(r: RotationRecord) -> Self {
        Self {
            id: r.id,
            purpose: r.purpose.as_str(),
            target: r.target,
            step: r.step.as_str(),
            running: r.step.running(),
            old_key_id: r.old_key_id,
            new_key_id: r.new_key_id,
            new_serial: r.new_serial,
            reason: r.reason,
            actor: r.actor,
            destroy_after: r.destroy_after.map(|t| rfc3339(from_unix(t))),
            attempts: r.attempts,
            last_error: r.last_error,
            next_attempt_at: rfc3339(from_unix(r.next_attempt_at)),
            created_at: rfc3339(from_unix(r.created_at)),
            updated_at: rfc3339(from_unix(r.updated_at)),
            finished_at: r.finished_at.map(|t| rfc3339(from_unix(t))),
        }
    }
}

fn purpose(s: &str) -> Result<KeyPurpose, ApiError> {
    match KeyPurpose::parse(s) {
        Some(p @ (KeyPurpose::IssuingCa | KeyPurpose::OcspSigning | KeyPurpose::TokenSigning)) => {
            Ok(p)
        }
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!(
                "purpose `{s}` cannot be rotated on demand (issuing-ca, ocsp-signing, token-signing)"
            ),
        )),
    }
}

/// `POST /v1/admin/rotations` (role admin): 202 with the started rotation,
/// or 200 with the plan for `dry_run`. 409 `rotation_running` while one of
/// the same key runs.
pub async fn start(
    State(state): State<AppState>,
    admin: Admin,
    ApiJson(req): ApiJson<StartRotation>,
) -> Result<Response, ApiError> {
    let me = admin.require(Role::Admin)?;
    let purpose = purpose(&req.purpose)?;
    if req.dry_run {
        let preview = state.rotator.preview(purpose, &req.target).await?;
        return Ok(Json(preview).into_response());
    }
    let reason = req.reason.unwrap_or_else(|| "manual".to_string());
    if !crate::model::valid_display_text(&reason, 200, false) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "reason must be printable text of at most 200 characters",
        ));
    }
    let record = state
        .rotator
        .start(purpose, &req.target, &format!("admin:{}", me.id), &reason)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(RotationView::from(record))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    open: bool,
    #[serde(default)]
    limit: Option<u32>,
}

/// `GET /v1/admin/rotations` (role auditor): newest first; `open=true`
/// leaves out finished ones.
pub async fn list(
    State(state): State<AppState>,
    admin: Admin,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<RotationView>>, ApiError> {
    admin.require(Role::Auditor)?;
    let rows = state
        .store
        .list_rotations(q.open, q.limit.unwrap_or(100))
        .await?;
    Ok(Json(rows.into_iter().map(RotationView::from).collect()))
}

/// `GET /v1/admin/rotations/{id}` (role auditor).
pub async fn show(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<RotationView>, ApiError> {
    admin.require(Role::Auditor)?;
    let id = Uuid::parse_str(&id).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "the id is not a UUID",
        )
    })?;
    let r = state
        .store
        .get_rotation(id)
        .await?
        .ok_or(crate::rotation::RotationError::NotFound(id))?;
    Ok(Json(RotationView::from(r)))
}

/// `POST /v1/admin/rotations/{id}/certify-with-root-card` (role admin): the
/// operator's explicit command for a rotation whose new key waits for a
/// card-held parent key. Signs with the card now and carries the rotation
/// on; 409 `rotation_not_waiting_for_card` at any other step.
pub async fn certify_with_root_card(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<RotationView>, ApiError> {
    let me = admin.require(Role::Admin)?;
    let id = Uuid::parse_str(&id).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "the id is not a UUID",
        )
    })?;
    let r = state
        .rotator
        .certify_with_root_card(id, &format!("admin:{}", me.id))
        .await?;
    Ok(Json(RotationView::from(r)))
}
