//! Restoring an archive into an empty store and a fresh token.
//!
//! Order, and what undoes what:
//! 1. the whole archive is decrypted and every member hash checked against
//!    the manifest; nothing is written before that passes;
//! 2. the target store and key stores must be empty (or `--force`);
//! 3. wrapped keys are unwrapped into their key stores (sensitive, with the
//!    extractability they had); a later failure destroys them again;
//! 4. the store is loaded into `<db>.restoring-<id>` in one transaction,
//!    migrated to this build's schema, and the `backup.restore` event is
//!    chained after the restored chain; a failure deletes that file;
//! 5. only then is the file renamed into place (a forced restore first
//!    moves the old database aside, never deletes it).

use super::BackupError;
use super::archive::{self, KEK_MEMBER, KeyDisposition, KeyEntry, Manifest};
use super::keys::{Identities, read_identities};
use crate::audit::AuditDraft;
use crate::config::{Config, StoreConfig};
use crate::keystore::{KeyHandle, KeySpec, KeyStoreError, KeyStores, KeyUsage};
use crate::model::{KeyAlgorithm, KeyPurpose, KeyState};
use crate::store::sqlite::snapshot::Import;
use crate::store::{Change, Write};
use base64::Engine as _;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use time::OffsetDateTime;
use uuid::Uuid;
use zeroize::Zeroizing;

pub struct RestoreOptions {
    pub archive: PathBuf,
    pub identity_files: Vec<PathBuf>,
    /// Restore over a non-empty store (moved aside) or token (keys already
    /// there are reused when their public key matches, others left alone).
    pub force: bool,
    /// Check the archive and report what a restore would do; change nothing.
    pub dry_run: bool,
    pub actor: String,
    /// The archive's SHA-256 as recorded elsewhere (the `backup.create`
    /// audit event, a notification, the SIEM): anyone who can write to a
    /// location can plant an archive that decrypts (recipients are public),
    /// so a restore can be pinned to the one that was made.
    pub expect_sha256: Option<String>,
    /// The SHA-256 of the root CA certificate (DER) the restored hierarchy
    /// must chain to, as `keyward init` and `keyward dev` print it.
    pub expect_root_sha256: Option<String>,
}

