//! Registry errors: typed, each with a stable code; statuses are chosen in
//! `http::error` only.

use crate::ca::CaError;
use crate::ca::csr::CsrError;
use crate::crypto::RandomError;
use crate::model::{AttestationMethod, DeviceStatus, KeyAlgorithm, RegistrationStatus, Role};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "`{field}` must be 1-{max} printable characters (no control, bidi-override or zero-width characters)"
    )]
    InvalidField { field: &'static str, max: usize },
    #[error("enrollment group `{0}` does not exist")]
    UnknownGroup(String),
    #[error("certificate profile `{0}` does not exist")]
    UnknownProfile(String),
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error("key algorithm {algorithm} is not allowed for group `{group}` (allowed: {allowed})")]
    AlgorithmNotAllowed {
        algorithm: KeyAlgorithm,
        group: String,
        allowed: String,
    },
    #[error("group `{group}` already has {limit} pending registrations (its cap); retry later")]
    PendingLimit { group: String, limit: u32 },
    #[error("registration not found")]
    NotFound,
    #[error("registration is {0}, not pending")]
    NotPending(RegistrationStatus),
    #[error("registration expired before it was decided")]
    Expired,
    #[error("this admin already decided this registration")]
    AlreadyDecided,
    #[error("the registration kept changing under concurrent decisions; reload and retry")]
    ConcurrentDecision,
    #[error("role {have} cannot decide registrations of group `{group}` (needs {need})")]
    ForbiddenRole {
        have: Role,
        need: Role,
        group: String,
    },
    #[error("separation of duties: the admin who submitted a registration cannot decide it")]
    SelfApproval,
    #[error("the deciding admin account is disabled")]
    AdminDisabled,
    #[error("registration is {0}; credentials exist only once it is issued")]
    NotIssued(RegistrationStatus),
    #[error(
        "credentials were confirmed by the device or the re-fetch window closed; they are not delivered again"
    )]
    CredentialsGone,
    #[error("credentials were already confirmed")]
    AlreadyConfirmed,
    /// The CSR's public key belongs to a revoked or suspended device, or to
    /// a revoked certificate: the identity cannot register again.
    #[error(
        "this public key belongs to a revoked or suspended device, or to a revoked certificate"
    )]
    KeyRevoked,
    #[error("registration secret missing or wrong")]
    Unauthorized,
    #[error("policy not reloaded: {0}")]
    PolicyInvalid(String),
    #[error("invalid token request: {0}")]
    InvalidTokenRequest(String),
    #[error("device not found")]
    DeviceNotFound,
    #[error("the device is {0}; only an active device can do this")]
    DeviceNotActive(DeviceStatus),
    #[error("enrollment token not found")]
    TokenNotFound,
    #[error("enrollment token already revoked")]
    TokenAlreadyRevoked,
    /// Deliberately vague about which part failed beyond the reason.
    #[error("bootstrap token or reclaim code refused: {0}")]
    TokenInvalid(&'static str),
    #[error("the attestation puts this device in group `{attested}`, not `{requested}`")]
    GroupMismatch { requested: String, attested: String },
    #[error("group `{group}` requires attestation by {method}")]
    AttestationRequired {
        group: String,
        method: AttestationMethod,
    },
    #[error("attestation method {0} is not available in this build")]
    AttestationUnavailable(AttestationMethod),
    #[error("this reclaim code was issued for another device")]
    ReclaimWrongDevice,
    #[error("this bootstrap token is for the device named `{0}`")]
    TokenDeviceName(String),
    #[error(
        "separation of duties: the admin who minted the token a registration used cannot decide it"
    )]
    MinterApproval,
    #[error("group `{0}` generates keys on the server: send no CSR (optionally an age_recipient)")]
    CsrNotExpected(String),
    #[error("group `{0}` needs a CSR (`csr`)")]
    CsrRequired(String),
    #[error("age_recipient applies only to groups whose keys are generated on the server")]
    RecipientNotExpected,
    #[error("{message}")]
    Attestation { code: &'static str, message: String },
    #[error("{message}")]
    Delivery { code: &'static str, message: String },
    #[error(transparent)]
    KeyStore(#[from] crate::keystore::KeyStoreError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Random(#[from] RandomError),
}

impl RegistryError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidField { .. } => "invalid_field",
            Self::UnknownGroup(_) => "unknown_group",
            Self::UnknownProfile(_) => "unknown_profile",
            Self::Csr(c) => c.code(),
            Self::AlgorithmNotAllowed { .. } => "key_algorithm_not_allowed",
            Self::PendingLimit { .. } => "pending_limit",
            Self::NotFound => "not_found",
            Self::NotPending(_) => "not_pending",
            Self::Expired => "registration_expired",
            Self::AlreadyDecided => "already_decided",
            Self::ConcurrentDecision => "concurrent_decision",
            Self::ForbiddenRole { .. } => "forbidden_role",
            Self::SelfApproval => "self_approval",
            Self::AdminDisabled => "admin_disabled",
            Self::NotIssued(_) => "not_issued",
            Self::CredentialsGone => "credentials_already_delivered",
            Self::AlreadyConfirmed => "already_confirmed",
            Self::Unauthorized => "unauthorized",
            Self::KeyRevoked => "key_revoked",
            Self::PolicyInvalid(_) => "policy_invalid",
            Self::InvalidTokenRequest(_) => "invalid_token_request",
            Self::DeviceNotFound => "device_not_found",
            Self::DeviceNotActive(_) => "device_not_active",
            Self::TokenNotFound => "not_found",
            Self::TokenAlreadyRevoked => "already_revoked",
            Self::TokenInvalid(_) => "enrollment_token_invalid",
            Self::GroupMismatch { .. } => "group_mismatch",
            Self::AttestationRequired { .. } => "attestation_required",
            Self::AttestationUnavailable(_) => "attestation_unavailable",
            Self::ReclaimWrongDevice => "reclaim_code_wrong_device",
            Self::TokenDeviceName(_) => "device_name_mismatch",
            Self::MinterApproval => "token_minter_cannot_approve",
            Self::CsrNotExpected(_) => "csr_not_expected",
            Self::CsrRequired(_) => "csr_required",
            Self::RecipientNotExpected => "age_recipient_not_expected",
            Self::Attestation { code, .. } | Self::Delivery { code, .. } => code,
            Self::KeyStore(k) => k.code(),
            Self::Ca(c) => c.code(),
            Self::Store(s) => s.code(),
            Self::Random(_) => "internal",
        }
    }
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        match e {
            // A conflict the service did not anticipate is still a conflict,
            // never a 5xx: report it as a concurrent change. (The pending cap
            // is mapped where the group is known, in `submit`.)
            StoreError::Conflict(_) => Self::ConcurrentDecision,
            other => Self::Store(other),
        }
    }
}

impl From<crate::ca::keys::KeyLifecycleError> for RegistryError {
    fn from(e: crate::ca::keys::KeyLifecycleError) -> Self {
        match e {
            crate::ca::keys::KeyLifecycleError::KeyStore(k) => Self::KeyStore(k),
            crate::ca::keys::KeyLifecycleError::Store(s) => Self::Store(s),
        }
    }
}
