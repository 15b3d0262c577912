//! Backup replication targets (`keyward::backup::location`): a directory, and
//! a real S3-compatible server (SeaweedFS started by the test on free loopback
//! ports, with an admin, a read-only and an env-configured identity). Hashes
//! are checked with coreutils' `sha256sum`, not keyward's own code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::seaweed::{Identity, Seaweed};
use keyward::backup::location::{Location, LocationError, PART_SIZE};
use keyward::config::{BackupLocationConfig, BackupLocationKind, S3LocationConfig};
use keyward::secret::{SecretRef, SecretSetting};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Deterministic bytes (xorshift), written in chunks.
fn write_file(path: &Path, len: usize, seed: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed | 1;
    let mut left = len;
    let mut chunk = Vec::with_capacity(64 * 1024);
    while left > 0 {
        chunk.clear();
        while chunk.len() < 64 * 1024 && chunk.len() < left {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.push(x as u8);
        }
        f.write_all(&chunk).unwrap();
        left -= chunk.len();
    }
    f.flush().unwrap();
}

fn sha256sum(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn dir_config(name: &str, path: PathBuf) -> BackupLocationConfig {
    BackupLocationConfig {
        name: name.into(),
        kind: BackupLocationKind::Dir { path },
        timeout: Duration::from_secs(60),
    }
}

fn secret(key: &str, from: SecretRef) -> SecretSetting {
    SecretSetting {
        key: format!("backup.locations[0].{key}"),
        from,
    }
}

fn s3_config(
    name: &str,
    endpoint: &str,
    bucket: &str,
    prefix: &str,
    credentials: Option<(SecretRef, SecretRef)>,
    timeout: Duration,
) -> BackupLocationConfig {
    let (access_key_id, secret_access_key) = match credentials {
        Some((id, key)) => (
            Some(secret("access_key_id", id)),
            Some(secret("secret_access_key", key)),
        ),
        None => (None, None),
    };
    BackupLocationConfig {
        name: name.into(),
        kind: BackupLocationKind::S3(S3LocationConfig {
            bucket: bucket.into(),
            prefix: prefix.into(),
            endpoint: Some(endpoint.into()),
            region: "us-east-1".into(),
            allow_http: true,
            access_key_id,
            secret_access_key,
        }),
        timeout,
    }
}

/// Credentials in files, as an operator configures them.
fn file_credentials(dir: &Path, tag: &str, id: &str, key: &str) -> (SecretRef, SecretRef) {
    let id_file = dir.join(format!("{tag}.id"));
    let key_file = dir.join(format!("{tag}.key"));
    std::fs::write(&id_file, format!("{id}\n")).unwrap();
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    (SecretRef::File(id_file), SecretRef::File(key_file))
}

fn names(list: &[keyward::backup::location::ObjectInfo]) -> Vec<&str> {
    list.iter().map(|o| o.file_name.as_str()).collect()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn dir_location_round_trip_verification_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("nas/keyward");
    let loc = Location::from_config(&dir_config("nas", root.clone())).unwrap();
    assert_eq!(loc.name(), "nas");
    #[cfg(unix)]
    assert_eq!(
        mode(&root),
        0o700,
        "a created location directory is owner-only"
    );

    // A small archive (one PUT) and one just over a part (multipart).
    let small = tmp.path().join("small.age");
    let large = tmp.path().join("large.age");
    write_file(&small, 100_000, 1);
    write_file(&large, PART_SIZE + 12_345, 2);
    let (small_sha, large_sha) = (sha256sum(&small), sha256sum(&large));
    loc.upload(&small, "b-1.age", &small_sha).await.unwrap();
    loc.upload(&large, "b-2.age", &large_sha.to_uppercase())
        .await
        .unwrap();
    std::fs::write(root.join("notes.txt"), "not an archive").unwrap();
    let listed = loc.list().await.unwrap();
    assert_eq!(names(&listed), ["b-1.age", "b-2.age"]);
    assert_eq!(listed[0].size, 100_000);
    assert_eq!(listed[1].size, (PART_SIZE + 12_345) as u64);
    assert!(listed[0].last_modified > 1_700_000_000);
    #[cfg(unix)]
    assert_eq!(mode(&root.join("b-2.age")), 0o600);

    let dest = tmp.path().join("restore/b-2.age");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    // In many ranged reads (the default range is larger than any test file).
    let loc = loc.with_read_range(1_000_003);
    let got = loc.download_to("b-2.age", &dest).await.unwrap();
    assert_eq!(got.size, (PART_SIZE + 12_345) as u64);
    assert_eq!(got.sha256_hex, large_sha);
    assert_eq!(sha256sum(&dest), large_sha);
    #[cfg(unix)]
    assert_eq!(mode(&dest), 0o600);

    // A wrong checksum: refused, and the existing good copy of that name survives.
    let err = loc
        .upload(&small, "b-2.age", &"0".repeat(64))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LocationError::ChecksumMismatch { expected, found, .. } if *expected == "0".repeat(64) && *found == small_sha),
        "{err:?}"
    );
    assert_eq!(err.code(), "location_checksum_mismatch");
    assert!(err.to_string().contains("`nas`") && err.to_string().contains("b-2.age"));
    let err = loc.upload(&small, "b-3.age", &large_sha).await.unwrap_err();
    assert_eq!(err.code(), "location_checksum_mismatch");
    assert_eq!(files_in(&root), ["b-1.age", "b-2.age", "notes.txt"]);
    let again = tmp.path().join("restore/again.age");
    assert_eq!(
        loc.download_to("b-2.age", &again).await.unwrap().sha256_hex,
        large_sha
    );

    // Delete, twice; then nothing is listed and a download says not found.
    loc.delete("b-2.age").await.unwrap();
    loc.delete("b-2.age").await.unwrap();
    loc.delete("b-1.age").await.unwrap();
    assert!(loc.list().await.unwrap().is_empty());
    let missing = tmp.path().join("restore/missing.age");
    let err = loc.download_to("b-1.age", &missing).await.unwrap_err();
    assert_eq!(err.code(), "location_not_found", "{err}");
    assert!(!missing.exists());
    assert_eq!(files_in(dest.parent().unwrap()), ["again.age", "b-2.age"]);

    // Names that would leave the location, and bad checksums, change nothing.
    for bad in ["../escape.age", "a/b.age", ".hidden.age", ""] {
        let err = loc.upload(&small, bad, &small_sha).await.unwrap_err();
        assert_eq!(err.code(), "location_invalid_argument", "{bad}: {err}");
    }
    let err = loc.upload(&small, "b-4.age", "abc").await.unwrap_err();
    assert_eq!(err.code(), "location_invalid_argument");
    let err = loc
        .upload(&tmp.path().join("absent.age"), "b-4.age", &small_sha)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "location_io");
    assert_eq!(files_in(&root), ["notes.txt"]);

    // A directory that cannot be made (tests run as root, so under a file).
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let err = Location::from_config(&dir_config("usb", file.join("sub"))).unwrap_err();
    assert_eq!(err.code(), "location_io");
    let msg = err.to_string();
    assert!(
        msg.contains("`usb`")
            && msg.contains("plain-file/sub")
            && msg.contains("cannot create directory"),
        "{msg}"
    );
}

