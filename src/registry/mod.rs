//! Device registrations: submission, approval quorum with separation of
//! duties, issuance, credential delivery (re-fetchable until confirmed).

mod attest;
pub mod attestation;
pub mod config;
pub mod delivery;
mod error;
mod reload;
mod server_key;
pub mod tls_check;
pub mod tokens;

pub use attest::{Evidence, NONCE_TTL_SECONDS as ENROLL_NONCE_TTL_SECONDS};
pub use server_key::KeyBundle;

/// Builds every attestation verifier the policies call for (reads the
/// manufacturer CA and CRL files, the JWKS files): `keyward config check`
/// runs it so that a bad file is found before the daemon starts.
pub fn check_attestation_policies(policies: &crate::policy::Policies) -> Result<(), RegistryError> {
    attest::Attestors::build(policies).map(drop)
}
pub use reload::ReloadOutcome;

use crate::audit::AuditDraft;
use crate::auth::{TokenHasher, new_secret};
use crate::ca::csr;
use crate::ca::{CaService, x509};
use crate::clock::Clock;
use crate::model::valid_display_text;
use crate::model::{AttestationMethod, KeySource};
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
    /// PKCS#10, PEM or DER; `None` for groups whose keys the server makes.
    pub csr: Option<Vec<u8>>,
    pub name: String,
    pub device_type: Option<String>,
    pub location: Option<String>,
    pub firmware: Option<String>,
    /// The group asked for: decides the group only when its attestation is
    /// `none`; otherwise it must agree with the attestation, if given.
    pub group: Option<String>,
    pub evidence: Evidence,
    /// Server keys: deliver as an age bundle to this X25519 recipient
    /// (otherwise as a PKCS#12 with a one-time password).
    pub age_recipient: Option<String>,
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
    /// A server-generated key, encrypted for the device: in the first
    /// delivery only, never again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_bundle: Option<KeyBundle>,
    /// For server-generated keys: whether the key was delivered before
    /// (then it is not in this answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_delivered: Option<bool>,
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
    /// Verifiers built from the policies (JWKS, manufacturer CAs); swapped
    /// with them on reload.
    attestors: std::sync::RwLock<Arc<attest::Attestors>>,
    /// One reload at a time.
    reload_lock: tokio::sync::Mutex<()>,
    /// Nonces for the manufacturer-certificate possession proof.
    enroll_nonces: attest::NonceBook,
    notifier: Arc<crate::notify::Notifiers>,
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
        notifier: Arc<crate::notify::Notifiers>,
    ) -> Result<Self, RegistryError> {
        let attestors = attest::Attestors::build(&ca.policies())?;
        Ok(Self {
            ca,
            store,
            clock,
            hasher,
            metrics,
            attestors: std::sync::RwLock::new(Arc::new(attestors)),
            reload_lock: tokio::sync::Mutex::new(()),
            enroll_nonces: attest::NonceBook::default(),
            notifier,
        })
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

    /// Validates the attestation and records a registration in the group
    /// the attestation decides. Groups with `approval = "auto"` are issued
    /// at once.
    pub async fn submit(
        &self,
        sub: Submission,
        submitted_by: Option<&AdminRecord>,
    ) -> Result<Submitted, RegistryError> {
        check_text("name", &sub.name, 128)?;
        check_optional("device_type", &sub.device_type)?;
        check_optional("location", &sub.location)?;
        check_optional("firmware", &sub.firmware)?;
        let csr_der = match &sub.csr {
            Some(c) => Some(csr::decode_pem_or_der(c)?),
            None => None,
        };
        let attested = self
            .attest(
                sub.group.as_deref(),
                &sub.evidence,
                csr_der.as_deref().unwrap_or_default(),
            )
            .await?;
        let group = attested.group.clone();
        let profile = self.profile(&group)?;
        if let Some(token) = &attested.token
            && let Some(required) = &token.device_name
            && required != &sub.name
        {
            return Err(RegistryError::TokenDeviceName(required.clone()));
        }
        // Verified here once; issuance at submission reuses it.
        let mut verified_csr: Option<csr::VerifiedCsr> = None;
        let (csr_der, algorithm, spki) = match (group.key_source, csr_der) {
            (KeySource::Csr, Some(der)) => {
                if sub.age_recipient.is_some() {
                    return Err(RegistryError::RecipientNotExpected);
                }
                let verified = csr::verify(&der)?;
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
                let spki = verified.spki_der.clone();
                verified_csr = Some(verified.clone());
                (der, verified.algorithm, Some(spki))
            }
            (KeySource::Csr, None) => return Err(RegistryError::CsrRequired(group.name.clone())),
            (KeySource::Server, Some(_)) => {
                return Err(RegistryError::CsrNotExpected(group.name.clone()));
            }
            (KeySource::Server, None) => {
                if let Some(r) = &sub.age_recipient {
                    delivery_check_recipient(r)?;
                }
                let alg = group
                    .server_key_algorithm
                    .unwrap_or(profile.key_algorithms[0]);
                (Vec::new(), alg, None)
            }
        };
        let now = self.clock.now().unix_timestamp();
        let secret = new_secret("kwr_")?;
        let id = Uuid::now_v7();
        // A fresh id names no device; only an attested identity or a reclaim
        // code can name one that exists (read only then: hot path).
        let device_id = attested.device_id.unwrap_or_else(Uuid::now_v7);
        let existing = match attested.device_id {
            Some(id) => self.store.get_device(id).await?,
            None => None,
        };
        if let Some(d) = &existing
            && d.status != DeviceStatus::Active
        {
            return Err(RegistryError::DeviceNotActive(d.status));
        }
        let actor = match submitted_by {
            Some(a) => format!("admin:{}", a.id),
            None => format!("device:{device_id}"),
        };
        let reg = RegistrationRecord {
            id,
            device_id,
            group: group.name.clone(),
            status: RegistrationStatus::Pending,
            name: sub.name,
            device_type: sub.device_type,
            location: sub.location,
            firmware: sub.firmware,
            csr_der,
            key_algorithm: algorithm,
            secret_hash: self.hasher.hash(secret.expose_secret()),
            submitted_by: submitted_by.map(|a| a.id),
            submitted_at: now,
            expires_at: now + i64::from(group.registration_ttl_hours) * 3600,
            decided_at: None,
            certificate_serial: None,
            credentials_fetched_at: None,
            credentials_confirmed_at: None,
            client_addr: sub.client_addr.clone(),
            attestation: attested.method,
            attested_identity: attested.identity.clone(),
            attestation_details: Some(attested.details.clone()),
            enrollment_token_id: attested.token.as_ref().map(|t| t.id),
            token_minted_by: attested.token.as_ref().map(|t| t.created_by),
            reenrollment: existing.is_some(),
            key_source: group.key_source,
            age_recipient: sub.age_recipient.clone(),
            server_key_id: None,
            key_delivered_at: None,
        };
        let mut change = Change::new();
        // A revoked or suspended device cannot register again under the
        // same identity (its key): checked inside the commit, so a
        // revocation landing meanwhile cannot slip between check and insert.
        if let Some(spki) = &spki {
            change = change.write(Write::RefuseRevokedKey {
                spki_sha256: crate::ca::spki_sha256(spki),
            });
        }
        for g in attested.guards {
            change = change.write(g);
        }
        if let Some(identity) = &attested.identity {
            change = change.write(Write::ClaimIdentity {
                identity: identity.clone(),
                device_id,
                method: attested.method,
                at: now,
            });
        }
        let submit_event =
            AuditDraft::new(actor, "registration.submit", format!("registration:{id}"))
                .details(json!({
                    "device_id": device_id,
                    "group": group.name,
                    "key_algorithm": algorithm.as_str(),
                    "key_source": group.key_source.as_str(),
                    "attestation": attested.method.as_str(),
                    "attested": attested.details,
                    "reenrollment": existing.is_some(),
                }))
                // Device metadata as submitted: for auditors only.
                .sensitive("name", reg.name.clone())
                .sensitive("device_type", reg.device_type.clone())
                .sensitive("location", reg.location.clone())
                .sensitive("firmware", reg.firmware.clone())
                .source(sub.client_addr.as_deref());
        let auto = group.approvals_needed() == 0;
        let change = change
            .write(Write::InsertRegistration {
                record: Box::new(reg.clone()),
                max_pending_in_group: (!auto).then_some(group.max_pending),
            })
            .audit(submit_event);
        let map_err = |e: RegistryError| match e {
            RegistryError::Store(StoreError::Conflict(c)) => map_submit_conflict(c, &group.name),
            other => other,
        };
        let reg = if auto {
            let approve = AuditDraft::new(
                "system",
                "registration.auto_approve",
                format!("registration:{id}"),
            )
            .details(json!({
                "policy": "approval = auto",
                "attestation": attested.method.as_str(),
            }))
            .source(sub.client_addr.as_deref());
            self.issue(
                reg,
                verified_csr,
                &profile,
                change.audit(approve),
                sub.client_addr.as_deref(),
            )
            .await
            .map_err(map_err)?
        } else {
            self.store
                .commit(change)
                .await
                .map_err(|e| map_err(RegistryError::Store(e)))?;
            reg
        };
        self.metrics
            .registration(if reg.status == RegistrationStatus::Issued {
                "auto_issued"
            } else {
                "submitted"
            });
        if reg.status != RegistrationStatus::Issued {
            // Committed and waiting for admins: tell them (queued, never blocks).
            self.notifier
                .send(crate::notify::Notification::RegistrationPending {
                    registration_id: reg.id,
                    device_id: reg.device_id,
                    group: reg.group.clone(),
                    device_name: reg.name.clone(),
                    attestation: group.method().as_str().to_string(),
                    submitted_at: reg.submitted_at,
                    approvals_required: group.approvals_needed(),
                });
        }
        Ok(Submitted {
            registration: reg,
            secret,
        })
    }

    /// Issues `reg`: signs its certificate (generating the key in the HSM
    /// first for server keys), and commits `change` (the writes and events
    /// that decided it) together with the registration's new status, the
    /// device (new, or re-enrolled with its older certificates revoked as
    /// superseded) and the certificate. Returns the issued registration.
    async fn issue(
        &self,
        mut reg: RegistrationRecord,
        verified: Option<csr::VerifiedCsr>,
        profile: &crate::policy::ProfilePolicy,
        change: Change,
        source: Option<&str>,
    ) -> Result<RegistrationRecord, RegistryError> {
        let now = self.clock.now().unix_timestamp();
        // Only a device named by an attested identity or a reclaim code can
        // exist already (a fresh id cannot): read only then.
        let existing = if reg.reenrollment
            || reg.attested_identity.is_some()
            || reg.attestation == AttestationMethod::Reclaim
        {
            self.store.get_device(reg.device_id).await?
        } else {
            None
        };
        // Certificates a re-enrollment revokes, for the revocation observers.
        let superseded = match &existing {
            Some(_) => {
                self.store
                    .list_certificates(
                        &crate::store::CertificateFilter {
                            device: Some(reg.device_id),
                            ..Default::default()
                        },
                        &crate::store::SerialPageRequest {
                            limit: 1000,
                            ..Default::default()
                        },
                    )
                    .await?
                    .items
            }
            None => Vec::new(),
        };
        let build = |reg: &mut RegistrationRecord,
                     issued: crate::ca::IssuedCertificate,
                     mut change: Change| {
            reg.status = RegistrationStatus::Issued;
            reg.decided_at = Some(now);
            reg.certificate_serial = Some(issued.record.serial.clone());
            let serial = issued.record.serial.clone();
            let issue_event = self.issue_event(reg, &issued.record, source);
            change = change.write(Write::SetRegistrationStatus {
                id: reg.id,
                from: RegistrationStatus::Pending,
                to: RegistrationStatus::Issued,
                at: now,
                certificate_serial: Some(serial.clone()),
            });
            let device = device_record(reg, now);
            // The group's broker topics, granted after the device row exists
            // (the outbox references it); a re-enrollment replaces them.
            let broker = self.ca.broker_write_for(&device, DeviceStatus::Active, now);
            change = match &existing {
                None => change.write(Write::InsertDevice(device)),
                Some(_) => change
                    .write(Write::ReenrollDevice {
                        id: reg.device_id,
                        group: reg.group.clone(),
                        name: reg.name.clone(),
                        keep_serial: serial.clone(),
                        at: now,
                    })
                    .audit(
                        AuditDraft::new(
                            "system",
                            if reg.attestation == AttestationMethod::Reclaim {
                                "device.reclaim"
                            } else {
                                "device.reprovision"
                            },
                            format!("device:{}", reg.device_id),
                        )
                        .details(json!({
                            "registration": reg.id,
                            "attestation": reg.attestation.as_str(),
                            "identity": reg.attested_identity,
                            "new_certificate": serial,
                            "superseded": superseded
                                .iter()
                                .filter(|c| c.status == crate::store::CertificateStatus::Valid
                                    || c.status == crate::store::CertificateStatus::Superseded)
                                .map(|c| c.serial.clone())
                                .collect::<Vec<_>>(),
                        }))
                        .source(source),
                    ),
            };
            if let Some(w) = broker {
                change = change.write(w);
            }
            change
                .write(Write::InsertCertificate(issued.record))
                .audit(issue_event)
        };
        // The insert of a pending registration is part of `change` on
        // auto-approval: the status write then finds it pending.
        match reg.key_source {
            KeySource::Csr => {
                // At submission the CSR was just verified and `change`
                // already holds the in-commit revoked-key guard. On a later
                // approval the key's device may have been revoked since:
                // checked before signing (no HSM work for a barred key) and
                // again inside the commit (no revocation slips in between).
                let (verified, change) = match verified {
                    Some(v) => (v, change),
                    None => {
                        let v = csr::verify(&reg.csr_der)?;
                        self.refuse_revoked_key(&v).await?;
                        let guard = Write::RefuseRevokedKey {
                            spki_sha256: crate::ca::spki_sha256(&v.spki_der),
                        };
                        (v, change.write(guard))
                    }
                };
                let issued = self
                    .ca
                    .sign_device_certificate(profile, reg.device_id, &verified)
                    .await?;
                let change = build(&mut reg, issued, change);
                self.store.commit(change).await.map_err(|e| match e {
                    StoreError::Conflict(Conflict::KeyRevoked) => RegistryError::KeyRevoked,
                    other => RegistryError::Store(other),
                })?;
            }
            KeySource::Server => {
                let keystore_name = self.ca.issuer(&profile.issuer)?.keystore_name.clone();
                let keystore = self.ca.keystores().get(&keystore_name)?.clone();
                let actor = format!("registration:{}", reg.id);
                let label = format!("device-{}", reg.device_id);
                let algorithm = reg.key_algorithm;
                let reg_cell = std::sync::Mutex::new(reg.clone());
                let key_id = crate::ca::keys::create(
                    keystore.as_ref(),
                    self.store.as_ref(),
                    self.clock.as_ref(),
                    &actor,
                    crate::ca::keys::NewKey {
                        keystore: &keystore_name,
                        label,
                        purpose: crate::store::KeyPurpose::Device,
                        algorithm,
                        ca_name: None,
                        // Extractable only by wrapping: the device needs it.
                        extractable: true,
                    },
                    async |pending: &crate::ca::keys::PendingKey| -> Result<Change, RegistryError> {
                        let verified = csr::VerifiedCsr {
                            algorithm,
                            spki_der: pending.public_key_der.clone(),
                        };
                        let issued = self
                            .ca
                            .sign_device_certificate(profile, reg.device_id, &verified)
                            .await?;
                        let (complete, event) = crate::ca::keys::complete(pending, now);
                        let change =
                            change
                                .write(complete)
                                .audit(event)
                                .write(Write::SetServerKey {
                                    registration_id: reg.id,
                                    key_id: pending.id,
                                });
                        let mut r = reg.clone();
                        let change = build(&mut r, issued, change);
                        if let Ok(mut cell) = reg_cell.lock() {
                            *cell = r;
                        }
                        Ok(change)
                    },
                )
                .await?;
                reg = match reg_cell.into_inner() {
                    Ok(r) => r,
                    Err(p) => p.into_inner(),
                };
                reg.server_key_id = Some(key_id);
            }
        }
        let mut revoked: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for c in superseded.iter().filter(|c| {
            c.status == crate::store::CertificateStatus::Valid
                || c.status == crate::store::CertificateStatus::Superseded
        }) {
            revoked
                .entry(c.issuer_ca.clone())
                .or_default()
                .push(c.serial.clone());
        }
        self.ca.notify(&revoked);
        self.metrics.issued(&profile.issuer);
        Ok(reg)
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
        if reg.token_minted_by == Some(admin.id) {
            return Err(RegistryError::MinterApproval);
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
                    "approvals": approvals,
                    "required": group.approvals_required,
                }))
                .sensitive("comment", comment)
                .sensitive("submitted_from", reg.client_addr.clone())
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
                let change = Change::new()
                    .write(record)
                    .audit(decision_event("registration.approve"));
                // Conflicts come back from `issue` as they are, to be
                // retried by `decide`; a barred key is final.
                let issued = self
                    .issue(reg.clone(), None, &profile, change, source)
                    .await?;
                self.metrics.ops.approval(decision.as_str());
                self.metrics.registration("issued");
                return Ok(DecisionResult {
                    registration: issued,
                    approvals,
                    approvals_required: group.approvals_needed(),
                });
            }
        };
        self.store
            .commit(change)
            .await
            .map_err(RegistryError::Store)?;
        self.metrics.ops.approval(decision.as_str());
        self.metrics.registration(match updated.status {
            RegistrationStatus::Denied => "denied",
            _ => "approval_recorded",
        });
        Ok(DecisionResult {
            registration: updated,
            approvals,
            approvals_required: group.approvals_needed(),
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
        let mut change = Change::new()
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
            );
        // A server key goes out once, in the first answer that commits.
        let undelivered = reg.key_source == KeySource::Server && reg.key_delivered_at.is_none();
        let key_bundle = if undelivered {
            let (bundle, write, event) = self
                .key_bundle(reg, &cert.der, &issuer.chain_pem, now)
                .await?;
            change = change.write(write).audit(event.source(source));
            Some(bundle)
        } else {
            None
        };
        self.store.commit(change).await.map_err(|e| match e {
            // Confirmed, or the key delivered, between our read and this write.
            StoreError::Conflict(_) => RegistryError::CredentialsGone,
            other => other.into(),
        })?;
        if undelivered {
            self.retire_delivered_key(reg, group.escrow).await;
        }
        Ok(Credentials {
            certificate_pem: x509::to_pem(&cert.der).map_err(|e| RegistryError::Ca(e.into()))?,
            chain_pem: issuer.chain_pem.clone(),
            device_config,
            key_delivered: (reg.key_source == KeySource::Server).then_some(!undelivered),
            key_bundle,
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

/// A submission's conflicts, in the caller's words.
fn map_submit_conflict(c: Conflict, group: &str) -> RegistryError {
    match c {
        Conflict::LimitReached { limit, .. } => RegistryError::PendingLimit {
            group: group.to_string(),
            limit,
        },
        Conflict::KeyRevoked => RegistryError::KeyRevoked,
        Conflict::TokenUnusable { reason } => RegistryError::TokenInvalid(reason),
        Conflict::Duplicate { entity: "JWT id" } => RegistryError::Attestation {
            code: "jwt_replayed",
            message: "this JWT (its jti) was already used".into(),
        },
        other => RegistryError::Store(StoreError::Conflict(other)),
    }
}

/// A malformed age recipient is refused before anything is stored.
fn delivery_check_recipient(r: &str) -> Result<(), RegistryError> {
    delivery::AgeRecipient::parse(r)
        .map(drop)
        .map_err(|e| RegistryError::Delivery {
            code: e.code(),
            message: e.to_string(),
        })
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
