//! The broker outbox drainer: applies queued broker ACL updates that are
//! due, each failure backing off exponentially (see [`crate::broker`]).
//! Woken at once when something is queued and the caller says so.

use super::{Job, JobError};
use crate::broker::BrokerUpdates;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

pub struct BrokerDrainer {
    updates: Arc<BrokerUpdates>,
    interval: Duration,
}

impl BrokerDrainer {
    pub fn new(updates: Arc<BrokerUpdates>, interval: Duration) -> Self {
        Self { updates, interval }
    }
}

#[async_trait]
impl Job for BrokerDrainer {
    fn name(&self) -> &'static str {
        "broker_outbox"
    }

    /// Leader only: the outbox is shared, and one drainer per deployment
    /// keeps a device's updates in order across daemons (within a daemon
    /// they go through one lock). A daemon that is not leader still applies
    /// its own revocations at once (`flush_device`); what it queues on
    /// issuance waits for the leader's next round (at most the drain
    /// interval).
    fn scope(&self) -> super::JobScope {
        super::JobScope::Leader
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    async fn tick(&self, now: OffsetDateTime) -> Result<(), JobError> {
        let report = self.updates.drain(now.unix_timestamp()).await?;
        if report.applied > 0 {
            tracing::info!(
                applied = report.applied,
                failed = report.failed,
                "broker outbox drained"
            );
        }
        Ok(())
    }

    async fn woken(&self) {
        self.updates.woken().await
    }
}
