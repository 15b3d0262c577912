//! Readiness, checked in the background and cached for `/readyz`.
//!
//! The refresher job asks the store and every key store that holds an
//! issuing CA's key whether they answer; `/readyz` only reads the result. An anonymous caller can then
//! poll `/readyz` as often as it likes without opening HSM sessions or
//! talking to a card. If the refresher stops, the cache goes stale and
//! readiness turns false after `limits.readiness_max_age_secs`.
//!
//! Key stores that hold no issuing CA key (an offline root on a YubiKey in
//! a safe) are not checked at all: they are reported `not_checked` and the
//! card is touched only when the root is used.

use super::{Job, JobError};
use crate::clock::Clock;
use crate::keystore::KeyStores;
use crate::metrics::Metrics;
use crate::store::Store;
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use time::OffsetDateTime;

/// One key store's state in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyStoreHealth {
    /// Holds an issuing CA's key: readiness depends on it.
    pub required: bool,
    /// `None`: not checked (not required).
    pub ok: Option<bool>,
}

/// The result of one background check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub checked_at: OffsetDateTime,
    pub store_ok: bool,
    pub keystores: BTreeMap<String, KeyStoreHealth>,
}

impl HealthSnapshot {
    /// Every required key store answered.
    pub fn hsm_ok(&self) -> bool {
        self.keystores
            .values()
            .filter(|k| k.required)
            .all(|k| k.ok == Some(true))
    }
}

/// What `/readyz` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadinessView {
    pub ready: bool,
    /// No check yet, or the last one is older than the bound.
    pub stale: bool,
    pub age: Option<Duration>,
    pub snapshot: Option<HealthSnapshot>,
    /// Whether Redis answers now (`None`: no `[redis]`). Not part of
    /// readiness: without Redis a daemon serves, degraded.
    pub redis_up: Option<bool>,
}

/// The cache between the refresher and `/readyz`.
pub struct Readiness {
    clock: Arc<dyn Clock>,
    max_age: Duration,
    snapshot: RwLock<Option<HealthSnapshot>>,
    redis: Option<Arc<dyn crate::redis::RedisHealth>>,
}

impl Readiness {
    pub fn new(clock: Arc<dyn Clock>, max_age: Duration) -> Self {
        Self {
            clock,
            max_age,
            snapshot: RwLock::new(None),
            redis: None,
        }
    }

    /// Reports Redis's state (live, from its health ping) in the view.
    pub fn with_redis(mut self, redis: Arc<dyn crate::redis::RedisHealth>) -> Self {
        self.redis = Some(redis);
        self
    }

    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    pub fn record(&self, snapshot: HealthSnapshot) {
        match self.snapshot.write() {
            Ok(mut g) => *g = Some(snapshot),
            Err(p) => *p.into_inner() = Some(snapshot),
        }
    }

    /// The cached state as of now: ready only if the last check is recent
    /// and found the store and every required key store healthy.
    pub fn view(&self) -> ReadinessView {
        let snapshot = match self.snapshot.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let now = self.clock.now();
        let age = snapshot.as_ref().map(|s| {
            let d = now - s.checked_at;
            // A snapshot from the future (clock stepped back) counts as old.
            if d.is_negative() {
                Duration::MAX
            } else {
                d.unsigned_abs()
            }
        });
        let stale = age.is_none_or(|a| a > self.max_age);
        let ready = !stale && snapshot.as_ref().is_some_and(|s| s.store_ok && s.hsm_ok());
        ReadinessView {
            ready,
            stale,
            age,
            snapshot,
            redis_up: self.redis.as_ref().map(|r| r.redis_up()),
        }
    }
}

/// The job that fills the cache.
pub struct ReadinessRefresher {
    readiness: Arc<Readiness>,
    store: Arc<dyn Store>,
    keystores: KeyStores,
    required: BTreeSet<String>,
    metrics: Arc<Metrics>,
}

