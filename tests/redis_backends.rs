//! The Redis backends against a real `redis-server` started by the test
//! (free port, no persistence, stopped by PID): rate limits shared by two
//! limiters, the leader lock exclusive between two holders with expiry
//! handover and release, cache TTLs, pub/sub between two buses, AUTH, and
//! what each does while Redis is killed and after it comes back. Keys are
//! checked with the stock `redis-cli`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/redis_server.rs"]
mod redis_server;

use keyward::cache::{Cache, Invalidation, InvalidationBus};
use keyward::clock::SystemClock;
use keyward::jobs::leader::LeaderLock;
use keyward::metrics::Metrics;
use keyward::ratelimit::memory::InProcessRateLimiter;
use keyward::ratelimit::{Limit, RateLimiter};
use keyward::redis::bus::RedisBus;
use keyward::redis::cache::RedisCache;
use keyward::redis::leader::RedisLeaderLock;
use keyward::redis::ratelimit::{FallbackRateLimiter, RedisRateLimiter};
use keyward::redis::{RedisHandle, RedisSettings};
use redis_server::RedisServer;
use secrecy::SecretString;
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;

fn handle(server: &RedisServer, prefix: &str) -> (Arc<RedisHandle>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new().unwrap());
    let h = RedisHandle::new(
        RedisSettings {
            url: server.url(),
            password: None,
            key_prefix: prefix.to_string(),
            timeout: Duration::from_millis(500),
        },
        metrics.clone(),
    )
    .unwrap();
    (h, metrics)
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

#[tokio::test]
async fn two_limiters_share_one_bucket_per_key() {
    let server = RedisServer::start();
    let (ha, _) = handle(&server, "kw1:");
    let (hb, _) = handle(&server, "kw1:");
    let a = RedisRateLimiter::new(ha);
    let b = RedisRateLimiter::new(hb);
    let limit = Limit::new(3, Duration::from_secs(60));

    let d = a.check("registrations:192.0.2.1", limit).await.unwrap();
    assert!(d.allowed);
    assert_eq!(d.remaining, 2);
    // Peeking takes nothing.
    let p = b.peek("registrations:192.0.2.1", limit).await.unwrap();
    assert!(p.allowed);
    assert_eq!(p.remaining, 2);
    assert_eq!(
        b.check("registrations:192.0.2.1", limit)
            .await
            .unwrap()
            .remaining,
        1
    );
    assert_eq!(
        a.check("registrations:192.0.2.1", limit)
            .await
            .unwrap()
            .remaining,
        0
    );
    for l in [&a, &b] {
        let d = l.check("registrations:192.0.2.1", limit).await.unwrap();
        assert!(!d.allowed, "the burst is shared by both daemons");
        // One event per 20 s: the wait is just under 20 s (server time moved a little).
        assert!(
            d.retry_after > Duration::from_secs(19) && d.retry_after <= Duration::from_secs(20),
            "{:?}",
            d.retry_after
        );
    }
    // Another source has its own bucket.
    assert!(
        b.check("registrations:192.0.2.2", limit)
            .await
            .unwrap()
            .allowed
    );

    // The timestamp is stored under the deployment's prefix with a TTL.
    let ttl: i64 = server
        .cli(&["PTTL", "kw1:rl:registrations:192.0.2.1"])
        .parse()
        .unwrap();
    assert!(ttl > 50_000 && ttl <= 60_001, "{ttl}");
    // A different prefix is a different deployment.
    let (hc, _) = handle(&server, "other:");
    assert!(
        RedisRateLimiter::new(hc)
            .check("registrations:192.0.2.1", limit)
            .await
            .unwrap()
            .allowed
    );

    // A short window refills on the server's clock.
    let fast = Limit::new(2, Duration::from_millis(400));
    assert!(a.check("fast", fast).await.unwrap().allowed);
    assert!(b.check("fast", fast).await.unwrap().allowed);
    let d = a.check("fast", fast).await.unwrap();
    assert!(!d.allowed && d.retry_after <= Duration::from_millis(200));
    tokio::time::sleep(d.retry_after + Duration::from_millis(20)).await;
    assert!(b.check("fast", fast).await.unwrap().allowed);
}

