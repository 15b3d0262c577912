//! The backup job (leader-only): when `backup.schedule` fires it makes a
//! backup (which replicates it and prunes by retention); when
//! `backup.verify_schedule` fires it verifies the newest backup in every
//! location; on every tick it retries replicas that are due (failed
//! uploads back off from `retry_min_secs` to `retry_max_secs`).
//!
//! A firing while no daemon runs is not caught up: the next firing makes
//! the next backup, and the "last backup" metric shows the gap.

use super::{Job, JobError};
use crate::backup::service::BackupService;
use crate::model::BackupTrigger;
use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;

pub struct BackupJob {
    service: Arc<BackupService>,
    interval: Duration,
    last: Mutex<Option<OffsetDateTime>>,
}

impl BackupJob {
    pub fn new(service: Arc<BackupService>, interval: Duration) -> Self {
        Self {
            service,
            interval,
            last: Mutex::new(None),
        }
    }

    /// (backup due, verification due) since the previous tick; nothing on
    /// the first tick or when the clock went backwards.
    fn fired(&self, now: OffsetDateTime) -> (bool, bool) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let s = self.service.settings();
        let fired = |sched: &Option<crate::policy::Schedule>| matches!((sched, *last), (Some(sc), Some(l)) if sc.fired_between(l, now));
        let out = (fired(&s.schedule), fired(&s.verify_schedule));
        if last.is_none_or(|l| now > l) {
            *last = Some(now);
        }
        out
    }
}

#[async_trait]
impl Job for BackupJob {
    fn name(&self) -> &'static str {
        "backup"
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    async fn tick(&self, now: OffsetDateTime) -> Result<(), JobError> {
        let (backup, verify) = self.fired(now);
        let mut failed = None;
        if backup {
            // Failures are audited, counted and notified by the service.
            if let Err(e) = self
                .service
                .create("system", BackupTrigger::Scheduled)
                .await
            {
                failed = Some(e);
            }
        }
        if let Err(e) = self.service.replicate_due().await {
            failed = Some(e);
        }
        if verify && let Err(e) = self.service.verify(None, "system").await {
            failed = Some(e);
        }
        match failed {
            Some(e) => Err(JobError::Backup(e)),
            None => Ok(()),
        }
    }
}
