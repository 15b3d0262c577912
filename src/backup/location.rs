//! One replication target of backup archives — a directory or an S3-compatible bucket — behind one API: streamed upload verified by reading the object back, download, list, delete.
//!
//! An upload, its steps and what a failure leaves behind:
//!
//! 1. the local file is streamed to `<name>.partial` (one PUT up to [`PART_SIZE`], a
//!    multipart upload above it, never the whole file in memory; a failed multipart
//!    upload is aborted);
//! 2. `<name>.partial` is read back (streamed, in ranges of [`READ_RANGE`] bytes by
//!    default, pinned to the object's ETag) and its SHA-256 compared with the
//!    caller's; on a mismatch or a failed read it is deleted;
//! 3. `<name>.partial` becomes `<name>`: `rename(2)` in a directory (atomic), a
//!    server-side CopyObject then a DELETE of the partial on S3 (the copy is not read
//!    back a second time). CopyObject stops at 5 GiB: larger archives are uploaded
//!    to S3 under their final name directly, and a failed verification deletes it.
//!
//! So (but for those large S3 uploads) the final name only ever holds bytes that
//! were verified, and an upload that fails never replaces an existing good copy of
//! the same name. An upload that dies
//! between steps leaves at most `<name>.partial`, which [`Location::list`] does not
//! show and the next upload of that name overwrites. One upload of a name at a
//! time: two would share the partial.
//!
//! Requests are bounded by the location's `timeout` (connect, and each request as a
//! whole, which is why downloads are made of ranged requests) with at most
//! [`RETRIES`] retries inside `object_store`; retrying a failed replication later is
//! the caller's business.

use crate::config::{BackupLocationConfig, BackupLocationKind, S3LocationConfig};
use crate::secret::SecretError;
use async_trait::async_trait;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
    ReqwestConnector,
};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{
    ClientOptions, GetOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart,
};
use ring::digest;
use secrecy::ExposeSecret;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Part size of multipart uploads (S3's minimum is 5 MiB); files up to this size
/// go in one PUT.
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts uploaded concurrently: memory held by an upload is about
/// `PART_SIZE * (PARTS_IN_FLIGHT + 1)`.
const PARTS_IN_FLIGHT: usize = 2;
/// Default bytes per GET when reading an object back or downloading it: each
/// request must finish within the location's timeout, whatever the archive's size.
pub const READ_RANGE: u64 = 64 * 1024 * 1024;
/// Retries of one request inside `object_store` (connection failures, timeouts, 5xx).
pub const RETRIES: usize = 2;
/// Archives are the objects whose names end with this.
const ARCHIVE_SUFFIX: &str = ".age";
/// Uploads land under `<name>` + this first.
const PARTIAL_SUFFIX: &str = ".partial";
/// The largest object S3's CopyObject copies (5 GiB).
const S3_COPY_LIMIT: u64 = 5 * 1024 * 1024 * 1024;
/// How much of a refusal's body is read to find the S3 error code.
const REFUSAL_BODY_LIMIT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    #[error("backup location `{location}`: {reason}")]
    Invalid { location: String, reason: String },
    #[error("backup location `{location}`: {source}")]
    Credentials {
        location: String,
        #[source]
        source: SecretError,
    },
    #[error("backup location `{location}`: cannot set up the object store: {source}")]
    Config {
        location: String,
        #[source]
        source: object_store::Error,
    },
    #[error(
        "backup location `{location}`{}: unreachable (connection failed or timed out): {source}",
        on(object)
    )]
    Unreachable {
        location: String,
        object: Option<String>,
        #[source]
        source: object_store::Error,
    },
    #[error(
        "backup location `{location}`{}: refused (check the credentials and what they may do): {source}",
        on(object)
    )]
    Refused {
        location: String,
        object: Option<String>,
        #[source]
        source: object_store::Error,
    },
    #[error("backup location `{location}`: object `{object}` not found")]
    NotFound { location: String, object: String },
    #[error(
        "backup location `{location}`: object `{object}` read back with SHA-256 {found}, {expected} expected; the uploaded copy was discarded"
    )]
    ChecksumMismatch {
        location: String,
        object: String,
        expected: String,
        found: String,
    },
    #[error("backup location `{location}`: {what} {}: {source}", path.display())]
    Io {
        location: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("backup location `{location}`: object `{object}` changed while it was read: {reason}")]
    Inconsistent {
        location: String,
        object: String,
        reason: String,
    },
    #[error("backup location `{location}`{}: {source}", on(object))]
    Other {
        location: String,
        object: Option<String>,
        #[source]
        source: object_store::Error,
    },
}

