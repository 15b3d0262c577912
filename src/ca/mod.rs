//! Certificate authorities: the service, its loaded issuers and its errors.
//! The CA never sees key material; it asks the KeyStore to sign the TBS bytes
//! with the issuer's key handle.
//!
//! - `hierarchy`: the chain of CAs (load from the store, create from policy);
//! - `issuance`: device certificates;
//! - [`keys`]: HSM key creation with its undo and start-up reconciliation;
//! - [`csr`], [`public_key`] and [`x509`]: the encodings;
//! - [`crl`], [`ocsp`] and [`serial`]: revocation encodings (no store, no signer);
//! - [`ocsp_signer`]: the delegated OCSP signing key and certificate of each issuing CA;
//! - [`responder`]: the OCSP responder (statuses, pre-signed cache, nonces).

pub mod crl;
pub mod csr;
mod der_write;
mod hierarchy;
mod issuance;
pub mod keys;
pub mod ocsp;
pub mod ocsp_signer;
pub mod public_key;
pub mod responder;
pub mod serial;
pub mod x509;

/// Told after a change to revocation state has committed.
pub trait RevocationObserver: Send + Sync {
    /// `serials` (upper-case hex) of certificates issued by `issuer_ca` whose revocation state changed.
    fn revocation_changed(&self, issuer_ca: &str, serials: &[String]);
}

use crate::clock::Clock;
use crate::keystore::{KeyAlgorithm, KeyHandle, KeyStore, KeyStoreError, KeyStores};
use crate::policy::{CaKind, Policies};
use crate::store::{CertificateRecord, Store, StoreError};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use uuid::Uuid;

/// Errors of the CA service. [`CaError::code`] is stable; whether a code is
/// the caller's fault or the server's is decided in `http::error`.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Csr(#[from] csr::CsrError),
    #[error(transparent)]
    KeyStore(#[from] KeyStoreError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    KeyLifecycle(#[from] keys::KeyLifecycleError),
    #[error("certificate encoding failed")]
    Encoding(#[from] der::Error),
    #[error("CA `{0}` does not exist (run `keyward init`)")]
    UnknownCa(String),
    #[error("the CA key of `{0}` is not active")]
    KeyNotActive(String),
    #[error("key algorithm {algorithm} is not allowed by profile `{profile}` (allowed: {})", list(.allowed))]
    AlgorithmNotAllowed {
        algorithm: KeyAlgorithm,
        profile: String,
        allowed: Vec<KeyAlgorithm>,
    },
    #[error("CA `{0}` has expired or expires before any certificate could be valid")]
    Expired(String),
    /// The HSM signed a CA certificate that does not verify: nothing was stored.
    #[error("the HSM returned a signature that does not verify for CA `{0}`")]
    BadSignature(String),
    /// The HSM signed a device certificate that does not verify against the
    /// CA certificate: nothing was issued.
    #[error("the HSM returned a device certificate signature that does not verify for CA `{0}`")]
    DeviceSignatureInvalid(String),
    #[error(transparent)]
    Random(#[from] crate::crypto::RandomError),
    /// CAs in the store whose parent is not in the store.
    #[error("CA(s) {} reference parents that do not exist", .0.join(", "))]
    ParentMissing(Vec<String>),
    #[error("CA `{ca}` references key {key_id}, which is not in the store")]
    KeyRecordMissing { ca: String, key_id: Uuid },
    #[error(
        "CA `{ca}`'s key is in key store `{keystore}`, which is not configured in keyward.toml"
    )]
    KeyStoreNotConfigured { ca: String, keystore: String },
}

fn list(algorithms: &[KeyAlgorithm]) -> String {
    algorithms
        .iter()
        .map(|a| a.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl CaError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Csr(e) => e.code(),
            Self::KeyStore(_) => "keystore_error",
            Self::Store(_) => "store_error",
            Self::KeyLifecycle(e) => e.code(),
            Self::Encoding(_) => "certificate_encoding_failed",
            Self::UnknownCa(_) => "unknown_ca",
            Self::KeyNotActive(_) => "ca_key_not_active",
            Self::AlgorithmNotAllowed { .. } => "key_algorithm_not_allowed",
            Self::Expired(_) => "ca_expired",
            Self::BadSignature(_) | Self::DeviceSignatureInvalid(_) => "hsm_signature_invalid",
            Self::Random(_) => "random_unavailable",
            Self::ParentMissing(_) => "ca_parent_missing",
            Self::KeyRecordMissing { .. } => "ca_key_record_missing",
            Self::KeyStoreNotConfigured { .. } => "keystore_not_configured",
        }
    }
}

/// A loaded issuing authority: what signing needs, parsed once.
#[derive(Clone)]
pub struct Issuer {
    pub name: String,
    pub kind: CaKind,
    pub key_id: Uuid,
    /// Name of the key store holding the key.
    pub keystore_name: String,
    pub keystore: Arc<dyn KeyStore>,
    pub handle: KeyHandle,
    pub algorithm: KeyAlgorithm,
    pub cert_der: Vec<u8>,
    pub subject_der: Vec<u8>,
    pub ski: Vec<u8>,
    pub not_after: i64,
    /// This CA's certificate followed by its parents' up to the root, PEM.
    pub chain_pem: String,
}

/// A signed device certificate and its store record.
pub struct IssuedCertificate {
    pub der: Vec<u8>,
    pub record: CertificateRecord,
}

pub struct CaService {
    keystores: KeyStores,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    policies: Arc<Policies>,
    issuers: RwLock<BTreeMap<String, Arc<Issuer>>>,
}

fn now_ms(clock: &dyn Clock) -> i64 {
    (clock.now().unix_timestamp_nanos() / 1_000_000) as i64
}

fn fingerprint(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// SHA-256 of a DER SubjectPublicKeyInfo, lower-case hex: finds every
/// certificate of one public key ([`Store::certificates_by_spki`]).
pub fn spki_sha256(spki_der: &[u8]) -> String {
    fingerprint(spki_der)
}

impl CaService {
    pub async fn new(
        keystores: KeyStores,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        policies: Arc<Policies>,
    ) -> Result<Self, CaError> {
        for ca in &policies.cas {
            if let Some(name) = &ca.keystore {
                keystores.get(name)?;
            }
        }
        let svc = Self {
            keystores,
            store,
            clock,
            policies,
            issuers: RwLock::new(BTreeMap::new()),
        };
        svc.reload().await?;
        Ok(svc)
    }

    pub fn issuer(&self, name: &str) -> Result<Arc<Issuer>, CaError> {
        self.issuers
            .read()
            .ok()
            .and_then(|g| g.get(name).cloned())
            .ok_or_else(|| CaError::UnknownCa(name.to_string()))
    }

    pub fn issuers(&self) -> Vec<Arc<Issuer>> {
        self.issuers
            .read()
            .map(|g| g.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn keystores(&self) -> &KeyStores {
        &self.keystores
    }

    /// Names of the CAs that sign under some profile: the ones issuance needs.
    fn issuing_ca_names(&self) -> std::collections::BTreeSet<&str> {
        self.policies
            .profiles
            .values()
            .map(|p| p.issuer.as_str())
            .collect()
    }

    /// Names of the key stores that hold keys of issuing CAs (needed to issue).
    pub fn issuing_keystores(&self) -> std::collections::BTreeSet<String> {
        let needed = self.issuing_ca_names();
        self.issuers()
            .into_iter()
            .filter(|i| needed.contains(i.name.as_str()))
            .map(|i| i.keystore_name.clone())
            .collect()
    }

    pub fn policies(&self) -> &Policies {
        &self.policies
    }
}
