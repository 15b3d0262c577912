//! The CA hierarchy: loading the chain of CAs from the store, and creating
//! the CAs the policy names (`keyward init`), each with a fresh HSM key.

use super::{CaError, CaService, Issuer, fingerprint, keys, now_ms, x509};
use crate::audit::AuditDraft;
use crate::keystore::{KeyStore, KeyStoreError};
use crate::policy::{CaKind, CaPolicy};
use crate::store::{
    CaRecord, CertificateRecord, CertificateStatus, Change, KeyPurpose, KeyState, Write,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

impl CaService {
    /// Re-reads CAs and their keys from the store.
    pub async fn reload(&self) -> Result<(), CaError> {
        let seen = self.ca_key_states().await?;
        let mut remaining = self.store.list_cas().await?;
        let mut loaded: BTreeMap<String, Arc<Issuer>> = BTreeMap::new();
        // Parents first, whatever order the store returns: a chain is built
        // from the parent's chain, so the parent must be loaded already.
        while !remaining.is_empty() {
            let before = remaining.len();
            let mut deferred = Vec::new();
            for ca in remaining {
                let parent_chain = match &ca.parent {
                    Some(p) => match loaded.get(p) {
                        Some(parent) => Some(parent.chain_pem.clone()),
                        None => {
                            deferred.push(ca);
                            continue;
                        }
                    },
                    None => None,
                };
                let issuer = self.load_issuer(&ca, parent_chain).await?;
                loaded.insert(ca.name.clone(), Arc::new(issuer));
            }
            if deferred.len() == before {
                return Err(CaError::ParentMissing(
                    deferred.into_iter().map(|c| c.name).collect(),
                ));
            }
            remaining = deferred;
        }
        let generations = self.load_generations(&loaded).await?;
        if let Ok(mut g) = self.issuers.write() {
            *g = loaded;
        }
        if let Ok(mut g) = self.generations.write() {
            *g = generations;
        }
        if let Ok(mut g) = self.ca_keys_seen.lock() {
            *g = seen;
        }
        Ok(())
    }

    async fn load_issuer(
        &self,
        ca: &CaRecord,
        parent_chain: Option<String>,
    ) -> Result<Issuer, CaError> {
        let key =
            self.store
                .get_key(ca.key_id)
                .await?
                .ok_or_else(|| CaError::KeyRecordMissing {
                    ca: ca.name.clone(),
                    key_id: ca.key_id,
                })?;
        let summary = x509::summarize(&ca.certificate_der)?;
        let mut chain_pem = x509::to_pem(&ca.certificate_der)?;
        if let Some(parent) = parent_chain {
            chain_pem.push_str(&parent);
        }
        let keystore = self.keystores.get(&key.keystore).cloned().map_err(|_| {
            CaError::KeyStoreNotConfigured {
                ca: ca.name.clone(),
                keystore: key.keystore.clone(),
            }
        })?;
        Ok(Issuer {
            name: ca.name.clone(),
            kind: ca.kind,
            key_id: key.id,
            keystore_name: key.keystore.clone(),
            keystore,
            handle: key.handle.clone(),
            algorithm: key.algorithm,
            cert_der: ca.certificate_der.clone(),
            subject_der: summary.subject_name_der,
            ski: summary.ski.unwrap_or_default(),
            not_after: summary.not_after,
            chain_pem,
        })
    }

    /// Creates every CA in the policy that does not exist yet, parents first.
    /// Returns the names created. Safe to run again.
    pub async fn initialize(&self, actor: &str) -> Result<Vec<String>, CaError> {
        let mut created = Vec::new();
        let policies = self.policies();
        for policy in &policies.cas {
            if self.issuer(&policy.name).is_ok() {
                continue;
            }
            self.create_ca(actor, policy).await?;
            self.reload().await?;
            created.push(policy.name.clone());
        }
        Ok(created)
    }

    async fn create_ca(&self, actor: &str, policy: &CaPolicy) -> Result<(), CaError> {
        let parent = match &policy.parent {
            Some(p) => Some(self.issuer(p)?),
            None => None,
        };
        let purpose = match policy.kind {
            CaKind::Root => KeyPurpose::RootCa,
            CaKind::Issuing => KeyPurpose::IssuingCa,
        };
        let keystore_name = policy
            .keystore
            .clone()
            .unwrap_or_else(|| crate::model::DEFAULT_KEYSTORE.to_string());
        let keystore = self.keystores.get(&keystore_name)?.clone();
        keys::create(
            keystore.as_ref(),
            self.store.as_ref(),
            self.clock.as_ref(),
            actor,
            keys::NewKey {
                keystore: &keystore_name,
                label: format!("keyward-ca-{}-v1", policy.name),
                purpose,
                algorithm: policy.algorithm,
                ca_name: Some(&policy.name),
                extractable: policy.key_backup() == crate::policy::KeyBackup::WrapOnly,
            },
            async |pending| {
                self.certify_ca(actor, policy, parent.as_deref(), keystore.as_ref(), pending)
                    .await
            },
        )
        .await?;
        Ok(())
    }

    /// Certifies a new CA key (by its parent, or by itself for a root) and
    /// returns the change that records the CA, its certificate and the
    /// completed key; [`keys::create`] commits it.
    async fn certify_ca(
        &self,
        actor: &str,
        policy: &CaPolicy,
        parent: Option<&Issuer>,
        keystore: &dyn KeyStore,
        key: &keys::PendingKey,
    ) -> Result<Change, CaError> {
        // Proof that the device generated the key, where it can give one.
        let attestation = keystore.attestation(&key.handle).await?;
        let now = self.clock.now().unix_timestamp();
        let subject = x509::name_from_policy(&policy.subject)?;
        let ski = x509::key_identifier(&key.public_key_der)?;
        let not_before = now - 300;
        let mut not_after = now + i64::from(policy.validity_days) * 86_400;
        // The signer is the parent CA, or the new key itself for a root.
        let (issuer_name, aki, signer, signer_handle, signer_alg, signer_key_id) = match parent {
            Some(p) => {
                if p.not_after <= now {
                    return Err(CaError::Expired(p.name.clone()));
                }
                not_after = not_after.min(p.not_after);
                (
                    p.subject_der.clone(),
                    p.ski.clone(),
                    p.keystore.as_ref(),
                    p.handle.clone(),
                    p.algorithm,
                    p.key_id,
                )
            }
            None => (
                subject.clone(),
                ski.clone(),
                keystore,
                key.handle.clone(),
                key.algorithm,
                key.id,
            ),
        };
        let serial = x509::random_serial(now_ms(self.clock.as_ref()))?;
        let tbs = x509::encode_tbs(x509::TbsParams {
            serial: &serial,
            signer: signer_alg,
            issuer_name_der: &issuer_name,
            subject_name_der: &subject,
            spki_der: &key.public_key_der,
            not_before,
            not_after,
            extensions: {
                let mut exts = x509::ca_extensions(&ski, &aki, policy.path_len)?;
                // An issuing CA's certificate says where its parent's CRL is.
                if let Some(urls) = parent.and_then(|p| self.revocation_urls(p)) {
                    exts.push(x509::crl_distribution_point(&urls.crl)?);
                }
                exts
            },
        })?;
        let signature = signer.sign(&signer_handle, signer_alg, &tbs).await?;
        let cert = x509::assemble(&tbs, signer_alg, &signature)?;
        // A faulty HSM signature must not become a CA certificate. A root is its own issuer.
        let issuer_cert = parent.map(|p| p.cert_der.as_slice()).unwrap_or(&cert);
        if !x509::verify_issued_by(&cert, issuer_cert) {
            return Err(CaError::BadSignature(policy.name.clone()));
        }
        keystore.store_certificate(&key.handle, &cert).await?;
        let fp = fingerprint(&cert);
        let serial_hex = hex::encode_upper(serial);
        let (complete, key_event) = keys::complete(key, now);
        let change = Change::new()
            .write(complete)
            .write(Write::InsertCa(CaRecord {
                name: policy.name.clone(),
                kind: policy.kind,
                parent: policy.parent.clone(),
                key_id: key.id,
                certificate_der: cert.clone(),
                created_at: now,
            }))
            .write(Write::InsertCertificate(CertificateRecord {
                serial: serial_hex.clone(),
                device_id: None,
                issuer_ca: policy.parent.clone().unwrap_or_else(|| policy.name.clone()),
                issuer_key_id: signer_key_id,
                subject: policy.subject.common_name.clone(),
                not_before,
                not_after,
                fingerprint_sha256: fp.clone(),
                der: cert,
                status: CertificateStatus::Valid,
                revoked_at: None,
                revocation_reason: None,
                created_at: now,
                superseded_by: None,
                spki_sha256: Some(super::spki_sha256(&key.public_key_der)),
            }))
            .audit(AuditDraft { actor: actor.to_string(), ..key_event })
            .audit(
                AuditDraft::new(actor, "ca.create", format!("ca:{}", policy.name)).details(json!({
                    "kind": match policy.kind { CaKind::Root => "root", CaKind::Issuing => "issuing" },
                    "parent": policy.parent,
                    "algorithm": policy.algorithm.as_str(),
                    "keystore": policy.keystore.as_deref().unwrap_or(crate::model::DEFAULT_KEYSTORE),
                    "attested": attestation.is_some(),
                    "attestation_fingerprint_sha256": attestation.as_ref().and_then(|c| c.first()).map(|c| fingerprint(c)),
                    "subject": policy.subject.common_name,
                    "serial": serial_hex,
                    "fingerprint_sha256": fp,
                    "not_after": not_after,
                })),
            );
        Ok(change)
    }

    /// Checks that the key of every CA that issues under a profile is active
    /// in the store and present on its token. Other CAs (an offline root on
    /// a YubiKey kept in a safe) may be absent while the daemon runs.
    pub async fn check_keys(&self) -> Result<(), CaError> {
        let needed = self.issuing_ca_names();
        for issuer in self.issuers() {
            if !needed.contains(issuer.name.as_str()) {
                continue;
            }
            let key = self.store.get_key(issuer.key_id).await?.ok_or_else(|| {
                CaError::KeyRecordMissing {
                    ca: issuer.name.clone(),
                    key_id: issuer.key_id,
                }
            })?;
            if key.state != KeyState::Active {
                return Err(CaError::KeyNotActive(issuer.name.clone()));
            }
            if !issuer.keystore.exists(&issuer.handle).await? {
                return Err(CaError::KeyStore(KeyStoreError::KeyNotFound(
                    issuer.handle.clone(),
                )));
            }
        }
        Ok(())
    }
}