#[tokio::test]
async fn the_leader_lock_is_exclusive_hands_over_on_expiry_and_release() {
    let server = RedisServer::start();
    let (ha, _) = handle(&server, "kw2:");
    let (hb, _) = handle(&server, "kw2:");
    let ttl = Duration::from_millis(600);
    let a = RedisLeaderLock::named(ha.clone(), "scheduler", "host-a:1:aaaa", ttl);
    let b = RedisLeaderLock::named(hb.clone(), "scheduler", "host-b:2:bbbb", ttl);

    assert!(a.acquire_or_renew(now()).await.unwrap());
    assert_eq!(a.previous_holder(), None, "first holder ever");
    assert!(!b.acquire_or_renew(now()).await.unwrap());
    assert_eq!(server.cli(&["GET", "kw2:lock:scheduler"]), "host-a:1:aaaa");
    // Renewal extends: after 2 × 400 ms with renewals, still A's.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(a.acquire_or_renew(now()).await.unwrap());
        assert!(!b.acquire_or_renew(now()).await.unwrap());
    }
    // B cannot release A's lock.
    b.release().await;
    assert_eq!(server.cli(&["GET", "kw2:lock:scheduler"]), "host-a:1:aaaa");

    // A stops renewing: B takes over once the lease ran out, not before.
    assert!(!b.acquire_or_renew(now()).await.unwrap());
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert!(b.acquire_or_renew(now()).await.unwrap());
    assert_eq!(b.previous_holder().as_deref(), Some("host-a:1:aaaa"));
    assert!(!a.acquire_or_renew(now()).await.unwrap());

    // A clean release hands over at once.
    b.release().await;
    assert_eq!(server.cli(&["EXISTS", "kw2:lock:scheduler"]), "0");
    assert!(a.acquire_or_renew(now()).await.unwrap());
    assert_eq!(a.previous_holder().as_deref(), Some("host-b:2:bbbb"));
}

#[tokio::test]
async fn cache_values_expire_and_are_namespaced() {
    let server = RedisServer::start();
    let (h, metrics) = handle(&server, "kw3:");
    let c = RedisCache::new(h.clone());
    assert_eq!(c.backend(), "redis");
    c.put("session:1", b"abc", Duration::from_millis(300))
        .await
        .unwrap();
    c.put("session:2", b"\x00\xff", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        c.get("session:1").await.unwrap().as_deref(),
        Some(&b"abc"[..])
    );
    assert_eq!(server.cli(&["GET", "kw3:cache:session:1"]), "abc");
    let many = c
        .get_many(&["session:1", "session:nope", "session:2"])
        .await
        .unwrap();
    assert_eq!(
        many,
        vec![Some(b"abc".to_vec()), None, Some(b"\x00\xff".to_vec())]
    );
    // The shared OCSP level reads an answer and its marker in one MGET.
    let start = Instant::now();
    for _ in 0..500 {
        c.get_many(&["session:2", "session:nope"]).await.unwrap();
    }
    eprintln!("MGET of two keys: {:?} per call", start.elapsed() / 500);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(c.get("session:1").await.unwrap(), None, "expired");
    c.delete("session:2").await.unwrap();
    assert_eq!(c.get("session:2").await.unwrap(), None);
    c.delete("session:2").await.unwrap();
    assert!(h.is_up());
    assert_eq!(metrics.redis_up.get(), 1);
}

/// Waits for the next invalidation other than `All` (or panics after 2 s).
async fn next(rx: &mut tokio::sync::broadcast::Receiver<Invalidation>) -> Invalidation {
    tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match rx.recv().await.unwrap() {
                Invalidation::All => continue,
                inv => return inv,
            }
        }
    })
    .await
    .expect("no invalidation within 2 s")
}

/// Waits until the bus says it (re)subscribed.
async fn subscribed(rx: &mut tokio::sync::broadcast::Receiver<Invalidation>) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while rx.recv().await.unwrap() != Invalidation::All {}
    })
    .await
    .expect("the bus did not (re)subscribe");
}

