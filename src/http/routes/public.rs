//! Unauthenticated endpoints: CA chains, health, metrics.

use crate::clock::rfc3339;
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

/// Readiness as the background job last found it: the store and every key
/// store that holds an issuing CA's key. Reads the cache only, so polling it
/// opens no HSM session and touches no card; a check older than
/// `limits.readiness_max_age_secs` counts as not ready.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let view = state.readiness.view();
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let mut keystores = serde_json::Map::new();
    if let Some(s) = &view.snapshot {
        for (name, k) in &s.keystores {
            let status = match k.ok {
                Some(ok) => word(ok),
                None => "not_checked",
            };
            keystores.insert(
                name.clone(),
                json!({ "status": status, "required": k.required }),
            );
        }
    }
    let (hsm, store) = match &view.snapshot {
        Some(s) if !view.stale => (word(s.hsm_ok()), word(s.store_ok)),
        _ => ("unknown", "unknown"),
    };
    let status = if view.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "status": if view.ready { "ready" } else { "not_ready" },
        "hsm": hsm,
        "store": store,
        "keystores": keystores,
        "stale": view.stale,
        "checked_at": view.snapshot.as_ref().map(|s| rfc3339(s.checked_at)),
        "age_secs": view.age.map(|a| a.as_secs()),
    });
    // Only with `[redis]`. Down is `degraded`, not unready: requests are
    // still served (per-daemon limits, no shared cache, leader jobs paused).
    if let (Some(up), Some(obj)) = (view.redis_up, body.as_object_mut()) {
        obj.insert("redis".into(), json!(if up { "ok" } else { "degraded" }));
    }
    (status, axum::Json(body))
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state
        .metrics
        .rate_limiter_keys
        .set(i64::try_from(state.rate_limits.limiter.tracked_keys()).unwrap_or(i64::MAX));
    crate::keystore::metered::record_pool_stats(&state.keystores, &state.metrics);
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
