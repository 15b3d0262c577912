//! Encrypted backups: archives that restore onto a fresh HSM (see
//! `archive` for the format), their creation, restore, replication,
//! verification and retention.

pub mod archive;
pub mod create;
pub mod keys;
pub mod location;
pub mod restore;
pub mod retention;
pub mod service;

use crate::keystore::KeyStoreError;
use crate::store::StoreError;
use std::path::PathBuf;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backups are not configured: add a [backup] section to the config")]
    NotConfigured,
    #[error("{}: {reason}", path.display())]
    KeyFile { path: PathBuf, reason: String },
    #[error("no age recipient is configured")]
    NoRecipients,
    #[error("cannot write {}: {}", path.display(), io_reason(source))]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: none of the given age identities can decrypt this archive (it was encrypted to other recipients)",
        .0.display()
    )]
    WrongIdentity(PathBuf),
    #[error(
        "{}: the given identities decrypt the archive but not its key-wrapping key, which is sealed only to the backup officers' offline recipients (never to the daemon's verification identity): restore with an officer's identity; nothing was restored",
        .0.display()
    )]
    KekNotForThisIdentity(PathBuf),
    #[error("{}: {reason}; nothing was restored", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{}: member {member} does not match the SHA-256 in the manifest (the archive was altered or damaged); nothing was restored",
        path.display()
    )]
    HashMismatch { path: PathBuf, member: String },
    #[error(
        "the archive has format version {found}, written by keyward {written_by}; this keyward reads up to version {supported}: restore with a newer keyward"
    )]
    NewerFormat {
        found: u32,
        supported: u32,
        written_by: String,
    },
    #[error(
        "the archive's store has schema version {found}; this keyward knows up to {supported}: restore with a newer keyward"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("key {key} ({label}): {source}")]
    KeyStore {
        key: Uuid,
        label: String,
        #[source]
        source: KeyStoreError,
    },
    #[error(
        "key {key} ({label}) is marked for backup (extractable) but key store `{keystore}` cannot wrap keys (no CKM_AES_KEY_WRAP_PAD): the backup would not hold it"
    )]
    WrapUnsupported {
        key: Uuid,
        label: String,
        keystore: String,
    },
    #[error("keys changed while the backup ran (a rotation?); make the backup again")]
    KeysChanged,
    #[error("refusing to restore: {0}; pass --force to restore anyway")]
    NotEmpty(String),
    #[error("refusing to restore: {0}")]
    DaemonRunning(String),
    #[error(
        "the {what}'s SHA-256 is {found}, not the expected {expected}: this is not the backup you pinned; nothing was restored"
    )]
    NotExpected {
        what: &'static str,
        expected: String,
        found: String,
    },
    #[error(
        "refusing to restore: {} exists: another restore of this backup is running, or one was interrupted (then delete it)",
        .0.display()
    )]
    RestoreInProgress(PathBuf),
    #[error("a backup is already running")]
    Running,
    #[error("no backup {0}")]
    Unknown(Uuid),
    #[error("no backup has been made yet")]
    NoBackup,
    #[error("backup {0} has no copy left to verify: not in the spool, and no location configured")]
    NoCopy(String),
    #[error("{message}")]
    Location { code: &'static str, message: String },
    #[error("the system random number generator failed")]
    Random,
}

impl BackupError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotConfigured => "backup_not_configured",
            Self::KeyFile { .. } => "backup_key_file",
            Self::NoRecipients => "backup_no_recipients",
            Self::Write { source, .. } if is_disk_full(source) => "backup_disk_full",
            Self::Write { .. } => "backup_write_failed",
            Self::Read { .. } => "backup_read_failed",
            Self::WrongIdentity(_) | Self::KekNotForThisIdentity(_) => "backup_wrong_identity",
            Self::Corrupt { .. } => "backup_corrupt",
            Self::HashMismatch { .. } => "backup_hash_mismatch",
            Self::NewerFormat { .. } => "backup_format_too_new",
            Self::SchemaTooNew { .. } => "backup_schema_too_new",
            Self::Store(e) => e.code(),
            Self::KeyStore { source, .. } => source.code(),
            Self::WrapUnsupported { .. } => "backup_wrap_unsupported",
            Self::KeysChanged => "backup_keys_changed",
            Self::NotEmpty(_) => "restore_target_not_empty",
            Self::DaemonRunning(_) => "restore_daemon_running",
            Self::NotExpected { .. } => "backup_not_the_expected",
            Self::RestoreInProgress(_) => "restore_in_progress",
            Self::Running => "backup_running",
            Self::Unknown(_) => "backup_not_found",
            Self::NoBackup => "backup_not_found",
            Self::NoCopy(_) => "backup_no_copy",
            Self::Location { code, .. } => code,
            Self::Random => "random_unavailable",
        }
    }
}

/// ENOSPC / EDQUOT / EFBIG: the disk (or a quota, or a file size limit) is full.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::FileTooLarge
    ) || matches!(e.raw_os_error(), Some(28 | 122 | 27))
}

fn io_reason(e: &std::io::Error) -> String {
    if is_disk_full(e) {
        format!("the disk is full ({e}); the partial file was removed")
    } else {
        e.to_string()
    }
}
