//! Device registrations: submission, approval quorum with separation of
//! duties, issuance, one-time credential delivery.

use crate::audit::AuditDraft;
use crate::auth::{TokenHasher, new_secret};
use crate::ca::csr::{self, CsrError};
use crate::ca::{CaError, CaService, x509};
use crate::clock::Clock;
use crate::policy::GroupPolicy;
use crate::store::{
    AdminRecord, ApprovalRecord, Change, Decision, DeviceRecord, DeviceStatus, RegistrationRecord,
    RegistrationStatus, Store, StoreError, Write,
};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error("registration not found")]
    NotFound,
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    #[error("credentials were already delivered")]
    Gone,
    #[error("registration secret missing or wrong")]
    Unauthorized,
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(message) => Self::Conflict {
                code: "conflict",
                message,
            },
            other => Self::Store(other),
        }
    }
}

impl From<CsrError> for RegistryError {
    fn from(e: CsrError) -> Self {
        let code = match &e {
            CsrError::Malformed(_) => "invalid_csr",
            CsrError::BadSignature => "csr_signature_invalid",
            CsrError::UnsupportedAlgorithm(_) => "unsupported_key_algorithm",
            CsrError::KeySize(_) => "key_size_not_allowed",
        };
        Self::Invalid {
            code,
            message: e.to_string(),
        }
    }
}

fn invalid(code: &'static str, message: impl Into<String>) -> RegistryError {
    RegistryError::Invalid {
        code,
        message: message.into(),
    }
}

/// What a device (or an admin on its behalf) submits.
#[derive(Debug, Clone)]
pub struct Submission {
    pub csr: Vec<u8>,
    pub name: String,
    pub device_type: Option<String>,
    pub location: Option<String>,
    pub firmware: Option<String>,
    pub group: String,
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

fn check_text(field: &str, value: &str, max: usize) -> Result<(), RegistryError> {
    if value.trim().is_empty() || value.chars().count() > max || value.chars().any(char::is_control)
    {
        return Err(invalid(
            "invalid_field",
            format!("`{field}` must be 1-{max} printable characters"),
        ));
    }
    Ok(())
}

fn check_optional(field: &str, value: &Option<String>) -> Result<(), RegistryError> {
    match value {
        Some(v) => check_text(field, v, 128),
        None => Ok(()),
    }
}

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

    fn group(&self, name: &str) -> Result<&GroupPolicy, RegistryError> {
        self.ca.policies().groups.get(name).ok_or_else(|| {
            invalid(
                "unknown_group",
                format!("enrollment group `{name}` does not exist"),
            )
        })
    }

