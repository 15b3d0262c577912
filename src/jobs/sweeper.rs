//! The sweeper: pending registrations and open admin requests (invitations,
//! role changes) past their deadline become `expired` (audited).

use super::{Job, JobError};
use crate::auth::admins::AdminService;
use crate::registry::RegistryService;
use crate::store::Store;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// Registrations read per store query.
const BATCH: u32 = 256;

/// Most batches per tick, so that one tick after a long outage does not
/// hold the writer for minutes; the next tick continues.
const MAX_BATCHES_PER_TICK: u32 = 64;

pub struct Sweeper {
    store: Arc<dyn Store>,
    registry: Arc<RegistryService>,
    admins: Arc<AdminService>,
    interval: Duration,
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Registrations marked `expired` by this sweep.
    pub expired: u32,
    /// Registrations that left `pending` (decided) between the read and the write.
    pub skipped: u32,
    /// Admin requests (invitations, role changes) marked `expired`.
    pub admin_requests_expired: u32,
}

impl Sweeper {
    pub fn new(
        store: Arc<dyn Store>,
        registry: Arc<RegistryService>,
        admins: Arc<AdminService>,
        interval: Duration,
    ) -> Self {
        Self {
            store,
            registry,
            admins,
            interval,
        }
    }

    /// Expires every registration pending past its `expires_at` as of `now`.
    pub async fn sweep(&self, now: OffsetDateTime) -> Result<SweepReport, JobError> {
        let now = now.unix_timestamp();
        let mut report = SweepReport::default();
        for _ in 0..MAX_BATCHES_PER_TICK {
            let due = self.store.expired_pending_registrations(now, BATCH).await?;
            let mut progressed = false;
            for reg in &due {
                if self.registry.expire(reg, now, "system").await? {
                    report.expired += 1;
                    progressed = true;
                } else {
                    report.skipped += 1;
                }
            }
            if due.len() < BATCH as usize || !progressed {
                break;
            }
        }
        report.admin_requests_expired = self.admins.expire_stale_requests(now).await?;
        if report.admin_requests_expired > 0 {
            tracing::info!(
                expired = report.admin_requests_expired,
                "sweeper expired admin requests"
            );
        }
        if report.expired > 0 {
            tracing::info!(
                expired = report.expired,
                "sweeper expired pending registrations"
            );
        }
        Ok(report)
    }
}

#[async_trait]
impl Job for Sweeper {
    fn name(&self) -> &'static str {
        "sweeper"
    }

    /// Leader only: the rows it expires are shared; one daemon sweeps for
    /// all (its writes are conditional, so an overlap at a change of leader
    /// expires nothing twice).
    fn scope(&self) -> super::JobScope {
        super::JobScope::Leader
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    async fn tick(&self, now: OffsetDateTime) -> Result<(), JobError> {
        self.sweep(now).await.map(drop)
    }
}
