//! Unauthenticated endpoints: CA chains, health, metrics.

use crate::http::AppState;
use crate::http::error::ApiError;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::json;

/// `GET /v1/ca/{name}/chain`: this CA's certificate then its parents', PEM.
pub async fn ca_chain(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let issuer = state.ca.issuer(&name)?;
    Ok((
        [(header::CONTENT_TYPE, "application/pem-certificate-chain")],
        issuer.chain_pem.clone(),
    ))
}

/// Liveness: the process answers.
pub async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// Readiness: the HSM session pool and the store both answer.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let hsm = state.keystore.health().await;
    let store = state.store.health().await;
    let ok = hsm.is_ok() && store.is_ok();
    if let Err(e) = &hsm {
        tracing::warn!(error = %e, "readiness: HSM check failed");
    }
    if let Err(e) = &store {
        tracing::warn!(error = %e, "readiness: store check failed");
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({
            "status": if ok { "ready" } else { "not_ready" },
            "hsm": if hsm.is_ok() { "ok" } else { "unavailable" },
            "store": if store.is_ok() { "ok" } else { "unavailable" },
        })),
    )
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
