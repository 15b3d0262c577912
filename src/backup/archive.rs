//! The archive: one file, age-encrypted to every recipient, holding a tar
//! stream. Members, in order: `README.txt`, `config/keyward.toml`,
//! `policies/*.toml`, `keys/wrapping-key.age` and `keys/<id>.wrapped`,
//! `store/<table>/<part>.jsonl`, and last `MANIFEST.json` with the
//! SHA-256 and size of every other member.
//!
//! The plaintext tar stream never touches the disk: members go from memory
//! through tar and age into the file. The manifest comes last because it
//! hashes what precedes it; a reader therefore reads the archive twice (once
//! to check every hash, once to apply), which costs a second decryption and
//! nothing else.

use super::BackupError;
use super::keys::{Identities, Recipients};
use crate::store::snapshot::TableInfo;
use ring::digest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use uuid::Uuid;

/// The archive format this build writes; it reads this one and older.
pub const FORMAT_VERSION: u32 = 1;
pub const FORMAT_NAME: &str = "keyward-backup";
pub const MANIFEST: &str = "MANIFEST.json";
pub const KEK_MEMBER: &str = "keys/wrapping-key.age";
/// Members kept in memory by the checking pass (keys, config, policies)
/// must be smaller than this.
const SMALL_MEMBER_MAX: u64 = 16 << 20;

/// What the archive holds; the last member.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub keyward_version: String,
    pub backup_id: Uuid,
    /// Unix seconds, and the same as RFC 3339 for people.
    pub created_at: i64,
    pub created_at_utc: String,
    pub store: StoreSection,
    /// Every member but the manifest: name → SHA-256 (hex) and size.
    pub members: BTreeMap<String, Member>,
    /// Every key that was not destroyed, and whether its private key is inside.
    pub keys: Vec<KeyEntry>,
    /// How the wrapped keys are wrapped; `None` when no key is wrapped.
    pub key_wrapping: Option<KeyWrapping>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreSection {
    pub backend: String,
    pub schema_version: i64,
    pub tables: Vec<TableInfo>,
    pub audit_head_seq: i64,
    pub audit_head_hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyWrapping {
    /// `CKM_AES_KEY_WRAP_PAD` (RFC 5649) under a one-time AES-256 key.
    pub mechanism: String,
    /// The member holding that AES key, itself age-encrypted to the same
    /// recipients: a tar stream extracted to disk holds no usable key.
    pub kek_member: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyEntry {
    pub id: Uuid,
    pub label: String,
    pub purpose: String,
    pub algorithm: String,
    pub state: String,
    pub ca_name: Option<String>,
    pub keystore: String,
    pub backend: String,
    pub handle: String,
    /// DER SubjectPublicKeyInfo, base64.
    pub public_key: String,
    pub public_key_sha256: String,
    pub backup: KeyDisposition,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum KeyDisposition {
    /// The private key is inside, wrapped, in `member`.
    Wrapped { member: String },
    /// The private key cannot leave its hardware; a restore needs it.
    HardwareBound { reason: String },
}

/// SHA-256 of everything written through it.
pub struct Hashing<W> {
    inner: W,
    ctx: digest::Context,
    size: u64,
}

impl<W: Write> Hashing<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            ctx: digest::Context::new(&digest::SHA256),
            size: 0,
        }
    }

    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.ctx.finish()), self.size)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.ctx.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// SHA-256 of a file, hex, streamed.
pub fn file_sha256(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Hashing::new(io::sink());
    io::copy(&mut f, &mut h)?;
    Ok(h.finish().1)
}

/// SHA-256 of a byte string, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes))
}

enum Msg {
    Member(String, Vec<u8>),
    Finish(Box<Manifest>),
}

/// The encrypted file as written.
#[derive(Debug, Clone)]
pub struct Written {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub manifest: Manifest,
}

/// Writes an archive on its own thread, so that producing members (the
/// store snapshot's JSON) and encrypting them overlap. Members are sent in
/// order; [`ArchiveWriter::finish`] adds the manifest and seals the file.
pub struct ArchiveWriter {
    tx: mpsc::SyncSender<Msg>,
    thread: std::thread::JoinHandle<io::Result<Written>>,
}

/// A handle that sends members to the writer thread (cloneable, `Send`).
#[derive(Clone)]
pub struct MemberSender(mpsc::SyncSender<Msg>);

impl MemberSender {
    pub fn send(&self, name: String, data: Vec<u8>) -> io::Result<()> {
        self.0
            .send(Msg::Member(name, data))
            .map_err(|_| io::Error::other("the archive writer stopped"))
    }
}

