//! The scheduler: background jobs with a cancellation token and a clean shutdown each.
//!
//! Jobs live one per file and are spawned in one place (`App::start_jobs`).
//!
//! A job is a [`Job`]: a `tick(now)` that does one round of work for the
//! time it is given, and a `shutdown(now)` for its last act. The scheduler
//! owns the cadence (wall-clock intervals) and reads `now` from the
//! [`Clock`]; tests skip the scheduler and call `tick` with a manual clock's
//! time, so nothing in a job waits for real time to pass.
//!
//! Adding a job: a file here with a type that implements [`Job`], a `mod`
//! line below, and one `scheduler.spawn(...)` line in `app.rs`.
//!
//! With several daemons sharing a store, only the leader should run jobs
//! (a `LeaderLock` port comes with the Redis/PostgreSQL backends); today's
//! jobs are safe to run twice (the sweeper's writes are conditional, the
//! flusher and the readiness refresher act on their own process's state).

pub mod broker;
pub mod crl;
pub mod login_failures;
pub mod ocsp;
pub mod readiness;
pub mod renewal_notices;
pub mod rotation;
pub mod sweeper;
pub mod tls_renewal;

use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::registry::RegistryError;
use crate::store::StoreError;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Admin(#[from] crate::auth::AdminError),
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Rotation(#[from] crate::rotation::RotationError),
}

impl JobError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Registry(e) => e.code(),
            Self::Store(e) => e.code(),
            Self::Admin(e) => e.code(),
            Self::Ca(e) => e.code(),
            Self::Tls(e) => e.code(),
            Self::Rotation(e) => e.code(),
        }
    }
}

#[async_trait]
pub trait Job: Send + Sync + 'static {
    /// Stable name: the `job` label of the job metrics and the log field.
    fn name(&self) -> &'static str;

    /// Wall-clock time between ticks.
    fn interval(&self) -> Duration;

    /// One round of work as of `now`. An error is logged and counted; the
    /// next tick runs as usual.
    async fn tick(&self, now: OffsetDateTime) -> Result<(), JobError>;

    /// Resolves when work arrived that should not wait for the next
    /// interval; the scheduler then ticks at once. Must be cancel-safe (it
    /// is dropped whenever the interval fires first). Default: never.
    async fn woken(&self) {
        std::future::pending::<()>().await
    }

    /// The job's last act on clean shutdown (e.g. write what it holds in
    /// memory). Runs once, after the last tick has finished.
    async fn shutdown(&self, now: OffsetDateTime) -> Result<(), JobError> {
        let _ = now;
        Ok(())
    }
}

/// Runs jobs until [`Scheduler::shutdown`]. A job ticks on its interval,
/// and earlier when its [`Job::woken`] resolves.
pub struct Scheduler {
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Scheduler {
    pub fn new(clock: Arc<dyn Clock>, metrics: Arc<Metrics>) -> Self {
        Self {
            clock,
            metrics,
            cancel: CancellationToken::new(),
            tasks: Vec::new(),
        }
    }

    /// Starts `job`: its first tick one interval from now, then every
    /// interval (a slow tick delays the next one rather than piling up).
    /// A tick in progress is never cut short by shutdown.
    pub fn spawn(&mut self, job: Arc<dyn Job>) {
        let cancel = self.cancel.child_token();
        let clock = self.clock.clone();
        let metrics = self.metrics.clone();
        let name = job.name();
        let period = job.interval().max(Duration::from_millis(10));
        let handle = tokio::spawn(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => break,
                    _ = ticker.tick() => {}
                    () = job.woken() => {}
                }
                run_tick(job.as_ref(), clock.now(), &metrics).await;
            }
            if let Err(e) = job.shutdown(clock.now()).await {
                tracing::error!(job = name, code = e.code(), error = %e, "job shutdown failed");
            }
        });
        self.tasks.push((name, handle));
    }

    /// Names of the running jobs, in spawn order.
    pub fn jobs(&self) -> Vec<&'static str> {
        self.tasks.iter().map(|(n, _)| *n).collect()
    }

    /// Cancels every job and waits until each has finished its tick in
    /// progress and its shutdown.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        for (name, task) in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(job = name, error = %e, "job task ended abnormally");
            }
        }
    }
}

/// Runs one tick, logging and counting its outcome.
pub async fn run_tick(job: &dyn Job, now: OffsetDateTime, metrics: &Metrics) {
    let result = job.tick(now).await;
    metrics.job_run(job.name(), result.is_ok(), now.unix_timestamp());
    if let Err(e) = result {
        tracing::error!(job = job.name(), code = e.code(), error = %e, "job tick failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Counting {
        ticks: AtomicU32,
        shutdowns: AtomicU32,
    }

    #[async_trait]
    impl Job for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        fn interval(&self) -> Duration {
            Duration::from_secs(3600)
        }
        async fn tick(&self, _: OffsetDateTime) -> Result<(), JobError> {
            self.ticks.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn shutdown(&self, _: OffsetDateTime) -> Result<(), JobError> {
            self.shutdowns.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_tick_on_their_interval_and_shut_down_once() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let mut s = Scheduler::new(Arc::new(SystemClock), metrics.clone());
        let job = Arc::new(Counting {
            ticks: AtomicU32::new(0),
            shutdowns: AtomicU32::new(0),
        });
        s.spawn(job.clone());
        assert_eq!(s.jobs(), vec!["counting"]);
        // Tokio's paused clock jumps to the next timer: no real waiting.
        tokio::time::sleep(Duration::from_secs(3600 * 3 + 1)).await;
        assert_eq!(job.ticks.load(Ordering::SeqCst), 3);
        s.shutdown().await;
        assert_eq!(job.shutdowns.load(Ordering::SeqCst), 1);
        assert_eq!(job.ticks.load(Ordering::SeqCst), 3);
        assert!(
            metrics
                .render()
                .contains("keyward_job_runs_total{job=\"counting\",result=\"ok\"} 3")
        );
    }
}
