//! Route table.

mod admin;
mod audit;
mod backup;
mod crl;
mod devices;
mod enrollment;
mod lifecycle;
mod ocsp;
mod public;
mod registrations;
mod roster;
mod rotation;
mod tokens;

use super::AppState;
use axum::Router;
use axum::routing::{get, post};

pub fn router(state: &AppState) -> Router<AppState> {
    Router::new()
        .route(
            "/v1/registrations",
            post(registrations::submit).route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                super::limits::registrations,
            )),
        )
        .route(
            "/v1/registrations/nonce",
            get(registrations::enroll_nonce).route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                super::limits::registrations,
            )),
        )
        .route("/v1/registrations/{id}", get(registrations::status))
        .route(
            "/v1/registrations/{id}/credentials",
            get(registrations::credentials),
        )
        .route(
            "/v1/registrations/{id}/credentials/confirm",
            post(registrations::confirm_credentials),
        )
        .route("/v1/devices/me/config", get(registrations::my_config))
        .route(
            "/v1/devices/{id}/renew",
            post(devices::renew).route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                super::limits::renewals,
            )),
        )
        .route(
            "/v1/devices/{id}/renew/nonce",
            get(devices::nonce).route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                super::limits::renewals,
            )),
        )
        .route(
            "/v1/auth/nonce",
            post(tokens::nonce).route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                super::limits::renewals,
            )),
        )
        .route(
            "/v1/auth/token",
            post(tokens::token).route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                super::limits::renewals,
            )),
        )
        .route("/v1/auth/jwks", get(tokens::jwks))
        .route("/v1/auth/introspect", post(tokens::introspect))
        .route("/v1/admin/devices", get(lifecycle::list_devices))
        .route("/v1/admin/devices/{id}", get(lifecycle::show_device))
        .route(
            "/v1/admin/devices/{id}/revoke",
            post(lifecycle::revoke_device),
        )
        .route(
            "/v1/admin/devices/{id}/suspend",
            post(lifecycle::suspend_device),
        )
        .route(
            "/v1/admin/devices/{id}/resume",
            post(lifecycle::resume_device),
        )
        .route(
            "/v1/admin/devices/{id}/allow-renewal",
            post(lifecycle::allow_renewal),
        )
        .route("/v1/admin/certs", get(lifecycle::list_certificates))
        .route("/v1/admin/certs/expiring", get(lifecycle::list_expiring))
        .route("/v1/admin/certs/{serial}", get(lifecycle::show_certificate))
        .route(
            "/v1/admin/certs/{serial}/revoke",
            post(lifecycle::revoke_certificate),
        )
        .route(
            "/v1/admin/certs/{serial}/release-hold",
            post(lifecycle::release_hold),
        )
        .route("/v1/ca/{name}/chain", get(public::ca_chain))
        .route("/v1/ca/{name}/crl", get(crl::get_crl))
        .route("/v1/ca/{name}/certificate", get(crl::get_certificate))
        .route("/v1/ca/{name}/crls", get(crl::get_all_crls))
        .route("/v1/ca/{name}/bundle", get(crl::get_bundle))
        .route("/v1/ca/{name}/keys/{key}/crl", get(crl::get_key_crl))
        .route(
            "/v1/ca/{name}/keys/{key}/certificate",
            get(crl::get_key_certificate),
        )
        .route(
            "/v1/admin/rotations",
            get(rotation::list).post(rotation::start),
        )
        .route("/v1/admin/rotations/{id}", get(rotation::show))
        .route("/v1/admin/backups", get(backup::list).post(backup::start))
        .route("/v1/admin/backups/{id}", get(backup::show))
        .route("/v1/admin/backups/{id}/verify", post(backup::verify))
        .route(
            "/v1/admin/rotations/{id}/certify-with-root-card",
            post(rotation::certify_with_root_card),
        )
        .route("/v1/admin/cas/{name}/crl", post(crl::publish_crl))
        .route("/v1/ocsp", post(ocsp::post))
        .route("/v1/ocsp/{*request}", get(ocsp::get))
        .route("/v1/admin/registrations", get(admin::list_registrations))
        .route(
            "/v1/admin/registrations/{id}",
            get(admin::show_registration),
        )
        .route("/v1/admin/registrations/{id}/approve", post(admin::approve))
        .route("/v1/admin/registrations/{id}/deny", post(admin::deny))
        .route("/v1/admin/admins", get(admin::list_admins))
        .route("/v1/admin/admins/{id}/disable", post(admin::disable_admin))
        .route("/v1/admin/admins/{id}/role", post(roster::set_role))
        .route("/v1/admin/invitations", post(roster::invite))
        .route("/v1/admin/requests", get(roster::list_requests))
        .route(
            "/v1/admin/requests/{id}/approve",
            post(roster::approve_request),
        )
        .route("/v1/admin/requests/{id}/deny", post(roster::deny_request))
        .route("/v1/invitations/redeem", post(roster::redeem))
        .route("/v1/admin/cas", get(admin::list_cas))
        .route(
            "/v1/admin/tokens",
            get(enrollment::list_tokens).post(enrollment::create_token),
        )
        .route(
            "/v1/admin/tokens/{id}/revoke",
            post(enrollment::revoke_token),
        )
        .route(
            "/v1/admin/policies/reload",
            post(enrollment::reload_policies),
        )
        .route("/v1/admin/audit", get(audit::report))
        .route("/v1/admin/audit/export", get(audit::export))
        .route("/healthz", get(public::healthz))
        .route("/readyz", get(public::readyz))
        .route("/metrics", get(public::metrics))
        .route("/v1/openapi.json", get(public::openapi))
}

/// Parses a UUID path segment.
fn parse_id(s: &str) -> Result<uuid::Uuid, super::error::ApiError> {
    uuid::Uuid::parse_str(s).map_err(|_| {
        super::error::ApiError::bad_request("invalid_id", format!("`{s}` is not a UUID"))
    })
}
