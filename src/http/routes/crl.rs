//! CRLs and CA certificates for relying parties (public), and publishing a
//! CRL now (role admin).

use crate::auth::Role;
use crate::ca::crls::PublishedCrl;
use crate::clock::{from_unix, rfc3339};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::extract::Admin;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The media type that asks for PEM instead of DER.
const PEM: &str = "application/x-pem-file";

/// Whether the `Accept` header names the PEM media type (parameters such as
/// `q` are ignored; anything else, or no header, gets DER).
fn wants_pem(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|m| {
            m.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case(PEM))
        })
}

/// IMF-fixdate (RFC 9110 §5.6.7), as `Expires` and `Last-Modified` take it.
fn http_date(unix: i64) -> Option<HeaderValue> {
    let f = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    from_unix(unix)
        .format(&f)
        .ok()
        .and_then(|s| HeaderValue::from_str(&s).ok())
}

/// `GET /v1/ca/{name}/crl`: the CA's current CRL from memory, DER
/// (`application/pkix-crl`, RFC 5280 §4.2.1.13) or PEM with
/// `Accept: application/x-pem-file`. Caches may keep it until nextUpdate; a
/// revocation publishes a newer one before that, which clients that must
/// see revocations at once fetch without a cache.
pub async fn get_crl(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let crl = state.crls.current(&name)?;
    Ok(crl_response(&state, &crl, &headers))
}

/// `GET /v1/ca/{name}/keys/{key}/crl`: the CRL signed by one key of the CA
/// (where the CRL distribution point of the certificates that key signed
/// points). After a rotation the retired key keeps its own CRL until the
/// last certificate it signed has expired.
pub async fn get_key_crl(
    State(state): State<AppState>,
    Path((name, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = parse_key(&key)?;
    let crl = state
        .crls
        .all_current(&name)?
        .into_iter()
        .find(|c| c.key_id == key)
        .ok_or_else(|| unknown_key(&name))?;
    Ok(crl_response(&state, &crl, &headers))
}

/// `GET /v1/ca/{name}/crls`: the CRLs of every key of the CA that still
/// signs, PEM, one after the other: what a relying party with a CRL file
/// (Mosquitto's `crlfile`) needs during a rotation.
pub async fn get_all_crls(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let crls = state.crls.all_current(&name)?;
    let mut body = Vec::new();
    for c in &crls {
        body.extend_from_slice(&c.pem);
    }
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PEM));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

fn parse_key(key: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(key).map_err(|_| {
        ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid_key_id",
            "the key id is not a UUID",
        )
    })
}

fn unknown_key(ca: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "unknown_ca_key",
        format!("CA `{ca}` has no live key with that id"),
    )
}

fn crl_response(state: &AppState, crl: &PublishedCrl, headers: &HeaderMap) -> Response {
    let (content_type, body) = if wants_pem(headers) {
        (PEM, crl.pem.clone())
    } else {
        ("application/pkix-crl", crl.der.clone())
    };
    let now = state.crls.now().unix_timestamp();
    let max_age = (crl.next_update - now).max(0);
    let mut resp = Response::new(Body::from(body));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::VARY, HeaderValue::from_static("Accept"));
    if let Ok(v) = HeaderValue::from_str(&format!("public, max-age={max_age}, no-transform")) {
        h.insert(header::CACHE_CONTROL, v);
    }
    if let Some(v) = http_date(crl.next_update) {
        h.insert(header::EXPIRES, v);
    }
    if let Some(v) = http_date(crl.this_update) {
        h.insert(header::LAST_MODIFIED, v);
    }
    resp
}

/// `GET /v1/ca/{name}/keys/{key}/certificate`: the certificate of one live
/// key of the CA, DER (where the AIA caIssuers of the certificates that key
/// signed points).
pub async fn get_key_certificate(
    State(state): State<AppState>,
    Path((name, key)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let key = parse_key(&key)?;
    state.ca.issuer(&name)?;
    let generation = state
        .ca
        .generation(&name, key)
        .ok_or_else(|| unknown_key(&name))?;
    Ok((
        [(header::CONTENT_TYPE, "application/pkix-cert")],
        generation.cert_der.clone(),
    ))
}

/// `GET /v1/ca/{name}/bundle`: every live certificate of the CA, PEM: the
/// published successor during a rotation, the active one, and the retired
/// ones that still have live certificates. Relying parties trust all of
/// them, so devices issued before and after a rotation keep validating.
pub async fn get_bundle(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let mut body = String::new();
    for g in state.ca.live_generations(&name)? {
        body.push_str(&crate::ca::x509::to_pem(&g.cert_der).map_err(crate::ca::CaError::from)?);
    }
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PEM));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

/// `GET /v1/ca/{name}/certificate`: the CA's certificate, DER
/// (`application/pkix-cert`), where device certificates' AIA caIssuers
/// points (RFC 5280 §4.2.2.1).
pub async fn get_certificate(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let issuer = state.ca.issuer(&name)?;
    Ok((
        [(header::CONTENT_TYPE, "application/pkix-cert")],
        issuer.cert_der.clone(),
    ))
}

#[derive(Serialize)]
pub struct CrlView {
    ca: String,
    number: i64,
    entries: usize,
    this_update: String,
    next_update: String,
}

impl From<&PublishedCrl> for CrlView {
    fn from(c: &PublishedCrl) -> Self {
        Self {
            ca: c.ca.clone(),
            number: c.number,
            entries: c.entries,
            this_update: rfc3339(from_unix(c.this_update)),
            next_update: rfc3339(from_unix(c.next_update)),
        }
    }
}

/// `POST /v1/admin/cas/{name}/crl` (role admin): publishes a new CRL now.
pub async fn publish_crl(
    State(state): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
) -> Result<Json<CrlView>, ApiError> {
    let me = admin.require(Role::Admin)?;
    let crl = state
        .crls
        .publish(&name, &format!("admin:{}", me.id))
        .await?;
    Ok(Json(CrlView::from(crl.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_picks_pem_only_when_named() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(wants_pem(&h("application/x-pem-file")));
        assert!(wants_pem(&h("text/plain, Application/X-PEM-File;q=0.9")));
        assert!(!wants_pem(&h("application/pkix-crl")));
        assert!(!wants_pem(&h("*/*")));
        assert!(!wants_pem(&HeaderMap::new()));
    }

    #[test]
    fn http_dates_are_imf_fixdate() {
        assert_eq!(
            http_date(784_111_777).unwrap(),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
    }
}
