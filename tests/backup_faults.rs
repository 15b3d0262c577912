//! Backups and restores under bad input and faults: every failure gives
//! its stable code (`BackupError::code()`, printed by the CLI) and changes
//! nothing: no store file, no `*.restoring-*` file, no key left on the
//! target token (checked with OpenSC's `pkcs11-tool`), no partial archive,
//! no backup row. Tampered archives are made with the stock `age` CLI and
//! the `tar` crate; full disks are real (small tmpfs mounts, needs root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/plaintext_scan.rs"]
mod plaintext_scan;

use aes_kw::cipher::KeyInit as _;
use common::Env;
use serde_json::Value;
use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The backup officer's keys, made by the stock tools: (age identity,
/// age recipient line, recipients file).
fn officer_keys(dir: &Path) -> (PathBuf, String, PathBuf) {
    let id = dir.join("officer-identity.txt");
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&id)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("age-keygen")
        .arg("-y")
        .arg(&id)
        .output()
        .unwrap();
    let recipient = String::from_utf8(out.stdout).unwrap().trim().to_string();
    // The daemon's verification key, a second recipient: the CA keys'
    // wrapping key is sealed to the officer only, never to it.
    let verifier = verifier_of(&id);
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&verifier)
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = Command::new("age-keygen")
        .arg("-y")
        .arg(&verifier)
        .output()
        .unwrap();
    let verifier_recipient = String::from_utf8(out.stdout).unwrap();
    let recipients = dir.join("officer-recipients.txt");
    std::fs::write(
        &recipients,
        format!("{recipient}\n{}\n", verifier_recipient.trim()),
    )
    .unwrap();
    (id, recipient, recipients)
}

/// The verification identity made beside the officer's identity.
fn verifier_of(officer_identity: &Path) -> PathBuf {
    officer_identity.with_file_name("verifier-identity.txt")
}

fn backup_section(recipients: &Path, identity: &Path, spool: &str, nas: &Path) -> String {
    format!(
        "[backup]\ndir = \"{spool}\"\nrecipients_files = [\"{}\"]\nverify_identity_file = \"{}\"\n\
         keep_daily = 7\nkeep_weekly = 4\n\n[[backup.locations]]\nname = \"nas\"\ntype = \"dir\"\npath = \"{}\"\n",
        recipients.display(),
        verifier_of(identity).display(),
        nas.display()
    )
}

fn assert_token_empty(env: &Env, what: &str) {
    let objects = common::pkcs11_objects(env);
    assert!(
        !objects.contains("Private Key Object") && !objects.contains("Public Key Object"),
        "{what}: keys were left on the target token:\n{objects}"
    );
}

/// No store and no `*.restoring-*` (or its -wal/-shm) next to where it would be.
fn assert_no_store(db: &Path, what: &str) {
    assert!(!db.exists(), "{what}: {} was written", db.display());
    let dir = db.parent().unwrap();
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".restoring-"))
        .collect();
    assert!(left.is_empty(), "{what}: left behind {left:?}");
}

fn restore(env: &Env, archive: &Path, identity: &Path, extra: &[&str]) -> Output {
    env.keyward()
        .args(["backup", "restore", "--config"])
        .arg(&env.config)
        .arg("--identity-file")
        .arg(identity)
        .args(extra)
        .arg(archive)
        .output()
        .unwrap()
}

/// The command failed with `code` (the CLI prints `error: <code>: <message>`); returns stderr.
fn assert_code(out: &Output, code: &str, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{what}: succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains(&format!("error: {code}: ")),
        "{what}: expected {code}: {stderr}"
    );
    stderr
}

fn keyward_json(env: &Env, url: &str, args: &[&str]) -> Value {
    let out = keyward_client(env, url, args);
    assert!(
        out.status.success(),
        "keyward {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn keyward_client(env: &Env, url: &str, args: &[&str]) -> Output {
    env.keyward()
        .args(args)
        .args(["--url", url, "--token-file"])
        .arg(env.path("admin.token"))
        .args(["--output", "json"])
        .output()
        .unwrap()
}

/// Decrypts with the stock age CLI (`age -d -i`), `input` on stdin.
fn age_decrypt(identity: &Path, input: &[u8]) -> Vec<u8> {
    pipe(Command::new("age").arg("-d").arg("-i").arg(identity), input)
}

/// Encrypts with the stock age CLI to one recipient.
fn age_encrypt(recipient: &str, input: &[u8]) -> Vec<u8> {
    pipe(Command::new("age").args(["-r", recipient]), input)
}

fn pipe(cmd: &mut Command, input: &[u8]) -> Vec<u8> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The members of a decrypted archive, in order.
fn tar_members(tar_bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.push((name, data));
    }
    out
}

