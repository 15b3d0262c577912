//! The HTTP surface: routes, extractors, middleware. Handlers translate
//! between JSON and service calls; they hold no domain logic.

pub mod error;
mod extract;
mod limits;
mod page;
mod routes;
mod views;

use crate::auth::admins::AdminService;
use crate::ca::CaService;
use crate::ca::crls::CrlPublisher;
use crate::jobs::readiness::Readiness;
use crate::keystore::KeyStores;
use crate::metrics::Metrics;
use crate::ratelimit::login::GuardedLogin;
use crate::ratelimit::{Limit, RateLimiter};
use crate::registry::RegistryService;
use crate::store::Store;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use std::sync::Arc;
use std::time::Duration;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

/// Everything handlers need; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<RegistryService>,
    pub ca: Arc<CaService>,
    /// The current CRL per CA, served from memory.
    pub crls: Arc<CrlPublisher>,
    pub admins: Arc<AdminService>,
    pub store: Arc<dyn Store>,
    pub keystores: KeyStores,
    pub metrics: Arc<Metrics>,
    /// Proxies whose `X-Forwarded-For` is believed (`server.trusted_proxies`).
    pub trusted_proxies: Arc<Vec<crate::model::IpNet>>,
    /// Admin authentication behind the per-source failed-login limit; every
    /// route that accepts an admin token authenticates through it.
    pub login: Arc<GuardedLogin>,
    /// Per-source limits on requests (`[limits]`).
    pub rate_limits: RateLimits,
    /// Health as last checked by the readiness job; `/readyz` reads only this.
    pub readiness: Arc<Readiness>,
    /// The OCSP responder (`/v1/ocsp`).
    pub ocsp: Arc<crate::ca::responder::Responder>,
    /// Broker ACL updates: device lifecycle routes flush them before answering.
    pub broker: Arc<crate::broker::BrokerUpdates>,
    /// Key rotations (`/v1/admin/rotations`).
    pub rotator: Arc<crate::rotation::Rotator>,
    /// Backups (`/v1/admin/backups`); `None` without a `[backup]` section.
    pub backups: Option<Arc<crate::backup::service::BackupService>>,
    /// The audit key, checkpoints and verification (`/v1/admin/audit`).
    pub audit: Arc<crate::audit::service::AuditService>,
    /// Short-lived shared state (device sessions, OCSP responses): Redis
    /// with `[redis]`, else in process.
    pub cache: Arc<dyn crate::cache::Cache>,
    /// Tells every daemon of the deployment what to forget (device
    /// revoked, admin disabled, policy reloaded).
    pub bus: Arc<dyn crate::cache::InvalidationBus>,
}

impl AppState {
    /// Publishes `inv` after a committed change. Never fails the request:
    /// this daemon has already applied it (the bus delivers locally first),
    /// and a daemon that missed it drops its caches when its subscription
    /// comes back (docs/operations.md, Redis).
    pub async fn invalidate(&self, inv: crate::cache::Invalidation) {
        if let Err(e) = self.bus.publish(inv).await {
            tracing::warn!(error = %e, "invalidation not published to the other daemons");
        }
    }
}

/// The rate limiter and the limits the HTTP layer applies with it.
#[derive(Clone)]
pub struct RateLimits {
    pub limiter: Arc<dyn RateLimiter>,
    /// `POST /v1/registrations` per client address.
    pub registrations: Limit,
    /// `GET /v1/devices/{id}/renew/nonce` and `POST /v1/devices/{id}/renew`
    /// per client address (one bucket for both).
    pub renewals: Limit,
}

/// HTTP limits and logging choices from the config.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub body_limit_bytes: usize,
    pub request_timeout: Duration,
    /// Log request paths (they carry registration and device ids). Off by default.
    pub log_sensitive_details: bool,
}

pub fn router(state: AppState, limits: Limits) -> Router {
    let x_request_id = header::HeaderName::from_static("x-request-id");
    Router::new()
        .merge(routes::router(&state))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .layer(DefaultBodyLimit::max(limits.body_limit_bytes))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, limits.request_timeout))
        .layer(middleware::from_fn(error::json_error_bodies))
        .layer(TraceLayer::new_for_http().make_span_with(move |req: &Request| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            // The route template (`/v1/registrations/{id}`) is always safe to log;
            // the concrete path names a registration or device, a sensitive detail.
            let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str()).unwrap_or("unmatched");
            if limits.log_sensitive_details {
                tracing::info_span!("request", method = %req.method(), route, path = %req.uri().path(), request_id = %id)
            } else {
                tracing::info_span!("request", method = %req.method(), route, request_id = %id)
            }
        }))
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
        .layer(SetSensitiveRequestHeadersLayer::new([header::AUTHORIZATION]))
        .with_state(state)
}

/// Counts and times requests by method, route template and status (the
/// latency by method and route only). Every label value comes from a fixed
/// set (the standard methods or `other`, the route table or `unmatched`),
/// so made-up methods and paths cannot add series. The time runs until the
/// handler's response is ready, not until its body is sent.
async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = std::time::Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let method = crate::metrics::method_label(req.method().as_str());
    let resp = next.run(req).await;
    let route = route.as_deref().unwrap_or(crate::metrics::UNMATCHED_ROUTE);
    state.metrics.http(method, route, resp.status().as_u16());
    state
        .metrics
        .ops
        .http_request_duration
        .with_label_values(&[method, route])
        .observe(start.elapsed().as_secs_f64());
    resp
}
