//! keyward's own TLS server certificate (`[server.tls] issue = true`): a key
//! generated in the default key store, a certificate from a configured
//! issuing CA, stored as a `tls-server` service certificate, renewed before
//! expiry with a fresh key.
//!
//! Issuing (and renewing) is the key lifecycle of [`super::keys`]:
//! 1. record the key `generating` and generate it in the HSM (`keys::begin`);
//! 2. sign the certificate with the issuing CA and check the signature;
//! 3. one commit: the key becomes active, the certificate and its service
//!    row are inserted, and the certificates this one replaces are retired
//!    (service row retired, certificate superseded, key retired), each with
//!    its audit event.
//!
//! Undo: a failure in 2 or 3 destroys the new HSM key and marks its row
//! destroyed (`keys::create`); nothing else was written, and the old
//! certificate stays in service. A crash between 1 and 3 leaves a
//! `generating` row that start-up reconciliation cleans up.

use super::{CaError, CaService, Issuer, fingerprint, keys, now_ms, x509};
use crate::audit::AuditDraft;
use crate::keystore::{KeyAlgorithm, KeyHandle, KeyStore};
use crate::policy::CaKind;
use crate::store::{
    CertificateRecord, CertificateStatus, Change, KeyPurpose, KeyState, ServiceCertificateRecord,
    Write,
};
use der::Decode;
use serde_json::json;
use std::net::IpAddr;
use std::sync::Arc;
use uuid::Uuid;

/// What the server certificate must say (from `[server.tls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsServerProfile {
    pub issuer: String,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub validity_days: u32,
    pub key_algorithm: KeyAlgorithm,
}

/// A server certificate in service and its HSM key.
#[derive(Clone)]
pub struct TlsServerCredential {
    pub serial: String,
    pub key_id: Uuid,
    pub keystore: Arc<dyn KeyStore>,
    pub handle: KeyHandle,
    pub algorithm: KeyAlgorithm,
    /// DER SubjectPublicKeyInfo of the key.
    pub spki_der: Vec<u8>,
    /// The server certificate, then the issuer's chain up to the root (DER).
    pub chain: Vec<Vec<u8>>,
    pub not_after: i64,
}

impl std::fmt::Debug for TlsServerCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServerCredential")
            .field("serial", &self.serial)
            .field("key_id", &self.key_id)
            .field("not_after", &self.not_after)
            .finish()
    }
}

const ACTOR: &str = "system";
/// Seconds the server certificate's notBefore is set back (clock skew of clients).
const BACKDATE: i64 = 300;

/// The DER of the subjectAltName extension value the profile asks for.
fn san_value(profile: &TlsServerProfile) -> Result<Vec<u8>, CaError> {
    let exts = x509::server_extensions(
        &[0],
        &[0],
        profile.key_algorithm,
        &profile.dns_names,
        &profile.ip_addresses,
    )?;
    Ok(exts
        .into_iter()
        .find(|e| e.extn_id == const_oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME)
        .map(|e| e.extn_value.as_bytes().to_vec())
        .unwrap_or_default())
}

/// Whether `cert_der` names exactly the profile's SANs.
fn same_names(cert_der: &[u8], profile: &TlsServerProfile) -> Result<bool, CaError> {
    let cert = x509_cert::Certificate::from_der(cert_der)?;
    let want = san_value(profile)?;
    Ok(cert
        .tbs_certificate()
        .extensions()
        .into_iter()
        .flatten()
        .find(|e| e.extn_id == const_oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME)
        .is_some_and(|e| e.extn_value.as_bytes() == want))
}

/// PEM chain to DER certificates.
fn pem_chain(pem: &str) -> Vec<Vec<u8>> {
    pem.split_inclusive("-----END CERTIFICATE-----")
        .filter_map(|block| {
            let start = block.find("-----BEGIN CERTIFICATE-----")?;
            der::pem::decode_vec(&block.as_bytes()[start..])
                .ok()
                .map(|(_, der)| der)
        })
        .collect()
}

impl CaService {
    fn tls_issuer(&self, name: &str) -> Result<Arc<Issuer>, CaError> {
        let issuer = self.issuer(name)?;
        if issuer.kind != CaKind::Issuing {
            return Err(CaError::NotAnIssuingCa(name.to_string()));
        }
        Ok(issuer)
    }

