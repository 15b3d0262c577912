//! The rotation job: carries out started rotations step by step
//! ([`crate::rotation::Rotator`]), resuming after a crash or a failed step
//! (with backoff), and destroys retired keys once their certificates have
//! expired. Woken at once when a rotation is started.

use super::{Job, JobError};
use crate::rotation::Rotator;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

pub struct RotationJob {
    rotator: Arc<Rotator>,
    interval: Duration,
}

impl RotationJob {
    pub fn new(rotator: Arc<Rotator>, interval: Duration) -> Self {
        Self { rotator, interval }
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

    async fn tick(&self, _now: OffsetDateTime) -> Result<(), JobError> {
        // The rotator reads the same clock the scheduler passes `now` from.
        let touched = self.rotator.run_due().await?;
        for r in touched {
            tracing::info!(rotation = %r.id, purpose = %r.purpose, target = %r.target, step = %r.step, "rotation advanced");
        }
        Ok(())
    }
}