fn on(object: &Option<String>) -> String {
    match object {
        Some(o) => format!(": object `{o}`"),
        None => String::new(),
    }
}

impl LocationError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "location_invalid_argument",
            Self::Credentials { source, .. } => source.code(),
            Self::Config { .. } => "location_config",
            Self::Unreachable { .. } => "location_unreachable",
            Self::Refused { .. } => "location_refused",
            Self::NotFound { .. } => "location_not_found",
            Self::ChecksumMismatch { .. } => "location_checksum_mismatch",
            Self::Io { .. } => "location_io",
            Self::Inconsistent { .. } => "location_inconsistent",
            Self::Other { .. } => "location_error",
        }
    }
}

/// A downloaded archive: what was written, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub size: u64,
    pub sha256_hex: String,
}

/// One archive in a location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Without the location's prefix.
    pub file_name: String,
    pub size: u64,
    /// Unix seconds, as the store reports it.
    pub last_modified: i64,
}

/// Where a location points, for `Debug` and messages: never a credential.
enum Target {
    Dir {
        path: PathBuf,
    },
    S3 {
        bucket: String,
        prefix: String,
        endpoint: Option<String>,
        region: String,
        signed: bool,
    },
}

/// A configured replication target.
pub struct Location {
    name: String,
    target: Target,
    store: Arc<dyn ObjectStore>,
    read_range: u64,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Location");
        d.field("name", &self.name);
        match &self.target {
            Target::Dir { path } => d.field("dir", path),
            Target::S3 {
                bucket,
                prefix,
                endpoint,
                region,
                signed,
            } => d
                .field("bucket", bucket)
                .field("prefix", prefix)
                .field("endpoint", endpoint)
                .field("region", region)
                .field(
                    "credentials",
                    &if *signed {
                        "from file/env"
                    } else {
                        "anonymous"
                    },
                ),
        };
        d.finish_non_exhaustive()
    }
}

impl Location {
    /// Builds the location; reads S3 credentials (file or env) now. A `dir`
    /// location's directory is created with mode 0700 if missing.
    pub fn from_config(cfg: &BackupLocationConfig) -> Result<Self, LocationError> {
        match &cfg.kind {
            BackupLocationKind::Dir { path } => Self::dir(&cfg.name, path),
            BackupLocationKind::S3(s3) => Self::s3(cfg, s3),
        }
    }

