//! The PKCS#11 module and the token: one `C_Initialize` per module per process, and the token
//! found by label, serial or URI, never by slot index.

use super::uri::Pkcs11Uri;
use crate::keystore::{KeyStoreError, TokensPresent};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::slot::{Slot, TokenInfo};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// How the token is chosen: by label, serial or URI, never by slot index
/// (SoftHSM moves tokens to random slot ids).
#[derive(Debug, Clone)]
pub enum TokenSelector {
    Label(String),
    Serial(String),
    Uri(Pkcs11Uri),
}

impl TokenSelector {
    fn matches(&self, info: &TokenInfo) -> bool {
        match self {
            Self::Label(l) => info.label().trim() == l,
            Self::Serial(s) => info.serial_number().trim() == s,
            Self::Uri(u) => {
                u.token().is_none_or(|t| info.label().trim() == t)
                    && u.serial().is_none_or(|s| info.serial_number().trim() == s)
                    && u.manufacturer()
                        .is_none_or(|m| info.manufacturer_id().trim() == m)
                    && u.model().is_none_or(|m| info.model().trim() == m)
            }
        }
    }
}

impl std::fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Label(l) => write!(f, "token label `{l}`"),
            Self::Serial(s) => write!(f, "token serial `{s}`"),
            Self::Uri(u) => write!(f, "token URI {u:?}"),
        }
    }
}

static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();

/// The process-wide context for a module, initialised on first use. Repeated
/// initialise/finalise cycles crash some modules, so contexts are never finalised.
pub fn context(module: &Path) -> Result<Pkcs11, KeyStoreError> {
    let map = CONTEXTS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map
        .lock()
        .map_err(|_| KeyStoreError::Poisoned("PKCS#11 context registry"))?;
    if let Some(ctx) = map.get(module) {
        return Ok(ctx.clone());
    }
    let load_err = |source| KeyStoreError::ModuleLoad {
        path: module.to_path_buf(),
        source,
    };
    let ctx = Pkcs11::new(module).map_err(load_err)?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(load_err(e)),
    }
    map.insert(module.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// The selected token in a module; its slot is looked up again after a reset
/// (a re-inserted token may come back in another slot).
pub(super) struct Token {
    pub(super) ctx: Pkcs11,
    selector: TokenSelector,
    slot: Mutex<Option<Slot>>,
}

impl Token {
    pub(super) fn new(ctx: Pkcs11, selector: TokenSelector) -> Self {
        Self {
            ctx,
            selector,
            slot: Mutex::new(None),
        }
    }

    /// The slot holding the selected, initialised token.
    pub(super) fn slot(&self) -> Result<Slot, KeyStoreError> {
        if let Ok(guard) = self.slot.lock()
            && let Some(s) = *guard
        {
            return Ok(s);
        }
        let slots = self
            .ctx
            .get_slots_with_token()
            .map_err(KeyStoreError::Pkcs11)?;
        let mut present = Vec::new();
        for slot in slots {
            let Ok(info) = self.ctx.get_token_info(slot) else {
                continue;
            };
            if !info.token_initialized() {
                continue;
            }
            if self.selector.matches(&info) {
                if let Ok(mut g) = self.slot.lock() {
                    *g = Some(slot);
                }
                return Ok(slot);
            }
            present.push(format!(
                "`{}` (serial {})",
                info.label().trim(),
                info.serial_number().trim()
            ));
        }
        Err(KeyStoreError::TokenNotFound {
            selector: self.selector.to_string(),
            present: TokensPresent(present),
        })
    }

    /// Forgets the slot; the next call searches again.
    pub(super) fn forget_slot(&self) {
        if let Ok(mut s) = self.slot.lock() {
            *s = None;
        }
    }
}
