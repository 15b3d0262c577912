//! Notifications to admins (a registration waits for approval, a certificate
//! is due for renewal): the [`Notifier`] port, its backends (`log`,
//! `webhook`, `smtp`), and [`Notifiers`], the fan-out that delivers them in the
//! background so that a slow or dead receiver never blocks or fails the
//! request that raised them.
//!
//! Each backend has its own bounded queue and worker: a webhook retrying
//! with backoff does not hold up the log line, and a full queue drops the
//! newest notification for that backend only (counted as `dropped` in
//! `keyward_notifications_total`, with a warning). Notifications are not
//! persisted: they are alerts, not records (the audit trail is the record),
//! so a crash loses what is queued, and a clean shutdown drains for a bounded
//! time ([`Notifiers::shutdown`]).

pub mod log;
pub mod smtp;
pub mod webhook;

use crate::clock::{Clock, from_unix, rfc3339};
use crate::metrics::Metrics;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use smtp::{Mailbox, SmtpNotifier, SmtpSettings, SmtpTls};
pub use webhook::{WebhookNotifier, WebhookSettings, WebhookUrl};

/// Something admins should hear about. Carries no secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// A registration committed as pending: it waits for approvals.
    RegistrationPending {
        registration_id: Uuid,
        device_id: Uuid,
        group: String,
        device_name: String,
        /// The group's attestation method (`none`, `bootstrap-token`, ...).
        attestation: String,
        /// Unix seconds.
        submitted_at: i64,
        approvals_required: u32,
    },
    /// A device certificate nears its end of validity.
    RenewalDue {
        device_id: Uuid,
        serial: String,
        /// Unix seconds.
        not_after: i64,
    },
    /// A key rotation finished (the new key is active), failed a step (it
    /// is retried with backoff), or waits for an operator (a card-held
    /// parent key must certify the new key).
    Rotation {
        rotation_id: Uuid,
        /// Key purpose: `issuing-ca`, `ocsp-signing`, `tls-server`.
        purpose: String,
        target: String,
        outcome: RotationOutcome,
        /// The step reached (completed) or attempted (failed).
        step: String,
        error: Option<String>,
    },
    /// A backup could not be made, a replica not be stored (retried with
    /// backoff), or a verification failed. Never silent.
    BackupFailed {
        /// `create`, `replicate`, `verify` or `prune`.
        stage: &'static str,
        backup_id: Option<Uuid>,
        /// The location, for `replicate` and `verify`.
        location: Option<String>,
        /// Stable code (`backup_disk_full`, `location_refused`, …).
        code: String,
        error: String,
    },
}

/// How a rotation ended up, for its notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationOutcome {
    Completed,
    Failed,
    NeedsOperator,
}

impl Notification {
    /// The `type` of the JSON body (and of the `Keyward-Event` header).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RegistrationPending { .. } => "registration.pending",
            Self::RenewalDue { .. } => "device.renewal_due",
            Self::Rotation { outcome, .. } => match outcome {
                RotationOutcome::Completed => "rotation.completed",
                RotationOutcome::Failed => "rotation.failed",
                RotationOutcome::NeedsOperator => "rotation.needs_operator",
            },
            Self::BackupFailed { stage, .. } => match *stage {
                "replicate" => "backup.replica_failed",
                "verify" => "backup.verify_failed",
                "prune" => "backup.prune_failed",
                _ => "backup.failed",
            },
        }
    }

    /// The `data` object of the JSON body; times as RFC 3339, like the API.
    pub fn data(&self) -> Value {
        match self {
            Self::RegistrationPending {
                registration_id,
                device_id,
                group,
                device_name,
                attestation,
                submitted_at,
                approvals_required,
            } => json!({
                "registration_id": registration_id,
                "device_id": device_id,
                "group": group,
                "device_name": device_name,
                "attestation": attestation,
                "submitted_at": rfc3339(from_unix(*submitted_at)),
                "approvals_required": approvals_required,
            }),
            Self::RenewalDue {
                device_id,
                serial,
                not_after,
            } => json!({
                "device_id": device_id,
                "serial": serial,
                "not_after": rfc3339(from_unix(*not_after)),
            }),
            Self::Rotation {
                rotation_id,
                purpose,
                target,
                step,
                error,
                ..
            } => json!({
                "rotation_id": rotation_id,
                "purpose": purpose,
                "target": target,
                "step": step,
                "error": error,
            }),
            Self::BackupFailed {
                stage,
                backup_id,
                location,
                code,
                error,
            } => json!({
                "stage": stage,
                "backup_id": backup_id,
                "location": location,
                "code": code,
                "error": error,
            }),
        }
    }
}

