//! Backups, end to end: a running daemon with devices is backed up, then
//! its database and its token are destroyed and the archive is restored
//! into a fresh SoftHSM2 token and an empty store. Checked with tools
//! keyward did not write: the stock `age` CLI (decrypts the archive, with
//! an X25519 and an ssh-ed25519 identity), `tar`, `openssl verify`,
//! `openssl crl`, and OpenSC's `pkcs11-tool`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::seaweed::{Identity, Seaweed};
use common::{Env, call, issue_device};
use reqwest::Method;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// age and SSH key pairs made by the stock tools: (age identity file,
/// ssh private key file, recipients file with both public keys).
fn backup_keys(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let id = dir.join("backup-identity.txt");
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
    let age_recipient = String::from_utf8(out.stdout).unwrap();
    let ssh = dir.join("backup-ssh");
    let out = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "backup-officer",
            "-f",
        ])
        .arg(&ssh)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ssh_recipient = std::fs::read_to_string(dir.join("backup-ssh.pub")).unwrap();
    let recipients = dir.join("backup-recipients.txt");
    std::fs::write(
        &recipients,
        format!(
            "# the backup officers\n{}\n{}",
            age_recipient.trim(),
            ssh_recipient.trim()
        ),
    )
    .unwrap();
    (id, ssh, recipients)
}

/// The `[backup]` section: a directory location `nas` and an S3 location
/// `offsite` (SeaweedFS at `endpoint`, credentials read from files).
fn backup_section(
    recipients: &Path,
    identity: &Path,
    nas: &Path,
    endpoint: &str,
    creds: &Path,
) -> String {
    format!(
        "[backup]\ndir = \"backups\"\nrecipients_files = [\"{}\"]\nverify_identity_file = \"{}\"\n\
         keep_daily = 7\nkeep_weekly = 4\n\n[[backup.locations]]\nname = \"nas\"\ntype = \"dir\"\npath = \"{}\"\n\n\
         [[backup.locations]]\nname = \"offsite\"\ntype = \"s3\"\nbucket = \"keyward-backups\"\nprefix = \"prod\"\n\
         endpoint = \"{endpoint}\"\nallow_http = true\naccess_key_id_file = \"{}\"\nsecret_access_key_file = \"{}\"\ntimeout_secs = 60\n",
        recipients.display(),
        identity.display(),
        nas.display(),
        creds.join("s3-key").display(),
        creds.join("s3-secret").display(),
    )
}

/// Decrypts with the stock age CLI and lists the tar members.
fn age_tar_list(archive: &Path, identity: &Path) -> Vec<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "age -d -i '{}' '{}' | tar -t",
            identity.display(),
            archive.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn age_tar_member(archive: &Path, identity: &Path, member: &str) -> Vec<u8> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "age -d -i '{}' '{}' | tar -xO '{member}'",
            identity.display(),
            archive.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

async fn get_bytes(url: &str) -> Vec<u8> {
    get_bytes_with(&common::client(), url).await
}

