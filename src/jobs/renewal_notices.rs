//! Renewal notices: each round finds the valid device certificates (of
//! active devices) whose renewal window has opened and that were not
//! notified yet, and raises one `device.renewal_due` notification each
//! through the notifiers.
//!
//! The window of a certificate is its device's group's profile's
//! `renewal_window_days` (as renewal itself decides it,
//! [`crate::ca::renewal::renewal_window_secs`]). Windows differ per profile,
//! so the store is asked, through the `not_after` index, for the certificates
//! ending within the largest window, and each is checked against its own.
//!
//! # Mark first, then send
//!
//! Each batch is one commit: [`Write::MarkRenewalNotified`] for its due
//! certificates with one `device.renewal_due` audit event (count and
//! serials); only after that commit are the notifications queued. A crash
//! between the two loses that batch's notifications (the audit trail still
//! names every certificate) rather than sending them again on every restart;
//! notifications are alerts, and `keyward certs expiring` lists what is due
//! at any time. Two schedulers racing on one batch cannot both mark it (the
//! write conflicts unless every certificate is still unmarked), so a
//! notification goes out once per certificate. A renewed certificate has a
//! new serial and is notified again when its own window opens.

use super::{Job, JobError};
use crate::audit::AuditDraft;
use crate::ca::CaService;
use crate::ca::renewal::{profile_window_secs, renewal_window_opens, renewal_window_secs};
use crate::metrics::Metrics;
use crate::notify::{Notification, Notifiers};
use crate::store::{Change, ExpiringCertificate, ExpiringQuery, Store, Write};
use async_trait::async_trait;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// Certificates read (and at most marked) per store query and commit.
pub const BATCH: u32 = 500;

/// Most batches per tick, so that one tick after a policy change that opens
/// many windows at once does not hold the writer for long; the next tick
/// continues.
pub const MAX_BATCHES_PER_TICK: u32 = 100;

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoticeReport {
    /// Certificates marked and notified.
    pub notified: u32,
    /// Certificates read whose own window has not opened yet (a profile with
    /// a shorter window than the largest one).
    pub not_due: u32,
}

pub struct RenewalNotices {
    store: Arc<dyn Store>,
    ca: Arc<CaService>,
    notifiers: Arc<Notifiers>,
    metrics: Arc<Metrics>,
    interval: Duration,
}

impl RenewalNotices {
    pub fn new(
        store: Arc<dyn Store>,
        ca: Arc<CaService>,
        notifiers: Arc<Notifiers>,
        metrics: Arc<Metrics>,
        interval: Duration,
    ) -> Self {
        Self {
            store,
            ca,
            notifiers,
            metrics,
            interval,
        }
    }

    /// One round as of `now` (see the module docs).
    pub async fn run(&self, now: OffsetDateTime) -> Result<NoticeReport, JobError> {
        let now = now.unix_timestamp();
        let policies = self.ca.policies();
        let mut report = NoticeReport::default();
        let Some(largest) = policies.profiles.values().map(profile_window_secs).max() else {
            return Ok(report);
        };
        let mut query = ExpiringQuery {
            not_after_from: now,
            not_after_to: now.saturating_add(largest),
            unnotified_only: true,
            after: None,
            limit: BATCH,
        };
        for _ in 0..MAX_BATCHES_PER_TICK {
            let page = self.store.expiring_device_certificates(&query).await?;
            let due: Vec<&ExpiringCertificate> = page
                .items
                .iter()
                .filter(|c| {
                    renewal_window_secs(&policies, &c.group)
                        .is_some_and(|w| now >= renewal_window_opens(c.not_after, w))
                })
                .collect();
            report.not_due += (page.items.len() - due.len()) as u32;
            if !due.is_empty() {
                let serials: Vec<String> = due.iter().map(|c| c.serial.clone()).collect();
                let count = serials.len();
                let change = Change::new()
                    .write(Write::MarkRenewalNotified {
                        serials: serials.clone(),
                        at: now,
                    })
                    .audit(
                        AuditDraft::new("system", "device.renewal_due", "certificates")
                            .details(json!({ "count": count, "serials": serials })),
                    );
                self.store.commit(change).await?;
                for c in &due {
                    self.notifiers.send(Notification::RenewalDue {
                        device_id: c.device_id,
                        serial: c.serial.clone(),
                        not_after: c.not_after,
                    });
                }
                self.metrics.renewal_notices.inc_by(count as u64);
                report.notified += count as u32;
            }
            match page.next {
                Some(next) => query.after = Some(next),
                None => break,
            }
        }
        Ok(report)
    }
}

#[async_trait]
impl Job for RenewalNotices {
    fn name(&self) -> &'static str {
        "renewal_notices"
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    async fn tick(&self, now: OffsetDateTime) -> Result<(), JobError> {
        let report = self.run(now).await?;
        if report.notified > 0 {
            tracing::info!(
                notified = report.notified,
                "device certificates due for renewal notified"
            );
        }
        Ok(())
    }
}
