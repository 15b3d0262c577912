//! The daemon's backup service: makes archives (on demand or on schedule),
//! records them with their audit events, replicates them to every location
//! with retries, verifies the newest one everywhere, and prunes by retention.
//!
//! Every state change is one store change with its audit event:
//! `backup.create` (the record and one pending replica per location),
//! `backup.replicate` (stored, or failed with the error and the next try),
//! `backup.verify`, `backup.prune`. A failure that changes nothing (an
//! archive that could not be made) is audited too, with outcome `failure`,
//! counted in metrics and notified: backups never fail silently.

use super::archive::Written;
use super::create::{Sources, create_archive};
use super::keys::{Identities, read_identities};
use super::location::{Location, LocationError};
use super::restore::check_archive;
use super::{BackupError, retention};
use crate::audit::{AuditDraft, Outcome};
use crate::clock::Clock;
use crate::config::{BackupConfig, Config};
use crate::keystore::KeyStores;
use crate::metrics::Metrics;
use crate::model::{BackupTrigger, ReplicaState};
use crate::notify::{Notification, Notifiers};
use crate::store::{BackupRecord, Change, ReplicaRecord, Store, Write};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// Where a backup started through the API stands before it is recorded.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RunState {
    Running { started_at: i64 },
    Failed { code: String, error: String },
}

/// One location's verification result.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyResult {
    pub location: String,
    pub ok: bool,
    /// `checksum` (downloaded, SHA-256 equal to the record) or `full`
    /// (also decrypted with the verification identity, every member hash checked).
    pub depth: &'static str,
    pub error: Option<String>,
    pub code: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub backup_id: Uuid,
    pub file_name: String,
    pub results: Vec<VerifyResult>,
}

/// The name metrics and records use for the spool directory.
pub const SPOOL: &str = "spool";

pub struct BackupService {
    config: Arc<Config>,
    settings: BackupConfig,
    store: Arc<dyn Store>,
    keystores: KeyStores,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    notifiers: Arc<Notifiers>,
    locations: Vec<Location>,
    verify_identities: Option<Arc<Identities>>,
    /// One backup, verification or prune at a time.
    busy: Arc<tokio::sync::Mutex<()>>,
    runs: Mutex<BTreeMap<Uuid, RunState>>,
}

