//! `keyward dev`: a self-contained demo under one directory — a SoftHSM2
//! token, a SQLite database, config, secrets and policies — then `serve`.
//! Running it again reuses what is there.
//!
//! Dev only: the bootstrap admin token is kept in `DIR/admin.token` (0600)
//! so the `export` lines can be printed again; production uses `keyward init`.

use super::local::write_private;
use crate::softhsm::SoftHsm;
use anyhow::{Context, bail};
use base64::Engine;
use secrecy::SecretString;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitCode};

const CA_POLICY: &str = include_str!("../../policies/ca.toml");
const ENROLLMENT_POLICY: &str = include_str!("../../policies/enrollment.toml");
const ROTATION_POLICY: &str = include_str!("../../policies/rotation.toml");
const TOKEN_LABEL: &str = "keyward-dev";

fn random_text() -> anyhow::Result<String> {
    let bytes = crate::crypto::random_bytes(24)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

fn write_once(path: &Path, make: impl FnOnce() -> anyhow::Result<String>) -> anyhow::Result<()> {
    if !path.exists() {
        write_private(path, make()?.as_bytes())?;
    }
    Ok(())
}

fn read_secret(path: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .trim()
        .to_string())
}

/// The shipped enrollment policy with the `default` group relaxed to one
/// approver, marked as a demo in the file itself.
fn demo_enrollment() -> String {
    format!(
        "# DEMO COPY written by `keyward dev`: the `default` group needs one approver\n\
         # here; the shipped policy asks for two. Do not use in production.\n{}",
        ENROLLMENT_POLICY.replacen("approvals_required = 2", "approvals_required = 1", 1)
    )
}

/// `[server.tls]` of the demo: keyward issues itself a server certificate
/// from the `devices` CA for `localhost` and the listen address.
fn demo_tls(listen: SocketAddr) -> String {
    let ip = listen.ip();
    let ips = if ip.is_unspecified() {
        "\"127.0.0.1\"".to_string()
    } else {
        format!("\"{ip}\"")
    };
    format!(
        "[server.tls]\nissue = true\nissuer = \"devices\"\ndns_names = [\"localhost\"]\nip_addresses = [{ips}]\n\n"
    )
}

/// Writes the root CA certificate to `DIR/root.pem`; returns its path and
/// SHA-256 fingerprint (colon-separated hex, as `openssl x509 -fingerprint -sha256` prints).
async fn export_root(db: &Path, dir: &Path) -> anyhow::Result<(std::path::PathBuf, String)> {
    use crate::store::Store;
    let store = crate::store::sqlite::SqliteStore::open_read_only(db)?;
    let root = store
        .list_cas()
        .await?
        .into_iter()
        .find(|c| c.kind == crate::model::CaKind::Root)
        .context("no root CA in the database")?;
    let path = dir.join("root.pem");
    std::fs::write(&path, crate::ca::x509::to_pem(&root.certificate_der)?)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &root.certificate_der);
    let fingerprint = digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    Ok((path, fingerprint))
}