#[tokio::test]
async fn two_buses_deliver_to_each_other_once() {
    let server = RedisServer::start();
    let (ha, _) = handle(&server, "kw4:");
    let (hb, _) = handle(&server, "kw4:");
    let a = RedisBus::start(ha);
    let b = RedisBus::start(hb);
    assert_eq!(a.channel(), "kw4:invalidate");
    let mut ra = a.subscribe();
    let mut rb = b.subscribe();
    subscribed(&mut ra).await;
    subscribed(&mut rb).await;

    let id = uuid::Uuid::now_v7();
    let start = Instant::now();
    a.publish(Invalidation::Device { id }).await.unwrap();
    assert_eq!(next(&mut rb).await, Invalidation::Device { id });
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(next(&mut ra).await, Invalidation::Device { id });
    b.publish(Invalidation::Certificate {
        serial: "0a1b".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        next(&mut ra).await,
        Invalidation::Certificate {
            serial: "0a1b".into()
        }
    );
    b.publish(Invalidation::Policy).await.unwrap();
    assert_eq!(next(&mut ra).await, Invalidation::Policy);
    // The publisher got its own message once (locally), not a second time via Redis.
    assert_eq!(
        next(&mut rb).await,
        Invalidation::Certificate {
            serial: "0a1b".into()
        }
    );
    assert_eq!(next(&mut rb).await, Invalidation::Policy);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rb.try_recv().is_err(), "no duplicate");

    // A message from another tool (redis-cli) in the documented JSON form.
    let admin = uuid::Uuid::now_v7();
    server.cli(&[
        "PUBLISH",
        "kw4:invalidate",
        &format!(r#"{{"kind":"admin","id":"{admin}"}}"#),
    ]);
    assert_eq!(next(&mut ra).await, Invalidation::Admin { id: admin });
    assert_eq!(next(&mut rb).await, Invalidation::Admin { id: admin });
    // Garbage is ignored, not fatal.
    server.cli(&["PUBLISH", "kw4:invalidate", "not json"]);
    a.publish(Invalidation::Policy).await.unwrap();
    assert_eq!(next(&mut rb).await, Invalidation::Policy);
}

#[tokio::test]
async fn a_password_is_sent_and_a_wrong_one_fails_cleanly() {
    let server = RedisServer::start_with(Some("s3cret-pw"));
    let metrics = Arc::new(Metrics::new().unwrap());
    let settings = |password: Option<&str>| RedisSettings {
        url: server.url(),
        password: password.map(|p| SecretString::from(p.to_string())),
        key_prefix: "kw5:".into(),
        timeout: Duration::from_millis(500),
    };
    let good = RedisHandle::new(settings(Some("s3cret-pw")), metrics.clone()).unwrap();
    assert!(good.ping().await);
    let c = RedisCache::new(good);
    c.put("k", b"v", Duration::from_secs(5)).await.unwrap();
    for bad in [None, Some("wrong")] {
        let h = RedisHandle::new(settings(bad), metrics.clone()).unwrap();
        assert!(!h.ping().await, "{bad:?}");
        assert!(RedisCache::new(h).get("k").await.is_err());
    }
}

#[tokio::test]
async fn while_redis_is_down_everything_degrades_and_recovers() {
    let mut server = RedisServer::start();
    let (h, metrics) = handle(&server, "kw6:");
    let (hb, _) = handle(&server, "kw6:");
    let limiter = FallbackRateLimiter::new(
        Arc::new(RedisRateLimiter::new(h.clone())),
        Arc::new(InProcessRateLimiter::new(Arc::new(SystemClock), 1000)),
    );
    let cache = RedisCache::new(h.clone());
    let lock = RedisLeaderLock::named(h.clone(), "scheduler", "me", Duration::from_secs(5));
    let bus = RedisBus::start(h.clone());
    let other = RedisBus::start(hb);
    let mut rx = bus.subscribe();
    let mut rother = other.subscribe();
    subscribed(&mut rx).await;
    subscribed(&mut rother).await;
    assert!(lock.acquire_or_renew(now()).await.unwrap());
    let limit = Limit::new(2, Duration::from_secs(60));
    assert!(limiter.check("k", limit).await.unwrap().allowed);
    assert!(h.ping().await);

    server.kill();
    let start = Instant::now();
    // Limits still hold (in process: a fresh bucket on this daemon).
    assert!(limiter.check("k", limit).await.unwrap().allowed);
    assert!(limiter.check("k", limit).await.unwrap().allowed);
    assert!(!limiter.check("k", limit).await.unwrap().allowed);
    assert!(limiter.tracked_keys() >= 1);
    // The cache misses with an error, the lock cannot be renewed.
    assert!(cache.get("x").await.is_err());
    assert!(lock.acquire_or_renew(now()).await.is_err());
    // A publish still reaches this daemon's own subscribers.
    let id = uuid::Uuid::now_v7();
    assert!(bus.publish(Invalidation::Device { id }).await.is_err());
    assert_eq!(next(&mut rx).await, Invalidation::Device { id });
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "every call is bounded: {:?}",
        start.elapsed()
    );
    assert!(!h.is_up());
    assert_eq!(metrics.redis_up.get(), 0);
    assert!(metrics.redis_errors.with_label_values(&["ratelimit"]).get() >= 3);
    assert!(metrics.redis_errors.with_label_values(&["get"]).get() >= 1);
    assert!(metrics.redis_errors.with_label_values(&["lock"]).get() >= 1);

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.ping().await {
        assert!(Instant::now() < deadline, "did not reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metrics.redis_up.get(), 1);
    // Both buses resubscribe and tell their caches to drop everything.
    subscribed(&mut rx).await;
    subscribed(&mut rother).await;
    bus.publish(Invalidation::Policy).await.unwrap();
    assert_eq!(next(&mut rother).await, Invalidation::Policy);
    // Back on Redis: a fresh (empty) server, shared buckets again.
    assert!(limiter.check("k", limit).await.unwrap().allowed);
    assert_eq!(server.cli(&["EXISTS", "kw6:rl:k"]), "1");
    assert!(lock.acquire_or_renew(now()).await.unwrap());
    cache.put("x", b"1", Duration::from_secs(5)).await.unwrap();
    assert_eq!(cache.get("x").await.unwrap().as_deref(), Some(&b"1"[..]));
}

/// The same contract, run against both backends of each port.
mod conformance {
    use super::*;
    use keyward::cache::memory::{InProcessBus, InProcessCache};

    async fn cache_suite(c: &dyn Cache) {
        let b = c.backend();
        assert_eq!(c.get("nope").await.unwrap(), None, "{b}");
        c.put("k1", b"one", Duration::from_secs(30)).await.unwrap();
        c.put("k1", b"uno", Duration::from_secs(30)).await.unwrap();
        c.put("k2", b"", Duration::from_millis(150)).await.unwrap();
        assert_eq!(
            c.get("k1").await.unwrap().as_deref(),
            Some(&b"uno"[..]),
            "{b}"
        );
        assert_eq!(
            c.get_many(&["k2", "nope", "k1"]).await.unwrap(),
            vec![Some(Vec::new()), None, Some(b"uno".to_vec())],
            "{b}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(c.get("k2").await.unwrap(), None, "{b}: expired");
        c.delete("k1").await.unwrap();
        c.delete("k1").await.unwrap();
        assert_eq!(c.get("k1").await.unwrap(), None, "{b}");
        // take: the value once, then nothing; concurrent takers, one winner.
        c.put("n", b"once", Duration::from_secs(30)).await.unwrap();
        let takes = futures::future::join_all((0..8).map(|_| c.take("n"))).await;
        let won: Vec<_> = takes.into_iter().filter_map(|t| t.unwrap()).collect();
        assert_eq!(won, vec![b"once".to_vec()], "{b}: one taker wins");
        assert_eq!(c.take("n").await.unwrap(), None, "{b}");
        assert_eq!(c.get("n").await.unwrap(), None, "{b}");
        c.put("n2", b"x", Duration::from_millis(100)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(c.take("n2").await.unwrap(), None, "{b}: expired");
    }

    async fn limiter_suite(l: &dyn RateLimiter) {
        let b = l.backend();
        let limit = Limit::new(3, Duration::from_secs(60));
        let p = l.peek("conf", limit).await.unwrap();
        assert!(p.allowed && p.remaining == 3, "{b}: {p:?}");
        for want in [2, 1, 0] {
            let d = l.check("conf", limit).await.unwrap();
            assert!(d.allowed, "{b}");
            assert_eq!(d.remaining, want, "{b}");
            assert_eq!(d.retry_after, Duration::ZERO, "{b}");
        }
        for _ in 0..2 {
            let d = l.check("conf", limit).await.unwrap();
            assert!(!d.allowed && d.remaining == 0, "{b}");
            assert!(
                d.retry_after > Duration::from_secs(19) && d.retry_after <= Duration::from_secs(20),
                "{b}: a refusal takes nothing: {:?}",
                d.retry_after
            );
        }
        assert!(!l.peek("conf", limit).await.unwrap().allowed, "{b}");
        assert!(l.check("conf-other", limit).await.unwrap().allowed, "{b}");
    }

    async fn bus_suite(bus: &dyn InvalidationBus) {
        let mut rx = bus.subscribe();
        let id = uuid::Uuid::now_v7();
        for inv in [
            Invalidation::Device { id },
            Invalidation::Admin { id },
            Invalidation::Certificate {
                serial: "01AB".into(),
            },
            Invalidation::Policy,
        ] {
            bus.publish(inv.clone()).await.unwrap();
            assert_eq!(next(&mut rx).await, inv, "{}", bus.backend());
        }
    }

    #[tokio::test]
    async fn both_caches_keep_the_contract() {
        let server = RedisServer::start();
        let (h, _) = handle(&server, "conf:");
        cache_suite(&InProcessCache::new(100)).await;
        cache_suite(&RedisCache::new(h)).await;
    }

    #[tokio::test]
    async fn both_limiters_decide_alike() {
        let server = RedisServer::start();
        let (h, _) = handle(&server, "conf:");
        limiter_suite(&InProcessRateLimiter::new(Arc::new(SystemClock), 100)).await;
        limiter_suite(&RedisRateLimiter::new(h)).await;
    }

    #[tokio::test]
    async fn both_buses_deliver_locally() {
        let server = RedisServer::start();
        let (h, _) = handle(&server, "conf:");
        bus_suite(&InProcessBus::new()).await;
        bus_suite(RedisBus::start(h).as_ref()).await;
    }
}