/// Hex without colons or case, for comparing fingerprints as people paste them.
fn normalize_hex(s: &str) -> String {
    s.chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Checks the imported CA hierarchy before it is committed: every CA
/// certificate certifies its key, every child certificate is signed by its
/// parent's, and (when pinned) the root is the expected one. A planted
/// archive cannot pass this without certificates from the real root for its
/// own keys.
fn check_hierarchy(
    archive: &Path,
    cas: &[crate::store::sqlite::snapshot::ImportedCa],
    expect_root: Option<&str>,
) -> Result<(), BackupError> {
    use der::Decode;
    let corrupt = |reason: String| BackupError::Corrupt {
        path: archive.to_path_buf(),
        reason,
    };
    let raw_key =
        |spki: &spki::SubjectPublicKeyInfoOwned| spki.subject_public_key.raw_bytes().to_vec();
    for ca in cas {
        let (name, parent, cert_der, key_spki) = (
            &ca.name,
            &ca.parent,
            &ca.certificate_der,
            &ca.public_key_der,
        );
        let cert = x509_cert::Certificate::from_der(cert_der)
            .map_err(|e| corrupt(format!("CA {name}'s certificate does not parse: {e}")))?;
        let key = spki::SubjectPublicKeyInfoOwned::from_der(key_spki)
            .map_err(|e| corrupt(format!("CA {name}'s key does not parse: {e}")))?;
        if raw_key(cert.tbs_certificate().subject_public_key_info()) != raw_key(&key) {
            return Err(corrupt(format!(
                "CA {name}'s certificate does not certify its key"
            )));
        }
        if let Some(p) = parent {
            let parent_cert = cas
                .iter()
                .find(|c| &c.name == p)
                .map(|c| &c.certificate_der)
                .ok_or_else(|| corrupt(format!("CA {name}'s parent {p} is missing")))?;
            if !crate::crypto::verify_issued_by(cert_der, parent_cert) {
                return Err(corrupt(format!(
                    "CA {name}'s certificate is not signed by its parent {p}"
                )));
            }
        }
    }
    if let Some(want) = expect_root {
        let roots: Vec<String> = cas
            .iter()
            .filter(|c| c.kind == "root")
            .map(|c| archive::sha256_hex(&c.certificate_der))
            .collect();
        if !roots.iter().any(|r| *r == normalize_hex(want)) {
            return Err(BackupError::NotExpected {
                what: "root CA certificate",
                expected: normalize_hex(want),
                found: roots.join(", "),
            });
        }
    }
    Ok(())
}

/// What happened to one key.
#[derive(Debug, Clone, Serialize)]
pub struct KeyOutcome {
    pub id: Uuid,
    pub label: String,
    pub purpose: String,
    pub keystore: String,
    /// `unwrapped` (restored into the token), `present` (already on the
    /// configured device), `missing` (needs the original hardware) or, for
    /// a replaceable service key that is missing (OCSP signer, TLS server
    /// key), `replaced-at-start`.
    pub outcome: &'static str,
    pub detail: String,
    #[serde(skip)]
    handle: Option<KeyHandle>,
    #[serde(skip)]
    changed_handle: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub backup_id: Uuid,
    pub created_at: String,
    pub keyward_version: String,
    pub format_version: u32,
    pub schema_version: i64,
    pub keys: Vec<KeyOutcome>,
    pub rows: BTreeMap<String, u64>,
    pub dry_run: bool,
    /// The sequence number of the `backup.restore` audit event.
    pub audit_seq: Option<i64>,
    /// Where a forced restore moved the old database.
    pub replaced: Option<PathBuf>,
    /// Policy files written from the archive (the directory lacked them).
    pub policies_written: Vec<String>,
    /// Policy files present and different from the archive's (kept).
    pub policies_differ: Vec<String>,
    /// Policy files the restore could neither read nor write, with why:
    /// extract them from the archive by hand.
    pub policies_failed: Vec<String>,
}

fn load_identities(files: &[PathBuf]) -> Result<Identities, BackupError> {
    let mut ids: Identities = Vec::new();
    for f in files {
        ids.extend(read_identities(f)?);
    }
    if ids.is_empty() {
        return Err(BackupError::KeyFile {
            path: PathBuf::from("--identity-file"),
            reason: "give at least one identity file".into(),
        });
    }
    Ok(ids)
}

/// Checks an archive completely (decrypts it and every member hash) and
/// returns its manifest; used by `restore --dry-run` and the verification job.
pub async fn check_archive(
    path: &Path,
    identities: Arc<Identities>,
) -> Result<archive::Checked, BackupError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || archive::check(&path, &identities))
        .await
        .map_err(|e| BackupError::Read {
            path: PathBuf::from("<check>"),
            source: std::io::Error::other(e),
        })?
}

