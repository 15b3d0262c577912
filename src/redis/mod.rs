//! Redis behind the ports (`[redis]`): one shared connection ([`RedisHandle`])
//! and the backends built on it — [`cache::RedisCache`], [`bus::RedisBus`],
//! [`ratelimit::RedisRateLimiter`] and [`leader::RedisLeaderLock`].
//!
//! Redis holds nothing that is the truth: the store is. So Redis being down
//! must cost speed, never service. Every command is bounded by a short
//! timeout ([`RedisSettings::timeout`], at most 500 ms) so a dead or hung
//! server never stalls a request; callers degrade (a cache miss, the
//! in-process rate limiter, a paused leader-only job) and the handle tracks
//! whether Redis answers (`keyward_redis_up`, `/readyz` `redis`), checked by
//! every command and by a background ping ([`RedisHandle::spawn_health`]) so
//! that recovery is noticed without traffic.
//!
//! Every key and channel starts with the deployment's `key_prefix`, so two
//! deployments (or a test) can share one server.

pub mod bus;
pub mod cache;
pub mod leader;
pub mod ratelimit;

use crate::metrics::Metrics;
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::{ExposeSecret, SecretString};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The longest any one Redis command may take before it counts as failed.
pub const MAX_TIMEOUT: Duration = Duration::from_millis(500);

/// How often the health task pings Redis.
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

/// Redis failed or did not answer in time. Callers degrade; this never
/// becomes a client-visible error by itself.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis `{op}` failed")]
    Command {
        op: &'static str,
        #[source]
        source: ::redis::RedisError,
    },
    #[error("redis `{op}` did not answer within {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
    #[error("redis `{op}` answered something unexpected: {what}")]
    Protocol { op: &'static str, what: String },
    #[error("redis URL: {0}")]
    Url(#[source] ::redis::RedisError),
}

impl RedisError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Command { .. } => "redis_failed",
            Self::Timeout { .. } => "redis_timeout",
            Self::Protocol { .. } => "redis_protocol",
            Self::Url(_) => "redis_url",
        }
    }
}

/// What the handle is built from (`[redis]`, the password already read).
pub struct RedisSettings {
    /// `redis://host:port/db` without credentials (the config refuses them).
    pub url: String,
    /// `AUTH` password (`password_file` / `password_env`).
    pub password: Option<SecretString>,
    /// Prepended to every key and channel.
    pub key_prefix: String,
    /// Connection and command timeout (capped at [`MAX_TIMEOUT`]).
    pub timeout: Duration,
}

/// One reconnecting connection shared by every Redis backend of the daemon,
/// the key prefix, and whether Redis answers.
pub struct RedisHandle {
    client: ::redis::Client,
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    up: AtomicBool,
    metrics: Arc<Metrics>,
}

impl RedisHandle {
    /// Builds the handle without connecting (the first command connects): a
    /// daemon whose Redis is down at start still starts, degraded. Call
    /// inside the Tokio runtime.
    pub fn new(settings: RedisSettings, metrics: Arc<Metrics>) -> Result<Arc<Self>, RedisError> {
        use ::redis::IntoConnectionInfo;
        let timeout = settings
            .timeout
            .min(MAX_TIMEOUT)
            .max(Duration::from_millis(10));
        let mut info = settings
            .url
            .as_str()
            .into_connection_info()
            .map_err(RedisError::Url)?;
        if let Some(p) = &settings.password {
            let redis = info
                .redis_settings()
                .clone()
                .set_password(p.expose_secret());
            info = info.set_redis_settings(redis);
        }
        let client = ::redis::Client::open(info).map_err(RedisError::Url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // Reconnection is retried by the next command or health ping;
            // a long backoff here would only hold commands up.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(RedisError::Url)?;
        metrics.redis_up.set(0);
        Ok(Arc::new(Self {
            client,
            conn,
            prefix: settings.key_prefix,
            timeout,
            up: AtomicBool::new(false),
            metrics,
        }))
    }

    /// `prefix` + `rest`.
    pub fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn client(&self) -> &::redis::Client {
        &self.client
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether the last command or ping got an answer.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    fn mark(&self, up: bool) {
        let was = self.up.swap(up, Ordering::SeqCst);
        self.metrics.redis_up.set(i64::from(up));
        if was != up {
            if up {
                tracing::info!("redis reachable again");
            } else {
                tracing::warn!("redis unreachable: running degraded (in-process fallbacks)");
            }
        }
    }

    /// Counts and records a failure of `op`.
    pub(crate) fn failed(&self, op: &'static str, e: &RedisError) {
        self.metrics.redis_errors.with_label_values(&[op]).inc();
        if self.is_up() {
            tracing::warn!(op, code = e.code(), error = %e, "redis command failed");
        } else {
            tracing::debug!(op, code = e.code(), error = %e, "redis command failed");
        }
        self.mark(false);
    }

    /// Runs one command or script (`f` gets its own clone of the
    /// connection) under the timeout; records the outcome.
    pub(crate) async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, RedisError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = ::redis::RedisResult<T>>,
    {
        let result = match tokio::time::timeout(self.timeout, f(self.conn.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(RedisError::Command { op, source }),
            Err(_) => Err(RedisError::Timeout {
                op,
                timeout: self.timeout,
            }),
        };
        match &result {
            Ok(_) => self.mark(true),
            Err(e) => self.failed(op, e),
        }
        result
    }

    /// `PING` now; updates the state.
    pub async fn ping(&self) -> bool {
        self.run("ping", |mut c| async move {
            ::redis::cmd("PING").query_async::<String>(&mut c).await
        })
        .await
        .is_ok()
    }

    /// Pings every [`HEALTH_INTERVAL`] until `cancel`, so that `/readyz`
    /// and `keyward_redis_up` follow Redis even when nothing else talks to it.
    pub fn spawn_health(
        self: &Arc<Self>,
        cancel: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                this.ping().await;
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(HEALTH_INTERVAL) => {}
                }
            }
        })
    }
}

/// Whether Redis answers, for `/readyz` (`None` in the readiness view: no
/// `[redis]` configured).
pub trait RedisHealth: Send + Sync {
    fn redis_up(&self) -> bool;
}

impl RedisHealth for RedisHandle {
    fn redis_up(&self) -> bool {
        self.is_up()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dead_server_answers_within_the_timeout_and_is_counted() {
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let metrics = Arc::new(Metrics::new().unwrap());
        let h = RedisHandle::new(
            RedisSettings {
                url: format!("redis://127.0.0.1:{port}/0"),
                password: None,
                key_prefix: "t:".into(),
                timeout: Duration::from_secs(30),
            },
            metrics.clone(),
        )
        .unwrap();
        assert_eq!(h.timeout(), MAX_TIMEOUT, "capped");
        let start = std::time::Instant::now();
        assert!(!h.ping().await);
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(!h.is_up());
        assert_eq!(metrics.redis_up.get(), 0);
        assert_eq!(metrics.redis_errors.with_label_values(&["ping"]).get(), 1);
        assert_eq!(h.key("x"), "t:x");
    }
}
