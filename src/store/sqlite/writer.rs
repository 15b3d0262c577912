//! The single writer: one thread takes every queued change and commits them
//! in batches (group commit, one fsync per batch). Each change runs inside its
//! own SAVEPOINT, so a conflicting change fails alone while its neighbours
//! commit; audit events are chained from the head read inside the
//! transaction, so an event exists if and only if its change does.
//!
//! Lease operations (the scheduler's leader lease) go through the same
//! queue, each in its own IMMEDIATE transaction after the batch it arrived
//! behind: they are serialised with this process's writes and, by SQLite's
//! write lock, with every other process's.

use super::db;
use super::writes::apply_write;
use crate::audit::{AuditEvent, GENESIS_HASH};
use crate::clock::Clock;
use crate::store::{Change, DatabaseError, StoreError};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Told the size and duration of every batch the writer commits (metrics).
pub type BatchObserver = Arc<dyn Fn(usize, std::time::Duration) + Send + Sync>;

/// The live audit sink the writer hands each batch's events to before it
/// commits (see [`crate::audit::sink`]).
pub type Sink = Option<Arc<crate::audit::sink::AuditSink>>;

type JobResult = Result<Vec<i64>, StoreError>;

struct ChangeJob {
    change: Change,
    reply: oneshot::Sender<JobResult>,
}

/// A lease operation (see [`crate::store::Store::try_lease`]); times in ms.
#[derive(Debug, Clone)]
pub(super) enum LeaseOp {
    /// Take, take over (expired) or extend: the reply says whether `holder` holds it.
    Try {
        name: String,
        holder: String,
        now_ms: i64,
        ttl_ms: i64,
    },
    /// Give up (expire at once), if held by `holder`: the reply is always `true`.
    Release { name: String, holder: String },
}

struct LeaseJob {
    op: LeaseOp,
    reply: oneshot::Sender<Result<bool, StoreError>>,
}

struct CheckpointJob {
    checkpoint: crate::audit::Checkpoint,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

enum Job {
    Change(ChangeJob),
    Lease(LeaseJob),
    Checkpoint(CheckpointJob),
}

/// The queue to the writer thread; the thread ends when this is dropped.
pub(super) struct Writer {
    jobs: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer thread on `conn` (already migrated).
    pub(super) fn spawn(
        conn: Connection,
        batch_max: usize,
        clock: Arc<dyn Clock>,
        observer: BatchObserver,
        sink: Sink,
    ) -> Result<Self, StoreError> {
        let batch_max = batch_max.max(1);
        let (jobs, rx) = mpsc::channel::<Job>(batch_max * 4);
        std::thread::Builder::new()
            .name("keyward-store-writer".into())
            .spawn(move || writer_loop(conn, rx, batch_max, clock, observer, sink))
            .map_err(DatabaseError::WriterThread)?;
        Ok(Self { jobs })
    }

    /// Queues a change and waits for its own outcome.
    pub(super) async fn submit(&self, change: Change) -> JobResult {
        if change.audit.is_empty() && !change.writes.is_empty() {
            return Err(DatabaseError::Unaudited.into());
        }
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Change(ChangeJob { change, reply }))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Queues a checkpoint insert (see [`crate::store::Store::record_audit_checkpoint`]).
    pub(super) async fn checkpoint(
        &self,
        checkpoint: crate::audit::Checkpoint,
    ) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Checkpoint(CheckpointJob { checkpoint, reply }))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Queues a lease operation and waits for its outcome.
    pub(super) async fn lease(&self, op: LeaseOp) -> Result<bool, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Lease(LeaseJob { op, reply }))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }
}

fn writer_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    batch_max: usize,
    clock: Arc<dyn Clock>,
    observer: BatchObserver,
    sink: Sink,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = Vec::new();
        // A lease or checkpoint operation ends the batch; it runs right after it.
        let mut lease = None;
        let mut checkpoint = None;
        match first {
            Job::Change(c) => batch.push(c),
            Job::Lease(l) => lease = Some(l),
            Job::Checkpoint(c) => checkpoint = Some(c),
        }
        while lease.is_none() && checkpoint.is_none() && batch.len() < batch_max {
            match rx.try_recv() {
                Ok(Job::Change(c)) => batch.push(c),
                Ok(Job::Lease(l)) => lease = Some(l),
                Ok(Job::Checkpoint(c)) => checkpoint = Some(c),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            commit_and_reply(&mut conn, batch, clock.as_ref(), &observer, &sink);
        }
        if let Some(l) = lease {
            let r = run_lease(&mut conn, &l.op);
            if let Err(e) = &r {
                tracing::warn!(error = %e, "store lease operation failed");
            }
            let _ = l.reply.send(r);
        }
        if let Some(c) = checkpoint {
            let r = insert_checkpoint(&mut conn, &c.checkpoint);
            let _ = c.reply.send(r);
        }
    }
}