fn keyward_json(env: &Env, url: &str, token: &Path, args: &[&str]) -> Value {
    let out = env
        .keyward()
        .args(args)
        .args(["--url", url, "--token-file"])
        .arg(token)
        .args(["--output", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keyward {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn disaster_recovery_onto_a_fresh_token() {
    let keys_dir = tempfile::tempdir().unwrap();
    let (identity, ssh_key, recipients) = backup_keys(keys_dir.path());
    let nas = keys_dir.path().join("nas");
    // The off-site copy: a real S3-compatible server.
    let mut weed = Seaweed::start(
        &keys_dir.path().join("weed"),
        &[Identity {
            name: "backup-writer",
            access_key: "keyward-backup".into(),
            secret_key: "backup-secret-0123456789".into(),
            actions: &["Read", "List", "Write"],
        }],
    );
    weed.create_bucket("keyward-backups");
    std::fs::write(keys_dir.path().join("s3-key"), "keyward-backup\n").unwrap();
    std::fs::write(
        keys_dir.path().join("s3-secret"),
        "backup-secret-0123456789\n",
    )
    .unwrap();
    let section =
        |nas: &Path| backup_section(&recipients, &identity, nas, &weed.endpoint, keys_dir.path());

    // --- The original installation, with two devices. ---
    let env = Env::new();
    env.append_config(&section(&nas));
    let token = env.init();
    let token_file = env.path("admin.token");
    let mut daemon = env.serve();
    let url = daemon.url.clone();
    let old_a = issue_device(&url, &token, &env.path("dev-a"), "old-a").await;
    let old_b = issue_device(&url, &token, &env.path("dev-b"), "old-b").await;
    let root_before = get_bytes(&format!("{url}/v1/ca/root/certificate")).await;

    let made = keyward_json(&env, &url, &token_file, &["backup", "create"]);
    assert_eq!(made["status"], "done", "{made}");
    let file = made["file_name"].as_str().unwrap().to_string();
    assert_eq!(made["replicas"][0]["location"], "nas", "{made}");
    assert_eq!(made["replicas"][0]["state"], "stored", "{made}");
    assert_eq!(made["replicas"][1]["location"], "offsite", "{made}");
    assert_eq!(made["replicas"][1]["state"], "stored", "{made}");
    let archive = nas.join(&file);
    assert!(archive.exists());
    // The spool copy and the replica are the same bytes.
    assert_eq!(
        std::fs::read(&archive).unwrap(),
        std::fs::read(env.path("backups").join(&file)).unwrap()
    );

    // The stock age CLI decrypts it with either recipient's identity.
    let members = age_tar_list(&archive, &identity);
    assert_eq!(
        members.last().map(String::as_str),
        Some("MANIFEST.json"),
        "{members:?}"
    );
    assert!(
        members.iter().any(|m| m.starts_with("store/certificates/")),
        "{members:?}"
    );
    assert!(
        members.iter().any(|m| m == "keys/wrapping-key.age"),
        "{members:?}"
    );
    assert!(
        members.iter().any(|m| m == "config/keyward.toml"),
        "{members:?}"
    );
    assert!(
        members.iter().any(|m| m == "policies/ca.toml"),
        "{members:?}"
    );
    assert_eq!(age_tar_list(&archive, &ssh_key), members);
    let manifest: Value =
        serde_json::from_slice(&age_tar_member(&archive, &identity, "MANIFEST.json")).unwrap();
    assert_eq!(manifest["format_version"], 1);
    let key = |label_part: &str| {
        manifest["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["label"].as_str().unwrap().contains(label_part))
            .cloned()
            .unwrap_or_else(|| panic!("no key {label_part} in {manifest}"))
    };
    assert_eq!(
        key("keyward-ca-devices-")["backup"]["kind"],
        "wrapped",
        "{manifest}"
    );
    assert_eq!(
        key("keyward-ca-root-")["backup"]["kind"],
        "hardware-bound",
        "{manifest}"
    );
    // Every member's hash in the manifest matches what age + tar give.
    for m in members.iter().filter(|m| *m != "MANIFEST.json") {
        let bytes = age_tar_member(&archive, &identity, m);
        let want = manifest["members"][m.as_str()]["sha256"].as_str().unwrap();
        assert_eq!(
            hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes)),
            want,
            "{m}"
        );
    }
    // The wrapping key inside is itself age-encrypted: tar -x puts no usable key on disk.
    let sealed = age_tar_member(&archive, &identity, "keys/wrapping-key.age");
    assert!(
        sealed.starts_with(b"age-encryption.org/v1"),
        "the wrapping key is not sealed"
    );

    // Verification: spool and nas, fully (decrypted, every hash).
    let verified = keyward_json(&env, &url, &token_file, &["backup", "verify"]);
    let results = verified["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{verified}");
    for r in results {
        assert_eq!(
            (r["ok"].as_bool(), r["depth"].as_str()),
            (Some(true), Some("full")),
            "{verified}"
        );
    }
    let listed = keyward_json(&env, &url, &token_file, &["backup", "list"]);
    assert!(
        listed[0]["replicas"][0]["verified_at"].is_string(),
        "{listed}"
    );

    // A restore is refused while a daemon serves this store, even forced.
    let out = env.run(&[
        "backup",
        "restore",
        "--config",
        env.config.to_str().unwrap(),
        "--identity-file",
        ssh_key.to_str().unwrap(),
        "--force",
        archive.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("restore_daemon_running"), "{err}");
    assert!(
        !std::fs::read_dir(env.dir.path()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".replaced-")),
        "the live database was moved aside"
    );

    // --- Disaster: the machine, its database and its token are gone. ---
    assert!(daemon.stop().success());
    drop(daemon);
    let old_root = keys_dir.path().join("root.pem");
    let der = keys_dir.path().join("root.der");
    std::fs::write(&der, &root_before).unwrap();
    let out = Command::new("openssl")
        .args(["x509", "-inform", "DER", "-in"])
        .arg(&der)
        .arg("-out")
        .arg(&old_root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spool_copy = env.path("backups").join(&file);
    let old_chain = keys_dir.path().join("old-chain.pem");
    std::fs::copy(&old_a.chain, &old_chain).unwrap();
    let old_a_cert = keys_dir.path().join("old-a.pem");
    std::fs::copy(&old_a.cert, &old_a_cert).unwrap();
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .args(["--delete-token", "--token", &env.label])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(env);

    // --- A new machine: a fresh token, an empty store, the same pepper. ---
    let env2 = Env::new();
    env2.append_config(&section(&keys_dir.path().join("nas2")));
    assert!(!env2.db.exists());
    // The archive comes back from the off-site bucket (the newest there).
    let saved_archive = keys_dir.path().join("fetched.age");
    let out = env2.run(&[
        "backup",
        "fetch",
        "--config",
        env2.config.to_str().unwrap(),
        "--location",
        "offsite",
        "--out",
        saved_archive.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&file),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !spool_copy.exists(),
        "the old machine's spool should be gone"
    );
    assert_eq!(
        std::fs::read(&saved_archive).unwrap(),
        std::fs::read(&archive).unwrap()
    );
    // A dry run says what it would do and changes nothing.
    let dry = env2.run(&[
        "backup",
        "restore",
        "--config",
        env2.config.to_str().unwrap(),
        "--identity-file",
        identity.to_str().unwrap(),
        "--dry-run",
        "--output",
        "json",
        saved_archive.to_str().unwrap(),
    ]);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let dry: Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(dry["dry_run"], true);
    assert!(!env2.db.exists(), "a dry run wrote the store");
    assert!(
        !common::pkcs11_objects(&env2).contains("Private Key Object"),
        "a dry run touched the token"
    );

    // The daemon's verification identity decrypts the archive but not the
    // key that wraps the CA keys: it stays online, so that key is never
    // sealed to it. A restore with it alone fails and changes nothing.
    let out = env2.run(&[
        "backup",
        "restore",
        "--config",
        env2.config.to_str().unwrap(),
        "--identity-file",
        identity.to_str().unwrap(),
        saved_archive.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key-wrapping key"), "{err}");
    assert!(!env2.db.exists(), "a failed restore wrote the store");
    assert!(
        !common::pkcs11_objects(&env2).contains("Object"),
        "a failed restore touched the token"
    );

    // Pins: an archive other than the one recorded, or a hierarchy that
    // does not chain to the expected root, is refused, changing nothing.
    let root_sha256 = hex::encode(ring::digest::digest(&ring::digest::SHA256, &root_before));
    for (flag, value, code) in [
        (
            "--expect-sha256",
            "00".repeat(32),
            "backup_not_the_expected",
        ),
        (
            "--expect-root-sha256",
            "11".repeat(32),
            "backup_not_the_expected",
        ),
    ] {
        let out = env2.run(&[
            "backup",
            "restore",
            "--config",
            env2.config.to_str().unwrap(),
            "--identity-file",
            ssh_key.to_str().unwrap(),
            flag,
            &value,
            saved_archive.to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{flag} accepted a wrong value");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(code), "{flag}: {err}");
        assert!(
            !env2.db.exists(),
            "{flag}: a refused restore wrote the store"
        );
        assert!(
            !common::pkcs11_objects(&env2).contains("Object"),
            "{flag}: a refused restore left keys on the token"
        );
    }

    let sha_pin = made["sha256"].as_str().unwrap().to_string();
    let out = env2.run(&[
        "backup",
        "restore",
        "--config",
        env2.config.to_str().unwrap(),
        "--expect-sha256",
        &sha_pin,
        "--expect-root-sha256",
        &root_sha256,
        "--identity-file",
        ssh_key.to_str().unwrap(),
        "--output",
        "json",
        saved_archive.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let outcome = |label_part: &str| {
        report["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["label"].as_str().unwrap().contains(label_part))
            .map(|k| k["outcome"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(outcome("keyward-ca-devices-"), "unwrapped", "{report}");
    assert_eq!(outcome("keyward-ca-root-"), "missing", "{report}");
    // The restored issuing key is sensitive on the new token: never readable.
    let objects = common::pkcs11_objects(&env2);
    let private: Vec<&str> = objects.split("Private Key Object").skip(1).collect();
    // The issuing CA's key, the audit key (extractable by wrapping, so
    // that checkpoints go on being signed by the same key) and the
    // audit-encryption key (so that sealed audit details stay readable),
    // restored decrypt-only, and the token-signing key (so that tokens
    // signed before the disaster still verify with the published JWKS).
    assert_eq!(private.len(), 4, "{objects}");
    // A chunk runs on to the next private key, so it may hold other
    // objects' public halves: the private key's own label comes first.
    let encryption = private
        .iter()
        .find(|p| {
            p.lines()
                .find(|l| l.trim_start().starts_with("label:"))
                .is_some_and(|l| l.trim_end().ends_with("keyward-audit-encryption"))
        })
        .unwrap_or_else(|| panic!("{objects}"));
    let usage = encryption
        .lines()
        .find(|l| l.trim_start().starts_with("Usage:"))
        .unwrap_or_default();
    assert!(
        usage.contains("decrypt") && !usage.contains("sign"),
        "{encryption}"
    );
    assert!(private.iter().all(|p| p.contains("sensitive")), "{objects}");
    assert!(
        private.iter().any(|p| p.contains("keyward-ca-devices-"))
            && private.iter().any(|p| p.contains("keyward-audit"))
            && private.iter().any(|p| p.contains("keyward-token-signing")),
        "{objects}"
    );

    // A second restore over it is refused and changes nothing.
    let again = env2.run(&[
        "backup",
        "restore",
        "--config",
        env2.config.to_str().unwrap(),
        "--identity-file",
        identity.to_str().unwrap(),
        saved_archive.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--force"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // --- The restored daemon: same root, old devices, new issuance. ---
    let daemon2 = env2.serve();
    let url2 = daemon2.url.clone();
    let root_after = get_bytes(&format!("{url2}/v1/ca/root/certificate")).await;
    assert_eq!(root_after, root_before, "the root changed");
    let (status, dev) = call(
        Method::GET,
        &format!("{url2}/v1/admin/devices/{}", old_b.device_id),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 200, "{dev}");
    let fresh = issue_device(&url2, &token, &env2.path("dev-new"), "after-restore").await;
    let (ok, out) = common::openssl_verify(&old_root, &fresh.chain, &fresh.cert);
    assert!(
        ok,
        "a certificate issued after the restore does not chain to the old root: {out}"
    );
    let (ok, out) = common::openssl_verify(&old_root, &old_chain, &old_a_cert);
    assert!(ok, "{out}");
    // The old device is revocable, and the CRL says so.
    let (status, v) = call(
        Method::POST,
        &format!("{url2}/v1/admin/devices/{}/revoke", old_a.device_id),
        Some(&token),
        Some(serde_json::json!({ "reason": "keyCompromise" })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let crl_file = env2.path("devices.crl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        std::fs::write(
            &crl_file,
            get_bytes(&format!("{url2}/v1/ca/devices/crl")).await,
        )
        .unwrap();
        let out = Command::new("openssl")
            .args(["crl", "-inform", "DER", "-noout", "-text", "-in"])
            .arg(&crl_file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains(&format!("Serial Number: {}", old_a.serial)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked old device never reached the CRL: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    drop(daemon2);

    // The whole chain verifies, and the restore is in it, after the restored events.
    let out = env2.run(&["audit", "verify", "--config", env2.config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let events = env2.audit_details_after(0);
    let restore_at = events
        .iter()
        .position(|e| e.0 == "backup.restore")
        .expect("no backup.restore event");
    assert!(
        events[..restore_at]
            .iter()
            .any(|e| e.0 == "certificate.issue" || e.0.starts_with("registration")),
        "the restored chain is not before the restore"
    );
    assert_eq!(
        events[restore_at].3["backup_id"], made["id"],
        "{:?}",
        events[restore_at]
    );
}

/// A reqwest client that trusts only `root` (PEM).
fn https_client(root: &Path) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = reqwest::Certificate::from_pem_bundle(&std::fs::read(root).unwrap()).unwrap();
    reqwest::Client::builder()
        .tls_certs_only(certs)
        .build()
        .unwrap()
}

/// The serial of the certificate a TLS server presents, by `openssl s_client`.
fn served_serial(url: &str, root: &Path) -> String {
    let addr = url.trim_start_matches("https://").trim_end_matches('/');
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {addr} -CAfile '{}' -verify_return_error </dev/null 2>/dev/null | openssl x509 -noout -serial",
            root.display()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.starts_with("serial="),
        "{text}"
    );
    text.trim().trim_start_matches("serial=").to_string()
}

#[tokio::test]
async fn a_restored_daemon_issues_itself_a_new_tls_server_key() {
    const TLS: &str = "\n[server.tls]\nissue = true\nissuer = \"devices\"\ndns_names = [\"localhost\"]\nip_addresses = [\"127.0.0.1\"]\n";
    let keys_dir = tempfile::tempdir().unwrap();
    let (identity, _, recipients) = backup_keys(keys_dir.path());
    let section = format!(
        "[backup]\ndir = \"backups\"\nrecipients_files = [\"{}\"]\n\n[[backup.locations]]\nname = \"nas\"\ntype = \"dir\"\npath = \"{}\"\n{TLS}",
        recipients.display(),
        keys_dir.path().join("nas").display()
    );
    let env = Env::new();
    env.append_config(&section);
    env.init();
    let daemon = env.serve();
    let root = keys_dir.path().join("root.pem");
    let der = get_bytes_with(
        &https_client_unverified(),
        &format!("{}/v1/ca/root/certificate", daemon.url),
    )
    .await;
    std::fs::write(keys_dir.path().join("root.der"), &der).unwrap();
    let out = Command::new("openssl")
        .args(["x509", "-inform", "DER", "-in"])
        .arg(keys_dir.path().join("root.der"))
        .arg("-out")
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success());
    let old_serial = served_serial(&daemon.url, &root);
    let made = env
        .keyward()
        .args([
            "backup",
            "create",
            "--output",
            "json",
            "--url",
            &daemon.url,
            "--ca-cert",
        ])
        .arg(&root)
        .arg("--token-file")
        .arg(env.path("admin.token"))
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let made: Value = serde_json::from_slice(&made.stdout).unwrap();
    let archive = keys_dir
        .path()
        .join("nas")
        .join(made["file_name"].as_str().unwrap());
    drop(daemon);
    drop(env);

    let env2 = Env::new();
    env2.append_config(&section.replace("/nas\"", "/nas2\""));
    let out = env2.run(&[
        "backup",
        "restore",
        "--config",
        env2.config.to_str().unwrap(),
        "--identity-file",
        identity.to_str().unwrap(),
        "--output",
        "json",
        archive.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tls = report["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["purpose"] == "tls-server")
        .unwrap_or_else(|| panic!("no TLS server key in {report}"));
    assert_eq!(tls["outcome"], "replaced-at-start", "{report}");
    // The restored daemon serves HTTPS again, with a new certificate that
    // chains to the same root (s_client verifies it against the old root).
    let daemon2 = env2.serve();
    let new_serial = served_serial(&daemon2.url, &root);
    assert_ne!(new_serial, old_serial);
    let resp = https_client(&root)
        .get(format!("{}/healthz", daemon2.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

fn https_client_unverified() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .build()
        .unwrap()
}

async fn get_bytes_with(client: &reqwest::Client, url: &str) -> Vec<u8> {
    let resp = client.get(url).send().await.unwrap();
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
    resp.bytes().await.unwrap().to_vec()
}