    /// The certificate profile of a group (policy loading guarantees it exists).
    fn profile(&self, group: &GroupPolicy) -> Result<&crate::policy::ProfilePolicy, RegistryError> {
        self.ca
            .policies()
            .profiles
            .get(&group.profile)
            .ok_or_else(|| {
                invalid(
                    "unknown_profile",
                    format!("profile `{}` does not exist", group.profile),
                )
            })
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
        let profile = self.profile(group)?;
        let csr_der = csr::decode_pem_or_der(&sub.csr)?;
        let verified = csr::verify(&csr_der)?;
        if !profile.key_algorithms.contains(&verified.algorithm) {
            return Err(invalid(
                "key_algorithm_not_allowed",
                format!(
                    "key algorithm {} is not allowed for group `{}` (allowed: {})",
                    verified.algorithm,
                    group.name,
                    profile
                        .key_algorithms
                        .iter()
                        .map(|a| a.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let now = self.clock.now().unix_timestamp();
        let secret = new_secret("kwr_").map_err(|e| RegistryError::Ca(e.into()))?;
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
        };
        let submit_event =
            AuditDraft::new(actor, "registration.submit", format!("registration:{id}")).details(
                json!({
                    "device_id": device_id,
                    "group": group.name,
                    "key_algorithm": verified.algorithm.as_str(),
                }),
            );
        let change = if group.approvals_required == 0 {
            let issued = self
                .ca
                .sign_device_certificate(profile, device_id, &verified)
                .await?;
            reg.status = RegistrationStatus::Issued;
            reg.decided_at = Some(now);
            reg.certificate_serial = Some(issued.record.serial.clone());
            let issue_event = self.issue_event(&reg, &issued.record);
            Change::new()
                .write(Write::InsertRegistration(reg.clone()))
                .write(Write::InsertDevice(device_record(&reg, now)))
                .write(Write::InsertCertificate(issued.record))
                .audit(submit_event)
                .audit(
                    AuditDraft::new(
                        "system",
                        "registration.auto_approve",
                        format!("registration:{id}"),
                    )
                    .details(json!({ "policy": "approvals_required = 0" })),
                )
                .audit(issue_event)
        } else {
            Change::new()
                .write(Write::InsertRegistration(reg.clone()))
                .audit(submit_event)
        };
        self.store.commit(change).await?;
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

    fn issue_event(
        &self,
        reg: &RegistrationRecord,
        cert: &crate::store::CertificateRecord,
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
    }

    pub async fn get(&self, id: Uuid) -> Result<RegistrationRecord, RegistryError> {
        self.store
            .get_registration(id)
            .await?
            .ok_or(RegistryError::NotFound)
    }

    pub async fn approvals(&self, id: Uuid) -> Result<Vec<ApprovalRecord>, RegistryError> {
        Ok(self.store.approvals(id).await?)
    }

    pub async fn list(
        &self,
        status: Option<RegistrationStatus>,
        limit: u32,
    ) -> Result<Vec<RegistrationRecord>, RegistryError> {
        Ok(self
            .store
            .list_registrations(status, limit.clamp(1, 1000))
            .await?)
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
    pub async fn decide(
        &self,
        id: Uuid,
        admin: &AdminRecord,
        decision: Decision,
        comment: Option<String>,
    ) -> Result<DecisionResult, RegistryError> {
        if let Some(c) = &comment
            && (c.chars().count() > 1024 || c.chars().any(|ch| ch.is_control() && ch != '\n'))
        {
            return Err(invalid(
                "invalid_field",
                "`comment` must be at most 1024 printable characters",
            ));
        }
        let reg = self.get(id).await?;
        let group = self.group(&reg.group)?;
        if !admin.role.allows(group.approver_role) {
            return Err(RegistryError::Forbidden {
                code: "forbidden_role",
                message: format!(
                    "role {} cannot decide registrations of group `{}` (needs {})",
                    admin.role, group.name, group.approver_role
                ),
            });
        }
        if reg.submitted_by == Some(admin.id) {
            return Err(RegistryError::Forbidden {
                code: "self_approval",
                message:
                    "separation of duties: the admin who submitted a registration cannot decide it"
                        .into(),
            });
        }
        if reg.status != RegistrationStatus::Pending {
            return Err(RegistryError::Conflict {
                code: "not_pending",
                message: format!("registration is {}, not pending", reg.status),
            });
        }
        let now = self.clock.now().unix_timestamp();
        if now >= reg.expires_at {
            self.expire(&reg, now).await?;
            return Err(RegistryError::Conflict {
                code: "registration_expired",
                message: "registration expired before it was decided".into(),
            });
        }
        let previous = self.store.approvals(id).await?;
        if previous.iter().any(|a| a.admin_id == admin.id) {
            return Err(RegistryError::Conflict {
                code: "already_decided",
                message: "this admin already decided this registration".into(),
            });
        }
        let actor = format!("admin:{}", admin.id);
        let target = format!("registration:{id}");
        let approval = Write::InsertApproval(ApprovalRecord {
            registration_id: id,
            admin_id: admin.id,
            decision,
            comment: comment.clone(),
            decided_at: now,
        });
        let approvals_before = previous
            .iter()
            .filter(|a| a.decision == Decision::Approve)
            .count() as u32;
        let mut updated = reg.clone();
        let change = match decision {
            Decision::Deny => {
                updated.status = RegistrationStatus::Denied;
                updated.decided_at = Some(now);
                Change::new()
                    .write(approval)
                    .write(Write::SetRegistrationStatus {
                        id,
                        from: RegistrationStatus::Pending,
                        to: RegistrationStatus::Denied,
                        at: now,
                        certificate_serial: None,
                    })
                    .audit(
                        AuditDraft::new(actor, "registration.deny", target)
                            .details(json!({ "comment": comment })),
                    )
            }
            Decision::Approve if approvals_before + 1 < group.approvals_required => {
                Change::new().write(approval).audit(
                    AuditDraft::new(actor, "registration.approve", target).details(json!({
                        "comment": comment,
                        "approvals": approvals_before + 1,
                        "required": group.approvals_required,
                    })),
                )
            }
            Decision::Approve => {
                let profile = self.profile(group)?;
                let verified = csr::verify(&reg.csr_der)?;
                let issued = self
                    .ca
                    .sign_device_certificate(profile, reg.device_id, &verified)
                    .await?;
                updated.status = RegistrationStatus::Issued;
                updated.decided_at = Some(now);
                updated.certificate_serial = Some(issued.record.serial.clone());
                let issue_event = self.issue_event(&updated, &issued.record);
                Change::new()
                    .write(approval)
                    .write(Write::SetRegistrationStatus {
                        id,
                        from: RegistrationStatus::Pending,
                        to: RegistrationStatus::Issued,
                        at: now,
                        certificate_serial: Some(issued.record.serial.clone()),
                    })
                    .write(Write::InsertDevice(device_record(&updated, now)))
                    .write(Write::InsertCertificate(issued.record))
                    .audit(
                        AuditDraft::new(actor, "registration.approve", target).details(json!({
                            "comment": comment,
                            "approvals": approvals_before + 1,
                            "required": group.approvals_required,
                        })),
                    )
                    .audit(issue_event)
            }
        };
        self.store.commit(change).await.map_err(|e| match e {
            StoreError::Conflict(_) => RegistryError::Conflict {
                code: "concurrent_decision",
                message: "the registration was decided concurrently; reload and retry".into(),
            },
            other => other.into(),
        })?;
        let approvals = approvals_before + u32::from(decision == Decision::Approve);
        self.metrics.registration(match updated.status {
            RegistrationStatus::Issued => "issued",
            RegistrationStatus::Denied => "denied",
            _ => "approval_recorded",
        });
        if updated.status == RegistrationStatus::Issued {
            self.metrics.issued(
                self.profile(group)
                    .map(|p| p.issuer.as_str())
                    .unwrap_or_default(),
            );
        }
        Ok(DecisionResult {
            registration: updated,
            approvals,
            approvals_required: group.approvals_required,
        })
    }

    async fn expire(&self, reg: &RegistrationRecord, now: i64) -> Result<(), RegistryError> {
        let change = Change::new()
            .write(Write::SetRegistrationStatus {
                id: reg.id,
                from: RegistrationStatus::Pending,
                to: RegistrationStatus::Expired,
                at: now,
                certificate_serial: None,
            })
            .audit(AuditDraft::new(
                "system",
                "registration.expire",
                format!("registration:{}", reg.id),
            ));
        match self.store.commit(change).await {
            Ok(_) | Err(StoreError::Conflict(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Delivers the certificate chain once; later calls get [`RegistryError::Gone`].
    pub async fn credentials(
        &self,
        reg: &RegistrationRecord,
    ) -> Result<Credentials, RegistryError> {
        if reg.status != RegistrationStatus::Issued {
            return Err(RegistryError::Conflict {
                code: "not_issued",
                message: format!(
                    "registration is {}; credentials exist only once it is issued",
                    reg.status
                ),
            });
        }
        if reg.credentials_fetched_at.is_some() {
            return Err(RegistryError::Gone);
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
        let group = self.group(&reg.group)?;
        let device_config =
            serde_json::to_value(&group.device_config).unwrap_or(serde_json::Value::Null);
        let now = self.clock.now().unix_timestamp();
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
                        .details(json!({ "certificate": serial })),
                    ),
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => RegistryError::Gone,
                other => other.into(),
            })?;
        Ok(Credentials {
            certificate_pem: x509::to_pem(&cert.der).map_err(|e| RegistryError::Ca(e.into()))?,
            chain_pem: issuer.chain_pem.clone(),
            device_config,
        })
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
