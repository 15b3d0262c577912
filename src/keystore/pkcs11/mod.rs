//! PKCS#11 backend (cryptoki): any token, SoftHSM2 in tests.
//!
//! One `Pkcs11` context per module per process (`C_Initialize` once), a pool
//! of logged-in sessions, every call on a blocking thread. Object handles are
//! cached by CKA_ID because `C_FindObjects` is slow on SoftHSM with many
//! objects. When the token says the session or login is gone (removed token,
//! logged out, closed session) the pool is rebuilt and the call retried once.
//! A re-login the token rejects latches the backend: no further logins.

mod keys;
pub mod uri;

use crate::keystore::{
    Capabilities, GeneratedKey, KeyAlgorithm, KeyHandle, KeyProtection, KeySpec, KeyStore,
    KeyStoreError, PinFailure, SlotCheck,
};
use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::MechanismType;
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::{Slot, TokenInfo};
use secrecy::SecretString;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use tokio::sync::Semaphore;
use uri::Pkcs11Uri;

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

/// Settings for opening a PKCS#11 token.
pub struct Pkcs11Settings {
    pub module: PathBuf,
    pub selector: TokenSelector,
    pub pin: SecretString,
    pub sessions: usize,
}

static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();

/// The process-wide context for a module, initialised on first use. Repeated
/// initialise/finalise cycles crash some modules, so contexts are never finalised.
pub fn context(module: &Path) -> Result<Pkcs11, KeyStoreError> {
    let map = CONTEXTS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map
        .lock()
        .map_err(|_| KeyStoreError::Worker("PKCS#11 context registry poisoned".into()))?;
    if let Some(ctx) = map.get(module) {
        return Ok(ctx.clone());
    }
    let load_err = |source| KeyStoreError::ModuleLoad {
        path: module.display().to_string(),
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

/// Errors after which the pool is rebuilt and the call retried once.
fn recoverable(e: &KeyStoreError) -> bool {
    matches!(
        e,
        KeyStoreError::Pkcs11(CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::DeviceError
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid,
            _
        ))
    )
}

pub(crate) struct Inner {
    ctx: Pkcs11,
    selector: TokenSelector,
    pin: SecretString,
    token_label: String,
    slot: Mutex<Option<Slot>>,
    idle: Mutex<Vec<Session>>,
    /// Private-key handles by CKA_ID.
    handles: RwLock<HashMap<Vec<u8>, ObjectHandle>>,
    /// The capabilities once the first generation has shown whether the
    /// module accepts `CKA_MODIFIABLE=false`.
    learned_caps: OnceLock<Capabilities>,
    /// Set by the first rejected login; never cleared (a restart is the operator action).
    pin_latch: OnceLock<PinFailure>,
    /// One login at a time, so that two threads cannot both spend a retry.
    login: Mutex<()>,
}

pub struct Pkcs11KeyStore {
    inner: Arc<Inner>,
    permits: Arc<Semaphore>,
    /// The capabilities known at open (`unmodifiable_keys` still unknown).
    caps: Capabilities,
}

impl Inner {
    fn find_slot(&self) -> Result<Slot, KeyStoreError> {
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
            present: if present.is_empty() {
                "none".into()
            } else {
                present.join(", ")
            },
        })
    }

    /// Fails at once when a PIN was rejected before.
    fn check_latch(&self) -> Result<(), KeyStoreError> {
        match self.pin_latch.get() {
            Some(f) => Err(KeyStoreError::PinLatched(*f)),
            None => Ok(()),
        }
    }

    fn open_session(&self) -> Result<Session, KeyStoreError> {
        let slot = self.find_slot()?;
        let session = self
            .ctx
            .open_rw_session(slot)
            .map_err(KeyStoreError::Pkcs11)?;
        let _one_login = self
            .login
            .lock()
            .map_err(|_| KeyStoreError::Worker("PKCS#11 login lock poisoned".into()))?;
        // Another thread's login may have been rejected while this one waited.
        self.check_latch()?;
        let failure = match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => return Ok(session),
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                PinFailure::Incorrect { retries_left: None }
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => PinFailure::Locked,
            Err(CkError::Pkcs11(RvError::PinExpired, _)) => PinFailure::Expired,
            Err(e) => return Err(KeyStoreError::Pkcs11(e)),
        };
        let _ = self.pin_latch.set(failure);
        tracing::error!(
            token = %self.token_label,
            reason = %failure,
            "PKCS#11 login rejected; no further logins until keyward is restarted with a corrected PIN"
        );
        Err(KeyStoreError::PinRejected(failure))
    }

    fn checkout(&self) -> Result<Session, KeyStoreError> {
        let pooled = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        match pooled {
            Some(s) => Ok(s),
            None => self.open_session(),
        }
    }

    fn checkin(&self, s: Session) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(s);
        }
    }

    /// Forgets sessions, handles and the slot; the next call opens afresh.
    fn reset(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
        if let Ok(mut h) = self.handles.write() {
            h.clear();
        }
        if let Ok(mut s) = self.slot.lock() {
            *s = None;
        }
    }

    /// Runs `f` with a logged-in session, rebuilding the pool and retrying
    /// once when the token lost the session or the login.
    fn with_session<T>(
        &self,
        f: &dyn Fn(&Inner, &Session) -> Result<T, KeyStoreError>,
    ) -> Result<T, KeyStoreError> {
        let mut attempt = 0;
        loop {
            self.check_latch()?;
            let session = match self.checkout() {
                Ok(s) => s,
                Err(e) if attempt == 0 && recoverable(&e) => {
                    attempt += 1;
                    self.reset();
                    continue;
                }
                Err(e) => return Err(e),
            };
            match f(self, &session) {
                Err(e) if attempt == 0 && recoverable(&e) => {
                    tracing::warn!(error = %e, "PKCS#11 session lost; reopening and retrying once");
                    drop(session);
                    attempt += 1;
                    self.reset();
                }
                result => {
                    self.checkin(session);
                    return result;
                }
            }
        }
    }

    /// The private-key handle for a CKA_ID, from the cache or the token.
    fn private_handle(
        &self,
        session: &Session,
        id: &[u8],
    ) -> Result<Option<ObjectHandle>, KeyStoreError> {
        if let Ok(h) = self.handles.read()
            && let Some(handle) = h.get(id)
        {
            return Ok(Some(*handle));
        }
        let found = keys::find_private(session, id)?;
        if let (Some(handle), Ok(mut h)) = (found, self.handles.write()) {
            h.insert(id.to_vec(), handle);
        }
        Ok(found)
    }

    fn forget(&self, id: &[u8]) {
        if let Ok(mut h) = self.handles.write() {
            h.remove(id);
        }
    }
}

