//! Admin and authentication errors, typed, each with a stable code.

use crate::crypto::RandomError;
use crate::model::{AdminRequestStatus, Role};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("missing admin token")]
    Missing,
    #[error("admin token not recognised")]
    BadToken,
    #[error("admin account is disabled")]
    Disabled,
    #[error("role {have} cannot do this (needs {need})")]
    Forbidden { have: Role, need: Role },
    #[error("`name` must be 1-64 characters of letters, digits, '.', '_', '-', '@'")]
    BadName,
    #[error("an admin named `{0}` already exists")]
    Duplicate(String),
    #[error("an open invitation for `{0}` already exists")]
    DuplicateInvitation(String),
    #[error("a role change for `{0}` is already waiting for approval")]
    DuplicateRoleChange(String),
    #[error("no admin `{0}`")]
    NotFound(String),
    #[error("an admin cannot {0} itself; ask another admin")]
    SelfAction(&'static str),
    #[error("that admin is already disabled")]
    AlreadyDisabled,
    #[error("refusing to leave no active admin of role admin")]
    LastActiveAdmin,
    #[error("`{name}` already has role {role}")]
    SameRole { name: String, role: Role },
    #[error("admin request not found")]
    RequestNotFound,
    #[error("admin request is {0}, not pending")]
    RequestNotPending(AdminRequestStatus),
    #[error("admin request expired")]
    RequestExpired,
    #[error(
        "separation of duties: the admin who requested a change cannot approve it; another admin must"
    )]
    SelfApproval,
    #[error("invitation code or approval code missing, wrong, used or expired")]
    BadInvitation,
    #[error("the admin roster changed concurrently; reload and retry")]
    Concurrent,
    #[error("break-glass is for when no second active admin exists; two or more are active")]
    BreakGlassRefused,
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Random(#[from] RandomError),
}

impl AdminError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing | Self::BadToken | Self::Disabled => "unauthorized",
            Self::Forbidden { .. } => "forbidden_role",
            Self::BadName => "invalid_field",
            Self::Duplicate(_) => "duplicate",
            Self::DuplicateInvitation(_) => "duplicate_invitation",
            Self::DuplicateRoleChange(_) => "duplicate_request",
            Self::NotFound(_) | Self::RequestNotFound => "not_found",
            Self::SelfAction(_) => "self_action",
            Self::AlreadyDisabled => "already_disabled",
            Self::LastActiveAdmin => "last_active_admin",
            Self::SameRole { .. } => "same_role",
            Self::RequestNotPending(_) => "not_pending",
            Self::RequestExpired => "request_expired",
            Self::SelfApproval => "self_approval",
            Self::BadInvitation => "invalid_invitation",
            Self::Concurrent => "concurrent_change",
            Self::BreakGlassRefused => "break_glass_refused",
            Self::Store(s) => s.code(),
            Self::Random(_) => "internal",
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(crate::store::Conflict::LastActiveAdmin) => Self::LastActiveAdmin,
            StoreError::Conflict(_) => Self::Concurrent,
            other => Self::Store(other),
        }
    }
}
