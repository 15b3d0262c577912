//! The audit service: the `audit` key in the HSM, checkpoints of the chain
//! head signed with it, and the daemon's own periodic verification of the
//! chain's tail.
//!
//! The key is found (or generated, audited as `key.generate`) by
//! [`AuditService::prepare`] at start-up. Checkpoint public keys are read
//! from the token, never from the store alone: whoever can rewrite the
//! store could otherwise swap in a key of their own.

use super::Checkpoint;
use super::seal::{DATA_KEY_LEN, DataKeys, SealError};
use super::verify::{AuditKeys, Report, Verifier};
use crate::ca::keys::{self, KeyLifecycleError, NewKey};
use crate::clock::{Clock, unix_ms};
use crate::config::AuditConfig;
use crate::keystore::{KeyStore, KeyStoreError, KeyStores};
use crate::metrics::Metrics;
use crate::model::{KeyPurpose, KeyState};
use crate::store::records::KeyRecord;
use crate::store::{AuditQuery, Store, StoreError};
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use tokio::sync::RwLock;

/// The token label of every audit signing key: what makes a token object
/// an audit key (see [`AuditService::token_keys`]).
pub const AUDIT_KEY_LABEL: &str = "keyward-audit";

/// What a non-auditor sees in place of sealed details.
pub const REDACTED: &str = "redacted";

/// Algorithm of the `audit-encryption` key (RSA: decrypted with OAEP in the HSM).
pub const ENCRYPTION_KEY_ALGORITHM: crate::model::KeyAlgorithm =
    crate::model::KeyAlgorithm::Rsa3072;

/// Events read per page while verifying.
pub const VERIFY_PAGE: u32 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    KeyStore(#[from] KeyStoreError),
    #[error(transparent)]
    Key(#[from] KeyLifecycleError),
    #[error("no audit key is prepared (the daemon signs checkpoints only after start-up)")]
    NoKey,
    #[error(
        "audit key {key_id}'s public key on the token does not match the store's record: \
         refusing to sign or verify with it"
    )]
    KeyMismatch { key_id: uuid::Uuid },
    #[error("cannot append to the checkpoint file {path}: {source}")]
    CheckpointFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the checkpoint file {path} line {line} is not a checkpoint: {reason}")]
    CheckpointFileCorrupt {
        path: std::path::PathBuf,
        line: usize,
        reason: String,
    },
    #[error("this event's details are sealed and cannot be opened here")]
    Sealed,
    #[error("sealed audit details: {0}")]
    Seal(#[from] super::seal::SealError),
    #[error(
        "[audit] encrypt_details is on but key store `{keystore}` cannot seal audit details: \
         {reason} (set [audit] encrypt_details = false to store them in the clear)"
    )]
    EncryptionUnavailable { keystore: String, reason: String },
    #[error("audit chain broken at sequence {seq} ({kind}): {reason}")]
    Broken {
        seq: i64,
        kind: &'static str,
        reason: String,
    },
}

impl AuditError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Store(e) => e.code(),
            Self::KeyStore(e) => e.code(),
            Self::Key(e) => e.code(),
            Self::NoKey => "audit_key_missing",
            Self::KeyMismatch { .. } => "audit_key_mismatch",
            Self::CheckpointFile { .. } => "audit_checkpoint_file",
            Self::CheckpointFileCorrupt { .. } => "audit_checkpoint_file_corrupt",
            Self::Broken { .. } => "audit_chain_broken",
            Self::Sealed => "audit_details_sealed",
            Self::Seal(e) => e.code(),
            Self::EncryptionUnavailable { .. } => "audit_encryption_unavailable",
        }
    }
}

struct Signer {
    keystore: Arc<dyn KeyStore>,
    key: KeyRecord,
}

pub struct AuditService {
    store: Arc<dyn Store>,
    keystores: KeyStores,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    config: AuditConfig,
    signer: RwLock<Option<Signer>>,
    /// Where the periodic verification got to: (seq, hash) of the last
    /// event it verified.
    verified_to: Mutex<Option<(i64, Vec<u8>)>>,
    /// Unwrapped data keys that seal and open sensitive details.
    data_keys: Arc<DataKeys>,
}

impl AuditService {
    pub fn new(
        store: Arc<dyn Store>,
        keystores: KeyStores,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        config: AuditConfig,
    ) -> Self {
        Self {
            store,
            keystores,
            clock,
            metrics,
            config,
            signer: RwLock::new(None),
            verified_to: Mutex::new(None),
            data_keys: Arc::new(DataKeys::default()),
        }
    }