fn id_of(handle: &KeyHandle) -> Result<Vec<u8>, KeyStoreError> {
    let uri =
        Pkcs11Uri::parse(&handle.0).map_err(|_| KeyStoreError::BadHandle(handle.0.clone()))?;
    uri.id()
        .map(<[u8]>::to_vec)
        .ok_or_else(|| KeyStoreError::BadHandle(handle.0.clone()))
}

impl Pkcs11KeyStore {
    /// Loads the module, finds the token, logs in and fills the session pool.
    /// A missing module, a missing token and a wrong PIN each fail here, at start.
    pub async fn open(settings: Pkcs11Settings) -> Result<Self, KeyStoreError> {
        let sessions = settings.sessions.max(1);
        tokio::task::spawn_blocking(move || Self::open_blocking(settings, sessions))
            .await
            .map_err(|e| KeyStoreError::Worker(e.to_string()))?
    }

    fn open_blocking(settings: Pkcs11Settings, sessions: usize) -> Result<Self, KeyStoreError> {
        let ctx = context(&settings.module)?;
        let mut inner = Inner {
            ctx,
            selector: settings.selector,
            pin: settings.pin,
            token_label: String::new(),
            slot: Mutex::new(None),
            idle: Mutex::new(Vec::new()),
            handles: RwLock::new(HashMap::new()),
            learned_caps: OnceLock::new(),
            pin_latch: OnceLock::new(),
            login: Mutex::new(()),
        };
        let slot = inner.find_slot()?;
        let info = inner
            .ctx
            .get_token_info(slot)
            .map_err(KeyStoreError::Pkcs11)?;
        if info.user_pin_locked() {
            return Err(KeyStoreError::PinRejected(PinFailure::Locked));
        }
        inner.token_label = info.label().trim().to_string();
        // Ask for the mechanisms we use one by one: C_GetMechanismList also
        // returns vendor mechanisms that cryptoki logs as errors.
        let mechanisms: Vec<MechanismType> = WANTED_MECHANISMS
            .iter()
            .copied()
            .filter(|m| inner.ctx.get_mechanism_info(slot, *m).is_ok())
            .collect();
        let caps = capabilities(&mechanisms, sessions);
        // Log in once now so a wrong PIN fails start-up, not the first request.
        let first = inner.open_session()?;
        inner.checkin(first);
        Ok(Self {
            inner: Arc::new(inner),
            permits: Arc::new(Semaphore::new(sessions)),
            caps,
        })
    }