    /// The server certificates in service (not retired), newest first.
    async fn tls_server_in_service(&self) -> Result<Vec<ServiceCertificateRecord>, CaError> {
        Ok(self
            .store
            .service_certificates(KeyPurpose::TlsServer)
            .await?)
    }

    /// The newest server certificate in service that fits `profile`, is
    /// valid (not revoked) and not yet due for renewal at `renew_at_or_after`
    /// seconds before its end, with its key active in a configured key store.
    pub async fn current_tls_server(
        &self,
        profile: &TlsServerProfile,
        renew_before_secs: i64,
    ) -> Result<Option<TlsServerCredential>, CaError> {
        let now = self.clock.now().unix_timestamp();
        let issuer = self.tls_issuer(&profile.issuer)?;
        for svc in self.tls_server_in_service().await? {
            if svc.issuer_ca != profile.issuer || svc.not_after - renew_before_secs <= now {
                continue;
            }
            let Some(cert) = self.store.get_certificate(&svc.serial).await? else {
                continue;
            };
            let Some(key) = self.store.get_key(svc.key_id).await? else {
                continue;
            };
            if cert.status != CertificateStatus::Valid
                || key.state != KeyState::Active
                || key.algorithm != profile.key_algorithm
                || !same_names(&cert.der, profile)?
            {
                continue;
            }
            let Ok(keystore) = self.keystores.get(&key.keystore).cloned() else {
                continue;
            };
            let mut chain = vec![cert.der.clone()];
            chain.extend(pem_chain(&issuer.chain_pem));
            return Ok(Some(TlsServerCredential {
                serial: svc.serial,
                key_id: key.id,
                keystore,
                handle: key.handle,
                algorithm: key.algorithm,
                spki_der: key.public_key_der,
                chain,
                not_after: svc.not_after,
            }));
        }
        Ok(None)
    }

    /// Issues a new server certificate with a new key and retires every
    /// server certificate still in service (see the module comment).
    pub async fn issue_tls_server(
        &self,
        profile: &TlsServerProfile,
    ) -> Result<TlsServerCredential, CaError> {
        let issuer = self.tls_issuer(&profile.issuer)?;
        let replaced = self.tls_server_in_service().await?;
        let keystore = self.keystores.get(crate::model::DEFAULT_KEYSTORE)?.clone();
        let mut issued: Option<(Vec<u8>, String, i64)> = None;
        let key_id = keys::create(
            keystore.as_ref(),
            self.store.as_ref(),
            self.clock.as_ref(),
            ACTOR,
            keys::NewKey {
                keystore: crate::model::DEFAULT_KEYSTORE,
                label: "keyward-tls-server".to_string(),
                purpose: KeyPurpose::TlsServer,
                algorithm: profile.key_algorithm,
                ca_name: None,
                extractable: false,
            },
            async |key: &keys::PendingKey| -> Result<Change, CaError> {
                let (der, record) = self.sign_tls_server(&issuer, profile, key).await?;
                let now = record.created_at;
                let (complete, key_event) = keys::complete(key, now);
                let mut change = Change::new()
                    .write(complete)
                    .audit(key_event)
                    .write(Write::InsertCertificate(record.clone()))
                    .write(Write::InsertServiceCertificate(ServiceCertificateRecord {
                        serial: record.serial.clone(),
                        purpose: KeyPurpose::TlsServer,
                        issuer_ca: issuer.name.clone(),
                        key_id: key.id,
                        not_after: record.not_after,
                        retired_at: None,
                        created_at: now,
                    }))
                    .audit(
                        AuditDraft::new(
                            ACTOR,
                            "tls.server_certificate_issue",
                            format!("certificate:{}", record.serial),
                        )
                        .details(json!({
                            "issuer": issuer.name,
                            "key_id": key.id,
                            "dns_names": profile.dns_names,
                            "ip_addresses": profile.ip_addresses,
                            "not_after": record.not_after,
                            "replaces": replaced.iter().map(|r| &r.serial).collect::<Vec<_>>(),
                        })),
                    );
                for old in &replaced {
                    change = change.write(Write::RetireServiceCertificate {
                        serial: old.serial.clone(),
                        at: now,
                    });
                    // A key already gone (destroyed: lost with the token a
                    // restore replaced) has nothing left to retire.
                    let old_active = self
                        .store
                        .get_key(old.key_id)
                        .await?
                        .is_some_and(|k| k.state == KeyState::Active);
                    if old_active {
                        change = change.write(Write::SetKeyState {
                            id: old.key_id,
                            from: KeyState::Active,
                            to: KeyState::Retired,
                            at: now,
                        });
                    }
                    change = change.audit(
                        AuditDraft::new(ACTOR, "key.retire", format!("key:{}", old.key_id))
                            .details(json!({
                                "purpose": KeyPurpose::TlsServer.as_str(),
                                "certificate": old.serial,
                                "successor": record.serial,
                                // false: the key was no longer active (already
                                // destroyed); only its certificate is retired.
                                "key_retired": old_active,
                            })),
                    );
                    if let Some(c) = self.store.get_certificate(&old.serial).await?
                        && c.status == CertificateStatus::Valid
                    {
                        change = change.write(Write::SupersedeCertificate {
                            serial: old.serial.clone(),
                            by: record.serial.clone(),
                            at: now,
                        });
                    }
                }
                issued = Some((der, record.serial.clone(), record.not_after));
                Ok(change)
            },
        )
        .await?;
        // `create` succeeded, so `use_key` ran and committed: `issued` is set.
        let (der, serial, not_after) = issued.ok_or(CaError::KeyRecordMissing {
            ca: issuer.name.clone(),
            key_id,
        })?;
        let key = self
            .store
            .get_key(key_id)
            .await?
            .ok_or(CaError::KeyRecordMissing {
                ca: issuer.name.clone(),
                key_id,
            })?;
        let mut chain = vec![der];
        chain.extend(pem_chain(&issuer.chain_pem));
        Ok(TlsServerCredential {
            serial,
            key_id,
            keystore,
            handle: key.handle,
            algorithm: key.algorithm,
            spki_der: key.public_key_der,
            chain,
            not_after,
        })
    }