    fn dir(name: &str, path: &Path) -> Result<Self, LocationError> {
        let io = |what: &'static str| {
            move |source| LocationError::Io {
                location: name.to_string(),
                what,
                path: path.to_path_buf(),
                source,
            }
        };
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(path)
            .map_err(io("cannot create directory"))?;
        let path = std::fs::canonicalize(path).map_err(io("cannot resolve directory"))?;
        let store = LocalFileSystem::new_with_prefix(&path)
            .map_err(|source| LocationError::Config {
                location: name.to_string(),
                source,
            })?
            .with_fsync(true);
        Ok(Self {
            name: name.to_string(),
            target: Target::Dir { path },
            store: Arc::new(store),
            read_range: READ_RANGE,
        })
    }

    fn s3(cfg: &BackupLocationConfig, s3: &S3LocationConfig) -> Result<Self, LocationError> {
        let location = || cfg.name.clone();
        // reqwest is built without a crypto provider; the daemon installs ring at
        // start, embedders and tests may not have.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let options = ClientOptions::new()
            .with_timeout(cfg.timeout)
            .with_connect_timeout(cfg.timeout);
        let retry = RetryConfig {
            max_retries: RETRIES,
            retry_timeout: cfg.timeout,
            ..Default::default()
        };
        let mut builder = AmazonS3Builder::new()
            .with_client_options(options)
            .with_allow_http(s3.allow_http)
            .with_bucket_name(&s3.bucket)
            .with_region(&s3.region)
            .with_retry(retry)
            // One DELETE per object: a refused bulk DeleteObjects answers 200
            // with per-key errors that `object_store` reports as generic.
            .with_disable_bulk_delete(true)
            .with_http_connector(RefusalConnector);
        if let Some(endpoint) = &s3.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
        }
        let signed = match (&s3.access_key_id, &s3.secret_access_key) {
            (Some(id), Some(secret)) => {
                let read = |s: &crate::secret::SecretSetting| {
                    s.read().map_err(|source| LocationError::Credentials {
                        location: location(),
                        source,
                    })
                };
                let (id, secret) = (read(id)?, read(secret)?);
                builder = builder
                    .with_access_key_id(id.expose_secret())
                    .with_secret_access_key(secret.expose_secret());
                true
            }
            // The config takes both or neither: anonymous requests, and no
            // fallback to instance metadata or the process environment.
            _ => {
                builder = builder.with_skip_signature(true);
                false
            }
        };
        let store = builder.build().map_err(|source| LocationError::Config {
            location: location(),
            source,
        })?;
        let store: Arc<dyn ObjectStore> = match s3.prefix.trim_end_matches('/') {
            "" => Arc::new(store),
            prefix => {
                let prefix = ObjectPath::parse(prefix).map_err(|e| LocationError::Invalid {
                    location: location(),
                    reason: format!("prefix `{}`: {e}", s3.prefix),
                })?;
                Arc::new(PrefixStore::new(store, prefix))
            }
        };
        Ok(Self {
            name: cfg.name.clone(),
            target: Target::S3 {
                bucket: s3.bucket.clone(),
                prefix: s3.prefix.clone(),
                endpoint: s3.endpoint.clone(),
                region: s3.region.clone(),
                signed,
            },
            store,
            read_range: READ_RANGE,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes per GET when reading back or downloading (default [`READ_RANGE`]):
    /// smaller for a slow link, so that each request ends within the timeout.
    pub fn with_read_range(mut self, bytes: u64) -> Self {
        self.read_range = bytes.max(1);
        self
    }

    /// Uploads `local` as `file_name`, then reads it back and compares its
    /// SHA-256 with `sha256_hex` (see the module doc for the steps).
    pub async fn upload(
        &self,
        local: &Path,
        file_name: &str,
        sha256_hex: &str,
    ) -> Result<(), LocationError> {
        let key = self.key(file_name)?;
        let expected = self.sha256_arg(sha256_hex)?;
        let size = tokio::fs::metadata(local)
            .await
            .map_err(self.io("cannot read", local))?
            .len();
        // S3's CopyObject stops at 5 GiB: larger archives go straight to their name.
        let staged = !matches!(self.target, Target::S3 { .. }) || size <= S3_COPY_LIMIT;
        let upload_name = if staged {
            format!("{file_name}{PARTIAL_SUFFIX}")
        } else {
            file_name.to_string()
        };
        let upload_key = ObjectPath::from(upload_name.as_str());
        self.put_file(local, &upload_key, file_name).await?;
        if let Target::Dir { path } = &self.target {
            // Owner-only whatever the process umask (archives are encrypted, but
            // their names and sizes tell when the CA changed).
            let uploaded = path.join(&upload_name);
            if let Err(source) = restrict(&uploaded) {
                self.discard(&upload_key).await;
                return Err(self.io("cannot restrict the mode of", &uploaded)(source));
            }
        }
        let found = match self.read_object(&upload_key, file_name, None).await {
            Ok((_, found)) => found,
            Err(e) => {
                self.discard(&upload_key).await;
                return Err(e);
            }
        };
        if found != expected {
            self.discard(&upload_key).await;
            return Err(LocationError::ChecksumMismatch {
                location: self.name.clone(),
                object: file_name.to_string(),
                expected,
                found,
            });
        }
        if !staged {
            return Ok(());
        }
        self.store
            .rename(&upload_key, &key)
            .await
            .map_err(|e| self.classify(Some(file_name), e))
    }

    /// Streams `file_name` into `dest` (mode 0600): written beside it first and
    /// renamed into place once complete, so `dest` is never half written.
    pub async fn download_to(
        &self,
        file_name: &str,
        dest: &Path,
    ) -> Result<Downloaded, LocationError> {
        let key = self.key(file_name)?;
        let Some(dest_name) = dest.file_name() else {
            return Err(LocationError::Invalid {
                location: self.name.clone(),
                reason: format!("download destination {} is not a file path", dest.display()),
            });
        };
        let mut tmp_name = dest_name.to_os_string();
        tmp_name.push(PARTIAL_SUFFIX);
        let tmp = dest.with_file_name(tmp_name);
        match tokio::fs::remove_file(&tmp).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.io("cannot remove stale", &tmp)(e)),
        }
        let mut options = tokio::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        options.mode(crate::store::files::PRIVATE_MODE);
        let mut file = options
            .open(&tmp)
            .await
            .map_err(self.io("cannot create", &tmp))?;
        let result = async {
            let read = self.read_object(&key, file_name, Some(&mut file)).await?;
            file.flush().await.map_err(self.io("cannot write", &tmp))?;
            file.sync_all()
                .await
                .map_err(self.io("cannot write", &tmp))?;
            Ok::<_, LocationError>(read)
        }
        .await;
        drop(file);
        let renamed = match result {
            Ok(read) => tokio::fs::rename(&tmp, dest)
                .await
                .map(|()| read)
                .map_err(self.io("cannot move the download to", dest)),
            Err(e) => Err(e),
        };
        match renamed {
            Ok((size, sha256_hex)) => Ok(Downloaded { size, sha256_hex }),
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    /// The archives (`*.age`) directly under the location, by name.
    pub async fn list(&self) -> Result<Vec<ObjectInfo>, LocationError> {
        let listed = self
            .store
            .list_with_delimiter(None)
            .await
            .map_err(|e| self.classify(None, e))?;
        let mut archives: Vec<ObjectInfo> = listed
            .objects
            .into_iter()
            .filter_map(|meta| {
                let name = meta.location.filename()?;
                (name.ends_with(ARCHIVE_SUFFIX) && valid_name(name)).then(|| ObjectInfo {
                    file_name: name.to_string(),
                    size: meta.size,
                    last_modified: meta.last_modified.timestamp(),
                })
            })
            .collect();
        archives.sort_by(|a, b| a.file_name.cmp(&b.file_name));
        Ok(archives)
    }

    /// Deletes `file_name`; an absent object is not an error.
    pub async fn delete(&self, file_name: &str) -> Result<(), LocationError> {
        let key = self.key(file_name)?;
        match self.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.classify(Some(file_name), e)),
        }
    }

    fn key(&self, file_name: &str) -> Result<ObjectPath, LocationError> {
        if valid_name(file_name) {
            Ok(ObjectPath::from(file_name))
        } else {
            Err(LocationError::Invalid {
                location: self.name.clone(),
                reason: format!(
                    "{file_name:?} is not an archive file name (letters, digits, `.`, `-`, `_`, not starting with `.`)"
                ),
            })
        }
    }

    fn sha256_arg(&self, hex: &str) -> Result<String, LocationError> {
        if hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            Ok(hex.to_ascii_lowercase())
        } else {
            Err(LocationError::Invalid {
                location: self.name.clone(),
                reason: "the expected SHA-256 is not 64 hex digits".to_string(),
            })
        }
    }

    fn io<'a>(
        &'a self,
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> LocationError + 'a {
        move |source| LocationError::Io {
            location: self.name.clone(),
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    async fn put_file(
        &self,
        local: &Path,
        key: &ObjectPath,
        file_name: &str,
    ) -> Result<(), LocationError> {
        let classify = |e| self.classify(Some(file_name), e);
        let mut file = tokio::fs::File::open(local)
            .await
            .map_err(self.io("cannot open", local))?;
        let size = file
            .metadata()
            .await
            .map_err(self.io("cannot read", local))?
            .len();
        if size <= PART_SIZE as u64 {
            let mut buf = Vec::with_capacity(size as usize);
            file.read_to_end(&mut buf)
                .await
                .map_err(self.io("cannot read", local))?;
            self.store
                .put(key, PutPayload::from(buf))
                .await
                .map_err(classify)?;
            return Ok(());
        }
        let upload = self.store.put_multipart(key).await.map_err(classify)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut buf = vec![0u8; 1024 * 1024];
        loop {
            let n = match file.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(self.io("cannot read", local)(e));
                }
            };
            if n == 0 {
                break;
            }
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                let _ = writer.abort().await;
                return Err(classify(e));
            }
            writer.write(&buf[..n]);
        }
        // `finish` aborts the upload itself when a part or the completion fails.
        writer.finish().await.map_err(classify)?;
        Ok(())
    }

    /// Reads `key` in ranges pinned to its ETag, hashing it and writing it to
    /// `out` if given: (size, SHA-256 hex).
    async fn read_object(
        &self,
        key: &ObjectPath,
        file_name: &str,
        mut out: Option<&mut tokio::fs::File>,
    ) -> Result<(u64, String), LocationError> {
        let classify = |e| self.classify(Some(file_name), e);
        let meta = self.store.head(key).await.map_err(classify)?;
        let mut sha = digest::Context::new(&digest::SHA256);
        let mut offset = 0u64;
        while offset < meta.size {
            let start = offset;
            let end = (start + self.read_range).min(meta.size);
            let options = GetOptions::new()
                .with_range(Some(start..end))
                .with_if_match(meta.e_tag.clone());
            let mut stream = self
                .store
                .get_opts(key, options)
                .await
                .map_err(classify)?
                .into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(classify)?;
                offset += chunk.len() as u64;
                if offset > end {
                    break;
                }
                sha.update(&chunk);
                if let Some(file) = out.as_mut() {
                    file.write_all(&chunk)
                        .await
                        .map_err(|source| LocationError::Io {
                            location: self.name.clone(),
                            what: "cannot write the download of",
                            path: PathBuf::from(file_name),
                            source,
                        })?;
                }
            }
            if offset != end {
                return Err(LocationError::Inconsistent {
                    location: self.name.clone(),
                    object: file_name.to_string(),
                    reason: format!("bytes {start}..{end} came back as {start}..{offset}"),
                });
            }
        }
        Ok((meta.size, hex::encode(sha.finish().as_ref())))
    }

    /// Best-effort removal of an unverified upload.
    async fn discard(&self, key: &ObjectPath) {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => tracing::warn!(
                location = %self.name,
                object = %key,
                error = %self.classify(None, e),
                "could not delete an unverified upload"
            ),
        }
    }

    /// Maps an `object_store` error to what an operator can act on.
    fn classify(&self, object: Option<&str>, e: object_store::Error) -> LocationError {
        let location = self.name.clone();
        let object = object.map(str::to_string);
        match e {
            object_store::Error::NotFound { .. } => LocationError::NotFound {
                location,
                object: object.unwrap_or_default(),
            },
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => LocationError::Refused {
                location,
                object,
                source: e,
            },
            object_store::Error::Precondition { .. } => LocationError::Inconsistent {
                location,
                object: object.unwrap_or_default(),
                reason: "its ETag changed".to_string(),
            },
            e => match cause(&e) {
                Cause::Refused => LocationError::Refused {
                    location,
                    object,
                    source: e,
                },
                Cause::Unreachable => LocationError::Unreachable {
                    location,
                    object,
                    source: e,
                },
                Cause::Other => LocationError::Other {
                    location,
                    object,
                    source: e,
                },
            },
        }
    }
}

