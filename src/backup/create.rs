//! Making an archive: wrap the backup-able keys inside their HSMs under a
//! one-time key, stream a consistent store snapshot, add the policies and
//! the config (secrets are never in it: it holds only references), and
//! seal it with the manifest.
//!
//! Steps and undo: the archive is written to `<name>.partial` in the spool
//! directory and renamed only once complete and synced; any failure deletes
//! the partial file. Nothing is recorded in the store here (the caller
//! commits the backup record with its audit event once the file exists).

use super::BackupError;
use super::archive::{
    self, ArchiveWriter, KEK_MEMBER, KeyDisposition, KeyEntry, KeyWrapping, Manifest, StoreSection,
    Written,
};
use super::keys::{Recipients, read_recipients};
use crate::config::Config;
use crate::keystore::{KeyStoreError, KeyStores};
use crate::model::KeyState;
use crate::store::snapshot::SnapshotSink;
use crate::store::{KeyRecord, Store};
use base64::Engine as _;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use time::OffsetDateTime;
use uuid::Uuid;
use zeroize::Zeroizing;

/// What a backup needs from the daemon.
pub struct Sources<'a> {
    pub config: &'a Config,
    pub store: &'a dyn Store,
    pub keystores: &'a KeyStores,
}

/// The archive's file name: sortable by time, unique by id.
pub fn file_name(id: Uuid, at: OffsetDateTime) -> String {
    format!(
        "keyward-{:04}{:02}{:02}T{:02}{:02}{:02}Z-{}.age",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        id
    )
}

/// Keys a backup accounts for: all but destroyed ones and those whose
/// generation never completed.
fn live(k: &KeyRecord) -> bool {
    !matches!(k.state, KeyState::Destroyed | KeyState::Generating)
}