    /// Builds the server certificate for `key`, has the issuer sign it in
    /// its key store, and checks the signature. Writes nothing.
    async fn sign_tls_server(
        &self,
        issuer: &Issuer,
        profile: &TlsServerProfile,
        key: &keys::PendingKey,
    ) -> Result<(Vec<u8>, CertificateRecord), CaError> {
        let now = self.clock.now().unix_timestamp();
        let not_before = now - BACKDATE;
        let not_after = (now + i64::from(profile.validity_days) * 86_400).min(issuer.not_after);
        if not_after <= now {
            return Err(CaError::Expired(issuer.name.clone()));
        }
        let serial = x509::random_serial(now_ms(self.clock.as_ref()))?;
        let cn = profile
            .dns_names
            .first()
            .cloned()
            .or_else(|| profile.ip_addresses.first().map(ToString::to_string))
            .unwrap_or_else(|| "keyward".to_string());
        let subject = x509::name_cn(&cn)?;
        let ski = x509::key_identifier(&key.public_key_der)?;
        let tbs = x509::encode_tbs(x509::TbsParams {
            serial: &serial,
            signer: issuer.algorithm,
            issuer_name_der: &issuer.subject_der,
            subject_name_der: &subject,
            spki_der: &key.public_key_der,
            not_before,
            not_after,
            extensions: x509::server_extensions(
                &ski,
                &issuer.ski,
                key.algorithm,
                &profile.dns_names,
                &profile.ip_addresses,
            )?,
        })?;
        let signature = issuer
            .keystore
            .sign(&issuer.handle, issuer.algorithm, &tbs)
            .await?;
        let der = x509::assemble(&tbs, issuer.algorithm, &signature)?;
        if !x509::verify_issued_by(&der, &issuer.cert_der) {
            return Err(CaError::DeviceSignatureInvalid(issuer.name.clone()));
        }
        let record = CertificateRecord {
            serial: hex::encode_upper(serial),
            device_id: None,
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
            spki_sha256: Some(super::spki_sha256(&key.public_key_der)),
        };
        Ok((der, record))
    }
}
