//! Renewal by the current certificate: the proofs (mTLS client certificate,
//! or a signature over a server nonce), the renewal window and the admin's
//! one-time early-renewal allowance, and the "revoked key" check that
//! registration shares.
//!
//! # The signed-nonce proof
//!
//! `GET /v1/devices/{id}/renew/nonce` hands out 32 random bytes, bound to the
//! device, valid [`NONCE_TTL_SECS`] and usable once (taken even when the
//! renewal then fails). The device signs, with its current certificate's key,
//! the bytes of [`proof_message`]:
//!
//! ```text
//! "keyward-renew-v1" 0x00 || device id (36 ASCII, lower-case, hyphenated) || 0x00
//!   || nonce (32 bytes) || SHA-256(CSR DER) (32 bytes)
//! ```
//!
//! ECDSA P-256 with SHA-256, P-384 with SHA-384 (ASN.1 DER signatures), RSA
//! PKCS#1 v1.5 with SHA-256, Ed25519 over the message itself. The domain
//! prefix keeps the signature from meaning anything else; the CSR hash binds
//! the proof to the request, so a captured proof cannot carry another CSR.
//!
//! Nonces live in this process's memory (a bounded map) and, with
//! `[redis]`, in the shared cache too ([`Nonces::share`]): any daemon of the
//! deployment takes a nonce another handed out, once. Without Redis a
//! restart drops them, which only refuses the renewals in flight (the
//! device asks again), and the nonce GET and the renewal POST must reach
//! the same daemon.

use super::lifecycle::LifecycleError;
use super::public_key::PublicKey;
use super::revocation::check_comment;
use super::{CaService, csr, spki_sha256};
use crate::audit::AuditDraft;
use crate::clock::{from_unix, rfc3339};
use crate::keystore::KeyAlgorithm;
use crate::model::{CertificateStatus, DeviceStatus};
use crate::policy::{Policies, ProfilePolicy};
use crate::store::{
    AdminRecord, CertificateRecord, Change, Conflict, RenewalAllowanceRecord, StoreError, Write,
};
use der::{Decode, Encode};
use serde::Serialize;
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use uuid::Uuid;

/// How long a renewal nonce may be used.
pub const NONCE_TTL_SECS: i64 = 300;
/// Nonces held at most; the oldest go first beyond this.
pub const MAX_NONCES: usize = 100_000;
/// Domain separation of the signed-nonce proof.
pub const PROOF_DOMAIN: &[u8] = b"keyward-renew-v1";

/// How a device proves it holds its current certificate.
#[derive(Debug, Clone)]
pub enum RenewalProof {
    /// The verified TLS client leaf (DER), from the TLS layer.
    ClientCertificate(Vec<u8>),
    /// A signature over [`proof_message`] with the current certificate's key.
    SignedNonce {
        nonce: Vec<u8>,
        signature: Vec<u8>,
        /// The certificate the device believes current (optional): when
        /// given, it must be the current one.
        certificate: Option<Vec<u8>>,
    },
}

impl RenewalProof {
    fn kind(&self) -> &'static str {
        match self {
            Self::ClientCertificate(_) => "client-certificate",
            Self::SignedNonce { .. } => "signed-nonce",
        }
    }
}

/// A finished renewal.
#[derive(Debug, Clone)]
pub struct Renewed {
    pub certificate: CertificateRecord,
    pub previous_serial: String,
    pub rekey: bool,
    pub forced: bool,
    /// Issuing CA first, then its parents, PEM.
    pub chain_pem: String,
    /// The new certificate's renewal window.
    pub renewal: RenewalHint,
}

/// A profile's renewal window in seconds (`renewal_window_days`).
pub fn profile_window_secs(profile: &ProfilePolicy) -> i64 {
    i64::from(profile.renewal_window_days) * 86_400
}

/// The renewal window of a device in `group`: the window of the profile
/// the group issues under (the profile renewal uses). `None` when the
/// group or its profile is not in `policies`.
pub fn renewal_window_secs(policies: &Policies, group: &str) -> Option<i64> {
    let g = policies.groups.get(group)?;
    policies.profiles.get(&g.profile).map(profile_window_secs)
}

/// When the renewal window of a certificate ending at `not_after` opens.
pub fn renewal_window_opens(not_after: i64, window_secs: i64) -> i64 {
    not_after.saturating_sub(window_secs)
}

