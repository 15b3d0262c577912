//! Broker ACL provisioning: the [`BrokerProvisioner`] port (a device's MQTT
//! identity gets exactly its group's topics on issuance, loses them on
//! revocation), its backends (`none`, [`mosquitto`]) and [`BrokerUpdates`],
//! which drives them from the store's outbox.
//!
//! Never silently skipped, survives a restart: the update is queued in the
//! store ([`Write::EnqueueBrokerUpdate`]) in the same transaction as the
//! change that calls for it. Then:
//! 1. the caller may [`BrokerUpdates::flush_device`] (revocation waits for it,
//!    bounded, before it answers);
//! 2. the drainer job ([`crate::jobs::broker`]) applies whatever is due;
//! 3. an applied update is deleted with a `broker.grant`/`broker.revoke`
//!    audit event; a failed one stays, with `attempts`, `last_error` and an
//!    exponential backoff (`broker.update_failed`, a `warn!`, a metric).
//!
//! Undo: none is needed. Grant and revoke are idempotent and a later op for
//! the same device replaces a pending one, so re-applying after a crash
//! between the broker call and the delete converges to the newest decision.
//! All applications in one process go through one lock, so an older op
//! cannot overtake a newer one for the same device.

pub mod mosquitto;

use crate::audit::{AuditDraft, Outcome};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::model::BrokerAclRule;
use crate::store::{BrokerOp, BrokerOutboxRecord, Change, Store, StoreError, Write};
use async_trait::async_trait;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The MQTT connection failed (refused, TLS, I/O, CONNACK refused).
    #[error("broker connection failed: {0}")]
    Connection(#[source] Box<rumqttc::ConnectionError>),
    #[error("MQTT client request failed: {0}")]
    Client(#[source] rumqttc::ClientError),
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    /// The admin user may not subscribe to the control response topic.
    #[error("the broker refused the subscription to {topic}")]
    SubscribeRefused { topic: &'static str },
    /// A control command was answered with an error.
    #[error("the broker refused `{command}`: {error}")]
    Refused { command: String, error: String },
    #[error("the broker's control response is malformed: {0}")]
    BadResponse(#[source] serde_json::Error),
    #[error("the broker closed the connection before answering")]
    Closed,
    #[error("broker TLS setup: {0}")]
    Tls(#[source] rustls::Error),
    #[error("cannot read {}: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds no {what}", path.display())]
    NoPem {
        path: std::path::PathBuf,
        what: &'static str,
    },
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
}

impl BrokerError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Connection(_) | Self::Client(_) | Self::Closed => "broker_unreachable",
            Self::Timeout(_) => "broker_timeout",
            Self::SubscribeRefused { .. } | Self::Refused { .. } => "broker_refused",
            Self::BadResponse(_) => "broker_bad_response",
            Self::Tls(_) | Self::File { .. } | Self::NoPem { .. } => "broker_tls_config",
            Self::Secret(e) => e.code(),
        }
    }
}

/// A broker whose per-device ACLs keyward manages. A device's broker
/// username is its certificate CN, i.e. its device id.
#[async_trait]
pub trait BrokerProvisioner: Send + Sync {
    /// The device gets exactly `rules` (replacing whatever it had).
    /// Idempotent.
    async fn grant(&self, device_id: Uuid, rules: &[BrokerAclRule]) -> Result<(), BrokerError>;
    /// The device's broker identity and ACLs are removed; an unknown device
    /// is not an error. Idempotent.
    async fn revoke(&self, device_id: Uuid) -> Result<(), BrokerError>;
    /// `none`, `mosquitto`: the audit details and logs name it.
    fn name(&self) -> &'static str;
}

/// `type = "none"`: no broker to provision. Nothing is queued for it.
pub struct NoBroker;

#[async_trait]
impl BrokerProvisioner for NoBroker {
    async fn grant(&self, _: Uuid, _: &[BrokerAclRule]) -> Result<(), BrokerError> {
        Ok(())
    }
    async fn revoke(&self, _: Uuid) -> Result<(), BrokerError> {
        Ok(())
    }
    fn name(&self) -> &'static str {
        "none"
    }
}

/// The write that queues a grant of `rules` to a device; put it in the
/// change that issues its certificate (after the `InsertDevice`), so that
/// the grant commits with the issuance or not at all. Only when
/// [`BrokerUpdates::enabled`].
pub fn grant_write(device_id: Uuid, rules: &[BrokerAclRule], at: i64) -> Write {
    Write::EnqueueBrokerUpdate {
        device_id,
        op: BrokerOp::Grant(rules.to_vec()),
        at,
    }
}

