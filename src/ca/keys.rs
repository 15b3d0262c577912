//! Key lifecycle: creating HSM keys so that the token and the store always
//! agree, and reconciling them at start. CA creation uses it today; key
//! rotation, server-side key generation and restore are meant to reuse it.
//!
//! Creating a key is three steps, each with its undo written down:
//! 1. [`begin`]: record the key as `generating` (with the handle it will
//!    have) and audit that, in one commit. Undo: none needed; the row alone
//!    harms nothing and step 2 or reconciliation closes it.
//! 2. [`begin`], still: generate the key in the HSM. Undo if it fails: the
//!    row is marked `destroyed` (audited as a failed generation).
//! 3. The caller uses the key (certifies it, …) and commits the write of
//!    [`complete`] in the same change as whatever refers to the key. Undo if
//!    using or committing fails: [`abandon`] destroys the HSM object, then
//!    marks the row `destroyed`.
//!
//! [`create`] runs the three steps and the undo as one call; prefer it.
//!
//! Recovery: if the process dies between steps 1 and 3, the row is still
//! `generating` at the next start. [`reconcile`] (run before serving)
//! destroys the HSM object if it exists and marks the row `destroyed`. If
//! [`abandon`] itself cannot destroy the object, it leaves the row
//! `generating` so that reconciliation retries. Devices that cannot delete
//! keys (PIV slots) keep the key until the slot is generated into again; the
//! audit event says so.

use crate::audit::{AuditDraft, Outcome};
use crate::clock::Clock;
use crate::keystore::{KeyAlgorithm, KeyHandle, KeySpec, KeyStore, KeyStoreError, KeyStores};
use crate::store::{Change, KeyPurpose, KeyRecord, KeyState, Store, StoreError, Write};
use serde_json::json;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum KeyLifecycleError {
    #[error(transparent)]
    KeyStore(#[from] KeyStoreError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl KeyLifecycleError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::KeyStore(_) => "keystore_error",
            Self::Store(_) => "store_error",
        }
    }
}

/// A key generated in the HSM, recorded as `generating` until the caller commits.
pub struct PendingKey {
    pub id: Uuid,
    pub handle: KeyHandle,
    pub algorithm: KeyAlgorithm,
    pub public_key_der: Vec<u8>,
    /// How the backend knew it replaced nothing; an operator override is
    /// recorded in the `key.generate` audit event.
    pub slot_check: crate::keystore::SlotCheck,
}

pub struct NewKey<'a> {
    /// Name of the configured key store to generate in.
    pub keystore: &'a str,
    pub label: String,
    pub purpose: KeyPurpose,
    pub algorithm: KeyAlgorithm,
    pub ca_name: Option<&'a str>,
    pub extractable: bool,
}

/// Steps 1 and 2 above.
pub async fn begin(
    keystore: &dyn KeyStore,
    store: &dyn Store,
    clock: &dyn Clock,
    actor: &str,
    new: NewKey<'_>,
) -> Result<PendingKey, KeyLifecycleError> {
    let id = Uuid::now_v7();
    let spec = KeySpec {
        id,
        label: new.label.clone(),
        algorithm: new.algorithm,
        extractable: new.extractable,
        usage: crate::keystore::KeyUsage::for_purpose(new.purpose),
    };
    if !keystore.capabilities().algorithms.contains(&new.algorithm) {
        return Err(KeyStoreError::Unsupported(new.algorithm).into());
    }
    let handle = keystore.planned_handle(&spec);
    let now = clock.now().unix_timestamp();
    let record = KeyRecord {
        id,
        label: new.label.clone(),
        purpose: new.purpose,
        algorithm: new.algorithm,
        backend: keystore.backend().to_string(),
        keystore: new.keystore.to_string(),
        handle: handle.clone(),
        public_key_der: Vec::new(),
        state: KeyState::Generating,
        ca_name: new.ca_name.map(str::to_string),
        created_at: now,
        updated_at: now,
    };
    store
        .commit(Change::new().write(Write::InsertKey(record)).audit(
            AuditDraft::new(actor, "key.generate_started", format!("key:{id}")).details(json!({
                "label": new.label,
                "purpose": new.purpose.as_str(),
                "algorithm": new.algorithm.as_str(),
                "backend": keystore.backend(),
                "extractable": new.extractable,
            })),
        ))
        .await?;
    match keystore.generate(&spec).await {
        Ok(generated) => {
            if generated.slot_check == crate::keystore::SlotCheck::UnverifiedOverride {
                tracing::warn!(
                    key = %id,
                    keystore = new.keystore,
                    "generated into a slot that could not be proven empty \
                     (dangerously_generate_into_unverified_slot); audited"
                );
            }
            Ok(PendingKey {
                id,
                handle: generated.handle,
                algorithm: new.algorithm,
                public_key_der: generated.public_key_der,
                slot_check: generated.slot_check,
            })
        }
        Err(e) => {
            mark_destroyed(store, clock, actor, id, &e.to_string()).await;
            Err(e.into())
        }
    }
}

