//! `ApiError`: the one place where errors become HTTP statuses. Bodies are
//! `{"error": {"code", "message"}}`; 5xx bodies say nothing internal.

use crate::auth::AdminError;
use crate::ca::csr::CsrError;
use crate::ca::{CaError, LifecycleError};
use crate::keystore::KeyStoreError;
use crate::ratelimit::LimitError;
use crate::ratelimit::login::LoginError;
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
    /// Seconds for a `Retry-After` header (rate limits).
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
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
        if let Some(secs) = self.retry_after_secs {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        resp
    }
}

/// The HTTP status of an OCSP answer (the body is always an OCSPResponse).
/// RFC 6960 clients read the OCSP status from a 200; keyward keeps 200 for
/// signed answers and `unauthorized` (the RFC's answer for an issuer it does
/// not serve), and sends bad input as 400/413 with the OCSP
/// `malformedRequest` body, so that the refusal is visible to HTTP tooling
/// too; the stable code is in the `Keyward-Error-Code` header.
pub fn ocsp_status(refused: Option<crate::ca::responder::Refusal>) -> StatusCode {
    use crate::ca::responder::Refusal;
    match refused {
        None | Some(Refusal::Unauthorized) => StatusCode::OK,
        Some(Refusal::Malformed) => StatusCode::BAD_REQUEST,
        Some(Refusal::TooLarge) => StatusCode::PAYLOAD_TOO_LARGE,
        Some(Refusal::RateLimited { .. }) => StatusCode::TOO_MANY_REQUESTS,
        Some(Refusal::TryLater) => StatusCode::SERVICE_UNAVAILABLE,
        Some(Refusal::Internal) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Gives the framework's own error answers our error body: an unmatched
/// path (404 `route_not_found`), a method the path does not route (405
/// `method_not_allowed`, with its `Allow` header), a request that ran out of
/// time (408), a body too large for a raw-bytes extractor (413). Every
/// error a client sees then has one shape, as the OpenAPI document says.
/// Answers that already carry JSON, and OCSP answers (whose body is the
/// OCSP status a client reads), are left alone.
pub async fn json_error_bodies(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v == "application/ocsp-response");
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (code, message) = match status {
        StatusCode::NOT_FOUND => ("route_not_found", "no such route"),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "this route does not take that method (see the Allow header)",
        ),
        StatusCode::REQUEST_TIMEOUT => ("request_timeout", "the request took too long"),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ("unsupported_media_type", "unsupported request content type")
        }
        s if s.is_server_error() => ("internal", "internal error; see the server log"),
        _ => ("bad_request", "the request was not understood"),
    };
    let (mut parts, _) = resp.into_parts();
    let mut fresh = ApiError::new(status, code, message).into_response();
    // Keep the framework's headers that still apply (Allow on 405).
    if let Some(allow) = parts.headers.remove(axum::http::header::ALLOW) {
        fresh.headers_mut().insert(axum::http::header::ALLOW, allow);
    }
    fresh
}

impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        match &e {
            LimitError::Exceeded { .. } => {
                let mut api = Self::new(StatusCode::TOO_MANY_REQUESTS, e.code(), e.to_string());
                api.retry_after_secs = e.retry_after_secs();
                api
            }
            LimitError::Backend(b) => Self::unavailable(b),
        }
    }
}

