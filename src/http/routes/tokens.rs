//! Device access tokens: nonce, token, JWKS and introspection
//! (docs/auth.md).

use crate::auth::Role;
use crate::auth::tokens::TokenProof;
use crate::clock::{from_unix, rfc3339};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::extract::{Admin, ClientAddr};
use crate::tls::PeerCertificate;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use serde::{Deserialize, Serialize};

/// How long relying parties may cache the JWKS. A rotation publishes the
/// next key `auth.token_key_overlap_seconds` (at least 60 s, default 1 h)
/// before it signs; keep this well below that.
pub const JWKS_MAX_AGE_SECS: u64 = 60;

fn b64url(field: &'static str, value: &str) -> Result<Vec<u8>, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value.trim().trim_end_matches('='))
        .map_err(|_| ApiError::bad_request("invalid_field", format!("`{field}` is not base64url")))
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NonceBody {
    device_id: String,
}

#[derive(Serialize)]
pub struct NonceResponse {
    /// 32 random bytes, base64url without padding.
    nonce: String,
    expires_at: String,
    expires_in: i64,
}

/// `POST /v1/auth/nonce` `{"device_id"}`: a single-use nonce for the
/// signed-nonce proof of `POST /v1/auth/token` (5 minutes).
pub async fn nonce(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<NonceResponse>, ApiError> {
    let b: NonceBody = parse_json(&body)?;
    let id = super::parse_id(&b.device_id)?;
    let nonce = state.tokens.nonce(id).await?;
    let ttl = crate::ca::renewal::NONCE_TTL_SECS;
    let now = state.ca.now();
    Ok(Json(NonceResponse {
        nonce: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(nonce),
        expires_at: rfc3339(from_unix(now + ttl)),
        expires_in: ttl,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    device_id: String,
    /// From `POST /v1/auth/nonce` (base64url).
    nonce: String,
    /// Over the proof message, with the current certificate's key (base64url).
    signature: String,
}

#[derive(Serialize)]
pub struct TokenResponse {
    access_token: String,
    token_type: &'static str,
    expires_in: i64,
}

/// `POST /v1/auth/token`. With a body `{"device_id", "nonce", "signature"}`,
/// the signed-nonce proof; with an empty body, the verified TLS client
/// certificate of the connection; with neither, 401 `proof_required`.
pub async fn token(
    State(state): State<AppState>,
    client: ClientAddr,
    leaf: Option<Extension<PeerCertificate>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let proof = if body.iter().all(u8::is_ascii_whitespace) {
        match leaf {
            Some(Extension(PeerCertificate(der))) => TokenProof::ClientCertificate(der.to_vec()),
            None => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "proof_required",
                    "a token needs the current certificate: a TLS client certificate, or `device_id`, `nonce` and `signature`",
                ));
            }
        }
    } else {
        let b: TokenBody = parse_json(&body)?;
        TokenProof::SignedNonce {
            device_id: super::parse_id(&b.device_id)?,
            nonce: b64url("nonce", &b.nonce)?,
            signature: b64url("signature", &b.signature)?,
        }
    };
    let t = state
        .tokens
        .issue(proof, client.as_string().as_deref())
        .await?;
    let now = state.ca.now();
    let mut resp = Json(TokenResponse {
        access_token: t.access_token,
        token_type: "Bearer",
        expires_in: (t.expires_at - now).max(0),
    })
    .into_response();
    // RFC 6749 §5.1: token responses are not stored.
    let h = resp.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    h.insert(header::PRAGMA, header::HeaderValue::from_static("no-cache"));
    Ok(resp)
}

/// `GET /v1/auth/jwks`: the keys that verify access tokens (next, current,
/// and retired keys whose tokens may still be alive). Public, cacheable.
pub async fn jwks(State(state): State<AppState>) -> Response {
    let mut resp = Json(state.tokens.jwks().await).into_response();
    let h = resp.headers_mut();
    if let Ok(v) = header::HeaderValue::from_str(&format!("public, max-age={JWKS_MAX_AGE_SECS}")) {
        h.insert(header::CACHE_CONTROL, v);
    }
    resp
}

#[derive(Deserialize)]
pub struct IntrospectBody {
    token: String,
    /// RFC 7662 `token_type_hint`: accepted and ignored (one kind of token).
    #[serde(default)]
    #[allow(dead_code)]
    token_type_hint: Option<String>,
}

/// `POST /v1/auth/introspect` (RFC 7662): `token=...` as a form, or
/// `{"token": "..."}`. Callers authenticate with an admin token of any
/// role (relying parties get an `auditor` admin of their own).
pub async fn introspect(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    admin.require(Role::Auditor)?;
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let token = if form {
        url::form_urlencoded::parse(&body)
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
            .ok_or_else(|| ApiError::bad_request("invalid_field", "`token` is required"))?
    } else {
        parse_json::<IntrospectBody>(&body)?.token
    };
    let answer = state.tokens.introspect(&token).await?;
    let mut resp = Json(answer).into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    Ok(resp)
}
