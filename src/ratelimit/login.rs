//! Admin authentication guarded per source: failed logins limited and handed to the audit.
//!
//! A decorator around `AdminService::authenticate`.
//!
//! The rule: failures (an unknown token, a disabled admin's token) are
//! counted per source against `admin_login_failures_per_source` per
//! `admin_login_failures_window_secs`. Once a source is over the limit,
//! every admin-authenticated request from it is refused with 429 and
//! `Retry-After` before its token is even looked at, a good token included:
//! a good token from a source that is guessing is not evidence of anything,
//! and checking it would turn the refusal into an oracle. Requests that come
//! with no token at all are answered 401 and are not counted (nothing was
//! guessed). Concurrent failures that were all admitted by the same look at
//! the bucket may overshoot the limit by the number in flight.

use super::failures::{FailureReason, LoginFailureLog};
use super::{Limit, LimitError, LimitKind, RateLimiter, key, source_of};
use crate::auth::admins::{AdminError, AdminService};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::store::AdminRecord;
use std::net::IpAddr;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Limited(#[from] LimitError),
}

impl LoginError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Admin(a) => a.code(),
            Self::Limited(l) => l.code(),
        }
    }
}

pub struct GuardedLogin {
    admins: Arc<AdminService>,
    limiter: Arc<dyn RateLimiter>,
    limit: Limit,
    failures: Arc<LoginFailureLog>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

impl GuardedLogin {
    pub fn new(
        admins: Arc<AdminService>,
        limiter: Arc<dyn RateLimiter>,
        limit: Limit,
        failures: Arc<LoginFailureLog>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            admins,
            limiter,
            limit,
            failures,
            clock,
            metrics,
        }
    }

    /// Refuses (429) a source over its failure limit, without counting;
    /// `record` says whether the refusal is itself a failure to audit (a
    /// presented credential, not a bare request).
    async fn refuse_if_over(&self, key: &str, src: &str, record: bool) -> Result<(), LoginError> {
        let looked = self
            .limiter
            .peek(key, self.limit)
            .await
            .map_err(LimitError::from)?;
        if looked.allowed {
            return Ok(());
        }
        self.metrics
            .rate_limited(LimitKind::AdminLoginFailures.as_str());
        if record {
            self.failures
                .record(src, FailureReason::RateLimited, self.clock.now());
        }
        Err(LimitError::Exceeded {
            kind: LimitKind::AdminLoginFailures,
            retry_after: looked.retry_after,
        }
        .into())
    }

    /// Redeems an invitation under the same per-source failure limit as
    /// admin tokens: a source guessing invitation codes is refused (429) like
    /// one guessing tokens, and its failures are audited in the same bounded,
    /// aggregated `admin.login_failed` events (reason `invalid_invitation`).
    pub async fn redeem(
        &self,
        invitation_code: &str,
        approval_code: Option<&str>,
        source: Option<IpAddr>,
    ) -> Result<(AdminRecord, secrecy::SecretString), LoginError> {
        let src = source_of(source);
        let key = key(LimitKind::AdminLoginFailures, &src);
        self.refuse_if_over(&key, &src, true).await?;
        let address = source.map(|ip| ip.to_string());
        match self
            .admins
            .redeem(invitation_code, approval_code, address.as_deref())
            .await
        {
            Err(AdminError::BadInvitation) => {
                self.failures
                    .record(&src, FailureReason::InvalidInvitation, self.clock.now());
                if let Err(le) = self.limiter.check(&key, self.limit).await {
                    tracing::error!(error = %le, "could not count a refused invitation");
                }
                Err(AdminError::BadInvitation.into())
            }
            other => Ok(other?),
        }
    }

    /// Resolves a bearer token presented from `source`.
    pub async fn authenticate(
        &self,
        token: Option<&str>,
        source: Option<IpAddr>,
    ) -> Result<AdminRecord, LoginError> {
        let src = source_of(source);
        let key = key(LimitKind::AdminLoginFailures, &src);
        self.refuse_if_over(&key, &src, token.is_some()).await?;
        match self.admins.authenticate(token).await {
            Ok(admin) => Ok(admin),
            Err(e) => {
                let reason = match &e {
                    AdminError::BadToken => Some(FailureReason::UnknownToken),
                    AdminError::Disabled => Some(FailureReason::AccountDisabled),
                    _ => None,
                };
                if matches!(e, AdminError::Missing) || reason.is_some() {
                    self.metrics.admin_auth_failures.inc();
                }
                if let Some(reason) = reason {
                    self.failures.record(&src, reason, self.clock.now());
                    // The failure is already refused; a limiter that cannot
                    // count it only loosens the limit, so it is logged, not
                    // turned into a 503.
                    if let Err(le) = self.limiter.check(&key, self.limit).await {
                        tracing::error!(error = %le, "could not count a failed admin login");
                    }
                }
                Err(e.into())
            }
        }
    }
}