    /// The label of the token in use.
    pub fn token_label(&self) -> &str {
        &self.inner.token_label
    }

    async fn run<T, F>(&self, f: F) -> Result<T, KeyStoreError>
    where
        T: Send + 'static,
        F: Fn(&Inner, &Session) -> Result<T, KeyStoreError> + Send + 'static,
    {
        let _permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| KeyStoreError::Worker(e.to_string()))?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.with_session(&f))
            .await
            .map_err(|e| KeyStoreError::Worker(e.to_string()))?
    }
}

const WANTED_MECHANISMS: [MechanismType; 7] = [
    MechanismType::ECC_KEY_PAIR_GEN,
    MechanismType::ECDSA,
    MechanismType::RSA_PKCS_KEY_PAIR_GEN,
    MechanismType::RSA_PKCS,
    MechanismType::ECC_EDWARDS_KEY_PAIR_GEN,
    MechanismType::EDDSA,
    MechanismType::AES_KEY_WRAP_PAD,
];

fn capabilities(mechanisms: &[MechanismType], sessions: usize) -> Capabilities {
    let has = |m: MechanismType| mechanisms.contains(&m);
    let mut algorithms = Vec::new();
    if has(MechanismType::ECC_KEY_PAIR_GEN) && has(MechanismType::ECDSA) {
        algorithms.extend([KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384]);
    }
    if has(MechanismType::RSA_PKCS_KEY_PAIR_GEN) && has(MechanismType::RSA_PKCS) {
        algorithms.extend([
            KeyAlgorithm::Rsa2048,
            KeyAlgorithm::Rsa3072,
            KeyAlgorithm::Rsa4096,
        ]);
    }
    if has(MechanismType::ECC_EDWARDS_KEY_PAIR_GEN) && has(MechanismType::EDDSA) {
        algorithms.push(KeyAlgorithm::Ed25519);
    }
    Capabilities {
        algorithms,
        max_concurrent_signers: sessions,
        can_wrap_keys: has(MechanismType::AES_KEY_WRAP_PAD),
        unmodifiable_keys: None,
    }
}

