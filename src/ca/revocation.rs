//! Revocation and suspension of devices and certificates, and the observers
//! told after each change (CRL and OCSP services subscribe).
//!
//! Every path is one commit: the status change (the store carries a device's
//! unexpired certificates along in the same transaction) and its audit event
//! naming the admin, the device or serial, the reason and the source
//! address. Observers are told after the commit, never before.

use super::lifecycle::LifecycleError;
use super::{CaService, RevocationObserver};
use crate::audit::AuditDraft;
use crate::model::valid_display_text;
use crate::store::{
    AdminRecord, CertificateFilter, CertificateRecord, CertificateStatus, Change, Conflict,
    DeviceRecord, DeviceStatus, Order, RevocationReason, SerialPageRequest, StoreError, Write,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use uuid::Uuid;

/// How often a device status change is re-read and retried when the status
/// changed between the read and the commit.
const ATTEMPTS: u32 = 4;

/// A device after a status change, and the certificates it carried along.
#[derive(Debug, Clone)]
pub struct DeviceChanged {
    pub device: DeviceRecord,
    /// Serials of the device's unexpired certificates (the ones the change
    /// may have touched), per issuing CA.
    pub serials: BTreeMap<String, Vec<String>>,
}

/// What an admin does to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceAction {
    Revoke(RevocationReason),
    Suspend,
    Resume,
}

impl DeviceAction {
    fn audit_action(self) -> &'static str {
        match self {
            Self::Revoke(_) => "device.revoke",
            Self::Suspend => "device.suspend",
            Self::Resume => "device.resume",
        }
    }

    fn reason(self) -> RevocationReason {
        match self {
            Self::Revoke(r) => r,
            Self::Suspend | Self::Resume => RevocationReason::CertificateHold,
        }
    }

    /// The target status from `from`, or why the step is refused.
    fn step(self, from: DeviceStatus) -> Result<DeviceStatus, LifecycleError> {
        use DeviceStatus::{Active, Revoked, Suspended};
        match (self, from) {
            (_, Revoked) => Err(LifecycleError::DeviceRevoked),
            (Self::Revoke(_), _) => Ok(Revoked),
            (Self::Suspend, Active) => Ok(Suspended),
            (Self::Suspend, Suspended) => Err(LifecycleError::AlreadySuspended),
            (Self::Resume, Suspended) => Ok(Active),
            (Self::Resume, other) => Err(LifecycleError::NotSuspended(other)),
        }
    }
}

/// How many of a device's `certs` the status change `action` at `now`
/// revokes or puts on hold, by the store's rule (`SetDeviceStatus`): the
/// unexpired ones not revoked yet, and for a permanent revocation those on
/// hold too. Resuming revokes none.
fn revoked_by(action: DeviceAction, certs: &[CertificateRecord], now: i64) -> u64 {
    let counts = |c: &&CertificateRecord| {
        c.not_after > now
            && match c.status {
                CertificateStatus::Valid | CertificateStatus::Superseded => true,
                CertificateStatus::Revoked => {
                    matches!(action, DeviceAction::Revoke(_)) && c.on_hold()
                }
            }
    };
    match action {
        DeviceAction::Resume => 0,
        DeviceAction::Revoke(_) | DeviceAction::Suspend => {
            certs.iter().filter(counts).count() as u64
        }
    }
}

pub(super) fn check_comment(comment: Option<&str>) -> Result<(), LifecycleError> {
    match comment {
        Some(c) if !valid_display_text(c, 1024, true) => Err(LifecycleError::InvalidField {
            field: "comment",
            max: 1024,
        }),
        _ => Ok(()),
    }
}

impl CaService {
    /// Subscribes `observer` to revocation changes (after each commit).
    pub fn add_revocation_observer(&self, observer: Arc<dyn RevocationObserver>) {
        if let Ok(mut g) = self.observers.write() {
            g.push(observer);
        }
    }

    /// Tells every observer, issuer by issuer. Observers must not block.
    pub(crate) fn notify(&self, serials: &BTreeMap<String, Vec<String>>) {
        let observers = match self.observers.read() {
            Ok(g) => g.clone(),
            Err(_) => return,
        };
        for (issuer, list) in serials {
            if list.is_empty() {
                continue;
            }
            for o in &observers {
                o.revocation_changed(issuer, list);
            }
        }
    }

    /// Revokes a device and every unexpired certificate it has (a held one
    /// too). Final. `certificate-hold` is refused: that is [`Self::suspend_device`].
    pub async fn revoke_device(
        &self,
        admin: &AdminRecord,
        id: Uuid,
        reason: RevocationReason,
        comment: Option<&str>,
        source: Option<&str>,
    ) -> Result<DeviceChanged, LifecycleError> {
        if reason.is_hold() {
            return Err(LifecycleError::ReasonNotAllowed(reason));
        }
        self.change_device(admin, id, DeviceAction::Revoke(reason), comment, source)
            .await
    }

