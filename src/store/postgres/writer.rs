//! This daemon's writer: one task owning one connection takes every queued
//! change and commits them in batches (group commit). Each change runs
//! inside its own SAVEPOINT, so a conflicting change fails alone while its
//! neighbours commit.
//!
//! Audit order across daemons: every write transaction first takes the
//! transaction-scoped advisory lock [`WRITE_LOCK`], then reads the chain's
//! head and chains from it. Writes of all daemons sharing the database are
//! thereby serialised (as SQLite's write lock serialises processes): one
//! total order, no gap, no fork, and every condition read inside the
//! transaction holds at commit.
//!
//! The task runs on a thread of its own with a single-threaded runtime (as
//! the SQLite writer thread): a `fail-closed` audit sink's blocking write
//! stalls this thread only, never the daemon's request workers.

use super::reads::head_of;
use super::writes::apply_write;
use super::{Db, StmtCache, Target, pg};
use crate::audit::AuditEvent;
use crate::clock::Clock;
use crate::store::{Change, DatabaseError, StoreError};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, Transaction};

/// The advisory lock every write transaction of every daemon takes first.
pub const WRITE_LOCK: i64 = 0x6b65_7977_6172_6402;

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
    Try {
        name: String,
        holder: String,
        now_ms: i64,
        ttl_ms: i64,
    },
    Release {
        name: String,
        holder: String,
    },
}

enum Job {
    Change(ChangeJob),
    Lease(LeaseOp, oneshot::Sender<Result<bool, StoreError>>),
    Checkpoint(
        crate::audit::Checkpoint,
        oneshot::Sender<Result<(), StoreError>>,
    ),
}

/// The queue to the writer; the writer ends when this is dropped.
pub(super) struct Writer {
    jobs: mpsc::Sender<Job>,
}

/// The writer's connection, reconnected when it breaks.
struct Session {
    target: Target,
    client: Option<(Client, StmtCache)>,
}

impl Session {
    async fn get(&mut self) -> Result<&mut (Client, StmtCache), StoreError> {
        if self.client.as_ref().is_some_and(|(c, _)| c.is_closed()) {
            tracing::warn!("the store writer's PostgreSQL connection closed; reconnecting");
            self.client = None;
        }
        if self.client.is_none() {
            let c = self.target.connect().await?;
            self.client = Some((c, StmtCache::default()));
        }
        match self.client.as_mut() {
            Some(c) => Ok(c),
            None => Err(StoreError::WriterGone),
        }
    }
}

impl Writer {
    /// Starts the writer thread, connected (an error here is the caller's).
    pub(super) async fn spawn(
        target: Target,
        batch_max: usize,
        clock: Arc<dyn Clock>,
        observer: BatchObserver,
        sink: Sink,
    ) -> Result<Self, StoreError> {
        let batch_max = batch_max.max(1);
        let (jobs, rx) = mpsc::channel::<Job>(batch_max * 4);
        let (ready, started) = oneshot::channel::<Result<(), StoreError>>();
        std::thread::Builder::new()
            .name("keyward-pg-writer".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send(Err(DatabaseError::WriterThread(e).into()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut session = Session {
                        target,
                        client: None,
                    };
                    if let Err(e) = session.get().await {
                        let _ = ready.send(Err(e));
                        return;
                    }
                    let _ = ready.send(Ok(()));
                    writer_loop(session, rx, batch_max, clock, observer, sink).await;
                });
            })
            .map_err(DatabaseError::WriterThread)?;
        started.await.map_err(|_| StoreError::WriterGone)??;
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

    /// Queues a checkpoint insert.
    pub(super) async fn checkpoint(&self, cp: crate::audit::Checkpoint) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Checkpoint(cp, reply))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Queues a lease operation and waits for its outcome.
    pub(super) async fn lease(&self, op: LeaseOp) -> Result<bool, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Lease(op, reply))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }
}

