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
    let limits = &state.rate_limits;
    let key = key(LimitKind::Registrations, &source_of(client.0));
    let decision = limits
        .limiter
        .check(&key, limits.registrations)
        .await
        .map_err(LimitError::from)?;
    if !decision.allowed {
        state
            .metrics
            .rate_limited(LimitKind::Registrations.as_str());
        return Err(LimitError::Exceeded {
            kind: LimitKind::Registrations,
            retry_after: decision.retry_after,
        }
        .into());
    }
    Ok(next.run(req).await)
}
