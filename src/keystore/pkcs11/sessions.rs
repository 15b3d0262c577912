//! The pool of logged-in sessions: check-out/in, rebuild and retry once after a lost session,
//! and the PIN latch that stops re-logins after the token rejected the PIN.

use super::context::Token;
use crate::keystore::{KeyStoreError, PinFailure};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use secrecy::SecretString;
use std::sync::{Mutex, OnceLock};

/// Errors after which the pool is rebuilt and the call retried once.
pub(super) fn recoverable(e: &KeyStoreError) -> bool {
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

pub(super) struct SessionPool {
    pub(super) token: Token,
    /// For the log only.
    token_label: String,
    pin: SecretString,
    idle: Mutex<Vec<Session>>,
    /// Set by the first rejected login; never cleared (a restart is the operator action).
    pin_latch: OnceLock<PinFailure>,
    /// One login at a time, so that two threads cannot both spend a retry.
    login: Mutex<()>,
}

impl SessionPool {
    pub(super) fn new(token: Token, token_label: String, pin: SecretString) -> Self {
        Self {
            token,
            token_label,
            pin,
            idle: Mutex::new(Vec::new()),
            pin_latch: OnceLock::new(),
            login: Mutex::new(()),
        }
    }

    /// Fails at once when a PIN was rejected before.
    fn check_latch(&self) -> Result<(), KeyStoreError> {
        match self.pin_latch.get() {
            Some(f) => Err(KeyStoreError::PinLatched(*f)),
            None => Ok(()),
        }
    }

    fn open_session(&self) -> Result<Session, KeyStoreError> {
        let slot = self.token.slot()?;
        let session = self
            .token
            .ctx
            .open_rw_session(slot)
            .map_err(KeyStoreError::Pkcs11)?;
        let _one_login = self
            .login
            .lock()
            .map_err(|_| KeyStoreError::Poisoned("PKCS#11 login lock"))?;
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

    pub(super) fn checkin(&self, s: Session) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(s);
        }
    }

    /// Opens and logs in one session and puts it in the pool, so that a
    /// wrong PIN fails start-up rather than the first request.
    pub(super) fn fill(&self) -> Result<(), KeyStoreError> {
        let first = self.open_session()?;
        self.checkin(first);
        Ok(())
    }

    /// Forgets sessions and the slot; the next call opens afresh.
    fn reset(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
        self.token.forget_slot();
    }

    /// Runs `f` with a logged-in session, rebuilding the pool and retrying
    /// once when the token lost the session or the login. `on_reset` drops
    /// whatever the caller cached from the old sessions (object handles).
    pub(super) fn with_session<T>(
        &self,
        on_reset: &dyn Fn(),
        f: &dyn Fn(&Session) -> Result<T, KeyStoreError>,
    ) -> Result<T, KeyStoreError> {
        let mut attempt = 0;
        loop {
            self.check_latch()?;
            let session = match self.checkout() {
                Ok(s) => s,
                Err(e) if attempt == 0 && recoverable(&e) => {
                    attempt += 1;
                    self.reset();
                    on_reset();
                    continue;
                }
                Err(e) => return Err(e),
            };
            match f(&session) {
                Err(e) if attempt == 0 && recoverable(&e) => {
                    tracing::warn!(error = %e, "PKCS#11 session lost; reopening and retrying once");
                    drop(session);
                    attempt += 1;
                    self.reset();
                    on_reset();
                }
                result => {
                    self.checkin(session);
                    return result;
                }
            }
        }
    }

    /// Logs out and closes the idle sessions; later calls log in again.
    pub(super) fn close(&self) -> Result<(), KeyStoreError> {
        let sessions: Vec<Session> = self
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
        drop(sessions);
        result
    }
}
