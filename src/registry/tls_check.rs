//! The revocation hook of the TLS listener, answered from the store: a
//! client certificate is accepted when keyward issued exactly it, it is not
//! revoked, and its device is active. Suspended and revoked devices are
//! refused at the handshake.
//!
//! rustls asks synchronously, from inside the handshake; the store is
//! async. The bridge is the signer's (`tls::signer`): `block_in_place` +
//! `Handle::block_on` on the daemon's multi-thread runtime, so the wait
//! blocks only the connection being handshaken. Handshakes in progress are
//! capped by the listener.

use crate::store::{CertificateStatus, DeviceStatus, Store};
use crate::tls::{ClientCertCheck, ClientCertRefused};
use der::Decode;
use std::sync::Arc;

pub struct StoreClientCertCheck {
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for StoreClientCertCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreClientCertCheck")
    }
}

impl StoreClientCertCheck {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    async fn check_async(&self, leaf_der: &[u8]) -> Result<(), ClientCertRefused> {
        let cert =
            x509_cert::Certificate::from_der(leaf_der).map_err(|_| ClientCertRefused::Unknown)?;
        let serial = hex::encode_upper(cert.tbs_certificate().serial_number().as_bytes());
        let unavailable = |e: crate::store::StoreError| ClientCertRefused::Unavailable(Box::new(e));
        let record = self
            .store
            .get_certificate(&serial)
            .await
            .map_err(unavailable)?
            .ok_or(ClientCertRefused::Unknown)?;
        // Same serial from another issuer, or bytes keyward never signed.
        if record.der != leaf_der {
            return Err(ClientCertRefused::Unknown);
        }
        if record.on_hold() {
            return Err(ClientCertRefused::Suspended);
        }
        if record.status == CertificateStatus::Revoked {
            return Err(ClientCertRefused::Revoked);
        }
        let Some(device_id) = record.device_id else {
            return Err(ClientCertRefused::Unknown);
        };
        let device = self
            .store
            .get_device(device_id)
            .await
            .map_err(unavailable)?
            .ok_or(ClientCertRefused::Unknown)?;
        match device.status {
            DeviceStatus::Active => Ok(()),
            DeviceStatus::Suspended => Err(ClientCertRefused::Suspended),
            DeviceStatus::Revoked => Err(ClientCertRefused::Revoked),
        }
    }
}

impl ClientCertCheck for StoreClientCertCheck {
    fn check(&self, leaf_der: &[u8]) -> Result<(), ClientCertRefused> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let handle = Handle::try_current()
            .ok()
            .filter(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread)
            .ok_or_else(|| {
                ClientCertRefused::Unavailable("the check needs the multi-thread runtime".into())
            })?;
        tokio::task::block_in_place(|| handle.block_on(self.check_async(leaf_der)))
    }
}
