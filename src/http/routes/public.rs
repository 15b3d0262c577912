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

/// Readiness: the store and every key store that holds an issuing CA's key
/// answer. Other key stores (an offline root) are reported, not required.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let needed = state.ca.issuing_keystores();
    let mut keystores = serde_json::Map::new();
    let mut ok = true;
    for (name, ks) in state.keystores.iter() {
        let health = ks.health().await;
        if let Err(e) = &health {
            tracing::warn!(keystore = name, error = %e, "readiness: key store check failed");
        }
        let required = needed.contains(name);
        ok &= health.is_ok() || !required;
        keystores.insert(
            name.to_string(),
            json!({ "status": if health.is_ok() { "ok" } else { "unavailable" }, "required": required }),
        );
    }
    let store = state.store.health().await;
    if let Err(e) = &store {
        tracing::warn!(error = %e, "readiness: store check failed");
    }
    ok &= store.is_ok();
    let hsm_ok = needed
        .iter()
        .all(|n| keystores.get(n).is_some_and(|v| v["status"] == "ok"));
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({
            "status": if ok { "ready" } else { "not_ready" },
            "hsm": if hsm_ok { "ok" } else { "unavailable" },
            "keystores": keystores,
            "store": if store.is_ok() { "ok" } else { "unavailable" },
        })),
    )
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// `GET /v1/openapi.json`: the API description, kept beside the routes and
/// checked against them by the daemon tests.
pub async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../openapi.json"),
    )
}
