//! One-time delivery of a key keyward generated for a device
//! (`key_source = "server"`): exported from the HSM by wrapping, encrypted
//! for the device (an age bundle to the recipient it registered, or a
//! PKCS#12 under a one-time password returned only to the registration
//! secret's holder), recorded as delivered in the same commit as the
//! delivery's audit event, then destroyed in the HSM unless the group
//! escrows it. The plaintext exists only in this process's memory, zeroized.

use super::delivery::{self, AgeRecipient};
use super::{RegistryError, RegistryService};
use crate::audit::{AuditDraft, Outcome};
use crate::store::{Change, KeyState, RegistrationRecord, Write};
use base64::Engine;
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::json;

/// The encrypted key, as the device receives it (once).
#[derive(Debug, Serialize)]
pub struct KeyBundle {
    /// `age` (ASCII-armored age file: key, certificate, chain as PEM) or
    /// `pkcs12` (base64 DER).
    pub format: &'static str,
    pub data: String,
    /// PKCS#12 only: the one-time password (shown this once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

fn delivery_error(e: delivery::DeliveryError) -> RegistryError {
    if !e.is_bad_input() {
        tracing::error!(error = %e, "building the key bundle failed");
    }
    RegistryError::Delivery {
        code: e.code(),
        message: e.to_string(),
    }
}

impl RegistryService {
    /// Builds the bundle for `reg`'s undelivered server key; returns it with
    /// the write and event that must commit with the delivery.
    pub(super) async fn key_bundle(
        &self,
        reg: &RegistrationRecord,
        certificate_der: &[u8],
        chain_pem: &str,
        now: i64,
    ) -> Result<(KeyBundle, Write, AuditDraft), RegistryError> {
        let key_id = reg.server_key_id.ok_or_else(|| {
            RegistryError::Store(crate::store::StoreError::Corrupt(format!(
                "registration {} has a server key source but no key",
                reg.id
            )))
        })?;
        let key = self.store.get_key(key_id).await?.ok_or_else(|| {
            RegistryError::Store(crate::store::StoreError::Corrupt(format!(
                "key {key_id} missing"
            )))
        })?;
        let keystore = self.ca.keystores().get(&key.keystore)?.clone();
        let pkcs8 = keystore.export_private_key(&key.handle).await?;
        let (bundle, format, recipient) = match &reg.age_recipient {
            Some(r) => {
                let recipient = AgeRecipient::parse(r).map_err(delivery_error)?;
                let armored = delivery::age_bundle(&recipient, &pkcs8, certificate_der, chain_pem)
                    .map_err(delivery_error)?;
                (
                    KeyBundle {
                        format: "age",
                        data: String::from_utf8_lossy(&armored).into_owned(),
                        password: None,
                    },
                    "age",
                    Some(recipient.as_str().to_string()),
                )
            }
            None => {
                let chain = crate::ca::x509::pem_chain_to_der(chain_pem).map_err(|e| {
                    RegistryError::Store(crate::store::StoreError::Corrupt(format!(
                        "issuer chain: {e}"
                    )))
                })?;
                let password = delivery::one_time_password().map_err(delivery_error)?;
                let p12 = delivery::pkcs12(
                    &pkcs8,
                    certificate_der,
                    &chain,
                    &password,
                    &reg.device_id.to_string(),
                )
                .map_err(delivery_error)?;
                (
                    KeyBundle {
                        format: "pkcs12",
                        data: base64::engine::general_purpose::STANDARD.encode(p12),
                        password: Some(password.expose_secret().to_string()),
                    },
                    "pkcs12",
                    None,
                )
            }
        };
        drop(pkcs8);
        Ok((
            bundle,
            Write::MarkKeyDelivered {
                registration_id: reg.id,
                at: now,
            },
            AuditDraft::new(
                format!("registration:{}", reg.id),
                "device_key.deliver",
                format!("key:{key_id}"),
            )
            .details(json!({
                "device_id": reg.device_id,
                "format": format,
                "age_recipient": recipient,
            })),
        ))
    }

    /// After delivery: destroys the HSM copy unless the group escrows it.
    /// A failure is logged and audited; the key stays `active` in the store
    /// (an operator can destroy it with the key tools), never lost track of.
    pub(super) async fn retire_delivered_key(&self, reg: &RegistrationRecord, escrow: bool) {
        let Some(key_id) = reg.server_key_id else {
            return;
        };
        if escrow {
            return;
        }
        let now = self.clock.now().unix_timestamp();
        let key = match self.store.get_key(key_id).await {
            Ok(Some(k)) => k,
            other => {
                tracing::error!(key = %key_id, result = ?other.map(|k| k.is_some()), "delivered key not found for destruction");
                return;
            }
        };
        let destroyed = match self.ca.keystores().get(&key.keystore) {
            Ok(ks) => ks.destroy(&key.handle).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let change = match &destroyed {
            Ok(()) => Change::new()
                .write(Write::SetKeyState {
                    id: key_id,
                    from: KeyState::Active,
                    to: KeyState::Destroyed,
                    at: now,
                })
                .audit(
                    AuditDraft::new("system", "key.destroy", format!("key:{key_id}")).details(
                        json!({ "reason": "delivered to its device", "device_id": reg.device_id }),
                    ),
                ),
            Err(e) => Change::new().audit(
                AuditDraft::new("system", "key.destroy", format!("key:{key_id}"))
                    .outcome(Outcome::Failure)
                    .details(json!({ "reason": "delivered to its device", "error": e })),
            ),
        };
        if let Err(e) = self.store.commit(change).await {
            tracing::error!(key = %key_id, error = %e, "could not record the delivered key's destruction");
        }
        if let Err(e) = destroyed {
            tracing::error!(key = %key_id, error = %e, "could not destroy a delivered device key in the HSM");
        }
    }
}