/// No server needed: nobody listening, a server that never answers, and what
/// `Debug` shows.
#[tokio::test]
async fn s3_location_unreachable_and_debug() {
    let tmp = tempfile::tempdir().unwrap();
    let creds = || {
        Some(file_credentials(
            tmp.path(),
            "admin",
            "AKIDEXAMPLE",
            "very-secret-key-material",
        ))
    };
    let timeout = Duration::from_secs(2);
    // Bounds only to catch a hang; the configured timeout is far shorter.
    let guard = Duration::from_secs(120);

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let loc = Location::from_config(&s3_config(
        "offsite",
        &format!("http://127.0.0.1:{closed_port}"),
        "backups",
        "prod/",
        creds(),
        timeout,
    ))
    .unwrap();
    let debug = format!("{loc:?}");
    assert!(
        debug.contains("offsite") && debug.contains("backups"),
        "{debug}"
    );
    assert!(
        !debug.contains("very-secret-key-material") && !debug.contains("AKIDEXAMPLE"),
        "{debug}"
    );
    let err = tokio::time::timeout(guard, loc.list())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), "location_unreachable", "{err}");
    let small = tmp.path().join("a.age");
    write_file(&small, 1000, 3);
    let err = tokio::time::timeout(guard, loc.upload(&small, "a.age", &sha256sum(&small)))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), "location_unreachable", "{err}");
    let msg = err.to_string();
    assert!(msg.contains("`offsite`") && msg.contains("a.age"), "{msg}");
    assert!(!msg.contains("very-secret-key-material"), "{msg}");

    // Accepts connections (the kernel's backlog) but never answers: the
    // request timeout fires.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let loc = Location::from_config(&s3_config(
        "silent",
        &format!("http://{}", silent.local_addr().unwrap()),
        "backups",
        "",
        creds(),
        timeout,
    ))
    .unwrap();
    let err = tokio::time::timeout(guard, loc.list())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), "location_unreachable", "{err}");
    drop(silent);

    // Unreadable credentials are reported by the key that names them.
    let err = Location::from_config(&s3_config(
        "offsite",
        "http://127.0.0.1:9",
        "backups",
        "",
        Some((
            SecretRef::File(tmp.path().join("absent")),
            SecretRef::File(tmp.path().join("absent")),
        )),
        timeout,
    ))
    .unwrap_err();
    assert_eq!(err.code(), "secret_file_unreadable");
    assert!(err.to_string().contains("access_key_id"), "{err}");
}

