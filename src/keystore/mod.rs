//! The `KeyStore` port: hardware that generates keys and signs, and never
//! hands a private key out in plaintext; only keys generated extractable
//! leave it, wrapped (see [`KeyStore::export_private_key`]).
//!
//! A backend implements only what it can; operations it lacks return
//! [`KeyStoreError::Unsupported`].
//!
//! PIN rule for every backend: after the device rejects the PIN once, the
//! backend latches. It never logs in again (each try would use up one of the
//! PIN's retries) and every later call fails with
//! [`KeyStoreError::PinLatched`], `health()` included. Only a restart with a
//! corrected PIN clears it: the latch lives in the backend instance.
//!
//! A backend's limits are data, in [`Capabilities`], so that services adapt (queue to the signer count) instead of branching on
//! vendor names.

pub use crate::model::algorithm;
mod error;
pub mod metered;
pub mod pkcs11;
pub mod yubikey;

pub use crate::model::{KeyAlgorithm, KeyHandle};
pub use error::{
    AttestationError, KeyStoreError, Malformed, ManagementKeyError, PinFailure, TokensPresent,
};

use async_trait::async_trait;

use std::collections::BTreeMap;

use serde::Serialize;
use std::fmt;
use std::sync::Arc;

/// The configured key stores by name; `default` always exists. Cloning is
/// one reference count (the HTTP state that holds it is cloned per request).
#[derive(Clone)]
pub struct KeyStores {
    stores: Arc<BTreeMap<String, Arc<dyn KeyStore>>>,
}

impl KeyStores {
    pub fn new(default: Arc<dyn KeyStore>) -> Self {
        let mut stores = BTreeMap::new();
        stores.insert(crate::model::DEFAULT_KEYSTORE.to_string(), default);
        Self {
            stores: Arc::new(stores),
        }
    }

    pub fn insert(&mut self, name: &str, ks: Arc<dyn KeyStore>) {
        Arc::make_mut(&mut self.stores).insert(name.to_string(), ks);
    }

    pub fn get(&self, name: &str) -> Result<&Arc<dyn KeyStore>, KeyStoreError> {
        self.stores
            .get(name)
            .ok_or_else(|| KeyStoreError::UnknownKeyStore(name.to_string()))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<dyn KeyStore>)> {
        self.stores.iter().map(|(n, k)| (n.as_str(), k))
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct KeySpec {
    /// Stable id; becomes CKA_ID on PKCS#11 tokens.
    pub id: uuid::Uuid,
    /// Human-readable label; becomes CKA_LABEL.
    pub label: String,
    pub algorithm: KeyAlgorithm,
    /// Only keys whose policy marks them for backup may be wrapped out of the
    /// HSM; everything else is created non-extractable.
    pub extractable: bool,
    /// What the private half may do: sign (every key but one) or decrypt.
    pub usage: KeyUsage,
}

/// The one operation a generated private key is allowed. A key pair never
/// does both: a decrypt key cannot sign, a signing key cannot decrypt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyUsage {
    /// Sign only (`CKA_SIGN`); the public half verifies.
    #[default]
    Sign,
    /// Decrypt only (`CKA_DECRYPT`, RSA-OAEP); the public half encrypts.
    /// Used for the `audit-encryption` key, which unwraps audit data keys.
    Decrypt,
}

impl KeyUsage {
    /// The usage a key of `purpose` is generated (and restored) with.
    pub fn for_purpose(purpose: crate::model::KeyPurpose) -> Self {
        match purpose {
            crate::model::KeyPurpose::AuditEncryption => Self::Decrypt,
            _ => Self::Sign,
        }
    }
}

/// A freshly generated key pair as the store records it.
#[derive(Debug, Clone)]
pub struct GeneratedKey {
    pub handle: KeyHandle,
    /// DER SubjectPublicKeyInfo.
    pub public_key_der: Vec<u8>,
    /// How the backend knew it was not replacing another key. Callers audit
    /// [`SlotCheck::UnverifiedOverride`]: it records an operator's decision.
    pub slot_check: SlotCheck,
}

/// How a backend established that a generation would not replace a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotCheck {
    /// The key is a new object next to the others (PKCS#11); nothing can be replaced.
    NewObject,
    /// The device proved the slot empty (PIV GET METADATA answered "no key").
    ProvenEmpty,
    /// The device could not prove the slot empty and the key store's
    /// `dangerously_generate_into_unverified_slot` override let the generation
    /// go ahead; a key that was there is gone.
    UnverifiedOverride,
}

