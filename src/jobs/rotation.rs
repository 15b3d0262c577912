//! The rotation job: when the rotation policy's schedule fires, it plans
//! (`crate::rotation::plan`) and starts the rotations that are due; on
//! every tick it carries out started rotations step by step
//! ([`crate::rotation::Rotator`]), resuming after a crash or a failed step
//! (with backoff), and destroys retired keys once their certificates have
//! expired. Woken at once when a rotation is started. Leader-only: with
//! several daemons on one store, one executor runs.
//!
//! The key gauges (creation time, next rotation, maximum age) are
//! refreshed from the plan on every tick ([`record_key_gauges`]; the gauge
//! refresher sets them in the other daemons too). A schedule firing while no daemon runs is not caught
//! up: the next firing plans the same due keys (the policy's margin is
//! meant to cover a missed night).

use super::{Job, JobError};
use crate::metrics::Metrics;
use crate::rotation::Rotator;
use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;

/// Sets the key gauges of every active key in `plan`: when it was created,
/// when it is next rotated (0: never automatically) and the policy's
/// maximum age (`max_age_days` of its purpose's rule; 0: no rule). Used by
/// this job after each plan and by the gauge refresher in every daemon.
pub fn record_key_gauges(
    metrics: &Metrics,
    plan: &crate::rotation::plan::Plan,
    policy: &crate::policy::RotationPolicy,
    now: OffsetDateTime,
) {
    for item in &plan.items {
        if item.key_id.is_some()
            && !matches!(
                item.action,
                crate::rotation::plan::Action::DestroyOld { .. }
            )
        {
            let labels = [item.purpose.as_str(), item.target.as_str()];
            metrics
                .key_created
                .with_label_values(&labels)
                .set(now.unix_timestamp() - item.age_seconds);
            metrics
                .key_next_rotation
                .with_label_values(&labels)
                .set(item.next_rotation_at.unwrap_or(0));
            metrics
                .ops
                .key_max_age
                .with_label_values(&labels)
                .set(policy.key(item.purpose).map_or(0, |r| r.max_age_seconds()));
        }
    }
}

pub struct RotationJob {
    rotator: Arc<Rotator>,
    metrics: Arc<Metrics>,
    interval: Duration,
    /// When the previous tick looked at the schedule.
    last: Mutex<Option<OffsetDateTime>>,
}

impl RotationJob {
    pub fn new(rotator: Arc<Rotator>, metrics: Arc<Metrics>, interval: Duration) -> Self {
        Self {
            rotator,
            metrics,
            interval,
            last: Mutex::new(None),
        }
    }

    /// Whether the schedule fired since the previous tick (never on the
    /// first tick, and not when the clock went backwards).
    fn fired(&self, schedule: &crate::policy::Schedule, now: OffsetDateTime) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let fired = last.is_some_and(|l| schedule.fired_between(l, now));
        if last.is_none_or(|l| now > l) {
            *last = Some(now);
        }
        fired
    }
}

#[async_trait]
impl Job for RotationJob {
    fn name(&self) -> &'static str {
        "rotation"
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    async fn woken(&self) {
        self.rotator.woken().await;
    }

    async fn tick(&self, now: OffsetDateTime) -> Result<(), JobError> {
        let plan = self.rotator.plan(now.unix_timestamp()).await?;
        record_key_gauges(&self.metrics, &plan, &self.rotator.policy(), now);
        let schedule = self.rotator.schedule();
        if self.fired(&schedule, now) {
            let started = self.rotator.start_due(&plan).await?;
            if !started.is_empty() {
                tracing::info!(count = started.len(), "scheduled rotations started");
            }
        }
        for r in self.rotator.run_due().await? {
            tracing::info!(rotation = %r.id, purpose = %r.purpose, target = %r.target, step = %r.step, "rotation advanced");
        }
        Ok(())
    }
}
