//! Certificate authorities: the service, its loaded issuers and its errors.
//! The CA never sees key material; it asks the KeyStore to sign the TBS bytes
//! with the issuer's key handle.
//!
//! - `hierarchy`: the chain of CAs (load from the store, create from policy);
//! - `issuance`: device certificates;
//! - [`keys`]: HSM key creation with its undo and start-up reconciliation;
//! - [`revocation`]: revoking and suspending devices and certificates, and
//!   the [`RevocationObserver`]s told after each change;
//! - [`renewal`]: renewal by the current certificate (mTLS or signed nonce),
//!   renewal windows and admin allowances;
//! - [`lifecycle`]: the errors of those two;
//! - [`tls_server`]: keyward's own TLS server certificate;
//! - [`csr`], [`public_key`] and [`x509`]: the encodings;
//! - [`crl`], [`ocsp`] and [`serial`]: revocation encodings (no store, no signer);
//! - [`crls`]: the CRL publisher (numbering, HSM signature, the current CRL
//!   per CA), told of revocations as a [`RevocationObserver`].
//!
//! Revocation and renewal live on [`CaService`] rather than a separate
//! service: they sign with its issuers, read its policies, and the observer
//! list must see every path that changes revocation state, which is
//! simplest when one type owns all of them.
//! - [`ocsp_signer`]: the delegated OCSP signing key and certificate of each issuing CA;
//! - [`responder`]: the OCSP responder (statuses, pre-signed cache, nonces).

pub mod crl;
pub mod crls;
pub mod csr;
mod der_write;
mod generations;
mod hierarchy;
pub mod invalidation;
mod issuance;
pub mod keys;
pub mod lifecycle;
pub mod ocsp;
pub mod ocsp_signer;
pub mod public_key;
pub mod renewal;
pub mod responder;
pub mod revocation;
mod rotate;
pub mod serial;
pub mod tls_server;
pub mod x509;

