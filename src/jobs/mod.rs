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
//! Adding a job: a file here with a type that implements [`Job`] (and
//! says in its `scope` why it must run in every daemon, if it must), a
//! `mod` line below, and one `scheduler.spawn(...)` line in `app.rs`.
//!
//! One scheduler per deployment: with several daemons sharing a store, a
//! job of [`JobScope::Leader`] (the default) ticks only in the daemon that
//! holds the [`leader::LeaderLock`]; a job of [`JobScope::EveryDaemon`]
//! ticks in every daemon, because it acts on its own process's state (see
//! each job's `scope`). While not leader, a leader-only job's ticks are
//! skipped (not counted as runs). See [`leader`] for the lease.

pub mod audit;
pub mod backup;
pub mod broker;
pub mod crl;
pub mod gauges;
pub mod leader;
pub mod login_failures;
pub mod ocsp;
pub mod readiness;
pub mod renewal_notices;
pub mod rotation;
pub mod sweeper;
pub mod tls_renewal;

use crate::audit::AuditDraft;
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::registry::RegistryError;
use crate::store::{Change, Store, StoreError};
use async_trait::async_trait;
use leader::{LeaderLock, Leadership};
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
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    #[error(transparent)]
    Audit(#[from] crate::audit::service::AuditError),
    /// The Redis leader lock could not be asked (Redis down or slow).
    #[error(transparent)]
    Redis(#[from] crate::redis::RedisError),
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
            Self::Backup(e) => e.code(),
            Self::Audit(e) => e.code(),
            Self::Redis(e) => e.code(),
        }
    }
}

/// Where a job runs when several daemons share a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobScope {
    /// Only in the daemon holding the leader lock: work on the shared
    /// store that one daemon should do for all.
    Leader,
    /// In every daemon: work on the process's own state (caches, what it
    /// holds in memory, what it serves).
    EveryDaemon,
}

#[async_trait]
pub trait Job: Send + Sync + 'static {
    /// Stable name: the `job` label of the job metrics and the log field.
    fn name(&self) -> &'static str;

    /// Where the job runs (default: only in the leader).
    fn scope(&self) -> JobScope {
        JobScope::Leader
    }

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

    /// Whether this job's shutdown must run after every other job's has
    /// finished (the audit checkpoint: it signs the head, so the events
    /// other jobs write on shutdown must be in it). Default: no.
    fn shutdown_last(&self) -> bool {
        false
    }
}

/// Runs jobs until [`Scheduler::shutdown`]. A job ticks on its interval,
/// and earlier when its [`Job::woken`] resolves.
pub struct Scheduler {
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    /// Cancels the jobs whose shutdown runs last ([`Job::shutdown_last`]).
    cancel_last: CancellationToken,
    /// Name, whether it shuts down last, task.
    tasks: Vec<(&'static str, bool, JoinHandle<()>)>,
    leadership: Arc<Leadership>,
    /// The lease task ([`Self::lead_with`]) and its own cancellation, so
    /// that it stops (and releases) only after the jobs have stopped.
    lease_task: Option<(CancellationToken, JoinHandle<()>)>,
}

impl Scheduler {
    /// A scheduler that runs every job: the only one on its store, or one
    /// whose caller decides leadership itself (tests).
    pub fn new(clock: Arc<dyn Clock>, metrics: Arc<Metrics>) -> Self {
        metrics.scheduler_leader.set(1);
        Self {
            clock,
            metrics,
            cancel: CancellationToken::new(),
            cancel_last: CancellationToken::new(),
            tasks: Vec::new(),
            leadership: Arc::new(Leadership::always()),
            lease_task: None,
        }
    }

    /// Runs [`JobScope::Leader`] jobs only while `lock` is held. Asks the
    /// lock once now (so a lone daemon is leader before its jobs' first
    /// ticks), then in the background every third of the lease time while
    /// leader (renewal) and every quarter while not (takeover). Each
    /// acquisition is logged and audited once (`scheduler.leader`, through
    /// `store`); the gauge `keyward_scheduler_leader` follows. Call before
    /// spawning jobs.
    pub async fn lead_with(&mut self, lock: Arc<dyn LeaderLock>, store: Arc<dyn Store>) {
        let leadership = Arc::new(Leadership::contended());
        self.leadership = leadership.clone();
        let mut lease = LeaseKeeper {
            lock,
            store,
            leadership,
            clock: self.clock.clone(),
            metrics: self.metrics.clone(),
            held: false,
            unaudited: None,
        };
        lease.round().await;
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let handle = tokio::spawn(async move {
            loop {
                let wait = lease.wait();
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
                lease.round().await;
            }
            lease.release().await;
        });
        self.lease_task = Some((cancel, handle));
    }