/// What devices are told about their current certificate's renewal: the
/// `renewal` object of the device-facing answers (registration status,
/// device config, renewal), and the `Keyward-Renewal-Due` header when due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RenewalHint {
    /// `now >= window_opens_at`: the device should renew now.
    pub due: bool,
    #[serde(serialize_with = "as_rfc3339")]
    pub window_opens_at: i64,
    #[serde(serialize_with = "as_rfc3339")]
    pub not_after: i64,
}

impl RenewalHint {
    /// The hint for a certificate ending at `not_after` under a window of
    /// `window_secs`, as of `now`.
    pub fn new(not_after: i64, window_secs: i64, now: i64) -> Self {
        let opens = renewal_window_opens(not_after, window_secs);
        Self {
            due: now >= opens,
            window_opens_at: opens,
            not_after,
        }
    }
}

fn as_rfc3339<S: serde::Serializer>(t: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(from_unix(*t)))
}

/// The bytes a device signs for the signed-nonce proof.
pub fn proof_message(device_id: Uuid, nonce: &[u8], csr_der: &[u8]) -> Vec<u8> {
    let digest = ring::digest::digest(&ring::digest::SHA256, csr_der);
    let mut m = Vec::with_capacity(PROOF_DOMAIN.len() + 2 + 36 + nonce.len() + 32);
    m.extend_from_slice(PROOF_DOMAIN);
    m.push(0);
    m.extend_from_slice(device_id.hyphenated().to_string().as_bytes());
    m.push(0);
    m.extend_from_slice(nonce);
    m.extend_from_slice(digest.as_ref());
    m
}

/// What a nonce may prove: one store for every signed-nonce proof of a
/// device's current certificate, each nonce bound to the one use it was
/// issued for (a renewal nonce never opens a token request, and the other
/// way round), besides the domain prefix of each proof's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoncePurpose {
    /// `GET /v1/devices/{id}/renew/nonce` → `POST /v1/devices/{id}/renew`.
    Renewal,
    /// `POST /v1/auth/nonce` → `POST /v1/auth/token`.
    AccessToken,
}

/// Issued proof nonces, bounded; one entry per nonce.
///
/// With a shared cache ([`Nonces::share`], Redis under `[redis]`) a nonce
/// one daemon handed out is taken on any daemon of the deployment: the
/// cache's atomic take (`GETDEL`) is the single use, so no load-balancer
/// affinity is needed. The local map still holds every nonce: it answers
/// for nonces the cache did not take when issued, and while the cache is
/// unreachable (degraded: a nonce already used on another daemon could
/// then be used once more here within its 5 minutes).
#[derive(Default)]
pub struct Nonces {
    inner: Mutex<NonceMap>,
    shared: std::sync::OnceLock<std::sync::Arc<dyn crate::cache::Cache>>,
}

#[derive(Default)]
struct NonceMap {
    /// (device, purpose, expires, also in the shared cache)
    by_nonce: HashMap<[u8; 32], (Uuid, NoncePurpose, i64, bool)>,
    /// Insertion order (= expiry order: one TTL for all).
    order: VecDeque<([u8; 32], i64)>,
}

impl NoncePurpose {
    fn code(self) -> u8 {
        match self {
            Self::Renewal => 1,
            Self::AccessToken => 2,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Self::Renewal),
            2 => Some(Self::AccessToken),
            _ => None,
        }
    }
}

fn shared_key(nonce: &[u8; 32]) -> String {
    format!("nonce:{}", hex::encode(nonce))
}

/// device (16) || purpose (1) || expires (8, big-endian)
fn encode_nonce(device: Uuid, purpose: NoncePurpose, expires: i64) -> Vec<u8> {
    let mut v = Vec::with_capacity(25);
    v.extend_from_slice(device.as_bytes());
    v.push(purpose.code());
    v.extend_from_slice(&expires.to_be_bytes());
    v
}

fn decode_nonce(v: &[u8]) -> Option<(Uuid, NoncePurpose, i64)> {
    let device = Uuid::from_slice(v.get(0..16)?).ok()?;
    let purpose = NoncePurpose::from_code(*v.get(16)?)?;
    let expires = i64::from_be_bytes(v.get(17..25)?.try_into().ok()?);
    (v.len() == 25).then_some((device, purpose, expires))
}