/// A notification as delivered: its id is the same for every backend and
/// every retry, so receivers can de-duplicate; `time` is when it was raised,
/// not when a backend got to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub id: Uuid,
    pub time: OffsetDateTime,
    pub notification: Notification,
}

impl Envelope {
    pub fn new(notification: Notification, time: OffsetDateTime) -> Self {
        Self {
            id: Uuid::now_v7(),
            time,
            notification,
        }
    }

    pub fn kind(&self) -> &'static str {
        self.notification.kind()
    }

    /// `{"type", "id", "time", "data"}`.
    pub fn to_json(&self) -> Value {
        json!({
            "type": self.kind(),
            "id": self.id,
            "time": rfc3339(self.time),
            "data": self.notification.data(),
        })
    }

    /// The exact bytes a webhook signs and sends.
    pub fn body(&self) -> Result<Vec<u8>, NotifyError> {
        serde_json::to_vec(&self.to_json()).map_err(NotifyError::Encode)
    }
}

/// Why one attempt to deliver failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptFailure {
    #[error("the receiver answered HTTP {0}")]
    Status(u16),
    #[error("no answer within the attempt's timeout")]
    Timeout,
    /// Connection refused, TLS failure, reset... (the URL is stripped: it may carry a token).
    #[error("network error")]
    Network(#[source] reqwest::Error),
    /// The mail server's reply, or the connection or TLS to it, failed.
    #[error("SMTP error")]
    Smtp(#[source] lettre::transport::smtp::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// A 4xx other than 429: retrying the same body would get the same answer.
    #[error("the receiver refused the notification with HTTP {status}")]
    Rejected { status: u16 },
    #[error("gave up after {attempts} attempt(s)")]
    Exhausted {
        attempts: u32,
        #[source]
        last: AttemptFailure,
    },
    #[error("cannot encode the notification")]
    Encode(#[source] serde_json::Error),
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
    #[error("{key}: the webhook secret must be at least {min} bytes")]
    WeakSecret { key: String, min: usize },
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
    /// A 5xx reply (bad recipient, authentication refused, ...): retrying
    /// would get the same answer.
    #[error("the mail server refused the message with {code}")]
    MailRejected {
        code: String,
        #[source]
        source: lettre::transport::smtp::Error,
    },
    #[error("cannot build the mail")]
    Mail(#[source] lettre::error::Error),
    #[error("cannot read the SMTP CA file {path}")]
    CaFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the SMTP CA file {path} holds no readable PEM certificate")]
    CaPem { path: std::path::PathBuf },
    #[error("cannot set up TLS for the mail server")]
    Tls(#[source] lettre::transport::smtp::Error),
}

impl NotifyError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Rejected { .. } => "notify_rejected",
            Self::Exhausted { .. } => "notify_exhausted",
            Self::Encode(_) => "notify_encode",
            Self::Secret(s) => s.code(),
            Self::WeakSecret { .. } => "notify_weak_secret",
            Self::Client(_) => "notify_client",
            Self::MailRejected { .. } => "notify_mail_rejected",
            Self::Mail(_) => "notify_mail_build",
            Self::CaFile { .. } => "notify_ca_file",
            Self::CaPem { .. } => "notify_ca_pem",
            Self::Tls(_) => "notify_tls",
        }
    }
}

/// The port: one way of telling admins. Implementations retry as they see
/// fit and return only when done (delivered or given up); [`Notifiers`]
/// runs them off the request path.
#[async_trait::async_trait]
pub trait Notifier: Send + Sync {
    async fn notify(&self, n: &Envelope) -> Result<(), NotifyError>;
    /// The `backend` label of the metrics (a bounded set: `log`, `webhook`, `smtp`).
    fn name(&self) -> &'static str;
    /// Whether this backend delivers `n` at all (an SMTP backend without
    /// recipients for its audience does not): [`Notifiers::send`] queues
    /// and counts only what is wanted.
    fn wants(&self, _n: &Notification) -> bool {
        true
    }
}

/// Default queue length per backend.
pub const DEFAULT_QUEUE_CAPACITY: usize = 10_000;
/// Deliveries one backend runs at once (a dead receiver holds at most this
/// many slots while it times out).
pub const DEFAULT_IN_FLIGHT: usize = 4;

/// One backend with its queue settings.
pub struct Backend {
    pub notifier: Arc<dyn Notifier>,
    /// Queued notifications beyond which new ones are dropped (at least 1).
    pub queue_capacity: usize,
    /// Deliveries in progress at once (at least 1).
    pub in_flight: usize,
}

impl Backend {
    pub fn new(notifier: Arc<dyn Notifier>, queue_capacity: usize) -> Self {
        Self {
            notifier,
            queue_capacity,
            in_flight: DEFAULT_IN_FLIGHT,
        }
    }
}

struct Queue {
    name: &'static str,
    notifier: Arc<dyn Notifier>,
    tx: mpsc::Sender<Arc<Envelope>>,
    dropped: AtomicU64,
}

/// The fan-out handle services hold: [`Notifiers::send`] never blocks and
/// never fails; delivery happens in one background task per backend.
pub struct Notifiers {
    queues: Vec<Queue>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    closed: AtomicBool,
    stop: CancellationToken,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Notifiers {
    /// Starts one worker per backend; call inside a tokio runtime.
    pub fn start(
        backends: Vec<Backend>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let stop = CancellationToken::new();
        let mut queues = Vec::with_capacity(backends.len());
        let mut workers = Vec::with_capacity(backends.len());
        for b in backends {
            let name = b.notifier.name();
            // Every series exists from the start, so alerts see a 0, not an absence.
            for result in ["delivered", "failed", "dropped"] {
                metrics.notifications.with_label_values(&[name, result]);
            }
            let (tx, rx) = mpsc::channel(b.queue_capacity.max(1));
            queues.push(Queue {
                name,
                notifier: b.notifier.clone(),
                tx,
                dropped: AtomicU64::new(0),
            });
            workers.push(tokio::spawn(worker(
                b.notifier,
                rx,
                b.in_flight.max(1),
                stop.clone(),
                metrics.clone(),
            )));
        }
        Arc::new(Self {
            queues,
            clock,
            metrics,
            closed: AtomicBool::new(false),
            stop,
            workers: Mutex::new(workers),
        })
    }

    /// No backend: `send` does nothing (embedders and tests that do not care).
    pub fn none(clock: Arc<dyn Clock>, metrics: Arc<Metrics>) -> Arc<Self> {
        Self::start(Vec::new(), clock, metrics)
    }

    /// The backends' names, in configuration order.
    pub fn backends(&self) -> Vec<&'static str> {
        self.queues.iter().map(|q| q.name).collect()
    }

    /// Queues `n` for every backend. Never waits: a full queue drops `n`
    /// for that backend (the newest is dropped; what is queued keeps its order).
    pub fn send(&self, n: Notification) {
        if self.queues.is_empty() {
            return;
        }
        let env = Arc::new(Envelope::new(n, self.clock.now()));
        let closed = self.closed.load(Ordering::Acquire);
        for q in &self.queues {
            if !q.notifier.wants(&env.notification) {
                continue;
            }
            let why = if closed {
                "shutting down"
            } else {
                match q.tx.try_send(env.clone()) {
                    Ok(()) => continue,
                    Err(mpsc::error::TrySendError::Full(_)) => "queue full",
                    Err(mpsc::error::TrySendError::Closed(_)) => "shutting down",
                }
            };
            self.metrics
                .notifications
                .with_label_values(&[q.name, "dropped"])
                .inc();
            // One warning per 1000 drops: a flood must not flood the log too.
            let n = q.dropped.fetch_add(1, Ordering::Relaxed);
            if n % 1000 == 0 {
                tracing::warn!(
                    target: "keyward::notify",
                    backend = q.name,
                    kind = env.kind(),
                    dropped_so_far = n + 1,
                    reason = why,
                    "notification dropped"
                );
            }
        }
    }

    /// Stops accepting notifications and delivers what is queued, for at
    /// most `within`; then abandons the rest (counted `dropped`, logged).
    /// Idempotent.
    pub async fn shutdown(&self, within: Duration) {
        self.closed.store(true, Ordering::Release);
        self.stop.cancel();
        let workers: Vec<JoinHandle<()>> = match self.workers.lock() {
            Ok(mut w) => w.drain(..).collect(),
            Err(p) => p.into_inner().drain(..).collect(),
        };
        if workers.is_empty() {
            return;
        }
        let aborts: Vec<_> = workers.iter().map(|w| w.abort_handle()).collect();
        let all = futures::future::join_all(workers);
        if tokio::time::timeout(within, all).await.is_ok() {
            return;
        }
        for (q, abort) in self.queues.iter().zip(aborts) {
            let left = q.tx.max_capacity() - q.tx.capacity();
            abort.abort();
            if left > 0 {
                self.metrics
                    .notifications
                    .with_label_values(&[q.name, "dropped"])
                    .inc_by(left as u64);
            }
            tracing::warn!(
                target: "keyward::notify",
                backend = q.name,
                undelivered = left,
                "shutdown: gave up on queued notifications (deliveries in progress were cut short too)"
            );
        }
    }
}

/// Takes notifications off one backend's queue and delivers up to
/// `in_flight` at once. On stop it closes the queue and drains it.
async fn worker(
    notifier: Arc<dyn Notifier>,
    mut rx: mpsc::Receiver<Arc<Envelope>>,
    in_flight: usize,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let permits = Arc::new(Semaphore::new(in_flight));
    let mut running = JoinSet::new();
    let mut stopping = false;
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let next = if stopping {
            rx.recv().await
        } else {
            tokio::select! {
                m = rx.recv() => m,
                () = stop.cancelled() => {
                    stopping = true;
                    rx.close();
                    continue;
                }
            }
        };
        let Some(env) = next else { break };
        let notifier = notifier.clone();
        let metrics = metrics.clone();
        running.spawn(async move {
            let _permit = permit;
            deliver(notifier.as_ref(), &env, &metrics).await;
        });
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}

async fn deliver(notifier: &dyn Notifier, env: &Envelope, metrics: &Metrics) {
    let name = notifier.name();
    match notifier.notify(env).await {
        Ok(()) => metrics
            .notifications
            .with_label_values(&[name, "delivered"])
            .inc(),
        Err(e) => {
            metrics
                .notifications
                .with_label_values(&[name, "failed"])
                .inc();
            tracing::warn!(
                target: "keyward::notify",
                backend = name,
                notification = %env.id,
                kind = env.kind(),
                code = e.code(),
                error = %e,
                cause = std::error::Error::source(&e).map(|s| s.to_string()),
                "notification not delivered"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn the_body_is_type_id_time_data() {
        let reg = Uuid::now_v7();
        let dev = Uuid::now_v7();
        let env = Envelope::new(
            Notification::RegistrationPending {
                registration_id: reg,
                device_id: dev,
                group: "default".into(),
                device_name: "pump-7".into(),
                attestation: "none".into(),
                submitted_at: 1_800_000_000,
                approvals_required: 2,
            },
            datetime!(2027-01-15 08:00:00 UTC),
        );
        assert_eq!(env.id.get_version_num(), 7);
        let v: Value = serde_json::from_slice(&env.body().unwrap()).unwrap();
        assert_eq!(
            v,
            json!({
                "type": "registration.pending",
                "id": env.id.to_string(),
                "time": "2027-01-15T08:00:00Z",
                "data": {
                    "registration_id": reg.to_string(),
                    "device_id": dev.to_string(),
                    "group": "default",
                    "device_name": "pump-7",
                    "attestation": "none",
                    "submitted_at": "2027-01-15T08:00:00Z",
                    "approvals_required": 2,
                }
            })
        );
        let renewal = Notification::RenewalDue {
            device_id: dev,
            serial: "0a1b".into(),
            not_after: 0,
        };
        assert_eq!(renewal.kind(), "device.renewal_due");
        assert_eq!(renewal.data()["not_after"], "1970-01-01T00:00:00Z");
    }
}