impl BackupService {
    /// Builds the service from `config.backup` (`None` without one). Reads
    /// the recipients and the verification identity now, so that a broken
    /// file stops the daemon at start instead of the first backup at 3 a.m.
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        keystores: KeyStores,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        notifiers: Arc<Notifiers>,
    ) -> Result<Option<Self>, BackupError> {
        let Some(settings) = config.backup.clone() else {
            return Ok(None);
        };
        super::keys::read_recipients(&settings.recipients_files)?;
        super::keys::kek_recipients(
            &settings.recipients_files,
            settings.verify_identity_file.as_deref(),
        )?;
        let verify_identities = settings
            .verify_identity_file
            .as_deref()
            .map(read_identities)
            .transpose()?
            .map(Arc::new);
        let locations = settings
            .locations
            .iter()
            .map(Location::from_config)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BackupError::Location {
                code: e.code(),
                message: e.to_string(),
            })?;
        Ok(Some(Self {
            config,
            settings,
            store,
            keystores,
            clock,
            metrics,
            notifiers,
            locations,
            verify_identities,
            busy: Arc::new(tokio::sync::Mutex::new(())),
            runs: Mutex::new(BTreeMap::new()),
        }))
    }

    pub fn settings(&self) -> &BackupConfig {
        &self.settings
    }

    pub fn location_names(&self) -> Vec<String> {
        self.locations
            .iter()
            .map(|l| l.name().to_string())
            .collect()
    }

    fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, BTreeMap<Uuid, RunState>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where a backup started with [`BackupService::start`] stands, until
    /// it is recorded (then read the store).
    pub fn run_state(&self, id: Uuid) -> Option<RunState> {
        self.runs().get(&id).cloned()
    }

    /// Starts a backup in the background and returns its id at once (the
    /// API answers 202). Refused while another runs.
    pub fn start(self: &Arc<Self>, actor: &str) -> Result<Uuid, BackupError> {
        let guard = self
            .busy
            .clone()
            .try_lock_owned()
            .map_err(|_| BackupError::Running)?;
        let id = Uuid::now_v7();
        self.runs().insert(
            id,
            RunState::Running {
                started_at: self.now(),
            },
        );
        let this = self.clone();
        let actor = actor.to_string();
        tokio::spawn(async move {
            let _guard = guard;
            match this.create_locked(&actor, BackupTrigger::Manual, id).await {
                Ok(_) => {
                    this.runs().remove(&id);
                }
                Err(e) => {
                    let mut runs = this.runs();
                    runs.insert(
                        id,
                        RunState::Failed {
                            code: e.code().to_string(),
                            error: e.to_string(),
                        },
                    );
                    // Keep the last failures only (ids are UUIDv7: oldest first).
                    while runs.len() > 100 {
                        runs.pop_first();
                    }
                }
            }
        });
        Ok(id)
    }

    /// Makes a backup now and waits for it (the scheduler, and tests),
    /// after any backup, verification or prune in progress.
    pub async fn create(
        &self,
        actor: &str,
        trigger: BackupTrigger,
    ) -> Result<BackupRecord, BackupError> {
        // The scheduler waits for a verification or prune in progress
        // rather than skip the night's backup.
        let _guard = self.busy.lock().await;
        self.create_locked(actor, trigger, Uuid::now_v7()).await
    }

    async fn create_locked(
        &self,
        actor: &str,
        trigger: BackupTrigger,
        id: Uuid,
    ) -> Result<BackupRecord, BackupError> {
        let at = self.clock.now();
        let src = Sources {
            config: &self.config,
            store: self.store.as_ref(),
            keystores: &self.keystores,
        };
        let written = match create_archive(
            &src,
            &self.settings.dir,
            &self.settings.recipients_files,
            id,
            at,
        )
        .await
        {
            Ok(w) => w,
            Err(e) => {
                self.create_failed(actor, id, &e).await;
                return Err(e);
            }
        };
        let record = record_of(&written, id, at.unix_timestamp(), trigger, actor);
        let change = Change::new()
            .write(Write::RecordBackup {
                record: record.clone(),
                locations: self.location_names(),
            })
            .audit(
                AuditDraft::new(actor, "backup.create", format!("backup:{id}")).details(json!({
                    "file": record.file_name,
                    "sha256": record.sha256,
                    "size_bytes": record.size_bytes,
                    "trigger": trigger.as_str(),
                    "summary": record.summary,
                    "locations": self.location_names(),
                })),
            );
        if let Err(e) = self.store.commit(change).await {
            // No record, no file: an archive nobody knows of is not kept.
            let _ = std::fs::remove_file(&written.path);
            let e = BackupError::Store(e);
            self.create_failed(actor, id, &e).await;
            return Err(e);
        }
        self.metrics.backups.with_label_values(&["ok"]).inc();
        self.metrics
            .backup_last_success
            .with_label_values(&[SPOOL])
            .set(record.created_at);
        self.metrics.backup_size_bytes.set(record.size_bytes);
        tracing::info!(backup = %id, file = %record.file_name, size = record.size_bytes, "backup made");
        for location in &self.locations {
            self.replicate(&record, location).await;
        }
        // Replicas that failed just now are pending: the gauge says so at once.
        self.refresh_pending().await;
        if let Err(e) = self.prune_locked(actor).await {
            tracing::warn!(error = %e, "pruning old backups failed; retried after the next backup");
        }
        Ok(self.store.get_backup(id).await?.unwrap_or(record))
    }

    async fn create_failed(&self, actor: &str, id: Uuid, e: &BackupError) {
        self.metrics.backups.with_label_values(&["error"]).inc();
        tracing::error!(backup = %id, code = e.code(), error = %e, "backup failed");
        let audited = self
            .store
            .commit(
                Change::new().audit(
                    AuditDraft::new(actor, "backup.create", format!("backup:{id}"))
                        .outcome(Outcome::Failure)
                        .details(json!({ "code": e.code(), "error": e.to_string() })),
                ),
            )
            .await;
        if let Err(ae) = audited {
            tracing::error!(error = %ae, "could not audit the failed backup");
        }
        self.notifiers.send(Notification::BackupFailed {
            stage: "create",
            backup_id: Some(id),
            location: None,
            code: e.code().to_string(),
            error: e.to_string(),
        });
    }

    fn spool_path(&self, file_name: &str) -> PathBuf {
        self.settings.dir.join(file_name)
    }

    /// Uploads one backup to one location and records the outcome.
    async fn replicate(&self, b: &BackupRecord, location: &Location) {
        let now = self.now();
        let result = location
            .upload(&self.spool_path(&b.file_name), &b.file_name, &b.sha256)
            .await;
        let name = location.name().to_string();
        let (write, outcome, details) = match &result {
            Ok(()) => (
                Write::ReplicaStored {
                    backup_id: b.id,
                    location: name.clone(),
                    at: now,
                },
                Outcome::Success,
                json!({ "location": name, "file": b.file_name }),
            ),
            Err(e) => {
                let attempts = b
                    .replicas
                    .iter()
                    .find(|r| r.location == name)
                    .map_or(0, |r| r.attempts);
                let next = now + self.backoff(attempts);
                (
                    Write::ReplicaFailed {
                        backup_id: b.id,
                        location: name.clone(),
                        error: e.to_string(),
                        next_attempt_at: next,
                        at: now,
                    },
                    Outcome::Failure,
                    json!({
                        "location": name,
                        "file": b.file_name,
                        "code": e.code(),
                        "error": e.to_string(),
                        "next_attempt_at": next,
                    }),
                )
            }
        };
        let committed = self
            .store
            .commit(
                Change::new().write(write).audit(
                    AuditDraft::new("system", "backup.replicate", format!("backup:{}", b.id))
                        .outcome(outcome)
                        .details(details),
                ),
            )
            .await;
        if let Err(e) = committed {
            tracing::error!(backup = %b.id, location = %name, error = %e, "could not record a replica");
        }
        match result {
            Ok(()) => {
                self.metrics
                    .backup_last_success
                    .with_label_values(&[&name])
                    .set(
                        b.created_at.max(
                            self.metrics
                                .backup_last_success
                                .with_label_values(&[&name])
                                .get(),
                        ),
                    );
                tracing::info!(backup = %b.id, location = %name, "backup replicated");
            }
            Err(e) => self.replica_failed(b.id, &name, "replicate", &e),
        }
    }

    fn replica_failed(&self, id: Uuid, location: &str, stage: &'static str, e: &LocationError) {
        self.metrics
            .backup_failures
            .with_label_values(&[location, stage])
            .inc();
        tracing::warn!(backup = %id, location, code = e.code(), error = %e, "backup {stage} failed");
        self.notifiers.send(Notification::BackupFailed {
            stage,
            backup_id: Some(id),
            location: Some(location.to_string()),
            code: e.code().to_string(),
            error: e.to_string(),
        });
    }

    /// Seconds before the next try after `attempts` failures.
    fn backoff(&self, attempts: i64) -> i64 {
        let min = self.settings.retry_min.as_secs() as i64;
        let max = self.settings.retry_max.as_secs() as i64;
        let shift = attempts.clamp(0, 20) as u32;
        min.saturating_mul(1i64 << shift).min(max).max(1)
    }

    /// Retries the replicas that are due (the scheduler's every tick).
    pub async fn replicate_due(&self) -> Result<usize, BackupError> {
        let Ok(_guard) = self.busy.try_lock() else {
            return Ok(0);
        };
        let due = self.store.due_replicas(self.now()).await?;
        let mut done = 0;
        let mut cache: BTreeMap<Uuid, BackupRecord> = BTreeMap::new();
        for r in &due {
            let Some(location) = self.locations.iter().find(|l| l.name() == r.location) else {
                continue;
            };
            let b = match cache.get(&r.backup_id) {
                Some(b) => b.clone(),
                None => match self.store.get_backup(r.backup_id).await? {
                    Some(b) => {
                        cache.insert(b.id, b.clone());
                        b
                    }
                    None => continue,
                },
            };
            if !self.spool_path(&b.file_name).exists() {
                // The spool copy is gone (deleted by hand, or a restore
                // brought this record from another machine): nothing can be
                // uploaded; recorded as failed so that it is seen, retried
                // at the longest backoff.
                let now = self.now();
                let error = format!(
                    "the spool copy {} is gone; nothing to upload",
                    self.spool_path(&b.file_name).display()
                );
                self.store
                    .commit(
                        Change::new()
                            .write(Write::ReplicaFailed {
                                backup_id: b.id,
                                location: r.location.clone(),
                                error: error.clone(),
                                next_attempt_at: now + self.settings.retry_max.as_secs() as i64,
                                at: now,
                            })
                            .audit(
                                AuditDraft::new(
                                    "system",
                                    "backup.replicate",
                                    format!("backup:{}", b.id),
                                )
                                .outcome(Outcome::Failure)
                                .details(json!({
                                    "location": r.location,
                                    "file": b.file_name,
                                    "code": "backup_spool_copy_missing",
                                    "error": error,
                                })),
                            ),
                    )
                    .await?;
                continue;
            }
            self.replicate(&b, location).await;
            done += 1;
        }
        self.refresh_pending().await;
        Ok(done)
    }

    async fn refresh_pending(&self) {
        if let Ok(list) = self.store.list_backups(false, 10_000).await {
            let pending = list
                .iter()
                .flat_map(|b| &b.replicas)
                .filter(|r| matches!(r.state, ReplicaState::Pending | ReplicaState::Failed))
                .count();
            self.metrics.backup_replicas_pending.set(pending as i64);
        }
    }

    /// Verifies backup `id` (default: the newest) in every location and in
    /// the spool: download, compare the SHA-256 with the record, and with a
    /// verification identity decrypt it and check every member hash.
    pub async fn verify(&self, id: Option<Uuid>, actor: &str) -> Result<VerifyReport, BackupError> {
        let _guard = self.busy.lock().await;
        let b = match id {
            Some(id) => self
                .store
                .get_backup(id)
                .await?
                .ok_or(BackupError::Unknown(id))?,
            None => self
                .store
                .list_backups(false, 1)
                .await?
                .into_iter()
                .next()
                .ok_or(BackupError::NoBackup)?,
        };
        let mut results = Vec::new();
        // The spool copy.
        let spool = self.spool_path(&b.file_name);
        if spool.exists() {
            results.push(self.verify_file(SPOOL, &spool, &b).await);
        }
        for location in &self.locations {
            let tmp =
                self.settings
                    .dir
                    .join(format!(".verify-{}-{}", location.name(), b.file_name));
            let result = match location.download_to(&b.file_name, &tmp).await {
                Ok(_) => self.verify_file(location.name(), &tmp, &b).await,
                Err(e) => VerifyResult {
                    location: location.name().to_string(),
                    ok: false,
                    depth: "checksum",
                    code: Some(e.code().to_string()),
                    error: Some(e.to_string()),
                },
            };
            let _ = std::fs::remove_file(&tmp);
            results.push(result);
        }
        let now = self.now();
        for r in &results {
            let stored = b.replicas.iter().any(|x| x.location == r.location);
            let mut change = Change::new();
            if stored {
                change = change.write(Write::ReplicaVerified {
                    backup_id: b.id,
                    location: r.location.clone(),
                    error: r.error.clone(),
                    at: now,
                });
            }
            let change = change.audit(
                AuditDraft::new(actor, "backup.verify", format!("backup:{}", b.id))
                    .outcome(if r.ok {
                        Outcome::Success
                    } else {
                        Outcome::Failure
                    })
                    .details(json!({
                        "location": r.location,
                        "depth": r.depth,
                        "code": r.code,
                        "error": r.error,
                    })),
            );
            self.store.commit(change).await?;
            if r.ok {
                self.metrics
                    .backup_last_verified
                    .with_label_values(&[&r.location])
                    .set(now);
            } else {
                self.metrics
                    .backup_failures
                    .with_label_values(&[&r.location, "verify"])
                    .inc();
                self.notifiers.send(Notification::BackupFailed {
                    stage: "verify",
                    backup_id: Some(b.id),
                    location: Some(r.location.clone()),
                    code: r.code.clone().unwrap_or_default(),
                    error: r.error.clone().unwrap_or_default(),
                });
            }
        }
        if results.is_empty() {
            return Err(BackupError::NoCopy(b.file_name));
        }
        Ok(VerifyReport {
            backup_id: b.id,
            file_name: b.file_name,
            results,
        })
    }

    async fn verify_file(
        &self,
        location: &str,
        path: &std::path::Path,
        b: &BackupRecord,
    ) -> VerifyResult {
        let mut r = VerifyResult {
            location: location.to_string(),
            ok: false,
            depth: "checksum",
            error: None,
            code: None,
        };
        let sha = {
            let path = path.to_path_buf();
            tokio::task::spawn_blocking(move || super::archive::file_sha256(&path)).await
        };
        match sha {
            Ok(Ok(s)) if s == b.sha256 => {}
            Ok(Ok(s)) => {
                r.code = Some("backup_checksum_mismatch".into());
                r.error = Some(format!(
                    "the SHA-256 is {s}, the backup record says {}",
                    b.sha256
                ));
                return r;
            }
            Ok(Err(e)) => {
                r.code = Some("backup_read_failed".into());
                r.error = Some(e.to_string());
                return r;
            }
            Err(e) => {
                r.code = Some("backup_read_failed".into());
                r.error = Some(e.to_string());
                return r;
            }
        }
        if let Some(ids) = &self.verify_identities {
            r.depth = "full";
            match check_archive(path, ids.clone()).await {
                Ok(c) if c.manifest.backup_id == b.id => {}
                Ok(c) => {
                    r.code = Some("backup_corrupt".into());
                    r.error = Some(format!(
                        "the archive holds backup {}, not {}",
                        c.manifest.backup_id, b.id
                    ));
                    return r;
                }
                Err(e) => {
                    r.code = Some(e.code().to_string());
                    r.error = Some(e.to_string());
                    return r;
                }
            }
        }
        r.ok = true;
        r
    }

    /// Applies retention: deletes pruned backups from every location and
    /// the spool, then records each prune. A backup whose deletion failed
    /// somewhere stays recorded and is tried again next time.
    pub async fn prune(&self, actor: &str) -> Result<Vec<Uuid>, BackupError> {
        let _guard = self.busy.lock().await;
        self.prune_locked(actor).await
    }

    async fn prune_locked(&self, actor: &str) -> Result<Vec<Uuid>, BackupError> {
        let list = self.store.list_backups(false, 10_000).await?;
        let ids: Vec<(Uuid, i64)> = list.iter().map(|b| (b.id, b.created_at)).collect();
        let mut doomed =
            retention::prunable(&ids, self.settings.keep_daily, self.settings.keep_weekly);
        // Never prune the newest copy a location holds: while uploads to it
        // fail, retention would otherwise delete its last good copy.
        for location in self.location_names() {
            if let Some(newest_stored) = list.iter().find(|b| {
                b.replicas
                    .iter()
                    .any(|r| r.location == location && r.state == ReplicaState::Stored)
            }) {
                doomed.retain(|id| *id != newest_stored.id);
            }
        }
        let mut pruned = Vec::new();
        for id in doomed {
            let Some(b) = list.iter().find(|b| b.id == id) else {
                continue;
            };
            let mut failed = None;
            for location in &self.locations {
                if let Err(e) = location.delete(&b.file_name).await {
                    self.replica_failed(b.id, location.name(), "prune", &e);
                    failed = Some(e.to_string());
                }
            }
            if failed.is_some() {
                continue;
            }
            match std::fs::remove_file(self.spool_path(&b.file_name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(backup = %b.id, error = %e, "cannot delete the spool copy");
                    continue;
                }
            }
            self.store
                .commit(
                    Change::new()
                        .write(Write::PruneBackup {
                            id: b.id,
                            at: self.now(),
                        })
                        .audit(
                            AuditDraft::new(actor, "backup.prune", format!("backup:{}", b.id))
                                .details(json!({
                                    "file": b.file_name,
                                    "created_at": b.created_at,
                                    "keep_daily": self.settings.keep_daily,
                                    "keep_weekly": self.settings.keep_weekly,
                                    "locations": self.location_names(),
                                })),
                        ),
                )
                .await?;
            pruned.push(b.id);
        }
        Ok(pruned)
    }

    /// Removes `*.partial` archives from the spool: left by a daemon that
    /// stopped while writing one. Called when the daemon starts serving,
    /// before any backup can run.
    pub fn remove_partials(&self) {
        let Ok(entries) = std::fs::read_dir(&self.settings.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("keyward-") && name.ends_with(".age.partial") {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => tracing::warn!(file = %name, "removed an unfinished backup archive"),
                    Err(err) => {
                        tracing::warn!(file = %name, error = %err, "cannot remove an unfinished backup archive")
                    }
                }
            }
        }
    }

    /// Sets the per-location gauges from the store (at start, so that a
    /// restart does not reset "last backup" to never).
    pub async fn refresh_gauges(&self) -> Result<(), BackupError> {
        let list = self.store.list_backups(false, 10_000).await?;
        if let Some(newest) = list.first() {
            self.metrics.backup_size_bytes.set(newest.size_bytes);
            self.metrics
                .backup_last_success
                .with_label_values(&[SPOOL])
                .set(newest.created_at);
        }
        for location in self.location_names() {
            let stored = list
                .iter()
                .find(|b| {
                    b.replicas
                        .iter()
                        .any(|r| r.location == location && r.state == ReplicaState::Stored)
                })
                .map_or(0, |b| b.created_at);
            self.metrics
                .backup_last_success
                .with_label_values(&[&location])
                .set(stored);
            let verified = list
                .iter()
                .flat_map(|b| &b.replicas)
                .filter(|r: &&ReplicaRecord| r.location == location)
                .filter_map(|r| r.verified_at)
                .max()
                .unwrap_or(0);
            self.metrics
                .backup_last_verified
                .with_label_values(&[&location])
                .set(verified);
        }
        self.refresh_pending().await;
        Ok(())
    }
}