enum Cause {
    Refused,
    Unreachable,
    Other,
}

/// Looks through the source chain: `object_store` keeps the transport error
/// ([`HttpError`]) but wraps some responses (a refused LIST) in errors of its
/// own that only [`RefusalConnector`]'s marker identifies.
fn cause(e: &object_store::Error) -> Cause {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if err.downcast_ref::<ServerRefused>().is_some() {
            return Cause::Refused;
        }
        if let Some(http) = err.downcast_ref::<HttpError>() {
            match http.kind() {
                HttpErrorKind::Connect
                | HttpErrorKind::Timeout
                | HttpErrorKind::Request
                | HttpErrorKind::Interrupted => return Cause::Unreachable,
                _ => {}
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::PermissionDenied => return Cause::Refused,
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut => {
                    return Cause::Unreachable;
                }
                _ => {}
            }
        }
        current = err.source();
    }
    Cause::Other
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
}

#[cfg(unix)]
fn restrict(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(crate::store::files::PRIVATE_MODE),
    )
}

#[cfg(not(unix))]
fn restrict(_: &Path) -> std::io::Result<()> {
    Ok(())
}

/// A 401/403 answer, with the S3 error code (`AccessDenied`,
/// `SignatureDoesNotMatch`, …) when the body names one.
#[derive(Debug, thiserror::Error)]
#[error("the server refused the request: HTTP {status}{}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default())]
struct ServerRefused {
    status: u16,
    code: Option<String>,
}