async fn writer_loop(
    mut session: Session,
    mut rx: mpsc::Receiver<Job>,
    batch_max: usize,
    clock: Arc<dyn Clock>,
    observer: BatchObserver,
    sink: Sink,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::new();
        // A lease or checkpoint operation ends the batch; it runs right after it.
        let mut other = None;
        match first {
            Job::Change(c) => batch.push(c),
            job => other = Some(job),
        }
        while other.is_none() && batch.len() < batch_max {
            match rx.try_recv() {
                Ok(Job::Change(c)) => batch.push(c),
                Ok(job) => other = Some(job),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            commit_and_reply(&mut session, batch, clock.as_ref(), &observer, &sink).await;
        }
        match other {
            Some(Job::Lease(op, reply)) => {
                let r = match session.get().await {
                    Ok((client, _)) => run_lease(client, &op).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = &r {
                    tracing::warn!(error = %e, "store lease operation failed");
                }
                let _ = reply.send(r);
            }
            Some(Job::Checkpoint(cp, reply)) => {
                let r = match session.get().await {
                    Ok((client, cache)) => insert_checkpoint(client, cache, &cp).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            _ => {}
        }
    }
}

/// Takes [`WRITE_LOCK`] for the rest of `tx`.
async fn write_lock(tx: &Transaction<'_>) -> Result<(), StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
        .await
        .map_err(pg)?;
    Ok(())
}

/// Inserts a checkpoint under the write lock, after checking that it names
/// an existing event by its hash and moves forward.
async fn insert_checkpoint(
    client: &mut Client,
    cache: &StmtCache,
    cp: &crate::audit::Checkpoint,
) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg)?;
    write_lock(&tx).await?;
    let db = Db::new(&tx, cache);
    let hash: Option<Vec<u8>> = match db
        .opt("SELECT hash FROM audit_events WHERE seq = $1", &[&cp.seq])
        .await?
    {
        Some(r) => Some(super::rows::get(&r, 0)?),
        None => None,
    };
    if hash.as_deref() != Some(cp.hash.as_slice()) {
        return Err(StoreError::InvalidArgument(
            "checkpoint names no event with that sequence and hash",
        ));
    }
    let last: Option<i64> = super::rows::get(
        &db.row("SELECT MAX(seq) FROM audit_checkpoints", &[])
            .await?,
        0,
    )?;
    if last.is_some_and(|l| l >= cp.seq) {
        return Err(StoreError::InvalidArgument(
            "checkpoint does not move past the newest stored checkpoint",
        ));
    }
    db.exec(
        "INSERT INTO audit_checkpoints (seq, hash, at_ms, key_id, signature) VALUES ($1, $2, $3, $4, $5)",
        &[&cp.seq, &cp.hash, &cp.at_ms, &cp.key_id.to_string(), &cp.signature],
    )
    .await?;
    tx.commit().await.map_err(pg)?;
    Ok(())
}

/// Runs one lease operation as one statement: `INSERT ... ON CONFLICT DO
/// UPDATE ... WHERE` locks the row and re-checks the condition on its
/// newest version, so two daemons cannot both see the lease free.
async fn run_lease(client: &mut Client, op: &LeaseOp) -> Result<bool, StoreError> {
    match op {
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
            let n = client
                .execute(
                    "INSERT INTO leases (name, holder, expires_at, acquired_at) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (name) DO UPDATE SET
                         expires_at = CASE WHEN leases.holder = excluded.holder
                             THEN GREATEST(leases.expires_at, excluded.expires_at)
                             ELSE excluded.expires_at END,
                         acquired_at = CASE WHEN leases.holder = excluded.holder
                                 AND leases.expires_at > $4
                             THEN leases.acquired_at
                             ELSE excluded.acquired_at END,
                         holder = excluded.holder
                     WHERE leases.holder = excluded.holder OR leases.expires_at <= $4",
                    &[name, holder, &expires_at, now_ms],
                )
                .await
                .map_err(pg)?;
            Ok(n == 1)
        }
        LeaseOp::Release { name, holder } => {
            // Expired, not deleted: the row keeps naming the last holder.
            client
                .execute(
                    "UPDATE leases SET expires_at = LEAST(expires_at, 0) WHERE name = $1 AND holder = $2",
                    &[name, holder],
                )
                .await
                .map_err(pg)?;
            Ok(true)
        }
    }
}

