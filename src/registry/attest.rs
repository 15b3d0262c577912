//! Attestation: what a registering device proves, and the group that proof
//! puts it in. The group follows from the proof (the token's group, the
//! manufacturer CA, the JWT issuer); only groups whose attestation is
//! `none` are chosen by name.

use super::attestation::jwt::{JwtError, JwtVerifier};
use super::attestation::x509::{self, ManufacturerVerifier, VerifiedManufacturer, X509AttestError};
use super::{RegistryError, RegistryService};
use crate::model::{AttestationMethod, DeviceStatus, EnrollmentTokenKind};
use crate::policy::{AttestationPolicy, GroupPolicy, JwtAttestation};
use crate::store::{EnrollmentTokenRecord, Write};
use secrecy::SecretString;
use serde_json::json;
use uuid::Uuid;

/// The proof a device presents with its registration.
#[derive(Clone)]
pub enum Evidence {
    None,
    /// A bootstrap token (`kwb_…`) minted for a group.
    BootstrapToken(SecretString),
    /// A JWT from a trusted issuer (compact serialisation).
    Jwt(String),
    /// A manufacturer certificate chain (leaf first, DER) and a signature
    /// with its key over [`super::attestation::x509::possession_message`]
    /// for a nonce from `GET /v1/registrations/nonce`.
    X509 {
        chain_der: Vec<Vec<u8>>,
        nonce: String,
        signature: Vec<u8>,
    },
    /// A reclaim code (`kwc_…`) an admin issued for this device.
    Reclaim {
        device_id: Uuid,
        code: SecretString,
    },
}

impl std::fmt::Debug for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets stay out of logs: only the method is shown.
        write!(f, "Evidence({})", self.method())
    }
}

impl Evidence {
    pub fn method(&self) -> AttestationMethod {
        match self {
            Self::None => AttestationMethod::None,
            Self::BootstrapToken(_) => AttestationMethod::BootstrapToken,
            Self::Jwt(_) => AttestationMethod::Jwt,
            Self::X509 { .. } => AttestationMethod::X509,
            Self::Reclaim { .. } => AttestationMethod::Reclaim,
        }
    }
}

/// What an attestation established.
pub(super) struct Attested {
    pub group: GroupPolicy,
    pub method: AttestationMethod,
    /// The identity the proof names (manufacturer certificate, JWT claim),
    /// bound to one device for good.
    pub identity: Option<String>,
    /// The device this identity (or reclaim code) already names.
    pub device_id: Option<Uuid>,
    pub token: Option<EnrollmentTokenRecord>,
    /// Audited and recorded on the registration.
    pub details: serde_json::Value,
    /// Checked and applied inside the registration's commit (a token use, a
    /// JWT id): a race cannot use one proof twice.
    pub guards: Vec<Write>,
}

