//! [`LeaderLock`] in Redis: `SET <prefix>lock:<name> holder NX PX ttl` to
//! take it, a compare-and-extend script to renew it and a compare-and-delete
//! script to release it, so only the holder can extend or free it. The lease
//! time is the Redis server's (`PX`), the same for every daemon.
//!
//! While Redis is down no daemon can renew: the leader steps down one lease
//! time after its last renewal (see [`crate::jobs::leader`]) and leader-only
//! jobs pause everywhere — safe, since they only do work that can wait —
//! and resume when Redis answers again.
//!
//! `<prefix>lock:<name>:last` remembers the last holder that took the lock,
//! so a new holder learns its predecessor in the same script
//! ([`LeaderLock::previous_holder`], named in the `scheduler.leader` event).

use super::RedisHandle;
use crate::jobs::JobError;
use crate::jobs::leader::{LeaderLock, SCHEDULER_LEASE, new_holder_id};
use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;

/// KEYS: lock, last holder. ARGV: holder, ttl ms. Returns {held, previous}
/// where previous is the last holder when this call took the lock ('' else).
const ACQUIRE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, ''}
end
if cur then
  return {0, ''}
end
local last = redis.call('GET', KEYS[2]) or ''
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[1])
return {1, last}
"#;

/// KEYS: lock. ARGV: holder. Deletes only the holder's own lock.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

pub struct RedisLeaderLock {
    handle: Arc<RedisHandle>,
    key: String,
    last_key: String,
    holder: String,
    ttl: Duration,
    acquire: ::redis::Script,
    release: ::redis::Script,
    previous: Mutex<Option<String>>,
}

impl RedisLeaderLock {
    /// The scheduler's lock for this process (a fresh holder id).
    pub fn new(handle: Arc<RedisHandle>, ttl: Duration) -> Self {
        Self::named(handle, SCHEDULER_LEASE, new_holder_id(), ttl)
    }

    pub fn named(
        handle: Arc<RedisHandle>,
        name: &str,
        holder: impl Into<String>,
        ttl: Duration,
    ) -> Self {
        Self {
            key: handle.key(&format!("lock:{name}")),
            last_key: handle.key(&format!("lock:{name}:last")),
            handle,
            holder: holder.into(),
            ttl,
            acquire: ::redis::Script::new(ACQUIRE),
            release: ::redis::Script::new(RELEASE),
            previous: Mutex::new(None),
        }
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

#[async_trait]
impl LeaderLock for RedisLeaderLock {
    /// `now` is not used: the lease runs on the Redis server's clock.
    async fn acquire_or_renew(&self, _now: OffsetDateTime) -> Result<bool, JobError> {
        let (key, last_key, holder, ttl) = (
            self.key.clone(),
            self.last_key.clone(),
            self.holder.clone(),
            self.ttl_ms(),
        );
        let script = &self.acquire;
        let (held, previous): (i64, String) = self
            .handle
            .run("lock", |mut c| async move {
                script
                    .key(&key)
                    .key(&last_key)
                    .arg(&holder)
                    .arg(ttl)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if held == 1 && !previous.is_empty() {
            let previous = Some(previous).filter(|p| *p != self.holder);
            if let Ok(mut p) = self.previous.lock() {
                *p = previous;
            }
        }
        Ok(held == 1)
    }

    async fn release(&self) {
        let (key, holder) = (self.key.clone(), self.holder.clone());
        let script = &self.release;
        if let Err(e) = self
            .handle
            .run("lock", |mut c| async move {
                script
                    .key(&key)
                    .arg(&holder)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await
        {
            tracing::warn!(code = e.code(), error = %e, "could not release the leader lock; it runs out by itself");
        }
    }

    fn holder_id(&self) -> &str {
        &self.holder
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }

    fn previous_holder(&self) -> Option<String> {
        self.previous.lock().ok().and_then(|p| p.clone())
    }
}
