//! The rotation executor: one persisted [`RotationRecord`] per rotation,
//! moved one step at a time. Every step is one commit that carries the
//! step's audit event (`rotation.<step>`) and the record's move from the
//! previous step, conditional on the record still being there, so a step
//! commits at most once and a crash resumes at the last committed step.
//!
//! An issuing CA's key:
//!
//! | step            | side effect before the commit        | undo / recovery after a crash               |
//! |-----------------|--------------------------------------|---------------------------------------------|
//! | `key-generated` | HSM key generated (`generating` row) | start-up key reconciliation destroys it; the step runs again |
//! | `certified`     | parent signs the new certificate     | nothing stored: signed again                 |
//! | `published`     | —                                    | —                                           |
//! | `activated`     | —                                    | (CA row, new key `active`, old `retired`: one commit) |
//! | `retired`       | —                                    | the old key's OCSP signer retires in the commit |
//! | `destroyed`     | HSM key destroyed (once `destroy_after` passed) | a missing object is not destroyed again |
//!
//! After `activated` the new key issues; the retired key keeps signing CRLs
//! and OCSP answers for the certificates it issued until `destroy_after`
//! (the last of them expires). An OCSP signer's key goes `planned →
//! activated` in one commit (new signer in, old retired), then `retired`
//! and `destroyed` at once (nothing relies on a replaced signer key).
//!
//! A failed step is recorded (`attempts`, `last_error`, audited
//! `rotation.step_failed`, notified) and retried with exponential backoff;
//! no step is ever skipped. Certifying a successor whose parent key is on
//! a YubiKey is never done by the scheduler: the rotation waits at
//! `key-generated` for an operator (`keyward ca rotate NAME --with-root-card`
//! on the machine with the card).

use super::fault::{Boundary, pause_point};
use crate::audit::{AuditDraft, Outcome};
use crate::ca::crls::CrlPublisher;
use crate::ca::responder::Responder;
use crate::ca::{CaError, CaService, keys};
use crate::clock::Clock;
use crate::keystore::KeyStoreError;
use crate::notify::{Notification, Notifiers, RotationOutcome};
use crate::policy::CaKind;
use crate::store::{
    Change, Conflict, KeyPurpose, KeyState, RotationRecord, RotationStep, Store, StoreError, Write,
};
use serde_json::json;
use std::sync::Arc;
use tokio::sync::Notify;
use uuid::Uuid;

/// First retry delay after a failed step; doubles per attempt up to [`BACKOFF_MAX`].
const BACKOFF_MIN: i64 = 30;
const BACKOFF_MAX: i64 = 3600;
/// How long a rotation waiting for the root card sleeps between reminders.
const CARD_WAIT: i64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    KeyLifecycle(#[from] keys::KeyLifecycleError),
    #[error(transparent)]
    KeyStore(#[from] KeyStoreError),
    #[error("a rotation of {purpose} `{target}` is already running")]
    Running { purpose: String, target: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("rotation {0} not found")]
    NotFound(Uuid),
    #[error(
        "certifying the new key of `{0}` needs its parent's key, which is on a YubiKey: run `keyward ca rotate {0} --with-root-card` where the card is"
    )]
    NeedsRootCard(String),
    #[error("rotation {id}: {what}")]
    Inconsistent { id: Uuid, what: String },
    #[error("rotation {id} is at `{step}`, not waiting for the root card")]
    NotWaitingForCard { id: Uuid, step: &'static str },
}

impl RotationError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Ca(e) => e.code(),
            Self::Store(e) => e.code(),
            Self::KeyLifecycle(e) => e.code(),
            Self::KeyStore(_) => "keystore_error",
            Self::Running { .. } => "rotation_running",
            Self::Unsupported(_) => "rotation_unsupported",
            Self::NotFound(_) => "rotation_not_found",
            Self::NeedsRootCard(_) => "rotation_needs_root_card",
            Self::Inconsistent { .. } => "rotation_inconsistent",
            Self::NotWaitingForCard { .. } => "rotation_not_waiting_for_card",
        }
    }
}

/// What a rotation would do, for `--dry-run`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RotationPreview {
    pub purpose: KeyPurpose,
    pub target: String,
    pub old_key_id: Uuid,
    pub steps: Vec<&'static str>,
    pub needs_root_card: bool,
}

pub struct Rotator {
    ca: Arc<CaService>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    crls: Arc<CrlPublisher>,
    ocsp: Arc<Responder>,
    notifiers: Arc<Notifiers>,
    metrics: Arc<crate::metrics::Metrics>,
    /// One executor pass at a time in this process.
    running: tokio::sync::Mutex<()>,
    wake: Arc<Notify>,
    /// The device access token service, whose `token-signing` keys this
    /// executor rotates (set once by the composition root).
    tokens: std::sync::OnceLock<Arc<crate::auth::tokens::TokenService>>,
}

