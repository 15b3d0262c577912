//! Changes to the admin roster under separation of duties: invitations and
//! role changes.
//!
//! - Once two accounts have ever held role `admin`, inviting an admin or
//!   raising a role is a *request* that a different active admin must
//!   approve. Before that (just after bootstrap) it takes effect at once:
//!   there is nobody to ask. An invitation made that way can no longer be
//!   redeemed once a second admin exists (checked in the redeeming
//!   transaction), and disabling or lowering the second admin does not
//!   reopen the shortcut: an admin left alone restores a second one with
//!   the local, audited `keyward admins break-glass`.
//! - Nobody receives another person's admin token. An invitation yields
//!   an *invitation code* for the requester to pass on; when a second admin
//!   approves, that admin receives an *approval code* to pass on too. Only
//!   whoever presents both (the invitee) redeems the invitation, once,
//!   before it expires, and only the redeemer sees the new token. A single
//!   admin therefore cannot mint a second identity for itself.
//! - Lowering a role needs no approval (it removes privilege), but never
//!   leaves no active admin.
//!
//! Codes are 256-bit secrets shown once; the store keeps their HMACs.

use super::admins::{AdminService, valid_name};
use super::{AdminError, TokenHasher, new_secret};
use crate::audit::AuditDraft;
use crate::model::{AdminRequestKind, AdminRequestStatus, Role};
use crate::store::{
    AdminRecord, AdminRequestRecord, Change, Conflict, Page, PageRequest, StoreError, Write,
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// How long an invitation or a role-change request stays open.
pub const REQUEST_TTL_SECS: i64 = 72 * 3600;

/// A new invitation and the code for the requester to hand to the invitee.
pub struct Invitation {
    pub request: AdminRequestRecord,
    /// `kwi_<request id>_<secret>`: shown once.
    pub code: SecretString,
}

/// The outcome of deciding a request.
pub struct Decided {
    pub request: AdminRequestRecord,
    /// For an approved invitation: the code the approving admin hands to
    /// the invitee. Shown once.
    pub approval_code: Option<SecretString>,
}

/// What a role change did.
pub enum RoleChange {
    Applied(AdminRecord),
    /// Raising a role with two or more active admins waits for a second one.
    Pending(AdminRequestRecord),
}

/// Splits `kwi_<uuid-simple>_<secret>` / `kwp_...` into id and whole code.
fn parse_code(code: &str, prefix: &str) -> Option<Uuid> {
    let rest = code.strip_prefix(prefix)?;
    let (id, secret) = rest.split_once('_')?;
    (!secret.is_empty()).then_some(())?;
    Uuid::try_parse(id).ok()
}

fn new_code(prefix: &str, id: Uuid) -> Result<SecretString, AdminError> {
    let secret = new_secret("")?;
    Ok(SecretString::from(format!(
        "{prefix}{}_{}",
        id.simple(),
        secret.expose_secret()
    )))
}

fn matches(hasher: &TokenHasher, presented: &str, stored: Option<&[u8]>) -> bool {
    stored.is_some_and(|h| bool::from(hasher.hash(presented).as_slice().ct_eq(h)))
}

fn require_admin(by: &AdminRecord) -> Result<(), AdminError> {
    if by.role.allows(Role::Admin) {
        Ok(())
    } else {
        Err(AdminError::Forbidden {
            have: by.role,
            need: Role::Admin,
        })
    }
}

impl AdminService {
    /// Whether roster changes need a second admin: once two accounts have
    /// ever held role `admin`, always (disabling or lowering the other one
    /// does not reopen the one-admin shortcut; see `admins break-glass`).
    async fn second_admin_required(&self) -> Result<bool, AdminError> {
        Ok(self.store.count_ever_admins().await? >= 2)
    }

    /// Invites a new admin. See the module doc for who may redeem it.
    pub async fn invite(
        &self,
        by: &AdminRecord,
        name: &str,
        role: Role,
        source: Option<&str>,
    ) -> Result<Invitation, AdminError> {
        require_admin(by)?;
        if !valid_name(name) {
            return Err(AdminError::BadName);
        }
        if self.store.admin_by_name(name).await?.is_some() {
            return Err(AdminError::Duplicate(name.to_string()));
        }
        let now = self.clock.now().unix_timestamp();
        let id = Uuid::now_v7();
        let code = new_code("kwi_", id)?;
        let needs_approval = self.second_admin_required().await?;
        let request = AdminRequestRecord {
            id,
            kind: AdminRequestKind::Invite,
            name: name.to_string(),
            admin_id: None,
            role,
            requested_by: by.id,
            status: if needs_approval {
                AdminRequestStatus::Pending
            } else {
                AdminRequestStatus::Approved
            },
            decided_by: None,
            requester_secret_hash: Some(self.hasher.hash(code.expose_secret())),
            approver_secret_hash: None,
            client_addr: source.map(str::to_string),
            created_at: now,
            expires_at: now + REQUEST_TTL_SECS,
            decided_at: (!needs_approval).then_some(now),
            redeemed_at: None,
        };
        self.store
            .commit(
                Change::new()
                    .write(Write::InsertAdminRequest(request.clone()))
                    .audit(
                        AuditDraft::new(
                            format!("admin:{}", by.id),
                            "admin.invite",
                            format!("admin-request:{id}"),
                        )
                        .details(json!({
                            "name": name,
                            "role": role.as_str(),
                            "second_admin_required": needs_approval,
                            "expires_at": request.expires_at,
                        }))
                        .source(source),
                    ),
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => AdminError::DuplicateInvitation(name.to_string()),
                other => AdminError::Store(other),
            })?;
        Ok(Invitation { request, code })
    }

    /// Changes an admin's role. Raising it waits for a second admin when
    /// there are two or more active admins; lowering applies at once.
    pub async fn set_role(
        &self,
        by: &AdminRecord,
        who: &str,
        role: Role,
        source: Option<&str>,
    ) -> Result<RoleChange, AdminError> {
        require_admin(by)?;
        let target = self.find(who).await?;
        if target.id == by.id {
            return Err(AdminError::SelfAction("change the role of"));
        }
        if target.disabled {
            return Err(AdminError::AlreadyDisabled);
        }
        if target.role == role {
            return Err(AdminError::SameRole {
                name: target.name,
                role,
            });
        }
        let now = self.clock.now().unix_timestamp();
        let actor = format!("admin:{}", by.id);
        if role > target.role && self.second_admin_required().await? {
            let request = AdminRequestRecord {
                id: Uuid::now_v7(),
                kind: AdminRequestKind::SetRole,
                name: target.name.clone(),
                admin_id: Some(target.id),
                role,
                requested_by: by.id,
                status: AdminRequestStatus::Pending,
                decided_by: None,
                requester_secret_hash: None,
                approver_secret_hash: None,
                client_addr: source.map(str::to_string),
                created_at: now,
                expires_at: now + REQUEST_TTL_SECS,
                decided_at: None,
                redeemed_at: None,
            };
            self.store
                .commit(
                    Change::new()
                        .write(Write::InsertAdminRequest(request.clone()))
                        .audit(
                            AuditDraft::new(
                                actor,
                                "admin.role_change_requested",
                                format!("admin:{}", target.id),
                            )
                            .details(json!({
                                "request": request.id,
                                "name": target.name,
                                "from": target.role.as_str(),
                                "to": role.as_str(),
                            }))
                            .source(source),
                        ),
                )
                .await
                .map_err(|e| match e {
                    StoreError::Conflict(_) => AdminError::DuplicateRoleChange(target.name.clone()),
                    other => AdminError::Store(other),
                })?;
            return Ok(RoleChange::Pending(request));
        }
        self.store
            .commit(
                Change::new()
                    .write(Write::SetAdminRole {
                        id: target.id,
                        from: target.role,
                        to: role,
                        // The "no second admin needed" read above is re-checked
                        // where the raise is written.
                        without_second_admin: true,
                    })
                    .audit(
                        AuditDraft::new(actor, "admin.set_role", format!("admin:{}", target.id))
                            .details(json!({
                                "name": target.name,
                                "from": target.role.as_str(),
                                "to": role.as_str(),
                                "second_admin_required": false,
                            }))
                            .source(source),
                    ),
            )
            .await?;
        Ok(RoleChange::Applied(AdminRecord { role, ..target }))
    }

    pub async fn requests(
        &self,
        status: Option<AdminRequestStatus>,
        page: &PageRequest,
    ) -> Result<Page<AdminRequestRecord>, AdminError> {
        Ok(self.store.list_admin_requests(status, page).await?)
    }

    async fn request(&self, id: Uuid) -> Result<AdminRequestRecord, AdminError> {
        self.store
            .get_admin_request(id)
            .await?
            .ok_or(AdminError::RequestNotFound)
    }

    /// A different admin approves or denies a pending request.
    pub async fn decide_request(
        &self,
        by: &AdminRecord,
        id: Uuid,
        approve: bool,
        source: Option<&str>,
    ) -> Result<Decided, AdminError> {
        require_admin(by)?;
        let mut request = self.request(id).await?;
        if request.requested_by == by.id {
            return Err(AdminError::SelfApproval);
        }
        if request.admin_id == Some(by.id) {
            return Err(AdminError::SelfAction("approve a change of"));
        }
        if request.status != AdminRequestStatus::Pending {
            return Err(AdminError::RequestNotPending(request.status));
        }
        let now = self.clock.now().unix_timestamp();
        if now >= request.expires_at {
            self.expire_request(&request, now).await?;
            return Err(AdminError::RequestExpired);
        }
        let to = if approve {
            AdminRequestStatus::Approved
        } else {
            AdminRequestStatus::Denied
        };
        let approval_code = match (approve, request.kind) {
            (true, AdminRequestKind::Invite) => Some(new_code("kwp_", id)?),
            _ => None,
        };
        let approver_secret_hash = approval_code
            .as_ref()
            .map(|c| self.hasher.hash(c.expose_secret()));
        let actor = format!("admin:{}", by.id);
        let mut change = Change::new().write(Write::DecideAdminRequest {
            id,
            to,
            decided_by: by.id,
            at: now,
            approver_secret_hash: approver_secret_hash.clone(),
        });
        if approve
            && request.kind == AdminRequestKind::SetRole
            && let Some(target_id) = request.admin_id
        {
            let target = self
                .store
                .get_admin(target_id)
                .await?
                .ok_or_else(|| AdminError::NotFound(request.name.clone()))?;
            change = change.write(Write::SetAdminRole {
                id: target_id,
                from: target.role,
                to: request.role,
                without_second_admin: false,
            });
        }
        let action = match (approve, request.kind) {
            (true, AdminRequestKind::Invite) => "admin.invite_approved",
            (false, AdminRequestKind::Invite) => "admin.invite_denied",
            (true, AdminRequestKind::SetRole) => "admin.set_role",
            (false, AdminRequestKind::SetRole) => "admin.role_change_denied",
        };
        change = change.audit(
            AuditDraft::new(actor, action, format!("admin-request:{id}"))
                .details(json!({
                    "name": request.name,
                    "role": request.role.as_str(),
                    "requested_by": request.requested_by,
                    "second_admin_required": true,
                }))
                .source(source),
        );
        self.store.commit(change).await.map_err(|e| match e {
            StoreError::Conflict(Conflict::LastActiveAdmin) => AdminError::LastActiveAdmin,
            StoreError::Conflict(_) => AdminError::Concurrent,
            other => AdminError::Store(other),
        })?;
        request.status = to;
        request.decided_by = Some(by.id);
        request.decided_at = Some(now);
        request.approver_secret_hash = approver_secret_hash;
        Ok(Decided {
            request,
            approval_code,
        })
    }

    /// Marks open requests (pending, or approved invitations not yet
    /// redeemed) past their deadline `expired` (audited by `system`).
    /// Returns how many. The sweeper job calls it.
    pub async fn expire_stale_requests(&self, now: i64) -> Result<u32, AdminError> {
        let mut expired = 0;
        for status in [AdminRequestStatus::Pending, AdminRequestStatus::Approved] {
            let mut page = PageRequest {
                after: None,
                limit: 1000,
                order: crate::store::Order::OldestFirst,
            };
            loop {
                let batch = self.store.list_admin_requests(Some(status), &page).await?;
                for r in batch.items.iter().filter(|r| now >= r.expires_at) {
                    if self.expire_request(r, now).await? {
                        expired += 1;
                    }
                }
                match batch.next {
                    Some(next) => page.after = Some(next),
                    None => break,
                }
            }
        }
        Ok(expired)
    }

    async fn expire_request(&self, r: &AdminRequestRecord, now: i64) -> Result<bool, AdminError> {
        let change = Change::new()
            .write(Write::ExpireAdminRequest { id: r.id, at: now })
            .audit(
                AuditDraft::new(
                    "system",
                    "admin.request_expired",
                    format!("admin-request:{}", r.id),
                )
                .details(json!({ "name": r.name, "kind": r.kind.as_str() })),
            );
        match self.store.commit(change).await {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The invitee redeems an invitation with its code (and the approval
    /// code, when a second admin approved it) and receives its own token,
    /// shown once. Every failure looks the same to the caller; callers count
    /// and audit failures per source (`ratelimit::login::GuardedLogin::redeem`).
    pub async fn redeem(
        &self,
        invitation_code: &str,
        approval_code: Option<&str>,
        source: Option<&str>,
    ) -> Result<(AdminRecord, SecretString), AdminError> {
        let id = parse_code(invitation_code, "kwi_").ok_or(AdminError::BadInvitation)?;
        let request = match self.store.get_admin_request(id).await? {
            Some(r) if r.kind == AdminRequestKind::Invite => r,
            _ => return Err(AdminError::BadInvitation),
        };
        let now = self.clock.now().unix_timestamp();
        let approval_ok = match (&request.approver_secret_hash, approval_code) {
            // Approved by a second admin: its code is required.
            (Some(_), Some(code)) => {
                parse_code(code, "kwp_") == Some(id)
                    && matches(&self.hasher, code, request.approver_secret_hash.as_deref())
            }
            (Some(_), None) => false,
            // Approved at once (a single admin): no approval code exists.
            (None, _) => request.decided_by.is_none(),
        };
        if !matches(
            &self.hasher,
            invitation_code,
            request.requester_secret_hash.as_deref(),
        ) || !approval_ok
            || request.status != AdminRequestStatus::Approved
            || now >= request.expires_at
        {
            // Audited by the caller's failed-login log: bounded, aggregated.
            return Err(AdminError::BadInvitation);
        }
        let token = new_secret("kwa_")?;
        let admin = AdminRecord {
            id: Uuid::now_v7(),
            name: request.name.clone(),
            role: request.role,
            token_hash: self.hasher.hash(token.expose_secret()),
            disabled: false,
            created_at: now,
            disabled_at: None,
        };
        self.store
            .commit(
                Change::new()
                    .write(Write::RedeemInvitation {
                        id,
                        at: now,
                        admin: admin.clone(),
                    })
                    .audit(
                        AuditDraft::new(
                            format!("admin:{}", admin.id),
                            "admin.create",
                            format!("admin:{}", admin.id),
                        )
                        .details(json!({
                            "name": admin.name,
                            "role": admin.role.as_str(),
                            "invitation": id,
                            "invited_by": request.requested_by,
                            "approved_by": request.decided_by,
                        }))
                        .source(source),
                    ),
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(Conflict::Duplicate { .. }) => {
                    AdminError::Duplicate(admin.name.clone())
                }
                // Every other refusal looks like a bad code to the caller;
                // the reason goes to the log for the operator.
                StoreError::Conflict(c) => {
                    tracing::warn!(invitation = %id, reason = %c, "invitation refused at redemption");
                    AdminError::BadInvitation
                }
                other => AdminError::Store(other),
            })?;
        Ok((admin, token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_carry_their_request_id() {
        let id = Uuid::now_v7();
        let code = new_code("kwi_", id).unwrap();
        assert_eq!(parse_code(code.expose_secret(), "kwi_"), Some(id));
        assert_eq!(parse_code(code.expose_secret(), "kwp_"), None);
        assert_eq!(parse_code("kwi_nothex_abc", "kwi_"), None);
        assert_eq!(parse_code(&format!("kwi_{}_", id.simple()), "kwi_"), None);
    }
}
