//! In-process [`Cache`] and [`InvalidationBus`]: one daemon, no Redis.

use super::{Cache, CacheError, Invalidation, InvalidationBus};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A bounded map of values with deadlines. Past `max_entries`, expired
/// entries are swept, then the entry closest to expiry goes.
pub struct InProcessCache {
    entries: Mutex<HashMap<String, (Vec<u8>, Instant)>>,
    max_entries: usize,
}

impl InProcessCache {
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            max_entries: max_entries.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn poisoned<T>(_: T) -> CacheError {
    CacheError::Unavailable {
        backend: "memory",
        source: "cache lock poisoned".into(),
    }
}

#[async_trait]
impl Cache for InProcessCache {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let mut entries = self.entries.lock().map_err(poisoned)?;
        match entries.get(key) {
            Some((v, deadline)) if *deadline > Instant::now() => Ok(Some(v.clone())),
            Some(_) => {
                entries.remove(key);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn put(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError> {
        let now = Instant::now();
        let mut entries = self.entries.lock().map_err(poisoned)?;
        if entries.len() >= self.max_entries && !entries.contains_key(key) {
            entries.retain(|_, (_, deadline)| *deadline > now);
            if entries.len() >= self.max_entries
                && let Some(k) = entries
                    .iter()
                    .min_by_key(|(_, (_, d))| *d)
                    .map(|(k, _)| k.clone())
            {
                entries.remove(&k);
            }
        }
        entries.insert(key.to_string(), (value.to_vec(), now + ttl));
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        self.entries.lock().map_err(poisoned)?.remove(key);
        Ok(())
    }

    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let taken = self.entries.lock().map_err(poisoned)?.remove(key);
        Ok(taken
            .filter(|(_, deadline)| *deadline > Instant::now())
            .map(|(v, _)| v))
    }
}

/// A broadcast channel inside the process.
pub struct InProcessBus {
    tx: tokio::sync::broadcast::Sender<Invalidation>,
}

impl InProcessBus {
    pub fn new() -> Self {
        let (tx, _) = tokio::sync::broadcast::channel(1024);
        Self { tx }
    }
}

impl Default for InProcessBus {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl InvalidationBus for InProcessBus {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn publish(&self, inv: Invalidation) -> Result<(), CacheError> {
        // No receiver is not an error: nothing caches yet.
        let _ = self.tx.send(inv);
        Ok(())
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Invalidation> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn values_expire_and_the_map_stays_bounded() {
        let c = InProcessCache::new(2);
        c.put("a", b"1", Duration::from_millis(30)).await.unwrap();
        c.put("b", b"2", Duration::from_secs(60)).await.unwrap();
        assert_eq!(c.get("a").await.unwrap().as_deref(), Some(&b"1"[..]));
        c.put("c", b"3", Duration::from_secs(60)).await.unwrap();
        assert_eq!(c.len(), 2, "the entry closest to expiry made room");
        assert!(c.get("a").await.unwrap().is_none());
        assert_eq!(c.get("c").await.unwrap().as_deref(), Some(&b"3"[..]));
        c.delete("c").await.unwrap();
        assert!(c.get("c").await.unwrap().is_none());
        c.put("d", b"4", Duration::from_millis(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(c.get("d").await.unwrap().is_none(), "expired");
    }

    #[tokio::test]
    async fn subscribers_receive_what_is_published() {
        let bus = InProcessBus::new();
        let mut rx = bus.subscribe();
        bus.publish(Invalidation::Policy).await.unwrap();
        let id = uuid::Uuid::now_v7();
        bus.publish(Invalidation::Device { id }).await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), Invalidation::Policy);
        assert_eq!(rx.recv().await.unwrap(), Invalidation::Device { id });
        let json = serde_json::to_string(&Invalidation::Device { id }).unwrap();
        assert_eq!(json, format!(r#"{{"kind":"device","id":"{id}"}}"#));
    }
}
