//! Issuance: device certificates from verified CSRs under a profile, each
//! checked against its CA certificate before the caller may store it.

use super::{CaError, CaService, IssuedCertificate, csr, fingerprint, now_ms, x509};
use crate::policy::ProfilePolicy;
use crate::store::{CertificateRecord, CertificateStatus};
use uuid::Uuid;

impl CaService {
    /// Signs a device certificate for `device_id` under `profile` and checks
    /// the HSM's signature against the CA certificate.
    /// Does not write to the store: the caller commits the record together
    /// with the registration change and its audit events, so an error here
    /// leaves nothing behind.
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
                allowed: profile.key_algorithms.clone(),
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
                self.revocation_urls(&issuer).as_ref(),
            )?,
        })?;
        let signature = issuer
            .keystore
            .sign(&issuer.handle, issuer.algorithm, &tbs)
            .await?;
        let der = x509::assemble(&tbs, issuer.algorithm, &signature)?;
        // A faulty HSM (or a key that no longer matches the CA certificate)
        // must not hand out certificates nobody can verify. Costs one
        // signature verification per issuance; BENCHMARKS.md records it.
        if !x509::verify_issued_by(&der, &issuer.cert_der) {
            tracing::error!(
                ca = %issuer.name,
                serial = %hex::encode_upper(serial),
                "the HSM signed a device certificate that does not verify against the CA certificate; nothing issued"
            );
            return Err(CaError::DeviceSignatureInvalid(issuer.name.clone()));
        }
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
            superseded_by: None,
            spki_sha256: Some(super::spki_sha256(&csr.spki_der)),
        };
        Ok(IssuedCertificate { der, record })
    }
}
