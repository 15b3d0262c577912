//! Attestation: what a registering device proves, and the group that proof
//! puts it in. The group follows from the proof (the token's group, the
//! manufacturer CA, the JWT issuer); only groups whose attestation is
//! `none` are chosen by name.

use super::{RegistryError, RegistryService};
use crate::model::{AttestationMethod, DeviceStatus, EnrollmentTokenKind};
use crate::policy::GroupPolicy;
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
        _token: &str,
        _agree: impl Fn(&GroupPolicy) -> Result<(), RegistryError>,
    ) -> Result<Attested, RegistryError> {
        Err(RegistryError::AttestationUnavailable(
            AttestationMethod::Jwt,
        ))
    }

    async fn attest_x509(
        &self,
        _chain_der: &[Vec<u8>],
        _nonce: &str,
        _signature: &[u8],
        _csr_der: &[u8],
        _agree: impl Fn(&GroupPolicy) -> Result<(), RegistryError>,
    ) -> Result<Attested, RegistryError> {
        Err(RegistryError::AttestationUnavailable(
            AttestationMethod::X509,
        ))
    }
}

/// The verifiers the policies call for, built (files read, keys parsed)
/// when the policies load: a reload that cannot build them changes nothing.
#[derive(Default)]
pub(super) struct Attestors {}

impl Attestors {
    pub(super) fn build(_policies: &crate::policy::Policies) -> Result<Self, RegistryError> {
        Ok(Self::default())
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

    #[allow(dead_code)]
    pub(super) fn attestors(&self) -> std::sync::Arc<Attestors> {
        match self.attestors.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}