pub async fn restore(
    config: &Config,
    keystores: &KeyStores,
    opts: &RestoreOptions,
    now: OffsetDateTime,
) -> Result<RestoreReport, BackupError> {
    let identities = Arc::new(load_identities(&opts.identity_files)?);
    // The archive's hash, once: the pin is checked against it before the
    // archive is read, and the `backup.restore` event records it.
    let archive_sha256 = {
        let path = opts.archive.clone();
        let read_err = |source| BackupError::Read {
            path: opts.archive.clone(),
            source,
        };
        tokio::task::spawn_blocking(move || archive::file_sha256(&path))
            .await
            .map_err(|e| read_err(std::io::Error::other(e)))?
            .map_err(read_err)?
    };
    if let Some(want) = &opts.expect_sha256
        && archive_sha256 != normalize_hex(want)
    {
        return Err(BackupError::NotExpected {
            what: "archive",
            expected: normalize_hex(want),
            found: archive_sha256,
        });
    }
    let checked = check_archive(&opts.archive, identities.clone()).await?;
    let manifest = checked.manifest;
    let supported = crate::store::sqlite::SCHEMA_VERSION;
    if manifest.store.schema_version > supported {
        return Err(BackupError::SchemaTooNew {
            found: manifest.store.schema_version,
            supported,
        });
    }
    let db = match &config.store {
        StoreConfig::Sqlite(sqlite) => sqlite.path.clone(),
        // A restore rebuilds a SQLite file; a PostgreSQL deployment restores
        // into SQLite, then moves with `keyward migrate`.
        StoreConfig::Postgres(_) => {
            return Err(BackupError::Store(crate::store::StoreError::Database(
                crate::store::DatabaseError::Unsupported(
                    "restoring into a PostgreSQL store is not supported: restore into a SQLite store, then `keyward migrate` it",
                ),
            )));
        }
    };

    // The targets must be empty, unless forced.
    // Never under a running daemon, forced or not: it would go on writing
    // into the file moved aside.
    if let Some(holder) = daemon_running(&db, now).await {
        return Err(BackupError::DaemonRunning(format!(
            "a daemon holds the scheduler lease of {} ({holder}): stop every `keyward serve` on this store first",
            db.display()
        )));
    }
    match existing_rows(&db).await {
        Ok(0) => {}
        Ok(_) | Err(_) if opts.force => {}
        Ok(n) => {
            return Err(BackupError::NotEmpty(format!(
                "the store {} already holds {n} rows",
                db.display()
            )));
        }
        Err(e) => {
            return Err(BackupError::NotEmpty(format!(
                "the store {} exists but cannot be read ({e})",
                db.display()
            )));
        }
    }
    let archived: std::collections::BTreeSet<Uuid> = manifest.keys.iter().map(|k| k.id).collect();
    for (name, ks) in keystores.iter() {
        // A backend that cannot list (a YubiKey) has no emptiness to check;
        // any other failure stops the restore: an unreadable token is not
        // an empty one.
        let listed = match ks.list().await {
            Ok(l) => Some(l),
            Err(KeyStoreError::OperationUnsupported { .. }) => None,
            Err(source) => {
                return Err(BackupError::KeyStore {
                    key: Uuid::nil(),
                    label: format!("key store `{name}` (listing its keys)"),
                    source,
                });
            }
        };
        if let Some(listed) = listed {
            let foreign = listed
                .iter()
                .filter(|(h, _)| !archived.iter().any(|id| handle_has_id(h, id)))
                .count();
            if !listed.is_empty() && !opts.force {
                return Err(BackupError::NotEmpty(format!(
                    "key store `{name}` already holds {} keys ({foreign} of them not in this backup)",
                    listed.len()
                )));
            }
        }
    }

    // Which keys are where.
    let mut outcomes = Vec::new();
    for entry in &manifest.keys {
        outcomes.push(plan_key(keystores, entry).await?);
    }
    let mut report = RestoreReport {
        backup_id: manifest.backup_id,
        created_at: manifest.created_at_utc.clone(),
        keyward_version: manifest.keyward_version.clone(),
        format_version: manifest.format_version,
        schema_version: manifest.store.schema_version,
        keys: outcomes,
        rows: manifest
            .store
            .tables
            .iter()
            .map(|t| (t.name.clone(), t.rows))
            .collect(),
        dry_run: opts.dry_run,
        audit_seq: None,
        replaced: None,
        policies_written: Vec::new(),
        policies_differ: Vec::new(),
        policies_failed: Vec::new(),
    };
    if opts.dry_run {
        return Ok(report);
    }

    // Unwrap, remembering what to undo.
    let kek = if report.keys.iter().any(|k| k.outcome == "unwrap") {
        Some(open_kek(&opts.archive, &checked.small, &identities)?)
    } else {
        None
    };
    // Restored CA keys get the extractability their CA policy gives new
    // keys (an issuing CA wrap-only by default, so later backups hold it
    // again); without a readable policy, wrap-only as they were.
    let policies = crate::policy::Policies::load(&config.policies.dir).ok();
    let extractable_for = |entry: &KeyEntry| {
        policies
            .as_ref()
            .and_then(|p| {
                let ca = entry.ca_name.as_deref()?;
                p.cas.iter().find(|c| c.name == ca)
            })
            .is_none_or(|c| c.key_backup() == crate::policy::KeyBackup::WrapOnly)
    };
    let mut unwrapped: Vec<(String, KeyHandle)> = Vec::new();
    for (i, entry) in manifest.keys.iter().enumerate() {
        if report.keys[i].outcome != "unwrap" {
            continue;
        }
        let (Some(kek), KeyDisposition::Wrapped { member }) = (&kek, &entry.backup) else {
            continue;
        };
        let wrapped = checked
            .small
            .get(member)
            .ok_or_else(|| BackupError::Corrupt {
                path: opts.archive.clone(),
                reason: format!("member {member} is missing"),
            });
        let result = match wrapped {
            Ok(w) => unwrap_key(keystores, entry, kek, w, extractable_for(entry)).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(handle) => {
                unwrapped.push((entry.keystore.clone(), handle.clone()));
                let k = &mut report.keys[i];
                k.outcome = "unwrapped";
                k.changed_handle = handle.0 != entry.handle;
                k.detail = format!(
                    "restored into key store `{}` as {} (sensitive; {})",
                    entry.keystore,
                    handle.0,
                    if extractable_for(entry) {
                        "extractable by wrapping only, as its policy says"
                    } else {
                        "non-extractable: its policy says backup = never, later backups will not hold it"
                    }
                );
                k.handle = Some(handle);
            }
            Err(e) => {
                undo_unwraps(keystores, &unwrapped).await;
                return Err(e);
            }
        }
    }

    // Load the store next to the real one, then move it into place.
    let loaded = load_store(
        &db,
        &opts.archive,
        &archive_sha256,
        &identities,
        &manifest,
        &report,
        opts,
        now,
    )
    .await;
    let seq = match loaded {
        Ok(seq) => seq,
        Err(e) => {
            undo_unwraps(keystores, &unwrapped).await;
            return Err(disk_full_as_write(
                e,
                &restoring_path(&db, manifest.backup_id),
            ));
        }
    };
    report.audit_seq = Some(seq);
    let tmp = restoring_path(&db, manifest.backup_id);
    match move_into_place(&db, &tmp, opts.force, now) {
        Ok(replaced) => report.replaced = replaced,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            undo_unwraps(keystores, &unwrapped).await;
            return Err(e);
        }
    }
    let policies = write_policies(&config.policies.dir, &checked.small);
    report.policies_written = policies.written;
    report.policies_differ = policies.differ;
    report.policies_failed = policies.failed;
    Ok(report)
}