impl Nonces {
    /// Shares nonces through `cache` from now on (set once, at start).
    pub fn share(&self, cache: std::sync::Arc<dyn crate::cache::Cache>) {
        let _ = self.shared.set(cache);
    }

    /// A fresh nonce for `device`, usable once for `purpose` within [`NONCE_TTL_SECS`].
    pub async fn issue(
        &self,
        device: Uuid,
        purpose: NoncePurpose,
        now: i64,
    ) -> Result<[u8; 32], LifecycleError> {
        let bytes = crate::crypto::random_bytes(32)?;
        let mut nonce = [0u8; 32];
        nonce.copy_from_slice(&bytes);
        let expires = now + NONCE_TTL_SECS;
        let mut in_shared = false;
        if let Some(cache) = self.shared.get() {
            let ttl = std::time::Duration::from_secs(NONCE_TTL_SECS.unsigned_abs());
            match cache
                .put(
                    &shared_key(&nonce),
                    &encode_nonce(device, purpose, expires),
                    ttl,
                )
                .await
            {
                Ok(()) => in_shared = true,
                Err(e) => {
                    tracing::warn!(error = %e, "nonce not shared: only this daemon will take it")
                }
            }
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((n, exp)) = g.order.front().copied() {
            if exp > now && g.order.len() < MAX_NONCES {
                break;
            }
            g.order.pop_front();
            if g.by_nonce.get(&n).is_some_and(|(_, _, e, _)| *e == exp) {
                g.by_nonce.remove(&n);
            }
        }
        g.by_nonce
            .insert(nonce, (device, purpose, expires, in_shared));
        g.order.push_back((nonce, expires));
        Ok(nonce)
    }

    /// Takes the nonce (single use, whatever the outcome) and checks it was
    /// issued for `device` and `purpose` and has not expired.
    pub async fn take(
        &self,
        nonce: &[u8],
        device: Uuid,
        purpose: NoncePurpose,
        now: i64,
    ) -> Result<(), LifecycleError> {
        let key: [u8; 32] = nonce.try_into().map_err(|_| LifecycleError::InvalidNonce)?;
        let local = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_nonce
            .remove(&key);
        let found = match self.shared.get() {
            None => local.map(|(d, p, e, _)| (d, p, e)),
            Some(cache) => match cache.take(&shared_key(&key)).await {
                Ok(Some(v)) => decode_nonce(&v),
                // Taken already (here or on another daemon), or never
                // shared: only a nonce the cache never held counts here.
                Ok(None) => local.filter(|l| !l.3).map(|(d, p, e, _)| (d, p, e)),
                Err(e) => {
                    tracing::warn!(error = %e, "shared nonces unreachable: checking this daemon's own");
                    local.map(|(d, p, e, _)| (d, p, e))
                }
            },
        };
        match found {
            Some((d, p, exp)) if d == device && p == purpose && exp > now => Ok(()),
            _ => Err(LifecycleError::InvalidNonce),
        }
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .map(|g| g.by_nonce.len())
            .unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Verifies `signature` over `message` with the SubjectPublicKeyInfo of
/// `cert_der` (the algorithms listed in the module docs).
pub fn verify_with_certificate_key(
    cert_der: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<(), LifecycleError> {
    use ring::signature as s;
    let cert = x509_cert::Certificate::from_der(cert_der)
        .map_err(|_| LifecycleError::ProofAlgorithmUnsupported)?;
    let key = PublicKey::from_spki(cert.tbs_certificate().subject_public_key_info())
        .map_err(|_| LifecycleError::ProofAlgorithmUnsupported)?;
    let alg: &'static dyn s::VerificationAlgorithm = match key.algorithm() {
        KeyAlgorithm::EcdsaP256 => &s::ECDSA_P256_SHA256_ASN1,
        KeyAlgorithm::EcdsaP384 => &s::ECDSA_P384_SHA384_ASN1,
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
            &s::RSA_PKCS1_2048_8192_SHA256
        }
        KeyAlgorithm::Ed25519 => &s::ED25519,
    };
    s::UnparsedPublicKey::new(alg, key.key_bytes())
        .verify(message, signature)
        .map_err(|_| LifecycleError::ProofSignatureInvalid)
}

/// Device ids the CSR's subject CN or SAN URIs name (values that parse as
/// a UUID, plain or `urn:uuid:`); other names are not device names and are
/// ignored (nothing of the CSR but its key reaches the certificate).
fn named_devices(csr_der: &[u8]) -> Result<Vec<(String, Uuid)>, LifecycleError> {
    use const_oid::db::{rfc4519, rfc5280, rfc5912};
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;
    let req = x509_cert::request::CertReq::from_der(csr_der).map_err(csr::CsrError::from)?;
    let mut out = Vec::new();
    let mut consider = |text: &str| {
        let t = text.trim();
        if let Ok(u) = Uuid::parse_str(t) {
            out.push((t.to_string(), u));
        }
    };
    for atv in req.info.subject.iter() {
        if atv.oid == rfc4519::CN {
            consider(&String::from_utf8_lossy(atv.value.value()));
        }
    }
    for attr in req.info.attributes.iter() {
        if attr.oid != rfc5912::ID_EXTENSION_REQ {
            continue;
        }
        for value in attr.values.iter() {
            let der = value.to_der().map_err(csr::CsrError::from)?;
            let exts = x509_cert::ext::Extensions::from_der(&der).map_err(csr::CsrError::from)?;
            for ext in exts
                .iter()
                .filter(|e| e.extn_id == rfc5280::ID_CE_SUBJECT_ALT_NAME)
            {
                let san = SubjectAltName::from_der(ext.extn_value.as_bytes())
                    .map_err(csr::CsrError::from)?;
                for name in san.0.iter() {
                    if let GeneralName::UniformResourceIdentifier(uri) = name {
                        consider(uri.as_str());
                    }
                }
            }
        }
    }
    Ok(out)
}

impl CaService {
    /// A fresh nonce for the device's signed-nonce renewal proof. Only an
    /// active device gets one (a revoked or suspended device cannot renew).
    pub async fn renewal_nonce(&self, device_id: Uuid) -> Result<[u8; 32], LifecycleError> {
        let device = self
            .store
            .get_device(device_id)
            .await?
            .ok_or(LifecycleError::DeviceNotFound)?;
        device_usable(device.status)?;
        let now = self.clock.now().unix_timestamp();
        self.nonces
            .issue(device_id, NoncePurpose::Renewal, now)
            .await
    }

    pub fn nonces(&self) -> &Nonces {
        &self.nonces
    }

    /// Lets an active device renew once before its renewal window opens,
    /// within `valid_for_secs`. Replaces an open allowance.
    pub async fn allow_renewal(
        &self,
        admin: &AdminRecord,
        device_id: Uuid,
        valid_for_secs: i64,
        comment: Option<&str>,
        source: Option<&str>,
    ) -> Result<RenewalAllowanceRecord, LifecycleError> {
        check_comment(comment)?;
        let device = self
            .store
            .get_device(device_id)
            .await?
            .ok_or(LifecycleError::DeviceNotFound)?;
        device_usable(device.status)?;
        let now = self.clock.now().unix_timestamp();
        let record = RenewalAllowanceRecord {
            device_id,
            granted_by: admin.id,
            granted_at: now,
            expires_at: now + valid_for_secs,
        };
        let change = Change::new()
            .write(Write::AllowRenewal(record.clone()))
            .audit(
                AuditDraft::new(
                    format!("admin:{}", admin.id),
                    "device.allow_renewal",
                    format!("device:{device_id}"),
                )
                .details(json!({ "expires_at": record.expires_at }))
                .sensitive("comment", comment)
                .source(source),
            );
        self.store.commit(change).await.map_err(|e| match e {
            StoreError::Conflict(Conflict::Missing { .. }) => LifecycleError::DeviceNotFound,
            StoreError::Conflict(Conflict::StateChanged { .. }) => LifecycleError::ConcurrentChange,
            other => other.into(),
        })?;
        Ok(record)
    }

    /// Whether a public key (by [`spki_sha256`]) is barred from new
    /// certificates: it belongs to a revoked or suspended device, or one
    /// of its certificates was revoked for a reason other than a hold.
    pub async fn key_is_revoked(&self, spki_hash: &str) -> Result<bool, LifecycleError> {
        for cert in self.store.certificates_by_spki(spki_hash).await? {
            if cert.status == CertificateStatus::Revoked && !cert.on_hold() {
                return Ok(true);
            }
            if let Some(d) = cert.device_id
                && let Some(device) = self.store.get_device(d).await?
                && device.status != DeviceStatus::Active
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The device's current certificate: the newest `valid` unexpired one;
    /// otherwise why there is none.
    pub async fn current_certificate(
        &self,
        device_id: Uuid,
        now: i64,
    ) -> Result<CertificateRecord, LifecycleError> {
        let certs = self.device_certificates(device_id).await?;
        if let Some(c) = certs
            .iter()
            .find(|c| c.status == CertificateStatus::Valid && c.not_after > now)
        {
            return Ok(c.clone());
        }
        match certs.first() {
            None => Err(LifecycleError::NoCurrentCertificate),
            Some(c) if c.status == CertificateStatus::Revoked => {
                Err(LifecycleError::CertificateRevoked)
            }
            Some(c) if c.not_after <= now => Err(LifecycleError::CertificateExpired),
            Some(_) => Err(LifecycleError::NoCurrentCertificate),
        }
    }

    /// Renews the device's current certificate with `csr` (same key or a
    /// new one), authenticated by `proof`. Steps:
    ///
    /// 1. a nonce proof takes its nonce (single use, even if what follows fails);
    /// 2. the CSR is verified as at registration;
    /// 3. the device must be `active` and have a current certificate, which
    ///    the proof must be for; the CSR must not name another device, and
    ///    its key must not be barred ([`Self::key_is_revoked`]);
    /// 4. inside the profile's renewal window, or with an admin's open
    ///    allowance (then `forced`, and the allowance is used);
    /// 5. the HSM signs; one commit inserts the new certificate, supersedes
    ///    the old one (conflicts unless it is still `valid`: a concurrent
    ///    renewal, suspension or revocation wins, nothing is stored), uses the
    ///    allowance, and audits `certificate.renew`.
    ///
    /// A certificate signed for a commit that then conflicts is discarded
    /// unstored (never delivered; its serial is random).
    pub async fn renew(
        &self,
        device_id: Uuid,
        csr_input: &[u8],
        proof: RenewalProof,
        source: Option<&str>,
    ) -> Result<Renewed, LifecycleError> {
        let now = self.clock.now().unix_timestamp();
        let csr_der = csr::decode_pem_or_der(csr_input)?;
        if let RenewalProof::SignedNonce { nonce, .. } = &proof {
            self.nonces
                .take(nonce, device_id, NoncePurpose::Renewal, now)
                .await?;
        }
        let verified = csr::verify(&csr_der)?;
        let device = self
            .store
            .get_device(device_id)
            .await?
            .ok_or(LifecycleError::DeviceNotFound)?;
        device_usable(device.status)?;
        let current = self.current_certificate(device_id, now).await?;
        match &proof {
            RenewalProof::ClientCertificate(der) => {
                if der != &current.der {
                    return Err(LifecycleError::NotCurrentCertificate);
                }
            }
            RenewalProof::SignedNonce {
                nonce,
                signature,
                certificate,
            } => {
                if certificate.as_ref().is_some_and(|c| c != &current.der) {
                    return Err(LifecycleError::NotCurrentCertificate);
                }
                let message = proof_message(device_id, nonce, &csr_der);
                verify_with_certificate_key(&current.der, &message, signature)?;
            }
        }
        if let Some((name, _)) = named_devices(&csr_der)?
            .into_iter()
            .find(|(_, id)| *id != device_id)
        {
            return Err(LifecycleError::CsrDeviceMismatch(name));
        }
        let new_spki = spki_sha256(&verified.spki_der);
        let old_spki = match &current.spki_sha256 {
            Some(h) => h.clone(),
            None => certificate_spki_hash(&current.der)?,
        };
        let rekey = new_spki != old_spki;
        if self.key_is_revoked(&new_spki).await? {
            return Err(LifecycleError::KeyRevoked);
        }
        let policies = self.policies();
        let group = policies
            .groups
            .get(&device.group)
            .ok_or_else(|| LifecycleError::UnknownGroup(device.group.clone()))?;
        let profile = policies
            .profiles
            .get(&group.profile)
            .ok_or_else(|| LifecycleError::UnknownGroup(device.group.clone()))?;
        let window = profile_window_secs(profile);
        let opens = renewal_window_opens(current.not_after, window);
        let forced = if now >= opens {
            false
        } else {
            match self.store.renewal_allowance(device_id).await? {
                Some(a) if a.expires_at > now => true,
                _ => {
                    return Err(LifecycleError::OutsideRenewalWindow {
                        opens_in_days: ((opens - now + 86_399) / 86_400).max(1) as u32,
                    });
                }
            }
        };
        let issued = self
            .sign_device_certificate(profile, device_id, &verified)
            .await?;
        let new = issued.record;
        let mut change = Change::new()
            .write(Write::InsertCertificate(new.clone()))
            .write(Write::SupersedeCertificate {
                serial: current.serial.clone(),
                by: new.serial.clone(),
                at: now,
            });
        if forced {
            change = change.write(Write::ConsumeRenewalAllowance { device_id, at: now });
        }
        change = change.audit(
            AuditDraft::new(
                format!("device:{device_id}"),
                "certificate.renew",
                format!("certificate:{}", new.serial),
            )
            .details(json!({
                "device_id": device_id,
                "old_serial": current.serial,
                "new_serial": new.serial,
                "issuer": new.issuer_ca,
                "rekey": rekey,
                "forced": forced,
                "proof": proof.kind(),
                "not_after": new.not_after,
                "fingerprint_sha256": new.fingerprint_sha256,
            }))
            .source(source),
        );
        self.store.commit(change).await.map_err(|e| match e {
            StoreError::Conflict(Conflict::StateChanged { entity, .. })
                if entity.starts_with("renewal allowance") =>
            {
                LifecycleError::OutsideRenewalWindow { opens_in_days: 0 }
            }
            other => other.into(),
        })?;
        if let Some(m) = &self.metrics {
            m.ops
                .certificate_renewals
                .with_label_values(&[&new.issuer_ca])
                .inc();
        }
        let chain_pem = self.issuer(&new.issuer_ca)?.chain_pem.clone();
        Ok(Renewed {
            renewal: RenewalHint::new(new.not_after, window, now),
            certificate: new,
            previous_serial: current.serial,
            rekey,
            forced,
            chain_pem,
        })
    }

    /// The renewal hint for `cert`, a certificate of a device in `group`,
    /// as of `now`; `None` when the group or its profile is gone from the
    /// policies (then no window is known).
    pub fn renewal_hint(
        &self,
        group: &str,
        cert: &CertificateRecord,
        now: i64,
    ) -> Option<RenewalHint> {
        renewal_window_secs(&self.policies(), group)
            .map(|w| RenewalHint::new(cert.not_after, w, now))
    }

    /// The renewal hint for the device's current certificate ([`Self::current_certificate`]);
    /// `None` when the device, its current certificate or its window is unknown.
    /// Only a store failure is an error.
    pub async fn device_renewal_hint(
        &self,
        device_id: Uuid,
        now: i64,
    ) -> Result<Option<RenewalHint>, LifecycleError> {
        let Some(device) = self.store.get_device(device_id).await? else {
            return Ok(None);
        };
        match self.current_certificate(device_id, now).await {
            Ok(cert) => Ok(self.renewal_hint(&device.group, &cert, now)),
            Err(LifecycleError::Store(e)) => Err(LifecycleError::Store(e)),
            Err(_) => Ok(None),
        }
    }
}

fn device_usable(status: DeviceStatus) -> Result<(), LifecycleError> {
    match status {
        DeviceStatus::Active => Ok(()),
        DeviceStatus::Suspended => Err(LifecycleError::DeviceSuspended),
        DeviceStatus::Revoked => Err(LifecycleError::DeviceRevoked),
    }
}

/// [`spki_sha256`] of a certificate's key, for rows stored before schema v5.
fn certificate_spki_hash(cert_der: &[u8]) -> Result<String, LifecycleError> {
    let cert = x509_cert::Certificate::from_der(cert_der)
        .map_err(|e| LifecycleError::Ca(super::CaError::Encoding(e)))?;
    let spki = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| LifecycleError::Ca(super::CaError::Encoding(e)))?;
    Ok(spki_sha256(&spki))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proof_message_is_fixed_layout() {
        let id = Uuid::parse_str("0190f1c2-0000-7000-8000-000000000001").unwrap();
        let m = proof_message(id, &[7u8; 32], b"csr");
        assert!(m.starts_with(b"keyward-renew-v1\0"));
        assert_eq!(&m[17..53], id.to_string().as_bytes());
        assert_eq!(m[53], 0);
        assert_eq!(&m[54..86], &[7u8; 32]);
        assert_eq!(m.len(), 86 + 32);
    }

    #[test]
    fn hints_are_due_from_the_second_the_window_opens() {
        let not_after = 1_900_000_000;
        let w = 30 * 86_400;
        let opens = not_after - w;
        assert_eq!(renewal_window_opens(not_after, w), opens);
        let before = RenewalHint::new(not_after, w, opens - 1);
        assert_eq!((before.due, before.window_opens_at), (false, opens));
        assert!(RenewalHint::new(not_after, w, opens).due);
        assert!(RenewalHint::new(not_after, w, not_after + 1).due);
        assert_eq!(renewal_window_opens(i64::MIN + 1, w), i64::MIN);
        let json = serde_json::to_value(before).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "due": false,
                "window_opens_at": "2030-02-15T17:46:40Z",
                "not_after": "2030-03-17T17:46:40Z",
            })
        );
    }

