//! Device registrations: submission, approval quorum with separation of
//! duties, issuance, credential delivery (re-fetchable until confirmed).

pub mod delivery;
mod error;
pub mod tls_check;

use crate::audit::AuditDraft;
use crate::auth::{TokenHasher, new_secret};
use crate::ca::csr;
use crate::ca::{CaService, x509};
use crate::clock::Clock;
use crate::model::valid_display_text;
use crate::policy::GroupPolicy;
use crate::store::{
    AdminRecord, ApprovalRecord, Change, Conflict, Decision, DeviceRecord, DeviceStatus, Page,
    PageRequest, RegistrationFilter, RegistrationRecord, RegistrationStatus, Store, StoreError,
    Write,
};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;
use uuid::Uuid;

pub use error::RegistryError;

/// What a device (or an admin on its behalf) submits.
#[derive(Debug, Clone)]
pub struct Submission {
    pub csr: Vec<u8>,
    pub name: String,
    pub device_type: Option<String>,
    pub location: Option<String>,
    pub firmware: Option<String>,
    pub group: String,
    /// Client address of the request (after trusted proxies).
    pub client_addr: Option<String>,
}

pub struct Submitted {
    pub registration: RegistrationRecord,
    /// Shown once; only its hash is stored.
    pub secret: SecretString,
}

#[derive(Debug, Serialize)]
pub struct Credentials {
    pub certificate_pem: String,
    /// Issuing CA first, then its parents up to the root.
    pub chain_pem: String,
    pub device_config: serde_json::Value,
}

/// Outcome of an approval.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionResult {
    pub registration: RegistrationRecord,
    pub approvals: u32,
    pub approvals_required: u32,
}

pub struct RegistryService {
    ca: Arc<CaService>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    hasher: TokenHasher,
    metrics: Arc<crate::metrics::Metrics>,
}

fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), RegistryError> {
    if valid_display_text(value, max, false) {
        Ok(())
    } else {
        Err(RegistryError::InvalidField { field, max })
    }
}

fn check_optional(field: &'static str, value: &Option<String>) -> Result<(), RegistryError> {
    match value {
        Some(v) => check_text(field, v, 128),
        None => Ok(()),
    }
}

/// How often a decision is re-read and retried when concurrent decisions
/// keep changing the counted approvals under it.
const DECIDE_ATTEMPTS: u32 = 8;

