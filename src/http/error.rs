//! `ApiError`: the one place where errors become HTTP statuses. Bodies are
//! `{"error": {"code", "message"}}`; 5xx bodies say nothing internal.

use crate::auth::AdminError;
use crate::ca::CaError;
use crate::ca::csr::CsrError;
use crate::keystore::KeyStoreError;
use crate::registry::RegistryError;
use crate::store::StoreError;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    fn internal(source: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %source, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }

    fn unavailable(source: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %source, "dependency unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "a dependency (HSM or store) is unavailable; retry later",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": { "code": self.code, "message": self.message } }));
        let mut resp = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED
            && let Ok(v) = axum::http::HeaderValue::from_str("Bearer")
        {
            resp.headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, v);
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        use crate::store::DatabaseError as D;
        /// Bugs and tampering are 500; a busy or missing database is 503.
        fn is_fault(d: &D) -> bool {
            match d {
                D::InvalidRow(_) | D::AuditDetails(_) | D::Unaudited | D::ReadOnly => true,
                D::Batch(inner) => is_fault(inner),
                _ => false,
            }
        }
        match &e {
            StoreError::Conflict(c) => Self::new(StatusCode::CONFLICT, "conflict", c.to_string()),
            StoreError::Database(d) if is_fault(d) => Self::internal(&e),
            StoreError::WriterGone | StoreError::Database(_) => Self::unavailable(&e),
            StoreError::Corrupt(_) | StoreError::SchemaTooNew { .. } => Self::internal(&e),
        }
    }
}

impl From<KeyStoreError> for ApiError {
    fn from(e: KeyStoreError) -> Self {
        Self::unavailable(&e)
    }
}

impl From<CaError> for ApiError {
    fn from(e: CaError) -> Self {
        let status = match &e {
            CaError::Csr(_) | CaError::KeyStore(_) | CaError::Store(_) => {
                return match e {
                    CaError::Csr(c) => RegistryError::Csr(c).into(),
                    CaError::KeyStore(k) => k.into(),
                    CaError::Store(s) => s.into(),
                    other => Self::internal(&other),
                };
            }
            CaError::AlgorithmNotAllowed { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            CaError::UnknownCa(_) => StatusCode::NOT_FOUND,
            CaError::Expired(_) => {
                tracing::error!(error = %e, "a CA has expired");
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => return Self::internal(&e),
        };
        Self::new(status, e.code(), e.to_string())
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        use RegistryError as E;
        let status = match &e {
            E::InvalidField { .. } | E::UnknownGroup(_) => StatusCode::BAD_REQUEST,
            E::Csr(CsrError::Malformed(_)) => StatusCode::BAD_REQUEST,
            E::Csr(_) | E::UnknownProfile(_) | E::AlgorithmNotAllowed { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            E::PendingLimit { .. } => StatusCode::TOO_MANY_REQUESTS,
            E::NotFound => StatusCode::NOT_FOUND,
            E::NotPending(_)
            | E::Expired
            | E::AlreadyDecided
            | E::ConcurrentDecision
            | E::NotIssued(_)
            | E::AlreadyConfirmed => StatusCode::CONFLICT,
            E::ForbiddenRole { .. } | E::SelfApproval | E::AdminDisabled => StatusCode::FORBIDDEN,
            E::CredentialsGone => StatusCode::GONE,
            E::Unauthorized => StatusCode::UNAUTHORIZED,
            E::Ca(_) | E::Store(_) | E::Random(_) => {
                return match e {
                    E::Ca(c) => c.into(),
                    E::Store(s) => s.into(),
                    other => Self::internal(&other),
                };
            }
        };
        Self::new(status, e.code(), e.to_string())
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        use AdminError as E;
        let status = match &e {
            E::Missing | E::BadToken | E::Disabled | E::BadInvitation => StatusCode::UNAUTHORIZED,
            E::Forbidden { .. } | E::SelfAction(_) | E::SelfApproval => StatusCode::FORBIDDEN,
            E::BadName => StatusCode::BAD_REQUEST,
            E::NotFound(_) | E::RequestNotFound => StatusCode::NOT_FOUND,
            E::Duplicate(_)
            | E::DuplicateInvitation(_)
            | E::DuplicateRoleChange(_)
            | E::AlreadyDisabled
            | E::LastActiveAdmin
            | E::SameRole { .. }
            | E::RequestNotPending(_)
            | E::RequestExpired
            | E::Concurrent => StatusCode::CONFLICT,
            E::Store(_) | E::Random(_) => {
                return match e {
                    E::Store(s) => s.into(),
                    other => Self::internal(&other),
                };
            }
        };
        Self::new(status, e.code(), e.to_string())
    }
}

/// Rejections of axum's extractors (bad JSON, wrong content type, size) as
/// our error body.
impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> Self {
        let status = r.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            "unsupported_media_type"
        } else {
            "invalid_json"
        };
        Self::new(status, code, r.body_text())
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(r: axum::extract::rejection::PathRejection) -> Self {
        Self::bad_request("invalid_path", r.body_text())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> Self {
        Self::bad_request("invalid_query", r.body_text())
    }
}