    /// Whether this daemon runs the leader-only jobs now.
    pub fn is_leader(&self) -> bool {
        self.leadership.is_leader()
    }

    /// Starts `job`: its first tick one interval from now, then every
    /// interval (a slow tick delays the next one rather than piling up).
    /// A tick in progress is never cut short by shutdown.
    pub fn spawn(&mut self, job: Arc<dyn Job>) {
        let last = job.shutdown_last();
        let cancel = if last {
            self.cancel_last.child_token()
        } else {
            self.cancel.child_token()
        };
        let clock = self.clock.clone();
        let metrics = self.metrics.clone();
        let name = job.name();
        let leader_only = job.scope() == JobScope::Leader;
        let leadership = self.leadership.clone();
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
                    () = leadership.acquired(), if leader_only => {}
                }
                if leader_only && !leadership.is_leader() {
                    tracing::trace!(job = name, "not the scheduler leader; tick skipped");
                    continue;
                }
                run_tick(job.as_ref(), clock.now(), &metrics).await;
            }
            if let Err(e) = job.shutdown(clock.now()).await {
                tracing::error!(job = name, code = e.code(), error = %e, "job shutdown failed");
            }
        });
        self.tasks.push((name, last, handle));
    }

    /// Names of the running jobs, in spawn order.
    pub fn jobs(&self) -> Vec<&'static str> {
        self.tasks.iter().map(|(n, ..)| *n).collect()
    }

    /// Cancels every job and waits until each has finished its tick in
    /// progress and its shutdown (the jobs that shut down last only once
    /// all others have: see [`Job::shutdown_last`]); then releases the
    /// leader lock (if held), so that another daemon takes over at once.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let (last, first): (Vec<_>, Vec<_>) =
            self.tasks.into_iter().partition(|(_, last, _)| *last);
        for (name, _, task) in first {
            if let Err(e) = task.await {
                tracing::error!(job = name, error = %e, "job task ended abnormally");
            }
        }
        self.cancel_last.cancel();
        for (name, _, task) in last {
            if let Err(e) = task.await {
                tracing::error!(job = name, error = %e, "job task ended abnormally");
            }
        }
        if let Some((cancel, task)) = self.lease_task {
            cancel.cancel();
            if let Err(e) = task.await {
                tracing::error!(error = %e, "scheduler lease task ended abnormally");
            }
        }
    }
}

/// The lease task's state: asks the lock, keeps [`Leadership`] and the
/// gauge in step, audits each acquisition.
struct LeaseKeeper {
    lock: Arc<dyn LeaderLock>,
    store: Arc<dyn Store>,
    leadership: Arc<Leadership>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// Whether the last answer was "held".
    held: bool,
    /// The `scheduler.leader` event of the current acquisition, until it is
    /// committed (a failed commit is retried at the next round).
    unaudited: Option<AuditDraft>,
}

impl LeaseKeeper {
    /// Time to the next round: a third of the lease time while leader, a
    /// quarter while not (a lost leader is taken over within a quarter of
    /// the lease time after its lease ran out).
    fn wait(&self) -> Duration {
        let ttl = self.lock.ttl();
        if self.held { ttl / 3 } else { ttl / 4 }.max(Duration::from_millis(10))
    }

    async fn round(&mut self) {
        let ttl = self.lock.ttl();
        let started = tokio::time::Instant::now();
        let now = self.clock.now();
        let holder = self.lock.holder_id().to_string();
        match tokio::time::timeout(ttl, self.lock.acquire_or_renew(now)).await {
            Ok(Ok(true)) => {
                self.leadership.hold_until(started + ttl);
                if !self.held {
                    self.held = true;
                    let previous = self.lock.previous_holder();
                    tracing::info!(holder = %holder, previous = ?previous, "this daemon is now the scheduler leader");
                    self.leadership.announce();
                    self.unaudited = Some(
                        AuditDraft::new(
                            "system",
                            "scheduler.leader",
                            format!("lease:{}", leader::SCHEDULER_LEASE),
                        )
                        .details(serde_json::json!({
                            "holder": holder,
                            "previous_holder": previous,
                            "lease_ms": u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                        })),
                    );
                }
            }
            Ok(Ok(false)) => {
                self.leadership.step_down();
                if self.held {
                    self.held = false;
                    tracing::warn!(holder = %holder, "lost the scheduler lease to another daemon; leader-only jobs stop");
                }
            }
            Ok(Err(e)) => {
                tracing::error!(code = e.code(), error = %e, "scheduler lease: acquire or renew failed");
                self.lapse_check(&holder);
            }
            Err(_) => {
                tracing::error!(
                    timeout_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                    "scheduler lease: acquire or renew timed out"
                );
                self.lapse_check(&holder);
            }
        }
        if let Some(draft) = self.unaudited.take()
            && let Err(e) = self.store.commit(Change::new().audit(draft.clone())).await
        {
            tracing::error!(code = e.code(), error = %e, "could not audit the change of scheduler leader; retrying");
            self.unaudited = Some(draft);
        }
        self.metrics
            .scheduler_leader
            .set(i64::from(self.leadership.is_leader()));
    }

