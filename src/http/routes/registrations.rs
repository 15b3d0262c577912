//! Device-facing registration endpoints.

use super::parse_id;
use crate::auth::Role;
use crate::clock::{from_unix, rfc3339};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, Bearer, ClientAddr};
use crate::http::views::{RegistrationStatusView, RegistrationView, mark_renewal_due};
use crate::registry::{Credentials, Evidence, Submission};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    /// PEM PKCS#10 request; absent for groups whose keys the server makes.
    #[serde(default)]
    csr: Option<String>,
    name: String,
    #[serde(default)]
    device_type: Option<String>,
    #[serde(default)]
    location: Option<String>,
    #[serde(default)]
    firmware: Option<String>,
    /// Only decides the group when its attestation is `none` (default
    /// `default`); otherwise it must agree with the attestation.
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    attestation: Option<AttestationBody>,
    /// Server keys: an age X25519 recipient for the key bundle.
    #[serde(default)]
    age_recipient: Option<String>,
}

/// The proof; exactly one method.
#[derive(Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AttestationBody {
    BootstrapToken {
        token: SecretString,
    },
    Jwt {
        token: String,
    },
    X509 {
        /// PEM: the manufacturer certificate, then any intermediates.
        chain: String,
        nonce: String,
        /// Base64 signature over the possession message.
        signature: String,
    },
    Reclaim {
        device_id: String,
        code: SecretString,
    },
}

fn evidence(body: Option<AttestationBody>) -> Result<Evidence, ApiError> {
    use base64::Engine;
    Ok(match body {
        None => Evidence::None,
        Some(AttestationBody::BootstrapToken { token }) => Evidence::BootstrapToken(token),
        Some(AttestationBody::Jwt { token }) => Evidence::Jwt(token),
        Some(AttestationBody::X509 {
            chain,
            nonce,
            signature,
        }) => {
            let chain_der = crate::ca::x509::pem_chain_to_der(&chain).map_err(|e| {
                ApiError::bad_request("manufacturer_chain_malformed", e.to_string())
            })?;
            let signature = base64::engine::general_purpose::STANDARD
                .decode(signature.trim())
                .map_err(|_| {
                    ApiError::bad_request("manufacturer_proof_invalid", "signature must be base64")
                })?;
            Evidence::X509 {
                chain_der,
                nonce,
                signature,
            }
        }
        Some(AttestationBody::Reclaim { device_id, code }) => Evidence::Reclaim {
            device_id: parse_id(&device_id)?,
            code,
        },
    })
}

#[derive(Serialize)]
pub struct SubmitResponse {
    id: String,
    device_id: String,
    status: String,
    /// Shown once: the device polls and fetches credentials with it.
    secret: String,
    expires_at: String,
    certificate_serial: Option<String>,
}

/// `POST /v1/registrations`. An admin token, if present, marks the
/// registration as submitted by that admin (who then cannot approve it).
pub async fn submit(
    State(state): State<AppState>,
    client: ClientAddr,
    Bearer(token): Bearer,
    ApiJson(body): ApiJson<SubmitBody>,
) -> Result<(StatusCode, Json<SubmitResponse>), ApiError> {
    let admin = match token {
        Some(t) => Some(state.login.authenticate(Some(&t), client.0).await?),
        None => None,
    };
    let submitted = state
        .registry
        .submit(
            Submission {
                csr: body.csr.map(String::into_bytes),
                evidence: evidence(body.attestation)?,
                age_recipient: body.age_recipient,
                name: body.name,
                device_type: body.device_type,
                location: body.location,
                firmware: body.firmware,
                group: body.group,
                client_addr: client.as_string(),
            },
            admin.as_ref(),
        )
        .await?;
    let r = &submitted.registration;
    if r.status == crate::store::RegistrationStatus::Issued {
        // Its broker topics are queued in the issuing commit: apply them now.
        state.broker.wake();
    }
    Ok((
        StatusCode::CREATED,
        Json(SubmitResponse {
            id: r.id.to_string(),
            device_id: r.device_id.to_string(),
            status: r.status.to_string(),
            secret: submitted.secret.expose_secret().to_string(),
            expires_at: rfc3339(from_unix(r.expires_at)),
            certificate_serial: r.certificate_serial.clone(),
        }),
    ))
}

/// `GET /v1/registrations/{id}`: the device with its registration secret,
/// or any admin. Once issued, with the renewal hint of the device's current
/// certificate (and `Keyward-Renewal-Due: true` when its window is open).
pub async fn status(
    State(state): State<AppState>,
    client: ClientAddr,
    Path(id): Path<String>,
    Bearer(token): Bearer,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let id = parse_id(&id)?;
    let token =
        token.ok_or_else(|| ApiError::from(crate::registry::RegistryError::Unauthorized))?;
    let reg = if token.starts_with("kwr_") {
        state.registry.authenticate(id, &token).await?
    } else {
        let admin = state.login.authenticate(Some(&token), client.0).await?;
        if !admin.role.allows(Role::Auditor) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_role",
                "role cannot read registrations",
            ));
        }
        state.registry.get(id).await?
    };
    let renewal = if reg.status == crate::store::RegistrationStatus::Issued {
        state
            .ca
            .device_renewal_hint(reg.device_id, state.ca.now())
            .await?
    } else {
        None
    };
    let mut resp = Json(RegistrationStatusView {
        registration: RegistrationView::from(&reg),
        renewal,
    })
    .into_response();
    mark_renewal_due(&mut resp, renewal.as_ref());
    Ok(resp)
}