impl From<LoginError> for ApiError {
    fn from(e: LoginError) -> Self {
        match e {
            LoginError::Admin(a) => a.into(),
            LoginError::Limited(l) => l.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        use crate::store::DatabaseError as D;
        /// Bugs and tampering are 500; a busy or missing database is 503.
        fn is_fault(d: &D) -> bool {
            match d {
                D::InvalidRow(_)
                | D::Constraint(_)
                | D::AuditDetails(_)
                | D::Unaudited
                | D::ReadOnly => true,
                D::Batch(inner) => is_fault(inner),
                _ => false,
            }
        }
        match &e {
            StoreError::Database(d) if d.code() == "audit_sink_failed" => {
                tracing::error!(error = %e, "change refused: the audit sink failed (fail-closed)");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit_sink_failed",
                    "the audit sink could not record this change, so it was not made; retry later",
                )
            }
            StoreError::Conflict(c) => Self::new(StatusCode::CONFLICT, "conflict", c.to_string()),
            StoreError::Database(d) if is_fault(d) => Self::internal(&e),
            StoreError::WriterGone | StoreError::Database(_) => Self::unavailable(&e),
            StoreError::Corrupt(_)
            | StoreError::SchemaTooNew { .. }
            | StoreError::InvalidArgument(_)
            | StoreError::Seal(_)
            | StoreError::SealingUnsupported => Self::internal(&e),
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
            CaError::CrlUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            CaError::Expired(_) => {
                tracing::error!(error = %e, "a CA has expired");
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => return Self::internal(&e),
        };
        Self::new(status, e.code(), e.to_string())
    }
}

impl From<crate::rotation::RotationError> for ApiError {
    fn from(e: crate::rotation::RotationError) -> Self {
        use crate::rotation::RotationError as E;
        let status = match e {
            E::Ca(c) => return c.into(),
            E::Store(s) => return s.into(),
            E::KeyStore(k) => return k.into(),
            E::Running { .. } | E::NotWaitingForCard { .. } => StatusCode::CONFLICT,
            E::Unsupported(_) => StatusCode::UNPROCESSABLE_ENTITY,
            E::NotFound(_) => StatusCode::NOT_FOUND,
            ref other => return Self::internal(other),
        };
        Self::new(status, e.code(), e.to_string())
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        use RegistryError as E;
        let status = match &e {
            E::InvalidField { .. }
            | E::UnknownGroup(_)
            | E::InvalidTokenRequest(_)
            | E::GroupMismatch { .. }
            | E::TokenDeviceName(_)
            | E::CsrNotExpected(_)
            | E::CsrRequired(_)
            | E::RecipientNotExpected
            | E::Delivery { .. } => StatusCode::BAD_REQUEST,
            E::DeviceNotFound | E::TokenNotFound => StatusCode::NOT_FOUND,
            E::PolicyInvalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            E::DeviceNotActive(_) | E::TokenAlreadyRevoked => StatusCode::CONFLICT,
            E::TokenInvalid(_) | E::AttestationRequired { .. } | E::Attestation { .. } => {
                StatusCode::UNAUTHORIZED
            }
            E::ReclaimWrongDevice | E::MinterApproval => StatusCode::FORBIDDEN,
            E::AttestationUnavailable(_) => StatusCode::NOT_IMPLEMENTED,
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
            E::ForbiddenRole { .. } | E::SelfApproval | E::AdminDisabled | E::KeyRevoked => {
                StatusCode::FORBIDDEN
            }
            E::CredentialsGone => StatusCode::GONE,
            E::Unauthorized => StatusCode::UNAUTHORIZED,
            E::Ca(_) | E::Store(_) | E::Random(_) | E::KeyStore(_) => {
                return match e {
                    E::Ca(c) => c.into(),
                    E::KeyStore(k) => k.into(),
                    E::Store(s) => s.into(),
                    other => Self::internal(&other),
                };
            }
        };
        Self::new(status, e.code(), e.to_string())
    }
}

impl From<crate::auth::tokens::TokenError> for ApiError {
    fn from(e: crate::auth::tokens::TokenError) -> Self {
        use crate::auth::tokens::TokenError as E;
        let status = match e {
            E::Store(s) => return s.into(),
            E::KeyStore(k) => return k.into(),
            // The proof does not hold: not authenticated.
            E::Proof(_) | E::UnknownCertificate => StatusCode::UNAUTHORIZED,
            // Authenticated as a certificate that may not have a token.
            E::NotCurrentCertificate | E::DeviceSuspended | E::DeviceRevoked => {
                StatusCode::FORBIDDEN
            }
            E::DeviceNotFound => StatusCode::NOT_FOUND,
            E::Key(_) | E::NoKey | E::KeyMismatch { .. } | E::BadSignature | E::Random(_) => {
                return Self::internal(&e);
            }
        };
        Self::new(status, e.code(), e.to_string())
    }
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        use LifecycleError as E;
        let status = match &e {
            E::InvalidField { .. } => StatusCode::BAD_REQUEST,
            E::DeviceNotFound | E::CertificateNotFound => StatusCode::NOT_FOUND,
            E::DeviceRevoked
            | E::DeviceSuspended
            | E::AlreadySuspended
            | E::NotSuspended(_)
            | E::CertificateNotRevocable(_)
            | E::NotOnHold
            | E::UnknownGroup(_)
            | E::NoCurrentCertificate
            | E::OutsideRenewalWindow { .. }
            | E::ConcurrentChange => StatusCode::CONFLICT,
            // Proofs that do not hold: the caller is not (or no longer)
            // the holder of the device's current, usable certificate.
            E::CertificateExpired
            | E::CertificateRevoked
            | E::NotCurrentCertificate
            | E::InvalidNonce
            | E::ProofSignatureInvalid
            | E::KeyRevoked => StatusCode::FORBIDDEN,
            E::ReasonNotAllowed(_) | E::ProofAlgorithmUnsupported | E::CsrDeviceMismatch(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            E::Csr(_) | E::Ca(_) | E::Store(_) | E::Random(_) => {
                return match e {
                    E::Csr(c) => RegistryError::Csr(c).into(),
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
            | E::Concurrent
            | E::BreakGlassRefused => StatusCode::CONFLICT,
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