pub use lifecycle::LifecycleError;
pub use renewal::{RenewalHint, RenewalProof, Renewed};
pub use revocation::DeviceChanged;

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
    /// The HSM signed a CRL that does not verify against the CA
    /// certificate: nothing was stored or served.
    #[error("the HSM returned a CRL signature that does not verify for CA `{0}`")]
    CrlSignatureInvalid(String),
    /// No CRL of this CA could be published yet (the HSM or the store
    /// failed at start; the CRL job keeps trying).
    #[error("no CRL of CA `{0}` is available yet")]
    CrlUnavailable(String),
    /// A revoked certificate's stored serial is not a valid serial number.
    #[error("stored serial `{serial}` cannot go into a CRL: {source}")]
    CrlSerial {
        serial: String,
        #[source]
        source: serial::SerialError,
    },
    #[error(transparent)]
    Random(#[from] crate::crypto::RandomError),
    /// CAs in the store whose parent is not in the store.
    #[error("CA(s) {} reference parents that do not exist", .0.join(", "))]
    ParentMissing(Vec<String>),
    #[error("CA `{ca}` references key {key_id}, which is not in the store")]
    KeyRecordMissing { ca: String, key_id: Uuid },
    /// `server.tls.issuer` names a root (or another CA that does not issue end entities).
    #[error("CA `{0}` is not an issuing CA")]
    NotAnIssuingCa(String),
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
            Self::BadSignature(_)
            | Self::DeviceSignatureInvalid(_)
            | Self::CrlSignatureInvalid(_) => "hsm_signature_invalid",
            Self::CrlUnavailable(_) => "crl_unavailable",
            Self::CrlSerial { .. } => "store_corrupt",
            Self::Random(_) => "random_unavailable",
            Self::ParentMissing(_) => "ca_parent_missing",
            Self::KeyRecordMissing { .. } => "ca_key_record_missing",
            Self::KeyStoreNotConfigured { .. } => "keystore_not_configured",
            Self::NotAnIssuingCa(_) => "not_an_issuing_ca",
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
    /// Replaced whole on a policy reload ([`Self::replace_policies`]).
    policies: RwLock<Arc<Policies>>,
    issuers: RwLock<BTreeMap<String, Arc<Issuer>>>,
    /// Published and retired keys of the CAs ([`generations`]).
    generations: RwLock<generations::Generations>,
    /// The CA keys' states at the last load ([`CaService::reload_if_changed`]).
    ca_keys_seen: std::sync::Mutex<Vec<(Uuid, String)>>,
    /// `server.public_url`: certificates point their CDP and AIA below it.
    public_url: Option<String>,
    /// Told after every committed revocation, suspension, resumption or release.
    observers: RwLock<Vec<Arc<dyn RevocationObserver>>>,
    /// Renewal nonces handed out by this process.
    nonces: renewal::Nonces,
    /// A broker is configured: device status changes queue its ACL update
    /// in their own transaction ([`crate::broker`]).
    broker_provisioning: bool,
    /// Renewals and revocations are counted here after their commit
    /// ([`Self::with_metrics`]); `None` in tests that do not look.
    metrics: Option<Arc<crate::metrics::Metrics>>,
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
            policies: RwLock::new(policies),
            issuers: RwLock::new(BTreeMap::new()),
            generations: RwLock::new(generations::Generations::default()),
            ca_keys_seen: std::sync::Mutex::new(Vec::new()),
            public_url: None,
            observers: RwLock::new(Vec::new()),
            nonces: renewal::Nonces::default(),
            broker_provisioning: false,
            metrics: None,
        };
        svc.reload().await?;
        Ok(svc)
    }

    /// Sets `server.public_url` (no trailing slash): device certificates
    /// then carry a CRL distribution point and AIA (OCSP, CA issuers) below
    /// it, and new issuing CA certificates their parent's CRL distribution
    /// point. Part of construction: call before sharing the service.
    pub fn with_public_url(mut self, public_url: Option<String>) -> Self {
        self.public_url = public_url;
        self
    }

    /// With `true` (a broker is configured), revoking or suspending a device
    /// queues the removal of its broker access, and resuming it queues a
    /// grant of its group's topics, in the same transaction as the status
    /// change. Part of construction.
    pub fn with_broker_provisioning(mut self, on: bool) -> Self {
        self.broker_provisioning = on;
        self
    }

    /// Counts committed renewals (`keyward_certificate_renewals_total`,
    /// whose series for every CA loaded now start at 0) and revocations
    /// (`keyward_certificates_revoked_total`) in `metrics`. Part of
    /// construction.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        for issuer in self.issuers().iter().filter(|i| i.kind == CaKind::Issuing) {
            metrics
                .ops
                .certificate_renewals
                .with_label_values(&[&issuer.name]);
        }
        self.metrics = Some(metrics);
        self
    }

    /// Where relying parties find revocation information about certificates
    /// `issuer` signs, if a public URL is configured.
    ///
    /// The CRL and CA-certificate URLs name the signing key: after a
    /// rotation each key of a CA keeps its own CRL, and a certificate must
    /// lead to the CRL of the key that signed it.
    pub fn revocation_urls(&self, issuer: &Issuer) -> Option<x509::RevocationUrls> {
        let (name, key) = (&issuer.name, issuer.key_id);
        self.public_url.as_ref().map(|base| x509::RevocationUrls {
            crl: format!("{base}/v1/ca/{name}/keys/{key}/crl"),
            ocsp: format!("{base}/v1/ocsp"),
            ca_issuers: format!("{base}/v1/ca/{name}/keys/{key}/certificate"),
        })
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
    fn issuing_ca_names(&self) -> std::collections::BTreeSet<String> {
        self.policies()
            .profiles
            .values()
            .map(|p| p.issuer.clone())
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

    /// The service clock's time, Unix seconds.
    pub fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    /// The policies in force (a snapshot: a reload swaps in a new one).
    pub fn policies(&self) -> Arc<Policies> {
        match self.policies.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Swaps in reloaded policies. Refused, changing nothing, when the CA
    /// hierarchy or the revocation settings differ (they need a restart).
    pub fn replace_policies(&self, next: Arc<Policies>) -> Result<Arc<Policies>, String> {
        let mut guard = match self.policies.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(why) = guard.reload_refusal(&next) {
            return Err(why);
        }
        Ok(std::mem::replace(&mut *guard, next))
    }
}
