//! Creating and reconciling HSM keys so that the token and the store agree.
//!
//! Creating a key is three steps with a written-down undo:
//! 1. record the key as `generating` (with the handle it will have) + audit;
//! 2. generate it in the HSM;
//! 3. the caller commits `CompleteKeyGeneration` with whatever uses the key.
//!
//! If step 2 fails the row is marked `destroyed`. If the caller's step 3
//! fails it calls [`abandon`], which destroys the HSM object and marks the row
//! `destroyed`. If the process dies between 1 and 3, [`reconcile`] does the
//! same at the next start.

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

/// A key generated in the HSM, recorded as `generating` until the caller commits.
pub struct PendingKey {
    pub id: Uuid,
    pub handle: KeyHandle,
    pub algorithm: KeyAlgorithm,
    pub public_key_der: Vec<u8>,
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
        Ok(generated) => Ok(PendingKey {
            id,
            handle: generated.handle,
            algorithm: new.algorithm,
            public_key_der: generated.public_key_der,
        }),
        Err(e) => {
            mark_destroyed(store, clock, actor, id, &e.to_string()).await;
            Err(e.into())
        }
    }
}

/// The write that confirms a pending key; commit it with the change that uses the key.
pub fn complete(key: &PendingKey, at: i64) -> (Write, AuditDraft) {
    (
        Write::CompleteKeyGeneration {
            id: key.id,
            public_key_der: key.public_key_der.clone(),
            at,
        },
        AuditDraft::new("system", "key.generate", format!("key:{}", key.id)).details(json!({
            "algorithm": key.algorithm.as_str(),
            "handle": key.handle.0,
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
    let mut cleaned = 0;
    for key in store.list_keys().await? {
        if key.state != KeyState::Generating {
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