/// Whether a key handle names CKA_ID / key `id` (PKCS#11 URIs carry the
/// UUID bytes percent-encoded; other backends' handles never match).
fn handle_has_id(h: &KeyHandle, id: &Uuid) -> bool {
    crate::keystore::pkcs11::uri::Pkcs11Uri::parse(&h.0)
        .ok()
        .and_then(|u| u.id().map(|b| b == id.as_bytes()))
        .unwrap_or(false)
}

/// The holder of the scheduler lease, if it is held now: a daemon runs on
/// this store. An unreadable store has no readable lease.
async fn daemon_running(db: &Path, now: OffsetDateTime) -> Option<String> {
    use crate::store::Store as _;
    if !db.exists() {
        return None;
    }
    // A file that is no database cannot be served by a daemon (and `--force`
    // may replace it); a database whose lease cannot be read may be.
    let store = crate::store::sqlite::SqliteStore::open_read_only(db).ok()?;
    let now_ms = (now.unix_timestamp_nanos() / 1_000_000) as i64;
    match store
        .lease_holder(crate::jobs::leader::SCHEDULER_LEASE, now_ms)
        .await
    {
        Ok(holder) => holder,
        Err(e) => Some(format!("its lease cannot be read: {e}")),
    }
}

async fn existing_rows(db: &Path) -> Result<i64, BackupError> {
    use crate::store::Store as _;
    if !db.exists() {
        return Ok(0);
    }
    let store = crate::store::sqlite::SqliteStore::open_read_only(db)?;
    Ok(store.counts().await?.values().sum())
}

fn spki_of(entry: &KeyEntry) -> Result<Vec<u8>, BackupError> {
    let der = base64::engine::general_purpose::STANDARD
        .decode(entry.public_key.as_bytes())
        .map_err(|_| BackupError::Corrupt {
            path: PathBuf::from(archive::MANIFEST),
            reason: format!("key {} has a public key that is not base64", entry.id),
        })?;
    if archive::sha256_hex(&der) != entry.public_key_sha256 {
        return Err(BackupError::Corrupt {
            path: PathBuf::from(archive::MANIFEST),
            reason: format!("key {}'s public key does not match its SHA-256", entry.id),
        });
    }
    Ok(der)
}

