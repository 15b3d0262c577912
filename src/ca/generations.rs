//! A CA's keys besides its active one. A rotation (`crate::rotation`)
//! gives a CA a new key and certificate: the successor is *published*
//! (served in the CA's bundle so relying parties trust it before anything
//! is issued under it), then *activated* (new issuance uses it), and the
//! predecessor is *retired*: it issues nothing more, but keeps signing the
//! CRL and OCSP answers for the certificates it issued until the last of
//! them expires and the key is destroyed.
//!
//! Loaded with the CAs ([`CaService::reload`]) from the store: retired keys
//! of each CA, and pre-active keys that a running rotation has published,
//! each with its own CA certificate (found by its public key).

use super::{CaError, CaService, Issuer, x509};
use crate::store::{KeyPurpose, KeyRecord, KeyState, RotationStep};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use uuid::Uuid;

/// The non-active keys of each CA, by CA name.
#[derive(Default)]
pub(super) struct Generations {
    /// Retired keys that still sign CRLs and OCSP answers, newest first.
    retired: BTreeMap<String, Vec<Arc<Issuer>>>,
    /// Published successors, not active yet.
    published: BTreeMap<String, Vec<Arc<Issuer>>>,
}

impl CaService {
    /// Loads the non-active generations of the CAs in `loaded`.
    pub(super) async fn load_generations(
        &self,
        loaded: &BTreeMap<String, Arc<Issuer>>,
    ) -> Result<Generations, CaError> {
        let published_keys: BTreeSet<Uuid> = self
            .store
            .list_rotations(true, 1000)
            .await?
            .into_iter()
            .filter(|r| r.step == RotationStep::Published)
            .filter_map(|r| r.new_key_id)
            .collect();
        let mut out = Generations::default();
        let mut keys = self.store.list_keys().await?;
        // Newest first (ids are UUIDv7).
        keys.sort_by_key(|k| std::cmp::Reverse(k.id));
        for key in keys {
            let Some(ca) = key.ca_name.as_deref().and_then(|n| loaded.get(n)) else {
                continue;
            };
            if key.id == ca.key_id
                || !matches!(key.purpose, KeyPurpose::RootCa | KeyPurpose::IssuingCa)
            {
                continue;
            }
            let into = match key.state {
                KeyState::Retired => &mut out.retired,
                KeyState::PreActive if published_keys.contains(&key.id) => &mut out.published,
                _ => continue,
            };
            match self.generation_issuer(ca, &key, loaded).await {
                Ok(Some(issuer)) => into
                    .entry(ca.name.clone())
                    .or_default()
                    .push(Arc::new(issuer)),
                Ok(None) => {
                    tracing::warn!(ca = %ca.name, key = %key.id, "CA key without its certificate in the store; not served");
                }
                // A key store dropped from the config: that key cannot sign
                // any more whatever happens here; say so and go on.
                Err(e @ CaError::KeyStoreNotConfigured { .. }) => {
                    tracing::warn!(ca = %ca.name, key = %key.id, code = e.code(), error = %e, "CA key generation not loaded");
                }
                // A store or encoding failure is not "no such generation": a
                // retired key left out would silently stop signing its CRL.
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The issuer view of one non-active key of `ca`: `None` when its
    /// certificate is not in the store.
    async fn generation_issuer(
        &self,
        ca: &Issuer,
        key: &KeyRecord,
        loaded: &BTreeMap<String, Arc<Issuer>>,
    ) -> Result<Option<Issuer>, CaError> {
        let parent = self.store.get_ca(&ca.name).await?.and_then(|r| r.parent);
        let signer_name = parent.clone().unwrap_or_else(|| ca.name.clone());
        let Some(cert) = self
            .store
            .certificates_by_spki(&super::spki_sha256(&key.public_key_der))
            .await?
            .into_iter()
            .filter(|c| c.device_id.is_none() && c.issuer_ca == signer_name)
            .max_by_key(|c| c.not_after)
        else {
            return Ok(None);
        };
        let keystore = self.keystores.get(&key.keystore).cloned().map_err(|_| {
            CaError::KeyStoreNotConfigured {
                ca: ca.name.clone(),
                keystore: key.keystore.clone(),
            }
        })?;
        let summary = x509::summarize(&cert.der)?;
        let mut chain_pem = x509::to_pem(&cert.der)?;
        if let Some(p) = parent.as_deref().and_then(|p| loaded.get(p)) {
            chain_pem.push_str(&p.chain_pem);
        }
        Ok(Some(Issuer {
            name: ca.name.clone(),
            kind: ca.kind,
            key_id: key.id,
            keystore_name: key.keystore.clone(),
            keystore,
            handle: key.handle.clone(),
            algorithm: key.algorithm,
            cert_der: cert.der,
            subject_der: summary.subject_name_der,
            ski: summary.ski.unwrap_or_default(),
            not_after: summary.not_after,
            chain_pem,
        }))
    }

    fn generations_of(&self, ca: &str) -> (Vec<Arc<Issuer>>, Vec<Arc<Issuer>>) {
        self.generations
            .read()
            .map(|g| {
                (
                    g.published.get(ca).cloned().unwrap_or_default(),
                    g.retired.get(ca).cloned().unwrap_or_default(),
                )
            })
            .unwrap_or_default()
    }

    /// The keys of `ca` that sign CRLs and OCSP answers: the active one
    /// first, then the retired ones that still have live certificates.
    pub fn signing_generations(&self, ca: &str) -> Result<Vec<Arc<Issuer>>, CaError> {
        let mut all = vec![self.issuer(ca)?];
        all.extend(self.generations_of(ca).1);
        Ok(all)
    }

    /// Every live certificate of `ca`: published successors, the active
    /// one, retired predecessors (what relying parties should trust during
    /// a rotation).
    pub fn live_generations(&self, ca: &str) -> Result<Vec<Arc<Issuer>>, CaError> {
        let current = self.issuer(ca)?;
        let (published, retired) = self.generations_of(ca);
        let mut all = published;
        all.push(current);
        all.extend(retired);
        Ok(all)
    }

    /// The generation of `ca` whose key is `key_id` (active, retired or published).
    pub fn generation(&self, ca: &str, key_id: Uuid) -> Option<Arc<Issuer>> {
        self.live_generations(ca)
            .ok()?
            .into_iter()
            .find(|g| g.key_id == key_id)
    }
}

impl CaService {
    /// Re-reads the CAs when the store's CA keys changed since the last
    /// load: another daemon (the scheduler leader) rotated one. Cheap when
    /// nothing changed (one read of the key rows and CA rows). Returns
    /// whether it reloaded.
    pub async fn reload_if_changed(&self) -> Result<bool, CaError> {
        let seen = self.ca_key_states().await?;
        let known = self
            .ca_keys_seen
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        if seen == known {
            return Ok(false);
        }
        self.reload().await?;
        Ok(true)
    }

    /// (key id, state) of every CA key and the key each CA points at.
    pub(super) async fn ca_key_states(&self) -> Result<Vec<(Uuid, String)>, CaError> {
        let mut seen: Vec<(Uuid, String)> = self
            .store
            .list_keys()
            .await?
            .into_iter()
            .filter(|k| matches!(k.purpose, KeyPurpose::RootCa | KeyPurpose::IssuingCa))
            .map(|k| (k.id, k.state.as_str().to_string()))
            .collect();
        for ca in self.store.list_cas().await? {
            seen.push((ca.key_id, format!("ca:{}", ca.name)));
        }
        for r in self.store.list_rotations(true, 1000).await? {
            if let Some(k) = r.new_key_id {
                seen.push((k, format!("rotation:{}", r.step.as_str())));
            }
        }
        seen.sort();
        Ok(seen)
    }
}
