//! Delegated OCSP signers: for each CA that issues under a profile, a key in
//! the default key store and a certificate that CA issued for it (EKU
//! OCSPSigning, id-pkix-ocsp-nocheck), made and replaced by policy.
//!
//! Creating a signer follows the key lifecycle ([`keys::create`]):
//! 1. the key row is recorded `generating` and the key generated in the HSM;
//! 2. the issuing CA signs the signer certificate (checked against the CA
//!    certificate before anything is stored);
//! 3. ONE commit: the completed key, the certificate row, the service
//!    certificate row and the `ocsp.signer.create` audit event, and, for a
//!    rotation, the predecessor retired (service certificate retired, key
//!    `active → retired`, audited `ocsp.signer.retire`).
//!
//! Undo: a failure in 2 or 3 destroys the new HSM key and marks its row
//! `destroyed` ([`keys::abandon`]); a crash between 1 and 3 is reconciled at
//! the next start. The predecessor stays in service until the commit, so a
//! failed rotation leaves the old signer answering, and the next tick tries
//! again.

use super::{CaError, CaService, Issuer, fingerprint, keys, now_ms, x509};
use crate::audit::AuditDraft;
use crate::keystore::{KeyAlgorithm, KeyHandle, KeyStore};
use crate::store::{
    CertificateRecord, CertificateStatus, Change, KeyPurpose, KeyState, ServiceCertificateRecord,
    Write,
};
use serde_json::json;
use std::sync::Arc;
use uuid::Uuid;

/// A loaded delegated responder: what signing an OCSP response needs.
pub struct OcspSigner {
    /// The CA this signer answers for.
    pub issuer_ca: String,
    /// Upper-case hex serial of the signer certificate.
    pub serial: String,
    pub key_id: Uuid,
    pub keystore: Arc<dyn KeyStore>,
    pub handle: KeyHandle,
    pub algorithm: KeyAlgorithm,
    pub cert_der: Vec<u8>,
    /// ResponderID byKey.
    pub key_hash: [u8; 20],
    pub not_before: i64,
    pub not_after: i64,
}

/// How long the lease guarding one CA's signer creation holds (ms): far
/// more than a key generation and one CA signature take.
pub const SIGNER_LEASE_MS: i64 = 30_000;

/// How long a daemon waits for another daemon's signer before making its
/// own: the lease time and a margin (a holder that died lets it run out).
pub const SIGNER_WAIT: std::time::Duration = std::time::Duration::from_secs(35);

