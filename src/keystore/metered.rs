//! A KeyStore decorator that times signatures and counts HSM outcomes.

use super::{
    Capabilities, GeneratedKey, KeyAlgorithm, KeyHandle, KeyProtection, KeySpec, KeyStore,
    KeyStoreError,
};
use crate::metrics::Metrics;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Instant;

pub struct MeteredKeyStore {
    /// The configured key store's name, the `keystore` label of its gauge.
    name: String,
    inner: Arc<dyn KeyStore>,
    metrics: Arc<Metrics>,
}

impl MeteredKeyStore {
    pub fn new(name: &str, inner: Arc<dyn KeyStore>, metrics: Arc<Metrics>) -> Self {
        Self {
            name: name.to_string(),
            inner,
            metrics,
        }
    }
}

#[async_trait]
impl KeyStore for MeteredKeyStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }
    fn planned_handle(&self, spec: &KeySpec) -> KeyHandle {
        self.inner.planned_handle(spec)
    }
    async fn generate(&self, spec: &KeySpec) -> Result<GeneratedKey, KeyStoreError> {
        let r = self.inner.generate(spec).await;
        self.metrics.hsm("generate", r.is_ok());
        r
    }
    async fn public_key(&self, handle: &KeyHandle) -> Result<Vec<u8>, KeyStoreError> {
        self.inner.public_key(handle).await
    }
    async fn sign(
        &self,
        handle: &KeyHandle,
        algorithm: KeyAlgorithm,
        message: &[u8],
    ) -> Result<Vec<u8>, KeyStoreError> {
        let start = Instant::now();
        let r = self.inner.sign(handle, algorithm, message).await;
        self.metrics
            .hsm_sign_seconds
            .observe(start.elapsed().as_secs_f64());
        self.metrics.hsm("sign", r.is_ok());
        r
    }
    async fn exists(&self, handle: &KeyHandle) -> Result<bool, KeyStoreError> {
        self.inner.exists(handle).await
    }
    async fn protection(&self, handle: &KeyHandle) -> Result<KeyProtection, KeyStoreError> {
        self.inner.protection(handle).await
    }
    async fn export_private_key(
        &self,
        handle: &KeyHandle,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyStoreError> {
        let r = self.inner.export_private_key(handle).await;
        self.metrics.hsm("export", r.is_ok());
        r
    }
    async fn wrap_private_key(
        &self,
        handle: &KeyHandle,
        kek: &zeroize::Zeroizing<[u8; 32]>,
    ) -> Result<Vec<u8>, KeyStoreError> {
        let r = self.inner.wrap_private_key(handle, kek).await;
        self.metrics.hsm("wrap", r.is_ok());
        r
    }
    async fn unwrap_private_key(
        &self,
        spec: &KeySpec,
        kek: &zeroize::Zeroizing<[u8; 32]>,
        wrapped: &[u8],
        public_key_der: &[u8],
    ) -> Result<GeneratedKey, KeyStoreError> {
        let r = self
            .inner
            .unwrap_private_key(spec, kek, wrapped, public_key_der)
            .await;
        self.metrics.hsm("unwrap", r.is_ok());
        r
    }
    async fn decrypt_data_key(
        &self,
        handle: &KeyHandle,
        ciphertext: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyStoreError> {
        let r = self.inner.decrypt_data_key(handle, ciphertext).await;
        self.metrics.hsm("decrypt", r.is_ok());
        r
    }
    async fn destroy(&self, handle: &KeyHandle) -> Result<(), KeyStoreError> {
        let r = self.inner.destroy(handle).await;
        self.metrics.hsm("destroy", r.is_ok());
        r
    }
    async fn store_certificate(
        &self,
        handle: &KeyHandle,
        cert_der: &[u8],
    ) -> Result<(), KeyStoreError> {
        self.inner.store_certificate(handle, cert_der).await
    }
    async fn attestation(&self, handle: &KeyHandle) -> Result<Option<Vec<Vec<u8>>>, KeyStoreError> {
        self.inner.attestation(handle).await
    }
    async fn list(&self) -> Result<Vec<(KeyHandle, String)>, KeyStoreError> {
        self.inner.list().await
    }
    async fn health(&self) -> Result<(), KeyStoreError> {
        let r = self.inner.health().await;
        self.metrics
            .hsm_up
            .with_label_values(&[&self.name])
            .set(i64::from(r.is_ok()));
        r
    }
    async fn close(&self) -> Result<(), KeyStoreError> {
        self.inner.close().await
    }
}
