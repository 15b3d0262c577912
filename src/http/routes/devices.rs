//! Device-facing renewal: a nonce for the signed-nonce proof, and the
//! renewal itself (authenticated by the current certificate: the mTLS
//! client leaf, or a signature over the nonce).

use super::parse_id;
use crate::ca::RenewalProof;
use crate::clock::{from_unix, rfc3339};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ClientAddr};
use crate::tls::PeerCertificate;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use base64::Engine;
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
pub struct NonceResponse {
    /// 32 random bytes, base64url without padding.
    nonce: String,
    expires_at: String,
    expires_in: i64,
}

/// `GET /v1/devices/{id}/renew/nonce`: a fresh single-use nonce bound to
/// the device, valid 5 minutes (rate-limited per source).
pub async fn nonce(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<NonceResponse>, ApiError> {
    let id = parse_id(&id)?;
    let nonce = state.ca.renewal_nonce(id).await?;
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
pub struct RenewBody {
    /// PEM PKCS#10 request: the same key or a new one.
    csr: String,
    /// From `GET .../renew/nonce` (base64url).
    #[serde(default)]
    nonce: Option<String>,
    /// Over the proof message, with the current key (base64url).
    #[serde(default)]
    signature: Option<String>,
    /// The certificate the device holds as current (PEM), optional.
    #[serde(default)]
    certificate: Option<String>,
}

#[derive(Serialize)]
pub struct RenewResponse {
    serial: String,
    previous_serial: String,
    certificate_pem: String,
    chain_pem: String,
    not_after: String,
    rekey: bool,
    forced: bool,
    /// The new certificate's renewal window.
    renewal: crate::ca::RenewalHint,
}

fn b64url(field: &'static str, value: &str) -> Result<Vec<u8>, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value.trim().trim_end_matches('='))
        .map_err(|_| ApiError::bad_request("invalid_field", format!("`{field}` is not base64url")))
}

fn certificate_der(pem: &str) -> Result<Vec<u8>, ApiError> {
    match der::pem::decode_vec(pem.trim().as_bytes()) {
        Ok(("CERTIFICATE", der)) => Ok(der),
        _ => Err(ApiError::bad_request(
            "invalid_field",
            "`certificate` is not a PEM CERTIFICATE",
        )),
    }
}

/// `POST /v1/devices/{id}/renew`. With `nonce` and `signature`, the
/// signed-nonce proof; otherwise the verified TLS client certificate of
/// the connection (mTLS: the TLS listener inserts [`PeerCertificate`]); with neither, 401 `proof_required`.
pub async fn renew(
    State(state): State<AppState>,
    client: ClientAddr,
    Path(id): Path<String>,
    leaf: Option<Extension<PeerCertificate>>,
    ApiJson(body): ApiJson<RenewBody>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let id = parse_id(&id)?;
    let proof = match (&body.nonce, &body.signature) {
        (Some(n), Some(s)) => RenewalProof::SignedNonce {
            nonce: b64url("nonce", n)?,
            signature: b64url("signature", s)?,
            certificate: body
                .certificate
                .as_deref()
                .map(certificate_der)
                .transpose()?,
        },
        (None, None) => match leaf {
            Some(Extension(PeerCertificate(der))) => RenewalProof::ClientCertificate(der.to_vec()),
            None => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "proof_required",
                    "renewal needs the current certificate: a TLS client certificate, or `nonce` and `signature`",
                ));
            }
        },
        _ => {
            return Err(ApiError::bad_request(
                "invalid_field",
                "`nonce` and `signature` go together",
            ));
        }
    };
    let renewed = state
        .ca
        .renew(
            id,
            body.csr.as_bytes(),
            proof,
            client.as_string().as_deref(),
        )
        .await?;
    let pem = crate::ca::x509::to_pem(&renewed.certificate.der)
        .map_err(|e| ApiError::from(crate::ca::CaError::Encoding(e)))?;
    let renewal = renewed.renewal;
    let mut resp = (
        StatusCode::CREATED,
        Json(RenewResponse {
            serial: renewed.certificate.serial.clone(),
            previous_serial: renewed.previous_serial,
            certificate_pem: pem,
            chain_pem: renewed.chain_pem,
            not_after: rfc3339(from_unix(renewed.certificate.not_after)),
            rekey: renewed.rekey,
            forced: renewed.forced,
            renewal,
        }),
    )
        .into_response();
    // A certificate due at once (a validity shorter than its window).
    crate::http::views::mark_renewal_due(&mut resp, Some(&renewal));
    Ok(resp)
}