/// Writes the archive for backup `id` into `dir` and returns it. `at` is
/// the backup's time (file name, manifest, tar mtimes).
pub async fn create_archive(
    src: &Sources<'_>,
    dir: &Path,
    recipients_files: &[PathBuf],
    id: Uuid,
    at: OffsetDateTime,
) -> Result<Written, BackupError> {
    let recipients = read_recipients(recipients_files)?;
    let verify_identity = src
        .config
        .backup
        .as_ref()
        .and_then(|b| b.verify_identity_file.as_deref());
    let kek_recipients = super::keys::kek_recipients(recipients_files, verify_identity)?;
    create_private_dir(dir)?;
    let name = file_name(id, at);
    let final_path = dir.join(&name);
    let partial = dir.join(format!("{name}.partial"));
    let result = write(src, &partial, recipients, kek_recipients, id, at).await;
    match result {
        Ok(mut written) => {
            std::fs::rename(&partial, &final_path).map_err(|source| {
                let _ = std::fs::remove_file(&partial);
                BackupError::Write {
                    path: final_path.clone(),
                    source,
                }
            })?;
            sync_dir(dir);
            written.path = final_path;
            Ok(written)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

pub fn create_private_dir(dir: &Path) -> Result<(), BackupError> {
    crate::store::files::create_private_dir(dir).map_err(|source| BackupError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

async fn write(
    src: &Sources<'_>,
    path: &Path,
    recipients: Recipients,
    kek_recipients: Recipients,
    id: Uuid,
    at: OffsetDateTime,
) -> Result<Written, BackupError> {
    // 1. Which keys go in, wrapped, and which stay with their hardware.
    let keys: Vec<KeyRecord> = src
        .store
        .list_keys()
        .await?
        .into_iter()
        .filter(live)
        .collect();
    let mut kek = Zeroizing::new([0u8; 32]);
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), kek.as_mut())
        .map_err(|_| BackupError::Random)?;
    let mut wrapped: BTreeMap<Uuid, Vec<u8>> = BTreeMap::new();
    let mut bound: BTreeMap<Uuid, String> = BTreeMap::new();
    for k in &keys {
        match disposition(src.keystores, k, &kek).await? {
            Ok(w) => {
                wrapped.insert(k.id, w);
            }
            Err(reason) => {
                bound.insert(k.id, reason);
            }
        }
    }
    let kek_sealed = if wrapped.is_empty() {
        None
    } else {
        Some(seal_kek(&kek, &kek_recipients)?)
    };
    drop(kek);

    // 2. Stream everything into the archive.
    let writer = ArchiveWriter::create(path, recipients, at.unix_timestamp().max(0) as u64)?;
    let sender = writer.sender();
    let fail = |e: std::io::Error| BackupError::Write {
        path: path.to_path_buf(),
        source: e,
    };
    let sent: Result<(), BackupError> = (|| {
        sender
            .send("README.txt".into(), readme(id, at).into_bytes())
            .map_err(fail)?;
        if let Some(cfg) = redacted_config(&src.config.source_path) {
            sender
                .send("config/keyward.toml".into(), cfg)
                .map_err(fail)?;
        }
        for (name, text) in policies(&src.config.policies.dir)? {
            sender
                .send(format!("policies/{name}"), text)
                .map_err(fail)?;
        }
        if let Some(k) = &kek_sealed {
            sender.send(KEK_MEMBER.into(), k.clone()).map_err(fail)?;
        }
        for (key, w) in &wrapped {
            sender
                .send(format!("keys/{key}.wrapped"), w.clone())
                .map_err(fail)?;
        }
        Ok(())
    })();
    if let Err(e) = sent {
        return Err(match e {
            BackupError::Write { .. } => BackupError::Write {
                path: path.to_path_buf(),
                source: writer.abort(),
            },
            other => {
                let _ = writer.abort();
                other
            }
        });
    }
    let snapshot = src
        .store
        .export_snapshot(Box::new(Sink {
            sender: sender.clone(),
            parts: BTreeMap::new(),
        }))
        .await;
    drop(sender);
    let info = match snapshot {
        Ok(info) => info,
        Err(crate::store::StoreError::Database(crate::store::DatabaseError::Snapshot(_))) => {
            return Err(BackupError::Write {
                path: path.to_path_buf(),
                source: writer.abort(),
            });
        }
        Err(e) => {
            let _ = writer.abort();
            return Err(e.into());
        }
    };

    // 3. The snapshot's keys must be the ones accounted for above.
    // Same ids in the same states: a key compromised (or retired) after it
    // was wrapped must not go in as it was.
    let in_snapshot: BTreeSet<(Uuid, &str)> = info
        .keys
        .iter()
        .filter(|k| live(k))
        .map(|k| (k.id, k.state.as_str()))
        .collect();
    let accounted: BTreeSet<(Uuid, &str)> = keys.iter().map(|k| (k.id, k.state.as_str())).collect();
    if in_snapshot != accounted {
        let _ = writer.abort();
        return Err(BackupError::KeysChanged);
    }
    let entries = info
        .keys
        .iter()
        .filter(|k| live(k))
        .map(|k| KeyEntry {
            id: k.id,
            label: k.label.clone(),
            purpose: k.purpose.as_str().to_string(),
            algorithm: k.algorithm.as_str().to_string(),
            state: k.state.as_str().to_string(),
            ca_name: k.ca_name.clone(),
            keystore: k.keystore.clone(),
            backend: k.backend.clone(),
            handle: k.handle.0.clone(),
            public_key: base64::engine::general_purpose::STANDARD.encode(&k.public_key_der),
            public_key_sha256: archive::sha256_hex(&k.public_key_der),
            backup: match bound.get(&k.id) {
                Some(reason) => KeyDisposition::HardwareBound {
                    reason: reason.clone(),
                },
                None => KeyDisposition::Wrapped {
                    member: format!("keys/{}.wrapped", k.id),
                },
            },
        })
        .collect();
    let manifest = Manifest {
        format: archive::FORMAT_NAME.into(),
        format_version: archive::FORMAT_VERSION,
        keyward_version: env!("CARGO_PKG_VERSION").into(),
        backup_id: id,
        created_at: at.unix_timestamp(),
        created_at_utc: at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        store: StoreSection {
            backend: info.backend,
            schema_version: info.schema_version,
            tables: info.tables,
            audit_head_seq: info.audit_head_seq,
            audit_head_hash: info.audit_head_hash,
        },
        members: BTreeMap::new(),
        keys: entries,
        key_wrapping: kek_sealed.as_ref().map(|_| KeyWrapping {
            mechanism: "CKM_AES_KEY_WRAP_PAD".into(),
            kek_member: KEK_MEMBER.into(),
        }),
    };
    let path_buf = path.to_path_buf();
    tokio::task::spawn_blocking(move || writer.finish(manifest))
        .await
        .map_err(|e| BackupError::Write {
            path: path_buf.clone(),
            source: std::io::Error::other(e),
        })?
        .map_err(|source| BackupError::Write {
            path: path_buf,
            source,
        })
}

/// `Ok(wrapped)` for a key that leaves its HSM wrapped under `kek`,
/// `Err(reason)` for one that cannot leave its hardware.
async fn disposition(
    keystores: &KeyStores,
    k: &KeyRecord,
    kek: &Zeroizing<[u8; 32]>,
) -> Result<Result<Vec<u8>, String>, BackupError> {
    let ks_err = |source: KeyStoreError| BackupError::KeyStore {
        key: k.id,
        label: k.label.clone(),
        source,
    };
    if k.state == KeyState::Compromised {
        return Ok(Err("compromised: never backed up".into()));
    }
    let Ok(ks) = keystores.get(&k.keystore) else {
        return Ok(Err(format!(
            "key store `{}` is not configured on the daemon that made this backup",
            k.keystore
        )));
    };
    let protection = match ks.protection(&k.handle).await {
        Ok(p) => p,
        Err(KeyStoreError::OperationUnsupported { .. }) => {
            return Ok(Err(format!(
                "a {} key never leaves its device",
                ks.backend()
            )));
        }
        Err(e) => return Err(ks_err(e)),
    };
    if !protection.extractable {
        return Ok(Err(
            "non-extractable (CKA_EXTRACTABLE=false): its policy keeps it in its HSM".into(),
        ));
    }
    if !ks.capabilities().can_wrap_keys {
        return Err(BackupError::WrapUnsupported {
            key: k.id,
            label: k.label.clone(),
            keystore: k.keystore.clone(),
        });
    }
    ks.wrap_private_key(&k.handle, kek)
        .await
        .map(Ok)
        .map_err(ks_err)
}

/// The one-time wrapping key, age-encrypted to the recipients.
fn seal_kek(kek: &Zeroizing<[u8; 32]>, recipients: &Recipients) -> Result<Vec<u8>, BackupError> {
    let enc = age::Encryptor::with_recipients(
        recipients.iter().map(|r| r.as_ref() as &dyn age::Recipient),
    )
    .map_err(|_| BackupError::NoRecipients)?;
    let mut out = Vec::new();
    let io = |source: std::io::Error| BackupError::Write {
        path: PathBuf::from(KEK_MEMBER),
        source,
    };
    let mut w = enc.wrap_output(&mut out).map_err(io)?;
    std::io::Write::write_all(&mut w, kek.as_ref()).map_err(io)?;
    w.finish().map_err(io)?;
    Ok(out)
}

/// Store rows into archive members `store/<table>/<part>.jsonl`.
struct Sink {
    sender: archive::MemberSender,
    parts: BTreeMap<String, u32>,
}

impl SnapshotSink for Sink {
    fn table(&mut self, _table: &str, _columns: &[String]) -> std::io::Result<()> {
        Ok(())
    }

    fn rows(&mut self, table: &str, jsonl: Vec<u8>, _rows: u64) -> std::io::Result<()> {
        let part = self.parts.entry(table.to_string()).or_insert(0);
        *part += 1;
        self.sender
            .send(format!("store/{table}/{:06}.jsonl", *part), jsonl)
    }
}

/// The policy files (`*.toml`) of the policies directory.
fn policies(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, BackupError> {
    let mut out = Vec::new();
    let read = |source| BackupError::Read {
        path: dir.to_path_buf(),
        source,
    };
    for e in std::fs::read_dir(dir).map_err(read)? {
        let e = e.map_err(read)?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".toml") && e.path().is_file() {
            let text = std::fs::read(e.path()).map_err(|source| BackupError::Read {
                path: e.path(),
                source,
            })?;
            out.push((name, text));
        }
    }
    out.sort();
    Ok(out)
}

/// The config file as written, with webhook URLs (which may embed tokens)
/// replaced. Secrets are never in it: they are `_file`/`_env` references.
/// `None` when it cannot be read or parsed any more.
fn redacted_config(path: &Path) -> Option<Vec<u8>> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut table: toml::Table = text.parse().ok()?;
    if let Some(toml::Value::Array(notify)) = table.get_mut("notify") {
        for n in notify.iter_mut() {
            if let Some(t) = n.as_table_mut()
                && t.contains_key("url")
            {
                t.insert(
                    "url".into(),
                    toml::Value::String("<redacted by the backup: set it again>".into()),
                );
            }
        }
    }
    let body = toml::to_string(&table).ok()?;
    Some(
        format!(
            "# The configuration of the daemon that made this backup. Secrets are\n# never in it: keys ending in _file / _env name where they were read from.\n{body}"
        )
        .into_bytes(),
    )
}

fn readme(id: Uuid, at: OffsetDateTime) -> String {
    format!(
        "keyward backup {id}, made {at}.\n\n\
         This tar stream was decrypted from an age-encrypted keyward archive.\n\
         MANIFEST.json lists every member with its SHA-256, the store's schema\n\
         version, and every key: `wrapped` keys are inside (keys/<id>.wrapped,\n\
         RFC 5649 under a one-time AES key that is itself age-encrypted in\n\
         keys/wrapping-key.age to every recipient but the daemon's verification\n\
         identity); `hardware-bound` keys need their original device.\n\n\
         Restore with: keyward backup restore --config NEW.toml --identity-file ID ARCHIVE.age\n\
         (see docs/operations.md, \"Backups and disaster recovery\").\n"
    )
}
