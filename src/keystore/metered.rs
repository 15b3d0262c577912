//! A KeyStore decorator that times key store operations and counts their
//! outcomes, by key store name; and the scrape-time pool and queue gauges.

use super::{
    Capabilities, GeneratedKey, KeyAlgorithm, KeyHandle, KeyProtection, KeySpec, KeyStore,
    KeyStoreError, KeyStores, PoolStats,
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

/// The operations counted and timed, by their `operation` label.
pub const OPERATIONS: [&str; 7] = [
    "generate", "sign", "export", "wrap", "unwrap", "decrypt", "destroy",
];

impl MeteredKeyStore {
    /// Creates this key store's `keyward_hsm_operations_total` series for
    /// every operation at 0, so that an error-rate alert has a series to
    /// read before the first operation.
    pub fn new(name: &str, inner: Arc<dyn KeyStore>, metrics: Arc<Metrics>) -> Self {
        for op in OPERATIONS {
            for result in ["ok", "error"] {
                metrics
                    .hsm_operations
                    .with_label_values(&[name, op, result]);
            }
        }
        Self {
            name: name.to_string(),
            inner,
            metrics,
        }
    }

    /// Counts one finished operation and records how long it took.
    fn record(&self, operation: &'static str, ok: bool, start: Instant) {
        self.metrics
            .ops
            .hsm_operation_duration
            .with_label_values(&[&self.name, operation])
            .observe(start.elapsed().as_secs_f64());
        self.metrics.hsm(&self.name, operation, ok);
    }
}

/// Sets the session pool and queue gauges of every key store from its
/// [`KeyStore::pool_stats`]. Called by the `/metrics` handler on each
/// scrape rather than by a periodic job: the numbers are in-memory counters
/// (no device or store call), so reading them costs nothing, and a value
/// read at scrape time is exact where a periodic copy would lag behind a
/// queue that builds and drains within seconds.
pub fn record_pool_stats(keystores: &KeyStores, metrics: &Metrics) {
    let to_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    for (name, ks) in keystores.iter() {
        match ks.pool_stats() {
            Some(PoolStats::Sessions { in_use, max }) => {
                metrics
                    .ops
                    .hsm_sessions_in_use
                    .with_label_values(&[name])
                    .set(to_i64(in_use));
                metrics
                    .ops
                    .hsm_sessions_max
                    .with_label_values(&[name])
                    .set(to_i64(max));
            }
            Some(PoolStats::Queue { waiting }) => {
                metrics
                    .ops
                    .yubikey_queue_depth
                    .with_label_values(&[name])
                    .set(to_i64(waiting));
            }
            None => {}
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
        let start = Instant::now();
        let r = self.inner.generate(spec).await;
        self.record("generate", r.is_ok(), start);
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
        self.record("sign", r.is_ok(), start);
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
        let start = Instant::now();
        let r = self.inner.export_private_key(handle).await;
        self.record("export", r.is_ok(), start);
        r
    }
    async fn wrap_private_key(
        &self,
        handle: &KeyHandle,
        kek: &zeroize::Zeroizing<[u8; 32]>,
    ) -> Result<Vec<u8>, KeyStoreError> {
        let start = Instant::now();
        let r = self.inner.wrap_private_key(handle, kek).await;
        self.record("wrap", r.is_ok(), start);
        r
    }
    async fn unwrap_private_key(
        &self,
        spec: &KeySpec,
        kek: &zeroize::Zeroizing<[u8; 32]>,
        wrapped: &[u8],
        public_key_der: &[u8],
    ) -> Result<GeneratedKey, KeyStoreError> {
        let start = Instant::now();
        let r = self
            .inner
            .unwrap_private_key(spec, kek, wrapped, public_key_der)
            .await;
        self.record("unwrap", r.is_ok(), start);
        r
    }
    async fn decrypt_data_key(
        &self,
        handle: &KeyHandle,
        ciphertext: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyStoreError> {
        let start = Instant::now();
        let r = self.inner.decrypt_data_key(handle, ciphertext).await;
        self.record("decrypt", r.is_ok(), start);
        r
    }
    async fn destroy(&self, handle: &KeyHandle) -> Result<(), KeyStoreError> {
        let start = Instant::now();
        let r = self.inner.destroy(handle).await;
        self.record("destroy", r.is_ok(), start);
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
    fn pool_stats(&self) -> Option<PoolStats> {
        self.inner.pool_stats()
    }
}