    #[tokio::test]
    async fn nonces_are_single_use_bound_and_expire() {
        let n = Nonces::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let r = NoncePurpose::Renewal;
        let x = n.issue(a, r, 1000).await.unwrap();
        assert!(matches!(
            n.take(&x, b, r, 1000).await,
            Err(LifecycleError::InvalidNonce)
        ));
        // Taken by the failed attempt above: gone for its owner too.
        assert!(n.take(&x, a, r, 1000).await.is_err());
        let y = n.issue(a, r, 1000).await.unwrap();
        assert!(
            n.take(&y, a, r, 1000 + NONCE_TTL_SECS).await.is_err(),
            "expired"
        );
        let z = n.issue(a, r, 1000).await.unwrap();
        assert!(n.take(&z, a, r, 1001).await.is_ok());
        assert!(n.take(&z, a, r, 1001).await.is_err(), "replay");
        assert!(n.take(&[0u8; 5], a, r, 1001).await.is_err());
        let t = n.issue(a, NoncePurpose::AccessToken, 1000).await.unwrap();
        assert!(
            n.take(&t, a, r, 1001).await.is_err(),
            "a token nonce renews nothing"
        );
        let t = n.issue(a, NoncePurpose::AccessToken, 1000).await.unwrap();
        assert!(n.take(&t, a, NoncePurpose::AccessToken, 1001).await.is_ok());
    }