/// What showed that a device slot already holds a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotEvidence {
    /// The slot's metadata (PIV GET METADATA, firmware 5.3+) describes a key.
    Metadata,
    /// The card attested a key it generated in the slot (PIV ATTEST, 4.3+).
    Attestation,
    /// The slot's certificate object holds a certificate.
    Certificate,
}

impl fmt::Display for SlotEvidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Metadata => "its metadata describes a key",
            Self::Attestation => "the card attests a key generated in it",
            Self::Certificate => "its certificate object holds a certificate",
        })
    }
}

/// How a private key is protected, read back from the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KeyProtection {
    pub sensitive: bool,
    pub extractable: bool,
    pub always_sensitive: bool,
    pub never_extractable: bool,
}

/// A backend's limits, stated as data.
#[derive(Debug, Clone, Serialize)]
pub struct Capabilities {
    pub algorithms: Vec<KeyAlgorithm>,
    /// Signatures the device can work on at once; the backend queues beyond it.
    pub max_concurrent_signers: usize,
    /// Whether extractable keys can leave the device wrapped
    /// (`CKM_AES_KEY_WRAP_PAD` with `CKF_WRAP`), i.e. whether
    /// [`KeyStore::export_private_key`] can work. Server-generated device keys
    /// and key backups need it.
    pub can_wrap_keys: bool,
    /// Whether generated keys are fixed (`CKA_MODIFIABLE=false`): nobody can
    /// later widen their usage (add decrypt, unwrap, …) with C_SetAttributeValue.
    /// `None` until the first generation: a PKCS#11 module's acceptance is
    /// learned by trying, as no query reveals it.
    pub unmodifiable_keys: Option<bool>,
}

/// How busy a backend's access to its device is, for the metrics
/// (`keyward_hsm_sessions_*`, `keyward_yubikey_queue_depth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolStats {
    /// A pool of sessions (PKCS#11): sessions busy with an operation now,
    /// and the pool's size (`keystore.sessions`).
    Sessions { in_use: usize, max: usize },
    /// A device that works on one operation at a time (YubiKey):
    /// operations waiting their turn (the one in progress not counted).
    Queue { waiting: usize },
}

