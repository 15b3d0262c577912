//! Extractors: JSON bodies with our error shape, bearer tokens, admins.

use super::AppState;
use super::error::ApiError;
use crate::auth::Role;
use crate::model::IpNet;
use crate::store::AdminRecord;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts};
use axum::http::request::Parts;
use std::net::{IpAddr, SocketAddr};

/// `axum::Json` whose rejections use the API error body.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// `axum::extract::Query` whose rejections (an unknown parameter, a value
/// of the wrong type) use the API error body: 400 `invalid_query`.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// The bearer token of the request, if any.
pub fn bearer(parts: &Parts) -> Option<String> {
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// An authenticated admin of at least `Auditor` role; handlers check for more.
pub struct Admin(pub AdminRecord);

impl Admin {
    pub fn require(&self, role: Role) -> Result<&AdminRecord, ApiError> {
        if self.0.role.allows(role) {
            Ok(&self.0)
        } else {
            Err(crate::auth::admins::AdminError::Forbidden {
                have: self.0.role,
                need: role,
            }
            .into())
        }
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts);
        let client = ClientAddr::from_request_parts(parts, state).await?;
        Ok(Admin(
            state.login.authenticate(token.as_deref(), client.0).await?,
        ))
    }
}

/// The verified TLS client leaf certificate (DER) of the connection, as a
/// request extension. The TLS listener inserts it after rustls verified the
/// chain; `POST /v1/devices/{id}/renew` takes it as the mTLS proof. Absent
/// on plain HTTP and when the client sent no certificate.
#[derive(Debug, Clone)]
pub struct ClientCertificate(pub Vec<u8>);

/// The raw bearer token, for routes that accept either a registration
/// secret or an admin token.
pub struct Bearer(pub Option<String>);

impl FromRequestParts<AppState> for Bearer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Self::Rejection> {
        Ok(Bearer(bearer(parts)))
    }
}

/// The client's address: the TCP peer, or, when the peer is one of the
/// configured trusted proxies, the nearest untrusted address in
/// `X-Forwarded-For` (read right to left, so a client cannot put a fake
/// address in front of what the proxy appended). `None` only when the
/// server runs without connect info (in-process tests).
#[derive(Debug, Clone)]
pub struct ClientAddr(pub Option<IpAddr>);

impl ClientAddr {
    pub fn as_string(&self) -> Option<String> {
        self.0.map(|ip| ip.to_string())
    }
}

/// Parses one `X-Forwarded-For` entry: an address, optionally with a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`), as some proxies write them.
fn forwarded_entry(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    s.parse::<SocketAddr>().ok().map(|a| a.ip())
}

/// Resolves the client address from the peer and the forwarded chain:
/// right to left, each entry parsed only when reached, stopping at the
/// first address that is not a trusted proxy. Entries left of it were
/// written by the client and are never read. An unreadable entry reached
/// before that can only come from a trusted proxy's own misconfiguration:
/// the nearest address already read stands for the client.
pub fn client_addr(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let Some(chain) = forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for part in chain.rsplit(',') {
        match forwarded_entry(part) {
            Some(ip) => {
                client = ip;
                if !is_trusted(ip) {
                    break;
                }
            }
            None => {
                tracing::warn!("unreadable X-Forwarded-For entry from a trusted proxy");
                break;
            }
        }
    }
    client
}

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() else {
            return Ok(ClientAddr(None));
        };
        // Several X-Forwarded-For headers are one list, in order.
        let joined: Vec<&str> = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let forwarded = (!joined.is_empty()).then(|| joined.join(","));
        Ok(ClientAddr(Some(client_addr(
            peer.ip(),
            forwarded.as_deref(),
            &state.trusted_proxies,
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        // Untrusted peer: the header is ignored.
        assert_eq!(
            client_addr(ip("192.0.2.9"), Some("198.51.100.1"), &trusted),
            ip("192.0.2.9")
        );
        // Trusted peer: the nearest untrusted hop, right to left.
        assert_eq!(
            client_addr(
                ip("10.0.0.2"),
                Some("203.0.113.66, 198.51.100.1, 10.0.0.3"),
                &trusted
            ),
            ip("198.51.100.1")
        );
        // What the client wrote left of the first untrusted hop is never
        // read, garbage or not: it cannot make itself look like the proxy.
        assert_eq!(
            client_addr(ip("10.0.0.2"), Some("junk, 198.51.100.1"), &trusted),
            ip("198.51.100.1")
        );
        assert_eq!(
            client_addr(ip("10.0.0.2"), Some("x"), &trusted),
            ip("10.0.0.2")
        );
        assert_eq!(
            client_addr(ip("10.0.0.2"), Some("10.9.9.9, x, 203.0.113.5"), &trusted),
            ip("203.0.113.5")
        );
        // Ports, as some proxies write them.
        assert_eq!(
            client_addr(ip("10.0.0.2"), Some("198.51.100.1:4711"), &trusted),
            ip("198.51.100.1")
        );
        assert_eq!(
            client_addr(ip("10.0.0.2"), Some("[2001:db8::1]:4711"), &trusted),
            ip("2001:db8::1")
        );
        // No header: the proxy itself.
        assert_eq!(client_addr(ip("10.0.0.2"), None, &trusted), ip("10.0.0.2"));
        // No trusted proxies configured: always the peer.
        assert_eq!(
            client_addr(ip("10.0.0.2"), Some("198.51.100.1"), &[]),
            ip("10.0.0.2")
        );
    }
}