/// Commits a batch of changes and answers each caller.
async fn commit_and_reply(
    session: &mut Session,
    batch: Vec<ChangeJob>,
    clock: &dyn Clock,
    observer: &BatchObserver,
    sink: &Sink,
) {
    let started = std::time::Instant::now();
    let results = match session.get().await {
        Ok((client, cache)) => commit_batch(client, cache, &batch, clock, sink).await,
        Err(StoreError::Database(e)) => Err(e),
        Err(e) => Err(DatabaseError::PostgresRow(e.to_string())),
    };
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

/// A batch-level failure (not a change's own conflict).
fn batch_err(e: tokio_postgres::Error) -> DatabaseError {
    DatabaseError::Postgres(e)
}

fn store_to_batch(e: StoreError) -> DatabaseError {
    match e {
        StoreError::Database(d) => d,
        // `pg` maps a unique violation to a conflict; outside a change
        // (the head read, the lock) that cannot happen, but keep it honest.
        other => DatabaseError::PostgresRow(other.to_string()),
    }
}

/// Commits a batch; an error here (not a change's own conflict) fails the
/// whole transaction, so every change in it. With a sink, the events of
/// the changes that applied are handed to it after the last change and
/// before the commit: a `fail-closed` sink that cannot take them rolls the
/// batch back ([`DatabaseError::AuditSink`]).
async fn commit_batch(
    client: &mut Client,
    cache: &StmtCache,
    batch: &[ChangeJob],
    clock: &dyn Clock,
    sink: &Sink,
) -> Result<Vec<JobResult>, DatabaseError> {
    let mut tx = client.transaction().await.map_err(batch_err)?;
    write_lock(&tx).await.map_err(store_to_batch)?;
    // Read the head under the lock: another daemon (or the CLI) may have
    // appended since our last batch.
    let (mut seq, mut head) = head_of(&Db::new(&tx, cache))
        .await
        .map_err(store_to_batch)?;
    let at_ms = (clock.now().unix_timestamp_nanos() / 1_000_000) as i64;
    let mut results = Vec::with_capacity(batch.len());
    let mut events: Vec<AuditEvent> = Vec::new();
    for job in batch {
        let mark = events.len();
        let sp = tx.savepoint("change").await.map_err(batch_err)?;
        let collect = sink.as_ref().map(|_| &mut events);
        let applied = apply(
            &Db::new(&sp, cache),
            &job.change,
            seq,
            &head,
            at_ms,
            collect,
        )
        .await;
        match applied {
            Ok((seqs, new_head)) => {
                sp.commit().await.map_err(batch_err)?;
                if let Some(last) = seqs.last() {
                    seq = *last;
                    head = new_head;
                }
                results.push(Ok(seqs));
            }
            Err(e) => {
                sp.rollback().await.map_err(batch_err)?;
                events.truncate(mark);
                results.push(Err(e));
            }
        }
    }
    if let Some(sink) = sink {
        sink.deliver(&events).map_err(DatabaseError::AuditSink)?;
    }
    tx.commit().await.map_err(batch_err)?;
    if let Some(sink) = sink {
        sink.committed(&events);
    }
    Ok(results)
}

/// Applies one change's writes and chains its events after (`seq`, `head`).
async fn apply(
    tx: &Db<'_, Transaction<'_>>,
    change: &Change,
    mut seq: i64,
    head: &[u8],
    at_ms: i64,
    mut collect: Option<&mut Vec<AuditEvent>>,
) -> Result<(Vec<i64>, Vec<u8>), StoreError> {
    for w in &change.writes {
        apply_write(tx, w).await?;
    }
    let mut prev = head.to_vec();
    let mut seqs = Vec::with_capacity(change.audit.len());
    for draft in &change.audit {
        seq += 1;
        let e = AuditEvent::chain(draft.clone(), seq, at_ms, prev);
        let details = serde_json::to_string(&e.details).map_err(DatabaseError::AuditDetails)?;
        tx.exec(
            "INSERT INTO audit_events (seq, at_ms, actor, action, target, outcome, details, prev_hash, hash, version, source, sealed)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            &[
                &e.seq,
                &e.at_ms,
                &e.actor,
                &e.action,
                &e.target,
                &e.outcome.as_str(),
                &details,
                &e.prev_hash,
                &e.hash,
                &i64::from(e.version),
                &e.source,
                &e.sealed,
            ],
        )
        .await?;
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