/// The rotation target of the token-signing key (one per deployment).
pub const TOKEN_SIGNING_TARGET: &str = "tokens";

fn step_event(r: &RotationRecord, step: RotationStep) -> AuditDraft {
    AuditDraft::new(
        r.actor.clone(),
        &format!("rotation.{}", step.as_str().replace('-', "_")),
        format!("rotation:{}", r.id),
    )
}

impl Rotator {
    pub fn new(
        ca: Arc<CaService>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        crls: Arc<CrlPublisher>,
        ocsp: Arc<Responder>,
        notifiers: Arc<Notifiers>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            ca,
            store,
            clock,
            crls,
            ocsp,
            notifiers,
            metrics,
            running: tokio::sync::Mutex::new(()),
            wake: Arc::new(Notify::new()),
            tokens: std::sync::OnceLock::new(),
        }
    }

    /// The rotation policy's schedule in force (reloadable).
    pub fn schedule(&self) -> crate::policy::Schedule {
        self.ca.policies().rotation.schedule.clone()
    }

    /// The rotation policy in force (reloadable).
    pub fn policy(&self) -> crate::policy::RotationPolicy {
        self.ca.policies().rotation.clone()
    }

    /// Asks the rotation job to run at once.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Resolves when [`Self::wake`] was called (cancel-safe).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    /// Gives the executor the token service (once; later calls are ignored).
    pub fn set_tokens(&self, tokens: Arc<crate::auth::tokens::TokenService>) {
        let _ = self.tokens.set(tokens);
    }

    fn tokens(&self) -> Result<&Arc<crate::auth::tokens::TokenService>, RotationError> {
        self.tokens.get().ok_or_else(|| {
            RotationError::Unsupported("the token service is not wired into the executor".into())
        })
    }

    /// The key a rotation of (`purpose`, `target`) replaces, and whether it
    /// needs the root card. Refuses what keyward does not rotate.
    async fn current_key(
        &self,
        purpose: KeyPurpose,
        target: &str,
    ) -> Result<(Uuid, bool), RotationError> {
        match purpose {
            KeyPurpose::IssuingCa => {
                let issuer = self.ca.issuer(target)?;
                if issuer.kind != CaKind::Issuing {
                    return Err(RotationError::Unsupported(format!(
                        "`{target}` is a root CA: roots are not rotated by keyward (a new root is a new trust anchor; see docs/operations.md, Rotation)"
                    )));
                }
                Ok((issuer.key_id, self.ca.parent_on_card(target)))
            }
            KeyPurpose::OcspSigning => {
                let issuer = self.ca.issuer(target)?;
                let signer = self.ca.load_ocsp_signer(&issuer).await?.ok_or_else(|| {
                    RotationError::Unsupported(format!(
                        "CA `{target}` has no OCSP signer to rotate (it does not issue under any profile)"
                    ))
                })?;
                Ok((signer.key_id, false))
            }
            KeyPurpose::TokenSigning => {
                if target != TOKEN_SIGNING_TARGET {
                    return Err(RotationError::Unsupported(format!(
                        "the token-signing key's target is `{TOKEN_SIGNING_TARGET}`, not `{target}`"
                    )));
                }
                let key = self.tokens()?.active_key().await.ok_or_else(|| {
                    RotationError::Unsupported("no active token-signing key to rotate".into())
                })?;
                Ok((key, false))
            }
            other => Err(RotationError::Unsupported(format!(
                "keys of purpose `{other}` are not rotated by the executor (the TLS server key is replaced with every renewal of its certificate)"
            ))),
        }
    }

    /// The planner's view of the keys in force and the open rotations, as
    /// of `now` (reads the store; decides nothing).
    pub async fn plan(&self, now: i64) -> Result<super::plan::Plan, RotationError> {
        use super::plan::{KeyView, PlanInput, RotationView};
        let mut service_not_after = std::collections::BTreeMap::new();
        for purpose in [KeyPurpose::OcspSigning, KeyPurpose::TlsServer] {
            for svc in self.store.service_certificates(purpose).await? {
                service_not_after.entry(svc.key_id).or_insert(svc.not_after);
            }
        }
        let mut keys = Vec::new();
        for k in self.store.list_keys().await? {
            if k.state != KeyState::Active {
                continue;
            }
            let (target, cert_not_after, parent_on_card) = match k.purpose {
                KeyPurpose::RootCa | KeyPurpose::IssuingCa => {
                    let Some(ca) = k.ca_name.clone() else {
                        continue;
                    };
                    let not_after = self.ca.generation(&ca, k.id).map(|g| g.not_after);
                    let card = self.ca.parent_on_card(&ca);
                    (ca, not_after, card)
                }
                KeyPurpose::OcspSigning => {
                    let Some(ca) = k.ca_name.clone() else {
                        continue;
                    };
                    (ca, service_not_after.get(&k.id).copied(), false)
                }
                KeyPurpose::TlsServer => (
                    "server".to_string(),
                    service_not_after.get(&k.id).copied(),
                    false,
                ),
                KeyPurpose::TokenSigning => (TOKEN_SIGNING_TARGET.to_string(), None, false),
                _ => continue,
            };
            keys.push(KeyView {
                key_id: k.id,
                purpose: k.purpose,
                target,
                state: k.state,
                activated_at: k.created_at,
                cert_not_after,
                parent_on_card,
            });
        }
        let rotations: Vec<RotationView> = self
            .store
            .list_rotations(true, 1000)
            .await?
            .iter()
            .map(RotationView::from)
            .collect();
        let policies = self.ca.policies();
        Ok(super::plan::plan(
            &PlanInput {
                keys: &keys,
                rotations: &rotations,
            },
            &policies.rotation,
            now,
        ))
    }

    /// Starts the rotations `plan` says are due (`Rotate`, and `NeedsRootCard`,
    /// whose new key is generated and then waits for the operator). Keys the
    /// executor does not rotate (the TLS server key is replaced with every
    /// renewal of its certificate) are left to their own job. Returns the
    /// rotations started.
    pub async fn start_due(
        &self,
        plan: &super::plan::Plan,
    ) -> Result<Vec<RotationRecord>, RotationError> {
        use super::plan::Action;
        let mut started = Vec::new();
        for item in &plan.items {
            let reason = match &item.action {
                Action::Rotate { reason } | Action::NeedsRootCard { reason } => reason,
                _ => continue,
            };
            if !matches!(
                item.purpose,
                KeyPurpose::IssuingCa | KeyPurpose::OcspSigning | KeyPurpose::TokenSigning
            ) {
                continue;
            }
            match self
                .start(
                    item.purpose,
                    &item.target,
                    "system",
                    &format!("schedule: {reason}"),
                )
                .await
            {
                Ok(r) => started.push(r),
                // Started meanwhile (by an operator, or another pass).
                Err(RotationError::Running { .. }) => {}
                Err(e) => {
                    tracing::error!(purpose = %item.purpose, target = %item.target, code = e.code(), error = %e, "could not start a due rotation");
                }
            }
        }
        Ok(started)
    }

    /// What [`Self::start`] would do, writing nothing.
    pub async fn preview(
        &self,
        purpose: KeyPurpose,
        target: &str,
    ) -> Result<RotationPreview, RotationError> {
        let (old, card) = self.current_key(purpose, target).await?;
        if let Some(r) = self.running_for(purpose, target).await? {
            return Err(RotationError::Running {
                purpose: r.purpose.as_str().to_string(),
                target: r.target,
            });
        }
        let steps = match purpose {
            KeyPurpose::IssuingCa => vec![
                "key-generated",
                "certified",
                "published",
                "activated",
                "retired",
                "destroyed",
            ],
            KeyPurpose::TokenSigning => {
                vec!["key-generated", "activated", "retired", "destroyed"]
            }
            _ => vec!["activated", "retired", "destroyed"],
        };
        Ok(RotationPreview {
            purpose,
            target: target.to_string(),
            old_key_id: old,
            steps,
            needs_root_card: card,
        })
    }

    async fn running_for(
        &self,
        purpose: KeyPurpose,
        target: &str,
    ) -> Result<Option<RotationRecord>, RotationError> {
        Ok(self
            .store
            .list_rotations(true, 1000)
            .await?
            .into_iter()
            .find(|r| r.purpose == purpose && r.target == target && r.step.running()))
    }

    /// Starts a rotation: the record at `planned`, audited `rotation.start`.
    /// The rotation job carries it out (woken at once).
    pub async fn start(
        &self,
        purpose: KeyPurpose,
        target: &str,
        actor: &str,
        reason: &str,
    ) -> Result<RotationRecord, RotationError> {
        let (old, card) = self.current_key(purpose, target).await?;
        let now = self.now();
        let record = RotationRecord {
            id: Uuid::now_v7(),
            purpose,
            target: target.to_string(),
            step: RotationStep::Planned,
            old_key_id: Some(old),
            new_key_id: None,
            new_serial: None,
            reason: reason.to_string(),
            actor: actor.to_string(),
            destroy_after: None,
            attempts: 0,
            last_error: None,
            next_attempt_at: now,
            created_at: now,
            updated_at: now,
            finished_at: None,
        };
        let change = Change::new()
            .write(Write::InsertRotation(record.clone()))
            .audit(
                AuditDraft::new(actor, "rotation.start", format!("rotation:{}", record.id))
                    .details(json!({
                        "purpose": purpose.as_str(),
                        "target": target,
                        "old_key": old,
                        "reason": reason,
                        "needs_root_card": card,
                    })),
            );
        match self.store.commit(change).await {
            Ok(_) => {}
            Err(StoreError::Conflict(Conflict::RotationRunning { purpose, target })) => {
                return Err(RotationError::Running { purpose, target });
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(rotation = %record.id, purpose = %purpose, target, reason, "rotation started");
        self.wake();
        Ok(record)
    }

    /// Advances every unfinished rotation whose next attempt is due, each as
    /// far as it can go now (never certifying with a card-held key).
    /// Returns the rotations it touched.
    pub async fn run_due(&self) -> Result<Vec<RotationRecord>, RotationError> {
        let _one = self.running.lock().await;
        let now = self.now();
        let mut touched = Vec::new();
        for r in self.store.list_rotations(true, 1000).await? {
            if r.next_attempt_at > now {
                continue;
            }
            if r.step == RotationStep::Retired && r.destroy_after.is_some_and(|t| t > now) {
                continue;
            }
            touched.push(self.drive(r, None).await);
        }
        Ok(touched)
    }

    /// The operator's explicit command for a rotation waiting for the root
    /// card (at `key-generated`, its parent's key on a YubiKey that this
    /// daemon reaches): certifies the new key with the card now, recording
    /// `operator` in the step's audit event, and carries on as far as it
    /// can go.
    pub async fn certify_with_root_card(
        &self,
        id: Uuid,
        operator: &str,
    ) -> Result<RotationRecord, RotationError> {
        let _one = self.running.lock().await;
        let r = self
            .store
            .get_rotation(id)
            .await?
            .ok_or(RotationError::NotFound(id))?;
        if r.step != RotationStep::KeyGenerated || r.purpose != KeyPurpose::IssuingCa {
            return Err(RotationError::NotWaitingForCard {
                id,
                step: r.step.as_str(),
            });
        }
        if !self.ca.parent_on_card(&r.target) {
            return Err(RotationError::Unsupported(format!(
                "the parent of `{}` is not on a card: the scheduler certifies its new key",
                r.target
            )));
        }
        // Card trouble (PIN, removed card) is the operator's to see at once.
        self.certify(&r, Some(operator)).await?;
        let r = self
            .store
            .get_rotation(id)
            .await?
            .ok_or(RotationError::NotFound(id))?;
        Ok(self.drive(r, None).await)
    }

    /// Runs the steps of `r` until it finishes, waits, or a step fails.
    async fn drive(&self, mut r: RotationRecord, operator: Option<&str>) -> RotationRecord {
        loop {
            match self.step(&r, operator).await {
                Ok(Some(next)) => {
                    r = next;
                    if r.step.finished() {
                        return r;
                    }
                }
                Ok(None) => return r,
                Err(e) => {
                    self.record_failure(&r, &e).await;
                    return self
                        .store
                        .get_rotation(r.id)
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or(r);
                }
            }
        }
    }

    /// The step after `r.step`; `Ok(None)`: nothing to do now.
    async fn step(
        &self,
        r: &RotationRecord,
        operator: Option<&str>,
    ) -> Result<Option<RotationRecord>, RotationError> {
        use RotationStep as S;
        match (r.purpose, r.step) {
            (_, S::Destroyed | S::Abandoned) => Ok(None),
            (_, S::Retired) => self.destroy_old(r).await,
            (_, S::Activated) => self.retire(r).await,
            (KeyPurpose::IssuingCa, S::Planned) => self.generate(r).await,
            (KeyPurpose::IssuingCa, S::KeyGenerated) => self.certify(r, operator).await,
            (KeyPurpose::IssuingCa, S::Certified) => self.publish(r).await,
            (KeyPurpose::IssuingCa, S::Published) => self.activate(r).await,
            (KeyPurpose::OcspSigning, S::Planned) => self.replace_ocsp_signer(r).await,
            (KeyPurpose::TokenSigning, S::Planned) => self.generate_token_key(r).await,
            (KeyPurpose::TokenSigning, S::KeyGenerated) => self.activate_token_key(r).await,
            (p, s) => Err(RotationError::Inconsistent {
                id: r.id,
                what: format!("no step follows `{s}` for purpose `{p}`"),
            }),
        }
    }

    fn advance(
        r: &RotationRecord,
        to: RotationStep,
        new_key_id: Option<Uuid>,
        new_serial: Option<String>,
        destroy_after: Option<i64>,
        at: i64,
    ) -> Write {
        Write::AdvanceRotation {
            id: r.id,
            from: r.step,
            to,
            new_key_id,
            new_serial,
            destroy_after,
            at,
        }
    }

    async fn reread(&self, id: Uuid) -> Result<Option<RotationRecord>, RotationError> {
        self.store
            .get_rotation(id)
            .await?
            .map(Some)
            .ok_or(RotationError::NotFound(id))
    }

    fn old_key(r: &RotationRecord) -> Result<Uuid, RotationError> {
        r.old_key_id.ok_or_else(|| RotationError::Inconsistent {
            id: r.id,
            what: "no old key recorded".into(),
        })
    }

    fn new_key(r: &RotationRecord) -> Result<Uuid, RotationError> {
        r.new_key_id.ok_or_else(|| RotationError::Inconsistent {
            id: r.id,
            what: "no new key recorded".into(),
        })
    }

    /// `planned → key-generated`: a new key in the CA's key store, recorded
    /// `pre-active` with the step.
    async fn generate(&self, r: &RotationRecord) -> Result<Option<RotationRecord>, RotationError> {
        let issuer = self.ca.issuer(&r.target)?;
        let policies = self.ca.policies();
        let policy = policies.cas.iter().find(|p| p.name == r.target);
        let algorithm = policy.map_or(issuer.algorithm, |p| p.algorithm);
        // The successor is as backup-able as the CA's policy says (an
        // issuing CA defaults to wrap-only).
        let extractable =
            policy.is_none_or(|p| p.key_backup() == crate::policy::KeyBackup::WrapOnly);
        let now_ms = (self.clock.now().unix_timestamp_nanos() / 1_000_000) as i64;
        let pending = keys::begin(
            issuer.keystore.as_ref(),
            self.store.as_ref(),
            self.clock.as_ref(),
            &r.actor,
            keys::NewKey {
                keystore: &issuer.keystore_name,
                label: format!("keyward-ca-{}-{now_ms}", r.target),
                purpose: KeyPurpose::IssuingCa,
                algorithm,
                ca_name: Some(&r.target),
                extractable,
            },
        )
        .await?;
        pause_point("key-generated", Boundary::Before).await;
        let now = self.now();
        let (complete, key_event) = keys::complete_as(&pending, KeyState::PreActive, now);
        let change = Change::new()
            .write(complete)
            .audit(AuditDraft {
                actor: r.actor.clone(),
                ..key_event
            })
            .write(Self::advance(
                r,
                RotationStep::KeyGenerated,
                Some(pending.id),
                None,
                None,
                now,
            ))
            .audit(step_event(r, RotationStep::KeyGenerated).details(json!({
                "ca": r.target,
                "new_key": pending.id,
                "algorithm": algorithm.as_str(),
                "keystore": issuer.keystore_name,
            })));
        if let Err(e) = self.store.commit(change).await {
            keys::abandon(
                issuer.keystore.as_ref(),
                self.store.as_ref(),
                self.clock.as_ref(),
                &r.actor,
                &pending,
                &e.to_string(),
            )
            .await;
            return Err(e.into());
        }
        pause_point("key-generated", Boundary::After).await;
        self.reread(r.id).await
    }

    /// `key-generated → certified`: the parent signs the new key's
    /// certificate. A card-held parent signs only for an operator's
    /// explicit command (`operator`).
    async fn certify(
        &self,
        r: &RotationRecord,
        operator: Option<&str>,
    ) -> Result<Option<RotationRecord>, RotationError> {
        let card = self.ca.parent_on_card(&r.target);
        if card && operator.is_none() {
            return Err(RotationError::NeedsRootCard(r.target.clone()));
        }
        let key_id = Self::new_key(r)?;
        let key = self
            .store
            .get_key(key_id)
            .await?
            .filter(|k| k.state == KeyState::PreActive)
            .ok_or_else(|| RotationError::Inconsistent {
                id: r.id,
                what: format!("new key {key_id} is not pre-active"),
            })?;
        let record = self.ca.certify_successor(&r.target, &key).await?;
        let keystore = self.ca.keystores().get(&key.keystore)?.clone();
        keystore.store_certificate(&key.handle, &record.der).await?;
        pause_point("certified", Boundary::Before).await;
        let now = self.now();
        let details = json!({
            "ca": r.target,
            "new_key": key_id,
            "serial": record.serial,
            "fingerprint_sha256": record.fingerprint_sha256,
            "not_before": record.not_before,
            "not_after": record.not_after,
            "issuer": record.issuer_ca,
            "root_card": card,
            "root_card_operator": operator,
        });
        let serial = record.serial.clone();
        let change = Change::new()
            .write(Write::InsertCertificate(record))
            .write(Self::advance(
                r,
                RotationStep::Certified,
                None,
                Some(serial),
                None,
                now,
            ))
            .audit(step_event(r, RotationStep::Certified).details(details));
        self.store.commit(change).await?;
        pause_point("certified", Boundary::After).await;
        self.reread(r.id).await
    }

    /// `certified → published`: the new certificate is served in the CA's bundle.
    async fn publish(&self, r: &RotationRecord) -> Result<Option<RotationRecord>, RotationError> {
        let now = self.now();
        let change = Change::new()
            .write(Self::advance(
                r,
                RotationStep::Published,
                None,
                None,
                None,
                now,
            ))
            .audit(step_event(r, RotationStep::Published).details(json!({
                "ca": r.target,
                "new_key": r.new_key_id,
                "serial": r.new_serial,
            })));
        pause_point("published", Boundary::Before).await;
        self.store.commit(change).await?;
        pause_point("published", Boundary::After).await;
        self.ca.reload().await?;
        self.reread(r.id).await
    }

    /// `published → activated`: the CA points at the new key, which issues
    /// from now on; the old key is retired in the same commit.
    async fn activate(&self, r: &RotationRecord) -> Result<Option<RotationRecord>, RotationError> {
        let old = Self::old_key(r)?;
        let new = Self::new_key(r)?;
        let serial = r
            .new_serial
            .clone()
            .ok_or_else(|| RotationError::Inconsistent {
                id: r.id,
                what: "no new certificate recorded".into(),
            })?;
        let cert = self.store.get_certificate(&serial).await?.ok_or_else(|| {
            RotationError::Inconsistent {
                id: r.id,
                what: format!("certificate {serial} is not in the store"),
            }
        })?;
        let now = self.now();
        let change = Change::new()
            .write(Write::ActivateCaKey {
                ca: r.target.clone(),
                from_key: old,
                to_key: new,
                certificate_der: cert.der,
            })
            .write(Write::SetKeyState {
                id: new,
                from: KeyState::PreActive,
                to: KeyState::Active,
                at: now,
            })
            .write(Write::SetKeyState {
                id: old,
                from: KeyState::Active,
                to: KeyState::Retired,
                at: now,
            })
            .write(Self::advance(
                r,
                RotationStep::Activated,
                None,
                None,
                None,
                now,
            ))
            .audit(step_event(r, RotationStep::Activated).details(json!({
                "ca": r.target,
                "new_key": new,
                "old_key": old,
                "serial": serial,
            })));
        pause_point("activated", Boundary::Before).await;
        self.store.commit(change).await?;
        pause_point("activated", Boundary::After).await;
        self.after_key_change(&r.actor, &r.target).await;
        self.notify(r, RotationOutcome::Completed, RotationStep::Activated, None);
        self.reread(r.id).await
    }

    /// Brings the in-memory CA, OCSP signers and CRLs up to date after the
    /// store's keys changed. Failures are logged: the CRL and OCSP jobs
    /// catch up on their next tick.
    async fn after_key_change(&self, actor: &str, ca: &str) {
        if let Err(e) = self.ca.reload().await {
            tracing::error!(ca, code = e.code(), error = %e, "reloading the CAs after a rotation step");
        }
        if let Err(e) = self.ocsp.reload_signers(actor).await {
            tracing::error!(ca, code = e.code(), error = %e, "reloading the OCSP signers after a rotation step");
        }
        if let Err(e) = self.crls.load().await {
            tracing::error!(ca, code = e.code(), error = %e, "loading CRLs after a rotation step");
        }
        if let Err(e) = self.crls.publish(ca, actor).await {
            tracing::error!(ca, code = e.code(), error = %e, "publishing CRLs after a rotation step");
        }
    }

    /// `activated → retired`: for a CA key, its delegated OCSP signer
    /// retires (the old key answers for its own certificates now) and the
    /// key may be destroyed once the last certificate it issued expired.
    /// A replaced OCSP signer's key may be destroyed at once.
    async fn retire(&self, r: &RotationRecord) -> Result<Option<RotationRecord>, RotationError> {
        let old = Self::old_key(r)?;
        let now = self.now();
        let mut change = Change::new();
        let mut retired_signers = Vec::new();
        let destroy_after = match r.purpose {
            KeyPurpose::IssuingCa => {
                for svc in self
                    .store
                    .service_certificates(KeyPurpose::OcspSigning)
                    .await?
                {
                    if svc.issuer_ca != r.target {
                        continue;
                    }
                    let Some(cert) = self.store.get_certificate(&svc.serial).await? else {
                        continue;
                    };
                    if cert.issuer_key_id != old {
                        continue;
                    }
                    change = change.write(Write::RetireServiceCertificate {
                        serial: svc.serial.clone(),
                        at: now,
                    });
                    if self
                        .store
                        .get_key(svc.key_id)
                        .await?
                        .is_some_and(|k| k.state == KeyState::Active)
                    {
                        change = change.write(Write::SetKeyState {
                            id: svc.key_id,
                            from: KeyState::Active,
                            to: KeyState::Retired,
                            at: now,
                        });
                    }
                    retired_signers.push(svc.serial);
                }
                self.store
                    .last_expiry_issued_by(old)
                    .await?
                    .unwrap_or(now)
                    .max(now)
            }
            // Every token the old key signed expires within the token
            // lifetime; until then the JWKS keeps its public key (a minute
            // of slack for relying parties' clocks).
            KeyPurpose::TokenSigning => now + self.tokens()?.settings().ttl_seconds + 60,
            _ => now,
        };
        let change = change
            .write(Self::advance(
                r,
                RotationStep::Retired,
                None,
                None,
                Some(destroy_after),
                now,
            ))
            .audit(step_event(r, RotationStep::Retired).details(json!({
                "target": r.target,
                "old_key": old,
                "destroy_after": destroy_after,
                "retired_ocsp_signers": retired_signers,
            })));
        pause_point("retired", Boundary::Before).await;
        self.store.commit(change).await?;
        pause_point("retired", Boundary::After).await;
        if r.purpose == KeyPurpose::IssuingCa {
            self.after_key_change(&r.actor, &r.target).await;
        }
        self.reload_tokens(r).await;
        self.reread(r.id).await
    }

    /// `retired → destroyed`, once `destroy_after` has passed: the old key
    /// leaves the HSM. Resumable: an object already gone is not destroyed again.
    async fn destroy_old(
        &self,
        r: &RotationRecord,
    ) -> Result<Option<RotationRecord>, RotationError> {
        let now = self.now();
        if r.destroy_after.is_some_and(|t| t > now) {
            return Ok(None);
        }
        let old = Self::old_key(r)?;
        let key = self
            .store
            .get_key(old)
            .await?
            .ok_or_else(|| RotationError::Inconsistent {
                id: r.id,
                what: format!("old key {old} is not in the store"),
            })?;
        let keystore = self.ca.keystores().get(&key.keystore)?.clone();
        let existed = keystore.exists(&key.handle).await?;
        let mut note = None;
        if existed {
            match keystore.destroy(&key.handle).await {
                Ok(()) => {}
                Err(KeyStoreError::OperationUnsupported { .. }) => {
                    note = Some(
                        "the device cannot delete keys: the key stays in its slot until the slot is generated into again",
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        pause_point("destroyed", Boundary::Before).await;
        let change = Change::new()
            .write(Write::SetKeyState {
                id: old,
                from: key.state,
                to: KeyState::Destroyed,
                at: now,
            })
            .write(Self::advance(
                r,
                RotationStep::Destroyed,
                None,
                None,
                None,
                now,
            ))
            .audit(
                AuditDraft::new(r.actor.clone(), "key.destroy", format!("key:{old}")).details(
                    json!({
                        "purpose": key.purpose.as_str(),
                        "hsm_object_destroyed": existed && note.is_none(),
                        "note": note,
                    }),
                ),
            )
            .audit(step_event(r, RotationStep::Destroyed).details(json!({
                "target": r.target,
                "old_key": old,
            })));
        self.store.commit(change).await?;
        pause_point("destroyed", Boundary::After).await;
        if r.purpose == KeyPurpose::IssuingCa {
            self.after_key_change(&r.actor, &r.target).await;
        }
        self.reload_tokens(r).await;
        self.reread(r.id).await
    }

    /// After a token-signing step: the token service re-reads its keys
    /// (signer and JWKS). Other daemons re-read on their own rotation pass.
    async fn reload_tokens(&self, r: &RotationRecord) {
        if r.purpose != KeyPurpose::TokenSigning {
            return;
        }
        if let Some(t) = self.tokens.get()
            && let Err(e) = t.reload().await
        {
            tracing::error!(code = e.code(), error = %e, "reloading the token-signing keys after a rotation step");
        }
    }

    /// A token-signing key's `planned → key-generated`: the next key is
    /// generated `pre-active` (steps and undo: `ca::keys::create`) and
    /// committed with the step; from then on the JWKS publishes it, and it
    /// signs nothing until `token_key_overlap_seconds` have passed, so
    /// relying parties that cache the JWKS know it before its first token.
    async fn generate_token_key(
        &self,
        r: &RotationRecord,
    ) -> Result<Option<RotationRecord>, RotationError> {
        let tokens = self.tokens()?.clone();
        let keystore = self
            .ca
            .keystores()
            .get(&tokens.settings().keystore)?
            .clone();
        let now = self.now();
        let rotation = r.clone();
        tokens
            .generate_with(keystore.as_ref(), &r.actor, KeyState::PreActive, |key| {
                Change::new()
                    .write(Self::advance(
                        &rotation,
                        RotationStep::KeyGenerated,
                        Some(key.id),
                        None,
                        None,
                        now,
                    ))
                    .audit(
                        step_event(&rotation, RotationStep::KeyGenerated).details(json!({
                            "target": rotation.target,
                            "new_key": key.id,
                            "old_key": rotation.old_key_id,
                            "activates_after": now + tokens.settings().key_overlap_seconds,
                        })),
                    )
            })
            .await
            .map_err(|e| RotationError::Unsupported(format!("token-signing key: {e}")))?;
        self.reload_tokens(r).await;
        // Come back when the overlap is over (the periodic pass would too).
        let wake = self.wake.clone();
        let overlap = tokens.settings().key_overlap_seconds.max(0) as u64;
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(overlap)).await;
            wake.notify_one();
        });
        self.reread(r.id).await
    }

    /// A token-signing key's `key-generated → activated`, once the next key
    /// has been published for the overlap: it signs from now on, the old
    /// key is retired (verify only) in the same commit.
    async fn activate_token_key(
        &self,
        r: &RotationRecord,
    ) -> Result<Option<RotationRecord>, RotationError> {
        let overlap = self.tokens()?.settings().key_overlap_seconds;
        let now = self.now();
        if now < r.updated_at + overlap {
            return Ok(None);
        }
        let old = Self::old_key(r)?;
        let new = Self::new_key(r)?;
        let change = Change::new()
            .write(Write::SetKeyState {
                id: new,
                from: KeyState::PreActive,
                to: KeyState::Active,
                at: now,
            })
            .write(Write::SetKeyState {
                id: old,
                from: KeyState::Active,
                to: KeyState::Retired,
                at: now,
            })
            .write(Self::advance(
                r,
                RotationStep::Activated,
                None,
                None,
                None,
                now,
            ))
            .audit(step_event(r, RotationStep::Activated).details(json!({
                "target": r.target,
                "new_key": new,
                "old_key": old,
            })));
        self.store.commit(change).await?;
        self.reload_tokens(r).await;
        self.notify(r, RotationOutcome::Completed, RotationStep::Activated, None);
        self.reread(r.id).await
    }

    /// An OCSP signer's `planned → activated`: a new signer in, the old one
    /// retired, the step recorded, in one commit.
    async fn replace_ocsp_signer(
        &self,
        r: &RotationRecord,
    ) -> Result<Option<RotationRecord>, RotationError> {
        let issuer = self.ca.issuer(&r.target)?;
        let current = self.ca.load_ocsp_signer(&issuer).await?;
        let now = self.now();
        let rotation = r.clone();
        let old_serial = current.as_ref().map(|c| c.serial.clone());
        self.ca
            .create_ocsp_signer_with(&r.actor, &issuer, current.as_ref(), move |key| {
                Change::new()
                    .write(Self::advance(
                        &rotation,
                        RotationStep::Activated,
                        Some(key.id),
                        None,
                        None,
                        now,
                    ))
                    .audit(
                        step_event(&rotation, RotationStep::Activated).details(json!({
                            "ca": rotation.target,
                            "new_key": key.id,
                            "old_key": rotation.old_key_id,
                            "replaces": old_serial,
                        })),
                    )
            })
            .await?;
        pause_point("activated", Boundary::After).await;
        if let Err(e) = self.ocsp.reload_signers(&r.actor).await {
            tracing::error!(code = e.code(), error = %e, "reloading the OCSP signers after a rotation");
        }
        self.notify(r, RotationOutcome::Completed, RotationStep::Activated, None);
        self.reread(r.id).await
    }

    /// Records a failed step: attempts + 1, backoff, audited, notified.
    async fn record_failure(&self, r: &RotationRecord, e: &RotationError) {
        let now = self.now();
        let card = matches!(e, RotationError::NeedsRootCard(_));
        let delay = if card {
            CARD_WAIT
        } else {
            (BACKOFF_MIN << r.attempts.clamp(0, 7)).min(BACKOFF_MAX)
        };
        let change = Change::new()
            .write(Write::FailRotationAttempt {
                id: r.id,
                step: r.step,
                error: e.to_string(),
                next_attempt_at: now + delay,
                at: now,
            })
            .audit(
                AuditDraft::new(
                    r.actor.clone(),
                    "rotation.step_failed",
                    format!("rotation:{}", r.id),
                )
                .outcome(Outcome::Failure)
                .details(json!({
                    "purpose": r.purpose.as_str(),
                    "target": r.target,
                    "after_step": r.step.as_str(),
                    "attempt": r.attempts + 1,
                    "code": e.code(),
                    "error": e.to_string(),
                    "next_attempt_at": now + delay,
                })),
            );
        if let Err(se) = self.store.commit(change).await {
            tracing::error!(rotation = %r.id, error = %se, "could not record a failed rotation step");
        }
        tracing::error!(rotation = %r.id, step = %r.step, code = e.code(), error = %e, retry_in_s = delay, "rotation step failed");
        // The card reminder goes out once, not every hour.
        if !card || r.attempts == 0 {
            self.notify(
                r,
                if card {
                    RotationOutcome::NeedsOperator
                } else {
                    RotationOutcome::Failed
                },
                r.step,
                Some(e.to_string()),
            );
        }
    }

    fn notify(
        &self,
        r: &RotationRecord,
        outcome: RotationOutcome,
        step: RotationStep,
        error: Option<String>,
    ) {
        self.metrics
            .rotations
            .with_label_values(&[
                r.purpose.as_str(),
                match outcome {
                    RotationOutcome::Completed => "completed",
                    RotationOutcome::Failed => "failed",
                    RotationOutcome::NeedsOperator => "needs_operator",
                },
            ])
            .inc();
        self.notifiers.send(Notification::Rotation {
            rotation_id: r.id,
            purpose: r.purpose.as_str().to_string(),
            target: r.target.clone(),
            outcome,
            step: step.as_str().to_string(),
            error,
        });
    }
}
