//! PKCS#11 backend (cryptoki): any token, SoftHSM2 in tests. This file is the `KeyStore`
//! implementation; the module and token live in `context`, the logged-in session pool and
//! the PIN latch in `sessions`, mechanism discovery in `capabilities`, templates and key
//! objects in `keys`, export by wrapping in `export`.
//!
//! One `Pkcs11` context per module per process (`C_Initialize` once), a pool
//! of logged-in sessions, every call on a blocking thread. Object handles are
//! cached by CKA_ID because `C_FindObjects` is slow on SoftHSM with many
//! objects. When the token says the session or login is gone (removed token,
//! logged out, closed session) the pool is rebuilt and the call retried once.
//! A re-login the token rejects latches the backend: no further logins.

mod capabilities;
mod context;
mod export;
mod keys;
mod sessions;
pub mod uri;

pub use context::{TokenSelector, context};

use crate::keystore::{
    Capabilities, GeneratedKey, KeyAlgorithm, KeyHandle, KeyProtection, KeySpec, KeyStore,
    KeyStoreError, PinFailure, PoolStats, SlotCheck,
};
use async_trait::async_trait;
use capabilities::LearnedCapabilities;
use context::Token;
use cryptoki::session::Session;
use keys::HandleCache;
use secrecy::SecretString;
use sessions::SessionPool;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Semaphore;
use uri::Pkcs11Uri;

/// Settings for opening a PKCS#11 token.
pub struct Pkcs11Settings {
    pub module: PathBuf,
    pub selector: TokenSelector,
    pub pin: SecretString,
    pub sessions: usize,
}

pub(crate) struct Inner {
    pool: SessionPool,
    token_label: String,
    handles: HandleCache,
    caps: LearnedCapabilities,
}

pub struct Pkcs11KeyStore {
    inner: Arc<Inner>,
    permits: Arc<Semaphore>,
    /// The permits `permits` started with: the pool's size.
    sessions: usize,
    /// Dedicated signer threads, when configured ([`Self::with_signer_threads`]).
    signers: Option<Signers>,
}

/// A signature request for a signer thread: runs with the backend's state
/// and answers through its own channel.
type SignJob = Box<dyn FnOnce(&Inner) + Send>;

/// `sessions` OS threads that take signature requests from one queue and
/// run them on the session pool (each thread in effect keeps one session).
/// Issue 12 lever: it replaces `spawn_blocking`'s per-call hand-off (task
/// allocation, the blocking pool's shared queue, a `JoinHandle`) with a
/// channel send and a oneshot answer; BENCHMARKS.md records what it gave.
/// The threads end when the key store is dropped (the queue closes).
struct Signers {
    queue: std::sync::mpsc::Sender<SignJob>,
}

impl Signers {
    fn start(inner: &Arc<Inner>, threads: usize) -> Result<Self, KeyStoreError> {
        let (queue, jobs) = std::sync::mpsc::channel::<SignJob>();
        let jobs = Arc::new(std::sync::Mutex::new(jobs));
        for i in 0..threads {
            let (inner, jobs) = (inner.clone(), jobs.clone());
            std::thread::Builder::new()
                .name(format!("keyward-p11-sign-{i}"))
                .spawn(move || {
                    loop {
                        // One thread waits in `recv` holding the lock; the
                        // others queue on the lock and take the next job.
                        let job = match jobs.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&inner),
                            Err(_) => return, // the key store is gone
                        }
                    }
                })
                .map_err(|_| KeyStoreError::SignerGone)?;
        }
        Ok(Self { queue })
    }
}

impl Inner {
    fn with_session<T>(
        &self,
        f: &dyn Fn(&Inner, &Session) -> Result<T, KeyStoreError>,
    ) -> Result<T, KeyStoreError> {
        self.pool
            .with_session(&|| self.handles.clear(), &|session| f(self, session))
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
            .map_err(KeyStoreError::Worker)?
    }