    /// Suspends a device: its unexpired certificates go on hold
    /// (`certificate-hold`); it cannot renew or register its key again.
    pub async fn suspend_device(
        &self,
        admin: &AdminRecord,
        id: Uuid,
        comment: Option<&str>,
        source: Option<&str>,
    ) -> Result<DeviceChanged, LifecycleError> {
        self.change_device(admin, id, DeviceAction::Suspend, comment, source)
            .await
    }

    /// Lifts a suspension: the held certificates become valid (or
    /// superseded) again.
    pub async fn resume_device(
        &self,
        admin: &AdminRecord,
        id: Uuid,
        comment: Option<&str>,
        source: Option<&str>,
    ) -> Result<DeviceChanged, LifecycleError> {
        self.change_device(admin, id, DeviceAction::Resume, comment, source)
            .await
    }

    async fn change_device(
        &self,
        admin: &AdminRecord,
        id: Uuid,
        action: DeviceAction,
        comment: Option<&str>,
        source: Option<&str>,
    ) -> Result<DeviceChanged, LifecycleError> {
        check_comment(comment)?;
        for _ in 0..ATTEMPTS {
            let device = self
                .store
                .get_device(id)
                .await?
                .ok_or(LifecycleError::DeviceNotFound)?;
            let to = action.step(device.status)?;
            let now = self.clock.now().unix_timestamp();
            let mut change = Change::new()
                .write(Write::SetDeviceStatus {
                    id,
                    from: device.status,
                    to,
                    reason: action.reason(),
                    at: now,
                })
                .audit(
                    AuditDraft::new(
                        format!("admin:{}", admin.id),
                        action.audit_action(),
                        format!("device:{id}"),
                    )
                    .details(json!({
                        "from": device.status.as_str(),
                        "to": to.as_str(),
                        "reason": action.reason().as_str(),
                        "reason_code": action.reason().code(),
                    }))
                    .sensitive("comment", comment)
                    .source(source),
                );
            if let Some(w) = self.broker_write_for(&device, to, now) {
                change = change.write(w);
            }
            // Counted from the certificates as read just before the commit
            // (the commit does not report how many it changed).
            let revoked = match (&self.metrics, action) {
                (None, _) | (_, DeviceAction::Resume) => 0,
                (Some(_), _) => revoked_by(action, &self.device_certificates(id).await?, now),
            };
            match self.store.commit(change).await {
                Ok(_) => {
                    if let Some(m) = &self.metrics {
                        m.ops.revoked(action.reason().as_str(), revoked);
                    }
                }
                // The status changed since the read: read again and decide again.
                Err(StoreError::Conflict(Conflict::StateChanged { .. })) => continue,
                Err(StoreError::Conflict(Conflict::Missing { .. })) => {
                    return Err(LifecycleError::DeviceNotFound);
                }
                Err(e) => return Err(e.into()),
            }
            let serials = self.unexpired_serials(id, now).await?;
            self.notify(&serials);
            let device = self
                .store
                .get_device(id)
                .await?
                .ok_or(LifecycleError::DeviceNotFound)?;
            return Ok(DeviceChanged { device, serials });
        }
        Err(LifecycleError::ConcurrentChange)
    }

    /// The broker update for `device` entering status `to`, to commit in the
    /// same change, or `None` without a broker: out of the broker unless it
    /// is active, then exactly its group's topics as the current policy
    /// renders them. Issuance uses it too (`to` = active, after the
    /// `InsertDevice` of the same change).
    pub fn broker_write_for(
        &self,
        device: &DeviceRecord,
        to: DeviceStatus,
        now: i64,
    ) -> Option<Write> {
        if !self.broker_provisioning {
            return None;
        }
        if to != DeviceStatus::Active {
            return Some(crate::broker::revoke_write(device.id, now));
        }
        let policies = self.policies();
        let rules = match policies.groups.get(&device.group) {
            Some(g) => {
                let id = device.id.to_string();
                g.render_broker_acl(&crate::policy::TemplateVars {
                    device_id: &id,
                    device_name: &device.name,
                    group: &device.group,
                })
            }
            None => {
                tracing::warn!(
                    group = %device.group,
                    "resumed device's enrollment group is no longer in the policy: no broker topics"
                );
                Vec::new()
            }
        };
        Some(crate::broker::grant_write(device.id, &rules, now))
    }

