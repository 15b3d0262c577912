//! Rate-limit middleware: per-source limits wrapped around routes, not in handlers.

use super::AppState;
use super::error::ApiError;
use super::extract::ClientAddr;
use crate::ratelimit::{LimitError, LimitKind, key, source_of};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// `POST /v1/registrations`: every submission from a source, accepted or
/// not, takes one event from that source's bucket; past the limit the
/// answer is 429 `rate_limited` with `Retry-After`, before the body is read.
pub async fn registrations(
    State(state): State<AppState>,
    client: ClientAddr,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let limit = state.rate_limits.registrations;
    limited(&state, client, LimitKind::Registrations, limit, req, next).await
}

/// `GET /v1/devices/{id}/renew/nonce` and `POST /v1/devices/{id}/renew`:
/// one bucket per source for both, the same way.
pub async fn renewals(
    State(state): State<AppState>,
    client: ClientAddr,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let limit = state.rate_limits.renewals;
    limited(&state, client, LimitKind::Renewals, limit, req, next).await
}

async fn limited(
    state: &AppState,
    client: ClientAddr,
    kind: LimitKind,
    limit: crate::ratelimit::Limit,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let key = key(kind, &source_of(client.0));
    let decision = state
        .rate_limits
        .limiter
        .check(&key, limit)
        .await
        .map_err(LimitError::from)?;
    if !decision.allowed {
        state.metrics.rate_limited(kind.as_str());
        return Err(LimitError::Exceeded {
            kind,
            retry_after: decision.retry_after,
        }
        .into());
    }
    Ok(next.run(req).await)
}