    /// After a failed renewal: once the last success is a lease time old,
    /// leadership has lapsed (another daemon may take over); the next
    /// success is a new acquisition, audited as such.
    fn lapse_check(&mut self, holder: &str) {
        if self.held && !self.leadership.is_leader() {
            self.held = false;
            tracing::warn!(holder = %holder, "scheduler lease lapsed: no renewal for a whole lease time; leader-only jobs stop");
        }
    }

    async fn release(&mut self) {
        if self.held {
            self.lock.release().await;
            tracing::info!(holder = %self.lock.holder_id(), "released the scheduler lease");
        }
        self.held = false;
        self.leadership.step_down();
        self.metrics.scheduler_leader.set(0);
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

    /// Counts ticks; `scope` as given.
    struct Scoped {
        scope: JobScope,
        ticks: AtomicU32,
    }

    #[async_trait]
    impl Job for Scoped {
        fn name(&self) -> &'static str {
            match self.scope {
                JobScope::Leader => "leader_only",
                JobScope::EveryDaemon => "every_daemon",
            }
        }
        fn scope(&self) -> JobScope {
            self.scope
        }
        fn interval(&self) -> Duration {
            Duration::from_millis(20)
        }
        async fn tick(&self, _: OffsetDateTime) -> Result<(), JobError> {
            self.ticks.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// One daemon's scheduler on `store`: its two jobs and its metrics.
    struct Daemon {
        scheduler: Scheduler,
        leader_job: Arc<Scoped>,
        every_job: Arc<Scoped>,
        metrics: Arc<Metrics>,
        holder: String,
    }

    async fn daemon(store: &Arc<dyn Store>, holder: &str, ttl: Duration) -> Daemon {
        let metrics = Arc::new(Metrics::new().unwrap());
        let mut scheduler = Scheduler::new(Arc::new(SystemClock), metrics.clone());
        let lock = Arc::new(leader::StoreLease::named(
            store.clone(),
            leader::SCHEDULER_LEASE,
            holder,
            ttl,
        ));
        scheduler.lead_with(lock, store.clone()).await;
        let leader_job = Arc::new(Scoped {
            scope: JobScope::Leader,
            ticks: AtomicU32::new(0),
        });
        let every_job = Arc::new(Scoped {
            scope: JobScope::EveryDaemon,
            ticks: AtomicU32::new(0),
        });
        scheduler.spawn(leader_job.clone());
        scheduler.spawn(every_job.clone());
        Daemon {
            scheduler,
            leader_job,
            every_job,
            metrics,
            holder: holder.to_string(),
        }
    }

    fn ticks(j: &Scoped) -> u32 {
        j.ticks.load(Ordering::SeqCst)
    }

    fn gauge(d: &Daemon) -> i64 {
        d.metrics.scheduler_leader.get()
    }

    async fn leader_events(store: &Arc<dyn Store>) -> Vec<serde_json::Value> {
        store
            .audit_events(crate::store::AuditQuery {
                from_seq: 0,
                limit: 100,
            })
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.action == "scheduler.leader")
            .map(|e| e.details)
            .collect()
    }

    /// The `scheduler.leader` events once there are `n` (committed just
    /// after the acquisition).
    async fn wait_events(store: &Arc<dyn Store>, n: usize) -> Vec<serde_json::Value> {
        for _ in 0..100 {
            let events = leader_events(store).await;
            if events.len() >= n {
                assert_eq!(events.len(), n, "{events:?}");
                return events;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "{n} scheduler.leader events: {:?}",
            leader_events(store).await
        );
    }

    async fn wait_for(what: &str, limit: Duration, cond: impl Fn() -> bool) -> Duration {
        let start = std::time::Instant::now();
        while !cond() {
            assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        start.elapsed()
    }

    /// Two schedulers on one real SQLite store: one leads; leader-only jobs
    /// tick only there, the others everywhere; a clean shutdown hands over
    /// at once; a holder that vanished without releasing is taken over once
    /// its lease has run out, not before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_leader_runs_leader_only_jobs_and_hands_over() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open(
                &dir.path().join("k.db"),
                8,
                Arc::new(SystemClock),
            )
            .unwrap(),
        );
        let ttl = Duration::from_millis(600);
        let a = daemon(&store, "host:1:a", ttl).await;
        let b = daemon(&store, "host:2:b", ttl).await;
        assert!(a.scheduler.is_leader() && !b.scheduler.is_leader());
        assert_eq!((gauge(&a), gauge(&b)), (1, 0));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Renewals kept a in the lead well past one lease time.
        assert!(a.scheduler.is_leader() && !b.scheduler.is_leader());
        assert!(ticks(&a.leader_job) > 5, "{}", ticks(&a.leader_job));
        assert_eq!(ticks(&b.leader_job), 0, "skipped ticks do not run");
        assert!(ticks(&a.every_job) > 5 && ticks(&b.every_job) > 5);
        // Skipped ticks are not counted as runs.
        let text = b.metrics.render();
        assert!(!text.contains("job=\"leader_only\""), "{text}");
        assert!(text.contains("keyward_scheduler_leader 0"), "{text}");
        // One acquisition, one event.
        let events = wait_events(&store, 1).await;
        assert_eq!(events[0]["holder"], "host:1:a");
        assert_eq!(events[0]["previous_holder"], serde_json::Value::Null);

        // a stops cleanly: its lease is released, b takes over within its
        // next try (a quarter of the lease), well before the lease would end.
        let a_holder = a.holder.clone();
        let a_metrics = a.metrics.clone();
        a.scheduler.shutdown().await;
        assert_eq!(a_metrics.scheduler_leader.get(), 0);
        // Released in the store at once (the lease no longer names a valid
        // holder), so b needs no lease time to pass. How fast b then takes
        // over depends on the machine's load: bounded generously here (its
        // speed is not what this test measures).
        let now_ms = (SystemClock.now().unix_timestamp_nanos() / 1_000_000) as i64;
        assert_eq!(
            store
                .lease_holder(leader::SCHEDULER_LEASE, now_ms)
                .await
                .unwrap(),
            None
        );
        wait_for("takeover after release", Duration::from_secs(10), || {
            b.scheduler.is_leader()
        })
        .await;
        let patience = Duration::from_secs(10);
        wait_for("b's leader-only job runs", patience, || {
            ticks(&b.leader_job) > 0
        })
        .await;
        wait_for("b's gauge", patience, || gauge(&b) == 1).await;
        let events = wait_events(&store, 2).await;
        assert_eq!(events[1]["holder"], "host:2:b");
        assert_eq!(events[1]["previous_holder"], a_holder.as_str());

        // A holder that vanished without releasing (a crash) leaves its
        // lease in the store: a newcomer waits for it to run out, then
        // takes over within a quarter of the lease.
        b.scheduler.shutdown().await;
        let now_ms = (SystemClock.now().unix_timestamp_nanos() / 1_000_000) as i64;
        let ttl_ms = ttl.as_millis() as i64;
        assert!(
            store
                .try_lease(leader::SCHEDULER_LEASE, "ghost", now_ms, ttl_ms)
                .await
                .unwrap()
        );
        let vanished = std::time::Instant::now();
        let c = daemon(&store, "host:3:c", ttl).await;
        assert!(!c.scheduler.is_leader(), "took over a lease still valid");
        wait_for("takeover after expiry", Duration::from_secs(10), || {
            c.scheduler.is_leader()
        })
        .await;
        let took = vanished.elapsed();
        assert!(
            took >= ttl - Duration::from_millis(50),
            "taken over before the lease ran out: {took:?}"
        );
        let events = wait_events(&store, 3).await;
        assert_eq!(events[2]["holder"], "host:3:c");
        assert_eq!(events[2]["previous_holder"], "ghost");
        // Released on shutdown: nobody holds it now; it names c last.
        c.scheduler.shutdown().await;
        let now_ms = (SystemClock.now().unix_timestamp_nanos() / 1_000_000) as i64;
        let holder = |at| store.lease_holder(leader::SCHEDULER_LEASE, at);
        assert_eq!(holder(now_ms).await.unwrap(), None);
        assert_eq!(holder(i64::MIN).await.unwrap().as_deref(), Some("host:3:c"));
    }

