//! Backups (`/v1/admin/backups`): start one (role admin; 202, the daemon
//! makes it in the background), list and show them with their replicas
//! (role auditor), verify one in every location (role admin). Restoring
//! is not an API call: it replaces the store and the token under a
//! stopped daemon (`keyward backup restore`).

use crate::auth::Role;
use crate::backup::BackupError;
use crate::backup::service::{BackupService, RunState, VerifyReport};
use crate::clock::{from_unix, rfc3339};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::extract::{Admin, ApiQuery};
use crate::store::{BackupRecord, ReplicaRecord};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use uuid::Uuid;

impl From<BackupError> for ApiError {
    fn from(e: BackupError) -> Self {
        let status = match &e {
            BackupError::Store(_) => {
                if let BackupError::Store(s) = e {
                    return s.into();
                }
                StatusCode::INTERNAL_SERVER_ERROR
            }
            BackupError::NotConfigured => StatusCode::NOT_FOUND,
            BackupError::Running => StatusCode::CONFLICT,
            BackupError::Unknown(_) | BackupError::NoBackup => StatusCode::NOT_FOUND,
            BackupError::Location { .. } => StatusCode::BAD_GATEWAY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.code(), e.to_string())
    }
}

#[derive(Serialize)]
pub struct ReplicaView {
    location: String,
    state: &'static str,
    attempts: i64,
    last_error: Option<String>,
    next_attempt_at: Option<String>,
    stored_at: Option<String>,
    verified_at: Option<String>,
    verify_error: Option<String>,
}

impl From<&ReplicaRecord> for ReplicaView {
    fn from(r: &ReplicaRecord) -> Self {
        let waiting = matches!(
            r.state,
            crate::model::ReplicaState::Pending | crate::model::ReplicaState::Failed
        );
        Self {
            location: r.location.clone(),
            state: r.state.as_str(),
            attempts: r.attempts,
            last_error: r.last_error.clone(),
            next_attempt_at: waiting.then(|| rfc3339(from_unix(r.next_attempt_at))),
            stored_at: r.stored_at.map(|t| rfc3339(from_unix(t))),
            verified_at: r.verified_at.map(|t| rfc3339(from_unix(t))),
            verify_error: r.verify_error.clone(),
        }
    }
}

#[derive(Serialize)]
pub struct BackupView {
    id: Uuid,
    status: &'static str,
    file_name: String,
    created_at: String,
    sha256: String,
    size_bytes: i64,
    format_version: i64,
    schema_version: i64,
    trigger: &'static str,
    actor: String,
    summary: serde_json::Value,
    pruned_at: Option<String>,
    replicas: Vec<ReplicaView>,
}

impl From<BackupRecord> for BackupView {
    fn from(b: BackupRecord) -> Self {
        Self {
            id: b.id,
            status: if b.pruned_at.is_some() {
                "pruned"
            } else {
                "done"
            },
            file_name: b.file_name,
            created_at: rfc3339(from_unix(b.created_at)),
            sha256: b.sha256,
            size_bytes: b.size_bytes,
            format_version: b.format_version,
            schema_version: b.schema_version,
            trigger: b.trigger.as_str(),
            actor: b.actor,
            summary: b.summary,
            pruned_at: b.pruned_at.map(|t| rfc3339(from_unix(t))),
            replicas: b.replicas.iter().map(ReplicaView::from).collect(),
        }
    }
}

fn service(state: &AppState) -> Result<&Arc<BackupService>, ApiError> {
    state
        .backups
        .as_ref()
        .ok_or_else(|| BackupError::NotConfigured.into())
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::bad_request("invalid_field", "the id is not a UUID"))
}

/// `POST /v1/admin/backups` (role admin): 202 `{id, status: "running"}`;
/// poll `GET /v1/admin/backups/{id}`. 409 `backup_running` while one runs,
/// 404 `backup_not_configured` without a `[backup]` section.
pub async fn start(State(state): State<AppState>, admin: Admin) -> Result<Response, ApiError> {
    let me = admin.require(Role::Admin)?;
    let id = service(&state)?.start(&format!("admin:{}", me.id))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "status": "running" })),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    include_pruned: bool,
    #[serde(default)]
    limit: Option<u32>,
}

/// `GET /v1/admin/backups` (role auditor): newest first, with replicas.
pub async fn list(
    State(state): State<AppState>,
    admin: Admin,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<BackupView>>, ApiError> {
    admin.require(Role::Auditor)?;
    service(&state)?;
    let rows = state
        .store
        .list_backups(q.include_pruned, q.limit.unwrap_or(100).clamp(1, 1000))
        .await?;
    Ok(Json(rows.into_iter().map(BackupView::from).collect()))
}

/// `GET /v1/admin/backups/{id}` (role auditor): the record, or while it
/// is being made `{status: "running"}`, or `{status: "failed", code, error}`.
pub async fn show(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    admin.require(Role::Auditor)?;
    let svc = service(&state)?;
    let id = parse_id(&id)?;
    // A started backup is recorded before its replicas are uploaded: it
    // stays `running` until they are, so `backup create` waits for them.
    let run = svc.run_state(id);
    if let Some(RunState::Running { started_at }) = run {
        return Ok(Json(json!({
            "id": id, "status": "running", "started_at": rfc3339(from_unix(started_at)),
        }))
        .into_response());
    }
    if let Some(b) = state.store.get_backup(id).await? {
        return Ok(Json(BackupView::from(b)).into_response());
    }
    match run {
        Some(RunState::Running { .. }) => Err(BackupError::Unknown(id).into()),
        Some(RunState::Failed { code, error }) => Ok(Json(json!({
            "id": id, "status": "failed", "code": code, "error": error,
        }))
        .into_response()),
        None => Err(BackupError::Unknown(id).into()),
    }
}

/// `POST /v1/admin/backups/{id}/verify` (role admin; `latest` for the
/// newest): downloads it from every location and checks it. 200 with one
/// result per location, whether they passed or not.
pub async fn verify(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<VerifyReport>, ApiError> {
    let me = admin.require(Role::Admin)?;
    let svc = service(&state)?;
    let id = if id == "latest" {
        None
    } else {
        Some(parse_id(&id)?)
    };
    Ok(Json(svc.verify(id, &format!("admin:{}", me.id)).await?))
}
