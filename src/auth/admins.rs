//! Admin accounts: bootstrap, creation, bearer-token authentication.

use super::{Role, TokenHasher, new_secret};
use crate::audit::AuditDraft;
use crate::clock::Clock;
use crate::store::{AdminRecord, Change, Page, PageRequest, Store, StoreError, Write};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use std::sync::Arc;
use uuid::Uuid;

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
    #[error("no admin `{0}`")]
    NotFound(String),
    #[error("{0}")]
    Refused(&'static str),
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Random(#[from] super::RandomError),
}

pub struct AdminService {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    hasher: TokenHasher,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_@".contains(c))
}

impl AdminService {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, hasher: TokenHasher) -> Self {
        Self {
            store,
            clock,
            hasher,
        }
    }

    /// Resolves a bearer token. A presented token that matches no account
    /// (`BadToken`), or a disabled account's (`Disabled`), is a failed login:
    /// callers go through `ratelimit::login::GuardedLogin`, which limits
    /// failures per source and audits them aggregated per source and window
    /// (one audit row per wrong token would let anyone grow the trail at
    /// will). A missing token is not a failed login.
    pub async fn authenticate(&self, token: Option<&str>) -> Result<AdminRecord, AdminError> {
        let token = token.ok_or(AdminError::Missing)?;
        let hash = self.hasher.hash(token);
        match self
            .store
            .admin_by_token_hash(&hash)
            .await
            .map_err(AdminError::Store)?
        {
            Some(a) if a.disabled => Err(AdminError::Disabled),
            Some(a) => Ok(a),
            None => Err(AdminError::BadToken),
        }
    }

    /// Creates an admin and returns its token, shown once.
    pub async fn create(
        &self,
        actor: &str,
        name: &str,
        role: Role,
    ) -> Result<(AdminRecord, SecretString), AdminError> {
        if !valid_name(name) {
            return Err(AdminError::BadName);
        }
        if self
            .store
            .admin_by_name(name)
            .await
            .map_err(AdminError::Store)?
            .is_some()
        {
            return Err(AdminError::Duplicate(name.to_string()));
        }
        let token = new_secret("kwa_")?;
        let record = AdminRecord {
            id: Uuid::now_v7(),
            name: name.to_string(),
            role,
            token_hash: self.hasher.hash(token.expose_secret()),
            disabled: false,
            created_at: self.clock.now().unix_timestamp(),
            disabled_at: None,
        };
        self.store
            .commit(
                Change::new()
                    .write(Write::InsertAdmin(record.clone()))
                    .audit(
                        AuditDraft::new(actor, "admin.create", format!("admin:{}", record.id))
                            .details(json!({ "name": name, "role": role.as_str() })),
                    ),
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => AdminError::Duplicate(name.to_string()),
                other => AdminError::Store(other),
            })?;
        Ok((record, token))
    }

    /// Creates the first admin if there is none. `None` when admins exist.
    pub async fn bootstrap(
        &self,
        name: &str,
    ) -> Result<Option<(AdminRecord, SecretString)>, AdminError> {
        if !self
            .store
            .list_admins(&PageRequest {
                limit: 1,
                ..PageRequest::default()
            })
            .await
            .map_err(AdminError::Store)?
            .items
            .is_empty()
        {
            return Ok(None);
        }
        self.create("cli:init", name, Role::Admin).await.map(Some)
    }

    /// Disables an admin (by id or name): its token stops working at once.
    /// Refuses to disable the caller: since only admins may disable, this
    /// also means the last active admin can never be disabled.
    pub async fn disable(&self, by: &AdminRecord, who: &str) -> Result<AdminRecord, AdminError> {
        let admins = self.list().await?;
        let target = admins
            .iter()
            .find(|a| a.id.to_string() == who || a.name == who)
            .cloned()
            .ok_or_else(|| AdminError::NotFound(who.to_string()))?;
        if target.id == by.id {
            return Err(AdminError::Refused(
                "an admin cannot disable itself; ask another admin",
            ));
        }
        if target.disabled {
            return Err(AdminError::Refused("that admin is already disabled"));
        }
        let active_admins = admins
            .iter()
            .filter(|a| a.role == Role::Admin && !a.disabled)
            .count();
        if target.role == Role::Admin && active_admins <= 1 {
            return Err(AdminError::Refused(
                "refusing to disable the last active admin",
            ));
        }
        self.store
            .commit(
                Change::new()
                    .write(Write::DisableAdmin {
                        id: target.id,
                        at: self.clock.now().unix_timestamp(),
                    })
                    .audit(
                        AuditDraft::new(
                            format!("admin:{}", by.id),
                            "admin.disable",
                            format!("admin:{}", target.id),
                        )
                        .details(json!({ "name": target.name, "role": target.role.as_str() })),
                    ),
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => AdminError::Refused("that admin is already disabled"),
                other => AdminError::Store(other),
            })?;
        Ok(AdminRecord {
            disabled: true,
            ..target
        })
    }

    pub async fn page(&self, page: &PageRequest) -> Result<Page<AdminRecord>, AdminError> {
        self.store
            .list_admins(page)
            .await
            .map_err(AdminError::Store)
    }

    pub async fn list(&self) -> Result<Vec<AdminRecord>, AdminError> {
        self.store
            .list_admins(&PageRequest {
                limit: 1000,
                ..PageRequest::default()
            })
            .await
            .map(|p| p.items)
            .map_err(AdminError::Store)
    }
}
