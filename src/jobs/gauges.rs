//! The gauge refresher: the metrics that describe what the store holds,
//! read from it periodically (`jobs.metrics_refresh_interval_seconds`):
//! the approval queue (`keyward_registrations_pending`, the age of the
//! oldest), device certificates by time to expiry
//! (`keyward_certificates_by_expiry`) and the key gauges
//! (`keyward_key_*`, as the rotation plan sees them).
//!
//! Every daemon runs it ([`JobScope::EveryDaemon`]): each exposes its own
//! `/metrics`, and a follower's gauges must not freeze at whatever they
//! were when it lost the lease. The reads are indexed counts (migration
//! 0011) and the rotation plan's few rows, so several daemons refreshing
//! the same numbers cost little. A scrape reads the last refresh: the
//! gauges lag the store by at most one interval.
//!
//! Each part is refreshed on its own: a failing read leaves its gauges at
//! their last value, is logged, and fails the tick (counted in
//! `keyward_job_runs_total{job="gauges",result="error"}`) after the other
//! parts ran.

use super::{Job, JobError, JobScope};
use crate::metrics::Metrics;
use crate::metrics::ops::EXPIRY_BOUNDS_DAYS;
use crate::rotation::Rotator;
use crate::store::Store;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

const DAY: i64 = 86_400;

pub struct GaugeRefresher {
    store: Arc<dyn Store>,
    rotator: Arc<Rotator>,
    metrics: Arc<Metrics>,
    interval: Duration,
}

impl GaugeRefresher {
    pub fn new(
        store: Arc<dyn Store>,
        rotator: Arc<Rotator>,
        metrics: Arc<Metrics>,
        interval: Duration,
    ) -> Self {
        Self {
            store,
            rotator,
            metrics,
            interval,
        }
    }

    /// The approval queue: its length and the age of its oldest entry at
    /// `now` (0 when empty; never negative, should a clock step back).
    async fn registrations(&self, now: i64) -> Result<(), JobError> {
        let summary = self.store.pending_registrations_summary().await?;
        let m = &self.metrics.ops;
        m.registrations_pending.set(summary.count);
        m.registrations_pending_oldest_age.set(
            summary
                .oldest_submitted_at
                .map_or(0, |t| now.saturating_sub(t).max(0)),
        );
        Ok(())
    }

    async fn expiry(&self, now: i64) -> Result<(), JobError> {
        let bounds = EXPIRY_BOUNDS_DAYS.map(|d| d * DAY);
        let counts = self.store.certificate_expiry_counts(now, &bounds).await?;
        self.metrics
            .ops
            .set_expiry_counts(&counts.within, counts.active);
        Ok(())
    }

    async fn keys(&self, now: OffsetDateTime) -> Result<(), JobError> {
        let plan = self.rotator.plan(now.unix_timestamp()).await?;
        super::rotation::record_key_gauges(&self.metrics, &plan, &self.rotator.policy(), now);
        Ok(())
    }

    /// Refreshes every part as of `now`; the first failure is returned
    /// after all parts ran.
    pub async fn refresh(&self, now: OffsetDateTime) -> Result<(), JobError> {
        let t = now.unix_timestamp();
        let results = [
            ("registrations", self.registrations(t).await),
            ("certificate expiry", self.expiry(t).await),
            ("keys", self.keys(now).await),
        ];
        let mut first = None;
        for (part, r) in results {
            if let Err(e) = r {
                tracing::warn!(part, code = e.code(), error = %e, "metrics gauges: read failed; the gauges keep their last value");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

#[async_trait]
impl Job for GaugeRefresher {
    fn name(&self) -> &'static str {
        "gauges"
    }

    /// Every daemon: each serves its own `/metrics` (see the module doc).
    fn scope(&self) -> JobScope {
        JobScope::EveryDaemon
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    async fn tick(&self, now: OffsetDateTime) -> Result<(), JobError> {
        self.refresh(now).await
    }
}