async fn plan_key(keystores: &KeyStores, entry: &KeyEntry) -> Result<KeyOutcome, BackupError> {
    let mut out = KeyOutcome {
        id: entry.id,
        label: entry.label.clone(),
        purpose: entry.purpose.clone(),
        keystore: entry.keystore.clone(),
        outcome: "missing",
        detail: String::new(),
        handle: None,
        changed_handle: false,
    };
    let spki = spki_of(entry)?;
    let Ok(ks) = keystores.get(&entry.keystore) else {
        out.detail = format!(
            "key store `{}` is not configured: add it (the original device) to the config",
            entry.keystore
        );
        return Ok(out);
    };
    let original = KeyHandle(entry.handle.clone());
    let ks_err = |source| BackupError::KeyStore {
        key: entry.id,
        label: entry.label.clone(),
        source,
    };
    let present = match ks.exists(&original).await {
        Ok(p) => p,
        // A device that is not connected (the root's YubiKey in its safe)
        // is what "needs the original hardware" means for a key that only
        // lives there; for a wrapped key the device must answer.
        Err(e) if matches!(entry.backup, KeyDisposition::HardwareBound { .. }) => {
            out.detail = format!(
                "its device does not answer ({e}): it needs the original hardware ({} handle {})",
                entry.backend, entry.handle
            );
            return Ok(out);
        }
        Err(e) => return Err(ks_err(e)),
    };
    if present {
        let pk = ks.public_key(&original).await.map_err(ks_err)?;
        if pk != spki {
            return Err(ks_err(KeyStoreError::KeyIdInUse(original)));
        }
        out.outcome = "present";
        out.detail = format!("already on key store `{}`", entry.keystore);
        out.handle = Some(original);
        return Ok(out);
    }
    match &entry.backup {
        KeyDisposition::Wrapped { .. } => {
            if !ks.capabilities().can_wrap_keys {
                return Err(BackupError::WrapUnsupported {
                    key: entry.id,
                    label: entry.label.clone(),
                    keystore: entry.keystore.clone(),
                });
            }
            out.outcome = "unwrap";
            out.detail = "wrapped in the archive".into();
        }
        KeyDisposition::HardwareBound { reason } => {
            let replaceable = match KeyPurpose::parse(&entry.purpose) {
                Some(KeyPurpose::OcspSigning) => Some("a new delegated OCSP signer"),
                Some(KeyPurpose::TlsServer) => Some("a new TLS server key and certificate"),
                _ => None,
            };
            if let Some(what) = replaceable {
                out.outcome = "replaced-at-start";
                out.detail = format!(
                    "{reason}; not on this token: marked destroyed, the daemon makes {what} at start"
                );
            } else {
                out.detail = format!(
                    "{reason}; not on this device: it needs the original hardware ({} handle {})",
                    entry.backend, entry.handle
                );
            }
        }
    }
    Ok(out)
}

fn open_kek(
    archive_path: &Path,
    small: &BTreeMap<String, Vec<u8>>,
    identities: &Identities,
) -> Result<Zeroizing<[u8; 32]>, BackupError> {
    let sealed = small.get(KEK_MEMBER).ok_or_else(|| BackupError::Corrupt {
        path: archive_path.to_path_buf(),
        reason: format!("member {KEK_MEMBER} is missing"),
    })?;
    let corrupt = |reason: String| BackupError::Corrupt {
        path: archive_path.to_path_buf(),
        reason,
    };
    let decryptor = age::Decryptor::new(sealed.as_slice())
        .map_err(|e| corrupt(format!("{KEK_MEMBER}: {e}")))?;
    let mut reader = decryptor
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => {
                BackupError::KekNotForThisIdentity(archive_path.to_path_buf())
            }
            e => corrupt(format!("{KEK_MEMBER}: {e}")),
        })?;
    let mut buf = Zeroizing::new(Vec::new());
    std::io::Read::read_to_end(&mut reader, &mut buf)
        .map_err(|e| corrupt(format!("{KEK_MEMBER}: {e}")))?;
    let mut kek = Zeroizing::new([0u8; 32]);
    if buf.len() != 32 {
        return Err(corrupt(format!("{KEK_MEMBER} does not hold a 32-byte key")));
    }
    kek.copy_from_slice(&buf);
    Ok(kek)
}

