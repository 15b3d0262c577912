//! Enrollment administration: bootstrap tokens, reclaim codes, policy
//! reload. Minting and revoking take role `admin` (a token is the power to
//! enroll); listing takes any admin role.

use super::parse_id;
use crate::auth::Role;
use crate::clock::{from_unix, rfc3339};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::extract::{Admin, ApiJson, ApiQuery, ClientAddr};
use crate::http::page::{PageView, page_request, status_filter};
use crate::model::EnrollmentTokenKind;
use crate::registry::ReloadOutcome;
use crate::registry::tokens::TokenRequest;
use crate::store::{EnrollmentTokenFilter, EnrollmentTokenRecord};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenBody {
    /// `bootstrap` (default) or `reclaim`.
    #[serde(default)]
    kind: Option<String>,
    /// Bootstrap tokens: the group they attest to.
    #[serde(default)]
    group: Option<String>,
    /// Bootstrap tokens: how many registrations may use it (default 1).
    #[serde(default)]
    uses: Option<u32>,
    /// Lifetime in seconds (default 24 h, at most 7 days).
    #[serde(default)]
    ttl_seconds: Option<i64>,
    /// Bootstrap tokens: the only device name it may register.
    #[serde(default)]
    device_name: Option<String>,
    /// Reclaim codes: the device to re-bind.
    #[serde(default)]
    device_id: Option<String>,
}

#[derive(Serialize)]
pub struct TokenView {
    id: String,
    kind: String,
    group: Option<String>,
    device_id: Option<String>,
    device_name: Option<String>,
    uses_allowed: u32,
    uses: u32,
    created_by: String,
    created_at: String,
    expires_at: String,
    revoked_at: Option<String>,
    revoked_by: Option<String>,
    last_used_at: Option<String>,
}

impl From<&EnrollmentTokenRecord> for TokenView {
    fn from(t: &EnrollmentTokenRecord) -> Self {
        Self {
            id: t.id.to_string(),
            kind: t.kind.to_string(),
            group: t.group.clone(),
            device_id: t.device_id.map(|d| d.to_string()),
            device_name: t.device_name.clone(),
            uses_allowed: t.uses_allowed,
            uses: t.uses,
            created_by: format!("admin:{}", t.created_by),
            created_at: rfc3339(from_unix(t.created_at)),
            expires_at: rfc3339(from_unix(t.expires_at)),
            revoked_at: t.revoked_at.map(|v| rfc3339(from_unix(v))),
            revoked_by: t.revoked_by.map(|u| format!("admin:{u}")),
            last_used_at: t.last_used_at.map(|v| rfc3339(from_unix(v))),
        }
    }
}

#[derive(Serialize)]
pub struct CreatedToken {
    #[serde(flatten)]
    token: TokenView,
    /// Shown once: only its HMAC is stored.
    secret: String,
}

const DEFAULT_TTL: i64 = 24 * 3600;

/// `POST /v1/admin/tokens`: mint a bootstrap token or a reclaim code.
pub async fn create_token(
    State(state): State<AppState>,
    admin: Admin,
    client: ClientAddr,
    ApiJson(body): ApiJson<CreateTokenBody>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let admin = admin.require(Role::Admin)?;
    let kind = match body.kind.as_deref() {
        None | Some("bootstrap") => EnrollmentTokenKind::Bootstrap,
        Some("reclaim") => EnrollmentTokenKind::Reclaim,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_token_request",
                format!("unknown kind `{other}` (bootstrap, reclaim)"),
            ));
        }
    };
    let ttl_seconds = body.ttl_seconds.unwrap_or(DEFAULT_TTL);
    let misplaced = |field: &str| {
        ApiError::bad_request(
            "invalid_token_request",
            format!("`{field}` does not apply to {} tokens", kind.as_str()),
        )
    };
    let req = match kind {
        EnrollmentTokenKind::Bootstrap => {
            if body.device_id.is_some() {
                return Err(misplaced("device_id"));
            }
            TokenRequest::Bootstrap {
                group: body.group.ok_or_else(|| {
                    ApiError::bad_request("invalid_token_request", "`group` is required")
                })?,
                uses: body.uses.unwrap_or(1),
                ttl_seconds,
                device_name: body.device_name,
            }
        }
        EnrollmentTokenKind::Reclaim => {
            for (field, set) in [
                ("group", body.group.is_some()),
                ("uses", body.uses.is_some()),
                ("device_name", body.device_name.is_some()),
            ] {
                if set {
                    return Err(misplaced(field));
                }
            }
            let device = body.device_id.ok_or_else(|| {
                ApiError::bad_request("invalid_token_request", "`device_id` is required")
            })?;
            TokenRequest::Reclaim {
                device_id: parse_id(&device)?,
                ttl_seconds,
            }
        }
    };
    let minted = state
        .registry
        .mint_token(admin, req, client.as_string().as_deref())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: TokenView::from(&minted.record),
            secret: minted.secret.expose_secret().to_string(),
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenListQuery {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    order: Option<String>,
}

/// `GET /v1/admin/tokens?kind=&group=&device_id=&cursor=&limit=&order=`.
pub async fn list_tokens(
    State(state): State<AppState>,
    admin: Admin,
    ApiQuery(q): ApiQuery<TokenListQuery>,
) -> Result<Json<PageView<TokenView>>, ApiError> {
    admin.require(Role::Auditor)?;
    let kind = status_filter(
        q.kind.as_deref(),
        EnrollmentTokenKind::parse,
        "bootstrap, reclaim",
    )?;
    let device = match q.device_id.as_deref() {
        Some(d) if !d.is_empty() => Some(parse_id(d)?),
        _ => None,
    };
    let page = page_request(q.cursor.as_deref(), q.limit, q.order.as_deref())?;
    let filter = EnrollmentTokenFilter {
        kind,
        group: q.group.filter(|g| !g.is_empty()),
        device,
    };
    let tokens = state.registry.list_tokens(&filter, &page).await?;
    Ok(Json(PageView::map(tokens, |t| TokenView::from(t))))
}

/// `POST /v1/admin/tokens/{id}/revoke`.
pub async fn revoke_token(
    State(state): State<AppState>,
    admin: Admin,
    client: ClientAddr,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    let admin = admin.require(Role::Admin)?;
    let id = parse_id(&id)?;
    let token = state
        .registry
        .revoke_token(admin, id, client.as_string().as_deref())
        .await?;
    Ok(Json(TokenView::from(&token)))
}

/// `POST /v1/admin/policies/reload`: validates `policies/*.toml` and swaps
/// them in; invalid files change nothing (422 `policy_invalid`).
pub async fn reload_policies(
    State(state): State<AppState>,
    admin: Admin,
    client: ClientAddr,
) -> Result<Json<ReloadOutcome>, ApiError> {
    let admin = admin.require(Role::Admin)?;
    let outcome = state
        .registry
        .reload_policies(
            &format!("admin:{}", admin.id),
            client.as_string().as_deref(),
        )
        .await?;
    // The other daemons reload their own policy files; this one has (its
    // own listener must not reload again: the files may have changed since).
    if let Err(e) = state
        .bus
        .publish_remote(crate::cache::Invalidation::Policy)
        .await
    {
        tracing::warn!(error = %e, "policy reload not announced to the other daemons");
    }
    Ok(Json(outcome))
}
