//! One scheduler per deployment: the [`LeaderLock`] port and its store
//! lease ([`StoreLease`]).
//!
//! Several daemons may share one store (for availability, or during a
//! rolling restart). Every daemon runs the jobs that act on its own
//! process's state ([`super::JobScope::EveryDaemon`]); only the daemon that
//! holds the leader lock runs the others ([`super::JobScope::Leader`]).
//! The scheduler ([`super::Scheduler::lead_with`]) asks the lock once at
//! start, then the leader renews every third of the lease time and the
//! others try to take over every quarter. A leader that dies stops
//! renewing, and its lease ends at most one lease time later; another
//! daemon takes over at its next try (so within 1¼ lease times). A leader
//! that stops cleanly releases the lease, so another daemon takes over at
//! its next try, without waiting for the lease to run out.
//!
//! A daemon also steps down on its own: it counts itself leader only until
//! one lease time after the start of its last successful renewal, so a
//! daemon whose store calls hang (a stuck disk, a partition) stops the
//! leader-only jobs before another daemon's lease can begin. A tick already
//! running when that happens is not cut short: jobs must stay safe to
//! overlap briefly (their writes are conditional).
//!
//! Backends: [`StoreLease`] is a row of the `leases` table, taken, renewed
//! and released in one store transaction each (correct across processes on
//! one SQLite file, and across hosts on PostgreSQL, where the same row is
//! taken by one `INSERT … ON CONFLICT DO UPDATE … WHERE`). With `[redis]`,
//! `crate::redis::leader` implements the same trait with `SET name holder NX
//! PX ttl` and compare-and-extend / compare-and-delete scripts.

use super::JobError;
use crate::store::Store;
use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;

/// The name of the scheduler's lease in the store.
pub const SCHEDULER_LEASE: &str = "scheduler";

/// The scheduler's leader lock. At most one holder at a time holds it.
#[async_trait]
pub trait LeaderLock: Send + Sync {
    /// Takes the lock (free, or its holder's lease ran out) or extends it
    /// if this holder holds it, as of `now`, for [`Self::ttl`]. Returns
    /// whether this holder holds it after the call. An error says nothing
    /// about who holds it.
    async fn acquire_or_renew(&self, now: OffsetDateTime) -> Result<bool, JobError>;

    /// Gives the lock up if this holder holds it, so another daemon takes
    /// over at once. Failures are logged: the lease then runs out by itself.
    async fn release(&self);

    /// Who this daemon is in the lock: `{hostname}:{pid}:{random}`.
    fn holder_id(&self) -> &str;

    /// How long one acquisition or renewal holds.
    fn ttl(&self) -> Duration;

    /// The holder before this holder's latest acquisition, when known (the
    /// `scheduler.leader` audit event names it).
    fn previous_holder(&self) -> Option<String> {
        None
    }
}

/// A holder id unique to this process: `{hostname}:{pid}:{random}`.
pub fn new_holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_string());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &random[..12])
}

/// The leader lock as a lease row in the store (`leases`, times in ms).
pub struct StoreLease {
    store: Arc<dyn Store>,
    name: String,
    holder: String,
    ttl: Duration,
    /// Whether the last call found this holder holding the lease.
    held: AtomicBool,
    previous: Mutex<Option<String>>,
}

impl StoreLease {
    /// The `scheduler` lease for this process (a fresh holder id).
    pub fn new(store: Arc<dyn Store>, ttl: Duration) -> Self {
        Self::named(store, SCHEDULER_LEASE, new_holder_id(), ttl)
    }

    /// Any lease name and holder id (tests, future locks).
    pub fn named(
        store: Arc<dyn Store>,
        name: impl Into<String>,
        holder: impl Into<String>,
        ttl: Duration,
    ) -> Self {
        Self {
            store,
            name: name.into(),
            holder: holder.into(),
            ttl,
            held: AtomicBool::new(false),
            previous: Mutex::new(None),
        }
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

#[async_trait]
impl LeaderLock for StoreLease {
    async fn acquire_or_renew(&self, now: OffsetDateTime) -> Result<bool, JobError> {
        if !self.held.load(Ordering::SeqCst) {
            // Read before taking it: whoever held it last, expired or not.
            let last = self
                .store
                .lease_holder(&self.name, i64::MIN)
                .await?
                .filter(|h| *h != self.holder);
            if let Ok(mut p) = self.previous.lock() {
                *p = last;
            }
        }
        let held = self
            .store
            .try_lease(&self.name, &self.holder, unix_ms(now), self.ttl_ms())
            .await;
        // After a failure, whether it is still ours is unknown: the next
        // success reads the previous holder again.
        self.held.store(matches!(held, Ok(true)), Ordering::SeqCst);
        Ok(held?)
    }

    async fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
        if let Err(e) = self.store.release_lease(&self.name, &self.holder).await {
            tracing::warn!(
                lease = %self.name,
                code = e.code(),
                error = %e,
                "could not release the lease; it runs out by itself"
            );
        }
    }

    fn holder_id(&self) -> &str {
        &self.holder
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }

    fn previous_holder(&self) -> Option<String> {
        self.previous.lock().ok().and_then(|p| p.clone())
    }
}

/// This process's view of leadership, shared by the scheduler's tasks.
pub struct Leadership {
    /// No lock: this process is the only scheduler, always leader.
    always: bool,
    /// Leader until this instant (one lease time after the start of the
    /// last successful renewal); `None`: not leader.
    until: Mutex<Option<tokio::time::Instant>>,
    /// Woken when this daemon becomes leader: leader-only jobs then tick
    /// at once instead of one interval later (work waiting since the old
    /// leader died, e.g. a rotation a crash interrupted).
    acquired: tokio::sync::Notify,
}

impl Leadership {
    /// Leader for good (a scheduler without a lock).
    pub fn always() -> Self {
        Self {
            always: true,
            until: Mutex::new(None),
            acquired: tokio::sync::Notify::new(),
        }
    }

    /// Not leader until [`Self::hold_until`].
    pub fn contended() -> Self {
        Self {
            always: false,
            until: Mutex::new(None),
            acquired: tokio::sync::Notify::new(),
        }
    }

    /// Resolves when this daemon becomes leader (never for a scheduler
    /// without a lock, which leads from the start).
    pub async fn acquired(&self) {
        if self.always {
            std::future::pending::<()>().await;
        }
        self.acquired.notified().await;
    }

    pub(super) fn announce(&self) {
        self.acquired.notify_waiters();
    }

    /// Whether leader-only jobs may run now.
    pub fn is_leader(&self) -> bool {
        if self.always {
            return true;
        }
        let until = match self.until.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        };
        until.is_some_and(|u| tokio::time::Instant::now() < u)
    }

    pub(super) fn hold_until(&self, until: tokio::time::Instant) {
        match self.until.lock() {
            Ok(mut g) => *g = Some(until),
            Err(p) => *p.into_inner() = Some(until),
        }
    }

    pub(super) fn step_down(&self) {
        match self.until.lock() {
            Ok(mut g) => *g = None,
            Err(p) => *p.into_inner() = None,
        }
    }
}
