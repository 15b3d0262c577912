//! Errors of the certificate lifecycle (revocation, suspension, renewal):
//! typed, each with a stable code; statuses are chosen in `http::error` only.

use super::CaError;
use super::csr::CsrError;
use crate::model::{DeviceStatus, RevocationReason};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("device not found")]
    DeviceNotFound,
    #[error("certificate not found")]
    CertificateNotFound,
    #[error("the device is revoked; revocation is final")]
    DeviceRevoked,
    #[error("the device is suspended; resume it first")]
    DeviceSuspended,
    #[error("the device is already suspended")]
    AlreadySuspended,
    #[error("the device is {0}, not suspended")]
    NotSuspended(DeviceStatus),
    /// `certificate-hold` suspends; devices are suspended with `suspend`.
    #[error("reason `{0}` cannot revoke a device (suspend it instead)")]
    ReasonNotAllowed(RevocationReason),
    #[error("the certificate cannot be revoked with this reason from its current state ({0})")]
    CertificateNotRevocable(String),
    #[error("the certificate is not on hold")]
    NotOnHold,
    #[error("`{field}` must be 1-{max} printable characters")]
    InvalidField { field: &'static str, max: usize },
    #[error("enrollment group `{0}` of this device is no longer in the policy")]
    UnknownGroup(String),
    // ---- renewal
    #[error("the device has no certificate that could be renewed")]
    NoCurrentCertificate,
    #[error("the device's current certificate has expired; register again")]
    CertificateExpired,
    #[error("the device's certificate is revoked; it cannot renew")]
    CertificateRevoked,
    #[error("the certificate presented is not this device's current certificate")]
    NotCurrentCertificate,
    #[error("the nonce is unknown, used, expired or issued for another device")]
    InvalidNonce,
    #[error("the renewal signature does not verify with the current certificate's key")]
    ProofSignatureInvalid,
    #[error("the current certificate's key algorithm cannot sign a renewal proof")]
    ProofAlgorithmUnsupported,
    #[error(
        "renewal opens {opens_in_days} day(s) before expiry (profile renewal window); ask an admin for `allow-renewal`"
    )]
    OutsideRenewalWindow { opens_in_days: u32 },
    #[error("the CSR names a different device (subject CN or SAN `{0}`)")]
    CsrDeviceMismatch(String),
    #[error(
        "this public key belongs to a revoked or suspended device, or to a revoked certificate"
    )]
    KeyRevoked,
    #[error("another renewal or a revocation of this certificate happened at the same time; retry")]
    ConcurrentChange,
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Random(#[from] crate::crypto::RandomError),
}

impl LifecycleError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::DeviceNotFound => "device_not_found",
            Self::CertificateNotFound => "certificate_not_found",
            Self::DeviceRevoked => "device_revoked",
            Self::DeviceSuspended => "device_suspended",
            Self::AlreadySuspended => "already_suspended",
            Self::NotSuspended(_) => "not_suspended",
            Self::ReasonNotAllowed(_) => "reason_not_allowed",
            Self::CertificateNotRevocable(_) => "certificate_not_revocable",
            Self::NotOnHold => "not_on_hold",
            Self::InvalidField { .. } => "invalid_field",
            Self::UnknownGroup(_) => "unknown_group",
            Self::NoCurrentCertificate => "no_current_certificate",
            Self::CertificateExpired => "certificate_expired",
            Self::CertificateRevoked => "certificate_revoked",
            Self::NotCurrentCertificate => "not_current_certificate",
            Self::InvalidNonce => "invalid_nonce",
            Self::ProofSignatureInvalid => "proof_signature_invalid",
            Self::ProofAlgorithmUnsupported => "proof_algorithm_unsupported",
            Self::OutsideRenewalWindow { .. } => "outside_renewal_window",
            Self::CsrDeviceMismatch(_) => "csr_device_mismatch",
            Self::KeyRevoked => "key_revoked",
            Self::ConcurrentChange => "concurrent_change",
            Self::Csr(c) => c.code(),
            Self::Ca(c) => c.code(),
            Self::Store(s) => s.code(),
            Self::Random(_) => "internal",
        }
    }
}

impl From<StoreError> for LifecycleError {
    fn from(e: StoreError) -> Self {
        match e {
            // A conflict the service did not map where it knew more is still
            // a conflict, never a 5xx.
            StoreError::Conflict(_) => Self::ConcurrentChange,
            other => Self::Store(other),
        }
    }
}
