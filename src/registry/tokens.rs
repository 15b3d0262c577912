//! Bootstrap tokens and reclaim codes: admin-minted enrollment secrets.
//!
//! A secret is shown once when minted; only its HMAC (the same peppered
//! hasher as admin tokens) is stored. Bootstrap tokens (`kwb_…`) attest a
//! registration to one group and count their uses; reclaim codes (`kwc_…`)
//! let one existing device bind its identity to a new key, once.

use super::{RegistryError, RegistryService};
use crate::audit::AuditDraft;
use crate::crypto::new_secret;
use crate::model::{EnrollmentTokenKind, valid_display_text};
use crate::store::{
    AdminRecord, Change, Conflict, DeviceStatus, EnrollmentTokenFilter, EnrollmentTokenRecord,
    Page, PageRequest, StoreError, Write,
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use uuid::Uuid;

pub const BOOTSTRAP_PREFIX: &str = "kwb_";
pub const RECLAIM_PREFIX: &str = "kwc_";

/// Longest a token may live: a week.
pub const MAX_TTL_SECONDS: i64 = 7 * 86_400;
/// Most uses one bootstrap token may allow.
pub const MAX_USES: u32 = 100_000;

/// What an admin asks for.
#[derive(Debug, Clone)]
pub enum TokenRequest {
    Bootstrap {
        group: String,
        uses: u32,
        ttl_seconds: i64,
        device_name: Option<String>,
    },
    Reclaim {
        device_id: Uuid,
        ttl_seconds: i64,
    },
}

pub struct Minted {
    pub record: EnrollmentTokenRecord,
    /// Shown once.
    pub secret: SecretString,
}

impl RegistryService {
    /// Mints a bootstrap token or a reclaim code (audited; the secret is
    /// not in the event).
    pub async fn mint_token(
        &self,
        admin: &AdminRecord,
        req: TokenRequest,
        source: Option<&str>,
    ) -> Result<Minted, RegistryError> {
        let now = self.clock.now().unix_timestamp();
        let check_ttl = |ttl: i64| {
            if ttl <= 0 || ttl > MAX_TTL_SECONDS {
                Err(RegistryError::InvalidTokenRequest(format!(
                    "ttl must be between 1 second and {} hours",
                    MAX_TTL_SECONDS / 3600
                )))
            } else {
                Ok(ttl)
            }
        };
        let (kind, group, device_id, device_name, uses, ttl, prefix) = match req {
            TokenRequest::Bootstrap {
                group,
                uses,
                ttl_seconds,
                device_name,
            } => {
                let g = self.group(&group)?;
                if g.method() != crate::model::AttestationMethod::BootstrapToken {
                    return Err(RegistryError::InvalidTokenRequest(format!(
                        "group `{group}` does not use bootstrap tokens (its attestation is {})",
                        g.method()
                    )));
                }
                if uses == 0 || uses > MAX_USES {
                    return Err(RegistryError::InvalidTokenRequest(format!(
                        "uses must be between 1 and {MAX_USES}"
                    )));
                }
                if let Some(n) = &device_name
                    && !valid_display_text(n, 128, false)
                {
                    return Err(RegistryError::InvalidField {
                        field: "device_name",
                        max: 128,
                    });
                }
                if device_name.is_some() && uses != 1 {
                    return Err(RegistryError::InvalidTokenRequest(
                        "a token naming a device is for that one device: uses must be 1".into(),
                    ));
                }
                (
                    EnrollmentTokenKind::Bootstrap,
                    Some(group),
                    None,
                    device_name,
                    uses,
                    check_ttl(ttl_seconds)?,
                    BOOTSTRAP_PREFIX,
                )
            }
            TokenRequest::Reclaim {
                device_id,
                ttl_seconds,
            } => {
                let device = self
                    .store
                    .get_device(device_id)
                    .await?
                    .ok_or(RegistryError::DeviceNotFound)?;
                if device.status != DeviceStatus::Active {
                    return Err(RegistryError::DeviceNotActive(device.status));
                }
                (
                    EnrollmentTokenKind::Reclaim,
                    Some(device.group),
                    Some(device_id),
                    None,
                    1,
                    check_ttl(ttl_seconds)?,
                    RECLAIM_PREFIX,
                )
            }
        };
        let secret = new_secret(prefix)?;
        let record = EnrollmentTokenRecord {
            id: Uuid::now_v7(),
            kind,
            token_hash: self.hasher.hash(secret.expose_secret()),
            group,
            device_id,
            device_name,
            uses_allowed: uses,
            uses: 0,
            created_by: admin.id,
            created_at: now,
            expires_at: now + ttl,
            revoked_at: None,
            revoked_by: None,
            last_used_at: None,
        };
        let action = match kind {
            EnrollmentTokenKind::Bootstrap => "enrollment_token.create",
            EnrollmentTokenKind::Reclaim => "reclaim_code.create",
        };
        self.store
            .commit(
                Change::new()
                    .write(Write::InsertEnrollmentToken(record.clone()))
                    .audit(
                        AuditDraft::new(
                            format!("admin:{}", admin.id),
                            action,
                            format!("enrollment-token:{}", record.id),
                        )
                        .details(json!({
                            "kind": kind.as_str(),
                            "group": record.group,
                            "device_id": record.device_id,
                            "device_name": record.device_name,
                            "uses": uses,
                            "expires_at": record.expires_at,
                        }))
                        .source(source),
                    ),
            )
            .await?;
        Ok(Minted { record, secret })
    }

    pub async fn list_tokens(
        &self,
        filter: &EnrollmentTokenFilter,
        page: &PageRequest,
    ) -> Result<Page<EnrollmentTokenRecord>, RegistryError> {
        Ok(self.store.list_enrollment_tokens(filter, page).await?)
    }

    /// Revokes a token or code (audited). Its earlier uses stand.
    pub async fn revoke_token(
        &self,
        admin: &AdminRecord,
        id: Uuid,
        source: Option<&str>,
    ) -> Result<EnrollmentTokenRecord, RegistryError> {
        let now = self.clock.now().unix_timestamp();
        let token = self
            .store
            .get_enrollment_token(id)
            .await?
            .ok_or(RegistryError::TokenNotFound)?;
        self.store
            .commit(
                Change::new()
                    .write(Write::RevokeEnrollmentToken {
                        id,
                        by: admin.id,
                        at: now,
                    })
                    .audit(
                        AuditDraft::new(
                            format!("admin:{}", admin.id),
                            "enrollment_token.revoke",
                            format!("enrollment-token:{id}"),
                        )
                        .details(json!({ "kind": token.kind.as_str(), "uses": token.uses }))
                        .source(source),
                    ),
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(Conflict::StateChanged { .. }) => {
                    RegistryError::TokenAlreadyRevoked
                }
                StoreError::Conflict(Conflict::Missing { .. }) => RegistryError::TokenNotFound,
                other => other.into(),
            })?;
        Ok(EnrollmentTokenRecord {
            revoked_at: Some(now),
            revoked_by: Some(admin.id),
            ..token
        })
    }

    /// The token a presented secret names, if its kind matches the prefix.
    pub(super) async fn find_token(
        &self,
        secret: &SecretString,
        kind: EnrollmentTokenKind,
    ) -> Result<EnrollmentTokenRecord, RegistryError> {
        let s = secret.expose_secret();
        let prefix = match kind {
            EnrollmentTokenKind::Bootstrap => BOOTSTRAP_PREFIX,
            EnrollmentTokenKind::Reclaim => RECLAIM_PREFIX,
        };
        if !s.starts_with(prefix) || s.len() > 128 {
            return Err(RegistryError::TokenInvalid("unknown"));
        }
        let token = self
            .store
            .enrollment_token_by_hash(&self.hasher.hash(s))
            .await?
            .filter(|t| t.kind == kind)
            .ok_or(RegistryError::TokenInvalid("unknown"))?;
        let now = self.clock.now().unix_timestamp();
        // Checked again inside the commit (`ConsumeEnrollmentToken`); this
        // early answer spares the HSM for a dead token.
        if token.revoked_at.is_some() {
            return Err(RegistryError::TokenInvalid("revoked"));
        }
        if now >= token.expires_at {
            return Err(RegistryError::TokenInvalid("expired"));
        }
        if token.uses >= token.uses_allowed {
            return Err(RegistryError::TokenInvalid("used up"));
        }
        Ok(token)
    }
}