impl RegistryService {
    pub fn new(
        ca: Arc<CaService>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        hasher: TokenHasher,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            ca,
            store,
            clock,
            hasher,
            metrics,
        }
    }

    fn group(&self, name: &str) -> Result<GroupPolicy, RegistryError> {
        self.ca
            .policies()
            .groups
            .get(name)
            .cloned()
            .ok_or_else(|| RegistryError::UnknownGroup(name.to_string()))
    }

    /// The certificate profile of a group (policy loading guarantees it exists).
    fn profile(&self, group: &GroupPolicy) -> Result<crate::policy::ProfilePolicy, RegistryError> {
        self.ca
            .policies()
            .profiles
            .get(&group.profile)
            .cloned()
            .ok_or_else(|| RegistryError::UnknownProfile(group.profile.clone()))
    }

    /// Validates and records a registration. Groups with
    /// `approvals_required = 0` are issued at once.
    pub async fn submit(
        &self,
        sub: Submission,
        submitted_by: Option<&AdminRecord>,
    ) -> Result<Submitted, RegistryError> {
        check_text("name", &sub.name, 128)?;
        check_optional("device_type", &sub.device_type)?;
        check_optional("location", &sub.location)?;
        check_optional("firmware", &sub.firmware)?;
        let group = self.group(&sub.group)?;
        let profile = self.profile(&group)?;
        let csr_der = csr::decode_pem_or_der(&sub.csr)?;
        let verified = csr::verify(&csr_der)?;
        if !profile.key_algorithms.contains(&verified.algorithm) {
            return Err(RegistryError::AlgorithmNotAllowed {
                algorithm: verified.algorithm,
                group: group.name.clone(),
                allowed: profile
                    .key_algorithms
                    .iter()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let now = self.clock.now().unix_timestamp();
        // A revoked or suspended device cannot register again under the
        // same identity (its key): checked inside the commit, so a
        // revocation landing meanwhile cannot slip between check and insert.
        let key_guard = Write::RefuseRevokedKey {
            spki_sha256: crate::ca::spki_sha256(&verified.spki_der),
        };
        let secret = new_secret("kwr_")?;
        let id = Uuid::now_v7();
        let device_id = Uuid::now_v7();
        let actor = match submitted_by {
            Some(a) => format!("admin:{}", a.id),
            None => format!("device:{device_id}"),
        };
        let mut reg = RegistrationRecord {
            id,
            device_id,
            group: group.name.clone(),
            status: RegistrationStatus::Pending,
            name: sub.name,
            device_type: sub.device_type,
            location: sub.location,
            firmware: sub.firmware,
            csr_der,
            key_algorithm: verified.algorithm,
            secret_hash: self.hasher.hash(secret.expose_secret()),
            submitted_by: submitted_by.map(|a| a.id),
            submitted_at: now,
            expires_at: now + i64::from(group.registration_ttl_hours) * 3600,
            decided_at: None,
            certificate_serial: None,
            credentials_fetched_at: None,
            credentials_confirmed_at: None,
            client_addr: sub.client_addr.clone(),
        };
        let submit_event =
            AuditDraft::new(actor, "registration.submit", format!("registration:{id}"))
                .details(json!({
                    "device_id": device_id,
                    "group": group.name,
                    "key_algorithm": verified.algorithm.as_str(),
                }))
                .source(sub.client_addr.as_deref());
        let change = if group.approvals_needed() == 0 {
            let issued = self
                .ca
                .sign_device_certificate(&profile, device_id, &verified)
                .await?;
            reg.status = RegistrationStatus::Issued;
            reg.decided_at = Some(now);
            reg.certificate_serial = Some(issued.record.serial.clone());
            let issue_event = self.issue_event(&reg, &issued.record, sub.client_addr.as_deref());
            Change::new()
                .write(key_guard)
                .write(Write::InsertRegistration {
                    record: reg.clone(),
                    max_pending_in_group: None,
                })
                .write(Write::InsertDevice(device_record(&reg, now)))
                .write(Write::InsertCertificate(issued.record))
                .audit(submit_event)
                .audit(
                    AuditDraft::new(
                        "system",
                        "registration.auto_approve",
                        format!("registration:{id}"),
                    )
                    .details(json!({ "policy": "approval = auto", "attestation": group.method().as_str() }))
                    .source(sub.client_addr.as_deref()),
                )
                .audit(issue_event)
        } else {
            Change::new()
                .write(key_guard)
                .write(Write::InsertRegistration {
                    record: reg.clone(),
                    max_pending_in_group: Some(group.max_pending),
                })
                .audit(submit_event)
        };
        self.store.commit(change).await.map_err(|e| match e {
            StoreError::Conflict(Conflict::LimitReached { limit, .. }) => {
                RegistryError::PendingLimit {
                    group: group.name.clone(),
                    limit,
                }
            }
            StoreError::Conflict(Conflict::KeyRevoked) => RegistryError::KeyRevoked,
            other => other.into(),
        })?;
        self.metrics
            .registration(if reg.status == RegistrationStatus::Issued {
                "auto_issued"
            } else {
                "submitted"
            });
        if reg.status == RegistrationStatus::Issued {
            self.metrics.issued(&profile.issuer);
        }
        Ok(Submitted {
            registration: reg,
            secret,
        })
    }

    /// A revoked or suspended device cannot register again under the same
    /// identity: device ids are made here, so the identity is the key.
    async fn refuse_revoked_key(&self, verified: &csr::VerifiedCsr) -> Result<(), RegistryError> {
        use crate::ca::LifecycleError as L;
        match self
            .ca
            .key_is_revoked(&crate::ca::spki_sha256(&verified.spki_der))
            .await
        {
            Ok(false) => Ok(()),
            Ok(true) => Err(RegistryError::KeyRevoked),
            Err(L::Store(s)) => Err(RegistryError::Store(s)),
            Err(L::Ca(c)) => Err(RegistryError::Ca(c)),
            Err(_) => Err(RegistryError::ConcurrentDecision),
        }
    }

    fn issue_event(
        &self,
        reg: &RegistrationRecord,
        cert: &crate::store::CertificateRecord,
        source: Option<&str>,
    ) -> AuditDraft {
        AuditDraft::new(
            "system",
            "certificate.issue",
            format!("certificate:{}", cert.serial),
        )
        .details(json!({
            "registration": reg.id,
            "device_id": reg.device_id,
            "issuer": cert.issuer_ca,
            "not_after": cert.not_after,
            "fingerprint_sha256": cert.fingerprint_sha256,
        }))
        .source(source)
    }

    pub async fn get(&self, id: Uuid) -> Result<RegistrationRecord, RegistryError> {
        self.store
            .get_registration(id)
            .await?
            .ok_or(RegistryError::NotFound)
    }

    /// Decisions on a registration; `counted` is false where the admin was
    /// disabled, or lowered below the group's approver role, since.
    pub async fn approvals(
        &self,
        reg: &RegistrationRecord,
    ) -> Result<Vec<ApprovalRecord>, RegistryError> {
        // A group removed from the policy since: show the decisions as stored.
        let min = self.group(&reg.group).map(|g| g.approver_role).ok();
        let mut approvals = self.store.approvals(reg.id).await?;
        for a in &mut approvals {
            a.counted = a.counted && min.is_none_or(|m| a.admin_role.allows(m));
        }
        Ok(approvals)
    }

    /// One page of registrations, newest first unless `page.order` says otherwise.
    pub async fn list(
        &self,
        filter: &RegistrationFilter,
        page: &PageRequest,
    ) -> Result<Page<RegistrationRecord>, RegistryError> {
        Ok(self.store.list_registrations(filter, page).await?)
    }

    /// The registration, if `secret` is its registration secret.
    pub async fn authenticate(
        &self,
        id: Uuid,
        secret: &str,
    ) -> Result<RegistrationRecord, RegistryError> {
        let reg = self
            .store
            .get_registration(id)
            .await?
            .ok_or(RegistryError::Unauthorized)?;
        let presented = self.hasher.hash(secret);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            presented.as_slice(),
            reg.secret_hash.as_slice(),
        )) {
            return Err(RegistryError::Unauthorized);
        }
        Ok(reg)
    }

    /// Records an admin's approval or denial. Enforces role, separation of
    /// duties and one decision per admin; issues once the quorum is reached.
    ///
    /// The quorum is decided from the approvals read before the write, and
    /// the write ([`Write::RecordDecision`]) re-counts them inside the
    /// transaction and fails whole if they changed. Two approvers racing
    /// therefore cannot both see "one short of the quorum": the second one's
    /// commit conflicts, it re-reads and now completes the quorum (or finds
    /// the registration decided). An approve racing a deny resolves to
    /// whichever committed first; the other gets `not_pending`.
    pub async fn decide(
        &self,
        id: Uuid,
        admin: &AdminRecord,
        decision: Decision,
        comment: Option<String>,
        source: Option<&str>,
    ) -> Result<DecisionResult, RegistryError> {
        if let Some(c) = &comment
            && !valid_display_text(c, 1024, true)
        {
            return Err(RegistryError::InvalidField {
                field: "comment",
                max: 1024,
            });
        }
        for _ in 0..DECIDE_ATTEMPTS {
            match self
                .try_decide(id, admin, decision, comment.as_deref(), source)
                .await
            {
                Err(RegistryError::Store(StoreError::Conflict(c))) => match c {
                    // Re-read: the quorum or the status changed under us.
                    Conflict::ApprovalsChanged
                    | Conflict::StateChanged {
                        entity: "registration",
                        ..
                    } => continue,
                    Conflict::StateChanged {
                        entity: "admin", ..
                    } => {
                        return Err(RegistryError::AdminDisabled);
                    }
                    Conflict::Duplicate { .. } => return Err(RegistryError::AlreadyDecided),
                    _ => return Err(RegistryError::ConcurrentDecision),
                },
                other => return other,
            }
        }
        Err(RegistryError::ConcurrentDecision)
    }

    /// One attempt of [`Self::decide`]; store conflicts come back unmapped
    /// so that the caller can retry.
    async fn try_decide(
        &self,
        id: Uuid,
        admin: &AdminRecord,
        decision: Decision,
        comment: Option<&str>,
        source: Option<&str>,
    ) -> Result<DecisionResult, RegistryError> {
        let reg = self.get(id).await?;
        let group = self.group(&reg.group)?;
        if !admin.role.allows(group.approver_role) {
            return Err(RegistryError::ForbiddenRole {
                have: admin.role,
                need: group.approver_role,
                group: group.name.clone(),
            });
        }
        if reg.submitted_by == Some(admin.id) {
            return Err(RegistryError::SelfApproval);
        }
        if reg.status != RegistrationStatus::Pending {
            return Err(RegistryError::NotPending(reg.status));
        }
        let now = self.clock.now().unix_timestamp();
        if now >= reg.expires_at {
            self.expire(&reg, now, "system").await?;
            return Err(RegistryError::Expired);
        }
        let previous = self
            .store
            .approvals(id)
            .await
            .map_err(RegistryError::Store)?;
        if previous.iter().any(|a| a.admin_id == admin.id) {
            return Err(RegistryError::AlreadyDecided);
        }
        // Approvals of admins disabled, or lowered below the group's
        // approver role, since do not count.
        let counted = previous
            .iter()
            .filter(|a| {
                a.decision == Decision::Approve
                    && a.counted
                    && a.admin_role.allows(group.approver_role)
            })
            .count() as u32;
        let actor = format!("admin:{}", admin.id);
        let target = format!("registration:{id}");
        let record = Write::RecordDecision {
            approval: ApprovalRecord {
                registration_id: id,
                admin_id: admin.id,
                decision,
                comment: comment.map(str::to_string),
                decided_at: now,
                counted: true,
                admin_role: admin.role,
            },
            expect_counted_approvals: counted,
            min_role: group.approver_role,
        };
        let approvals = counted + u32::from(decision == Decision::Approve);
        let decision_event = |action: &str| {
            AuditDraft::new(actor.clone(), action, target.clone())
                .details(json!({
                    "comment": comment,
                    "approvals": approvals,
                    "required": group.approvals_required,
                    "submitted_from": reg.client_addr,
                }))
                .source(source)
        };
        let mut updated = reg.clone();
        let change = match decision {
            Decision::Deny => {
                updated.status = RegistrationStatus::Denied;
                updated.decided_at = Some(now);
                Change::new()
                    .write(record)
                    .write(Write::SetRegistrationStatus {
                        id,
                        from: RegistrationStatus::Pending,
                        to: RegistrationStatus::Denied,
                        at: now,
                        certificate_serial: None,
                    })
                    .audit(decision_event("registration.deny"))
            }
            Decision::Approve if approvals < group.approvals_needed() => Change::new()
                .write(record)
                .audit(decision_event("registration.approve")),
            Decision::Approve => {
                let profile = self.profile(&group)?;
                let verified = csr::verify(&reg.csr_der)?;
                // The key's device may have been revoked since submission:
                // checked before signing (no HSM work for a barred key) and
                // again inside the commit (no revocation slips in between).
                self.refuse_revoked_key(&verified).await?;
                let issued = self
                    .ca
                    .sign_device_certificate(&profile, reg.device_id, &verified)
                    .await?;
                updated.status = RegistrationStatus::Issued;
                updated.decided_at = Some(now);
                updated.certificate_serial = Some(issued.record.serial.clone());
                let issue_event = self.issue_event(&updated, &issued.record, source);
                Change::new()
                    .write(Write::RefuseRevokedKey {
                        spki_sha256: crate::ca::spki_sha256(&verified.spki_der),
                    })
                    .write(record)
                    .write(Write::SetRegistrationStatus {
                        id,
                        from: RegistrationStatus::Pending,
                        to: RegistrationStatus::Issued,
                        at: now,
                        certificate_serial: Some(issued.record.serial.clone()),
                    })
                    .write(Write::InsertDevice(device_record(&updated, now)))
                    .write(Write::InsertCertificate(issued.record))
                    .audit(decision_event("registration.approve"))
                    .audit(issue_event)
            }
        };
        // Conflicts go back to `decide` as they are, to be retried; a barred
        // key is final.
        self.store.commit(change).await.map_err(|e| match e {
            StoreError::Conflict(Conflict::KeyRevoked) => RegistryError::KeyRevoked,
            other => RegistryError::Store(other),
        })?;
        self.metrics.registration(match updated.status {
            RegistrationStatus::Issued => "issued",
            RegistrationStatus::Denied => "denied",
            _ => "approval_recorded",
        });
        if updated.status == RegistrationStatus::Issued {
            self.metrics
                .issued(&self.profile(&group).map(|p| p.issuer).unwrap_or_default());
        }
        Ok(DecisionResult {
            registration: updated,
            approvals,
            approvals_required: group.approvals_required,
        })
    }

    /// Marks a pending registration `expired` (audited). A registration that
    /// left `pending` meanwhile is left alone (`Ok(false)`). Used on decision
    /// and by the sweeper job.
    pub async fn expire(
        &self,
        reg: &RegistrationRecord,
        now: i64,
        actor: &str,
    ) -> Result<bool, RegistryError> {
        let change = Change::new()
            .write(Write::SetRegistrationStatus {
                id: reg.id,
                from: RegistrationStatus::Pending,
                to: RegistrationStatus::Expired,
                at: now,
                certificate_serial: None,
            })
            .audit(
                AuditDraft::new(
                    actor,
                    "registration.expire",
                    format!("registration:{}", reg.id),
                )
                .details(json!({ "group": reg.group, "expires_at": reg.expires_at })),
            );
        match self.store.commit(change).await {
            Ok(_) => {
                self.metrics.registration("expired");
                Ok(true)
            }
            Err(StoreError::Conflict(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Delivers the certificate and chain. They are public, so a lost
    /// response must not lock the device out: the holder of the
    /// registration secret may fetch them again until it confirms receipt
    /// ([`Self::confirm_credentials`]) or the group's re-fetch window after
    /// the first delivery closes; then [`RegistryError::CredentialsGone`].
    /// Every delivery is audited. (Secret material, such as a server-made
    /// key, is never re-deliverable.)
    pub async fn credentials(
        &self,
        reg: &RegistrationRecord,
        source: Option<&str>,
    ) -> Result<Credentials, RegistryError> {
        if reg.status != RegistrationStatus::Issued {
            return Err(RegistryError::NotIssued(reg.status));
        }
        let group = self.group(&reg.group)?;
        let now = self.clock.now().unix_timestamp();
        if reg.credentials_confirmed_at.is_some() {
            return Err(RegistryError::CredentialsGone);
        }
        if let Some(first) = reg.credentials_fetched_at
            && now >= first + i64::from(group.credentials_refetch_minutes) * 60
        {
            return Err(RegistryError::CredentialsGone);
        }
        let serial = reg.certificate_serial.as_deref().ok_or_else(|| {
            RegistryError::Store(StoreError::Corrupt(
                "issued registration without certificate".into(),
            ))
        })?;
        let cert = self.store.get_certificate(serial).await?.ok_or_else(|| {
            RegistryError::Store(StoreError::Corrupt(format!("certificate {serial} missing")))
        })?;
        let issuer = self.ca.issuer(&cert.issuer_ca)?;
        let device_id = reg.device_id.to_string();
        let device_config = group.render_device_config(&crate::policy::TemplateVars {
            device_id: &device_id,
            device_name: &reg.name,
            group: &group.name,
        });
        self.store
            .commit(
                Change::new()
                    .write(Write::MarkCredentialsFetched {
                        id: reg.id,
                        at: now,
                    })
                    .audit(
                        AuditDraft::new(
                            format!("registration:{}", reg.id),
                            "registration.credentials_delivered",
                            format!("registration:{}", reg.id),
                        )
                        .details(json!({
                            "certificate": serial,
                            "refetch": reg.credentials_fetched_at.is_some(),
                        }))
                        .source(source),
                    ),
            )
            .await
            .map_err(|e| match e {
                // Confirmed between our read and this write.
                StoreError::Conflict(_) => RegistryError::CredentialsGone,
                other => other.into(),
            })?;
        Ok(Credentials {
            certificate_pem: x509::to_pem(&cert.der).map_err(|e| RegistryError::Ca(e.into()))?,
            chain_pem: issuer.chain_pem.clone(),
            device_config,
        })
    }

    /// The device confirms it stored its credentials: no re-fetch after this.
    pub async fn confirm_credentials(
        &self,
        reg: &RegistrationRecord,
        source: Option<&str>,
    ) -> Result<(), RegistryError> {
        if reg.status != RegistrationStatus::Issued {
            return Err(RegistryError::NotIssued(reg.status));
        }
        if reg.credentials_confirmed_at.is_some() {
            return Err(RegistryError::AlreadyConfirmed);
        }
        let now = self.clock.now().unix_timestamp();
        self.store
            .commit(
                Change::new()
                    .write(Write::ConfirmCredentials {
                        id: reg.id,
                        at: now,
                    })
                    .audit(
                        AuditDraft::new(
                            format!("registration:{}", reg.id),
                            "registration.credentials_confirmed",
                            format!("registration:{}", reg.id),
                        )
                        .source(source),
                    ),
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => RegistryError::AlreadyConfirmed,
                other => other.into(),
            })?;
        Ok(())
    }
}

fn device_record(reg: &RegistrationRecord, now: i64) -> DeviceRecord {
    DeviceRecord {
        id: reg.device_id,
        name: reg.name.clone(),
        device_type: reg.device_type.clone(),
        location: reg.location.clone(),
        firmware: reg.firmware.clone(),
        group: reg.group.clone(),
        status: DeviceStatus::Active,
        created_at: now,
        updated_at: now,
    }
}