    pub fn settings(&self) -> &AuditConfig {
        &self.config
    }

    /// Finds the active audit key in the configured key store, or generates
    /// one (`actor` is recorded), and checks its public key on the token
    /// against the store. Returns the key.
    pub async fn prepare(&self, actor: &str) -> Result<KeyRecord, AuditError> {
        let keystore = self.keystores.get(&self.config.keystore)?.clone();
        let existing = self
            .store
            .list_keys()
            .await?
            .into_iter()
            .filter(|k| {
                k.purpose == KeyPurpose::Audit
                    && k.state == KeyState::Active
                    && k.keystore == self.config.keystore
            })
            .max_by_key(|k| k.created_at);
        let key = match existing {
            Some(k) if keystore.exists(&k.handle).await? => k,
            Some(k) => {
                // Gone from the token (restored onto a token that could not
                // take it back): retired, audited, and a new key signs from
                // here on. Its older checkpoints then verify only with its
                // public key given explicitly (`audit verify --public-key`).
                tracing::error!(key = %k.id, handle = %k.handle, "the audit key is missing from its token; generating a new one");
                let now = self.clock.now().unix_timestamp();
                self.store
                    .commit(
                        crate::store::Change::new()
                            .write(crate::store::Write::SetKeyState {
                                id: k.id,
                                from: KeyState::Active,
                                to: KeyState::Retired,
                                at: now,
                            })
                            .audit(
                                crate::audit::AuditDraft::new(
                                    actor,
                                    "audit.key_missing",
                                    format!("key:{}", k.id),
                                )
                                .outcome(crate::audit::Outcome::Failure)
                                .details(serde_json::json!({
                                    "handle": k.handle.0,
                                    "keystore": k.keystore,
                                    "public_key_sha256": crate::backup::archive::sha256_hex(&k.public_key_der),
                                })),
                            ),
                    )
                    .await?;
                self.generate(keystore.as_ref(), actor).await?
            }
            None => self.generate(keystore.as_ref(), actor).await?,
        };
        let on_token = keystore.public_key(&key.handle).await?;
        if on_token != key.public_key_der {
            return Err(AuditError::KeyMismatch { key_id: key.id });
        }
        *self.signer.write().await = Some(Signer {
            keystore,
            key: key.clone(),
        });
        self.refresh_gauges().await?;
        self.prepare_sealer(actor).await?;
        Ok(key)
    }

    /// With `[audit] encrypt_details` on: finds (or generates) the HSM
    /// `audit-encryption` key, makes a fresh data key, has the HSM decrypt
    /// it once (a token that cannot decrypt fails start-up here), records
    /// it wrapped (audited as `audit.data_key_create`) and installs it in
    /// the store, which from then on seals every event's sensitive
    /// details. Returns the data key's id (`None` when encryption is off).
    ///
    /// Steps and undo: the key pair is created through `keys::create`
    /// (its own undo); the data key row is committed last, so a failure
    /// before it leaves nothing (the data key lived only in memory).
    pub async fn prepare_sealer(&self, actor: &str) -> Result<Option<uuid::Uuid>, AuditError> {
        if !self.config.encrypt_details {
            return Ok(None);
        }
        let unavailable = |reason: String| AuditError::EncryptionUnavailable {
            keystore: self.config.keystore.clone(),
            reason,
        };
        let keystore = self.keystores.get(&self.config.keystore)?.clone();
        let existing = self
            .store
            .list_keys()
            .await?
            .into_iter()
            .filter(|k| {
                k.purpose == KeyPurpose::AuditEncryption
                    && k.state == KeyState::Active
                    && k.keystore == self.config.keystore
            })
            .max_by_key(|k| k.created_at);
        let key = match existing {
            Some(k) => k,
            None => {
                if !keystore
                    .capabilities()
                    .algorithms
                    .contains(&ENCRYPTION_KEY_ALGORITHM)
                {
                    return Err(unavailable(format!(
                        "it cannot generate {} keys",
                        ENCRYPTION_KEY_ALGORITHM.as_str()
                    )));
                }
                self.generate_key(
                    keystore.as_ref(),
                    actor,
                    "keyward-audit-encryption",
                    KeyPurpose::AuditEncryption,
                    ENCRYPTION_KEY_ALGORITHM,
                )
                .await?
            }
        };
        let on_token = keystore.public_key(&key.handle).await?;
        if on_token != key.public_key_der {
            return Err(AuditError::KeyMismatch { key_id: key.id });
        }
        let data_key = zeroize::Zeroizing::new(
            crate::crypto::random_bytes(DATA_KEY_LEN).map_err(|_| SealError::Random)?,
        );
        let wrapped = crate::crypto::oaep_encrypt(&key.public_key_der, &data_key)
            .map_err(|e| unavailable(e.to_string()))?;
        // The token must decrypt what it will be asked to decrypt later.
        match keystore.decrypt_data_key(&key.handle, &wrapped).await {
            Ok(back) if back.as_slice() == data_key.as_slice() => {}
            Ok(_) => {
                return Err(unavailable(
                    "the token decrypted a test data key to different bytes".into(),
                ));
            }
            Err(e) => return Err(unavailable(e.to_string())),
        }
        let id = uuid::Uuid::now_v7();
        let change = crate::store::Change::new()
            .write(crate::store::Write::InsertAuditDataKey(
                crate::store::records::AuditDataKeyRecord {
                    id,
                    key_id: key.id,
                    wrapped,
                    created_at: self.clock.now().unix_timestamp(),
                },
            ))
            .audit(
                super::AuditDraft::new(
                    actor,
                    "audit.data_key_create",
                    format!("audit-data-key:{id}"),
                )
                .details(serde_json::json!({
                    "key": key.id,
                    "wrapping": "rsa-oaep-sha1",
                    "cipher": "aes-256-gcm",
                })),
            );
        self.store.commit(change).await?;
        self.data_keys.insert(id, data_key)?;
        self.data_keys.set_current(id);
        self.store.install_sealer(self.data_keys.clone())?;
        tracing::info!(data_key = %id, key = %key.id, "audit details are sealed");
        Ok(Some(id))
    }

