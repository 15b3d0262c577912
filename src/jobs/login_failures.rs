//! The failed-login flusher: one `admin.login_failed` audit event per closed window.
//!
//! Windows still open when the daemon shuts down cleanly are written then.

use super::{Job, JobError};
use crate::metrics::Metrics;
use crate::ratelimit::failures::{FailureWindow, LoginFailureLog};
use crate::store::{Change, Store};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// Events per commit: a flood of sources beyond this is written in several
/// transactions rather than one huge one.
const EVENTS_PER_COMMIT: usize = 500;

pub struct LoginFailureFlusher {
    log: Arc<LoginFailureLog>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl LoginFailureFlusher {
    pub fn new(log: Arc<LoginFailureLog>, store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self {
            log,
            store,
            metrics,
        }
    }

    /// Writes `windows`; what could not be written goes back to the log for
    /// the next flush. Returns the number of events written.
    async fn write(&self, windows: Vec<FailureWindow>) -> Result<usize, JobError> {
        let mut written = 0;
        let mut rest = windows;
        while !rest.is_empty() {
            let later = rest.split_off(rest.len().min(EVENTS_PER_COMMIT));
            let change = rest.iter().fold(Change::new(), |c, w| c.audit(w.audit()));
            match self.store.commit(change).await {
                Ok(_) => written += rest.len(),
                Err(e) => {
                    rest.extend(later);
                    self.log.restore(rest);
                    self.gauge();
                    return Err(e.into());
                }
            }
            rest = later;
        }
        self.gauge();
        Ok(written)
    }

    fn gauge(&self) {
        self.metrics
            .login_failures_unaudited
            .set(i64::try_from(self.log.pending()).unwrap_or(i64::MAX));
    }

    /// Writes the windows closed by `now`.
    pub async fn flush_closed(&self, now: OffsetDateTime) -> Result<usize, JobError> {
        self.write(self.log.take_closed(now)).await
    }

    /// Writes every window, open ones cut at `now`.
    pub async fn flush_all(&self, now: OffsetDateTime) -> Result<usize, JobError> {
        self.write(self.log.take_all(now)).await
    }
}

#[async_trait]
impl Job for LoginFailureFlusher {
    fn name(&self) -> &'static str {
        "login_failure_flusher"
    }

    /// Every daemon: the windows are in this process's memory.
    fn scope(&self) -> super::JobScope {
        super::JobScope::EveryDaemon
    }

    /// A fraction of the window, so that a closed window is written soon
    /// after it closes.
    fn interval(&self) -> Duration {
        let window = u64::try_from(self.log.window_secs()).unwrap_or(60);
        Duration::from_secs((window / 4).clamp(1, 15))
    }

    async fn tick(&self, now: OffsetDateTime) -> Result<(), JobError> {
        self.flush_closed(now).await.map(drop)
    }

    async fn shutdown(&self, now: OffsetDateTime) -> Result<(), JobError> {
        let n = self.flush_all(now).await?;
        if n > 0 {
            tracing::info!(
                events = n,
                "wrote aggregated failed-login events at shutdown"
            );
        }
        Ok(())
    }
}