#[async_trait]
impl KeyStore for Pkcs11KeyStore {
    fn backend(&self) -> &'static str {
        "pkcs11"
    }

    fn capabilities(&self) -> &Capabilities {
        self.inner.learned_caps.get().unwrap_or(&self.caps)
    }

    fn planned_handle(&self, spec: &KeySpec) -> KeyHandle {
        KeyHandle(Pkcs11Uri::for_key(
            &self.inner.token_label,
            &spec.label,
            spec.id.as_bytes(),
        ))
    }

    async fn generate(&self, spec: &KeySpec) -> Result<GeneratedKey, KeyStoreError> {
        if !self.caps.algorithms.contains(&spec.algorithm) {
            return Err(KeyStoreError::Unsupported(spec.algorithm));
        }
        let spec = spec.clone();
        let caps = self.caps.clone();
        self.run(move |inner, session| {
            let id = spec.id.as_bytes().to_vec();
            // Fixed keys where the module allows it; a module that refuses the
            // attribute gets the rest of the template, and the fact is recorded.
            let unmodifiable = inner
                .learned_caps
                .get()
                .and_then(|c| c.unmodifiable_keys)
                .unwrap_or(true);
            let (_, private) = match keys::generate(session, &spec, &id, unmodifiable) {
                Err(e) if unmodifiable && keys::template_refused(&e) => {
                    tracing::warn!(error = %e, "the PKCS#11 module refuses CKA_MODIFIABLE=false; keys stay modifiable");
                    let generated = keys::generate(session, &spec, &id, false)?;
                    let _ = inner.learned_caps.set(Capabilities {
                        unmodifiable_keys: Some(false),
                        ..caps.clone()
                    });
                    generated
                }
                other => {
                    let generated = other?;
                    let _ = inner.learned_caps.set(Capabilities {
                        unmodifiable_keys: Some(unmodifiable),
                        ..caps.clone()
                    });
                    generated
                }
            };
            if let Ok(mut h) = inner.handles.write() {
                h.insert(id.clone(), private);
            }
            let public_key_der = keys::public_key_der(session, &id, spec.algorithm)?;
            Ok(GeneratedKey {
                handle: KeyHandle(Pkcs11Uri::for_key(&inner.token_label, &spec.label, &id)),
                public_key_der,
                slot_check: SlotCheck::NewObject,
            })
        })
        .await
    }

    async fn public_key(&self, handle: &KeyHandle) -> Result<Vec<u8>, KeyStoreError> {
        let id = id_of(handle)?;
        let h = handle.clone();
        self.run(move |_, session| {
            let algorithm = keys::algorithm_of(session, &id)?
                .ok_or_else(|| KeyStoreError::KeyNotFound(h.clone()))?;
            keys::public_key_der(session, &id, algorithm)
        })
        .await
    }

    async fn sign(
        &self,
        handle: &KeyHandle,
        algorithm: KeyAlgorithm,
        message: &[u8],
    ) -> Result<Vec<u8>, KeyStoreError> {
        let id = id_of(handle)?;
        let h = handle.clone();
        let input = keys::sign_input(algorithm, message);
        self.run(move |inner, session| {
            let key = inner
                .private_handle(session, &id)?
                .ok_or_else(|| KeyStoreError::KeyNotFound(h.clone()))?;
            let result = keys::sign(session, key, algorithm, &input);
            if matches!(&result, Err(e) if recoverable(e)) {
                inner.forget(&id);
            }
            result
        })
        .await
    }

    async fn exists(&self, handle: &KeyHandle) -> Result<bool, KeyStoreError> {
        let id = id_of(handle)?;
        self.run(move |inner, session| Ok(inner.private_handle(session, &id)?.is_some()))
            .await
    }

    async fn protection(&self, handle: &KeyHandle) -> Result<KeyProtection, KeyStoreError> {
        let id = id_of(handle)?;
        let h = handle.clone();
        self.run(move |inner, session| {
            let key = inner
                .private_handle(session, &id)?
                .ok_or_else(|| KeyStoreError::KeyNotFound(h.clone()))?;
            keys::protection(session, key)
        })
        .await
    }

    async fn destroy(&self, handle: &KeyHandle) -> Result<(), KeyStoreError> {
        let id = id_of(handle)?;
        self.run(move |inner, session| {
            inner.forget(&id);
            keys::destroy(session, &id)
        })
        .await
    }

    async fn list(&self) -> Result<Vec<(KeyHandle, String)>, KeyStoreError> {
        self.run(|inner, session| {
            Ok(keys::list(session)?
                .into_iter()
                .map(|(id, label)| {
                    (
                        KeyHandle(Pkcs11Uri::for_key(&inner.token_label, &label, &id)),
                        label,
                    )
                })
                .collect())
        })
        .await
    }

    async fn health(&self) -> Result<(), KeyStoreError> {
        self.run(|_, session| {
            session.get_session_info().map_err(KeyStoreError::Pkcs11)?;
            Ok(())
        })
        .await
    }

    async fn close(&self) -> Result<(), KeyStoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let sessions: Vec<Session> = inner
                .idle
                .lock()
                .map(|mut idle| idle.drain(..).collect())
                .unwrap_or_default();
            let result = match sessions.first() {
                Some(s) => match s.logout() {
                    Ok(()) | Err(CkError::Pkcs11(RvError::UserNotLoggedIn, _)) => Ok(()),
                    Err(e) => Err(KeyStoreError::Pkcs11(e)),
                },
                None => Ok(()),
            };
            if let Ok(mut h) = inner.handles.write() {
                h.clear();
            }
            drop(sessions);
            result
        })
        .await
        .map_err(|e| KeyStoreError::Worker(e.to_string()))?
    }
}
