//! Policy reload (`POST /v1/admin/policies/reload`, SIGHUP): the files are
//! read and validated whole first; an invalid set changes nothing. Every
//! attempt is audited with the old and new hashes.

use super::{RegistryError, RegistryService};
use crate::audit::{AuditDraft, Outcome};
use crate::policy::{Policies, PolicyHashes};
use crate::store::Change;
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;

#[derive(Debug, Clone, Serialize)]
pub struct ReloadOutcome {
    pub old: PolicyHashes,
    pub new: PolicyHashes,
    /// False when the files were unchanged (nothing swapped; still audited).
    pub changed: bool,
    pub groups: Vec<String>,
}

impl RegistryService {
    /// Another daemon of the deployment reloaded its policies (the
    /// invalidation bus): reloads this daemon's files, audited like any
    /// reload, unless they are the ones already in force (then nothing
    /// happens and `None` is returned: the daemon that published it, or
    /// files not yet deployed here).
    pub async fn follow_policy_reload(
        &self,
        actor: &str,
    ) -> Result<Option<ReloadOutcome>, RegistryError> {
        let current = self.ca.policies();
        if let Ok(on_disk) = Policies::load(&current.dir)
            && on_disk.hashes == current.hashes
        {
            return Ok(None);
        }
        self.reload_policies(actor, None).await.map(Some)
    }

    /// Reloads `policies/*.toml` from the directory the daemon started with.
    pub async fn reload_policies(
        &self,
        actor: &str,
        source: Option<&str>,
    ) -> Result<ReloadOutcome, RegistryError> {
        let _serial = self.reload_lock.lock().await;
        let current = self.ca.policies();
        let loaded = Policies::load(&current.dir)
            .map_err(|e| RegistryError::PolicyInvalid(e.to_string()))
            .and_then(|next| match current.reload_refusal(&next) {
                Some(why) => Err(RegistryError::PolicyInvalid(why)),
                None => Ok(next),
            });
        let next = match loaded {
            Ok(n) => n,
            Err(e) => {
                let event = AuditDraft::new(actor, "policy.reload", "policies")
                    .outcome(Outcome::Failure)
                    .details(json!({ "old": current.hashes, "error": e.to_string() }))
                    .source(source);
                if let Err(store) = self.store.commit(Change::new().audit(event)).await {
                    tracing::error!(error = %store, "could not audit a refused policy reload");
                }
                tracing::warn!(error = %e, "policy reload refused; the policies in force are unchanged");
                return Err(e);
            }
        };
        let next = Arc::new(next);
        let attestors = self.build_attestors(&next)?;
        let outcome = ReloadOutcome {
            old: current.hashes.clone(),
            new: next.hashes.clone(),
            changed: current.hashes != next.hashes,
            groups: next.groups.keys().cloned().collect(),
        };
        self.store
            .commit(
                Change::new().audit(
                    AuditDraft::new(actor, "policy.reload", "policies")
                        .details(json!({
                            "old": outcome.old,
                            "new": outcome.new,
                            "changed": outcome.changed,
                            "groups": outcome.groups,
                        }))
                        .source(source),
                ),
            )
            .await?;
        self.ca
            .replace_policies(next)
            .map_err(RegistryError::PolicyInvalid)?;
        self.set_attestors(attestors);
        tracing::info!(
            changed = outcome.changed,
            enrollment = %outcome.new.enrollment,
            "policies reloaded"
        );
        Ok(outcome)
    }
}
