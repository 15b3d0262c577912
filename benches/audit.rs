//! Audit trail benchmark, run by `scripts/bench.sh` (or `cargo bench --bench
//! audit -- [--seconds N] [--events N] [--big-events N] [--out BENCHMARKS.md]`).
//!
//! 1. Append: many tasks commit `Change`s through the real `SqliteStore`
//!    (temp dir; WAL, `synchronous = FULL`, the daemon's group-commit writer
//!    with `batch_max` 256, the default, then 1024), each change one audit event, then
//!    each change one audit event plus a small write (an `audit_data_keys`
//!    row). Events/s, and the writer's batch sizes from its batch observer.
//! 2. Verify: a chain of `--events` (and `--big-events`) events of the shape
//!    issuance writes (actor, action, target, details with serial/profile,
//!    a client address on some), built with `AuditEvent::chain` and
//!    bulk-inserted with rusqlite, with a checkpoint signed every 1,000,000
//!    events by a software P-256 key (ring). Then the path `keyward audit
//!    verify` takes: a read-only store and `audit::service::verify_store`
//!    with those checkpoints and the key in `AuditKeys`. Events/s and wall
//!    time.
//!
//! The checkpoint cost on issuance is measured by the issuance benchmark
//! (`--checkpoint-cost`), against a real daemon and SoftHSM2.
#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The allocator `keyward` (the binary, hence `keyward audit verify`) runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use keyward::audit::verify::AuditKeys;
use keyward::audit::{AuditDraft, AuditEvent, Checkpoint, GENESIS_HASH};
use keyward::clock::SystemClock;
use keyward::model::KeyAlgorithm;
use keyward::store::records::AuditDataKeyRecord;
use keyward::store::sqlite::SqliteStore;
use keyward::store::{Change, Store, Write};
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

struct Args {
    seconds: u64,
    events: u64,
    big_events: u64,
    out: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        seconds: 10,
        events: 1_000_000,
        big_events: 10_000_000,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--seconds" => a.seconds = it.next().unwrap().parse().unwrap(),
            "--events" => a.events = it.next().unwrap().parse().unwrap(),
            "--big-events" => a.big_events = it.next().unwrap().parse().unwrap(),
            "--out" => a.out = Some(it.next().unwrap()),
            _ => {} // cargo bench passes --bench
        }
    }
    assert!(a.seconds >= 1, "--seconds must be at least 1");
    a
}

/// An event like the ones issuance writes.
fn draft(i: u64) -> AuditDraft {
    let d = AuditDraft::new(
        format!("registration:{}", Uuid::from_u128(i as u128 * 7919)),
        "certificate.issue",
        format!("{:032x}", i as u128 * 104_729),
    )
    .details(serde_json::json!({
        "serial": format!("{:040x}", i as u128 * 15_485_863),
        "profile": "device",
        "ca": "devices",
        "not_after": 1_900_000_000_000i64 + i as i64,
        "group": "bench",
    }));
    if i.is_multiple_of(3) {
        d.source(Some("192.0.2.17"))
    } else {
        d
    }
}

#[derive(Default)]
struct Batches {
    count: AtomicU64,
    changes: AtomicU64,
    max: AtomicUsize,
    sizes: Mutex<Vec<usize>>,
}

struct AppendRun {
    batch_max: usize,
    tasks: usize,
    with_write: bool,
    events_per_s: f64,
    batches: u64,
    mean_batch: f64,
    p50_batch: usize,
    max_batch: usize,
    mean_commit_ms: f64,
}

