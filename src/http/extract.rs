//! Extractors: JSON bodies with our error shape, bearer tokens, admins.

use super::AppState;
use super::error::ApiError;
use crate::auth::Role;
use crate::store::AdminRecord;
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;

/// `axum::Json` whose rejections use the API error body.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// The bearer token of the request, if any.
pub fn bearer(parts: &Parts) -> Option<String> {
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// An authenticated admin of at least `Auditor` role; handlers check for more.
pub struct Admin(pub AdminRecord);

impl Admin {
    pub fn require(&self, role: Role) -> Result<&AdminRecord, ApiError> {
        if self.0.role.allows(role) {
            Ok(&self.0)
        } else {
            Err(crate::auth::admins::AdminError::Forbidden {
                have: self.0.role,
                need: role,
            }
            .into())
        }
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts);
        match state.admins.authenticate(token.as_deref()).await {
            Ok(a) => Ok(Admin(a)),
            Err(e) => {
                state.metrics.admin_auth_failures.inc();
                Err(e.into())
            }
        }
    }
}

/// The raw bearer token, for routes that accept either a registration
/// secret or an admin token.
pub struct Bearer(pub Option<String>);

impl FromRequestParts<AppState> for Bearer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Self::Rejection> {
        Ok(Bearer(bearer(parts)))
    }
}
