//! `GET /v1/devices/me/config` (seed 003's shape): an enrolled device gets
//! its identity, current certificate and chain, and its group's rendered
//! configuration and broker topics in one call; while its registration
//! waits for approvers, it is told to come back.

use super::{RegistryError, RegistryService};
use crate::ca::{RenewalHint, x509};
use crate::policy::{BrokerAclRule, TemplateVars};
use crate::store::{DeviceStatus, RegistrationRecord, RegistrationStatus};
use serde::Serialize;
use uuid::Uuid;

/// Who asks.
pub enum ConfigCaller {
    /// The holder of a registration secret.
    Registration(Box<RegistrationRecord>),
    /// A device authenticated by its certificate (mTLS).
    Device(Uuid),
}

#[derive(Debug, Serialize)]
pub struct DeviceConfig {
    pub device_id: Uuid,
    pub status: DeviceStatus,
    pub group: String,
    pub certificate_serial: String,
    pub not_after: i64,
    pub certificate_pem: String,
    /// Issuing CA first, then its parents up to the root.
    pub chain_pem: String,
    pub device_config: serde_json::Value,
    pub broker_acl: Vec<BrokerAclRule>,
    /// The current certificate's renewal window (absent when its group's
    /// profile is gone from the policies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renewal: Option<RenewalHint>,
}

pub enum ConfigAnswer {
    Ready(Box<DeviceConfig>),
    /// The registration waits for its quorum.
    Pending {
        registration: Uuid,
        expires_at: i64,
    },
}

/// How long a waiting device should wait before asking again.
pub const PENDING_RETRY_SECONDS: u64 = 30;

impl RegistryService {
    pub async fn device_config(&self, caller: ConfigCaller) -> Result<ConfigAnswer, RegistryError> {
        let device_id = match caller {
            ConfigCaller::Registration(reg) => match reg.status {
                RegistrationStatus::Pending | RegistrationStatus::Approved => {
                    return Ok(ConfigAnswer::Pending {
                        registration: reg.id,
                        expires_at: reg.expires_at,
                    });
                }
                RegistrationStatus::Issued => reg.device_id,
                other => return Err(RegistryError::NotIssued(other)),
            },
            ConfigCaller::Device(id) => id,
        };
        let device = self
            .store
            .get_device(device_id)
            .await?
            .ok_or(RegistryError::DeviceNotFound)?;
        if device.status != DeviceStatus::Active {
            return Err(RegistryError::DeviceNotActive(device.status));
        }
        let group = self.group(&device.group)?;
        let now = self.clock.now().unix_timestamp();
        let cert = self
            .ca
            .current_certificate(device_id, now)
            .await
            .map_err(|e| match e {
                // A store failure stops here; only a missing certificate is "not issued".
                crate::ca::LifecycleError::Store(s) => RegistryError::Store(s),
                _ => RegistryError::NotIssued(RegistrationStatus::Issued),
            })?;
        let issuer = self.ca.issuer(&cert.issuer_ca)?;
        let id = device_id.to_string();
        let vars = TemplateVars {
            device_id: &id,
            device_name: &device.name,
            group: &group.name,
        };
        let renewal = self.ca.renewal_hint(&device.group, &cert, now);
        Ok(ConfigAnswer::Ready(Box::new(DeviceConfig {
            renewal,
            device_id,
            status: device.status,
            group: group.name.clone(),
            certificate_serial: cert.serial.clone(),
            not_after: cert.not_after,
            certificate_pem: x509::to_pem(&cert.der).map_err(|e| RegistryError::Ca(e.into()))?,
            chain_pem: issuer.chain_pem.clone(),
            device_config: group.render_device_config(&vars),
            broker_acl: group.render_broker_acl(&vars),
        })))
    }
}