async fn append(
    store: Arc<SqliteStore>,
    batches: Arc<Batches>,
    commit_ns: Arc<AtomicU64>,
    tasks: usize,
    with_write: bool,
    secs: u64,
) -> AppendRun {
    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(AtomicU64::new(0));
    batches.count.store(0, Ordering::Relaxed);
    batches.changes.store(0, Ordering::Relaxed);
    batches.max.store(0, Ordering::Relaxed);
    batches.sizes.lock().unwrap().clear();
    commit_ns.store(0, Ordering::Relaxed);
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (store, stop, events) = (store.clone(), stop.clone(), events.clone());
        handles.push(tokio::spawn(async move {
            let mut i = t as u64 * 1_000_000_000;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let mut change = Change::new().audit(draft(i));
                if with_write {
                    change = change.write(Write::InsertAuditDataKey(AuditDataKeyRecord {
                        id: Uuid::now_v7(),
                        key_id: Uuid::from_u128(1),
                        wrapped: vec![7u8; 40],
                        created_at: 1,
                    }));
                }
                store.commit(change).await.unwrap();
                events.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = batches.count.load(Ordering::Relaxed).max(1);
    let mut sizes = batches.sizes.lock().unwrap().clone();
    sizes.sort_unstable();
    AppendRun {
        batch_max: 0,
        tasks,
        with_write,
        events_per_s: events.load(Ordering::Relaxed) as f64 / elapsed,
        batches: n,
        mean_batch: batches.changes.load(Ordering::Relaxed) as f64 / n as f64,
        p50_batch: sizes.get(sizes.len() / 2).copied().unwrap_or(0),
        max_batch: batches.max.load(Ordering::Relaxed),
        mean_commit_ms: commit_ns.load(Ordering::Relaxed) as f64 / n as f64 / 1e6,
    }
}

/// The DER SubjectPublicKeyInfo of a P-256 public point.
fn p256_spki(point: &[u8]) -> Vec<u8> {
    let mut spki = hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap();
    spki.extend_from_slice(point);
    spki
}

/// Builds a chain of `n` events in a fresh database at `path` (schema from
/// the store's own migrations), with a checkpoint every `every` events and
/// at the head. Returns the checkpoints and the key that signed them.
fn build_chain(path: &Path, n: u64, every: u64) -> (Vec<Checkpoint>, AuditKeys) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Migrate, then close: the rows go in with plain rusqlite.
    rt.block_on(async {
        drop(SqliteStore::open(path, 256, Arc::new(SystemClock)).unwrap());
    });
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let key_id = Uuid::now_v7();
    let mut keys = AuditKeys::new();
    keys.insert(
        key_id,
        (
            KeyAlgorithm::EcdsaP256,
            p256_spki(key.public_key().as_ref()),
        ),
    );

    let mut conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF;")
        .unwrap();
    let mut prev = GENESIS_HASH.to_vec();
    let mut checkpoints = Vec::new();
    let started = Instant::now();
    let mut seq = 0u64;
    while seq < n {
        let tx = conn.transaction().unwrap();
        {
            let mut stmt = tx
                .prepare(
                    "INSERT INTO audit_events (seq, at_ms, actor, action, target, outcome, details, prev_hash, hash, version, source, sealed)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )
                .unwrap();
            let end = (seq + 200_000).min(n);
            while seq < end {
                seq += 1;
                let e = AuditEvent::chain(
                    draft(seq),
                    seq as i64,
                    1_800_000_000_000 + seq as i64,
                    std::mem::take(&mut prev),
                );
                stmt.execute(rusqlite::params![
                    e.seq,
                    e.at_ms,
                    e.actor,
                    e.action,
                    e.target,
                    e.outcome.as_str(),
                    serde_json::to_string(&e.details).unwrap(),
                    e.prev_hash,
                    e.hash,
                    e.version,
                    e.source,
                    e.sealed
                ])
                .unwrap();
                if seq.is_multiple_of(every) || seq == n {
                    let at_ms = 1_900_000_000_000 + seq as i64;
                    let msg = Checkpoint::message(e.seq, &e.hash, at_ms, key_id);
                    let signature = key.sign(&rng, &msg).unwrap().as_ref().to_vec();
                    let cp = Checkpoint {
                        seq: e.seq,
                        hash: e.hash.clone(),
                        at_ms,
                        key_id,
                        signature,
                    };
                    tx.execute(
                        "INSERT INTO audit_checkpoints (seq, hash, at_ms, key_id, signature) VALUES (?1, ?2, ?3, ?4, ?5)",
                        rusqlite::params![cp.seq, cp.hash, cp.at_ms, cp.key_id.to_string(), cp.signature],
                    )
                    .unwrap();
                    checkpoints.push(cp);
                }
                prev = e.hash;
            }
        }
        tx.commit().unwrap();
    }
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
    println!(
        "    built {n} events in {:.1} s ({:.0} MB)",
        started.elapsed().as_secs_f64(),
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) as f64 / 1e6
    );
    (checkpoints, keys)
}

struct VerifyRun {
    events: u64,
    secs: f64,
    checkpoints: u64,
    /// The same chain read and checked one page after the other (the path
    /// before pages were read ahead), for comparison.
    sequential_secs: f64,
    /// CPU seconds (all threads) the two runs used.
    cpu: f64,
    sequential_cpu: f64,
}

/// Reads a page, checks it, reads the next: how `verify_store` fed the
/// verifier before it read ahead.
async fn verify_sequential(
    store: &SqliteStore,
    checkpoints: Vec<Checkpoint>,
    keys: &AuditKeys,
) -> u64 {
    let mut v = keyward::audit::verify::Verifier::new(checkpoints, keys);
    let mut from_seq = 1;
    loop {
        let page = store
            .audit_events(keyward::store::AuditQuery {
                from_seq,
                limit: keyward::audit::service::VERIFY_PAGE,
            })
            .await
            .unwrap();
        let n = page.len();
        if let Some(last) = page.last() {
            from_seq = last.seq + 1;
        }
        for e in page {
            v.push(e);
        }
        if n < keyward::audit::service::VERIFY_PAGE as usize {
            break;
        }
    }
    let report = v.finish();
    assert!(report.broken.is_none(), "{:?}", report.broken);
    report.events
}

/// The path `keyward audit verify` takes: a read-only store, the
/// checkpoints, the audit key's public key.
fn verify(path: &Path, checkpoints: Vec<Checkpoint>, keys: &AuditKeys) -> VerifyRun {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = SqliteStore::open_read_only(path).unwrap();
        let (start, cpu0) = (Instant::now(), cpu_secs());
        let events = verify_sequential(&store, checkpoints.clone(), keys).await;
        let sequential_secs = start.elapsed().as_secs_f64();
        let sequential_cpu = cpu_secs() - cpu0;
        println!(
            "    sequential pages: {events} events in {sequential_secs:.2} s ({sequential_cpu:.2} CPU s): {:.0} events/s",
            events as f64 / sequential_secs
        );
        let (start, cpu0) = (Instant::now(), cpu_secs());
        let report = keyward::audit::service::verify_store(&store, checkpoints, keys, None)
            .await
            .unwrap();
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu_secs() - cpu0;
        assert!(report.broken.is_none(), "{:?}", report.broken);
        assert_eq!(report.unsigned_events, 0);
        VerifyRun {
            events: report.events,
            secs,
            checkpoints: report.checkpoints_verified,
            sequential_secs,
            cpu,
            sequential_cpu,
        }
    })
}

