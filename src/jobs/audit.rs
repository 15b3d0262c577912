//! The audit jobs (leader-only): sign a checkpoint of the chain head when
//! one is due (every `checkpoint_every_events` events or
//! `checkpoint_interval`), and verify the chain's tail every
//! `verify_interval`. On a clean shutdown the head is signed once more,
//! after every other job has shut down, so that a stopped daemon leaves no
//! unsigned events behind.

use super::{Job, JobError};
use crate::audit::service::AuditService;
use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;

/// How often the checkpoint job looks at the head (a cheap read).
pub const CHECKPOINT_POLL: Duration = Duration::from_secs(1);

pub struct AuditCheckpointJob {
    service: Arc<AuditService>,
    interval: Duration,
}

impl AuditCheckpointJob {
    pub fn new(service: Arc<AuditService>, interval: Duration) -> Self {
        Self { service, interval }
    }
}

#[async_trait]
impl Job for AuditCheckpointJob {
    fn name(&self) -> &'static str {
        "audit_checkpoint"
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    async fn tick(&self, _now: OffsetDateTime) -> Result<(), JobError> {
        self.service.checkpoint_if_due().await?;
        Ok(())
    }

    async fn shutdown(&self, _now: OffsetDateTime) -> Result<(), JobError> {
        self.service.checkpoint_now().await?;
        Ok(())
    }

    /// After the other jobs' shutdowns, which may still write events (the
    /// failed-login flush): the head signed here is the last one.
    fn shutdown_last(&self) -> bool {
        true
    }
}

pub struct AuditVerifyJob {
    service: Arc<AuditService>,
    last: Mutex<Option<OffsetDateTime>>,
}

impl AuditVerifyJob {
    pub fn new(service: Arc<AuditService>) -> Self {
        Self {
            service,
            last: Mutex::new(None),
        }
    }
}

#[async_trait]
impl Job for AuditVerifyJob {
    fn name(&self) -> &'static str {
        "audit_verify"
    }

    /// Ticks often, verifies every `verify_interval` of the job's clock
    /// (and on the first tick), so that tests drive it with a manual clock.
    fn interval(&self) -> Duration {
        self.service
            .settings()
            .verify_interval
            .min(Duration::from_secs(10))
    }

    async fn tick(&self, now: OffsetDateTime) -> Result<(), JobError> {
        let every = self.service.settings().verify_interval;
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|l| now >= l && now - l < every) {
                return Ok(());
            }
            *last = Some(now);
        }
        let report = self.service.verify_tail().await?;
        match report.broken {
            None => Ok(()),
            Some(b) => Err(JobError::Audit(crate::audit::service::AuditError::Broken {
                seq: b.seq,
                kind: b.kind.as_str(),
                reason: b.reason,
            })),
        }
    }
}