    /// Two daemons sharing one cache: a nonce handed out by one is taken
    /// once by either, never twice, and a nonce the cache never held (put
    /// failed) is still good on the daemon that issued it.
    #[tokio::test]
    async fn shared_nonces_are_taken_once_across_daemons() {
        let cache: std::sync::Arc<dyn crate::cache::Cache> =
            std::sync::Arc::new(crate::cache::memory::InProcessCache::new(100));
        let (a, b) = (Nonces::default(), Nonces::default());
        a.share(cache.clone());
        b.share(cache.clone());
        let dev = Uuid::now_v7();
        let r = NoncePurpose::Renewal;
        let x = a.issue(dev, r, 1000).await.unwrap();
        assert!(
            b.take(&x, dev, r, 1001).await.is_ok(),
            "taken on the other daemon"
        );
        assert!(
            a.take(&x, dev, r, 1001).await.is_err(),
            "and not again where it was issued"
        );
        let y = b.issue(dev, r, 1000).await.unwrap();
        assert!(b.take(&y, dev, r, 1001).await.is_ok());
        assert!(
            a.take(&y, dev, r, 1001).await.is_err(),
            "replay on another daemon"
        );
        let z = a.issue(dev, NoncePurpose::AccessToken, 1000).await.unwrap();
        assert!(
            b.take(&z, dev, r, 1001).await.is_err(),
            "bound to its purpose"
        );
        assert!(
            a.take(&z, dev, NoncePurpose::AccessToken, 1001)
                .await
                .is_err(),
            "used up by the refused try"
        );
        // Not in the cache (as if the put had failed): the issuer's own copy answers.
        let unshared = Nonces::default();
        let w = unshared.issue(dev, r, 1000).await.unwrap();
        unshared.share(cache.clone());
        assert!(unshared.take(&w, dev, r, 1001).await.is_ok());
        assert_eq!(decode_nonce(&encode_nonce(dev, r, 7)), Some((dev, r, 7)));
        assert_eq!(decode_nonce(&[0u8; 24]), None);
    }
}