    /// The device's certificates with `not_after > now`, per issuer: what a
    /// device status change carries along. Reporting one that did not
    /// change is harmless to observers (they rebuild per issuer).
    async fn unexpired_serials(
        &self,
        device: Uuid,
        now: i64,
    ) -> Result<BTreeMap<String, Vec<String>>, LifecycleError> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for c in self.device_certificates(device).await? {
            if c.not_after > now {
                out.entry(c.issuer_ca.clone()).or_default().push(c.serial);
            }
        }
        Ok(out)
    }

    /// Every certificate of a device, newest first.
    pub async fn device_certificates(
        &self,
        device: Uuid,
    ) -> Result<Vec<CertificateRecord>, LifecycleError> {
        let filter = CertificateFilter {
            device: Some(device),
            ..CertificateFilter::default()
        };
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .store
                .list_certificates(
                    &filter,
                    &SerialPageRequest {
                        after,
                        limit: 1000,
                        order: Order::NewestFirst,
                    },
                )
                .await?;
            out.extend(page.items);
            match page.next {
                Some(n) => after = Some(n),
                None => return Ok(out),
            }
        }
    }

    /// Revokes one certificate with any reason, `certificate-hold` included
    /// (a hold on a single certificate, lifted by
    /// [`Self::release_certificate_hold`]); a hold may become permanent.
    pub async fn revoke_certificate(
        &self,
        admin: &AdminRecord,
        serial: &str,
        reason: RevocationReason,
        comment: Option<&str>,
        source: Option<&str>,
    ) -> Result<CertificateRecord, LifecycleError> {
        check_comment(comment)?;
        let cert = self.certificate(serial).await?;
        let now = self.clock.now().unix_timestamp();
        let change = Change::new()
            .write(Write::RevokeCertificate {
                serial: cert.serial.clone(),
                reason,
                at: now,
            })
            .audit(
                AuditDraft::new(
                    format!("admin:{}", admin.id),
                    "certificate.revoke",
                    format!("certificate:{}", cert.serial),
                )
                .details(json!({
                    "device_id": cert.device_id,
                    "issuer": cert.issuer_ca,
                    "previous_status": cert.status.as_str(),
                    "previous_reason": cert.revocation_reason.map(|r| r.as_str()),
                    "reason": reason.as_str(),
                    "reason_code": reason.code(),
                }))
                .sensitive("comment", comment)
                .source(source),
            );
        self.store.commit(change).await.map_err(|e| match e {
            StoreError::Conflict(Conflict::StateChanged { .. }) => {
                LifecycleError::CertificateNotRevocable(describe(&cert))
            }
            StoreError::Conflict(Conflict::Missing { .. }) => LifecycleError::CertificateNotFound,
            other => other.into(),
        })?;
        if let Some(m) = &self.metrics {
            m.ops.revoked(reason.as_str(), 1);
        }
        self.notify(&BTreeMap::from([(
            cert.issuer_ca.clone(),
            vec![cert.serial.clone()],
        )]));
        self.certificate(&cert.serial).await
    }

    /// Lifts a hold on one certificate. Refused while its device is
    /// suspended (resume the device instead): a device's suspension holds
    /// all its certificates.
    pub async fn release_certificate_hold(
        &self,
        admin: &AdminRecord,
        serial: &str,
        comment: Option<&str>,
        source: Option<&str>,
    ) -> Result<CertificateRecord, LifecycleError> {
        check_comment(comment)?;
        let cert = self.certificate(serial).await?;
        if !cert.on_hold() {
            return Err(LifecycleError::NotOnHold);
        }
        if let Some(d) = cert.device_id
            && let Some(device) = self.store.get_device(d).await?
            && device.status == DeviceStatus::Suspended
        {
            return Err(LifecycleError::DeviceSuspended);
        }
        let now = self.clock.now().unix_timestamp();
        let change = Change::new()
            .write(Write::ReleaseCertificateHold {
                serial: cert.serial.clone(),
                at: now,
            })
            .audit(
                AuditDraft::new(
                    format!("admin:{}", admin.id),
                    "certificate.release_hold",
                    format!("certificate:{}", cert.serial),
                )
                .details(json!({
                    "device_id": cert.device_id,
                    "issuer": cert.issuer_ca,
                }))
                .sensitive("comment", comment)
                .source(source),
            );
        self.store.commit(change).await.map_err(|e| match e {
            StoreError::Conflict(Conflict::StateChanged { .. }) => LifecycleError::NotOnHold,
            StoreError::Conflict(Conflict::Missing { .. }) => LifecycleError::CertificateNotFound,
            other => other.into(),
        })?;
        self.notify(&BTreeMap::from([(
            cert.issuer_ca.clone(),
            vec![cert.serial.clone()],
        )]));
        self.certificate(&cert.serial).await
    }

    /// A certificate by serial (any case).
    pub async fn certificate(&self, serial: &str) -> Result<CertificateRecord, LifecycleError> {
        if serial.is_empty() || serial.len() > 64 || !serial.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(LifecycleError::CertificateNotFound);
        }
        self.store
            .get_certificate(serial)
            .await?
            .ok_or(LifecycleError::CertificateNotFound)
    }
}

fn describe(c: &CertificateRecord) -> String {
    match (c.status, c.revocation_reason) {
        (CertificateStatus::Revoked, Some(r)) => format!("revoked, {r}"),
        (s, _) => s.to_string(),
    }
}