/// CPU time (user + system) this process has used so far, in seconds:
/// on a shared machine, events per CPU-second say more than wall time.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces), from 3 on.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15, i.e. 11 and 12 here; 100 Hz.
    (ticks(11) + ticks(12)) / 100.0
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}

fn main() {
    let a = args();
    if cfg!(debug_assertions) {
        println!("==> debug build: a smoke run, the numbers mean nothing");
        assert!(a.out.is_none(), "--out needs a release build (cargo bench)");
    }
    let dir = tempfile::tempdir().unwrap();

    // 1. Append through the store's group-commit writer.
    println!("==> audit append through SqliteStore (group commit)");
    let batches = Arc::new(Batches::default());
    let commit_ns = Arc::new(AtomicU64::new(0));
    let observer: keyward::store::sqlite::BatchObserver = {
        let (b, ns) = (batches.clone(), commit_ns.clone());
        Arc::new(move |size: usize, took: Duration| {
            b.count.fetch_add(1, Ordering::Relaxed);
            b.changes.fetch_add(size as u64, Ordering::Relaxed);
            b.max.fetch_max(size, Ordering::Relaxed);
            ns.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
            if let Ok(mut s) = b.sizes.lock() {
                s.push(size);
            }
        })
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let appends = rt.block_on(async {
        let mut runs = Vec::new();
        // The default batch_max (256), then a larger one (the config allows up to 10,000).
        let plans: [(usize, &[(usize, bool)]); 2] = [
            (256, &[(64, false), (512, false), (2048, false), (512, true)]),
            (1024, &[(2048, false), (2048, true)]),
        ];
        for (batch_max, steps) in plans {
            let path = dir.path().join(format!("append-{batch_max}.db"));
            let store = Arc::new(
                SqliteStore::open_observed(
                    &path,
                    batch_max,
                    Arc::new(SystemClock),
                    observer.clone(),
                )
                .unwrap(),
            );
            // Warm-up.
            append(store.clone(), batches.clone(), commit_ns.clone(), 64, false, 1).await;
            for &(tasks, with_write) in steps {
                let mut r = append(
                    store.clone(),
                    batches.clone(),
                    commit_ns.clone(),
                    tasks,
                    with_write,
                    a.seconds,
                )
                .await;
                r.batch_max = batch_max;
                println!(
                    "    batch_max {batch_max:>4}, {:>4} tasks, {}: {:>8.0} events/s; {} batches, mean {:.1} changes (p50 {}, max {}), {:.2} ms per batch commit",
                    r.tasks,
                    if r.with_write { "event + small write" } else { "event only        " },
                    r.events_per_s,
                    r.batches,
                    r.mean_batch,
                    r.p50_batch,
                    r.max_batch,
                    r.mean_commit_ms
                );
                runs.push(r);
            }
            drop(store);
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
        runs
    });
    drop(rt);

    // 2. Verify.
    let mut verifies = Vec::new();
    for (name, n) in [("verify.db", a.events), ("verify-big.db", a.big_events)] {
        if n == 0 {
            continue;
        }
        println!("==> audit verify, {n} events");
        let path = dir.path().join(name);
        let (checkpoints, keys) = build_chain(&path, n, 1_000_000);
        let r = verify(&path, checkpoints, &keys);
        println!(
            "    verified {} events ({} checkpoints) in {:.2} s ({:.2} CPU s): {:.0} events/s, {:.0} events per CPU-second",
            r.events,
            r.checkpoints,
            r.secs,
            r.cpu,
            r.events as f64 / r.secs,
            r.events as f64 / r.cpu
        );
        verifies.push(r);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(dir.path().join(format!("{name}{suffix}")));
        }
    }

    if let Some(out) = &a.out {
        let mut md = format!(
            "\n## Audit — {}\n\nMachine: {}. Append: `SqliteStore` in a temp dir (WAL, synchronous=FULL, group commit; batch_max 256 as by default, and 1024), tasks on a 2-worker tokio runtime, {} s per step. Verify: `audit::service::verify_store` on a read-only store, as `keyward audit verify` runs it, checkpoints every 1,000,000 events signed by a software P-256 key.\n\n| measurement | result |\n|---|---|\n",
            time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
            machine(),
            a.seconds
        );
        for r in &appends {
            md.push_str(&format!(
                "| audit append, batch_max {}, {} tasks, {} (target ≥ 50,000 events/s) | {:.0} events/s; {} batches, mean {:.1} changes (p50 {}, max {}), {:.2} ms per batch commit |\n",
                r.batch_max,
                r.tasks,
                if r.with_write { "each change one event + one small write" } else { "each change one event" },
                r.events_per_s,
                r.batches,
                r.mean_batch,
                r.p50_batch,
                r.max_batch,
                r.mean_commit_ms
            ));
        }
        for r in &verifies {
            md.push_str(&format!(
                "| audit verify, {} events, {} checkpoints (target ≥ 1,000,000 events/s; 10M in < 30 s) | {:.2} s, {:.0} events/s; {:.2} CPU s, {:.0} events per CPU-second (pages read one after the other: {:.2} s, {:.0} events/s, {:.2} CPU s) |\n",
                r.events,
                r.checkpoints,
                r.secs,
                r.events as f64 / r.secs,
                r.cpu,
                r.events as f64 / r.cpu,
                r.sequential_secs,
                r.events as f64 / r.sequential_secs,
                r.sequential_cpu
            ));
        }
        let mut existing = std::fs::read_to_string(out).unwrap_or_default();
        existing.push_str(&md);
        std::fs::write(out, existing).unwrap();
    }
}