impl ArchiveWriter {
    /// Creates `path` (mode 0600; it must not exist) and starts writing.
    pub fn create(path: &Path, recipients: Recipients, mtime: u64) -> Result<Self, BackupError> {
        let file =
            crate::store::files::create_new_private(path).map_err(|source| BackupError::Write {
                path: path.to_path_buf(),
                source,
            })?;
        let (tx, rx) = mpsc::sync_channel::<Msg>(4);
        let path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("keyward-backup-writer".into())
            .spawn(move || write_archive(file, path, recipients, mtime, rx))
            .map_err(|source| BackupError::Write {
                path: PathBuf::from("<writer thread>"),
                source,
            })?;
        Ok(Self { tx, thread })
    }

    pub fn sender(&self) -> MemberSender {
        MemberSender(self.tx.clone())
    }

    /// Adds the manifest (its `members` filled in here), finishes tar and
    /// age, and syncs the file to disk.
    pub fn finish(self, manifest: Manifest) -> io::Result<Written> {
        let sent = self.tx.send(Msg::Finish(Box::new(manifest)));
        drop(self.tx);
        let out = self
            .thread
            .join()
            .map_err(|_| io::Error::other("the archive writer thread panicked"))?;
        match (sent, out) {
            (_, Err(e)) => Err(e),
            (Err(_), Ok(_)) => Err(io::Error::other("the archive writer stopped early")),
            (Ok(()), Ok(w)) => Ok(w),
        }
    }

    /// Stops without a manifest; the caller deletes the partial file.
    pub fn abort(self) -> io::Error {
        drop(self.tx);
        match self.thread.join() {
            Ok(Err(e)) => e,
            _ => io::Error::other("aborted"),
        }
    }
}

fn write_archive(
    file: File,
    path: PathBuf,
    recipients: Recipients,
    mtime: u64,
    rx: mpsc::Receiver<Msg>,
) -> io::Result<Written> {
    let hashing = Hashing::new(BufWriter::with_capacity(1 << 20, file));
    let encryptor = age::Encryptor::with_recipients(
        recipients.iter().map(|r| r.as_ref() as &dyn age::Recipient),
    )
    .map_err(io::Error::other)?;
    let age_out = encryptor.wrap_output(hashing)?;
    let mut tar = tar::Builder::new(age_out);
    let mut members = BTreeMap::new();
    let append = |tar: &mut tar::Builder<_>, name: &str, data: &[u8]| -> io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(mtime);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, name, data)
    };
    loop {
        match rx.recv() {
            Ok(Msg::Member(name, data)) => {
                if name == MANIFEST || members.contains_key(&name) {
                    return Err(io::Error::other(format!("member {name} written twice")));
                }
                append(&mut tar, &name, &data)?;
                members.insert(
                    name,
                    Member {
                        sha256: sha256_hex(&data),
                        size: data.len() as u64,
                    },
                );
            }
            Ok(Msg::Finish(mut manifest)) => {
                manifest.members = members;
                let json = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?;
                append(&mut tar, MANIFEST, &json)?;
                let age_out = tar.into_inner()?;
                let hashing = age_out.finish()?;
                let (buf, sha256, size) = hashing.finish();
                let file = buf.into_inner().map_err(|e| e.into_error())?;
                file.sync_all()?;
                return Ok(Written {
                    path,
                    sha256,
                    size,
                    manifest: *manifest,
                });
            }
            Err(_) => return Err(io::Error::other("the backup was abandoned")),
        }
    }
}

/// Opens an archive for reading: the age header is checked against the
/// identities here, so a wrong identity fails before anything is read.
pub fn open(
    path: &Path,
    identities: &Identities,
) -> Result<tar::Archive<impl Read + use<>>, BackupError> {
    let file = File::open(path).map_err(|source| BackupError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let decryptor = age::Decryptor::new(io::BufReader::with_capacity(1 << 20, file))
        .map_err(|e| decrypt_error(path, e))?;
    let reader = decryptor
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(|e| decrypt_error(path, e))?;
    Ok(tar::Archive::new(reader))
}

fn decrypt_error(path: &Path, e: age::DecryptError) -> BackupError {
    match e {
        age::DecryptError::NoMatchingKeys => BackupError::WrongIdentity(path.to_path_buf()),
        e => BackupError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("not a readable age file: {e}"),
        },
    }
}

