//! [`RateLimiter`] in Redis: the GCRA of [`crate::ratelimit`] in one Lua
//! script, with the server's `TIME` as the clock, so every daemon of a
//! deployment shares one bucket per key and agrees on time.
//!
//! [`FallbackRateLimiter`] keeps limits working while Redis is down: it
//! answers from the in-process limiter instead (per-daemon limits, so a
//! deployment of N daemons briefly allows up to N times the limit), counts
//! each fallback in `keyward_redis_errors_total{op="ratelimit"}`, and goes
//! back to Redis as soon as a call succeeds. This replaces the port's
//! fail-closed rule for this one backend: refusing every registration and
//! admin login because a cache is down would turn a Redis outage into a
//! keyward outage.

use super::RedisHandle;
use crate::ratelimit::{Decision, Limit, RateLimitError, RateLimiter};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// GCRA on one key. KEYS[1]: the key; ARGV: interval and tolerance (µs),
/// `1` to take an event or `0` to peek. Returns {allowed, retry_after_us,
/// remaining}. Times in microseconds stay exact in Lua's doubles.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local stored = redis.call('GET', KEYS[1])
local tat = now
if stored then tat = math.max(tonumber(stored), now) end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if now < allow_at then
  return {0, allow_at - now, 0}
end
local after = tat
if ARGV[3] == '1' then
  after = new_tat
  local ttl_ms = math.ceil((new_tat - now) / 1000) + 1
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl_ms)
end
return {1, 0, math.floor((now - (after - tolerance)) / interval)}
"#;

pub struct RedisRateLimiter {
    handle: Arc<RedisHandle>,
    script: ::redis::Script,
}

impl RedisRateLimiter {
    pub fn new(handle: Arc<RedisHandle>) -> Self {
        Self {
            handle,
            script: ::redis::Script::new(GCRA),
        }
    }

    async fn decide(
        &self,
        key: &str,
        limit: Limit,
        take: bool,
    ) -> Result<Decision, RateLimitError> {
        let interval = (limit.window.as_micros() / u128::from(limit.burst.max(1))).max(1);
        let tolerance = interval * u128::from(limit.burst.max(1));
        let k = self.handle.key(&format!("rl:{key}"));
        let script = &self.script;
        let (allowed, retry_us, remaining): (i64, i64, i64) = self
            .handle
            .run("ratelimit", |mut c| async move {
                script
                    .key(&k)
                    .arg(interval.to_string())
                    .arg(tolerance.to_string())
                    .arg(if take { "1" } else { "0" })
                    .invoke_async(&mut c)
                    .await
            })
            .await
            .map_err(|e| RateLimitError::Unavailable {
                backend: "redis",
                source: Box::new(e),
            })?;
        Ok(Decision {
            allowed: allowed == 1,
            retry_after: Duration::from_micros(u64::try_from(retry_us.max(0)).unwrap_or(0)),
            remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX),
        })
    }
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn check(&self, key: &str, limit: Limit) -> Result<Decision, RateLimitError> {
        self.decide(key, limit, true).await
    }

    async fn peek(&self, key: &str, limit: Limit) -> Result<Decision, RateLimitError> {
        self.decide(key, limit, false).await
    }

    /// Not counted: keys live in Redis with their own TTLs (`SCAN` on every
    /// scrape would cost more than the number is worth).
    fn tracked_keys(&self) -> usize {
        0
    }
}

/// Redis while it answers, the in-process limiter while it does not.
pub struct FallbackRateLimiter {
    primary: Arc<dyn RateLimiter>,
    fallback: Arc<dyn RateLimiter>,
}

impl FallbackRateLimiter {
    pub fn new(primary: Arc<dyn RateLimiter>, fallback: Arc<dyn RateLimiter>) -> Self {
        Self { primary, fallback }
    }
}

#[async_trait]
impl RateLimiter for FallbackRateLimiter {
    fn backend(&self) -> &'static str {
        self.primary.backend()
    }

    async fn check(&self, key: &str, limit: Limit) -> Result<Decision, RateLimitError> {
        match self.primary.check(key, limit).await {
            Ok(d) => Ok(d),
            // Counted by the handle (`keyward_redis_errors_total{op="ratelimit"}`).
            Err(_) => self.fallback.check(key, limit).await,
        }
    }

    async fn peek(&self, key: &str, limit: Limit) -> Result<Decision, RateLimitError> {
        match self.primary.peek(key, limit).await {
            Ok(d) => Ok(d),
            Err(_) => self.fallback.peek(key, limit).await,
        }
    }

    /// What the fallback remembers (Redis keys are not counted).
    fn tracked_keys(&self) -> usize {
        self.fallback.tracked_keys()
    }
}