/// The write that queues the removal of a device's broker access.
pub fn revoke_write(device_id: Uuid, at: i64) -> Write {
    Write::EnqueueBrokerUpdate {
        device_id,
        op: BrokerOp::Revoke,
        at,
    }
}

/// Where a device's broker update stands, as an HTTP response reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerStatus {
    /// Applied (or nothing was queued).
    Done,
    /// Queued; the broker did not confirm in time. The outbox keeps trying.
    Pending,
    /// No broker is configured.
    NotConfigured,
}

impl BrokerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Pending => "pending",
            Self::NotConfigured => "not-configured",
        }
    }
}

/// Retry delays: `min` after the first failure, doubling, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait after the `failures`-th consecutive failure (1-based).
    pub fn delay(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.saturating_sub(1).min(20);
        self.min.saturating_mul(factor).min(self.max)
    }
}

/// What one drain round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    pub applied: u32,
    pub failed: u32,
}

/// Entries read per drain query, and queries per round.
const BATCH: u32 = 100;
const MAX_BATCHES: u32 = 20;

/// Applies queued broker updates: the drainer job's rounds and the
/// revocation path's immediate flush.
pub struct BrokerUpdates {
    provisioner: Arc<dyn BrokerProvisioner>,
    enabled: bool,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    backoff: Backoff,
    flush_timeout: Duration,
    log_device_ids: bool,
    /// One application at a time per process: an older op for a device
    /// never lands on the broker after a newer one.
    lock: tokio::sync::Mutex<()>,
    wake: tokio::sync::Notify,
}

/// Settings of [`BrokerUpdates`].
#[derive(Debug, Clone, Copy)]
pub struct BrokerUpdateSettings {
    /// `false` for `type = "none"`: nothing is queued or flushed.
    pub enabled: bool,
    pub backoff: Backoff,
    /// Default bound for [`BrokerUpdates::flush_device`] callers.
    pub flush_timeout: Duration,
    /// `log.sensitive_details`: name device ids in logs.
    pub log_device_ids: bool,
}

