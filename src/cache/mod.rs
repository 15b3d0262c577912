//! The `Cache` port: short-lived shared state (device sessions, pre-signed
//! OCSP responses) and the invalidation bus that tells every daemon of a
//! deployment to drop what it holds about a device, an admin or the policy.
//!
//! Backends: [`memory::InProcessCache`] and [`memory::InProcessBus`] (one
//! daemon, the default), and Redis (`[redis]`, several daemons): values
//! under keys with a TTL, and PUBLISH/SUBSCRIBE on one channel. Nothing in
//! a cache is the truth: a miss, or an unreachable backend, falls back to
//! the store and the HSM, so a cache can only make a request cheaper, never
//! make a decision the store would not.

pub mod memory;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use uuid::Uuid;

/// The cache backend failed. Callers degrade: they go to the store (and
/// count it, see `keyward_cache_errors_total`), never refuse because of it.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache backend `{backend}` is unavailable")]
    Unavailable {
        backend: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Values under string keys, each with its own time to live. Keys are
/// namespaced by the caller (`session:<id>`, `ocsp:<issuer>:<serial>`).
#[async_trait]
pub trait Cache: Send + Sync + 'static {
    /// Short backend name (`memory`, `redis`).
    fn backend(&self) -> &'static str;
    /// The value under `key`, if present and not expired.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError>;
    /// The values under `keys`, in order, read together (Redis: one `MGET`,
    /// one round trip; a value and the marker that invalidates it are then
    /// read at the same instant).
    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Vec<u8>>>, CacheError> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(self.get(k).await?);
        }
        Ok(out)
    }
    /// Stores `value` under `key` for `ttl` (replacing any value).
    async fn put(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError>;
    /// Removes `key` (absent: not an error).
    async fn delete(&self, key: &str) -> Result<(), CacheError>;
    /// Removes `key` and returns what it held, atomically: of several
    /// callers (on several daemons) taking one key, one gets the value
    /// (single-use nonces). Redis: `GETDEL`.
    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError>;
}

/// What every daemon must forget at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Invalidation {
    /// A device was revoked, suspended or resumed, or its certificate
    /// status changed: its sessions and cached OCSP answers are stale.
    Device { id: Uuid },
    /// A certificate's status changed (revoked, held, released).
    Certificate { serial: String },
    /// An admin was disabled or changed role.
    Admin { id: Uuid },
    /// Policy files were reloaded.
    Policy,
    /// Invalidations may have been missed (the Redis subscription was
    /// down, or a receiver lagged): drop everything cached. Sent by the bus
    /// itself to its local subscribers, never published.
    All,
}

/// Publish/subscribe of [`Invalidation`]s across the daemons of a
/// deployment (in process: this daemon only). A subscriber also receives
/// what its own daemon published.
#[async_trait]
pub trait InvalidationBus: Send + Sync + 'static {
    fn backend(&self) -> &'static str;
    /// Sends `inv` to every daemon (this one included).
    async fn publish(&self, inv: Invalidation) -> Result<(), CacheError>;
    /// Sends `inv` to the other daemons only: a retry of a [`Self::publish`]
    /// whose local delivery already happened. In process: nothing to do.
    async fn publish_remote(&self, inv: Invalidation) -> Result<(), CacheError> {
        let _ = inv;
        Ok(())
    }
    /// A receiver of every invalidation published from now on. A lagging
    /// receiver loses the oldest; it should then drop everything it caches.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Invalidation>;
}