/// Inserts a checkpoint in its own IMMEDIATE transaction, after checking
/// that it names an existing event by its hash and moves forward.
fn insert_checkpoint(
    conn: &mut Connection,
    cp: &crate::audit::Checkpoint,
) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db)?;
    let hash: Option<Vec<u8>> = tx
        .prepare_cached("SELECT hash FROM audit_events WHERE seq = ?1")
        .map_err(db)?
        .query_row(params![cp.seq], |r| r.get(0))
        .optional()
        .map_err(db)?;
    if hash.as_deref() != Some(cp.hash.as_slice()) {
        return Err(StoreError::InvalidArgument(
            "checkpoint names no event with that sequence and hash",
        ));
    }
    let last: Option<i64> = tx
        .query_row("SELECT MAX(seq) FROM audit_checkpoints", [], |r| r.get(0))
        .map_err(db)?;
    if last.is_some_and(|l| l >= cp.seq) {
        return Err(StoreError::InvalidArgument(
            "checkpoint does not move past the newest stored checkpoint",
        ));
    }
    tx.prepare_cached(
        "INSERT INTO audit_checkpoints (seq, hash, at_ms, key_id, signature) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .map_err(db)?
    .execute(params![
        cp.seq,
        cp.hash,
        cp.at_ms,
        cp.key_id.to_string(),
        cp.signature
    ])
    .map_err(db)?;
    tx.commit().map_err(db)?;
    Ok(())
}

/// Runs one lease operation in its own IMMEDIATE transaction (the write
/// lock is taken before anything is read, so two processes cannot both
/// see the lease free).
fn run_lease(conn: &mut Connection, op: &LeaseOp) -> Result<bool, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db)?;
    let held = match op {
        LeaseOp::Try {
            name,
            holder,
            now_ms,
            ttl_ms,
        } => {
            let expires_at = now_ms.saturating_add(*ttl_ms);
            // Inserted, or updated only when it is ours (extended, never
            // shortened) or expired (taken over, acquired now); otherwise
            // no row changes.
            let n = tx
                .prepare_cached(
                    "INSERT INTO leases (name, holder, expires_at, acquired_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (name) DO UPDATE SET
                         expires_at = CASE WHEN leases.holder = excluded.holder
                             THEN MAX(leases.expires_at, excluded.expires_at)
                             ELSE excluded.expires_at END,
                         acquired_at = CASE WHEN leases.holder = excluded.holder
                                 AND leases.expires_at > ?4
                             THEN leases.acquired_at
                             ELSE excluded.acquired_at END,
                         holder = excluded.holder
                     WHERE leases.holder = excluded.holder OR leases.expires_at <= ?4",
                )
                .map_err(db)?
                .execute(params![name, holder, expires_at, now_ms])
                .map_err(db)?;
            n == 1
        }
        LeaseOp::Release { name, holder } => {
            // Expired, not deleted: the row keeps naming the last holder.
            tx.prepare_cached(
                "UPDATE leases SET expires_at = MIN(expires_at, 0) WHERE name = ?1 AND holder = ?2",
            )
            .map_err(db)?
            .execute(params![name, holder])
            .map_err(db)?;
            true
        }
    };
    tx.commit().map_err(db)?;
    Ok(held)
}

/// Commits a batch of changes and answers each caller.
fn commit_and_reply(
    conn: &mut Connection,
    batch: Vec<ChangeJob>,
    clock: &dyn Clock,
    observer: &BatchObserver,
    sink: &Sink,
) {
    let started = std::time::Instant::now();
    let results = commit_batch(conn, &batch, clock, sink);
    observer(batch.len(), started.elapsed());
    match results {
        Ok(per_job) => {
            for (job, r) in batch.into_iter().zip(per_job) {
                let _ = job.reply.send(r);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, size = batch.len(), "store batch commit failed");
            let e = Arc::new(e);
            for job in batch {
                let _ = job.reply.send(Err(DatabaseError::Batch(e.clone()).into()));
            }
        }
    }
}