/// `object_store`'s reqwest connector, except that 401 and 403 answers become
/// a [`ServerRefused`] transport error: `object_store` turns a refused GET, PUT or
/// DELETE into `PermissionDenied`, but a refused LIST into an opaque generic
/// error. Not retried (`HttpErrorKind::Unknown`), as before.
#[derive(Debug)]
struct RefusalConnector;

impl HttpConnector for RefusalConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(RefusalService { inner }))
    }
}

#[derive(Debug)]
struct RefusalService {
    inner: HttpClient,
}

#[async_trait]
impl HttpService for RefusalService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let response = self.inner.execute(req).await?;
        let status = response.status().as_u16();
        if status != 401 && status != 403 {
            return Ok(response);
        }
        let mut body = Vec::new();
        let mut chunks = response.into_body().bytes_stream();
        while let Some(Ok(chunk)) = chunks.next().await {
            body.extend_from_slice(&chunk);
            if body.len() >= REFUSAL_BODY_LIMIT {
                break;
            }
        }
        Err(HttpError::new(
            HttpErrorKind::Unknown,
            ServerRefused {
                status,
                code: s3_error_code(&body),
            },
        ))
    }
}

/// `<Code>…</Code>` of an S3 error body, if it is a plain word.
fn s3_error_code(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    let code = &text[start..start + len];
    (!code.is_empty() && code.len() <= 64 && code.bytes().all(|c| c.is_ascii_alphanumeric()))
        .then(|| code.to_string())
}