    /// A lock whose answers the test sets: held, or a failing backend.
    struct Scripted {
        failing: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl LeaderLock for Scripted {
        async fn acquire_or_renew(&self, _: OffsetDateTime) -> Result<bool, JobError> {
            if self.failing.load(Ordering::SeqCst) {
                Err(StoreError::WriterGone.into())
            } else {
                Ok(true)
            }
        }
        async fn release(&self) {}
        fn holder_id(&self) -> &str {
            "scripted"
        }
        fn ttl(&self) -> Duration {
            Duration::from_millis(300)
        }
    }

    /// Renewals that keep failing: leadership lapses one lease time after
    /// the last success (leader-only jobs stop, the gauge drops); the next
    /// success is a new acquisition, audited again. A lock that cannot be
    /// taken at all (a read-only store) never makes a leader.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_renewals_lapse_and_unusable_locks_never_lead() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open(&path, 8, Arc::new(SystemClock)).unwrap(),
        );
        let metrics = Arc::new(Metrics::new().unwrap());
        let mut s = Scheduler::new(Arc::new(SystemClock), metrics.clone());
        let lock = Arc::new(Scripted {
            failing: std::sync::atomic::AtomicBool::new(false),
        });
        s.lead_with(lock.clone(), store.clone()).await;
        let job = Arc::new(Scoped {
            scope: JobScope::Leader,
            ticks: AtomicU32::new(0),
        });
        s.spawn(job.clone());
        assert!(s.is_leader());
        wait_events(&store, 1).await;
        wait_for("ticks while leader", Duration::from_secs(2), || {
            ticks(&job) > 0
        })
        .await;