/// `GET /v1/registrations/{id}/credentials`, with the registration secret:
/// certificate, chain and device config; again after a lost response, until
/// confirmed or the group's re-fetch window closes (then 410).
pub async fn credentials(
    State(state): State<AppState>,
    client: ClientAddr,
    Path(id): Path<String>,
    Bearer(token): Bearer,
) -> Result<Json<Credentials>, ApiError> {
    let id = parse_id(&id)?;
    let token =
        token.ok_or_else(|| ApiError::from(crate::registry::RegistryError::Unauthorized))?;
    let reg = state.registry.authenticate(id, &token).await?;
    Ok(Json(
        state
            .registry
            .credentials(&reg, client.as_string().as_deref())
            .await?,
    ))
}

/// `POST /v1/registrations/{id}/credentials/confirm`, with the registration
/// secret: the device has stored its credentials; no re-fetch after this.
pub async fn confirm_credentials(
    State(state): State<AppState>,
    client: ClientAddr,
    Path(id): Path<String>,
    Bearer(token): Bearer,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    let token =
        token.ok_or_else(|| ApiError::from(crate::registry::RegistryError::Unauthorized))?;
    let reg = state.registry.authenticate(id, &token).await?;
    state
        .registry
        .confirm_credentials(&reg, client.as_string().as_deref())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigQuery {
    /// With a registration secret as the bearer token: the registration.
    #[serde(default)]
    registration: Option<String>,
}

#[derive(Serialize)]
pub struct PendingView {
    registration: String,
    status: &'static str,
    expires_at: String,
    retry_after: u64,
}

/// `GET /v1/devices/me/config`: the caller's device id, current
/// certificate and chain, rendered configuration and broker topics.
/// Callers: the holder of a registration secret (`?registration=ID`,
/// bearer `kwr_…`), or a device over mTLS with its certificate. While the
/// registration waits for approvers: 202 with `Retry-After`.
pub async fn my_config(
    State(state): State<AppState>,
    Bearer(token): Bearer,
    leaf: Option<axum::Extension<crate::tls::PeerCertificate>>,
    crate::http::extract::ApiQuery(q): crate::http::extract::ApiQuery<ConfigQuery>,
) -> Result<axum::response::Response, ApiError> {
    use crate::registry::config::{ConfigAnswer, ConfigCaller, PENDING_RETRY_SECONDS};
    use axum::response::IntoResponse;
    let caller = match (token, q.registration, leaf) {
        (Some(t), Some(reg), _) if t.starts_with("kwr_") => {
            let id = parse_id(&reg)?;
            ConfigCaller::Registration(Box::new(state.registry.authenticate(id, &t).await?))
        }
        (None, None, Some(axum::Extension(crate::tls::PeerCertificate(der)))) => {
            let summary = crate::ca::x509::summarize(&der)
                .map_err(|_| ApiError::from(crate::registry::RegistryError::Unauthorized))?;
            // The TLS layer verified the chain and the store's revocation
            // state; the store names the certificate's device.
            let cert = state
                .store
                .get_certificate(&summary.serial_hex)
                .await?
                .filter(|c| c.der == der.as_ref())
                .and_then(|c| c.device_id)
                .ok_or_else(|| ApiError::from(crate::registry::RegistryError::Unauthorized))?;
            ConfigCaller::Device(cert)
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "present a device certificate (mTLS), or a registration secret with ?registration=ID",
            ));
        }
    };
    match state.registry.device_config(caller).await? {
        ConfigAnswer::Ready(c) => {
            let renewal = c.renewal;
            let mut resp = Json(*c).into_response();
            mark_renewal_due(&mut resp, renewal.as_ref());
            Ok(resp)
        }
        ConfigAnswer::Pending {
            registration,
            expires_at,
        } => {
            let mut resp = (
                StatusCode::ACCEPTED,
                Json(PendingView {
                    registration: registration.to_string(),
                    status: "pending",
                    expires_at: rfc3339(from_unix(expires_at)),
                    retry_after: PENDING_RETRY_SECONDS,
                }),
            )
                .into_response();
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(PENDING_RETRY_SECONDS),
            );
            Ok(resp)
        }
    }
}

#[derive(Serialize)]
pub struct EnrollNonce {
    /// Sign `keyward-enroll-v1\n` ‖ nonce ‖ `\n` ‖ hex(SHA-256(CSR DER))
    /// with the manufacturer key (see the OpenAPI description).
    nonce: String,
    expires_at: String,
    expires_in: i64,
}

/// `GET /v1/registrations/nonce`: a single-use nonce (5 minutes) for the
/// manufacturer-certificate possession proof (rate-limited per source).
pub async fn enroll_nonce(State(state): State<AppState>) -> Result<Json<EnrollNonce>, ApiError> {
    let (nonce, expires_at) = state.registry.enrollment_nonce()?;
    Ok(Json(EnrollNonce {
        nonce,
        expires_at: rfc3339(from_unix(expires_at)),
        expires_in: crate::registry::ENROLL_NONCE_TTL_SECONDS,
    }))
}