fn tar_build(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o600);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

/// A tmpfs of `size` mounted on `dir` (tests run as root); unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test needs root (CAP_SYS_ADMIN) to mount a small tmpfs as a full disk: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

/// Files under `dir` holding `needle`.
fn files_with(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(kind) = e.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(path);
            }
        }
    }
    found
}

fn temp_entries() -> std::collections::BTreeSet<PathBuf> {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// Restores of broken archives (truncated, corrupted, for another identity,
/// from a newer format, with an altered member, onto a full disk) fail with
/// their codes and leave the fresh target untouched; a good one succeeds; a
/// second one is refused without --force and with it moves the old store
/// aside byte for byte; and no plaintext of the restored issuing key is
/// anywhere on disk.
#[tokio::test]
async fn restore_refuses_bad_archives_and_leaves_no_plaintext() {
    let temp_before = temp_entries();
    let officer = tempfile::tempdir().unwrap();
    let (identity, recipient, recipients) = officer_keys(officer.path());
    let loc = tempfile::tempdir().unwrap();
    let nas = loc.path().join("nas");
    let work = tempfile::tempdir().unwrap();

    // The source installation, one backup, verified.
    let env = Env::new();
    env.append_config(&backup_section(&recipients, &identity, "backups", &nas));
    env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();
    let made = keyward_json(&env, &url, &["backup", "create"]);
    assert_eq!(made["status"], "done", "{made}");
    let file = made["file_name"].as_str().unwrap().to_string();
    let verified = keyward_json(&env, &url, &["backup", "verify"]);
    for r in verified["results"].as_array().unwrap() {
        assert_eq!(r["ok"], true, "{verified}");
    }
    drop(daemon);
    let archive = nas.join(&file);
    let bytes = std::fs::read(&archive).unwrap();

    // The target: a fresh token, no store.
    let env2 = Env::new();
    env2.append_config(&backup_section(
        &recipients,
        &identity,
        "backups",
        &loc.path().join("nas2"),
    ));
    let bad = |name: &str, data: &[u8]| {
        let p = work.path().join(name);
        std::fs::write(&p, data).unwrap();
        p
    };

    // 1. Truncated: at half, and by one byte.
    for (name, cut) in [("half", bytes.len() / 2), ("one-byte", bytes.len() - 1)] {
        let p = bad(&format!("truncated-{name}.age"), &bytes[..cut]);
        let err = assert_code(
            &restore(&env2, &p, &identity, &[]),
            "backup_corrupt",
            &format!("truncated {name}"),
        );
        assert!(
            err.contains("truncated") || err.contains("damaged"),
            "truncated {name}: {err}"
        );
        assert_no_store(&env2.db, name);
        assert_token_empty(&env2, name);
    }

    // 2. One byte flipped in the middle.
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    let p = bad("flipped.age", &flipped);
    assert_code(
        &restore(&env2, &p, &identity, &[]),
        "backup_corrupt",
        "flipped",
    );
    assert_no_store(&env2.db, "flipped");
    assert_token_empty(&env2, "flipped");

    // 3. An identity the archive was not encrypted to.
    let stranger = tempfile::tempdir().unwrap();
    let (stranger_id, _, _) = officer_keys(stranger.path());
    let err = assert_code(
        &restore(&env2, &archive, &stranger_id, &[]),
        "backup_wrong_identity",
        "wrong identity",
    );
    assert!(err.contains("none of the given age identities"), "{err}");
    assert_no_store(&env2.db, "wrong identity");
    assert_token_empty(&env2, "wrong identity");

    // 4. and 5. Rewritten with age + tar: a newer manifest format, an altered store member.
    let plain = age_decrypt(&identity, &bytes);
    let members = tar_members(&plain);
    assert_eq!(members.last().unwrap().0, "MANIFEST.json");
    let mut newer = members.clone();
    let mut manifest: Value = serde_json::from_slice(&newer.last().unwrap().1).unwrap();
    assert_eq!(manifest["format_version"], 1);
    manifest["format_version"] = 2.into();
    newer.last_mut().unwrap().1 = serde_json::to_vec_pretty(&manifest).unwrap();
    let p = bad("newer.age", &age_encrypt(&recipient, &tar_build(&newer)));
    let err = assert_code(
        &restore(&env2, &p, &identity, &[]),
        "backup_format_too_new",
        "newer format",
    );
    assert!(err.contains("format version 2"), "{err}");
    assert_no_store(&env2.db, "newer format");
    assert_token_empty(&env2, "newer format");

    let mut altered = members.clone();
    let store_member = altered
        .iter_mut()
        .find(|(n, _)| n.starts_with("store/"))
        .unwrap();
    let name = store_member.0.clone();
    let at = store_member.1.len() / 2;
    store_member.1[at] ^= 0x20;
    let p = bad(
        "altered.age",
        &age_encrypt(&recipient, &tar_build(&altered)),
    );
    let err = assert_code(
        &restore(&env2, &p, &identity, &[]),
        "backup_hash_mismatch",
        "altered member",
    );
    assert!(err.contains(&name), "{err}");
    assert_no_store(&env2.db, "altered member");
    assert_token_empty(&env2, "altered member");
    // The unaltered rebuild restores (dry run): the rewriting itself is sound.
    let p = bad(
        "rebuilt.age",
        &age_encrypt(&recipient, &tar_build(&members)),
    );
    let out = restore(&env2, &p, &identity, &["--dry-run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 8. The store's disk is full: the keys unwrapped before are destroyed again.
    let full_dir = work.path().join("full");
    let full = Tmpfs::mount(&full_dir, "64k");
    let config_text = std::fs::read_to_string(&env2.config).unwrap();
    let full_db = full_dir.join("keyward.db");
    std::fs::write(
        &env2.config,
        config_text.replace(
            "path = \"keyward.db\"",
            &format!("path = \"{}\"", full_db.display()),
        ),
    )
    .unwrap();
    let err = assert_code(
        &restore(&env2, &archive, &identity, &[]),
        "backup_disk_full",
        "full disk",
    );
    assert!(err.contains("disk is full"), "{err}");
    assert_no_store(&full_db, "full disk");
    assert_token_empty(&env2, "full disk");
    std::fs::write(&env2.config, &config_text).unwrap();
    drop(full);

    // A good restore.
    let out = restore(&env2, &archive, &identity, &["--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["outcome"] == "unwrapped"),
        "{report}"
    );

    // 9. A non-empty target is refused without --force and nothing changes.
    let db_before = std::fs::read(&env2.db).unwrap();
    let objects_before = common::pkcs11_objects(&env2);
    let err = assert_code(
        &restore(&env2, &archive, &identity, &[]),
        "restore_target_not_empty",
        "non-empty store",
    );
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&env2.db).unwrap(), db_before);
    assert_eq!(common::pkcs11_objects(&env2), objects_before);
    // A store moved away still leaves a token with keys: refused as well.
    let moved = env2.path("moved.db");
    std::fs::rename(&env2.db, &moved).unwrap();
    let err = assert_code(
        &restore(&env2, &archive, &identity, &[]),
        "restore_target_not_empty",
        "non-empty token",
    );
    assert!(err.contains("key store"), "{err}");
    assert_no_store(&env2.db, "non-empty token");
    assert_eq!(common::pkcs11_objects(&env2), objects_before);
    std::fs::rename(&moved, &env2.db).unwrap();
    // With --force: the old database is moved aside, never deleted.
    let out = restore(&env2, &archive, &identity, &["--force", "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let replaced = PathBuf::from(report["replaced"].as_str().unwrap());
    assert!(
        replaced
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("keyward.db.replaced-"),
        "{replaced:?}"
    );
    assert_eq!(std::fs::read(&replaced).unwrap(), db_before);
    let out = env2.run(&["audit", "verify", "--config", env2.config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 10. The issuing key's plaintext, recovered here from the archive…
    let manifest: Value = serde_json::from_slice(&members.last().unwrap().1).unwrap();
    let entry = manifest["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["label"].as_str().unwrap().contains("keyward-ca-devices-"))
        .unwrap();
    assert_eq!(entry["backup"]["kind"], "wrapped", "{manifest}");
    let member = |name: &str| {
        members
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no member {name}"))
            .1
            .clone()
    };
    let kek = age_decrypt(&identity, &member("keys/wrapping-key.age"));
    assert_eq!(kek.len(), 32);
    let wrapped = member(entry["backup"]["member"].as_str().unwrap());
    let kek: [u8; 32] = kek.as_slice().try_into().unwrap();
    let kwp = aes_kw::KwpAes256::new((&kek).into());
    let mut buf = vec![0u8; wrapped.len() - 8];
    let len = kwp.unwrap_key(&wrapped, &mut buf).unwrap().len();
    buf.truncate(len);
    // SoftHSM zero-pads the PKCS#8 DER to a multiple of 8 before wrapping.
    let der_len = {
        use der::{Decode, Reader};
        let mut r = der::SliceReader::new(&buf).unwrap();
        der::asn1::AnyRef::decode(&mut r).unwrap();
        usize::try_from(r.position()).unwrap()
    };
    assert!(buf[der_len..].iter().all(|b| *b == 0));
    buf.truncate(der_len);
    let pkcs8 = buf;

    // …the scan finds it where it is (so it can fail)…
    let canary = tempfile::tempdir().unwrap();
    let pem = der::pem::encode_string("PRIVATE KEY", der::pem::LineEnding::LF, &pkcs8).unwrap();
    std::fs::write(canary.path().join("leak.pem"), &pem).unwrap();
    std::fs::write(canary.path().join("leak.der"), &pkcs8).unwrap();
    assert_eq!(
        plaintext_scan::files_holding(canary.path(), &pkcs8).len(),
        2,
        "the scan misses a planted key"
    );
    assert_eq!(
        files_with(canary.path(), b"PRIVATE KEY-----").len(),
        1,
        "the marker scan misses a planted PEM"
    );
    drop(canary);

    // …and nowhere else: spool, location, both installations (stores, tokens,
    // configs), the work dir, and whatever this test made in the temp dir.
    let mut dirs: Vec<PathBuf> = vec![
        env.path("backups"),
        nas.clone(),
        env.dir.path().to_path_buf(),
        env2.dir.path().to_path_buf(),
        loc.path().to_path_buf(),
        work.path().to_path_buf(),
        officer.path().to_path_buf(),
    ];
    dirs.extend(
        temp_entries()
            .difference(&temp_before)
            .filter(|p| p.is_dir())
            .cloned(),
    );
    for d in &dirs {
        let found = plaintext_scan::files_holding(d, &pkcs8);
        assert!(found.is_empty(), "plaintext key material in {found:?}");
    }
    // No PEM private key in our own dirs (the officer's age identity is not PEM).
    for d in &dirs[..7] {
        let found = files_with(d, b"PRIVATE KEY-----");
        assert!(found.is_empty(), "a PEM private key in {found:?}");
    }
}

/// The value of the sample of `name` whose labels include every `labels` pair (0 if absent).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

fn backup_rows(env: &Env) -> i64 {
    let c = rusqlite::Connection::open(&env.db).unwrap();
    c.query_row("SELECT COUNT(*) FROM backups", [], |r| r.get(0))
        .unwrap()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A full spool disk fails the backup with `backup_disk_full`, leaves no
/// partial file and no row, and is audited and counted; then, on a working
/// spool with retention at its minimum: a byte flipped in the location's
/// copy fails verification there (the spool stays OK), and of three backups
/// the two older are pruned from the store, the spool and the location,
/// each with its own audit event.
#[tokio::test]
async fn full_spool_tampered_replica_and_pruning() {
    let officer = tempfile::tempdir().unwrap();
    let (identity, _, recipients) = officer_keys(officer.path());
    let loc = tempfile::tempdir().unwrap();
    let nas = loc.path().join("nas");
    let env = Env::new();
    let base = std::fs::read_to_string(&env.config).unwrap();

    // 8. The spool is a 64 KiB tmpfs, mostly filled: no archive fits.
    let full_dir = env.path("spool-full");
    let full = Tmpfs::mount(&full_dir, "64k");
    std::fs::write(full_dir.join("filler"), vec![0u8; 48 * 1024]).unwrap();
    env.append_config(
        &backup_section(&recipients, &identity, full_dir.to_str().unwrap(), &nas).replace(
            "keep_daily = 7\nkeep_weekly = 4",
            "keep_daily = 0\nkeep_weekly = 0",
        ),
    );
    env.init();
    let mut daemon = env.serve();
    let url = daemon.url.clone();
    let errors_before = metric(
        &common::metrics_text(&url).await,
        "keyward_backups_total",
        &[("result", "error")],
    );
    let out = keyward_client(&env, &url, &["backup", "create"]);
    assert!(!out.status.success(), "a backup onto a full disk succeeded");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("backup_disk_full"), "{err}");
    assert!(err.contains("disk is full"), "{err}");
    assert_eq!(files_in(&full_dir), ["filler"], "a partial file was left");
    assert_eq!(backup_rows(&env), 0);
    assert!(
        env.audit_after(0)
            .iter()
            .any(|(_, action, outcome)| action == "backup.create" && outcome == "failure"),
        "{:?}",
        env.audit_after(0)
    );
    let errors_after = metric(
        &common::metrics_text(&url).await,
        "keyward_backups_total",
        &[("result", "error")],
    );
    assert_eq!(errors_after, errors_before + 1.0);
    assert!(daemon.stop().success());
    drop(daemon);
    drop(full);

    // A working spool.
    std::fs::write(&env.config, &base).unwrap();
    env.append_config(
        &backup_section(&recipients, &identity, "backups", &nas).replace(
            "keep_daily = 7\nkeep_weekly = 4",
            "keep_daily = 0\nkeep_weekly = 0",
        ),
    );
    let daemon = env.serve();
    let url = daemon.url.clone();
    let spool = env.path("backups");

    // 12. Three backups, retention keeps only the newest.
    let mut made = Vec::new();
    for _ in 0..3 {
        let b = keyward_json(&env, &url, &["backup", "create"]);
        assert_eq!(b["status"], "done", "{b}");
        assert_eq!(b["replicas"][0]["state"], "stored", "{b}");
        made.push(b);
    }
    let all = keyward_json(&env, &url, &["backup", "list", "--all"]);
    let status_of = |id: &Value| {
        all.as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == *id)
            .unwrap_or_else(|| panic!("{id} not listed: {all}"))["status"]
            .clone()
    };
    assert_eq!(status_of(&made[0]["id"]), "pruned", "{all}");
    assert_eq!(status_of(&made[1]["id"]), "pruned", "{all}");
    assert_eq!(status_of(&made[2]["id"]), "done", "{all}");
    let newest = made[2]["file_name"].as_str().unwrap().to_string();
    assert_eq!(files_in(&spool), vec![newest.clone()]);
    assert_eq!(files_in(&nas), vec![newest.clone()]);
    let pruned: Vec<Value> = env
        .audit_details_after(0)
        .into_iter()
        .filter(|e| e.0 == "backup.prune")
        .map(|e| e.3)
        .collect();
    assert_eq!(pruned.len(), 2, "{pruned:?}");
    for old in &made[..2] {
        assert!(
            pruned
                .iter()
                .any(|d| d.to_string().contains(old["id"].as_str().unwrap())),
            "no backup.prune event for {old}: {pruned:?}"
        );
    }

    // 11. A byte flipped in the location's copy.
    let failures_before = metric(
        &common::metrics_text(&url).await,
        "keyward_backup_failures_total",
        &[("location", "nas"), ("stage", "verify")],
    );
    let replica = nas.join(&newest);
    let mut bytes = std::fs::read(&replica).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&replica, &bytes).unwrap();
    let out = keyward_client(&env, &url, &["backup", "verify"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let result = |name: &str| {
        report["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["location"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {report}"))
    };
    assert_eq!(result("spool")["ok"], true, "{report}");
    assert_eq!(result("nas")["ok"], false, "{report}");
    assert_eq!(
        result("nas")["code"],
        "backup_checksum_mismatch",
        "{report}"
    );
    let failures_after = metric(
        &common::metrics_text(&url).await,
        "keyward_backup_failures_total",
        &[("location", "nas"), ("stage", "verify")],
    );
    assert!(
        failures_after > failures_before,
        "{failures_before} -> {failures_after}"
    );
    drop(daemon);
}

// --- A token without key wrapping (in process). ---

use async_trait::async_trait;
use keyward::keystore::{
    Capabilities, GeneratedKey, KeyHandle, KeySpec, KeyStore, KeyStoreError, KeyStores,
};
use keyward::model::KeyAlgorithm;
use std::sync::Arc;

const WRAP_CHILD: &str = "KEYWARD_TEST_NOWRAP_CONFIG";
const WRAP_TARGET: &str = "KEYWARD_TEST_NOWRAP_TARGET";
const WRAP_OFFICER: &str = "KEYWARD_TEST_NOWRAP_OFFICER";

/// A FAKE: the real PKCS#11 key store on SoftHSM2, reporting that it cannot
/// wrap keys. SoftHSM2 always offers CKM_AES_KEY_WRAP_PAD and no real token
/// without it can run here, so the capability is overridden; everything
/// else (keys, signing, listing, destroying) is the real token.
struct NoWrap {
    inner: Arc<dyn KeyStore>,
    caps: Capabilities,
}

impl NoWrap {
    fn new(inner: Arc<dyn KeyStore>) -> Arc<Self> {
        let mut caps = inner.capabilities().clone();
        caps.can_wrap_keys = false;
        Arc::new(Self { inner, caps })
    }
}

#[async_trait]
impl KeyStore for NoWrap {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
    fn planned_handle(&self, spec: &KeySpec) -> KeyHandle {
        self.inner.planned_handle(spec)
    }
    async fn generate(&self, spec: &KeySpec) -> Result<GeneratedKey, KeyStoreError> {
        self.inner.generate(spec).await
    }
    async fn public_key(&self, handle: &KeyHandle) -> Result<Vec<u8>, KeyStoreError> {
        self.inner.public_key(handle).await
    }
    async fn sign(
        &self,
        handle: &KeyHandle,
        algorithm: KeyAlgorithm,
        message: &[u8],
    ) -> Result<Vec<u8>, KeyStoreError> {
        self.inner.sign(handle, algorithm, message).await
    }
    async fn exists(&self, handle: &KeyHandle) -> Result<bool, KeyStoreError> {
        self.inner.exists(handle).await
    }
    async fn protection(
        &self,
        handle: &KeyHandle,
    ) -> Result<keyward::keystore::KeyProtection, KeyStoreError> {
        self.inner.protection(handle).await
    }
    async fn destroy(&self, handle: &KeyHandle) -> Result<(), KeyStoreError> {
        self.inner.destroy(handle).await
    }
    async fn list(&self) -> Result<Vec<(KeyHandle, String)>, KeyStoreError> {
        self.inner.list().await
    }
    async fn health(&self) -> Result<(), KeyStoreError> {
        self.inner.health().await
    }
    async fn close(&self) -> Result<(), KeyStoreError> {
        self.inner.close().await
    }
}

/// A backup of an extractable key through a key store that cannot wrap is
/// refused (`backup_wrap_unsupported`, no file); so is a restore of a
/// wrapped key into one, before anything is written. Runs in a child
/// process whose SOFTHSM2_CONF names the test's tokens.
#[tokio::test]
async fn token_without_wrapping() {
    if let Some(cfg) = std::env::var_os(WRAP_CHILD) {
        return wrap_child(
            Path::new(&cfg),
            Path::new(&std::env::var_os(WRAP_TARGET).unwrap()),
            Path::new(&std::env::var_os(WRAP_OFFICER).unwrap()),
        )
        .await;
    }
    let officer = tempfile::tempdir().unwrap();
    officer_keys(officer.path());
    let env = Env::new();
    env.init();
    // The restore target: a second, empty token next to the first, and no store.
    let target = Env {
        dir: tempfile::tempdir().unwrap(),
        softhsm_conf: env.softhsm_conf.clone(),
        config: env.path("target.toml"),
        db: env.path("target.db"),
        label: "kw-target".into(),
    };
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .args(["--init-token", "--free", "--label", "kw-target", "--so-pin"])
        .arg(common::SO_PIN)
        .arg("--pin")
        .arg(common::PIN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&env.config).unwrap();
    let text = text
        .replace(
            &format!("token_label = \"{}\"", env.label),
            "token_label = \"kw-target\"",
        )
        .replace("path = \"keyward.db\"", "path = \"target.db\"");
    std::fs::write(&target.config, text).unwrap();
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["token_without_wrapping", "--exact", "--nocapture"])
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .env(WRAP_CHILD, &env.config)
        .env(WRAP_TARGET, &target.config)
        .env(WRAP_OFFICER, officer.path())
        .status()
        .unwrap();
    assert!(status.success(), "the in-process part failed");
    // The child really ran (a name filter matching nothing would pass silently).
    let made = files_in(&officer.path().join("spool"));
    assert!(
        made.len() == 1 && made[0].ends_with(".age"),
        "the child made no archive: {made:?}"
    );
    // Checked from outside: nothing on the target token, no store.
    assert_token_empty(&target, "restore through a key store that cannot wrap");
    assert_no_store(&target.db, "restore through a key store that cannot wrap");
    assert!(common::pkcs11_objects(&env).contains("Private Key Object"));
}

async fn wrap_child(config: &Path, target: &Path, officer: &Path) {
    use keyward::backup::create::{Sources, create_archive};
    use keyward::backup::restore::{RestoreOptions, restore};
    let config = keyward::config::Config::load(config).unwrap();
    let clock = Arc::new(keyward::clock::SystemClock);
    let metrics = Arc::new(keyward::metrics::Metrics::new().unwrap());
    let store = keyward::app::open_store(&config, clock, metrics)
        .await
        .unwrap();
    let real = keyward::app::open_keystore("default", &config.keystore)
        .await
        .unwrap();
    let recipients = vec![officer.join("officer-recipients.txt")];
    let now = time::OffsetDateTime::now_utc();

    // Through the fake: refused, and no file (not even a partial one) in the spool.
    let spool = officer.join("spool-nowrap");
    let fake = KeyStores::new(NoWrap::new(real.clone()));
    let src = Sources {
        config: &config,
        store: store.as_ref(),
        keystores: &fake,
    };
    let Err(err) = create_archive(&src, &spool, &recipients, uuid::Uuid::now_v7(), now).await
    else {
        panic!("a backup through a key store that cannot wrap succeeded");
    };
    assert_eq!(err.code(), "backup_wrap_unsupported", "{err}");
    assert!(err.to_string().contains("keyward-ca-devices-"), "{err}");
    assert!(files_in(&spool).is_empty(), "{:?}", files_in(&spool));

    // Through the real store: the issuing key is wrapped in the archive.
    let real_stores = KeyStores::new(real.clone());
    let src = Sources {
        config: &config,
        store: store.as_ref(),
        keystores: &real_stores,
    };
    let written = create_archive(
        &src,
        &officer.join("spool"),
        &recipients,
        uuid::Uuid::now_v7(),
        now,
    )
    .await
    .unwrap();
    assert!(
        written.manifest.keys.iter().any(|k| matches!(
            k.backup,
            keyward::backup::archive::KeyDisposition::Wrapped { .. }
        )),
        "no wrapped key in the archive"
    );

    // Restoring it onto the empty target token through the fake: refused.
    let target_config = keyward::config::Config::load(target).unwrap();
    let target_real = keyward::app::open_keystore("default", &target_config.keystore)
        .await
        .unwrap();
    let target_fake = KeyStores::new(NoWrap::new(target_real.clone()));
    let opts = RestoreOptions {
        archive: written.path.clone(),
        identity_files: vec![officer.join("officer-identity.txt")],
        force: false,
        dry_run: false,
        actor: "test".into(),
        expect_sha256: None,
        expect_root_sha256: None,
    };
    let Err(err) = restore(&target_config, &target_fake, &opts, now).await else {
        panic!("a restore of a wrapped key through a key store that cannot wrap succeeded");
    };
    assert_eq!(err.code(), "backup_wrap_unsupported", "{err}");
    assert!(target_real.list().await.unwrap().is_empty());
    let _ = target_real.close().await;
    let _ = real.close().await;
}

// --- Locations that cannot take the archive (one SeaweedFS). ---

use common::seaweed;

/// Webhook deliveries: the `keyward-event` header of each.
#[derive(Clone, Default)]
struct Hooks(Arc<std::sync::Mutex<Vec<String>>>);

async fn hook(
    axum::extract::State(h): axum::extract::State<Hooks>,
    headers: axum::http::HeaderMap,
) -> &'static str {
    let event = headers
        .get("keyward-event")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    h.0.lock().unwrap().push(event);
    "ok"
}

fn s3_location(name: &str, endpoint: &str, prefix: &str, creds: &str, dir: &Path) -> String {
    format!(
        "\n[[backup.locations]]\nname = \"{name}\"\ntype = \"s3\"\nbucket = \"keyward-backups\"\n\
         prefix = \"{prefix}\"\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\nallow_http = true\n\
         timeout_secs = 5\naccess_key_id_file = \"{}\"\nsecret_access_key_file = \"{}\"\n",
        dir.join(format!("{creds}.id")).display(),
        dir.join(format!("{creds}.key")).display()
    )
}

/// A location on a closed port and one whose credentials may not write:
/// the backup is still made (spool copy), both replicas fail with their
/// error, audited, counted, pending and notified; with the locations
/// fixed and the daemon restarted, the backup job retries them to `stored`.
#[tokio::test]
async fn unreachable_and_read_only_locations_then_retried() {
    let officer = tempfile::tempdir().unwrap();
    let (identity, _, recipients) = officer_keys(officer.path());
    let tmp = tempfile::tempdir().unwrap();
    let mut weed = seaweed::Seaweed::start(
        &tmp.path().join("weed"),
        &[
            seaweed::Identity {
                name: "admin",
                access_key: "keyward-admin".into(),
                secret_key: "admin-secret-0123456789".into(),
                actions: &["Admin", "Read", "List", "Write", "Tagging"],
            },
            seaweed::Identity {
                name: "reader",
                access_key: "keyward-reader".into(),
                secret_key: "reader-secret-0123456789".into(),
                actions: &["Read", "List"],
            },
        ],
    );
    weed.create_bucket("keyward-backups");
    for (tag, id, key) in [
        ("admin", "keyward-admin", "admin-secret-0123456789"),
        ("reader", "keyward-reader", "reader-secret-0123456789"),
    ] {
        std::fs::write(tmp.path().join(format!("{tag}.id")), id).unwrap();
        std::fs::write(tmp.path().join(format!("{tag}.key")), key).unwrap();
    }
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let hooks = Hooks::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(hook).with_state(hooks.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let env = Env::new();
    std::fs::write(env.path("hook.secret"), "webhook-secret-0123456789abcdef").unwrap();
    let base = std::fs::read_to_string(&env.config).unwrap();
    let backup = format!(
        "[backup]\ndir = \"backups\"\nrecipients_files = [\"{}\"]\nverify_identity_file = \"{}\"\n\
         retry_min_secs = 1\nretry_max_secs = 2\n\n\
         [[notify]]\ntype = \"webhook\"\nurl = \"{hook_url}\"\nsecret_file = \"hook.secret\"\n",
        recipients.display(),
        verifier_of(&identity).display(),
    );
    env.append_config(&format!(
        "{backup}{}{}",
        s3_location(
            "down",
            &format!("http://127.0.0.1:{closed}"),
            "down/",
            "admin",
            tmp.path()
        ),
        s3_location("ro", &weed.endpoint, "ro/", "reader", tmp.path()),
    ));
    env.init();
    let mut daemon = env.serve();
    let url = daemon.url.clone();
    // The archive is made, but the command fails: no location stored it.
    let out = keyward_client(&env, &url, &["backup", "create"]);
    assert!(
        !out.status.success(),
        "a backup no location stored was reported a success"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("backup_replica_failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(made["status"], "done", "{made}");
    let file = made["file_name"].as_str().unwrap().to_string();
    assert!(env.path("backups").join(&file).exists(), "no spool copy");
    for r in made["replicas"].as_array().unwrap() {
        assert_eq!(r["state"], "failed", "{made}");
        assert!(
            r["last_error"].as_str().is_some_and(|e| !e.is_empty()),
            "{made}"
        );
    }
    let replicate_failures = env
        .audit_after(0)
        .into_iter()
        .filter(|(_, a, o)| a == "backup.replicate" && o == "failure")
        .count();
    assert_eq!(replicate_failures, 2, "{:?}", env.audit_after(0));
    let metrics = common::metrics_text(&url).await;
    for loc in ["down", "ro"] {
        assert!(
            metric(
                &metrics,
                "keyward_backup_failures_total",
                &[("location", loc), ("stage", "replicate")]
            ) > 0.0,
            "{loc}: {metrics}"
        );
    }
    assert!(metric(&metrics, "keyward_backup_replicas_pending", &[]) > 0.0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let got = hooks.0.lock().unwrap().clone();
        if got.iter().filter(|e| *e == "backup.replica_failed").count() >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no backup.replica_failed notifications: {got:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(daemon.stop().success());
    drop(daemon);

    // Fixed: both at the server, with credentials that may write.
    std::fs::write(&env.config, &base).unwrap();
    env.append_config(&format!(
        "{backup}{}{}",
        s3_location("down", &weed.endpoint, "down/", "admin", tmp.path()),
        s3_location("ro", &weed.endpoint, "ro/", "admin", tmp.path()),
    ));
    let daemon = env.serve();
    let url = daemon.url.clone();
    // The backup job's first tick is one interval (30 s) after start.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let listed = keyward_json(&env, &url, &["backup", "list"]);
        let replicas = listed[0]["replicas"].as_array().unwrap().clone();
        if replicas.iter().all(|r| r["state"] == "stored") {
            assert_eq!(replicas.len(), 2, "{listed}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replicas were never retried: {listed}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let metrics = common::metrics_text(&url).await;
    assert_eq!(
        metric(&metrics, "keyward_backup_replicas_pending", &[]),
        0.0,
        "{metrics}"
    );
    drop(daemon);
}