impl RegistryService {
    /// Checks `evidence` and decides the group. `requested` is the group the
    /// caller named, if any: required for `none` groups, and for attested
    /// ones it must agree with what the proof says.
    pub(super) async fn attest(
        &self,
        requested: Option<&str>,
        evidence: &Evidence,
        csr_der: &[u8],
    ) -> Result<Attested, RegistryError> {
        let agree = |group: &GroupPolicy| match requested {
            Some(r) if r != group.name => Err(RegistryError::GroupMismatch {
                requested: r.to_string(),
                attested: group.name.clone(),
            }),
            _ => Ok(()),
        };
        match evidence {
            Evidence::None => {
                let group = self.group(requested.unwrap_or("default"))?;
                if group.method() != AttestationMethod::None {
                    return Err(RegistryError::AttestationRequired {
                        group: group.name.clone(),
                        method: group.method(),
                    });
                }
                Ok(Attested {
                    group,
                    method: AttestationMethod::None,
                    identity: None,
                    device_id: None,
                    token: None,
                    details: json!({}),
                    guards: Vec::new(),
                })
            }
            Evidence::BootstrapToken(secret) => {
                let token = self
                    .find_token(secret, EnrollmentTokenKind::Bootstrap)
                    .await?;
                let name = token.group.clone().unwrap_or_default();
                let group = self.group(&name)?;
                if group.method() != AttestationMethod::BootstrapToken {
                    return Err(RegistryError::TokenInvalid(
                        "for a group that no longer accepts bootstrap tokens",
                    ));
                }
                agree(&group)?;
                Ok(Attested {
                    method: AttestationMethod::BootstrapToken,
                    identity: None,
                    device_id: None,
                    details: json!({ "token": token.id, "minted_by": token.created_by }),
                    guards: vec![Write::ConsumeEnrollmentToken {
                        id: token.id,
                        kind: EnrollmentTokenKind::Bootstrap,
                        at: self.clock.now().unix_timestamp(),
                    }],
                    token: Some(token),
                    group,
                })
            }
            Evidence::Reclaim { device_id, code } => {
                let token = self.find_token(code, EnrollmentTokenKind::Reclaim).await?;
                if token.device_id != Some(*device_id) {
                    return Err(RegistryError::ReclaimWrongDevice);
                }
                let device = self
                    .store
                    .get_device(*device_id)
                    .await?
                    .ok_or(RegistryError::DeviceNotFound)?;
                if device.status != DeviceStatus::Active {
                    return Err(RegistryError::DeviceNotActive(device.status));
                }
                let group = self.group(&device.group)?;
                agree(&group)?;
                Ok(Attested {
                    method: AttestationMethod::Reclaim,
                    identity: None,
                    device_id: Some(*device_id),
                    details: json!({ "reclaim_code": token.id, "minted_by": token.created_by }),
                    guards: vec![Write::ConsumeEnrollmentToken {
                        id: token.id,
                        kind: EnrollmentTokenKind::Reclaim,
                        at: self.clock.now().unix_timestamp(),
                    }],
                    token: Some(token),
                    group,
                })
            }
            Evidence::Jwt(token) => self.attest_jwt(token, agree).await,
            Evidence::X509 {
                chain_der,
                nonce,
                signature,
            } => {
                self.attest_x509(chain_der, nonce, signature, csr_der, agree)
                    .await
            }
        }
    }

    async fn attest_jwt(
        &self,
        token: &str,
        agree: impl Fn(&GroupPolicy) -> Result<(), RegistryError>,
    ) -> Result<Attested, RegistryError> {
        let (issuer, audiences) = JwtVerifier::peek_issuer_audience(token).map_err(jwt_error)?;
        let attestors = self.attestors();
        // Groups are unambiguous by (issuer, audience) (checked at load).
        let Some((group_name, policy, verifier)) = attestors
            .jwt
            .iter()
            .find(|(_, p, _)| p.issuer == issuer && audiences.iter().any(|a| a == &p.audience))
        else {
            // A trusted issuer's token for someone else is a wrong audience.
            if attestors.jwt.iter().any(|(_, p, _)| p.issuer == issuer) {
                return Err(jwt_error(JwtError::WrongAudience));
            }
            return Err(RegistryError::Attestation {
                code: "jwt_unknown_issuer",
                message: "no enrollment group trusts this JWT's issuer".into(),
            });
        };
        let now = self.clock.now().unix_timestamp();
        let verified = verifier.verify(token, now).await.map_err(jwt_error)?;
        let group = self.group(group_name)?;
        agree(&group)?;
        let identity = format!("jwt:{}:{}", verified.issuer, verified.device_claim);
        let device_id = self.store.device_for_identity(&identity).await?;
        Ok(Attested {
            method: AttestationMethod::Jwt,
            details: json!({
                "issuer": verified.issuer,
                "jti": verified.jti,
                "kid": verified.kid,
                "algorithm": verified.algorithm,
                "device_claim": policy.device_claim,
                "device_claim_value": verified.device_claim,
            }),
            guards: vec![Write::RecordJwtId {
                issuer: verified.issuer.clone(),
                jti: verified.jti.clone(),
                // Kept past exp by the leeway: the token is accepted that long.
                expires_at: verified.expires_at + i64::from(policy.leeway_seconds),
                at: now,
            }],
            identity: Some(identity),
            device_id,
            token: None,
            group,
        })
    }

