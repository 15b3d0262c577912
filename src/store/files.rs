//! Files that hold state or secrets (the database, tokens, keys): owner-only
//! (0600) from their first byte, and an existing file's mode never widened.
//!
//! Creating a file and `chmod`-ing it afterwards leaves a window in which it
//! has the umask's mode (often 0644), and whoever opens it then keeps reading
//! it after the `chmod`. So files are created with the mode in `open(2)`
//! itself (`O_CREAT` with 0600: the umask can only narrow that), and an
//! existing file is replaced by a new owner-only one instead of being
//! rewritten in place.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The mode of every file keyward creates for itself.
pub const PRIVATE_MODE: u32 = 0o600;

/// Sets the process umask to 077, so that every file and directory the
/// process creates afterwards (by SQLite, by a library, by a later feature)
/// is owner-only even if its creator asks for more. The umask is
/// process-wide: call this first thing in `main`, before any thread starts.
/// Returns the previous umask.
#[cfg(unix)]
pub fn restrict_umask() -> u32 {
    use rustix::fs::Mode;
    rustix::process::umask(Mode::from_raw_mode(0o077)).as_raw_mode() as u32
}

/// Without a umask there is nothing to restrict.
#[cfg(not(unix))]
pub fn restrict_umask() -> u32 {
    0
}

#[derive(Debug, thiserror::Error)]
pub enum PrivateFileError {
    #[error("refusing to write {}: it is a symbolic link or not a regular file", path.display())]
    NotARegularFile { path: PathBuf },
    #[error("cannot write {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl PrivateFileError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotARegularFile { .. } => "not_a_regular_file",
            Self::Io { .. } => "file_io",
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PrivateFileError + '_ {
    move |source| PrivateFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The permission bits of an existing file (`None` off Unix).
#[cfg(unix)]
fn mode_of(meta: &std::fs::Metadata) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    Some(meta.permissions().mode() & 0o7777)
}

#[cfg(not(unix))]
fn mode_of(_: &std::fs::Metadata) -> Option<u32> {
    None
}

/// Opens `path` for writing, creating it with `mode` if it does not exist
/// (`exclusive`: it must not exist).
/// Creates `path`, which must not exist, owner-only (0600) from its first byte.
pub fn create_new_private(path: &Path) -> io::Result<File> {
    open_with_mode(path, PRIVATE_MODE, true)
}

/// Creates missing directories owner-only, 0700 (existing ones are left as
/// they are).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

fn open_with_mode(path: &Path, mode: u32, exclusive: bool) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.write(true);
    if exclusive {
        opts.create_new(true);
    } else {
        opts.create(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    opts.open(path)
}

/// Narrows an existing file to owner-only: clears group and other bits and
/// keeps the owner's (a 0400 file stays 0400). Never widens.
#[cfg(unix)]
fn narrow(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_file() => {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & !PRIVATE_MODE != 0 {
                std::fs::set_permissions(
                    path,
                    std::fs::Permissions::from_mode(mode & PRIVATE_MODE),
                )?;
            }
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(not(unix))]
fn narrow(_: &Path) -> io::Result<()> {
    Ok(())
}

/// Makes a SQLite database's files owner-only before SQLite opens them: a
/// missing database file is created empty with mode 0600 (SQLite would create
/// it with 0644 minus the umask), and an existing database, `-wal`, `-shm` or
/// `-journal` with group or other access is narrowed. SQLite creates its
/// `-wal`, `-shm` and `-journal` files with the database file's mode (and
/// `fchmod`s them to it while still empty), so they are 0600 from their
/// first byte as well.
pub fn prepare_database_files(path: &Path) -> io::Result<()> {
    match open_with_mode(path, PRIVATE_MODE, true) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    narrow(path)?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut companion = path.as_os_str().to_owned();
        companion.push(suffix);
        narrow(Path::new(&companion))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` so that only its owner can ever read them.
///
/// The bytes go to a new file in the same directory, created exclusively with
/// mode 0600 (or the existing file's narrower owner mode, e.g. 0400), synced,
/// then renamed over `path`. So:
/// - a new file is 0600 from its first byte;
/// - an existing file is replaced, never rewritten in place: a pre-existing
///   0644 file is not chmod'ed or written, it is swapped for an owner-only
///   one, and a reader that opened the old file keeps seeing the old bytes;
/// - an existing file's narrower mode is kept, a wider one is not;
/// - a crash leaves the old content or the new, never half of it.
///
/// A symbolic link or anything but a regular file at `path` is refused.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PrivateFileError> {
    let mode = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_file() => {
            mode_of(&meta).map_or(PRIVATE_MODE, |m| m & PRIVATE_MODE)
        }
        Ok(_) => {
            return Err(PrivateFileError::NotARegularFile {
                path: path.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => PRIVATE_MODE,
        Err(e) => return Err(io_err(path)(e)),
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| PrivateFileError::NotARegularFile {
            path: path.to_path_buf(),
        })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
    let tmp = dir.join(tmp_name);

    let written = (|| {
        let mut f = open_with_mode(&tmp, mode, true)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    // The rename is durable once the directory is synced; a failure here
    // leaves the new file in place, so it is not an error.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