impl BrokerUpdates {
    pub fn new(
        provisioner: Arc<dyn BrokerProvisioner>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        settings: BrokerUpdateSettings,
    ) -> Self {
        Self {
            provisioner,
            enabled: settings.enabled,
            store,
            clock,
            metrics,
            backoff: settings.backoff,
            flush_timeout: settings.flush_timeout,
            log_device_ids: settings.log_device_ids,
            lock: tokio::sync::Mutex::new(()),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// Whether a broker is configured (updates are queued only then).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn backend(&self) -> &'static str {
        self.provisioner.name()
    }

    /// The configured `broker.flush_timeout_secs`.
    pub fn flush_timeout(&self) -> Duration {
        self.flush_timeout
    }

    /// Tells the drainer that something was queued (e.g. after an issuance
    /// commit), so it runs now rather than at its next interval.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Resolves after [`Self::wake`]; cancel-safe.
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Applies the device's queued update now, waiting at most `timeout`.
    /// Reports `Pending` if the broker failed or did not answer in time (the
    /// entry stays queued, the failure recorded), `Done` if nothing is
    /// queued any more.
    pub async fn flush_device(&self, device_id: Uuid, timeout: Duration) -> BrokerStatus {
        if !self.enabled {
            return BrokerStatus::NotConfigured;
        }
        let attempt = async {
            let _guard = self.lock.lock().await;
            let now = self.clock.now().unix_timestamp();
            match self.store.broker_update_for_device(device_id).await {
                Ok(Some(entry)) => self.apply(&entry, now).await,
                Ok(None) => Ok(true),
                Err(e) => Err(e),
            }
        };
        let status = match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(true)) => BrokerStatus::Done,
            Ok(Ok(false)) => BrokerStatus::Pending,
            Ok(Err(e)) => {
                tracing::error!(code = e.code(), error = %e, "broker outbox: store error");
                BrokerStatus::Pending
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = timeout.as_millis() as u64,
                    "broker update not confirmed in time; the outbox keeps trying"
                );
                BrokerStatus::Pending
            }
        };
        self.refresh_gauge().await;
        status
    }

    /// One drainer round as of `now`: every due entry is tried once.
    pub async fn drain(&self, now: i64) -> Result<DrainReport, StoreError> {
        let mut report = DrainReport::default();
        let mut after_id = 0i64;
        for _ in 0..MAX_BATCHES {
            let due = self.store.pending_broker_updates(now, BATCH).await?;
            let fresh: Vec<_> = due.into_iter().filter(|e| e.id > after_id).collect();
            if fresh.is_empty() {
                break;
            }
            for entry in &fresh {
                after_id = after_id.max(entry.id);
                let _guard = self.lock.lock().await;
                // Re-read under the lock: a flush may have applied it, or a
                // newer op replaced it, since the listing.
                let Some(current) = self.store.broker_update_for_device(entry.device_id).await?
                else {
                    continue;
                };
                if current.next_attempt_at > now {
                    continue;
                }
                after_id = after_id.max(current.id);
                if self.apply(&current, now).await? {
                    report.applied += 1;
                } else {
                    report.failed += 1;
                }
            }
        }
        self.refresh_gauge().await;
        Ok(report)
    }

    /// Sets the pending-entries gauge from the store.
    pub async fn refresh_gauge(&self) {
        match self.store.broker_outbox_len().await {
            Ok(n) => self.metrics.broker_outbox_pending.set(n),
            Err(e) => {
                tracing::warn!(code = e.code(), error = %e, "broker outbox: cannot count entries")
            }
        }
    }

    /// Tries one entry and records the outcome (caller holds the lock).
    /// `Ok(true)`: applied and deleted; `Ok(false)`: failed and rescheduled.
    async fn apply(&self, entry: &BrokerOutboxRecord, now: i64) -> Result<bool, StoreError> {
        let result = match &entry.op {
            BrokerOp::Grant(rules) => self.provisioner.grant(entry.device_id, rules).await,
            BrokerOp::Revoke => self.provisioner.revoke(entry.device_id).await,
        };
        let op = entry.op.as_str();
        let target = format!("device:{}", entry.device_id);
        match result {
            Ok(()) => {
                self.metrics.broker_update(op, true);
                let rules = match &entry.op {
                    BrokerOp::Grant(r) => Some(r),
                    BrokerOp::Revoke => None,
                };
                self.store
                    .commit(
                        Change::new()
                            .write(Write::CompleteBrokerUpdate { id: entry.id })
                            .audit(
                                AuditDraft::new("system", &format!("broker.{op}"), target).details(
                                    json!({
                                        "backend": self.provisioner.name(),
                                        "rules": rules,
                                        "failed_attempts": entry.attempts,
                                        "queued_at": entry.created_at,
                                    }),
                                ),
                            ),
                    )
                    .await?;
                Ok(true)
            }
            Err(e) => {
                self.metrics.broker_update(op, false);
                let failures = entry.attempts.saturating_add(1);
                let delay = self.backoff.delay(failures);
                let next = now.saturating_add(delay.as_secs().max(1) as i64);
                if self.log_device_ids {
                    tracing::warn!(
                        device = %entry.device_id, op, attempts = failures, retry_in_s = delay.as_secs(),
                        code = e.code(), error = %e, "broker update failed; will retry"
                    );
                } else {
                    tracing::warn!(
                        outbox_id = entry.id, op, attempts = failures, retry_in_s = delay.as_secs(),
                        code = e.code(), error = %e, "broker update failed; will retry"
                    );
                }
                let error = e.to_string();
                self.store
                    .commit(
                        Change::new()
                            .write(Write::FailBrokerUpdate {
                                id: entry.id,
                                next_attempt_at: next,
                                error: error.clone(),
                            })
                            .audit(
                                AuditDraft::new("system", "broker.update_failed", target)
                                    .outcome(Outcome::Failure)
                                    .details(json!({
                                        "backend": self.provisioner.name(),
                                        "op": op,
                                        "attempts": failures,
                                        "code": e.code(),
                                        "error": error,
                                        "next_attempt_at": next,
                                    })),
                            ),
                    )
                    .await?;
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff {
            min: Duration::from_secs(2),
            max: Duration::from_secs(300),
        };
        let secs: Vec<u64> = (1..=10).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(secs, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(b.delay(0).as_secs(), 2);
        assert_eq!(b.delay(u32::MAX).as_secs(), 300);
    }

    #[test]
    fn statuses_have_stable_names() {
        assert_eq!(BrokerStatus::Done.as_str(), "done");
        assert_eq!(BrokerStatus::Pending.as_str(), "pending");
        assert_eq!(BrokerStatus::NotConfigured.as_str(), "not-configured");
    }
}
