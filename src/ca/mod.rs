//! Certificate authorities: the hierarchy from policy, device certificates
//! from verified CSRs. The CA never sees key material; it asks the KeyStore
//! to sign the TBS bytes with the issuer's key handle.

pub mod csr;
pub mod keys;
pub mod x509;

use crate::audit::AuditDraft;
use crate::clock::Clock;
use crate::keystore::{KeyAlgorithm, KeyHandle, KeyStore, KeyStoreError, KeyStores};
use crate::policy::{CaKind, CaPolicy, Policies, ProfilePolicy};
use crate::store::{
    CaRecord, CertificateRecord, CertificateStatus, Change, KeyPurpose, KeyState, Store,
    StoreError, Write,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Csr(#[from] csr::CsrError),
    #[error(transparent)]
    KeyStore(#[from] KeyStoreError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    KeyLifecycle(#[from] keys::KeyLifecycleError),
    #[error("certificate encoding failed: {0}")]
    Encoding(#[from] der::Error),
    #[error("CA `{0}` does not exist (run `keyward init`)")]
    UnknownCa(String),
    #[error("the CA key of `{0}` is not active")]
    KeyNotActive(String),
    #[error("key algorithm {algorithm} is not allowed by profile `{profile}` (allowed: {allowed})")]
    AlgorithmNotAllowed {
        algorithm: KeyAlgorithm,
        profile: String,
        allowed: String,
    },
    #[error("CA `{0}` has expired or expires before any certificate could be valid")]
    Expired(String),
    #[error("the HSM returned a signature that does not verify for CA `{0}`")]
    BadSignature(String),
    #[error(transparent)]
    Random(#[from] crate::auth::RandomError),
}

/// A loaded issuing authority: what signing needs, parsed once.
#[derive(Clone)]
pub struct Issuer {
    pub name: String,
    pub kind: CaKind,
    pub key_id: Uuid,
    /// Name of the key store holding the key.
    pub keystore_name: String,
    pub keystore: Arc<dyn KeyStore>,
    pub handle: KeyHandle,
    pub algorithm: KeyAlgorithm,
    pub cert_der: Vec<u8>,
    pub subject_der: Vec<u8>,
    pub ski: Vec<u8>,
    pub not_after: i64,
    /// This CA's certificate followed by its parents' up to the root, PEM.
    pub chain_pem: String,
}

/// A signed device certificate and its store record.
pub struct IssuedCertificate {
    pub der: Vec<u8>,
    pub record: CertificateRecord,
}

pub struct CaService {
    keystores: KeyStores,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    policies: Arc<Policies>,
    issuers: RwLock<BTreeMap<String, Arc<Issuer>>>,
}

fn now_ms(clock: &dyn Clock) -> i64 {
    (clock.now().unix_timestamp_nanos() / 1_000_000) as i64
}

fn fingerprint(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

impl CaService {
    pub async fn new(
        keystores: KeyStores,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        policies: Arc<Policies>,
    ) -> Result<Self, CaError> {
        for ca in &policies.cas {
            if let Some(name) = &ca.keystore {
                keystores.get(name)?;
            }
        }
        let svc = Self {
            keystores,
            store,
            clock,
            policies,
            issuers: RwLock::new(BTreeMap::new()),
        };
        svc.reload().await?;
        Ok(svc)
    }

    /// Re-reads CAs and their keys from the store.
    pub async fn reload(&self) -> Result<(), CaError> {
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
                return Err(StoreError::Corrupt(format!(
                    "CA(s) {} reference parents that do not exist",
                    deferred
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .into());
            }
            remaining = deferred;
        }
        if let Ok(mut g) = self.issuers.write() {
            *g = loaded;
        }
        Ok(())
    }

    async fn load_issuer(
        &self,
        ca: &CaRecord,
        parent_chain: Option<String>,
    ) -> Result<Issuer, CaError> {
        let key = self.store.get_key(ca.key_id).await?.ok_or_else(|| {
            StoreError::Corrupt(format!(
                "CA {} references missing key {}",
                ca.name, ca.key_id
            ))
        })?;
        let summary = x509::summarize(&ca.certificate_der)?;
        let mut chain_pem = x509::to_pem(&ca.certificate_der)?;
        if let Some(parent) = parent_chain {
            chain_pem.push_str(&parent);
        }
        let keystore = self.keystores.get(&key.keystore).cloned().map_err(|_| {
            StoreError::Corrupt(format!(
                "CA {}'s key is in key store `{}`, which is not configured in keyward.toml",
                ca.name, key.keystore
            ))
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

    pub fn issuer(&self, name: &str) -> Result<Arc<Issuer>, CaError> {
        self.issuers
            .read()
            .ok()
            .and_then(|g| g.get(name).cloned())
            .ok_or_else(|| CaError::UnknownCa(name.to_string()))
    }

    pub fn issuers(&self) -> Vec<Arc<Issuer>> {
        self.issuers
            .read()
            .map(|g| g.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn keystores(&self) -> &KeyStores {
        &self.keystores
    }

    /// Names of the CAs that sign under some profile: the ones issuance needs.
    fn issuing_ca_names(&self) -> std::collections::BTreeSet<&str> {
        self.policies
            .profiles
            .values()
            .map(|p| p.issuer.as_str())
            .collect()
    }

    /// Names of the key stores that hold keys of issuing CAs (needed to issue).
    pub fn issuing_keystores(&self) -> std::collections::BTreeSet<String> {
        let needed = self.issuing_ca_names();
        self.issuers()
            .into_iter()
            .filter(|i| needed.contains(i.name.as_str()))
            .map(|i| i.keystore_name.clone())
            .collect()
    }

    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// Creates every CA in the policy that does not exist yet, parents first.
    /// Returns the names created. Safe to run again.
    pub async fn initialize(&self, actor: &str) -> Result<Vec<String>, CaError> {
        let mut created = Vec::new();
        for policy in &self.policies.cas {
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
            .unwrap_or_else(|| crate::config::DEFAULT_KEYSTORE.to_string());
        let keystore = self.keystores.get(&keystore_name)?.clone();
        let pending = keys::begin(
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
                extractable: false,
            },
        )
        .await?;
        match self
            .certify_ca(
                actor,
                policy,
                parent.as_deref(),
                keystore.as_ref(),
                &pending,
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => {
                keys::abandon(
                    keystore.as_ref(),
                    self.store.as_ref(),
                    self.clock.as_ref(),
                    actor,
                    &pending,
                    &e.to_string(),
                )
                .await;
                Err(e)
            }
        }
    }

    async fn certify_ca(
        &self,
        actor: &str,
        policy: &CaPolicy,
        parent: Option<&Issuer>,
        keystore: &dyn KeyStore,
        key: &keys::PendingKey,
    ) -> Result<(), CaError> {
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
            extensions: x509::ca_extensions(&ski, &aki, policy.path_len)?,
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
            }))
            .audit(AuditDraft { actor: actor.to_string(), ..key_event })
            .audit(
                AuditDraft::new(actor, "ca.create", format!("ca:{}", policy.name)).details(json!({
                    "kind": match policy.kind { CaKind::Root => "root", CaKind::Issuing => "issuing" },
                    "parent": policy.parent,
                    "algorithm": policy.algorithm.as_str(),
                    "keystore": policy.keystore.as_deref().unwrap_or(crate::config::DEFAULT_KEYSTORE),
                    "attested": attestation.is_some(),
                    "attestation_fingerprint_sha256": attestation.as_ref().and_then(|c| c.first()).map(|c| fingerprint(c)),
                    "subject": policy.subject.common_name,
                    "serial": serial_hex,
                    "fingerprint_sha256": fp,
                    "not_after": not_after,
                })),
            );
        self.store.commit(change).await?;
        Ok(())
    }

    /// Signs a device certificate for `device_id` under `profile`.
    /// Does not write to the store: the caller commits the record together
    /// with the registration change and its audit events.
    pub async fn sign_device_certificate(
        &self,
        profile: &ProfilePolicy,
        device_id: Uuid,
        csr: &csr::VerifiedCsr,
    ) -> Result<IssuedCertificate, CaError> {
        if !profile.key_algorithms.contains(&csr.algorithm) {
            return Err(CaError::AlgorithmNotAllowed {
                algorithm: csr.algorithm,
                profile: profile.name.clone(),
                allowed: profile
                    .key_algorithms
                    .iter()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let issuer = self.issuer(&profile.issuer)?;
        let now = self.clock.now().unix_timestamp();
        let not_before = now - i64::from(profile.backdate_seconds);
        let not_after = (now + i64::from(profile.validity_days) * 86_400).min(issuer.not_after);
        if not_after <= now {
            return Err(CaError::Expired(issuer.name.clone()));
        }
        let serial = x509::random_serial(now_ms(self.clock.as_ref()))?;
        let cn = device_id.to_string();
        let subject = x509::name_cn(&cn)?;
        let ski = x509::key_identifier(&csr.spki_der)?;
        let tbs = x509::encode_tbs(x509::TbsParams {
            serial: &serial,
            signer: issuer.algorithm,
            issuer_name_der: &issuer.subject_der,
            subject_name_der: &subject,
            spki_der: &csr.spki_der,
            not_before,
            not_after,
            extensions: x509::device_extensions(
                &ski,
                &issuer.ski,
                csr.algorithm,
                &profile.extended_key_usage,
                &format!("urn:uuid:{cn}"),
            )?,
        })?;
        let signature = issuer
            .keystore
            .sign(&issuer.handle, issuer.algorithm, &tbs)
            .await?;
        let der = x509::assemble(&tbs, issuer.algorithm, &signature)?;
        let record = CertificateRecord {
            serial: hex::encode_upper(serial),
            device_id: Some(device_id),
            issuer_ca: issuer.name.clone(),
            issuer_key_id: issuer.key_id,
            subject: cn,
            not_before,
            not_after,
            fingerprint_sha256: fingerprint(&der),
            der: der.clone(),
            status: CertificateStatus::Valid,
            revoked_at: None,
            revocation_reason: None,
            created_at: now,
        };
        Ok(IssuedCertificate { der, record })
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
            let key = self
                .store
                .get_key(issuer.key_id)
                .await?
                .ok_or_else(|| CaError::UnknownCa(issuer.name.clone()))?;
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