    fn open_blocking(settings: Pkcs11Settings, sessions: usize) -> Result<Self, KeyStoreError> {
        let token = Token::new(context(&settings.module)?, settings.selector);
        let slot = token.slot()?;
        let info = token
            .ctx
            .get_token_info(slot)
            .map_err(KeyStoreError::Pkcs11)?;
        if info.user_pin_locked() {
            return Err(KeyStoreError::PinRejected(PinFailure::Locked));
        }
        let token_label = info.label().trim().to_string();
        let caps = capabilities::discover(&token.ctx, slot, sessions);
        let pool = SessionPool::new(token, token_label.clone(), settings.pin);
        pool.fill()?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                token_label,
                handles: HandleCache::default(),
                caps: LearnedCapabilities::new(caps),
            }),
            permits: Arc::new(Semaphore::new(sessions)),
            sessions,
            signers: None,
        })
    }

    /// Runs signatures on dedicated threads, one per session, instead of a
    /// `spawn_blocking` call each (`[keystore] signer_threads = true`).
    /// Other operations keep the blocking pool; the permits still bound
    /// everything in flight to the pool's size.
    pub fn with_signer_threads(mut self) -> Result<Self, KeyStoreError> {
        self.signers = Some(Signers::start(&self.inner, self.sessions)?);
        Ok(self)
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
            .map_err(KeyStoreError::QueueClosed)?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.with_session(&f))
            .await
            .map_err(KeyStoreError::Worker)?
    }

    /// Like [`Self::run`], on a signer thread when there are any.
    async fn run_sign<T, F>(&self, f: F) -> Result<T, KeyStoreError>
    where
        T: Send + 'static,
        F: Fn(&Inner, &Session) -> Result<T, KeyStoreError> + Send + 'static,
    {
        let Some(signers) = &self.signers else {
            return self.run(f).await;
        };
        let _permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(KeyStoreError::QueueClosed)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: SignJob = Box::new(move |inner: &Inner| {
            let _ = tx.send(inner.with_session(&f));
        });
        signers
            .queue
            .send(job)
            .map_err(|_| KeyStoreError::SignerGone)?;
        rx.await.map_err(|_| KeyStoreError::SignerGone)?
    }
}