    async fn attest_x509(
        &self,
        chain_der: &[Vec<u8>],
        nonce: &str,
        signature: &[u8],
        csr_der: &[u8],
        agree: impl Fn(&GroupPolicy) -> Result<(), RegistryError>,
    ) -> Result<Attested, RegistryError> {
        let now = self.clock.now().unix_timestamp();
        let attestors = self.attestors();
        // Every x509 group checks the chain; the most specific acceptance wins.
        let mut best: Option<(&str, VerifiedManufacturer)> = None;
        let mut refusal: Option<X509AttestError> = None;
        // A group whose files are unusable cannot say "unknown CA".
        let mut unusable = false;
        for (name, verifier) in &attestors.x509 {
            match verifier.verify_chain(chain_der, now) {
                Ok(v) => {
                    if best
                        .as_ref()
                        .is_none_or(|(_, b)| v.specificity > b.specificity)
                    {
                        best = Some((name.as_str(), v));
                    }
                }
                Err(e) if !e.is_client_error() => {
                    tracing::error!(group = %name, error = %e, "manufacturer attestation policy unusable");
                    unusable = true;
                }
                Err(e) => {
                    // The most telling refusal: anything beats "unknown CA".
                    if refusal.as_ref().is_none_or(|r| {
                        r.code() == "manufacturer_unknown_ca" && e.code() != r.code()
                    }) {
                        refusal = Some(e);
                    }
                }
            }
        }
        if best.is_none() && unusable {
            return Err(RegistryError::AttestationUnavailable(
                AttestationMethod::X509,
            ));
        }
        let Some((group_name, verified)) = best else {
            return Err(x509_error(refusal.unwrap_or(X509AttestError::UnknownCa {
                subject: "the presented certificate".into(),
                issuer: "an unknown CA".into(),
            })));
        };
        // The nonce is single-use and short-lived; the signature binds it to
        // this request's CSR.
        if !self.enroll_nonces.take(nonce, now) {
            return Err(RegistryError::Attestation {
                code: "nonce_invalid",
                message: "the nonce is unknown, used or expired; fetch a new one".into(),
            });
        }
        x509::verify_possession(
            &verified.leaf_spki_der,
            &x509::possession_message(nonce, csr_der),
            signature,
        )
        .map_err(x509_error)?;
        let group = self.group(group_name)?;
        agree(&group)?;
        let device_id = self.store.device_for_identity(&verified.identity).await?;
        Ok(Attested {
            method: AttestationMethod::X509,
            details: json!({
                "manufacturer_serial": verified.serial_hex,
                "manufacturer_subject": verified.subject,
                "manufacturer_issuer": verified.issuer,
            }),
            guards: Vec::new(),
            identity: Some(verified.identity),
            device_id,
            token: None,
            group,
        })
    }

    /// A fresh single-use nonce for the manufacturer possession proof.
    pub fn enrollment_nonce(&self) -> Result<(String, i64), RegistryError> {
        let now = self.clock.now().unix_timestamp();
        let nonce = self.enroll_nonces.issue(now)?;
        Ok((nonce, now + NONCE_TTL_SECONDS))
    }
}

fn jwt_error(e: JwtError) -> RegistryError {
    if e.is_client_error() {
        RegistryError::Attestation {
            code: e.code(),
            message: e.to_string(),
        }
    } else {
        tracing::error!(error = %e, "JWT attestation policy unusable");
        RegistryError::AttestationUnavailable(AttestationMethod::Jwt)
    }
}