async fn unwrap_key(
    keystores: &KeyStores,
    entry: &KeyEntry,
    kek: &Zeroizing<[u8; 32]>,
    wrapped: &[u8],
    extractable: bool,
) -> Result<KeyHandle, BackupError> {
    let ks_err = |source| BackupError::KeyStore {
        key: entry.id,
        label: entry.label.clone(),
        source,
    };
    let ks = keystores.get(&entry.keystore).map_err(ks_err)?;
    let algorithm = entry
        .algorithm
        .parse::<KeyAlgorithm>()
        .map_err(|_| BackupError::Corrupt {
            path: PathBuf::from(archive::MANIFEST),
            reason: format!(
                "key {} has an unknown algorithm `{}`",
                entry.id, entry.algorithm
            ),
        })?;
    let spec = KeySpec {
        id: entry.id,
        label: entry.label.clone(),
        algorithm,
        // Sensitive always (never readable in plaintext); extractable by
        // wrapping only when its policy wants it in backups.
        extractable,
        // A decrypt key (audit-encryption) comes back decrypt-only.
        usage: crate::model::KeyPurpose::parse(&entry.purpose)
            .map_or(KeyUsage::Sign, KeyUsage::for_purpose),
    };
    let spki = spki_of(entry)?;
    let key = ks
        .unwrap_private_key(&spec, kek, wrapped, &spki)
        .await
        .map_err(ks_err)?;
    Ok(key.handle)
}

async fn undo_unwraps(keystores: &KeyStores, unwrapped: &[(String, KeyHandle)]) {
    for (ks, h) in unwrapped {
        if let Ok(ks) = keystores.get(ks)
            && let Err(e) = ks.destroy(h).await
        {
            tracing::error!(handle = %h.0, error = %e, "could not destroy a key restored by a failed restore; destroy it by hand");
        }
    }
}

/// SQLite's "database or disk is full" while loading the store is the disk
/// filling up: said as such (`backup_disk_full`, as a backup says it), not
/// as an unavailable store.
fn disk_full_as_write(e: BackupError, path: &Path) -> BackupError {
    use crate::store::{DatabaseError, StoreError};
    if let BackupError::Store(StoreError::Database(DatabaseError::Sqlite(
        rusqlite::Error::SqliteFailure(f, _),
    ))) = &e
        && f.code == rusqlite::ErrorCode::DiskFull
    {
        return BackupError::Write {
            path: path.to_path_buf(),
            source: std::io::Error::from_raw_os_error(28),
        };
    }
    e
}

fn restoring_path(db: &Path, id: Uuid) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".restoring-{id}"));
    db.with_file_name(name)
}

