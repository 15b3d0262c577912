//! [`InvalidationBus`] on Redis pub/sub: `PUBLISH <prefix>invalidate` with
//! the JSON of an [`Invalidation`] (plus this bus's `origin`), and one
//! subscriber task per daemon that forwards what arrives into a local
//! broadcast channel.
//!
//! What this daemon publishes reaches its own subscribers at once, locally,
//! whether Redis answers or not (the subscriber task skips the copy that
//! comes back through Redis): a revocation always takes effect on the
//! daemon that made it. Other daemons get it through Redis, within
//! milliseconds.
//!
//! Pub/sub is fire-and-forget: a daemon that was not subscribed while a
//! message went by never sees it. So each time the subscription is
//! (re)established — at start, and after Redis or the network came back —
//! the bus sends [`Invalidation::All`] to its local subscribers, which drop
//! everything they cache. The subscription is pinged every second: a server
//! that hangs without closing the connection is noticed too.

use super::RedisHandle;
use crate::cache::{CacheError, Invalidation, InvalidationBus};
use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// How long between subscription pings, and the first reconnection delay.
const PING_EVERY: Duration = Duration::from_secs(1);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// What travels on the channel.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    /// The publishing bus (absent: someone else, e.g. an operator's
    /// `redis-cli PUBLISH`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
    #[serde(flatten)]
    inv: Invalidation,
}

pub struct RedisBus {
    handle: Arc<RedisHandle>,
    channel: String,
    origin: String,
    tx: broadcast::Sender<Invalidation>,
    cancel: CancellationToken,
}

impl RedisBus {
    /// Starts the subscriber task (it stops when the bus is dropped).
    pub fn start(handle: Arc<RedisHandle>) -> Arc<Self> {
        let (tx, _) = broadcast::channel(1024);
        let bus = Arc::new(Self {
            channel: handle.key("invalidate"),
            origin: uuid::Uuid::new_v4().simple().to_string(),
            handle,
            tx,
            cancel: CancellationToken::new(),
        });
        tokio::spawn(subscriber(
            bus.handle.clone(),
            bus.channel.clone(),
            bus.origin.clone(),
            bus.tx.clone(),
            bus.cancel.clone(),
        ));
        bus
    }

    /// The channel name (`<prefix>invalidate`).
    pub fn channel(&self) -> &str {
        &self.channel
    }
}

impl Drop for RedisBus {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[async_trait]
impl InvalidationBus for RedisBus {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn publish(&self, inv: Invalidation) -> Result<(), CacheError> {
        // Here first: this daemon's caches never wait for Redis.
        let _ = self.tx.send(inv.clone());
        self.publish_remote(inv).await
    }

    async fn publish_remote(&self, inv: Invalidation) -> Result<(), CacheError> {
        let payload = serde_json::to_string(&Envelope {
            origin: Some(self.origin.clone()),
            inv,
        })
        .map_err(|e| CacheError::Unavailable {
            backend: "redis",
            source: Box::new(e),
        })?;
        let channel = self.channel.clone();
        self.handle
            .run("publish", |mut c| async move {
                ::redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(payload)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(|_| ())
            .map_err(|e| CacheError::Unavailable {
                backend: "redis",
                source: Box::new(e),
            })
    }

    fn subscribe(&self) -> broadcast::Receiver<Invalidation> {
        self.tx.subscribe()
    }
}

/// Subscribes, forwards, and on any failure reconnects with a backoff;
/// every (re)subscription sends [`Invalidation::All`] locally.
async fn subscriber(
    handle: Arc<RedisHandle>,
    channel: String,
    origin: String,
    tx: broadcast::Sender<Invalidation>,
    cancel: CancellationToken,
) {
    let mut delay = RETRY_MIN;
    loop {
        let connect = async {
            let pubsub = handle.client().get_async_pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            sink.subscribe(&channel).await?;
            Ok::<_, ::redis::RedisError>((sink, stream))
        };
        let connected = tokio::select! {
            () = cancel.cancelled() => return,
            r = tokio::time::timeout(handle.timeout(), connect) => r,
        };
        match connected {
            Ok(Ok((mut sink, mut stream))) => {
                delay = RETRY_MIN;
                tracing::debug!(channel, "subscribed to invalidations");
                let _ = tx.send(Invalidation::All);
                let mut ping = tokio::time::interval(PING_EVERY);
                ping.tick().await;
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        msg = stream.next() => {
                            let Some(msg) = msg else { break };
                            forward(&msg, &origin, &tx);
                        }
                        _ = ping.tick() => {
                            let pinged = tokio::time::timeout(
                                handle.timeout(),
                                sink.ping::<::redis::Value>(),
                            )
                            .await;
                            if !matches!(pinged, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                handle
                    .metrics()
                    .redis_errors
                    .with_label_values(&["subscribe"])
                    .inc();
                tracing::warn!(channel, "invalidation subscription lost; reconnecting");
                // What other daemons publish from now on is missed until the
                // subscription is back (which sends `All` again): forget what
                // was cached under the old state now, not only then.
                let _ = tx.send(Invalidation::All);
            }
            Ok(Err(e)) => {
                handle
                    .metrics()
                    .redis_errors
                    .with_label_values(&["subscribe"])
                    .inc();
                tracing::debug!(error = %e, "cannot subscribe to invalidations yet");
            }
            Err(_) => {
                handle
                    .metrics()
                    .redis_errors
                    .with_label_values(&["subscribe"])
                    .inc();
                tracing::debug!("subscribing to invalidations timed out");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

fn forward(msg: &::redis::Msg, origin: &str, tx: &broadcast::Sender<Invalidation>) {
    match serde_json::from_slice::<Envelope>(msg.get_payload_bytes()) {
        Ok(e) if e.origin.as_deref() == Some(origin) => {}
        // `All` is a local signal; one arriving from outside is honoured
        // all the same (an operator may publish it by hand).
        Ok(e) => {
            let _ = tx.send(e.inv);
        }
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an invalidation message that is not valid JSON");
        }
    }
}
