//! `keyward dev`: a self-contained demo under one directory — a SoftHSM2
//! token, a SQLite database, config, secrets and policies — then `serve`.
//! Running it again reuses what is there.
//!
//! Dev only: the bootstrap admin token is kept in `DIR/admin.token` (0600)
//! so the `export` lines can be printed again; production uses `keyward init`.

use super::local::write_private;
use anyhow::{Context, bail};
use base64::Engine;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const CA_POLICY: &str = include_str!("../../policies/ca.toml");
const ENROLLMENT_POLICY: &str = include_str!("../../policies/enrollment.toml");
const TOKEN_LABEL: &str = "keyward-dev";

const MODULE_CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

fn random_text() -> anyhow::Result<String> {
    let bytes = crate::auth::random_bytes(24)?;
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

pub fn run(dir: &Path, listen: SocketAddr) -> anyhow::Result<ExitCode> {
    let module = MODULE_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context(
            "SoftHSM2 is not installed (libsofthsm2.so not found): apt-get install softhsm2",
        )?;
    std::fs::create_dir_all(dir.join("tokens"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::create_dir_all(dir.join("policies"))?;
    let dir = dir.canonicalize()?;
    let softhsm_conf = dir.join("softhsm2.conf");
    std::fs::write(
        &softhsm_conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            dir.join("tokens").display()
        ),
    )?;
    write_once(&dir.join("hsm.pin"), random_text)?;
    write_once(&dir.join("so.pin"), random_text)?;
    write_once(&dir.join("pepper"), random_text)?;
    for (name, text) in [
        ("ca.toml", CA_POLICY),
        ("enrollment.toml", ENROLLMENT_POLICY),
    ] {
        let p = dir.join("policies").join(name);
        if !p.exists() {
            std::fs::write(&p, text)?;
        }
    }
    let config = dir.join("keyward.toml");
    std::fs::write(
        &config,
        format!(
            "# Written by `keyward dev`; rewritten on every run.\n\
             [server]\nlisten = \"{listen}\"\n\n\
             [store]\ntype = \"sqlite\"\npath = \"keyward.db\"\n\n\
             [keystore]\ntype = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{TOKEN_LABEL}\"\npin_file = \"hsm.pin\"\n\n\
             [auth]\ntoken_pepper_file = \"pepper\"\n\n\
             [policies]\ndir = \"policies\"\n",
            module.display()
        ),
    )?;

    let has_token = std::fs::read_dir(dir.join("tokens"))?
        .any(|e| e.map(|e| e.path().is_dir()).unwrap_or(false));
    if !has_token {
        // softhsm2-util takes PINs only as arguments or at a prompt; acceptable for a local demo token.
        let status = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &softhsm_conf)
            .args(["--init-token", "--free", "--label", TOKEN_LABEL, "--so-pin"])
            .arg(read_secret(&dir.join("so.pin"))?)
            .arg("--pin")
            .arg(read_secret(&dir.join("hsm.pin"))?)
            .stdout(std::process::Stdio::null())
            .status()
            .context("cannot run softhsm2-util (apt-get install softhsm2)")?;
        if !status.success() {
            bail!("softhsm2-util --init-token failed");
        }
        eprintln!(
            "created SoftHSM2 token `{TOKEN_LABEL}` in {}",
            dir.join("tokens").display()
        );
    }

    let exe = std::env::current_exe().context("cannot locate the keyward binary")?;
    let token_file = dir.join("admin.token");
    let mut init = Command::new(&exe);
    init.env("SOFTHSM2_CONF", &softhsm_conf)
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
    println!();
    println!("# keyward dev is serving; in another shell paste:");
    println!("export KEYWARD_URL=http://{listen}");
    println!("export KEYWARD_TOKEN={token}");
    println!(
        "export PATH={}:$PATH",
        exe.parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    println!();

    let mut serve = Command::new(&exe);
    serve
        .env("SOFTHSM2_CONF", &softhsm_conf)
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