#[allow(clippy::too_many_arguments)]
async fn load_store(
    db: &Path,
    archive_path: &Path,
    archive_sha256: &str,
    identities: &Arc<Identities>,
    manifest: &Manifest,
    report: &RestoreReport,
    opts: &RestoreOptions,
    now: OffsetDateTime,
) -> Result<i64, BackupError> {
    let tmp = restoring_path(db, manifest.backup_id);
    if let Some(parent) = tmp.parent()
        && !parent.as_os_str().is_empty()
    {
        super::create::create_private_dir(parent)?;
    }
    // Created exclusively: of two restores of one backup, the second stops
    // here and never touches the first one's file.
    match crate::store::files::create_new_private(&tmp) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(BackupError::RestoreInProgress(tmp));
        }
        Err(source) => return Err(BackupError::Write { path: tmp, source }),
    }
    let at = now.unix_timestamp();
    let mut change = Change::new();
    for (k, entry) in report.keys.iter().zip(&manifest.keys) {
        if k.changed_handle
            && let Some(h) = &k.handle
        {
            change = change.write(Write::SetKeyHandle {
                id: k.id,
                handle: h.clone(),
                at,
            });
        }
        if k.outcome == "replaced-at-start"
            && let Some(state) = KeyState::parse(&entry.state)
            && state != KeyState::Destroyed
        {
            change = change.write(Write::SetKeyState {
                id: k.id,
                from: state,
                to: KeyState::Destroyed,
                at,
            });
        }
    }
    let change = change.audit(
        AuditDraft::new(&opts.actor, "backup.restore", format!("backup:{}", manifest.backup_id))
            .details(json!({
                "backup_id": manifest.backup_id,
                "archive_sha256": archive_sha256,
                "created_at": manifest.created_at_utc,
                "written_by": manifest.keyward_version,
                "format_version": manifest.format_version,
                "schema_version": manifest.store.schema_version,
                "restored_chain_head": { "seq": manifest.store.audit_head_seq, "hash": manifest.store.audit_head_hash },
                "keys": report.keys,
                "forced": opts.force,
            })),
    );
    let (db_tmp, archive_path, identities, manifest) = (
        tmp.clone(),
        archive_path.to_path_buf(),
        identities.clone(),
        manifest.clone(),
    );
    let at_ms = (now.unix_timestamp_nanos() / 1_000_000) as i64;
    let expect_root = opts.expect_root_sha256.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<i64, BackupError> {
        let mut import = Import::create(&db_tmp, manifest.store.schema_version)?;
        let mut current: Option<String> = None;
        archive::for_each_store_member(&archive_path, &identities, &manifest, |table, data| {
            if current.as_deref() != Some(table) {
                let info = manifest
                    .store
                    .tables
                    .iter()
                    .find(|t| t.name == table)
                    .ok_or_else(|| BackupError::Corrupt {
                        path: archive_path.clone(),
                        reason: format!("store member of table {table}, which the manifest lacks"),
                    })?;
                import.table(table, &info.columns)?;
                current = Some(table.to_string());
            }
            import.rows(data)?;
            Ok(())
        })?;
        for t in &manifest.store.tables {
            let got = import.counts().get(&t.name).copied().unwrap_or(0);
            if got != t.rows {
                return Err(BackupError::Corrupt {
                    path: archive_path.clone(),
                    reason: format!(
                        "table {} has {got} rows, the manifest says {}",
                        t.name, t.rows
                    ),
                });
            }
        }
        check_hierarchy(&archive_path, &import.cas()?, expect_root.as_deref())?;
        let seqs = import.finish(change, at_ms)?;
        Ok(seqs.last().copied().unwrap_or(0))
    })
    .await
    .unwrap_or_else(|e| {
        Err(BackupError::Read {
            path: PathBuf::from("<restore>"),
            source: std::io::Error::other(e),
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        for suffix in ["-wal", "-shm", "-journal"] {
            let mut p = tmp.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(p));
        }
    }
    result
}

/// Moves `tmp` to `db`; a forced restore first moves the old database (and
/// its WAL files) aside to `<db>.replaced-<time>`.
fn move_into_place(
    db: &Path,
    tmp: &Path,
    force: bool,
    now: OffsetDateTime,
) -> Result<Option<PathBuf>, BackupError> {
    let io = |path: &Path, source| BackupError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut replaced = None;
    if db.exists() {
        if !force {
            return Err(BackupError::NotEmpty(format!("{} exists", db.display())));
        }
        let mut aside = db.as_os_str().to_owned();
        aside.push(format!(".replaced-{}", now.unix_timestamp()));
        let aside = PathBuf::from(aside);
        std::fs::rename(db, &aside).map_err(|e| io(db, e))?;
        for suffix in ["-wal", "-shm"] {
            let mut from = db.as_os_str().to_owned();
            from.push(suffix);
            let mut to = aside.as_os_str().to_owned();
            to.push(suffix);
            let from = PathBuf::from(from);
            if from.exists() {
                std::fs::rename(&from, PathBuf::from(to)).map_err(|e| io(&from, e))?;
            }
        }
        replaced = Some(aside);
    }
    std::fs::rename(tmp, db).map_err(|e| io(db, e))?;
    if let Some(parent) = db.parent()
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(replaced)
}

/// Writes the archive's policies into `dir` where it lacks them; never
/// overwrites. Returns (written, present but different).
fn write_policies(dir: &Path, small: &BTreeMap<String, Vec<u8>>) -> PolicyFiles {
    let mut out = PolicyFiles::default();
    for (member, bytes) in small {
        let Some(name) = member.strip_prefix("policies/") else {
            continue;
        };
        if name.contains('/') || name.starts_with('.') {
            continue;
        }
        let path = dir.join(name);
        match std::fs::read(&path) {
            Ok(existing) if existing == *bytes => {}
            Ok(_) => out.differ.push(name.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, bytes)) {
                    Ok(()) => out.written.push(name.to_string()),
                    Err(e) => out.failed.push(format!("{name}: {e}")),
                }
            }
            Err(e) => out.failed.push(format!("{name}: {e}")),
        }
    }
    out
}

/// What the restore did with the archive's policy files.
#[derive(Default)]
struct PolicyFiles {
    written: Vec<String>,
    differ: Vec<String>,
    failed: Vec<String>,
}