    /// The data key sealing new events, once prepared.
    pub fn current_data_key(&self) -> Option<uuid::Uuid> {
        self.data_keys.current()
    }

    /// Makes sure the data key `id` is unwrapped: from memory, or read from
    /// the store and decrypted by the HSM key that wrapped it.
    async fn load_data_key(&self, id: uuid::Uuid) -> Result<(), AuditError> {
        if self.data_keys.contains(id) {
            return Ok(());
        }
        let record = self
            .store
            .audit_data_keys()
            .await?
            .into_iter()
            .find(|k| k.id == id)
            .ok_or(SealError::UnknownDataKey(id))?;
        let key = self
            .store
            .get_key(record.key_id)
            .await?
            .ok_or(SealError::UnknownDataKey(id))?;
        let keystore = self.keystores.get(&key.keystore)?;
        let plain = keystore
            .decrypt_data_key(&key.handle, &record.wrapped)
            .await?;
        self.data_keys.insert(id, plain)?;
        Ok(())
    }

    /// Generates one of the audit keys (`label`, `purpose`, `algorithm`)
    /// in the configured key store and returns its record. Extractable
    /// (wrap-only) where the token can wrap, so that backups carry it: a
    /// restored deployment keeps signing with the audit key, and sealed
    /// details stay readable with the encryption key.
    async fn generate_key(
        &self,
        keystore: &dyn KeyStore,
        actor: &str,
        label: &str,
        purpose: KeyPurpose,
        algorithm: crate::model::KeyAlgorithm,
    ) -> Result<KeyRecord, AuditError> {
        let id = keys::create(
            keystore,
            self.store.as_ref(),
            self.clock.as_ref(),
            actor,
            NewKey {
                keystore: &self.config.keystore,
                label: label.to_string(),
                purpose,
                algorithm,
                ca_name: None,
                extractable: keystore.capabilities().can_wrap_keys,
            },
            async |key: &keys::PendingKey| -> Result<crate::store::Change, AuditError> {
                let now = self.clock.now().unix_timestamp();
                let (complete, event) = keys::complete(key, now);
                Ok(crate::store::Change::new().write(complete).audit(event))
            },
        )
        .await?;
        self.store
            .get_key(id)
            .await?
            .ok_or(AuditError::Store(StoreError::Corrupt(format!(
                "{purpose} key {id} vanished after it was created"
            ))))
    }

    async fn generate(
        &self,
        keystore: &dyn KeyStore,
        actor: &str,
    ) -> Result<KeyRecord, AuditError> {
        self.generate_key(
            keystore,
            actor,
            AUDIT_KEY_LABEL,
            KeyPurpose::Audit,
            self.config.key_algorithm,
        )
        .await
    }

