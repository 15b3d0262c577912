//! The CA side of rotating an issuing CA's key (the steps and their
//! records are `crate::rotation`): certifying the successor key by the
//! parent, with the CA's own subject so that relying parties chain old and
//! new certificates to the same name, told apart by their key identifiers.

use super::{CaError, CaService, Issuer, fingerprint, now_ms, x509};
use crate::policy::CaKind;
use crate::store::{CertificateRecord, CertificateStatus, KeyRecord};
use std::sync::Arc;

impl CaService {
    /// The parent of `ca` (`None` for a root).
    pub fn parent_of(&self, ca: &str) -> Result<Option<Arc<Issuer>>, CaError> {
        let policies = self.policies();
        let parent = policies
            .cas
            .iter()
            .find(|p| p.name == ca)
            .and_then(|p| p.parent.clone());
        parent.map(|p| self.issuer(&p)).transpose()
    }

    /// Whether certifying a successor of `ca` needs a card-held key (its
    /// parent's key is on a YubiKey): never done by the scheduler.
    pub fn parent_on_card(&self, ca: &str) -> bool {
        matches!(self.parent_of(ca), Ok(Some(p)) if p.keystore.backend() == "yubikey")
    }

    /// Signs the certificate of `new_key`, the successor key of issuing CA
    /// `ca`, by the parent's key, and checks the signature. Writes nothing
    /// (the caller commits the record with its rotation step).
    pub async fn certify_successor(
        &self,
        ca: &str,
        new_key: &KeyRecord,
    ) -> Result<CertificateRecord, CaError> {
        let current = self.issuer(ca)?;
        if current.kind != CaKind::Issuing {
            return Err(CaError::NotAnIssuingCa(ca.to_string()));
        }
        let parent = self
            .parent_of(ca)?
            .ok_or_else(|| CaError::NotAnIssuingCa(ca.to_string()))?;
        let policies = self.policies();
        let policy = policies
            .cas
            .iter()
            .find(|p| p.name == ca)
            .ok_or_else(|| CaError::UnknownCa(ca.to_string()))?;
        let now = self.clock.now().unix_timestamp();
        if parent.not_after <= now {
            return Err(CaError::Expired(parent.name.clone()));
        }
        let not_before = now - 300;
        let not_after = (now + i64::from(policy.validity_days) * 86_400).min(parent.not_after);
        let ski = x509::key_identifier(&new_key.public_key_der)?;
        let serial = x509::random_serial(now_ms(self.clock.as_ref()))?;
        let tbs = x509::encode_tbs(x509::TbsParams {
            serial: &serial,
            signer: parent.algorithm,
            issuer_name_der: &parent.subject_der,
            subject_name_der: &current.subject_der,
            spki_der: &new_key.public_key_der,
            not_before,
            not_after,
            extensions: {
                let mut exts = x509::ca_extensions(&ski, &parent.ski, policy.path_len)?;
                if let Some(urls) = self.revocation_urls(&parent) {
                    exts.push(x509::crl_distribution_point(&urls.crl)?);
                }
                exts
            },
        })?;
        let signature = parent
            .keystore
            .sign(&parent.handle, parent.algorithm, &tbs)
            .await?;
        let cert = x509::assemble(&tbs, parent.algorithm, &signature)?;
        if !x509::verify_issued_by(&cert, &parent.cert_der) {
            return Err(CaError::BadSignature(ca.to_string()));
        }
        Ok(CertificateRecord {
            serial: hex::encode_upper(serial),
            device_id: None,
            issuer_ca: parent.name.clone(),
            issuer_key_id: parent.key_id,
            subject: policy.subject.common_name.clone(),
            not_before,
            not_after,
            fingerprint_sha256: fingerprint(&cert),
            der: cert,
            status: CertificateStatus::Valid,
            revoked_at: None,
            revocation_reason: None,
            created_at: now,
            superseded_by: None,
            spki_sha256: Some(super::spki_sha256(&new_key.public_key_der)),
        })
    }
}
