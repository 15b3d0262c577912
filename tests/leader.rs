//! One scheduler per deployment: real `keyward serve` processes sharing one
//! installation (config, SQLite file, SoftHSM2 token), each on its own
//! loopback port, with a short scheduler lease. Exactly one is leader
//! (`keyward_scheduler_leader 1` on its `/metrics`); a leader killed with
//! SIGKILL is replaced once its lease has run out; a leader stopped with
//! SIGTERM releases its lease and is replaced at once; each acquisition is
//! audited as `scheduler.leader`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Daemon, Env, metrics_text};
use serde_json::Value;
use std::time::{Duration, Instant};

/// The lease of the daemons under test.
const LEASE: Duration = Duration::from_secs(2);

/// `keyward_scheduler_leader` on `d`'s `/metrics`.
async fn leader_gauge(d: &Daemon) -> i64 {
    let text = metrics_text(&d.url).await;
    let line = text
        .lines()
        .find(|l| l.starts_with("keyward_scheduler_leader "))
        .unwrap_or_else(|| panic!("no keyward_scheduler_leader in:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// The ok runs of `job` on `d`'s `/metrics` (0 if it never ran).
async fn job_runs(d: &Daemon, job: &str) -> f64 {
    let text = metrics_text(&d.url).await;
    let prefix = format!("keyward_job_runs_total{{job=\"{job}\",result=\"ok\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0.0, |v| v.parse().unwrap())
}

/// The gauges of `daemons`, in order.
async fn gauges(daemons: &[&Daemon]) -> Vec<i64> {
    let mut out = Vec::new();
    for d in daemons {
        out.push(leader_gauge(d).await);
    }
    out
}

/// Polls until `d` says it is leader; returns how long that took.
async fn until_leader(d: &Daemon, limit: Duration) -> Duration {
    let start = Instant::now();
    while leader_gauge(d).await != 1 {
        assert!(
            start.elapsed() < limit,
            "{} did not become leader within {limit:?}",
            d.url
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    start.elapsed()
}

/// The details of every `scheduler.leader` event, in order.
fn leader_events(env: &Env) -> Vec<Value> {
    env.audit_details_after(0)
        .into_iter()
        .filter(|(action, ..)| action == "scheduler.leader")
        .map(|(_, outcome, _, details)| {
            assert_eq!(outcome, "success");
            details
        })
        .collect()
}

/// Waits (briefly: it is committed right after the acquisition) for the
/// `n`-th `scheduler.leader` event.
async fn leader_events_n(env: &Env, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let events = leader_events(env);
        if events.len() >= n {
            assert_eq!(events.len(), n, "{events:?}");
            return events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "expected {n} scheduler.leader events: {:?}",
        leader_events(env)
    );
}

/// The holder id names the daemon's process: `{host}:{pid}:{random}`.
fn holder_of(event: &Value, d: &Daemon) -> String {
    let holder = event["holder"].as_str().unwrap().to_string();
    let parts: Vec<&str> = holder.split(':').collect();
    assert_eq!(parts.len(), 3, "{holder}");
    assert_eq!(parts[1], d.child.id().to_string(), "{holder}");
    assert!(!parts[0].is_empty() && parts[2].len() >= 8, "{holder}");
    holder
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_per_store_and_fast_handover() {
    let env = Env::new();
    let token = env.init();
    env.append_config(&format!(
        "[scheduler]\nlease_seconds = {}\n\n[limits]\nreadiness_max_age_secs = 3\n",
        LEASE.as_secs_f64()
    ));

    // The first daemon is leader from the start; the second, on the same
    // config, store and token (its own port), is not.
    let mut a = env.serve();
    assert_eq!(leader_gauge(&a).await, 1);
    let mut b = env.serve();
    assert_ne!(a.url, b.url);
    let events = leader_events_n(&env, 1).await;
    let a_holder = holder_of(&events[0], &a);
    assert_eq!(events[0]["previous_holder"], Value::Null);
    assert_eq!(events[0]["lease_ms"], 2000);

    // Over several lease times, exactly one leader at every look: renewals
    // hold the lease, the follower's tries are refused.
    let watch = Instant::now();
    while watch.elapsed() < LEASE * 2 {
        assert_eq!(gauges(&[&a, &b]).await, [1, 0]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    leader_events_n(&env, 1).await;
    // Jobs on a daemon's own state run in both (readiness every second).
    assert!(job_runs(&a, "readiness").await >= 2.0);
    assert!(job_runs(&b, "readiness").await >= 2.0);
    // Both daemons serve from the shared token and store.
    for d in [&a, &b] {
        let r = common::client()
            .get(format!("{}/readyz", d.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{}", d.url);
    }

    // Both processes sign with the one SoftHSM2 token: a device certificate
    // issued through each (the follower serves requests like the leader).
    for (d, name) in [(&b, "via-follower"), (&a, "via-leader")] {
        let issued =
            common::issue_device(&d.url, &token, &env.path(name), &format!("sensor-{name}")).await;
        assert!(!issued.serial.is_empty());
    }

    // SIGKILL the leader: nothing is released; the follower takes over once
    // the lease ran out (renewed at most a third of it before the kill), and
    // within the lease time plus its polling (a quarter) and a margin.
    a.child.kill().unwrap();
    let killed = Instant::now();
    a.child.wait().unwrap();
    let took = until_leader(&b, LEASE * 3).await;
    let took_since_kill = killed.elapsed();
    assert!(
        took_since_kill >= LEASE * 2 / 3 - Duration::from_millis(100),
        "took over a lease that was still valid: {took_since_kill:?}"
    );
    // How soon after the lease ran out depends on the machine's load; the
    // figure is reported, not asserted (speed is for benchmarks).
    let _ = took;
    let events = leader_events_n(&env, 2).await;
    let b_holder = holder_of(&events[1], &b);
    assert_eq!(events[1]["previous_holder"], a_holder.as_str());
    eprintln!("takeover after SIGKILL: {took_since_kill:?} (lease {LEASE:?})");

    // A third daemon joins as follower; SIGTERM the leader: it releases the
    // lease on its way out, and the follower takes over at its next try,
    // sooner than any lease could have run out (two thirds of it at least).
    let c = env.serve();
    tokio::time::sleep(LEASE / 2).await;
    assert_eq!(gauges(&[&b, &c]).await, [1, 0]);
    let status = b.stop();
    assert_eq!(status.code(), Some(0));
    let stopped = Instant::now();
    // Released on the way out: the row no longer holds a valid lease
    // (`expires_at` 0), whatever time it is.
    let expires: i64 = rusqlite::Connection::open(&env.db)
        .unwrap()
        .query_row(
            "SELECT expires_at FROM leases WHERE name = 'scheduler'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(expires, 0, "the stopping leader did not release its lease");
    until_leader(&c, LEASE * 3).await;
    let took = stopped.elapsed();
    eprintln!("takeover after SIGTERM: {took:?} (lease {LEASE:?})");
    let events = leader_events_n(&env, 3).await;
    holder_of(&events[2], &c);
    assert_eq!(events[2]["previous_holder"], b_holder.as_str());

    // The exposition stays valid with the new gauge.
    common::promtool_check(&metrics_text(&c.url).await);
    drop(c);
    // Three processes appended to one audit chain: it verifies.
    let out = env.run(&["audit", "verify", "--config", env.config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bad lease setting stops start-up with a message that names the key,
/// and the daemon never serves.
#[test]
fn bad_lease_settings_are_refused_at_start() {
    let env = Env::new();
    env.init();
    let base = std::fs::read_to_string(&env.config).unwrap();
    for value in ["0", "0.5", "-3", "7200", "\"15\""] {
        std::fs::write(
            &env.config,
            format!("{base}\n[scheduler]\nlease_seconds = {value}\n"),
        )
        .unwrap();
        let mut child = env
            .keyward()
            .args(["serve", "--config", env.config.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > Duration::from_secs(30) {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("{value}: keyward serve started");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value}: exited 0");
        assert!(stderr.contains("lease_seconds"), "{value}: {stderr}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("keyward listening on"),
            "{value}"
        );
    }
}