#[async_trait]
impl KeyStore for Pkcs11KeyStore {
    fn backend(&self) -> &'static str {
        "pkcs11"
    }

    fn capabilities(&self) -> &Capabilities {
        self.inner.caps.get()
    }

    fn planned_handle(&self, spec: &KeySpec) -> KeyHandle {
        KeyHandle(Pkcs11Uri::for_key(
            &self.inner.token_label,
            &spec.label,
            spec.id.as_bytes(),
        ))
    }

    async fn generate(&self, spec: &KeySpec) -> Result<GeneratedKey, KeyStoreError> {
        if !self.capabilities().algorithms.contains(&spec.algorithm) {
            return Err(KeyStoreError::Unsupported(spec.algorithm));
        }
        let spec = spec.clone();
        self.run(move |inner, session| {
            let id = spec.id.as_bytes().to_vec();
            // Fixed keys where the module allows it; a module that refuses the
            // attribute gets the rest of the template, and the fact is recorded.
            let unmodifiable = inner.caps.try_unmodifiable();
            let (_, private) = match keys::generate(session, &spec, &id, unmodifiable) {
                Err(e) if unmodifiable && keys::template_refused(&e) => {
                    tracing::warn!(error = %e, "the PKCS#11 module refuses CKA_MODIFIABLE=false; keys stay modifiable");
                    let generated = keys::generate(session, &spec, &id, false)?;
                    inner.caps.record_unmodifiable(false);
                    generated
                }
                other => {
                    let generated = other?;
                    inner.caps.record_unmodifiable(unmodifiable);
                    generated
                }
            };
            inner.handles.insert(&id, private);
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
        self.run_sign(move |inner, session| {
            let key = inner
                .handles
                .private(session, &id)?
                .ok_or_else(|| KeyStoreError::KeyNotFound(h.clone()))?;
            let result = keys::sign(session, key, algorithm, &input);
            if matches!(&result, Err(e) if sessions::recoverable(e)) {
                inner.handles.forget(&id);
            }
            result
        })
        .await
    }

    async fn exists(&self, handle: &KeyHandle) -> Result<bool, KeyStoreError> {
        let id = id_of(handle)?;
        self.run(move |inner, session| Ok(inner.handles.private(session, &id)?.is_some()))
            .await
    }

    async fn protection(&self, handle: &KeyHandle) -> Result<KeyProtection, KeyStoreError> {
        let id = id_of(handle)?;
        let h = handle.clone();
        self.run(move |inner, session| {
            let key = inner
                .handles
                .private(session, &id)?
                .ok_or_else(|| KeyStoreError::KeyNotFound(h.clone()))?;
            keys::protection(session, key)
        })
        .await
    }

    async fn export_private_key(
        &self,
        handle: &KeyHandle,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyStoreError> {
        if !self.capabilities().can_wrap_keys {
            return Err(KeyStoreError::OperationUnsupported {
                backend: self.backend(),
                operation: "export_private_key (the token lacks CKM_AES_KEY_WRAP_PAD)",
            });
        }
        let id = id_of(handle)?;
        let h = handle.clone();
        self.run(move |inner, session| {
            let key = inner
                .handles
                .private(session, &id)?
                .ok_or_else(|| KeyStoreError::KeyNotFound(h.clone()))?;
            let result = export::export_pkcs8(session, key, &h);
            if matches!(&result, Err(e) if sessions::recoverable(e)) {
                inner.handles.forget(&id);
            }
            result
        })
        .await
    }

    async fn wrap_private_key(
        &self,
        handle: &KeyHandle,
        kek: &zeroize::Zeroizing<[u8; 32]>,
    ) -> Result<Vec<u8>, KeyStoreError> {
        if !self.capabilities().can_wrap_keys {
            return Err(KeyStoreError::OperationUnsupported {
                backend: self.backend(),
                operation: "wrap_private_key (the token lacks CKM_AES_KEY_WRAP_PAD)",
            });
        }
        let id = id_of(handle)?;
        let h = handle.clone();
        let kek = kek.clone();
        self.run(move |inner, session| {
            let key = inner
                .handles
                .private(session, &id)?
                .ok_or_else(|| KeyStoreError::KeyNotFound(h.clone()))?;
            let result = export::wrap_out(session, key, &h, &kek);
            if matches!(&result, Err(e) if sessions::recoverable(e)) {
                inner.handles.forget(&id);
            }
            result
        })
        .await
    }

    async fn unwrap_private_key(
        &self,
        spec: &KeySpec,
        kek: &zeroize::Zeroizing<[u8; 32]>,
        wrapped: &[u8],
        public_key_der: &[u8],
    ) -> Result<GeneratedKey, KeyStoreError> {
        if !self.capabilities().can_wrap_keys {
            return Err(KeyStoreError::OperationUnsupported {
                backend: self.backend(),
                operation: "unwrap_private_key (the token lacks CKM_AES_KEY_WRAP_PAD)",
            });
        }
        if !self.capabilities().algorithms.contains(&spec.algorithm) {
            return Err(KeyStoreError::Unsupported(spec.algorithm));
        }
        let expected = public_key_der.to_vec();
        let algorithm = spec.algorithm;
        let usage = spec.usage;
        let (spec, kek, wrapped, public) = (
            spec.clone(),
            kek.clone(),
            wrapped.to_vec(),
            public_key_der.to_vec(),
        );
        let restored = self
            .run(move |inner, session| {
                let id = spec.id.as_bytes().to_vec();
                // Either half under this CKA_ID occupies it: a lone private
                // key (its public object deleted) would otherwise get a twin.
                if keys::id_in_use(session, &id)? {
                    return Err(KeyStoreError::KeyIdInUse(KeyHandle(Pkcs11Uri::for_key(
                        &inner.token_label,
                        &spec.label,
                        &id,
                    ))));
                }
                let unmodifiable = inner.caps.try_unmodifiable();
                let private = match export::unwrap_in(
                    session,
                    &spec,
                    &id,
                    &kek,
                    &wrapped,
                    &public,
                    unmodifiable,
                ) {
                    Err(e) if unmodifiable && keys::template_refused(&e) => {
                        export::unwrap_in(session, &spec, &id, &kek, &wrapped, &public, false)?
                    }
                    other => other?,
                };
                let public_key_der = match keys::public_key_der(session, &id, spec.algorithm) {
                    Ok(der) => der,
                    Err(e) => {
                        // Nothing half-restored: the pair goes again.
                        let _ = keys::destroy(session, &id);
                        return Err(e);
                    }
                };
                inner.handles.insert(&id, private);
                Ok((
                    KeyHandle(Pkcs11Uri::for_key(&inner.token_label, &spec.label, &id)),
                    public_key_der,
                ))
            })
            .await?;
        let (handle, public_key_der) = restored;
        // The pair must belong together: a signature by the unwrapped key
        // verifies under the recorded public key (a decrypt key: it
        // decrypts what was encrypted to the recorded public key), or
        // neither stays.
        let probe = b"keyward restore: does the private key match its public key?";
        let matches = public_key_der == expected
            && match usage {
                crate::keystore::KeyUsage::Sign => {
                    match self.sign(&handle, algorithm, probe).await {
                        Ok(sig) => {
                            crate::crypto::verify_spki_signature(&expected, algorithm, probe, &sig)
                        }
                        Err(_) => false,
                    }
                }
                crate::keystore::KeyUsage::Decrypt => {
                    match crate::crypto::oaep_encrypt(&expected, probe) {
                        Ok(ct) => self
                            .decrypt_data_key(&handle, &ct)
                            .await
                            .is_ok_and(|pt| pt.as_slice() == probe),
                        Err(_) => false,
                    }
                }
            };
        if !matches {
            self.destroy(&handle).await?;
            return Err(KeyStoreError::PublicKeyMismatch);
        }
        Ok(GeneratedKey {
            handle,
            public_key_der,
            slot_check: SlotCheck::NewObject,
        })
    }

    async fn decrypt_data_key(
        &self,
        handle: &KeyHandle,
        ciphertext: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyStoreError> {
        let id = id_of(handle)?;
        let h = handle.clone();
        let ciphertext = ciphertext.to_vec();
        self.run(move |inner, session| {
            let key = inner
                .handles
                .private(session, &id)?
                .ok_or_else(|| KeyStoreError::KeyNotFound(h.clone()))?;
            let result = keys::decrypt_oaep(session, key, &ciphertext);
            if matches!(&result, Err(e) if sessions::recoverable(e)) {
                inner.handles.forget(&id);
            }
            result
        })
        .await
    }

    async fn destroy(&self, handle: &KeyHandle) -> Result<(), KeyStoreError> {
        let id = id_of(handle)?;
        self.run(move |inner, session| {
            inner.handles.forget(&id);
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
            let result = inner.pool.close();
            inner.handles.clear();
            result
        })
        .await
        .map_err(KeyStoreError::Worker)?
    }

    /// Operations holding a session permit now (each runs on one pooled
    /// session) out of the pool's size: a semaphore read, no token call.
    fn pool_stats(&self) -> Option<PoolStats> {
        Some(PoolStats::Sessions {
            in_use: self
                .sessions
                .saturating_sub(self.permits.available_permits()),
            max: self.sessions,
        })
    }
}
