//! The CRL job: publishes the CRL of every CA that a revocation made dirty
//! (once `crl_debounce_ms` has passed since the first mark, so a burst of
//! revocations shares one CRL), and of every CA whose CRL is within
//! `crl_refresh_before_hours` of its nextUpdate.

use super::{Job, JobError};
use crate::ca::crls::CrlPublisher;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

pub struct CrlJob {
    publisher: Arc<CrlPublisher>,
    interval: Duration,
}

impl CrlJob {
    /// `interval`: how often the due check runs; dirty marks wake the job earlier.
    pub fn new(publisher: Arc<CrlPublisher>, interval: Duration) -> Self {
        Self {
            publisher,
            interval,
        }
    }
}

#[async_trait]
impl Job for CrlJob {
    fn name(&self) -> &'static str {
        "crl"
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    /// Publishes what is dirty and past its window, and what is due. Every
    /// CA is tried; the first failure is reported (all are logged and
    /// counted in `keyward_crl_publish_failures_total`).
    async fn tick(&self, now: OffsetDateTime) -> Result<(), JobError> {
        match self.publisher.publish_due(now).await.into_iter().next() {
            Some((_, e)) => Err(e.into()),
            None => Ok(()),
        }
    }

    async fn woken(&self) {
        self.publisher.dirty_due().await
    }
}