        lock.failing.store(true, Ordering::SeqCst);
        let failing = std::time::Instant::now();
        wait_for("lapse", Duration::from_secs(2), || !s.is_leader()).await;
        assert!(
            failing.elapsed() <= Duration::from_millis(300 + 150),
            "{:?}",
            failing.elapsed()
        );
        wait_for("gauge drops", Duration::from_secs(2), || {
            metrics.scheduler_leader.get() == 0
        })
        .await;
        let frozen = ticks(&job);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(ticks(&job), frozen, "leader-only job ran after the lapse");
        wait_events(&store, 1).await;

        lock.failing.store(false, Ordering::SeqCst);
        wait_for("leader again", Duration::from_secs(2), || s.is_leader()).await;
        wait_for("ticks again", Duration::from_secs(2), || {
            ticks(&job) > frozen
        })
        .await;
        let events = wait_events(&store, 2).await;
        assert_eq!(events[1]["holder"], "scripted");
        s.shutdown().await;

        // A read-only store refuses the lease: never leader, never a tick.
        let ro: Arc<dyn Store> =
            Arc::new(crate::store::sqlite::SqliteStore::open_read_only(&path).unwrap());
        let d = daemon(&ro, "host:9:ro", Duration::from_millis(300)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!d.scheduler.is_leader());
        assert_eq!(ticks(&d.leader_job), 0);
        assert!(ticks(&d.every_job) > 0);
        assert_eq!(gauge(&d), 0);
        d.scheduler.shutdown().await;
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

    /// Records the order of shutdowns; `slow` ones take a while.
    struct Ordered {
        name: &'static str,
        last: bool,
        slow: bool,
        log: Arc<std::sync::Mutex<Vec<&'static str>>>,
    }

    #[async_trait]
    impl Job for Ordered {
        fn name(&self) -> &'static str {
            self.name
        }
        fn interval(&self) -> Duration {
            Duration::from_secs(3600)
        }
        async fn tick(&self, _: OffsetDateTime) -> Result<(), JobError> {
            Ok(())
        }
        async fn shutdown(&self, _: OffsetDateTime) -> Result<(), JobError> {
            if self.slow {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            self.log.lock().unwrap().push(self.name);
            Ok(())
        }
        fn shutdown_last(&self) -> bool {
            self.last
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_that_shuts_down_last_waits_for_every_other_one() {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut s = Scheduler::new(Arc::new(SystemClock), Arc::new(Metrics::new().unwrap()));
        for (name, last, slow) in [
            ("signer", true, false),
            ("a", false, true),
            ("b", false, false),
        ] {
            s.spawn(Arc::new(Ordered {
                name,
                last,
                slow,
                log: log.clone(),
            }));
        }
        assert_eq!(s.jobs(), vec!["signer", "a", "b"]);
        s.shutdown().await;
        let log = log.lock().unwrap().clone();
        assert_eq!(log.len(), 3);
        assert_eq!(log.last(), Some(&"signer"), "{log:?}");
    }
}