/// What the checking pass found: the manifest, and the small members
/// (keys, config, policies) in memory.
pub struct Checked {
    pub manifest: Manifest,
    pub small: BTreeMap<String, Vec<u8>>,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> BackupError {
    BackupError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads the whole archive once: decrypts it, hashes every member, and
/// checks them against the manifest (no member missing, extra, changed or
/// duplicated) and the format version. Nothing is written anywhere.
pub fn check(path: &Path, identities: &Identities) -> Result<Checked, BackupError> {
    let mut archive = open(path, identities)?;
    let mut seen: BTreeMap<String, Member> = BTreeMap::new();
    let mut small = BTreeMap::new();
    let mut manifest_bytes = None;
    let entries = archive
        .entries()
        .map_err(|e| corrupt(path, format!("not a tar stream: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| corrupt(path, read_failure(&e)))?;
        let name = entry
            .path()
            .map_err(|e| corrupt(path, format!("a member with a bad name: {e}")))?
            .to_string_lossy()
            .into_owned();
        if manifest_bytes.is_some() {
            return Err(corrupt(path, format!("member {name} after the manifest")));
        }
        let keep = name == MANIFEST
            || name.starts_with("keys/")
            || name.starts_with("config/")
            || name.starts_with("policies/");
        if keep && entry.size() > SMALL_MEMBER_MAX {
            return Err(corrupt(path, format!("member {name} is implausibly large")));
        }
        let mut hashing = Hashing::new(Vec::new());
        let mut kept = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| corrupt(path, read_failure(&e)))?;
            if n == 0 {
                break;
            }
            hashing.ctx.update(&buf[..n]);
            hashing.size += n as u64;
            if keep {
                kept.extend_from_slice(&buf[..n]);
            }
        }
        let (_, sha256, size) = hashing.finish();
        if name == MANIFEST {
            manifest_bytes = Some(kept);
            continue;
        }
        if seen.insert(name.clone(), Member { sha256, size }).is_some() {
            return Err(corrupt(path, format!("member {name} appears twice")));
        }
        if keep {
            small.insert(name, kept);
        }
    }
    let bytes = manifest_bytes.ok_or_else(|| {
        corrupt(
            path,
            "the archive ends before its manifest (truncated, or not a keyward backup)",
        )
    })?;
    let manifest = parse_manifest(path, &bytes)?;
    for (name, m) in &manifest.members {
        match seen.get(name) {
            None => return Err(corrupt(path, format!("member {name} is missing"))),
            Some(found) if found != m => {
                return Err(BackupError::HashMismatch {
                    path: path.to_path_buf(),
                    member: name.clone(),
                });
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = seen.keys().find(|n| !manifest.members.contains_key(*n)) {
        return Err(corrupt(
            path,
            format!("member {extra} is not in the manifest"),
        ));
    }
    Ok(Checked { manifest, small })
}

/// Parses a manifest, refusing a newer format before reading the rest.
pub fn parse_manifest(path: &Path, bytes: &[u8]) -> Result<Manifest, BackupError> {
    #[derive(Deserialize)]
    struct Head {
        format: String,
        format_version: u32,
        #[serde(default)]
        keyward_version: String,
    }
    let head: Head = serde_json::from_slice(bytes)
        .map_err(|e| corrupt(path, format!("the manifest is not valid: {e}")))?;
    if head.format != FORMAT_NAME {
        return Err(corrupt(
            path,
            format!("not a keyward backup (format `{}`)", head.format),
        ));
    }
    if head.format_version > FORMAT_VERSION {
        return Err(BackupError::NewerFormat {
            found: head.format_version,
            supported: FORMAT_VERSION,
            written_by: head.keyward_version,
        });
    }
    serde_json::from_slice(bytes)
        .map_err(|e| corrupt(path, format!("the manifest is not valid: {e}")))
}

/// Says what a read failure inside the encrypted stream most likely means.
fn read_failure(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            format!("the archive is truncated ({e})")
        }
        _ => format!("the archive is damaged: it fails authentication or decoding ({e})"),
    }
}

/// Iterates the store members in archive order for the applying pass,
/// re-hashing each against the manifest (the file could change between the
/// passes), and hands each to `apply` as (table, bytes).
pub fn for_each_store_member(
    path: &Path,
    identities: &Identities,
    manifest: &Manifest,
    mut apply: impl FnMut(&str, &[u8]) -> Result<(), BackupError>,
) -> Result<(), BackupError> {
    let mut archive = open(path, identities)?;
    let entries = archive
        .entries()
        .map_err(|e| corrupt(path, format!("not a tar stream: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| corrupt(path, read_failure(&e)))?;
        let name = entry
            .path()
            .map_err(|e| corrupt(path, format!("a member with a bad name: {e}")))?
            .to_string_lossy()
            .into_owned();
        let Some(rest) = name.strip_prefix("store/") else {
            continue;
        };
        let table = rest.split('/').next().unwrap_or_default().to_string();
        let expected = manifest
            .members
            .get(&name)
            .ok_or_else(|| corrupt(path, format!("member {name} is not in the manifest")))?;
        if entry.size() > 4 * super::super::store::snapshot::CHUNK_BYTES as u64 {
            return Err(corrupt(path, format!("member {name} is implausibly large")));
        }
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut data)
            .map_err(|e| corrupt(path, read_failure(&e)))?;
        if sha256_hex(&data) != expected.sha256 {
            return Err(BackupError::HashMismatch {
                path: path.to_path_buf(),
                member: name,
            });
        }
        apply(&table, &data)?;
    }
    Ok(())
}
