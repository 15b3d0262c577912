//! Device access tokens: a device proves it holds its current certificate
//! (the mTLS client leaf, or a signature over a server nonce) and gets a
//! short-lived ES256 JWT signed in the HSM by the `token-signing` key;
//! JWKS of the keys that verify them; RFC 7662 introspection; sessions in
//! the [`Cache`] port, dropped when the bus says a device changed.
//!
//! # Keys
//!
//! [`TokenService::prepare`] finds the active `token-signing` key of the
//! configured key store or generates one (audited `key.generate`, the same
//! three steps as every key: `ca::keys::create`), as the audit key is
//! prepared. The JWKS lists every `token-signing` key that is `pre-active`
//! (the next key of a rotation: published before it signs), `active` (signs)
//! or `retired` (signs nothing; kept until every token it signed has
//! expired, then destroyed by the rotation). `kid` is the key's id.
//!
//! # Sessions and the HSM
//!
//! An issuance is a session: `session:<jti>` in the cache until the token
//! expires, and `session-cert:<x5t#S256>` for `token_reuse_seconds`: the
//! same certificate asking again within that window gets the cached token
//! back (no HSM signature, not audited, counted as `cached`). The store's
//! device status is checked on every request all the same: the cache can
//! only save a signature, never grant what the store would refuse.
//!
//! # Audit
//!
//! Each token signed is audited (`auth.token_issued`: device, jti, key,
//! expiry, proof): with the reuse window a device that asks in a loop
//! costs one event per window, not one per request. Cache hits are not
//! audited (nothing new was granted). Refusals of an identified device
//! (bad proof, revoked or suspended device, expired or superseded
//! certificate) are audited `auth.token_denied`; malformed requests and
//! unknown certificates are only counted (anyone can send those, and the
//! route is rate-limited per source).

use crate::audit::{AuditDraft, Outcome};
use crate::ca::keys::{self, KeyLifecycleError, NewKey};
use crate::ca::renewal::{NoncePurpose, verify_with_certificate_key};
use crate::ca::{CaService, LifecycleError};
use crate::cache::{Cache, Invalidation, InvalidationBus};
use crate::clock::Clock;
use crate::config::TokenConfig;
use crate::keystore::{KeyStore, KeyStoreError, KeyStores};
use crate::metrics::Metrics;
use crate::model::{CertificateStatus, DeviceStatus, KeyAlgorithm, KeyPurpose, KeyState};
use crate::store::records::KeyRecord;
use crate::store::{Change, Store, StoreError};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use der::Decode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::RwLock;
use uuid::Uuid;

