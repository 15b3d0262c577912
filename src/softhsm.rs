//! Dev and test support: private SoftHSM2 token directories and tokens, for
//! `keyward dev`, the test suites and the benchmark. Never used by `serve`.
//!
//! SoftHSM2 reads its config file from `SOFTHSM2_CONF` once, at
//! `C_Initialize`, and sees only the tokens that existed then. So a token
//! directory is a [`SoftHsm`] value: a directory with its own
//! `softhsm2.conf`, whose path every process using it gets in
//! `SOFTHSM2_CONF` ([`SoftHsm::conf`]). Tokens are made either by a
//! `softhsm2-util` child ([`SoftHsm::create_token`], for a process that does
//! not load the module itself), or through PKCS#11 in a process that already
//! runs with the right `SOFTHSM2_CONF` ([`init_token_in_process`]).
//!
//! `softhsm2-util` takes PINs only as arguments or from a terminal, so
//! [`SoftHsm::create_token`] puts the SO and user PIN of a throwaway dev or
//! test token on its command line for the moment it runs. Production tokens
//! are made by the operator (docs/operations.md), not by this module.

use cryptoki::context::Pkcs11;
use cryptoki::session::UserType;
use secrecy::{ExposeSecret, SecretString};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// Where distributions install the SoftHSM2 PKCS#11 module.
const MODULE_CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

#[derive(Debug, thiserror::Error)]
pub enum SoftHsmError {
    #[error("SoftHSM2 is not installed (libsofthsm2.so not found): apt-get install softhsm2")]
    ModuleNotFound,
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run softhsm2-util (apt-get install softhsm2)")]
    Tool(#[source] std::io::Error),
    /// `stderr` is the tool's own output, kept for the operator.
    #[error("softhsm2-util --init-token for `{label}` failed ({status}): {stderr}")]
    InitFailed {
        label: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("SoftHSM2 offers no uninitialised slot")]
    NoFreeSlot,
    #[error("PKCS#11 call failed while creating token `{label}`")]
    Pkcs11 {
        label: String,
        #[source]
        source: cryptoki::error::Error,
    },
}

impl SoftHsmError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::ModuleNotFound => "softhsm_not_installed",
            Self::Io { .. } => "softhsm_io",
            Self::Tool(_) => "softhsm_tool_missing",
            Self::InitFailed { .. } => "softhsm_init_failed",
            Self::NoFreeSlot => "softhsm_no_free_slot",
            Self::Pkcs11 { .. } => "softhsm_pkcs11",
        }
    }
}

/// The installed SoftHSM2 PKCS#11 module.
pub fn module_path() -> Result<PathBuf, SoftHsmError> {
    MODULE_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or(SoftHsmError::ModuleNotFound)
}

/// A private SoftHSM2 token directory and the config file that points at it.
#[derive(Debug, Clone)]
pub struct SoftHsm {
    conf: PathBuf,
    tokens: PathBuf,
    module: PathBuf,
}

impl SoftHsm {
    /// Makes `dir/tokens` and (re)writes `dir/softhsm2.conf` pointing at it.
    /// Tokens already in the directory are kept.
    pub fn prepare(dir: &Path) -> Result<Self, SoftHsmError> {
        let module = module_path()?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SoftHsmError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let dir = dir.canonicalize().map_err(io(dir))?;
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).map_err(io(&tokens))?;
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .map_err(io(&conf))?;
        Ok(Self {
            conf,
            tokens,
            module,
        })
    }

    /// The value of `SOFTHSM2_CONF` for every process that uses these tokens.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The PKCS#11 module (`module =` in keyward.toml).
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// Whether any token has been created in this directory.
    pub fn has_tokens(&self) -> Result<bool, SoftHsmError> {
        let entries = std::fs::read_dir(&self.tokens).map_err(|source| SoftHsmError::Io {
            path: self.tokens.clone(),
            source,
        })?;
        Ok(entries.filter_map(Result::ok).any(|e| e.path().is_dir()))
    }

    /// Creates a token on the free slot with a `softhsm2-util` child (see
    /// the module doc for why the PINs are on its command line).
    pub fn create_token(
        &self,
        label: &str,
        so_pin: &SecretString,
        user_pin: &SecretString,
    ) -> Result<(), SoftHsmError> {
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &self.conf)
            .args(["--init-token", "--free", "--label", label, "--so-pin"])
            .arg(so_pin.expose_secret())
            .arg("--pin")
            .arg(user_pin.expose_secret())
            .output()
            .map_err(SoftHsmError::Tool)?;
        if !out.status.success() {
            return Err(SoftHsmError::InitFailed {
                label: label.to_string(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }
}

/// Creates a token on SoftHSM2's free slot through PKCS#11: initialise it
/// with the SO PIN, then set the user PIN. For a process whose
/// `SOFTHSM2_CONF` already names the token directory and which has `ctx`
/// initialised; the new token is visible to it at once. Calls are serialised
/// so that two threads never claim the same free slot.
pub fn init_token_in_process(
    ctx: &Pkcs11,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<(), SoftHsmError> {
    static SLOT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = SLOT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let pkcs11 = |source| SoftHsmError::Pkcs11 {
        label: label.to_string(),
        source,
    };
    let slot = ctx
        .get_all_slots()
        .map_err(pkcs11)?
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|i| !i.token_initialized())
                .unwrap_or(false)
        })
        .ok_or(SoftHsmError::NoFreeSlot)?;
    ctx.init_token(slot, so_pin, label).map_err(pkcs11)?;
    let session = ctx.open_rw_session(slot).map_err(pkcs11)?;
    session.login(UserType::So, Some(so_pin)).map_err(pkcs11)?;
    session.init_pin(user_pin).map_err(pkcs11)?;
    session.logout().map_err(pkcs11)?;
    Ok(())
}
