//! `/v1/ocsp`: RFC 6960 over HTTP, the POST form (DER body) and the GET form
//! (URL-encoded base64 in the path, RFC 6960 appendix A.1). The handlers
//! hand the bytes to the responder and send what it answers.

use crate::ca::responder::{MAX_REQUEST_BYTES, OcspAnswer, RequestForm};
use crate::http::AppState;
use crate::http::error::{ApiError, ocsp_status};
use crate::http::extract::ClientAddr;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};

pub const OCSP_REQUEST: &str = "application/ocsp-request";
const OCSP_RESPONSE: HeaderValue = HeaderValue::from_static("application/ocsp-response");
/// The stable code of a refused request (the body is an OCSP status, not JSON).
pub const ERROR_CODE_HEADER: &str = "keyward-error-code";

/// `POST /v1/ocsp` with `Content-Type: application/ocsp-request`.
pub async fn post(
    State(state): State<AppState>,
    client: ClientAddr,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let is_ocsp = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(OCSP_REQUEST));
    if !is_ocsp {
        return ApiError::new(
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("an OCSP request is sent as {OCSP_REQUEST}"),
        )
        .into_response();
    }
    // One byte over the limit is enough for the responder to say "too large".
    let bytes = match axum::body::to_bytes(body, MAX_REQUEST_BYTES + 1).await {
        Ok(b) => b,
        // Over the limit (or the client went away): too large either way.
        Err(_) => return send(state.ocsp.too_large(MAX_REQUEST_BYTES + 1)),
    };
    send(state.ocsp.respond(RequestForm::Der(&bytes), client.0).await)
}

/// `GET /v1/ocsp/{request}`: the request as URL-encoded base64, read from
/// the raw path (base64 may contain `/`, and is percent-decoded once, by the parser).
pub async fn get(State(state): State<AppState>, client: ClientAddr, uri: Uri) -> Response {
    let segment = uri.path().strip_prefix("/v1/ocsp/").unwrap_or_default();
    send(
        state
            .ocsp
            .respond(RequestForm::Get(segment), client.0)
            .await,
    )
}

fn send(answer: OcspAnswer) -> Response {
    let status = ocsp_status(answer.refused.map(|(r, _)| r));
    let mut resp = (status, answer.body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, OCSP_RESPONSE);
    match (answer.max_age, answer.refused) {
        (Some(secs), None) => {
            if let Ok(v) = HeaderValue::from_str(&format!(
                "max-age={secs}, public, no-transform, must-revalidate"
            )) {
                h.insert(header::CACHE_CONTROL, v);
            }
        }
        _ => {
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
    }
    if let Some((refusal, code)) = answer.refused {
        h.insert(ERROR_CODE_HEADER, HeaderValue::from_static(code));
        if let crate::ca::responder::Refusal::RateLimited { retry_after } = refusal {
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after.as_secs().max(1)),
            );
        }
    }
    resp
}