/// Token label of every token-signing key.
pub const TOKEN_KEY_LABEL: &str = "keyward-token-signing";
/// Domain separation of the signed-nonce proof for a token.
pub const TOKEN_PROOF_DOMAIN: &[u8] = b"keyward-token-v1";
/// Longest JWT introspection looks at.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// The algorithm of token-signing keys (ES256).
pub const TOKEN_KEY_ALGORITHM: KeyAlgorithm = KeyAlgorithm::EcdsaP256;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    KeyStore(#[from] KeyStoreError),
    #[error(transparent)]
    Key(#[from] KeyLifecycleError),
    #[error("the proof is not valid: {0}")]
    Proof(#[source] LifecycleError),
    #[error("the certificate is not one keyward issued")]
    UnknownCertificate,
    #[error("the certificate is not the device's current one (superseded, expired or revoked)")]
    NotCurrentCertificate,
    #[error("the device is suspended")]
    DeviceSuspended,
    #[error("the device is revoked")]
    DeviceRevoked,
    #[error("no such device")]
    DeviceNotFound,
    #[error("no token-signing key is prepared (the daemon prepares it at start-up)")]
    NoKey,
    #[error(
        "token-signing key {key_id}'s public key on the token does not match the store's record"
    )]
    KeyMismatch { key_id: Uuid },
    #[error("the HSM returned a signature that is not ECDSA P-256")]
    BadSignature,
    #[error("random number generator: {0}")]
    Random(#[from] crate::crypto::RandomError),
}

impl TokenError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Store(e) => e.code(),
            Self::KeyStore(e) => e.code(),
            Self::Key(e) => e.code(),
            Self::Proof(LifecycleError::InvalidNonce) => "invalid_nonce",
            Self::Proof(LifecycleError::ProofSignatureInvalid) => "proof_signature_invalid",
            Self::Proof(LifecycleError::ProofAlgorithmUnsupported) => "proof_algorithm_unsupported",
            Self::Proof(_) => "invalid_proof",
            Self::UnknownCertificate => "certificate_unknown",
            Self::NotCurrentCertificate => "not_current_certificate",
            Self::DeviceSuspended => "device_suspended",
            Self::DeviceRevoked => "device_revoked",
            Self::DeviceNotFound => "device_not_found",
            Self::NoKey => "token_key_missing",
            Self::KeyMismatch { .. } => "token_key_mismatch",
            Self::BadSignature => "token_signature_invalid",
            Self::Random(_) => "random_failed",
        }
    }

    /// The `reason` label of `keyward_auth_token_denials_total`, for the
    /// refusals a client caused; `None` for server failures.
    pub fn denial_reason(&self) -> Option<&'static str> {
        match self {
            Self::Proof(LifecycleError::InvalidNonce) => Some("invalid_nonce"),
            Self::Proof(_) => Some("invalid_proof"),
            Self::UnknownCertificate | Self::DeviceNotFound => Some("unknown_certificate"),
            Self::NotCurrentCertificate => Some("not_current_certificate"),
            Self::DeviceSuspended | Self::DeviceRevoked => Some("device_inactive"),
            _ => None,
        }
    }
}

/// Every `reason` of `keyward_auth_token_denials_total` (series at 0 from start).
pub const DENIAL_REASONS: [&str; 5] = [
    "invalid_nonce",
    "invalid_proof",
    "unknown_certificate",
    "not_current_certificate",
    "device_inactive",
];

/// How a device proves it holds its current certificate.
#[derive(Debug, Clone)]
pub enum TokenProof {
    /// The verified TLS client leaf (DER), from the TLS layer.
    ClientCertificate(Vec<u8>),
    /// A signature over [`proof_message`] with the current certificate's key.
    SignedNonce {
        device_id: Uuid,
        nonce: Vec<u8>,
        signature: Vec<u8>,
    },
}

impl TokenProof {
    fn kind(&self) -> &'static str {
        match self {
            Self::ClientCertificate(_) => "client-certificate",
            Self::SignedNonce { .. } => "signed-nonce",
        }
    }
}

/// The bytes a device signs for the signed-nonce token proof:
/// `"keyward-token-v1" 0x00 || device id (36 ASCII) || 0x00 || nonce (32 bytes)`.
pub fn proof_message(device_id: Uuid, nonce: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(TOKEN_PROOF_DOMAIN.len() + 2 + 36 + nonce.len());
    m.extend_from_slice(TOKEN_PROOF_DOMAIN);
    m.push(0);
    m.extend_from_slice(device_id.hyphenated().to_string().as_bytes());
    m.push(0);
    m.extend_from_slice(nonce);
    m
}

/// An access token handed out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessToken {
    pub access_token: String,
    pub jti: String,
    pub device_id: Uuid,
    pub issued_at: i64,
    pub expires_at: i64,
    /// Served from the session cache (no signature made now).
    #[serde(skip)]
    pub cached: bool,
}

/// The claims keyward puts in a token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
    pub cnf: Confirmation,
}

/// RFC 8705 certificate-bound token: SHA-256 of the certificate (base64url).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Confirmation {
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

/// RFC 7662 answer. Inactive answers carry `active: false` only.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Introspection {
    pub active: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub claims: Option<IntrospectedClaims>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IntrospectedClaims {
    pub sub: String,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
    pub token_type: &'static str,
    pub cnf: Confirmation,
}

/// One public key of the JWKS.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Jwk {
    pub kty: &'static str,
    pub crv: &'static str,
    pub x: String,
    pub y: String,
    pub kid: String,
    #[serde(rename = "use")]
    pub use_: &'static str,
    pub alg: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// A verifying key: id and uncompressed point (`04 || X || Y`).