/// The port. Every call may block on hardware; backends do the blocking off
/// the async runtime.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Short backend name recorded with each key (`pkcs11`, `yubikey`).
    fn backend(&self) -> &'static str;

    fn capabilities(&self) -> &Capabilities;

    /// The handle a key generated from `spec` will have. Recorded before
    /// generation so that a crash between the HSM call and the database
    /// commit leaves a row that start-up reconciliation can clean up.
    fn planned_handle(&self, spec: &KeySpec) -> KeyHandle;

    /// Generates a key pair inside the device.
    async fn generate(&self, spec: &KeySpec) -> Result<GeneratedKey, KeyStoreError>;

    /// DER SubjectPublicKeyInfo of the key.
    async fn public_key(&self, handle: &KeyHandle) -> Result<Vec<u8>, KeyStoreError>;

    /// Signs `message` with the key. The backend hashes as the algorithm
    /// requires and returns the signature as X.509 carries it (DER for ECDSA,
    /// raw for RSA PKCS#1 v1.5 and Ed25519).
    async fn sign(
        &self,
        handle: &KeyHandle,
        algorithm: KeyAlgorithm,
        message: &[u8],
    ) -> Result<Vec<u8>, KeyStoreError>;

    /// Stores the certificate of a key next to it, for devices that keep one
    /// per key (a PIV slot's certificate object). Others ignore it.
    async fn store_certificate(
        &self,
        handle: &KeyHandle,
        cert_der: &[u8],
    ) -> Result<(), KeyStoreError> {
        let _ = (handle, cert_der);
        Ok(())
    }

    /// Proof from the device that it generated the key: the attestation
    /// certificate chain (leaf first), verified against the configured trust
    /// root. `None` when the backend or its configuration offers none.
    async fn attestation(&self, handle: &KeyHandle) -> Result<Option<Vec<Vec<u8>>>, KeyStoreError> {
        let _ = handle;
        Ok(None)
    }

    /// Whether the key exists on the device.
    async fn exists(&self, handle: &KeyHandle) -> Result<bool, KeyStoreError>;

    /// Reads back how the private key is protected.
    async fn protection(&self, handle: &KeyHandle) -> Result<KeyProtection, KeyStoreError> {
        let _ = handle;
        Err(KeyStoreError::OperationUnsupported {
            backend: self.backend(),
            operation: "protection",
        })
    }

    /// The PKCS#8 DER of an extractable private key (generated with
    /// `KeySpec { extractable: true, .. }`), for server-generated device keys
    /// and backups. The key leaves the device only wrapped under a one-time key
    /// (PKCS#11: `CKM_AES_KEY_WRAP_PAD` under a session AES-256 key that is
    /// destroyed at once); the plaintext exists only in the returned buffer,
    /// which zeroizes on drop. A non-extractable key is refused with
    /// [`KeyStoreError::NotExtractable`]. Backends that cannot wrap keys out
    /// ([`Capabilities::can_wrap_keys`] false) keep this default.
    async fn export_private_key(
        &self,
        handle: &KeyHandle,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyStoreError> {
        let _ = handle;
        Err(KeyStoreError::OperationUnsupported {
            backend: self.backend(),
            operation: "export_private_key",
        })
    }

    /// Wraps the private key of an extractable key pair inside the device
    /// under `kek` (AES-256, `CKM_AES_KEY_WRAP_PAD`) and returns the wrapped
    /// bytes, for backups: the plaintext never leaves the device, and `kek`
    /// exists on the device only as a session object destroyed at once. A
    /// non-extractable key is refused with [`KeyStoreError::NotExtractable`].
    async fn wrap_private_key(
        &self,
        handle: &KeyHandle,
        kek: &zeroize::Zeroizing<[u8; 32]>,
    ) -> Result<Vec<u8>, KeyStoreError> {
        let _ = (handle, kek);
        Err(KeyStoreError::OperationUnsupported {
            backend: self.backend(),
            operation: "wrap_private_key",
        })
    }

    /// Restores a key pair from a backup: unwraps `wrapped` (made by
    /// [`KeyStore::wrap_private_key`] under `kek`) inside the device as a
    /// sensitive private key with `spec`'s id, label and extractability,
    /// next to a public key object made from `public_key_der` (DER SPKI).
    /// The pair is checked before it is returned: a signature by the new
    /// private key must verify under `public_key_der`, or both objects are
    /// destroyed and [`KeyStoreError::PublicKeyMismatch`] returned.
    async fn unwrap_private_key(
        &self,
        spec: &KeySpec,
        kek: &zeroize::Zeroizing<[u8; 32]>,
        wrapped: &[u8],
        public_key_der: &[u8],
    ) -> Result<GeneratedKey, KeyStoreError> {
        let _ = (spec, kek, wrapped, public_key_der);
        Err(KeyStoreError::OperationUnsupported {
            backend: self.backend(),
            operation: "unwrap_private_key",
        })
    }

    /// Decrypts a data key (at most a few hundred bytes) that was encrypted
    /// to the public half of a [`KeyUsage::Decrypt`] RSA key with RSA-OAEP
    /// (SHA-1 and MGF1-SHA-1, empty label: see
    /// [`crate::crypto::oaep_encrypt`]). The private key never leaves the
    /// device; the plaintext exists only in the returned buffer, which
    /// zeroizes on drop. A ciphertext the key did not make is refused.
    async fn decrypt_data_key(
        &self,
        handle: &KeyHandle,
        ciphertext: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyStoreError> {
        let _ = (handle, ciphertext);
        Err(KeyStoreError::OperationUnsupported {
            backend: self.backend(),
            operation: "decrypt_data_key",
        })
    }

    /// Destroys the key pair. Destroying a key that is already gone succeeds.
    async fn destroy(&self, handle: &KeyHandle) -> Result<(), KeyStoreError>;

    /// Lists the handles of key pairs this backend created (for start-up reconciliation).
    async fn list(&self) -> Result<Vec<(KeyHandle, String)>, KeyStoreError> {
        Err(KeyStoreError::OperationUnsupported {
            backend: self.backend(),
            operation: "list",
        })
    }

    /// A cheap liveness check for `/readyz`. After a rejected PIN it
    /// reports [`KeyStoreError::PinLatched`] until an operator restarts
    /// keyward with a corrected PIN.
    async fn health(&self) -> Result<(), KeyStoreError>;

    /// Logs out and closes sessions; later calls log in again.
    async fn close(&self) -> Result<(), KeyStoreError>;

    /// How busy the backend is now, from counters it keeps in memory (no
    /// device call, so it is cheap enough to read on every scrape). `None`:
    /// the backend has no pool or queue to report.
    fn pool_stats(&self) -> Option<PoolStats> {
        None
    }
}
