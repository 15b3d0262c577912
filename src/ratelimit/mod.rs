//! The `RateLimiter` port: per-key limits on what callers can make the daemon do.
//!
//! A limit is a rate with a burst (the generic cell rate algorithm, GCRA: a
//! token bucket that stores one timestamp per key). That single value per key
//! is what makes the port fit a shared backend: Redis keeps it under the key
//! with a TTL and updates it in one Lua script, exactly as the in-process
//! backend ([`memory::InProcessRateLimiter`]) does under a mutex.
//!
//! Callers do not use the port directly: [`login::GuardedLogin`] wraps admin
//! authentication, and the HTTP layer wraps `POST /v1/registrations`, the way
//! `MeteredKeyStore` wraps a key store.

pub mod failures;
pub mod login;
pub mod memory;

use async_trait::async_trait;
use std::net::IpAddr;
use std::time::Duration;

/// `burst` events at once, refilling smoothly at `burst` per `window`: after
/// a burst, one more event every `window / burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub burst: u32,
    pub window: Duration,
}

impl Limit {
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst: burst.max(1),
            window: window.max(Duration::from_millis(1)),
        }
    }

    /// Time one event occupies in the bucket (GCRA's emission interval), ns.
    fn interval_ns(&self) -> i128 {
        (self.window.as_nanos() as i128 / i128::from(self.burst.max(1))).max(1)
    }

    /// How far ahead of now the bucket may run before it refuses (GCRA's tolerance), ns.
    fn tolerance_ns(&self) -> i128 {
        self.interval_ns() * i128::from(self.burst.max(1))
    }
}

/// The answer for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// When refused: how long until one event is allowed again. Zero when allowed.
    pub retry_after: Duration,
    /// Events still allowed right now (after this one, if it was taken).
    pub remaining: u32,
}

/// The limiter backend failed (a shared backend unreachable). Callers fail
/// closed: the request is refused with 503, never let through unlimited.
/// The daemon's Redis limiter never gets here: it is wrapped in
/// `redis::ratelimit::FallbackRateLimiter`, which answers from the
/// in-process limiter while Redis is down (limits per daemon, not none).
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    #[error("rate limiter backend `{backend}` is unavailable")]
    Unavailable {
        backend: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl RateLimitError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unavailable { .. } => "rate_limiter_unavailable",
        }
    }
}

/// The port. Keys are opaque strings (see [`key`]); time is the backend's
/// own (a Clock in process, the server's clock in Redis), so that every
/// daemon sharing a backend agrees.
#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    /// Short backend name (`memory`, `redis`).
    fn backend(&self) -> &'static str;

    /// Takes one event from `key`'s bucket if `limit` allows it.
    async fn check(&self, key: &str, limit: Limit) -> Result<Decision, RateLimitError>;

    /// Whether one more event would be allowed, without taking it.
    async fn peek(&self, key: &str, limit: Limit) -> Result<Decision, RateLimitError>;

    /// Keys currently remembered (for the gauge; a shared backend may estimate).
    fn tracked_keys(&self) -> usize;
}

/// What a limit counts; part of the key and of the 429 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// `POST /v1/registrations` per client address.
    Registrations,
    /// Failed admin logins per client address.
    AdminLoginFailures,
    /// Renewal nonces and renewals per client address.
    Renewals,
    /// Freshly signed OCSP responses (nonce, several CertIDs, unknown
    /// serials) per client address.
    OcspFresh,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Registrations => "registrations",
            Self::AdminLoginFailures => "admin_login_failures",
            Self::Renewals => "renewals",
            Self::OcspFresh => "ocsp_fresh",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Registrations => "registration submissions",
            Self::AdminLoginFailures => "failed admin logins",
            Self::Renewals => "renewal requests",
            Self::OcspFresh => "freshly signed OCSP responses",
        }
    }
}

/// A request refused by a limit (HTTP 429 with `Retry-After`), or a
/// limiter that could not answer.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("too many {} from this address; retry in {} s", .kind.describe(), retry_after_secs(*.retry_after))]
    Exceeded {
        kind: LimitKind,
        retry_after: Duration,
    },
    #[error(transparent)]
    Backend(#[from] RateLimitError),
}

impl LimitError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Exceeded { .. } => "rate_limited",
            Self::Backend(b) => b.code(),
        }
    }

    /// Whole seconds for `Retry-After` (at least 1), when refused.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::Exceeded { retry_after, .. } => Some(retry_after_secs(*retry_after)),
            Self::Backend(_) => None,
        }
    }
}

/// Rounds up to whole seconds, at least 1: a client that waits this long is
/// allowed again.
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// The source a limit is counted against: an IPv4 address as it is, an IPv6
/// address by its /64 (one host usually holds a whole /64 and can rotate
/// through it freely), `unknown` when the server has no peer address.
pub fn source_of(addr: Option<IpAddr>) -> String {
    match addr {
        Some(IpAddr::V4(v4)) => v4.to_string(),
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                let prefix = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{prefix}/64")
            }
        },
        None => "unknown".to_string(),
    }
}

/// The limiter key of `kind` for `source`.
pub fn key(kind: LimitKind, source: &str) -> String {
    format!("{}:{source}", kind.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_group_ipv6_by_64_and_unwrap_mapped_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_of(Some(a)), source_of(Some(b)));
        assert_ne!(source_of(Some(a)), source_of(Some(c)));
        assert_eq!(source_of(Some(a)), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source_of(Some(mapped)), "192.0.2.7");
        assert_eq!(source_of(None), "unknown");
        assert_eq!(
            key(LimitKind::Registrations, "192.0.2.7"),
            "registrations:192.0.2.7"
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(30)), 30);
        assert_eq!(retry_after_secs(Duration::from_millis(30_001)), 31);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