#[derive(Debug, Clone)]
struct VerifyKey {
    id: Uuid,
    point: Vec<u8>,
}

#[derive(Default)]
struct KeySet {
    /// The key that signs: its record and key store.
    signer: Option<(KeyRecord, Arc<dyn KeyStore>)>,
    /// Every key the JWKS publishes: pre-active, active, retired.
    verify: Vec<VerifyKey>,
}

/// What the session cache holds for a jti.
#[derive(Debug, Serialize, Deserialize)]
struct Session {
    device_id: Uuid,
    exp: i64,
}

pub struct TokenService {
    ca: Arc<CaService>,
    store: Arc<dyn Store>,
    keystores: KeyStores,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    cache: Arc<dyn Cache>,
    config: TokenConfig,
    keys: RwLock<KeySet>,
    /// When the key set was last read from the store: daemons that do not
    /// run the rotation job (not the leader) re-read it after
    /// [`KEYS_MAX_AGE`], so a rotation reaches every daemon.
    loaded_at: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How long a daemon trusts its copy of the token-signing keys.
pub const KEYS_MAX_AGE: Duration = Duration::from_secs(30);

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// ECDSA DER signature → JWS fixed `r || s` (32 bytes each).
fn der_to_fixed(sig: &[u8]) -> Result<Vec<u8>, TokenError> {
    #[derive(der::Sequence)]
    struct EcdsaSig<'a> {
        r: der::asn1::UintRef<'a>,
        s: der::asn1::UintRef<'a>,
    }
    let parsed = EcdsaSig::from_der(sig).map_err(|_| TokenError::BadSignature)?;
    let mut out = vec![0u8; 64];
    for (i, v) in [parsed.r.as_bytes(), parsed.s.as_bytes()]
        .iter()
        .enumerate()
    {
        if v.len() > 32 {
            return Err(TokenError::BadSignature);
        }
        out[i * 32 + 32 - v.len()..(i + 1) * 32].copy_from_slice(v);
    }
    Ok(out)
}

/// The uncompressed EC point of a P-256 SubjectPublicKeyInfo.
fn ec_point(spki_der: &[u8]) -> Option<Vec<u8>> {
    let spki = spki::SubjectPublicKeyInfoRef::from_der(spki_der).ok()?;
    let bytes = spki.subject_public_key.as_bytes()?;
    (bytes.len() == 65 && bytes[0] == 4).then(|| bytes.to_vec())
}

