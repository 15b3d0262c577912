//! Admin accounts: bootstrap, creation, bearer-token authentication.

use super::{Role, TokenHasher, new_secret};
use crate::audit::AuditDraft;
use crate::clock::Clock;
use crate::store::{AdminRecord, Change, Conflict, Page, PageRequest, Store, StoreError, Write};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use std::sync::Arc;
use uuid::Uuid;

pub use super::error::AdminError;

pub struct AdminService {
    pub(super) store: Arc<dyn Store>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) hasher: TokenHasher,
}

/// Admin names: ASCII only, so that two names cannot look alike.
pub(super) fn valid_name(n: &str) -> bool {
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

    /// Creates an admin directly and returns its token, shown once. Only
    /// for the very first admin (bootstrap); every later admin comes through
    /// an invitation that the invitee redeems.
    async fn create_as(
        &self,
        actor: &str,
        action: &str,
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
                        AuditDraft::new(actor, action, format!("admin:{}", record.id))
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
        self.create_as("cli:init", "admin.create", name, Role::Admin)
            .await
            .map(Some)
    }

    /// Break-glass, run locally with the config (database and pepper): when
    /// no second active admin of role `admin` exists to approve roster
    /// changes, creates one directly and returns its token. Refused while
    /// two or more are active. Audited as `admin.break_glass` by
    /// `cli:break-glass`; whoever can run it can already write the database.
    pub async fn break_glass(
        &self,
        name: &str,
        role: Role,
    ) -> Result<(AdminRecord, SecretString), AdminError> {
        if self.store.count_active_admins().await? >= 2 {
            return Err(AdminError::BreakGlassRefused);
        }
        self.create_as("cli:break-glass", "admin.break_glass", name, role)
            .await
    }

    /// Finds an admin by id or name.
    pub async fn find(&self, who: &str) -> Result<AdminRecord, AdminError> {
        let found = match Uuid::parse_str(who) {
            Ok(id) => self.store.get_admin(id).await?,
            Err(_) => self.store.admin_by_name(who).await?,
        };
        found.ok_or_else(|| AdminError::NotFound(who.to_string()))
    }

    /// Disables an admin (by id or name): its token stops working at once,
    /// and its approvals of still-pending registrations stop counting.
    /// Nobody disables itself, and the store refuses, inside the
    /// transaction, to leave no active admin of role `admin` — so two admins
    /// disabling each other at the same moment cannot lock everyone out.
    pub async fn disable(
        &self,
        by: &AdminRecord,
        who: &str,
        source: Option<&str>,
    ) -> Result<AdminRecord, AdminError> {
        let target = self.find(who).await?;
        if target.id == by.id {
            return Err(AdminError::SelfAction("disable"));
        }
        if target.disabled {
            return Err(AdminError::AlreadyDisabled);
        }
        let now = self.clock.now().unix_timestamp();
        self.store
            .commit(
                Change::new()
                    .write(Write::DisableAdmin {
                        id: target.id,
                        at: now,
                    })
                    .audit(
                        AuditDraft::new(
                            format!("admin:{}", by.id),
                            "admin.disable",
                            format!("admin:{}", target.id),
                        )
                        .details(json!({ "name": target.name, "role": target.role.as_str() }))
                        .source(source),
                    ),
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(Conflict::LastActiveAdmin) => AdminError::LastActiveAdmin,
                StoreError::Conflict(_) => AdminError::AlreadyDisabled,
                other => AdminError::Store(other),
            })?;
        Ok(AdminRecord {
            disabled: true,
            disabled_at: Some(now),
            ..target
        })
    }

    pub async fn page(&self, page: &PageRequest) -> Result<Page<AdminRecord>, AdminError> {
        self.store
            .list_admins(page)
            .await
            .map_err(AdminError::Store)
    }
}