impl ReadinessRefresher {
    /// `required`: the key stores holding an issuing CA's key.
    pub fn new(
        readiness: Arc<Readiness>,
        store: Arc<dyn Store>,
        keystores: KeyStores,
        required: BTreeSet<String>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            readiness,
            store,
            keystores,
            required,
            metrics,
        }
    }

    /// How long one health call may take before it counts as a failure.
    fn call_timeout(&self) -> Duration {
        self.interval().max(Duration::from_secs(1))
    }

    /// Checks the store and the required key stores now and caches the result.
    pub async fn refresh(&self, now: OffsetDateTime) -> HealthSnapshot {
        let timeout = self.call_timeout();
        let mut keystores = BTreeMap::new();
        for (name, ks) in self.keystores.iter() {
            let required = self.required.contains(name);
            let ok = if required {
                let ok = match tokio::time::timeout(timeout, ks.health()).await {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        tracing::warn!(keystore = name, error = %e, "readiness: key store check failed");
                        false
                    }
                    Err(_) => {
                        tracing::warn!(
                            keystore = name,
                            ?timeout,
                            "readiness: key store check timed out"
                        );
                        // The cut-short check never reached the metered
                        // wrapper's gauge: a hung HSM is down too.
                        self.metrics.hsm_up.with_label_values(&[name]).set(0);
                        false
                    }
                };
                Some(ok)
            } else {
                None
            };
            keystores.insert(name.to_string(), KeyStoreHealth { required, ok });
        }
        let store_ok = match tokio::time::timeout(timeout, self.store.health()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readiness: store check failed");
                false
            }
            Err(_) => {
                tracing::warn!(?timeout, "readiness: store check timed out");
                false
            }
        };
        let snapshot = HealthSnapshot {
            checked_at: now,
            store_ok,
            keystores,
        };
        self.readiness.record(snapshot.clone());
        self.metrics
            .ready
            .set(i64::from(snapshot.store_ok && snapshot.hsm_ok()));
        snapshot
    }
}

#[async_trait]
impl Job for ReadinessRefresher {
    fn name(&self) -> &'static str {
        "readiness"
    }

    /// Every daemon: the cache is this process's `/readyz`.
    fn scope(&self) -> super::JobScope {
        super::JobScope::EveryDaemon
    }

    /// Three checks per staleness bound, so one slow or lost check does not
    /// flip readiness.
    fn interval(&self) -> Duration {
        (self.readiness.max_age() / 3).max(Duration::from_secs(1))
    }

    async fn tick(&self, now: OffsetDateTime) -> Result<(), JobError> {
        self.refresh(now).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use time::macros::datetime;

    fn snapshot(at: OffsetDateTime, store_ok: bool, hsm: Option<bool>) -> HealthSnapshot {
        let mut keystores = BTreeMap::new();
        keystores.insert(
            "default".to_string(),
            KeyStoreHealth {
                required: true,
                ok: hsm,
            },
        );
        keystores.insert(
            "offline-root".to_string(),
            KeyStoreHealth {
                required: false,
                ok: None,
            },
        );
        HealthSnapshot {
            checked_at: at,
            store_ok,
            keystores,
        }
    }

    #[test]
    fn readiness_needs_a_recent_healthy_check() {
        let t0 = datetime!(2030-01-01 00:00 UTC);
        let clock = Arc::new(ManualClock::new(t0));
        let r = Readiness::new(clock.clone(), Duration::from_secs(30));
        // Never checked: not ready.
        let v = r.view();
        assert!(!v.ready && v.stale);

        r.record(snapshot(t0, true, Some(true)));
        assert!(r.view().ready);
        // An unchecked, not required key store does not matter.
        assert!(r.view().snapshot.unwrap().hsm_ok());

        // The refresher stopped: at the bound still ready, past it not.
        clock.advance(time::Duration::seconds(30));
        assert!(r.view().ready);
        clock.advance(time::Duration::seconds(1));
        let v = r.view();
        assert!(!v.ready && v.stale, "{v:?}");
        assert_eq!(v.age, Some(Duration::from_secs(31)));

        // Fresh but unhealthy: not ready, not stale.
        r.record(snapshot(clock.now(), true, Some(false)));
        let v = r.view();
        assert!(!v.ready && !v.stale);
        r.record(snapshot(clock.now(), false, Some(true)));
        assert!(!r.view().ready);

        // A snapshot from the future (the clock stepped back) is not trusted.
        r.record(snapshot(
            clock.now() + time::Duration::hours(1),
            true,
            Some(true),
        ));
        assert!(!r.view().ready);
    }
}