fn record_of(
    w: &Written,
    id: Uuid,
    created_at: i64,
    trigger: BackupTrigger,
    actor: &str,
) -> BackupRecord {
    let m = &w.manifest;
    let wrapped: Vec<&str> = m
        .keys
        .iter()
        .filter(|k| matches!(k.backup, super::archive::KeyDisposition::Wrapped { .. }))
        .map(|k| k.label.as_str())
        .collect();
    let bound: Vec<serde_json::Value> = m
        .keys
        .iter()
        .filter_map(|k| match &k.backup {
            super::archive::KeyDisposition::HardwareBound { reason } => Some(json!({
                "label": k.label, "keystore": k.keystore, "purpose": k.purpose, "reason": reason,
            })),
            _ => None,
        })
        .collect();
    let rows: BTreeMap<&str, u64> = m
        .store
        .tables
        .iter()
        .map(|t| (t.name.as_str(), t.rows))
        .collect();
    BackupRecord {
        id,
        file_name: w
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        created_at,
        sha256: w.sha256.clone(),
        size_bytes: w.size as i64,
        format_version: i64::from(m.format_version),
        schema_version: m.store.schema_version,
        trigger,
        actor: actor.to_string(),
        summary: json!({
            "rows": rows,
            "keys_wrapped": wrapped,
            "keys_hardware_bound": bound,
            "audit_head_seq": m.store.audit_head_seq,
        }),
        pruned_at: None,
        replicas: Vec::new(),
    }
}