/// Commits a batch; an error here (not a change's own conflict) fails the
/// whole transaction, so every change in it. With a sink, the events of
/// the changes that applied are handed to it after the last change and
/// before the commit: a `fail-closed` sink that cannot take them rolls the
/// batch back ([`DatabaseError::AuditSink`]).
fn commit_batch(
    conn: &mut Connection,
    batch: &[ChangeJob],
    clock: &dyn Clock,
    sink: &Sink,
) -> Result<Vec<JobResult>, DatabaseError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(DatabaseError::Sqlite)?;
    // Read the head inside the write transaction: another process (the CLI)
    // may have appended since our last batch.
    let (mut seq, mut head): (i64, Vec<u8>) = tx
        .query_row(
            "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(DatabaseError::Sqlite)?
        .unwrap_or((0, GENESIS_HASH.to_vec()));
    let at_ms = (clock.now().unix_timestamp_nanos() / 1_000_000) as i64;
    let mut results = Vec::with_capacity(batch.len());
    let mut events: Vec<AuditEvent> = Vec::new();
    for job in batch {
        let mark = events.len();
        tx.prepare_cached("SAVEPOINT change")
            .map_err(DatabaseError::Sqlite)?
            .execute([])
            .map_err(DatabaseError::Sqlite)?;
        let collect = sink.as_ref().map(|_| &mut events);
        let applied = apply_collect(&tx, &job.change, seq, &head, at_ms, collect);
        match applied {
            Ok((seqs, new_head)) => {
                tx.prepare_cached("RELEASE change")
                    .map_err(DatabaseError::Sqlite)?
                    .execute([])
                    .map_err(DatabaseError::Sqlite)?;
                if let Some(last) = seqs.last() {
                    seq = *last;
                    head = new_head;
                }
                results.push(Ok(seqs));
            }
            Err(e) => {
                tx.execute_batch("ROLLBACK TO change; RELEASE change")
                    .map_err(DatabaseError::Sqlite)?;
                events.truncate(mark);
                results.push(Err(e));
            }
        }
    }
    if let Some(sink) = sink {
        sink.deliver(&events).map_err(DatabaseError::AuditSink)?;
    }
    tx.commit().map_err(DatabaseError::Sqlite)?;
    if let Some(sink) = sink {
        sink.committed(&events);
    }
    Ok(results)
}

pub(super) fn apply(
    tx: &Transaction<'_>,
    change: &Change,
    seq: i64,
    head: &[u8],
    at_ms: i64,
) -> Result<(Vec<i64>, Vec<u8>), StoreError> {
    apply_collect(tx, change, seq, head, at_ms, None)
}

/// [`apply`], pushing each chained event onto `collect` when given.
fn apply_collect(
    tx: &Transaction<'_>,
    change: &Change,
    mut seq: i64,
    head: &[u8],
    at_ms: i64,
    mut collect: Option<&mut Vec<AuditEvent>>,
) -> Result<(Vec<i64>, Vec<u8>), StoreError> {
    for w in &change.writes {
        apply_write(tx, w)?;
    }
    let mut prev = head.to_vec();
    let mut seqs = Vec::with_capacity(change.audit.len());
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO audit_events (seq, at_ms, actor, action, target, outcome, details, prev_hash, hash, version, source, sealed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )
        .map_err(db)?;
    for draft in &change.audit {
        seq += 1;
        let e = AuditEvent::chain(draft.clone(), seq, at_ms, prev);
        let details = serde_json::to_string(&e.details).map_err(DatabaseError::AuditDetails)?;
        stmt.execute(params![
            e.seq,
            e.at_ms,
            e.actor,
            e.action,
            e.target,
            e.outcome.as_str(),
            details,
            e.prev_hash,
            e.hash,
            e.version,
            e.source,
            e.sealed
        ])
        .map_err(db)?;
        seqs.push(seq);
        match collect.as_deref_mut() {
            Some(out) => {
                prev = e.hash.clone();
                out.push(e);
            }
            None => prev = e.hash,
        }
    }
    Ok((seqs, prev))
}
