//! OCSP signer rotation: each tick loads or makes a missing delegated
//! signer and replaces one that policy says is due
//! (`now >= not_after - ocsp_signer_renew_before_days`); see
//! [`crate::ca::responder::Responder::refresh_signers`].
//!
//! Every daemon runs it ([`JobScope::EveryDaemon`]): each answers OCSP with
//! the signer it holds in memory, so each must move to a new signer when
//! the old one is due. The first daemon to find it due makes the new one;
//! the others find it in the store and use it (`refresh_signers` reads the
//! store before making one), so one signer per CA is made per rotation
//! (two only if two daemons tick in the same instant; both are valid).

use super::{Job, JobError, JobScope};
use crate::ca::responder::Responder;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

pub struct OcspSignerRotation {
    responder: Arc<Responder>,
    interval: Duration,
}

impl OcspSignerRotation {
    pub fn new(responder: Arc<Responder>, interval: Duration) -> Self {
        Self {
            responder,
            interval,
        }
    }
}

#[async_trait]
impl Job for OcspSignerRotation {
    fn name(&self) -> &'static str {
        "ocsp_signer_rotation"
    }

    fn scope(&self) -> JobScope {
        JobScope::EveryDaemon
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    async fn tick(&self, _now: OffsetDateTime) -> Result<(), JobError> {
        // The responder reads the same clock the scheduler passes `now` from.
        let changed = self.responder.refresh_signers("system").await?;
        if !changed.is_empty() {
            tracing::info!(cas = ?changed, "OCSP signers replaced");
        }
        Ok(())
    }
}