impl std::fmt::Debug for OcspSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OcspSigner")
            .field("issuer_ca", &self.issuer_ca)
            .field("serial", &self.serial)
            .field("key_id", &self.key_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl OcspSigner {
    /// Whether policy says to replace it at `now`.
    pub fn due(&self, now: i64, renew_before_days: u32) -> bool {
        now >= self.not_after - i64::from(renew_before_days) * 86_400
    }
}

impl CaService {
    /// The issuers that get a delegated OCSP signer: the CAs that sign under
    /// some profile (the ones devices' certificates name).
    pub fn ocsp_issuers(&self) -> Vec<Arc<Issuer>> {
        let names = self.issuing_ca_names();
        self.issuers()
            .into_iter()
            .filter(|i| names.contains(i.name.as_str()))
            .collect()
    }

    /// The active signer of `issuer` from the store: the newest service
    /// certificate that is not retired, certified by the CA's current key,
    /// whose key is active and in a configured key store. `None` if there is
    /// none (then one has to be made).
    pub async fn load_ocsp_signer(&self, issuer: &Issuer) -> Result<Option<OcspSigner>, CaError> {
        for svc in self
            .store
            .service_certificates(KeyPurpose::OcspSigning)
            .await?
        {
            if svc.issuer_ca != issuer.name {
                continue;
            }
            let Some(cert) = self.store.get_certificate(&svc.serial).await? else {
                continue;
            };
            if cert.issuer_key_id != issuer.key_id {
                // Certified by a previous CA key: not valid under the current CA certificate.
                continue;
            }
            let Some(key) = self.store.get_key(svc.key_id).await? else {
                continue;
            };
            if key.state != KeyState::Active {
                continue;
            }
            let Ok(keystore) = self.keystores.get(&key.keystore).cloned() else {
                tracing::warn!(ca = %issuer.name, keystore = %key.keystore, "OCSP signer key in a key store that is not configured; making a new one");
                continue;
            };
            return Ok(Some(OcspSigner {
                issuer_ca: issuer.name.clone(),
                serial: svc.serial.clone(),
                key_id: key.id,
                keystore,
                handle: key.handle.clone(),
                algorithm: key.algorithm,
                key_hash: super::ocsp::responder_key_hash(&key.public_key_der)?,
                cert_der: cert.der,
                not_before: cert.not_before,
                not_after: cert.not_after,
            }));
        }
        Ok(None)
    }

    /// Makes a new delegated signer for `issuer` (see the module docs for the
    /// steps and their undo). With `replaces`, the predecessor is retired in
    /// the same commit.
    pub async fn create_ocsp_signer(
        &self,
        actor: &str,
        issuer: &Issuer,
        replaces: Option<&OcspSigner>,
    ) -> Result<OcspSigner, CaError> {
        self.create_ocsp_signer_with(actor, issuer, replaces, |_| Change::new())
            .await
    }

    /// [`Self::create_ocsp_signer`] for a daemon that may share the store
    /// with others starting or renewing at the same moment: without a
    /// guard, two daemons that both find no signer (or the same due one)
    /// would each make one, and a CA would have two active signers. So the
    /// creation runs under a store lease `ocsp-signer:<ca>`
    /// ([`SIGNER_LEASE_MS`]); under it the store's active signer is read
    /// again and used if it is usable and not `replaces` (another daemon
    /// made it meanwhile). A daemon that finds the lease taken waits for
    /// the other's signer to appear. A holder that dies leaves the lease to
    /// run out; after waiting [`SIGNER_WAIT`] the daemon makes one anyway
    /// (at worst two signers, each valid, as without the guard).
    pub async fn create_ocsp_signer_once(
        &self,
        actor: &str,
        issuer: &Issuer,
        replaces: Option<&OcspSigner>,
        renew_before_days: u32,
    ) -> Result<OcspSigner, CaError> {
        let lease = format!("ocsp-signer:{}", issuer.name);
        let holder = format!("{}:{}", std::process::id(), Uuid::new_v4().simple());
        let usable = |s: &OcspSigner, now: i64| {
            !s.due(now, renew_before_days) && replaces.is_none_or(|r| r.serial != s.serial)
        };
        let waited = std::time::Instant::now();
        loop {
            let now_ms = now_ms(self.clock.as_ref());
            if self
                .store
                .try_lease(&lease, &holder, now_ms, SIGNER_LEASE_MS)
                .await?
            {
                let result = match self.load_ocsp_signer(issuer).await {
                    Ok(Some(s)) if usable(&s, self.clock.now().unix_timestamp()) => {
                        tracing::info!(ca = %issuer.name, serial = %s.serial, "OCSP signer made by another daemon; using it");
                        Ok(s)
                    }
                    Ok(_) => self.create_ocsp_signer(actor, issuer, replaces).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = self.store.release_lease(&lease, &holder).await {
                    tracing::warn!(lease = %lease, code = e.code(), error = %e, "could not release the OCSP signer lease; it runs out by itself");
                }
                return result;
            }
            if waited.elapsed() >= SIGNER_WAIT {
                tracing::warn!(ca = %issuer.name, "another daemon has held the OCSP signer lease too long; making a signer anyway");
                return self.create_ocsp_signer(actor, issuer, replaces).await;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            if let Some(s) = self.load_ocsp_signer(issuer).await?
                && usable(&s, self.clock.now().unix_timestamp())
            {
                tracing::info!(ca = %issuer.name, serial = %s.serial, "OCSP signer made by another daemon; using it");
                return Ok(s);
            }
        }
    }

    /// [`Self::create_ocsp_signer`], committing `also(new key)` in the same
    /// change (a rotation's step).
    pub async fn create_ocsp_signer_with(
        &self,
        actor: &str,
        issuer: &Issuer,
        replaces: Option<&OcspSigner>,
        also: impl FnOnce(&keys::PendingKey) -> Change + Send,
    ) -> Result<OcspSigner, CaError> {
        let policies = self.policies();
        let policy = &policies.revocation;
        let keystore_name = crate::model::DEFAULT_KEYSTORE;
        let keystore = self.keystores.get(keystore_name)?.clone();
        let mut made: Option<OcspSigner> = None;
        keys::create(
            keystore.as_ref(),
            self.store.as_ref(),
            self.clock.as_ref(),
            actor,
            keys::NewKey {
                keystore: keystore_name,
                label: format!(
                    "keyward-ocsp-{}-{}",
                    issuer.name,
                    now_ms(self.clock.as_ref())
                ),
                purpose: KeyPurpose::OcspSigning,
                algorithm: policy.ocsp_signer_algorithm,
                ca_name: Some(&issuer.name),
                extractable: false,
            },
            async |pending| {
                let (change, signer) = self
                    .certify_ocsp_signer(actor, issuer, &keystore, pending, replaces)
                    .await?;
                made = Some(signer);
                Ok::<_, CaError>(change.merge(also(pending)))
            },
        )
        .await?;
        made.ok_or_else(|| CaError::BadSignature(issuer.name.clone()))
    }

    async fn certify_ocsp_signer(
        &self,
        actor: &str,
        issuer: &Issuer,
        keystore: &Arc<dyn KeyStore>,
        key: &keys::PendingKey,
        replaces: Option<&OcspSigner>,
    ) -> Result<(Change, OcspSigner), CaError> {
        let policies = self.policies();
        let policy = &policies.revocation;
        let now = self.clock.now().unix_timestamp();
        if issuer.not_after <= now {
            return Err(CaError::Expired(issuer.name.clone()));
        }
        let not_before = now - 300;
        let not_after =
            (now + i64::from(policy.ocsp_signer_validity_days) * 86_400).min(issuer.not_after);
        let serial = x509::random_serial(now_ms(self.clock.as_ref()))?;
        let subject_cn = format!("keyward OCSP responder for {}", issuer.name);
        let subject = x509::name_cn(&subject_cn)?;
        let ski = x509::key_identifier(&key.public_key_der)?;
        let tbs = x509::encode_tbs(x509::TbsParams {
            serial: &serial,
            signer: issuer.algorithm,
            issuer_name_der: &issuer.subject_der,
            subject_name_der: &subject,
            spki_der: &key.public_key_der,
            not_before,
            not_after,
            extensions: x509::ocsp_signer_extensions(&ski, &issuer.ski)?,
        })?;
        let signature = issuer
            .keystore
            .sign(&issuer.handle, issuer.algorithm, &tbs)
            .await?;
        let cert = x509::assemble(&tbs, issuer.algorithm, &signature)?;
        if !x509::verify_issued_by(&cert, &issuer.cert_der) {
            return Err(CaError::BadSignature(issuer.name.clone()));
        }
        keystore.store_certificate(&key.handle, &cert).await?;
        let serial_hex = hex::encode_upper(serial);
        let fp = fingerprint(&cert);
        let (complete, key_event) = keys::complete(key, now);
        let mut change = Change::new()
            .write(complete)
            .write(Write::InsertCertificate(CertificateRecord {
                serial: serial_hex.clone(),
                device_id: None,
                issuer_ca: issuer.name.clone(),
                issuer_key_id: issuer.key_id,
                subject: subject_cn,
                not_before,
                not_after,
                fingerprint_sha256: fp.clone(),
                der: cert.clone(),
                status: CertificateStatus::Valid,
                revoked_at: None,
                revocation_reason: None,
                created_at: now,
                superseded_by: None,
                spki_sha256: Some(super::spki_sha256(&key.public_key_der)),
            }))
            .write(Write::InsertServiceCertificate(ServiceCertificateRecord {
                serial: serial_hex.clone(),
                purpose: KeyPurpose::OcspSigning,
                issuer_ca: issuer.name.clone(),
                key_id: key.id,
                not_after,
                retired_at: None,
                created_at: now,
            }))
            .audit(AuditDraft {
                actor: actor.to_string(),
                ..key_event
            })
            .audit(
                AuditDraft::new(actor, "ocsp.signer.create", format!("ca:{}", issuer.name))
                    .details(json!({
                        "serial": serial_hex,
                        "key": key.id,
                        "algorithm": key.algorithm.as_str(),
                        "fingerprint_sha256": fp,
                        "not_before": not_before,
                        "not_after": not_after,
                        "replaces": replaces.map(|r| r.serial.clone()),
                    })),
            );
        if let Some(old) = replaces {
            change = change
                .write(Write::RetireServiceCertificate {
                    serial: old.serial.clone(),
                    at: now,
                })
                .write(Write::SetKeyState {
                    id: old.key_id,
                    from: KeyState::Active,
                    to: KeyState::Retired,
                    at: now,
                })
                .audit(
                    AuditDraft::new(actor, "ocsp.signer.retire", format!("ca:{}", issuer.name))
                        .details(json!({
                            "serial": old.serial,
                            "key": old.key_id,
                            "not_after": old.not_after,
                            "successor": serial_hex,
                        })),
                );
        }
        let signer = OcspSigner {
            issuer_ca: issuer.name.clone(),
            serial: serial_hex,
            key_id: key.id,
            keystore: keystore.clone(),
            handle: key.handle.clone(),
            algorithm: key.algorithm,
            key_hash: super::ocsp::responder_key_hash(&key.public_key_der)?,
            cert_der: cert,
            not_before,
            not_after,
        };
        Ok((change, signer))
    }
}