fn x509_error(e: X509AttestError) -> RegistryError {
    if e.is_client_error() {
        RegistryError::Attestation {
            code: e.code(),
            message: e.to_string(),
        }
    } else {
        tracing::error!(error = %e, "manufacturer attestation policy unusable");
        RegistryError::AttestationUnavailable(AttestationMethod::X509)
    }
}

/// How long an enrollment nonce may be used.
pub const NONCE_TTL_SECONDS: i64 = 300;
/// Outstanding nonces kept at most; past it the oldest are dropped (the
/// nonce route is rate-limited per client as registrations are).
const MAX_NONCES: usize = 100_000;

/// Single-use enrollment nonces of this process.
#[derive(Default)]
pub(super) struct NonceBook(std::sync::Mutex<std::collections::BTreeMap<String, i64>>);

impl NonceBook {
    fn issue(&self, now: i64) -> Result<String, RegistryError> {
        use base64::Engine;
        let bytes = crate::crypto::random_bytes(32)?;
        let nonce = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let mut map = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.retain(|_, exp| *exp > now);
        while map.len() >= MAX_NONCES {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, exp)| **exp)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(nonce.clone(), now + NONCE_TTL_SECONDS);
        Ok(nonce)
    }

    fn take(&self, nonce: &str, now: i64) -> bool {
        let mut map = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        matches!(map.remove(nonce), Some(exp) if exp > now)
    }
}

/// The verifiers the policies call for, built (files read, keys parsed)
/// when the policies load: a reload that cannot build them changes nothing.
#[derive(Default)]
pub(super) struct Attestors {
    /// (group, policy, verifier) of every `jwt` group.
    jwt: Vec<(String, JwtAttestation, JwtVerifier)>,
    /// (group, verifier) of every `x509` group.
    x509: Vec<(String, ManufacturerVerifier)>,
}

impl Attestors {
    pub(super) fn build(policies: &crate::policy::Policies) -> Result<Self, RegistryError> {
        let mut out = Self::default();
        let mut http: Option<reqwest::Client> = None;
        for g in policies.groups.values() {
            match &g.attestation {
                AttestationPolicy::Jwt(j) => {
                    let client = match &http {
                        Some(c) => c.clone(),
                        None => {
                            let _ = rustls::crypto::ring::default_provider().install_default();
                            let c = reqwest::Client::builder()
                                .timeout(std::time::Duration::from_secs(10))
                                .build()
                                .map_err(|e| {
                                    RegistryError::PolicyInvalid(format!("HTTP client: {e}"))
                                })?;
                            http = Some(c.clone());
                            c
                        }
                    };
                    let file = j.jwks_file.as_ref().map(|f| policies.resolve(f));
                    let v = JwtVerifier::new(j, file, client).map_err(|e| {
                        RegistryError::PolicyInvalid(format!("group `{}`: {e}", g.name))
                    })?;
                    out.jwt.push((g.name.clone(), j.clone(), v));
                }
                AttestationPolicy::X509(x) => {
                    let crl = x.manufacturer_crl.as_ref().map(|p| policies.resolve(p));
                    let v = ManufacturerVerifier::new(
                        x,
                        &policies.resolve(&x.manufacturer_ca),
                        crl.as_deref(),
                    )
                    .map_err(|e| {
                        RegistryError::PolicyInvalid(format!("group `{}`: {e}", g.name))
                    })?;
                    out.x509.push((g.name.clone(), v));
                }
                AttestationPolicy::None | AttestationPolicy::BootstrapToken => {}
            }
        }
        Ok(out)
    }
}

impl RegistryService {
    pub(super) fn build_attestors(
        &self,
        policies: &crate::policy::Policies,
    ) -> Result<Attestors, RegistryError> {
        Attestors::build(policies)
    }

    pub(super) fn set_attestors(&self, a: Attestors) {
        let mut g = match self.attestors.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *g = std::sync::Arc::new(a);
    }

    pub(super) fn attestors(&self) -> std::sync::Arc<Attestors> {
        match self.attestors.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}
