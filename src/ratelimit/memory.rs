//! The in-process `RateLimiter` backend: GCRA timestamps in sharded, bounded maps.
//!
//! A key whose timestamp lies in the past has a full bucket, which is the
//! same as not being remembered at all, so such keys are dropped whenever a
//! shard fills up. If a flood of distinct sources still fills a shard, the
//! keys nearest to a full bucket go first: a source deep in debt (one that
//! is being refused) is the last to be forgotten, so a flood of fresh
//! addresses cannot buy a blocked source a clean slate cheaply.

use super::{Decision, Limit, RateLimitError, RateLimiter};
use crate::clock::Clock;
use async_trait::async_trait;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

const SHARDS: usize = 16;

pub struct InProcessRateLimiter {
    clock: Arc<dyn Clock>,
    shards: Vec<Mutex<HashMap<Box<str>, i128>>>,
    /// Most keys one shard holds.
    shard_capacity: usize,
    hasher: RandomState,
}

impl InProcessRateLimiter {
    /// Remembers at most `max_keys` keys (rounded up to a multiple of the
    /// shard count, at least one per shard).
    pub fn new(clock: Arc<dyn Clock>, max_keys: usize) -> Self {
        Self {
            clock,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            shard_capacity: max_keys.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
        }
    }

    fn now_ns(&self) -> i128 {
        self.clock.now().unix_timestamp_nanos()
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<Box<str>, i128>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        &self.shards[i]
    }

    fn decide(&self, key: &str, limit: Limit, take: bool) -> Decision {
        let now = self.now_ns();
        let interval = limit.interval_ns();
        let tolerance = limit.tolerance_ns();
        let mut map = match self.shard(key).lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let tat = map.get(key).copied().unwrap_or(now).max(now);
        let new_tat = tat + interval;
        let allow_at = new_tat - tolerance;
        if now < allow_at {
            return Decision {
                allowed: false,
                retry_after: ns_to_duration(allow_at - now),
                remaining: 0,
            };
        }
        let after = if take { new_tat } else { tat };
        let remaining = ((now - (after - tolerance)) / interval).clamp(0, i128::from(u32::MAX));
        if take {
            if !map.contains_key(key) && map.len() >= self.shard_capacity {
                evict(&mut map, now, self.shard_capacity);
            }
            map.insert(key.into(), new_tat);
        }
        Decision {
            allowed: true,
            retry_after: Duration::ZERO,
            remaining: remaining as u32,
        }
    }
}

/// Makes room in a full shard: drops keys with full buckets, then, if the
/// shard is still full, the eighth of the keys nearest to a full bucket.
fn evict(map: &mut HashMap<Box<str>, i128>, now: i128, capacity: usize) {
    map.retain(|_, tat| *tat > now);
    if map.len() < capacity {
        return;
    }
    let drop = (capacity / 8).max(1);
    let mut tats: Vec<i128> = map.values().copied().collect();
    let (_, threshold, _) = tats.select_nth_unstable(drop - 1);
    let threshold = *threshold;
    let mut dropped = 0;
    map.retain(|_, tat| {
        if dropped < drop && *tat <= threshold {
            dropped += 1;
            false
        } else {
            true
        }
    });
}

fn ns_to_duration(ns: i128) -> Duration {
    Duration::from_nanos(u64::try_from(ns.max(0)).unwrap_or(u64::MAX))
}

#[async_trait]
impl RateLimiter for InProcessRateLimiter {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn check(&self, key: &str, limit: Limit) -> Result<Decision, RateLimitError> {
        Ok(self.decide(key, limit, true))
    }

    async fn peek(&self, key: &str, limit: Limit) -> Result<Decision, RateLimitError> {
        Ok(self.decide(key, limit, false))
    }

    fn tracked_keys(&self) -> usize {
        self.shards
            .iter()
            .map(|s| match s.lock() {
                Ok(g) => g.len(),
                Err(p) => p.into_inner().len(),
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use time::macros::datetime;

    fn limiter(max_keys: usize) -> (Arc<ManualClock>, InProcessRateLimiter) {
        let clock = Arc::new(ManualClock::new(datetime!(2030-01-01 00:00 UTC)));
        let l = InProcessRateLimiter::new(clock.clone(), max_keys);
        (clock, l)
    }

    #[tokio::test]
    async fn a_burst_then_one_per_interval_with_exact_retry_after() {
        let (clock, l) = limiter(1000);
        let limit = Limit::new(3, Duration::from_secs(60));
        for want_remaining in [2, 1, 0] {
            let d = l.check("k", limit).await.unwrap();
            assert!(d.allowed);
            assert_eq!(d.remaining, want_remaining);
        }
        let d = l.check("k", limit).await.unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_secs(20));
        // A refused event takes nothing: the wait does not grow.
        let d = l.check("k", limit).await.unwrap();
        assert_eq!(d.retry_after, Duration::from_secs(20));
        // Other keys are independent.
        assert!(l.check("other", limit).await.unwrap().allowed);

        clock.advance(time::Duration::seconds(19));
        let d = l.peek("k", limit).await.unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_secs(1));
        clock.advance(time::Duration::seconds(1));
        assert!(l.peek("k", limit).await.unwrap().allowed);
        // Peeking takes nothing.
        assert!(l.peek("k", limit).await.unwrap().allowed);
        assert!(l.check("k", limit).await.unwrap().allowed);
        assert!(!l.check("k", limit).await.unwrap().allowed);

        // After a whole window the full burst is back.
        clock.advance(time::Duration::seconds(60));
        for _ in 0..3 {
            assert!(l.check("k", limit).await.unwrap().allowed);
        }
        assert!(!l.check("k", limit).await.unwrap().allowed);
    }

    #[tokio::test]
    async fn memory_stays_bounded_under_a_flood_of_distinct_keys() {
        let (clock, l) = limiter(64);
        let strict = Limit::new(2, Duration::from_secs(600));
        // A source in debt: refused for a while.
        assert!(l.check("attacker", strict).await.unwrap().allowed);
        assert!(l.check("attacker", strict).await.unwrap().allowed);
        assert!(!l.check("attacker", strict).await.unwrap().allowed);
        let light = Limit::new(10, Duration::from_secs(60));
        for i in 0..100_000 {
            assert!(l.check(&format!("src-{i}"), light).await.unwrap().allowed);
            if i % 1000 == 0 {
                clock.advance(time::Duration::milliseconds(1));
            }
        }
        assert!(
            l.tracked_keys() <= 64,
            "{} keys remembered",
            l.tracked_keys()
        );
        // The flood did not wipe the blocked source's debt.
        assert!(!l.peek("attacker", strict).await.unwrap().allowed);
        // Idle keys are dropped when room is needed.
        clock.advance(time::Duration::seconds(3600));
        assert!(l.check("late", light).await.unwrap().allowed);
        for i in 0..70 {
            assert!(l.check(&format!("again-{i}"), light).await.unwrap().allowed);
        }
        assert!(l.tracked_keys() <= 64);
    }
}