#[tokio::test]
async fn s3_location_against_seaweedfs() {
    let tmp = tempfile::tempdir().unwrap();
    // The env identity's credentials are variables cargo sets for every test
    // process: setting our own would need `unsafe` (std::env::set_var).
    let env_id = std::env::var("CARGO_PKG_NAME").unwrap();
    let env_key = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    let mut weed = Seaweed::start(
        &tmp.path().join("weed"),
        &[
            Identity {
                name: "admin",
                access_key: "keyward-admin".into(),
                secret_key: "admin-secret-0123456789".into(),
                actions: &["Admin", "Read", "List", "Write", "Tagging"],
            },
            Identity {
                name: "reader",
                access_key: "keyward-reader".into(),
                secret_key: "reader-secret-0123456789".into(),
                actions: &["Read", "List"],
            },
            Identity {
                name: "from-env",
                access_key: env_id.clone(),
                secret_key: env_key.clone(),
                actions: &["Read", "List", "Write"],
            },
        ],
    );
    eprintln!("seaweedfs took writes after {:?}", weed.startup);
    weed.create_bucket("keyward-backups");
    let timeout = Duration::from_secs(60);
    let at = |name: &str, prefix: &str, creds| {
        Location::from_config(&s3_config(
            name,
            &weed.endpoint,
            "keyward-backups",
            prefix,
            creds,
            timeout,
        ))
        .unwrap()
    };
    let admin = at(
        "s3",
        "prod/",
        Some(file_credentials(
            tmp.path(),
            "admin",
            "keyward-admin",
            "admin-secret-0123456789",
        )),
    );
    let debug = format!("{admin:?}");
    assert!(!debug.contains("admin-secret-0123456789"), "{debug}");

    // ~20 MiB: a multipart upload of three parts; and a small one-PUT file.
    let large = tmp.path().join("large.age");
    let small = tmp.path().join("small.age");
    write_file(&large, 20 * 1024 * 1024 + 777, 4);
    write_file(&small, 4096, 5);
    let (large_sha, small_sha) = (sha256sum(&large), sha256sum(&small));
    admin
        .upload(&large, "2026-11-24.age", &large_sha)
        .await
        .unwrap();
    admin
        .upload(&small, "2026-11-25.age", &small_sha)
        .await
        .unwrap();
    let listed = admin.list().await.unwrap();
    assert_eq!(names(&listed), ["2026-11-24.age", "2026-11-25.age"]);
    assert_eq!(listed[0].size, 20 * 1024 * 1024 + 777);
    let dest = tmp.path().join("restored.age");
    let got = admin.download_to("2026-11-24.age", &dest).await.unwrap();
    assert_eq!(sha256sum(&dest), large_sha);
    // Again in ranged GETs of ~1 MiB, each pinned to the multipart object's ETag.
    let admin = admin.with_read_range(1024 * 1024 + 1);
    std::fs::write(&dest, "stale").unwrap();
    let got_ranged = admin.download_to("2026-11-24.age", &dest).await.unwrap();
    assert_eq!(got_ranged, got);
    assert_eq!(
        (got.size, got.sha256_hex.as_str()),
        (20 * 1024 * 1024 + 777, large_sha.as_str())
    );
    assert_eq!(sha256sum(&dest), large_sha);
    // The prefix is the location's whole world.
    let root = at(
        "s3-root",
        "",
        Some(file_credentials(
            tmp.path(),
            "admin2",
            "keyward-admin",
            "admin-secret-0123456789",
        )),
    );
    assert!(
        root.list().await.unwrap().is_empty(),
        "objects live under prod/"
    );

    // A wrong checksum: nothing stays under that name (nor its .partial).
    let err = admin
        .upload(&small, "bad.age", &large_sha)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "location_checksum_mismatch", "{err}");
    assert_eq!(
        names(&admin.list().await.unwrap()),
        ["2026-11-24.age", "2026-11-25.age"]
    );
    let err = admin
        .download_to("bad.age.partial", &tmp.path().join("p"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "location_not_found", "{err}");

    // Read-only credentials: the upload is refused, nothing new is listed.
    let reader = at(
        "s3-ro",
        "prod/",
        Some(file_credentials(
            tmp.path(),
            "reader",
            "keyward-reader",
            "reader-secret-0123456789",
        )),
    );
    let err = reader
        .upload(&small, "2026-11-26.age", &small_sha)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "location_refused", "{err}");
    assert!(matches!(err, LocationError::Refused { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("`s3-ro`") && msg.contains("2026-11-26.age"),
        "{msg}"
    );
    assert!(!msg.contains("reader-secret"), "{msg}");
    assert_eq!(
        names(&reader.list().await.unwrap()),
        ["2026-11-24.age", "2026-11-25.age"]
    );
    let err = reader.delete("2026-11-25.age").await.unwrap_err();
    assert_eq!(err.code(), "location_refused", "{err}");

    // A wrong secret: refused for writes and for listing alike.
    let wrong = at(
        "s3-wrong",
        "prod/",
        Some(file_credentials(
            tmp.path(),
            "wrong",
            "keyward-admin",
            "not-the-admin-secret",
        )),
    );
    let err = wrong
        .upload(&small, "2026-11-27.age", &small_sha)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "location_refused", "{err}");
    assert!(!err.to_string().contains("not-the-admin-secret"), "{err}");
    let err = wrong.list().await.unwrap_err();
    assert_eq!(err.code(), "location_refused", "{err}");

    // Credentials from environment variables.
    let from_env = at(
        "s3-env",
        "prod/",
        Some((
            SecretRef::Env("CARGO_PKG_NAME".into()),
            SecretRef::Env("CARGO_MANIFEST_DIR".into()),
        )),
    );
    from_env
        .upload(&small, "2026-11-28.age", &small_sha)
        .await
        .unwrap();
    assert_eq!(
        names(&from_env.list().await.unwrap()),
        ["2026-11-24.age", "2026-11-25.age", "2026-11-28.age"]
    );

    // Delete (twice: absent is fine), then nothing is listed.
    for name in [
        "2026-11-24.age",
        "2026-11-25.age",
        "2026-11-28.age",
        "2026-11-28.age",
    ] {
        admin.delete(name).await.unwrap();
    }
    assert!(admin.list().await.unwrap().is_empty());
    let err = admin
        .download_to("2026-11-24.age", &tmp.path().join("gone.age"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "location_not_found", "{err}");
}
