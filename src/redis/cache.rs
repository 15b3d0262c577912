//! [`Cache`] in Redis: values under `<prefix>cache:<key>` with `PX` TTLs.

use super::{RedisError, RedisHandle};
use crate::cache::{Cache, CacheError};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

pub struct RedisCache {
    handle: Arc<RedisHandle>,
}

impl RedisCache {
    pub fn new(handle: Arc<RedisHandle>) -> Self {
        Self { handle }
    }

    fn key(&self, key: &str) -> String {
        self.handle.key(&format!("cache:{key}"))
    }
}

fn unavailable(e: RedisError) -> CacheError {
    CacheError::Unavailable {
        backend: "redis",
        source: Box::new(e),
    }
}

#[async_trait]
impl Cache for RedisCache {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let k = self.key(key);
        self.handle
            .run("get", |mut c| async move {
                ::redis::cmd("GET")
                    .arg(&k)
                    .query_async::<Option<Vec<u8>>>(&mut c)
                    .await
            })
            .await
            .map_err(unavailable)
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Vec<u8>>>, CacheError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let ks: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        let want = ks.len();
        let got = self
            .handle
            .run("get", |mut c| async move {
                ::redis::cmd("MGET")
                    .arg(&ks)
                    .query_async::<Vec<Option<Vec<u8>>>>(&mut c)
                    .await
            })
            .await
            .map_err(unavailable)?;
        if got.len() != want {
            return Err(unavailable(RedisError::Protocol {
                op: "get",
                what: format!("MGET of {want} keys returned {}", got.len()),
            }));
        }
        Ok(got)
    }

    async fn put(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError> {
        let k = self.key(key);
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let v = value.to_vec();
        self.handle
            .run("put", |mut c| async move {
                ::redis::cmd("SET")
                    .arg(&k)
                    .arg(v)
                    .arg("PX")
                    .arg(ms)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
            .map_err(unavailable)
    }

    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        let k = self.key(key);
        self.handle
            .run("delete", |mut c| async move {
                ::redis::cmd("DEL").arg(&k).query_async::<()>(&mut c).await
            })
            .await
            .map_err(unavailable)
    }

    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let k = self.key(key);
        self.handle
            .run("take", |mut c| async move {
                ::redis::cmd("GETDEL")
                    .arg(&k)
                    .query_async::<Option<Vec<u8>>>(&mut c)
                    .await
            })
            .await
            .map_err(unavailable)
    }
}