    /// The audit key this daemon signs with, once prepared.
    pub async fn key(&self) -> Option<KeyRecord> {
        self.signer.read().await.as_ref().map(|s| s.key.clone())
    }

    /// Public keys of every audit key the store knows, as the token holds
    /// them (a key whose object is gone, or differs from the store's
    /// record, is left out: its checkpoints then fail as forged).
    pub async fn token_keys(&self) -> Result<AuditKeys, AuditError> {
        // Which objects are audit keys is the token's say, not the
        // store's: a row pointing at some other key on the token (a device
        // key kept in escrow, whose private half a device holds) must not
        // make its signatures count. An audit key is a private key object
        // labelled AUDIT_KEY_LABEL, as `prepare` generates it.
        let mut labelled: std::collections::HashMap<String, std::collections::HashSet<String>> =
            std::collections::HashMap::new();
        let mut out = AuditKeys::new();
        for k in self.store.list_keys().await? {
            if k.purpose != KeyPurpose::Audit || k.public_key_der.is_empty() {
                continue;
            }
            let Ok(ks) = self.keystores.get(&k.keystore) else {
                continue;
            };
            if !labelled.contains_key(&k.keystore) {
                let handles = ks
                    .list()
                    .await?
                    .into_iter()
                    .filter(|(_, label)| label == AUDIT_KEY_LABEL)
                    .map(|(h, _)| h.0)
                    .collect();
                labelled.insert(k.keystore.clone(), handles);
            }
            if !labelled
                .get(&k.keystore)
                .is_some_and(|h| h.contains(&k.handle.0))
            {
                tracing::error!(key = %k.id, handle = %k.handle, "a store row names an audit key the token does not hold as one; its checkpoints are not trusted");
                continue;
            }
            match ks.public_key(&k.handle).await {
                Ok(spki) if spki == k.public_key_der => {
                    out.insert(k.id, (k.algorithm, spki));
                }
                Ok(_) => {
                    tracing::error!(key = %k.id, "audit key on the token differs from the store's record")
                }
                // The object is listed, so this is the device failing: stop
                // (exit 2, "could not verify"), never read as "no key",
                // which would report every checkpoint it signed as forged.
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Signs a checkpoint of the current head if one is due: at least
    /// `checkpoint_every_events` unsigned events, or any unsigned event and
    /// the last checkpoint at least `checkpoint_interval` old. Returns it.
    pub async fn checkpoint_if_due(&self) -> Result<Option<Checkpoint>, AuditError> {
        let (head, _) = self.store.audit_head().await?;
        let last = self.store.last_audit_checkpoint().await?;
        let now_ms = unix_ms(self.clock.now());
        let signed = last.as_ref().map_or(0, |c| c.seq);
        let unsigned = head - signed;
        self.metrics.audit.head_sequence.set(head);
        let interval_ms = self.config.checkpoint_interval.as_millis() as i64;
        let due = unsigned >= self.config.checkpoint_every_events as i64
            || (unsigned > 0
                && last
                    .as_ref()
                    .is_none_or(|c| now_ms - c.at_ms >= interval_ms));
        if !due {
            return Ok(None);
        }
        self.checkpoint_now().await
    }

    /// Signs and stores a checkpoint of the current head (none if the head
    /// is already signed or the chain is empty).
    pub async fn checkpoint_now(&self) -> Result<Option<Checkpoint>, AuditError> {
        let r = self.sign_head().await;
        if r.is_err() {
            self.metrics.audit.checkpoint_failures.inc();
        }
        r
    }

    async fn sign_head(&self) -> Result<Option<Checkpoint>, AuditError> {
        let guard = self.signer.read().await;
        let signer = guard.as_ref().ok_or(AuditError::NoKey)?;
        let (seq, hash) = self.store.audit_head().await?;
        let last = self.store.last_audit_checkpoint().await?;
        if seq == 0 || last.as_ref().is_some_and(|c| c.seq >= seq) {
            return Ok(None);
        }
        let at_ms = unix_ms(self.clock.now());
        let message = Checkpoint::message(seq, &hash, at_ms, signer.key.id);
        let signature = signer
            .keystore
            .sign(&signer.key.handle, signer.key.algorithm, &message)
            .await?;
        let cp = Checkpoint {
            seq,
            hash,
            at_ms,
            key_id: signer.key.id,
            signature,
        };
        // The external copy first: it is never behind the store's.
        if let Some(path) = &self.config.checkpoint_file {
            append_checkpoint(path, &cp)?;
        }
        if let Err(e) = self.store.record_audit_checkpoint(&cp).await {
            // Another daemon (a leader handing over, a follower stopping)
            // signed the same head first: nothing is missing.
            let covered = matches!(e, StoreError::InvalidArgument(_))
                && self
                    .store
                    .last_audit_checkpoint()
                    .await?
                    .is_some_and(|c| c.seq >= cp.seq);
            if covered {
                return Ok(None);
            }
            return Err(e.into());
        }
        self.metrics.audit.checkpoint_sequence.set(cp.seq);
        self.metrics.audit.last_checkpoint.set(cp.at_ms / 1000);
        self.metrics
            .audit
            .head_sequence
            .set(cp.seq.max(self.metrics.audit.head_sequence.get()));
        tracing::debug!(seq = cp.seq, "audit checkpoint signed");
        Ok(Some(cp))
    }

    /// Before an export is signed: the chain must verify (against the
    /// signed checkpoints, with the keys read from the token) from the
    /// newest trusted checkpoint before `from_seq` through the exported
    /// events, and event `to_seq` must still carry `head_hash`. The HSM
    /// never vouches for a trail the store holds after a rewrite that the
    /// checkpoints catch. (Events after the newest checkpoint are vouched
    /// for as the store holds them: no signature covers them yet.)
    pub async fn check_export_range(
        &self,
        from_seq: i64,
        to_seq: i64,
        head_hash: &str,
    ) -> Result<(), AuditError> {
        if to_seq == 0 {
            return Ok(());
        }
        let keys = self.token_keys().await?;
        let checkpoints = self.all_checkpoints().await?;
        let start = checkpoints
            .iter()
            .filter(|c| c.seq < from_seq && super::verify::checkpoint_problem(c, &keys).is_none())
            .map(|c| c.seq)
            .max();
        let report = verify_store(self.store.as_ref(), checkpoints, &keys, start).await?;
        if let Some(b) = report.broken {
            return Err(AuditError::Broken {
                seq: b.seq,
                kind: b.kind.as_str(),
                reason: b.reason,
            });
        }
        let at = self
            .store
            .audit_events(AuditQuery {
                from_seq: to_seq,
                limit: 1,
            })
            .await?;
        match at.first() {
            Some(e) if e.seq == to_seq && hex::encode(&e.hash) == head_hash => Ok(()),
            _ => Err(AuditError::Broken {
                seq: to_seq,
                kind: "changed-during-export",
                reason: format!("event {to_seq} changed while it was exported"),
            }),
        }
    }

    /// Signs an export's closing line with the audit key in the HSM (see
    /// [`super::checkpoint::ExportCheckpoint`]). `head_hash` and
    /// `lines_sha256` are hex.
    #[allow(clippy::too_many_arguments)]
    pub async fn sign_export(
        &self,
        from_seq: i64,
        to_seq: i64,
        events: u64,
        head_hash: &str,
        lines_sha256: &str,
        since_ms: Option<i64>,
        until_ms: Option<i64>,
    ) -> Result<super::checkpoint::ExportCheckpoint, AuditError> {
        use base64::Engine as _;
        let guard = self.signer.read().await;
        let signer = guard.as_ref().ok_or(AuditError::NoKey)?;
        let at_ms = unix_ms(self.clock.now());
        let message = super::checkpoint::ExportCheckpoint::message(
            from_seq,
            to_seq,
            events,
            head_hash,
            lines_sha256,
            since_ms,
            until_ms,
            at_ms,
            signer.key.id,
        );
        let signature = signer
            .keystore
            .sign(&signer.key.handle, signer.key.algorithm, message.as_bytes())
            .await?;
        Ok(super::checkpoint::ExportCheckpoint {
            kind: "export-checkpoint".to_string(),
            from_seq,
            to_seq,
            events,
            head_hash: head_hash.to_string(),
            lines_sha256: lines_sha256.to_string(),
            since_ms,
            until_ms,
            at_ms,
            key_id: signer.key.id,
            message,
            signature: base64::engine::general_purpose::STANDARD.encode(signature),
        })
    }

    /// Decrypts an event's sealed details for an auditor: merges them into
    /// `details` (and restores `source`) and clears `sealed`. An event
    /// without sealed details is left as it is. A sealed value that names
    /// an unknown data key, or does not decrypt (altered), is an error and
    /// the event is left untouched: never a guess at the plaintext. (The
    /// revealed event no longer hashes to its chain hash: it is for
    /// reading; verification works on the stored, sealed form.)
    pub async fn reveal(&self, e: &mut super::AuditEvent) -> Result<(), AuditError> {
        let Some(sealed) = &e.sealed else {
            return Ok(());
        };
        if sealed == REDACTED {
            return Err(AuditError::Sealed);
        }
        let id = super::seal::data_key_id(sealed)?;
        self.load_data_key(id).await?;
        let opened = self.data_keys.open(sealed)?;
        match &mut e.details {
            serde_json::Value::Object(m) => m.extend(opened.details),
            other => {
                let mut m = opened.details;
                m.insert("value".into(), other.take());
                e.details = serde_json::Value::Object(m);
            }
        }
        if opened.source.is_some() {
            e.source = opened.source;
        }
        e.sealed = None;
        Ok(())
    }

    /// What other roles see: sealed details replaced by a marker.
    pub fn redact(e: &mut super::AuditEvent) {
        if e.sealed.is_some() {
            e.sealed = Some(REDACTED.to_string());
        }
    }

    /// Sets the head and checkpoint gauges from the store.
    pub async fn refresh_gauges(&self) -> Result<(), AuditError> {
        let (head, _) = self.store.audit_head().await?;
        self.metrics.audit.head_sequence.set(head);
        if let Some(cp) = self.store.last_audit_checkpoint().await? {
            self.metrics.audit.checkpoint_sequence.set(cp.seq);
            self.metrics.audit.last_checkpoint.set(cp.at_ms / 1000);
        }
        Ok(())
    }

    /// Every checkpoint: the store's and the checkpoint file's.
    pub async fn all_checkpoints(&self) -> Result<Vec<Checkpoint>, AuditError> {
        collect_checkpoints(self.store.as_ref(), self.config.checkpoint_file.as_deref()).await
    }

    /// Verifies the chain from the start, or the tail after `from` (a
    /// checkpoint sequence number whose signature must verify).
    pub async fn verify(&self, from: Option<i64>) -> Result<Report, AuditError> {
        let keys = self.token_keys().await?;
        let checkpoints = self.all_checkpoints().await?;
        verify_store(self.store.as_ref(), checkpoints, &keys, from).await
    }

    /// The daemon's periodic check: verifies the events written since the
    /// last run (at start-up: since the newest checkpoint), and every
    /// checkpoint among them. Counts and reports a break.
    pub async fn verify_tail(&self) -> Result<Report, AuditError> {
        let r = self.verify_tail_inner().await;
        match &r {
            Ok(report) if report.broken.is_none() => {
                self.metrics
                    .audit
                    .last_verified
                    .set(self.clock.now().unix_timestamp());
            }
            Ok(report) => {
                self.metrics.audit.verify_failures.inc();
                if let Some(b) = &report.broken {
                    tracing::error!(seq = b.seq, kind = b.kind.as_str(), reason = %b.reason, "audit chain verification failed");
                }
            }
            Err(e) => {
                self.metrics.audit.verify_failures.inc();
                tracing::error!(code = e.code(), error = %e, "audit chain verification could not run");
            }
        }
        r
    }

    async fn verify_tail_inner(&self) -> Result<Report, AuditError> {
        let keys = self.token_keys().await?;
        let start = self
            .verified_to
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let start = match start {
            Some(s) => Some(s),
            None => self
                .store
                .last_audit_checkpoint()
                .await?
                .filter(|cp| super::verify::checkpoint_problem(cp, &keys).is_none())
                .map(|cp| (cp.seq, cp.hash)),
        };
        let (after, hash) = start.unwrap_or((0, super::GENESIS_HASH.to_vec()));
        let mut checkpoints = self.store.audit_checkpoints(after + 1, u32::MAX).await?;
        // The external copy too: a truncation that also removed the
        // store's checkpoints is caught against it.
        if let Some(path) = &self.config.checkpoint_file {
            let signed = self.store.last_audit_checkpoint().await?.is_some();
            checkpoints.extend(
                read_checkpoint_file(path, signed)?
                    .into_iter()
                    .filter(|c| c.seq > after),
            );
        }
        let trusted = Checkpoint {
            seq: after,
            hash: hash.clone(),
            at_ms: 0,
            key_id: uuid::Uuid::nil(),
            signature: Vec::new(),
        };
        let mut v = if after == 0 {
            Verifier::new(checkpoints, &keys)
        } else {
            Verifier::from_checkpoint(&trusted, checkpoints, &keys)
        };
        if after > 0 {
            // The event the start point names must still be there, as it was.
            let first = self
                .store
                .audit_events(AuditQuery {
                    from_seq: after,
                    limit: 1,
                })
                .await?;
            if first
                .first()
                .is_none_or(|e| e.seq != after || e.hash != hash)
            {
                return Ok(broken_start(after, &hash, first.first()));
            }
        }
        let report = feed(self.store.as_ref(), &mut v, after + 1)
            .await
            .map(|()| v.finish())?;
        if report.broken.is_none() {
            *self.verified_to.lock().unwrap_or_else(|p| p.into_inner()) = Some((
                report.head_seq,
                hex::decode(&report.head_hash).unwrap_or_default(),
            ));
        }
        Ok(report)
    }
}

/// The event a trusted start point names is not as it was: `found` is
/// what the store holds at that sequence (none: cut off, `truncated`;
/// another hash: `rechained`).
fn broken_start(seq: i64, hash: &[u8], found: Option<&super::AuditEvent>) -> Report {
    let (kind, reason) = match found {
        Some(e) if e.seq == seq => (
            super::verify::BreakKind::Rechained,
            format!(
                "event {seq}, verified earlier (or covered by a signed checkpoint), has another hash now"
            ),
        ),
        _ => (
            super::verify::BreakKind::Truncated,
            format!("event {seq}, verified earlier (or covered by a signed checkpoint), is gone"),
        ),
    };
    Report {
        events: 0,
        head_seq: seq,
        head_hash: hex::encode(hash),
        checkpoints_verified: 0,
        last_checkpoint: None,
        unsigned_events: 0,
        broken: Some(super::verify::Break {
            seq,
            kind,
            reason,
            after_checkpoint: None,
        }),
    }
}

/// Feeds every event from `from_seq` on into `v`, page by page, stopping
/// early at a break. The next page is read (SQLite and JSON parsing, on a
/// blocking thread) while this one is hashed and checked, so the two run
/// side by side on two cores instead of one after the other; at a break at
/// most one page more than needed has been read.
async fn feed(store: &dyn Store, v: &mut Verifier, from_seq: i64) -> Result<(), AuditError> {
    let read = |from_seq| {
        store.audit_events(AuditQuery {
            from_seq,
            limit: VERIFY_PAGE,
        })
    };
    let mut page = read(from_seq).await?;
    loop {
        let full = page.len() >= VERIFY_PAGE as usize;
        let next_from = match page.last() {
            Some(last) if full => last.seq + 1,
            _ => {
                for e in page {
                    v.push(e);
                }
                return Ok(());
            }
        };
        // `join!` polls the read first: it is on its blocking thread before
        // the (synchronous) checking of this page starts.
        let (next, ()) = tokio::join!(read(next_from), async {
            for e in page {
                v.push(e);
            }
        });
        if v.is_broken() {
            return Ok(());
        }
        page = next?;
    }
}

/// Verifies `store`'s chain against `checkpoints` (signatures checked with
/// `keys`), from the start or from the trusted checkpoint at `from`.
pub async fn verify_store(
    store: &dyn Store,
    checkpoints: Vec<Checkpoint>,
    keys: &AuditKeys,
    from: Option<i64>,
) -> Result<Report, AuditError> {
    let mut v =
        match from {
            None => Verifier::new(checkpoints, keys),
            Some(seq) => {
                let trusted = checkpoints.iter().find(|c| c.seq == seq).cloned().ok_or(
                    AuditError::Broken {
                        seq,
                        kind: "no-checkpoint",
                        reason: format!("no checkpoint at sequence {seq} to start from"),
                    },
                )?;
                if let Some(reason) = super::verify::checkpoint_problem(&trusted, keys) {
                    return Err(AuditError::Broken {
                        seq,
                        kind: "forged-checkpoint",
                        reason,
                    });
                }
                let first = store
                    .audit_events(AuditQuery {
                        from_seq: seq,
                        limit: 1,
                    })
                    .await?;
                if first
                    .first()
                    .is_none_or(|e| e.seq != seq || e.hash != trusted.hash)
                {
                    return Ok(broken_start(seq, &trusted.hash, first.first()));
                }
                Verifier::from_checkpoint(&trusted, checkpoints, keys)
            }
        };
    feed(store, &mut v, from.map_or(1, |s| s + 1)).await?;
    Ok(v.finish())
}

/// Every checkpoint in `store`, then those of the checkpoint `file` (see
/// [`read_checkpoint_file`]: required once the store holds any).
pub async fn collect_checkpoints(
    store: &dyn Store,
    file: Option<&std::path::Path>,
) -> Result<Vec<Checkpoint>, AuditError> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let page = store.audit_checkpoints(from, VERIFY_PAGE).await?;
        let n = page.len();
        if let Some(last) = page.last() {
            from = last.seq + 1;
        }
        out.extend(page);
        if n < VERIFY_PAGE as usize {
            break;
        }
    }
    if let Some(path) = file {
        let required = !out.is_empty();
        out.extend(read_checkpoint_file(path, required)?);
    }
    Ok(out)
}

/// Appends `cp` as one JSON line and syncs it to disk.
pub fn append_checkpoint(path: &std::path::Path, cp: &Checkpoint) -> Result<(), AuditError> {
    let err = |source| AuditError::CheckpointFile {
        path: path.to_path_buf(),
        source,
    };
    let mut line = serde_json::to_vec(cp).map_err(|e| err(std::io::Error::other(e)))?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    f.write_all(&line).map_err(err)?;
    f.sync_data().map_err(err)
}

/// Reads a checkpoint file. Absent reads as none only when `required` is
/// false (nothing was signed yet, so nothing was appended): once the store
/// holds checkpoints, a configured file that is gone is an error, never
/// "no checkpoints" (deleting it would hide a truncation).
pub fn read_checkpoint_file(
    path: &std::path::Path,
    required: bool,
) -> Result<Vec<Checkpoint>, AuditError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            return Ok(Vec::new());
        }
        Err(source) => {
            return Err(AuditError::CheckpointFile {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| AuditError::CheckpointFileCorrupt {
                path: path.to_path_buf(),
                line: i + 1,
                reason: e.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditDraft, AuditEvent, GENESIS_HASH};
    use crate::store::sqlite::SqliteStore;

    /// A store holding a chain of `n` events (written with plain rusqlite,
    /// as fast as possible); the append-only trigger on updates is dropped
    /// so that a test can tamper with a row.
    fn store_with_chain(dir: &std::path::Path, n: i64) -> SqliteStore {
        let path = dir.join("k.db");
        drop(SqliteStore::open(&path, 16, Arc::new(crate::clock::SystemClock)).unwrap());
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        let mut prev = GENESIS_HASH.to_vec();
        for seq in 1..=n {
            let draft = AuditDraft::new("admin:1", "test.act", format!("t{seq}"))
                .details(serde_json::json!({"n": seq, "text": "é\"\\\n"}));
            let e = AuditEvent::chain(draft, seq, 1000 + seq, prev);
            tx.execute(
                "INSERT INTO audit_events (seq, at_ms, actor, action, target, outcome, details, prev_hash, hash, version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                rusqlite::params![e.seq, e.at_ms, e.actor, e.action, e.target, e.outcome.as_str(),
                    e.details.to_string(), e.prev_hash, e.hash, e.version],
            )
            .unwrap();
            prev = e.hash;
        }
        tx.execute_batch("DROP TRIGGER audit_events_no_update")
            .unwrap();
        tx.commit().unwrap();
        SqliteStore::open_read_only(&path).unwrap()
    }

    fn edit(dir: &std::path::Path, seq: i64) {
        rusqlite::Connection::open(dir.join("k.db"))
            .unwrap()
            .execute(
                "UPDATE audit_events SET target = 'edited' WHERE seq = ?1",
                [seq],
            )
            .unwrap();
    }

    // Pages are read ahead while the previous one is checked: a chain of
    // several pages (and a partial last one) is read whole, in order, and
    // a break on any page, including the first and the last, is named.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verify_store_reads_every_page_and_finds_a_break_on_any() {
        let page = i64::from(VERIFY_PAGE);
        let n = 2 * page + 7;
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_chain(dir.path(), n);
        let keys = AuditKeys::new();
        let report = verify_store(&store, Vec::new(), &keys, None).await.unwrap();
        assert!(report.broken.is_none(), "{:?}", report.broken);
        assert_eq!(report.events, n as u64);
        assert_eq!(report.head_seq, n);
        drop(store);
        // Later edits first: each run must name the earliest break.
        for seq in [n, 2 * page + 1, page + 1, page, 1] {
            edit(dir.path(), seq);
            let store = SqliteStore::open_read_only(&dir.path().join("k.db")).unwrap();
            let report = verify_store(&store, Vec::new(), &keys, None).await.unwrap();
            let b = report.broken.expect("a break");
            assert_eq!((b.seq, b.kind.as_str()), (seq, "edited"), "{b:?}");
            assert_eq!(report.head_seq, seq - 1);
        }
    }
}