impl TokenService {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ca: Arc<CaService>,
        store: Arc<dyn Store>,
        keystores: KeyStores,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        cache: Arc<dyn Cache>,
        config: TokenConfig,
    ) -> Self {
        Self {
            ca,
            store,
            keystores,
            clock,
            metrics,
            cache,
            config,
            keys: RwLock::new(KeySet::default()),
            loaded_at: std::sync::Mutex::new(None),
        }
    }

    pub fn settings(&self) -> &TokenConfig {
        &self.config
    }

    fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    /// Finds the active token-signing key in the configured key store, or
    /// generates one (`actor` recorded), and loads the key set.
    pub async fn prepare(&self, actor: &str) -> Result<KeyRecord, TokenError> {
        let keystore = self.keystores.get(&self.config.keystore)?.clone();
        let active = self.active_record().await?;
        let key = match active {
            Some(k) if keystore.exists(&k.handle).await? => k,
            Some(k) => {
                // Gone from the token: it cannot sign; refuse rather than
                // silently replace a key relying parties trust.
                return Err(TokenError::KeyStore(KeyStoreError::KeyNotFound(
                    k.handle.clone(),
                )));
            }
            None => {
                self.generate(keystore.as_ref(), actor, KeyState::Active)
                    .await?
            }
        };
        self.reload().await?;
        Ok(key)
    }

    async fn active_record(&self) -> Result<Option<KeyRecord>, TokenError> {
        Ok(self
            .store
            .list_keys()
            .await?
            .into_iter()
            .filter(|k| {
                k.purpose == KeyPurpose::TokenSigning
                    && k.state == KeyState::Active
                    && k.keystore == self.config.keystore
            })
            .max_by_key(|k| (k.created_at, k.id)))
    }

    /// Generates a token-signing key in `state` (`active` at first start,
    /// `pre-active` for a rotation's next key) and returns its record.
    /// Extractable (wrap-only) where the token can wrap, so that backups
    /// carry it and a restored deployment's tokens still verify.
    pub async fn generate(
        &self,
        keystore: &dyn KeyStore,
        actor: &str,
        state: KeyState,
    ) -> Result<KeyRecord, TokenError> {
        self.generate_with(keystore, actor, state, |_| Change::new())
            .await
    }

    /// Like [`Self::generate`], committing `more(key)` with the key's completion
    /// (a rotation's step).
    pub async fn generate_with(
        &self,
        keystore: &dyn KeyStore,
        actor: &str,
        state: KeyState,
        more: impl FnOnce(&keys::PendingKey) -> Change,
    ) -> Result<KeyRecord, TokenError> {
        let id = keys::create(
            keystore,
            self.store.as_ref(),
            self.clock.as_ref(),
            actor,
            NewKey {
                keystore: &self.config.keystore,
                label: TOKEN_KEY_LABEL.to_string(),
                purpose: KeyPurpose::TokenSigning,
                algorithm: TOKEN_KEY_ALGORITHM,
                ca_name: None,
                extractable: keystore.capabilities().can_wrap_keys,
            },
            async |key: &keys::PendingKey| -> Result<Change, TokenError> {
                let (complete, event) = keys::complete_as(key, state, self.now());
                Ok(more(key).write(complete).audit(event))
            },
        )
        .await?;
        self.store
            .get_key(id)
            .await?
            .ok_or(TokenError::Store(StoreError::Corrupt(format!(
                "token-signing key {id} vanished after it was created"
            ))))
    }

    /// Re-reads the token-signing keys from the store (after a rotation
    /// step, or on another daemon's schedule) and checks the signing key's
    /// public key on the token against the store.
    pub async fn reload(&self) -> Result<(), TokenError> {
        let mut verify = Vec::new();
        for k in self.store.list_keys().await? {
            if k.purpose != KeyPurpose::TokenSigning
                || !matches!(
                    k.state,
                    KeyState::PreActive | KeyState::Active | KeyState::Retired
                )
            {
                continue;
            }
            let Some(point) = ec_point(&k.public_key_der) else {
                tracing::error!(key = %k.id, "token-signing key without a P-256 public key; left out of the JWKS");
                continue;
            };
            verify.push(VerifyKey { id: k.id, point });
        }
        verify.sort_by_key(|k| k.id);
        let signer = match self.active_record().await? {
            Some(k) => {
                let ks = self.keystores.get(&k.keystore)?.clone();
                if ks.public_key(&k.handle).await? != k.public_key_der {
                    return Err(TokenError::KeyMismatch { key_id: k.id });
                }
                Some((k, ks))
            }
            None => None,
        };
        *self.keys.write().await = KeySet { signer, verify };
        *self.loaded_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
        Ok(())
    }

    /// Re-reads the keys when the copy is older than [`KEYS_MAX_AGE`]
    /// (only once prepared). A failure keeps the old copy and is logged.
    async fn refresh_if_stale(&self) {
        let stale = self
            .loaded_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() >= KEYS_MAX_AGE);
        if stale && let Err(e) = self.reload().await {
            tracing::error!(code = e.code(), error = %e, "re-reading the token-signing keys");
        }
    }

    /// The signing key's id, once prepared.
    pub async fn active_key(&self) -> Option<Uuid> {
        self.keys.read().await.signer.as_ref().map(|(k, _)| k.id)
    }

    /// The public keys that verify tokens: next (pre-active), current, and
    /// retired keys whose tokens may still be alive.
    pub async fn jwks(&self) -> Jwks {
        self.refresh_if_stale().await;
        let keys = self.keys.read().await;
        Jwks {
            keys: keys
                .verify
                .iter()
                .map(|k| Jwk {
                    kty: "EC",
                    crv: "P-256",
                    x: B64.encode(&k.point[1..33]),
                    y: B64.encode(&k.point[33..65]),
                    kid: k.id.to_string(),
                    use_: "sig",
                    alg: "ES256",
                })
                .collect(),
        }
    }

    /// A nonce for the signed-nonce proof; only an active device gets one.
    pub async fn nonce(&self, device_id: Uuid) -> Result<[u8; 32], TokenError> {
        let device = self
            .store
            .get_device(device_id)
            .await?
            .ok_or(TokenError::DeviceNotFound)?;
        usable(device.status)?;
        self.ca
            .nonces()
            .issue(device_id, NoncePurpose::AccessToken, self.now())
            .await
            .map_err(|e| match e {
                LifecycleError::Random(r) => TokenError::Random(r),
                other => TokenError::Proof(other),
            })
    }

    /// Issues (or hands back the cached) access token for the device whose
    /// current certificate `proof` proves. Counted, and audited as the
    /// module docs say.
    pub async fn issue(
        &self,
        proof: TokenProof,
        source: Option<&str>,
    ) -> Result<AccessToken, TokenError> {
        let kind = proof.kind();
        let mut device_seen = None;
        let result = self.issue_inner(proof, source, &mut device_seen).await;
        match &result {
            Ok(t) => {
                let via = if t.cached { "cached" } else { "signed" };
                self.metrics
                    .ops
                    .auth_tokens_issued
                    .with_label_values(&[via])
                    .inc();
            }
            Err(e) => {
                if let Some(reason) = e.denial_reason() {
                    self.metrics
                        .ops
                        .auth_token_denials
                        .with_label_values(&[reason])
                        .inc();
                    if let Some(device) = device_seen {
                        let draft = AuditDraft::new(
                            format!("device:{device}"),
                            "auth.token_denied",
                            format!("device:{device}"),
                        )
                        .outcome(Outcome::Failure)
                        .details(json!({ "proof": kind, "code": e.code() }))
                        .source(source);
                        if let Err(se) = self.store.commit(Change::new().audit(draft)).await {
                            tracing::error!(error = %se, "could not audit a refused token request");
                        }
                    }
                }
            }
        }
        result
    }

    async fn issue_inner(
        &self,
        proof: TokenProof,
        source: Option<&str>,
        device_seen: &mut Option<Uuid>,
    ) -> Result<AccessToken, TokenError> {
        let now = self.now();
        let kind = proof.kind();
        let (device_id, cert) = match &proof {
            TokenProof::ClientCertificate(leaf) => {
                let cert = self.certificate_of(leaf).await?;
                let device_id = cert.device_id.ok_or(TokenError::UnknownCertificate)?;
                (device_id, cert)
            }
            TokenProof::SignedNonce {
                device_id,
                nonce,
                signature,
            } => {
                // Single use, whatever follows.
                self.ca
                    .nonces()
                    .take(nonce, *device_id, NoncePurpose::AccessToken, now)
                    .await
                    .map_err(TokenError::Proof)?;
                let current =
                    self.ca
                        .current_certificate(*device_id, now)
                        .await
                        .map_err(|e| match e {
                            LifecycleError::Store(s) => TokenError::Store(s),
                            _ => TokenError::NotCurrentCertificate,
                        });
                *device_seen = Some(*device_id);
                let current = current?;
                verify_with_certificate_key(
                    &current.der,
                    &proof_message(*device_id, nonce),
                    signature,
                )
                .map_err(TokenError::Proof)?;
                (*device_id, current)
            }
        };
        *device_seen = Some(device_id);
        let device = self
            .store
            .get_device(device_id)
            .await?
            .ok_or(TokenError::DeviceNotFound)?;
        usable(device.status)?;
        // The certificate must be the device's current one: valid, in its
        // validity period, not superseded by a renewal.
        if cert.status != CertificateStatus::Valid
            || cert.on_hold()
            || cert.not_before > now
            || cert.not_after <= now
        {
            return Err(TokenError::NotCurrentCertificate);
        }
        let current = self
            .ca
            .current_certificate(device_id, now)
            .await
            .map_err(|e| match e {
                LifecycleError::Store(s) => TokenError::Store(s),
                _ => TokenError::NotCurrentCertificate,
            })?;
        if current.der != cert.der {
            return Err(TokenError::NotCurrentCertificate);
        }
        let x5t = B64.encode(sha256(&cert.der));
        if let Some(t) = self.reusable(&x5t, device_id, now).await {
            return Ok(t);
        }
        let token = self
            .sign(device_id, &x5t, cert.not_after, now, kind, source)
            .await?;
        self.remember(&token, &x5t, now).await;
        Ok(token)
    }

    /// The stored record of exactly this certificate.
    async fn certificate_of(
        &self,
        leaf: &[u8],
    ) -> Result<crate::store::CertificateRecord, TokenError> {
        let cert =
            x509_cert::Certificate::from_der(leaf).map_err(|_| TokenError::UnknownCertificate)?;
        let serial = hex::encode_upper(cert.tbs_certificate().serial_number().as_bytes());
        let record = self
            .store
            .get_certificate(&serial)
            .await?
            .ok_or(TokenError::UnknownCertificate)?;
        if record.der != leaf {
            return Err(TokenError::UnknownCertificate);
        }
        Ok(record)
    }

    /// The cached token of this certificate, within the reuse window.
    async fn reusable(&self, x5t: &str, device_id: Uuid, now: i64) -> Option<AccessToken> {
        if self.config.reuse_seconds == 0 {
            return None;
        }
        let raw = match self.cache.get(&format!("session-cert:{x5t}")).await {
            Ok(v) => v?,
            Err(e) => {
                tracing::warn!(error = %e, "session cache unavailable; signing a new token");
                return None;
            }
        };
        let mut t: AccessToken = serde_json::from_slice(&raw).ok()?;
        if t.device_id != device_id
            || now - t.issued_at >= self.config.reuse_seconds
            || t.expires_at <= now
        {
            return None;
        }
        t.cached = true;
        Some(t)
    }

    /// Records the session (jti → device) for the token's lifetime, the
    /// reuse entry, and the device's list of sessions (for invalidation).
    /// Cache failures are logged: a session not cached costs a signature
    /// next time, nothing else.
    async fn remember(&self, t: &AccessToken, x5t: &str, now: i64) {
        let life = Duration::from_secs((t.expires_at - now).max(1) as u64);
        let session = Session {
            device_id: t.device_id,
            exp: t.expires_at,
        };
        let mut puts = vec![(
            format!("session:{}", t.jti),
            serde_json::to_vec(&session).unwrap_or_default(),
            life,
        )];
        if self.config.reuse_seconds > 0 {
            puts.push((
                format!("session-cert:{x5t}"),
                serde_json::to_vec(t).unwrap_or_default(),
                Duration::from_secs(self.config.reuse_seconds as u64),
            ));
        }
        let list_key = format!("device-sessions:{}", t.device_id);
        let mut list: Vec<(String, String)> = match self.cache.get(&list_key).await {
            Ok(Some(v)) => serde_json::from_slice(&v).unwrap_or_default(),
            _ => Vec::new(),
        };
        list.push((t.jti.clone(), x5t.to_string()));
        // Bounded: a device holds at most a few live sessions.
        if list.len() > 64 {
            list.drain(..list.len() - 64);
        }
        puts.push((
            list_key,
            serde_json::to_vec(&list).unwrap_or_default(),
            Duration::from_secs(self.config.ttl_seconds as u64),
        ));
        for (k, v, ttl) in puts {
            if let Err(e) = self.cache.put(&k, &v, ttl).await {
                tracing::warn!(error = %e, "could not cache a device session");
            }
        }
    }

    /// Signs a new token in the HSM and audits it.
    async fn sign(
        &self,
        device_id: Uuid,
        x5t: &str,
        cert_not_after: i64,
        now: i64,
        proof: &str,
        source: Option<&str>,
    ) -> Result<AccessToken, TokenError> {
        self.refresh_if_stale().await;
        let (key, keystore) = self
            .keys
            .read()
            .await
            .signer
            .clone()
            .ok_or(TokenError::NoKey)?;
        let jti = Uuid::new_v4().simple().to_string();
        // Never outlives the certificate it is bound to.
        let exp = (now + self.config.ttl_seconds).min(cert_not_after);
        let claims = Claims {
            iss: self.config.issuer.clone(),
            sub: device_id.to_string(),
            aud: self.config.audience.clone(),
            iat: now,
            nbf: now,
            exp,
            jti: jti.clone(),
            cnf: Confirmation {
                x5t_s256: x5t.to_string(),
            },
        };
        let header = json!({ "alg": "ES256", "typ": "JWT", "kid": key.id.to_string() });
        let signing_input = format!(
            "{}.{}",
            B64.encode(serde_json::to_vec(&header).unwrap_or_default()),
            B64.encode(serde_json::to_vec(&claims).unwrap_or_default())
        );
        let der = keystore
            .sign(&key.handle, key.algorithm, signing_input.as_bytes())
            .await?;
        let sig = der_to_fixed(&der)?;
        let token = format!("{signing_input}.{}", B64.encode(sig));
        self.store
            .commit(
                Change::new().audit(
                    AuditDraft::new(
                        format!("device:{device_id}"),
                        "auth.token_issued",
                        format!("device:{device_id}"),
                    )
                    .details(json!({
                        "jti": jti,
                        "key": key.id,
                        "expires_at": exp,
                        "proof": proof,
                        "x5t#S256": x5t,
                    }))
                    .source(source),
                ),
            )
            .await?;
        Ok(AccessToken {
            access_token: token,
            jti,
            device_id,
            issued_at: now,
            expires_at: exp,
            cached: false,
        })
    }

    /// RFC 7662: `active` only for a token keyward signed with a key it
    /// still publishes, inside its validity, for this issuer and audience,
    /// of a device that is active now (the store says, not the cache).
    pub async fn introspect(&self, token: &str) -> Result<Introspection, TokenError> {
        let inactive = Introspection {
            active: false,
            claims: None,
        };
        let Some(claims) = self.verify(token).await else {
            self.metrics
                .ops
                .auth_introspections
                .with_label_values(&["inactive"])
                .inc();
            return Ok(inactive);
        };
        let now = self.now();
        let device_ok = match Uuid::parse_str(&claims.sub) {
            Ok(id) => {
                // The cache first: a session it holds must be this device's
                // (a miss proves nothing: an evicted entry, a restarted
                // daemon). Then the store: the device must be active now,
                // whatever the cache says.
                let session_ok = match self.cache.get(&format!("session:{}", claims.jti)).await {
                    Ok(Some(v)) => serde_json::from_slice::<Session>(&v)
                        .is_ok_and(|s| s.device_id == id && s.exp == claims.exp),
                    _ => true,
                };
                // The certificate the token is bound to (`cnf`) must still
                // be the device's current one: revoked, on hold, superseded
                // or expired on its own (the device not revoked), its
                // tokens are no longer active.
                let device_active = self
                    .store
                    .get_device(id)
                    .await?
                    .is_some_and(|d| d.status == DeviceStatus::Active);
                let bound_current = device_active
                    && match self.ca.current_certificate(id, now).await {
                        Ok(cert) => B64.encode(sha256(&cert.der)) == claims.cnf.x5t_s256,
                        Err(LifecycleError::Store(e)) => return Err(e.into()),
                        Err(_) => false,
                    };
                session_ok && bound_current
            }
            Err(_) => false,
        };
        let active = device_ok && claims.nbf <= now && claims.exp > now;
        self.metrics
            .ops
            .auth_introspections
            .with_label_values(&[if active { "active" } else { "inactive" }])
            .inc();
        if !active {
            return Ok(inactive);
        }
        Ok(Introspection {
            active: true,
            claims: Some(IntrospectedClaims {
                sub: claims.sub,
                iss: claims.iss,
                aud: claims.aud,
                iat: claims.iat,
                nbf: claims.nbf,
                exp: claims.exp,
                jti: claims.jti,
                token_type: "Bearer",
                cnf: claims.cnf,
            }),
        })
    }

    /// The claims of a token whose signature verifies with a published key
    /// and whose issuer and audience are ours; `None` for anything else.
    async fn verify(&self, token: &str) -> Option<Claims> {
        if token.len() > MAX_TOKEN_BYTES {
            return None;
        }
        let mut parts = token.split('.');
        let (h, c, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        #[derive(Deserialize)]
        struct Header {
            alg: String,
            kid: String,
            #[serde(default)]
            crit: Option<serde_json::Value>,
        }
        let header: Header = serde_json::from_slice(&B64.decode(h).ok()?).ok()?;
        if header.alg != "ES256" || header.crit.is_some() {
            return None;
        }
        let kid = Uuid::parse_str(&header.kid).ok()?;
        self.refresh_if_stale().await;
        let point = {
            let keys = self.keys.read().await;
            keys.verify.iter().find(|k| k.id == kid)?.point.clone()
        };
        let sig = B64.decode(s).ok()?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(format!("{h}.{c}").as_bytes(), &sig)
            .ok()?;
        let claims: Claims = serde_json::from_slice(&B64.decode(c).ok()?).ok()?;
        (claims.iss == self.config.issuer && claims.aud == self.config.audience).then_some(claims)
    }

    /// Drops every cached session of a device (revoked, suspended, resumed):
    /// no cached token is handed out again and introspection reads the store.
    pub async fn drop_device_sessions(&self, device_id: Uuid) {
        let list_key = format!("device-sessions:{device_id}");
        let list: Vec<(String, String)> = match self.cache.get(&list_key).await {
            Ok(Some(v)) => serde_json::from_slice(&v).unwrap_or_default(),
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "session cache unavailable while dropping a device's sessions");
                return;
            }
        };
        for (jti, x5t) in list {
            for k in [format!("session:{jti}"), format!("session-cert:{x5t}")] {
                if let Err(e) = self.cache.delete(&k).await {
                    tracing::warn!(error = %e, "could not drop a cached session");
                }
            }
        }
        let _ = self.cache.delete(&list_key).await;
    }

    /// Follows the invalidation bus until `shutdown`: a device change drops
    /// its sessions on this daemon; a lagging receiver reloads the keys
    /// (sessions it may have missed expire with their TTL, and
    /// introspection checks the store's device status anyway).
    pub fn spawn_invalidation_listener(
        self: &Arc<Self>,
        bus: &Arc<dyn InvalidationBus>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let mut rx = bus.subscribe();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    msg = rx.recv() => match msg {
                        Ok(Invalidation::Device { id }) => me.drop_device_sessions(id).await,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "invalidation bus lagged; device sessions may live until their TTL");
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        })
    }
}