pub async fn run(dir: &Path, listen: SocketAddr) -> anyhow::Result<ExitCode> {
    let hsm = SoftHsm::prepare(dir)?;
    let dir = dir.canonicalize()?;
    std::fs::create_dir_all(dir.join("policies"))?;
    let softhsm_conf = hsm.conf();
    write_once(&dir.join("hsm.pin"), random_text)?;
    write_once(&dir.join("so.pin"), random_text)?;
    write_once(&dir.join("pepper"), random_text)?;
    // The shipped policy asks for two approvers; a one-person demo cannot
    // meet that, so the demo copy asks for one, and says so.
    let enrollment = demo_enrollment();
    if ENROLLMENT_POLICY.contains("approvals_required = 2") {
        eprintln!(
            "keyward dev: demo policy: the `default` group needs ONE approver here \
             (the shipped policies/enrollment.toml asks for two)"
        );
    }
    for (name, text) in [
        ("ca.toml", CA_POLICY),
        ("enrollment.toml", enrollment.as_str()),
        ("rotation.toml", ROTATION_POLICY),
    ] {
        let p = dir.join("policies").join(name);
        if !p.exists() {
            std::fs::write(&p, text)?;
        }
    }
    // Backups of the demo go to DIR/backups, encrypted to two demo age
    // keys made once (their identities stay in DIR, mode 0600, like the
    // PIN): the officer's, which restores, and the daemon's verification
    // key, which only checks archives (the CA keys' wrapping key is never
    // sealed to it).
    let new_identity = || {
        use secrecy::ExposeSecret as _;
        Ok(age::x25519::Identity::generate()
            .to_string()
            .expose_secret()
            .to_string())
    };
    let backup_identity = dir.join("backup-identity.txt");
    let verify_identity = dir.join("backup-verify.txt");
    write_once(&backup_identity, new_identity)?;
    write_once(&verify_identity, new_identity)?;
    let recipients = dir.join("backup-recipients.txt");
    if !recipients.exists() {
        let public = |path: &Path| -> anyhow::Result<String> {
            let id: age::x25519::Identity = read_secret(path)?
                .parse()
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            Ok(id.to_public().to_string())
        };
        std::fs::write(
            &recipients,
            format!(
                "# keyward dev: the demo backup officer\n{}\n# keyward dev: the daemon's verification key\n{}\n",
                public(&backup_identity)?,
                public(&verify_identity)?
            ),
        )?;
    }
    let config = dir.join("keyward.toml");
    std::fs::write(
        &config,
        format!(
            "# Written by `keyward dev`; rewritten on every run.\n\
             [server]\nlisten = \"{listen}\"\n\n{}\
             [store]\ntype = \"sqlite\"\npath = \"keyward.db\"\n\n\
             [keystore]\ntype = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{TOKEN_LABEL}\"\npin_file = \"hsm.pin\"\n\n\
             [auth]\ntoken_pepper_file = \"pepper\"\n\n\
             [policies]\ndir = \"policies\"\n\n\
             [backup]\ndir = \"backups/spool\"\nrecipients_files = [\"backup-recipients.txt\"]\n\
             verify_identity_file = \"backup-verify.txt\"\nschedule = \"0 2 * * *\"\nverify_schedule = \"30 2 * * *\"\n\n\
             [[backup.locations]]\nname = \"local\"\ntype = \"dir\"\npath = \"backups/replica\"\n",
            demo_tls(listen),
            hsm.module().display()
        ),
    )?;

    if !hsm.has_tokens()? {
        hsm.create_token(
            TOKEN_LABEL,
            &SecretString::from(read_secret(&dir.join("so.pin"))?),
            &SecretString::from(read_secret(&dir.join("hsm.pin"))?),
        )?;
        eprintln!(
            "created SoftHSM2 token `{TOKEN_LABEL}` in {}",
            dir.join("tokens").display()
        );
    }

    let exe = std::env::current_exe().context("cannot locate the keyward binary")?;
    let token_file = dir.join("admin.token");
    let mut init = Command::new(&exe);
    init.env("SOFTHSM2_CONF", softhsm_conf)
        .arg("init")
        .arg("--config")
        .arg(&config);
    if !token_file.exists() {
        init.arg("--token-out").arg(&token_file);
    }
    let status = init.status().context("cannot run keyward init")?;
    if !status.success() {
        bail!("keyward init failed");
    }
    let token = read_secret(&token_file)?;
    let (root_pem, fingerprint) = export_root(&dir.join("keyward.db"), &dir).await?;
    let host = if listen.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], listen.port()))
    } else {
        listen
    };
    println!();
    println!("# keyward dev is serving HTTPS; its certificate chains to the root CA");
    println!("# SHA-256 fingerprint {fingerprint}");
    println!("# in another shell paste:");
    println!("export KEYWARD_URL=https://{host}");
    println!("export KEYWARD_CA_CERT={}", root_pem.display());
    println!("export KEYWARD_TOKEN={token}");
    println!(
        "export PATH={}:$PATH",
        exe.parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    println!(
        "# backups: `keyward backup create`; archives in {} decrypt with `age -d -i {}`",
        dir.join("backups").display(),
        backup_identity.display()
    );
    println!();

    let mut serve = Command::new(&exe);
    serve
        .env("SOFTHSM2_CONF", softhsm_conf)
        .arg("serve")
        .arg("--config")
        .arg(&config);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let err = serve.exec();
        bail!("cannot exec keyward serve: {err}");
    }
    #[cfg(not(unix))]
    {
        let status = serve.status()?;
        Ok(if status.success() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}
