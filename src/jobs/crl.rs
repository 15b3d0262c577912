//! The CRL job: publishes the CRL of every CA that a revocation made dirty
//! (once `crl_debounce_ms` has passed since the first mark, so a burst of
//! revocations shares one CRL), and of every CA whose CRL is within
//! `crl_refresh_before_hours` of its nextUpdate.
//!
//! Every daemon runs it ([`JobScope::EveryDaemon`]): each serves CRLs from
//! its own memory and marks dirty the CAs of the revocations it committed
//! itself, which no other daemon knows of. Each tick therefore first loads
//! the newest stored CRLs (those other daemons on the store published), then
//! publishes what this daemon has dirty and what is still due after that
//! load. Two daemons publishing at once cannot clash: the store takes CRL
//! numbers in order and the loser signs again with the next number
//! (`CrlPublisher::publish`); at worst a due CRL is published twice.

use super::{Job, JobError, JobScope};
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

    fn scope(&self) -> JobScope {
        JobScope::EveryDaemon
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    /// Loads the CRLs other daemons published, then publishes what is dirty
    /// and past its window, and what is due. Every CA is tried; the first
    /// failure is reported (all are logged and counted in
    /// `keyward_crl_publish_failures_total`).
    async fn tick(&self, now: OffsetDateTime) -> Result<(), JobError> {
        // Another daemon may have rotated a CA key: pick it up before
        // publishing (issuance follows at once; this daemon's OCSP signers
        // follow at the OCSP job's next round).
        match self.publisher.ca().reload_if_changed().await {
            Ok(true) => tracing::info!("CA keys changed in the store (a rotation); reloaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(code = e.code(), error = %e, "checking the CA keys for changes")
            }
        }
        let loaded = self.publisher.load().await;
        if let Err(e) = &loaded {
            tracing::error!(code = e.code(), error = %e, "loading the stored CRLs");
        }
        match self.publisher.publish_due(now).await.into_iter().next() {
            Some((_, e)) => Err(e.into()),
            None => loaded.map_err(JobError::from),
        }
    }

    async fn woken(&self) {
        self.publisher.dirty_due().await
    }
}