/// Steps 1 to 3 with their undo: generates a key, hands it to `use_key`,
/// which returns the change that uses it (and must include the write of
/// [`complete`]), commits that change, and abandons the key if anything
/// fails. Returns the key's id.
pub async fn create<E>(
    keystore: &dyn KeyStore,
    store: &dyn Store,
    clock: &dyn Clock,
    actor: &str,
    new: NewKey<'_>,
    use_key: impl AsyncFnOnce(&PendingKey) -> Result<Change, E>,
) -> Result<Uuid, E>
where
    E: From<KeyLifecycleError> + From<StoreError> + std::fmt::Display,
{
    let pending = begin(keystore, store, clock, actor, new).await?;
    let result = match use_key(&pending).await {
        Ok(change) => store.commit(change).await.map(drop).map_err(E::from),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => Ok(pending.id),
        Err(e) => {
            abandon(keystore, store, clock, actor, &pending, &e.to_string()).await;
            Err(e)
        }
    }
}

/// The write that confirms a pending key; commit it with the change that uses the key.
pub fn complete(key: &PendingKey, at: i64) -> (Write, AuditDraft) {
    complete_as(key, KeyState::Active, at)
}

/// Like [`complete`], leaving the key in `state` (`pre-active` for a key a
/// rotation activates later).
pub fn complete_as(key: &PendingKey, state: KeyState, at: i64) -> (Write, AuditDraft) {
    (
        Write::CompleteKeyGeneration {
            id: key.id,
            public_key_der: key.public_key_der.clone(),
            state,
            at,
        },
        AuditDraft::new("system", "key.generate", format!("key:{}", key.id)).details(json!({
            "algorithm": key.algorithm.as_str(),
            "handle": key.handle.0,
            "slot_check": key.slot_check,
        })),
    )
}

/// Undo for a pending key whose use failed: destroy it in the HSM, mark it destroyed.
pub async fn abandon(
    keystore: &dyn KeyStore,
    store: &dyn Store,
    clock: &dyn Clock,
    actor: &str,
    key: &PendingKey,
    why: &str,
) {
    // A commit whose outcome is unknown (the database connection dropped
    // during COMMIT) may have made the key live: destroy it only while its
    // row still says `generating`. Unreadable: leave it to reconciliation.
    match store.get_key(key.id).await {
        Ok(Some(row)) if row.state == KeyState::Generating => {}
        Ok(None) => {}
        Ok(Some(row)) => {
            tracing::error!(key = %key.id, state = ?row.state, "not destroying a key whose failed commit went through");
            return;
        }
        Err(e) => {
            tracing::error!(key = %key.id, error = %e, "key state unreadable; reconciliation will decide at start");
            return;
        }
    }
    match destroy_if_possible(keystore, &key.handle).await {
        Ok(note) => mark_destroyed(store, clock, actor, key.id, &format!("{why}{note}")).await,
        Err(e) => {
            tracing::error!(key = %key.id, error = %e, "could not destroy abandoned key; reconciliation will retry at start");
        }
    }
}