fn usable(status: DeviceStatus) -> Result<(), TokenError> {
    match status {
        DeviceStatus::Active => Ok(()),
        DeviceStatus::Suspended => Err(TokenError::DeviceSuspended),
        DeviceStatus::Revoked => Err(TokenError::DeviceRevoked),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_signatures_become_fixed_width() {
        // SEQUENCE { INTEGER 0x00ff.. (33 bytes with sign pad), INTEGER 1 }
        let mut der = vec![0x30, 0x26, 0x02, 0x21, 0x00];
        der.extend_from_slice(&[0xff; 32]);
        der.extend_from_slice(&[0x02, 0x01, 0x01]);
        let fixed = der_to_fixed(&der).unwrap();
        assert_eq!(fixed.len(), 64);
        assert_eq!(&fixed[..32], &[0xff; 32]);
        assert_eq!(&fixed[32..63], &[0u8; 31]);
        assert_eq!(fixed[63], 1);
        assert!(der_to_fixed(b"\x30\x00").is_err());
    }

    #[test]
    fn proof_message_is_fixed_layout() {
        let id = Uuid::parse_str("0190f1c2-0000-7000-8000-000000000001").unwrap();
        let m = proof_message(id, &[7u8; 32]);
        assert!(m.starts_with(b"keyward-token-v1\0"));
        assert_eq!(&m[17..53], id.to_string().as_bytes());
        assert_eq!(m[53], 0);
        assert_eq!(&m[54..], &[7u8; 32]);
    }
}