/// Destroys a key, or explains why the device keeps it (PIV slots cannot
/// delete keys; the key is overwritten by the next generation in that slot).
async fn destroy_if_possible(
    keystore: &dyn KeyStore,
    handle: &KeyHandle,
) -> Result<&'static str, KeyStoreError> {
    match keystore.destroy(handle).await {
        Ok(()) => Ok(""),
        Err(KeyStoreError::OperationUnsupported { .. }) => Ok(
            " (the device cannot delete keys: the key stays in its slot until the slot is generated into again)",
        ),
        Err(e) => Err(e),
    }
}

async fn mark_destroyed(store: &dyn Store, clock: &dyn Clock, actor: &str, id: Uuid, why: &str) {
    let at = clock.now().unix_timestamp();
    let change = Change::new()
        .write(Write::SetKeyState {
            id,
            from: KeyState::Generating,
            to: KeyState::Destroyed,
            at,
        })
        .audit(
            AuditDraft::new(actor, "key.generate", format!("key:{id}"))
                .outcome(Outcome::Failure)
                .details(json!({ "reason": why })),
        );
    if let Err(e) = store.commit(change).await {
        tracing::error!(key = %id, error = %e, "could not record failed key generation");
    }
}

/// Start-up reconciliation: every key still `generating` belonged to an
/// operation that never finished. Its HSM object (if any) is destroyed and
/// the row marked `destroyed`. Keys of key stores that are not configured
/// are left alone (and reported). Returns how many keys were cleaned up.
pub async fn reconcile(
    keystores: &KeyStores,
    store: &dyn Store,
    clock: &dyn Clock,
) -> Result<usize, KeyLifecycleError> {
    reconcile_older_than(keystores, store, clock, std::time::Duration::ZERO).await
}

/// How old a `generating` row must be before a daemon on a store shared by
/// several daemons (PostgreSQL) reconciles it at start: a younger one may
/// be another, live daemon's key generation in progress (it takes seconds),
/// which reconciling would destroy under it. A leftover of a crash younger
/// than this is cleaned at a later start; until then it is an unused row
/// (and maybe an unused HSM object), nothing more.
pub const SHARED_STORE_RECONCILE_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// [`reconcile`], leaving alone the `generating` rows created less than
/// `min_age` ago (see [`SHARED_STORE_RECONCILE_AGE`]).
pub async fn reconcile_older_than(
    keystores: &KeyStores,
    store: &dyn Store,
    clock: &dyn Clock,
    min_age: std::time::Duration,
) -> Result<usize, KeyLifecycleError> {
    let mut cleaned = 0;
    let newest = clock
        .now()
        .unix_timestamp()
        .saturating_sub(i64::try_from(min_age.as_secs()).unwrap_or(i64::MAX));
    for key in store.list_keys().await? {
        if key.state != KeyState::Generating {
            continue;
        }
        if !min_age.is_zero() && key.created_at > newest {
            tracing::info!(key = %key.id, "unfinished key generation is recent (another daemon may be making it); left for a later start");
            continue;
        }
        let Ok(keystore) = keystores.get(&key.keystore) else {
            tracing::warn!(key = %key.id, keystore = %key.keystore, "unfinished key generation in a key store that is not configured; left alone");
            continue;
        };
        let existed = keystore.exists(&key.handle).await?;
        let note = if existed {
            destroy_if_possible(keystore.as_ref(), &key.handle).await?
        } else {
            ""
        };
        let at = clock.now().unix_timestamp();
        store
            .commit(
                Change::new()
                    .write(Write::SetKeyState {
                        id: key.id,
                        from: KeyState::Generating,
                        to: KeyState::Destroyed,
                        at,
                    })
                    .audit(
                        AuditDraft::new("system", "key.reconcile", format!("key:{}", key.id))
                            .details(json!({
                                "label": key.label,
                                "keystore": key.keystore,
                                "hsm_object_destroyed": existed && note.is_empty(),
                                "reason": format!("generation never completed{note}"),
                            })),
                    ),
            )
            .await?;
        tracing::warn!(key = %key.id, hsm_object_existed = existed, "reconciled an unfinished key generation");
        cleaned += 1;
    }
    Ok(cleaned)
}
