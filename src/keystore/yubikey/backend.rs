//! The YubiKey `KeyStore`: the card connection (by serial, reopened after PC/SC errors), the
//! one-at-a-time queue, the PIN latch, and generation only into a slot proven empty.

use super::attestation::{self, Attestation};
use super::card_error;
use super::objects::{SlotState, slot_name, slot_public_key, slot_state};
use super::settings::YubiKeySettings;
use crate::keystore::{
    AttestationError, Capabilities, GeneratedKey, KeyAlgorithm, KeyHandle, KeyProtection, KeySpec,
    KeyStore, KeyStoreError, ManagementKeyError, PinFailure, PoolStats, SlotCheck,
};
use async_trait::async_trait;
use der::Encode;
use secrecy::ExposeSecret;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::Semaphore;
use yubikey::piv::{self, AlgorithmId};
use yubikey::{MgmKey, Serial, YubiKey};

pub(super) struct Inner {
    settings: YubiKeySettings,
    card: Mutex<Option<YubiKey>>,
    /// Set by the first rejected PIN; never cleared (a restart is the operator action).
    pin_latch: OnceLock<PinFailure>,
}

pub struct YubiKeyKeyStore {
    inner: Arc<Inner>,
    queue: Arc<Semaphore>,
    /// Calls waiting for `queue` now (`keyward_yubikey_queue_depth`).
    waiting: AtomicUsize,
    caps: Capabilities,
}

/// Counts one call in [`YubiKeyKeyStore::waiting`] until dropped: when it
/// gets the card, times out, or its future is dropped while waiting.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn is_connection_error(e: &KeyStoreError) -> bool {
    matches!(
        e,
        KeyStoreError::DeviceUnavailable { .. } | KeyStoreError::CardNotFound { .. }
    )
}

impl Inner {
    fn handle(&self) -> KeyHandle {
        KeyHandle(format!(
            "yubikey:serial={};slot={}",
            self.settings.serial,
            slot_name(self.settings.slot)
        ))
    }

    fn check_handle(&self, h: &KeyHandle) -> Result<(), KeyStoreError> {
        if *h == self.handle() {
            Ok(())
        } else {
            Err(KeyStoreError::BadHandle(h.0.clone()))
        }
    }

    fn management_key(&self) -> Result<MgmKey, KeyStoreError> {
        let bytes = zeroize::Zeroizing::new(
            hex::decode(self.settings.management_key.expose_secret().trim())
                .map_err(|_| KeyStoreError::ManagementKeyInvalid(ManagementKeyError::NotHex))?,
        );
        MgmKey::from_bytes(
            bytes.as_slice(),
            Some(self.settings.management_key_algorithm),
        )
        .map_err(|_| KeyStoreError::ManagementKeyInvalid(ManagementKeyError::WrongLength))
    }

    /// Runs `f` on the card, connecting by serial first if needed. A PC/SC
    /// failure drops the connection. On a connection that was already open
    /// it may only mean the card was reset or re-inserted since (another
    /// application, a PC/SC reset), so `f` is retried once on a fresh one;
    /// `f` redoes its own checks (slot state, PIN) from the start.
    fn with_card<T>(
        &self,
        f: impl Fn(&Inner, &mut YubiKey) -> Result<T, KeyStoreError>,
    ) -> Result<T, KeyStoreError> {
        let mut guard = self
            .card
            .lock()
            .map_err(|_| KeyStoreError::Poisoned("YubiKey connection lock"))?;
        // Checked under the card lock: calls queued behind the one whose PIN
        // was rejected must not try it again.
        if let Some(f) = self.pin_latch.get() {
            return Err(KeyStoreError::PinLatched(*f));
        }
        let mut reused = guard.is_some();
        loop {
            if guard.is_none() {
                let yk = YubiKey::open_by_serial(Serial(self.settings.serial)).map_err(|e| {
                    KeyStoreError::CardNotFound {
                        serial: self.settings.serial,
                        source: e,
                    }
                })?;
                *guard = Some(yk);
            }
            let yk = guard
                .as_mut()
                .ok_or(KeyStoreError::Poisoned("YubiKey connection vanished"))?;
            let result = f(self, yk);
            if let Err(KeyStoreError::PinRejected(failure)) = &result {
                let _ = self.pin_latch.set(*failure);
                tracing::error!(
                    serial = self.settings.serial,
                    reason = %failure,
                    "YubiKey PIN rejected; no further PIN attempts until keyward is restarted with a corrected PIN"
                );
            }
            match &result {
                Err(e) if is_connection_error(e) => {
                    *guard = None;
                    if reused {
                        tracing::info!(error = %e, "YubiKey connection went stale; reconnecting and retrying once");
                        reused = false;
                        continue;
                    }
                }
                _ => {}
            }
            return result;
        }
    }
}

fn piv_algorithm(a: KeyAlgorithm) -> Result<AlgorithmId, KeyStoreError> {
    match a {
        KeyAlgorithm::EcdsaP256 => Ok(AlgorithmId::EccP256),
        KeyAlgorithm::EcdsaP384 => Ok(AlgorithmId::EccP384),
        other => Err(KeyStoreError::Unsupported(other)),
    }
}

impl YubiKeyKeyStore {
    /// Does not touch the card: it may be absent (an offline root) until a
    /// key on it is needed.
    pub fn new(settings: YubiKeySettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                card: Mutex::new(None),
                pin_latch: OnceLock::new(),
            }),
            queue: Arc::new(Semaphore::new(1)),
            waiting: AtomicUsize::new(0),
            caps: Capabilities {
                algorithms: vec![KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384],
                max_concurrent_signers: 1,
                can_wrap_keys: false,
                // A PIV key's algorithm and policies are fixed when it is generated.
                unmodifiable_keys: Some(true),
            },
        }
    }

    pub fn serial(&self) -> u32 {
        self.inner.settings.serial
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl Fn(&Inner, &mut YubiKey) -> Result<T, KeyStoreError> + Send + 'static,
    ) -> Result<T, KeyStoreError> {
        let timeout = self.inner.settings.sign_timeout;
        let waiting = Waiting::new(&self.waiting);
        let permit = tokio::time::timeout(timeout, self.queue.clone().acquire_owned())
            .await
            .map_err(|_| KeyStoreError::Busy(timeout))?
            .map_err(KeyStoreError::QueueClosed)?;
        drop(waiting);
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            inner.with_card(f)
        })
        .await
        .map_err(KeyStoreError::Worker)?
    }

    /// Reads the slot's attestation certificate and checks it: signed by the
    /// card's F9 intermediate, which is signed by the configured root, and
    /// certifying the slot's current public key.
    pub async fn attest(&self, handle: &KeyHandle) -> Result<Attestation, KeyStoreError> {
        self.inner.check_handle(handle)?;
        self.run(|inner, yk| {
            let root = inner
                .settings
                .attestation_root_der
                .as_deref()
                .ok_or_else(|| KeyStoreError::Attestation(AttestationError::NoRoot))?;
            attestation::attest(yk, inner.settings.slot, &inner.handle(), root)
        })
        .await
    }
}

#[async_trait]
impl KeyStore for YubiKeyKeyStore {
    fn backend(&self) -> &'static str {
        "yubikey"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn planned_handle(&self, _spec: &KeySpec) -> KeyHandle {
        self.inner.handle()
    }

    /// Generates in the configured slot. An occupied slot is refused: PIV
    /// would silently replace the key, and a CA key must never be overwritten.
    async fn generate(&self, spec: &KeySpec) -> Result<GeneratedKey, KeyStoreError> {
        let alg = piv_algorithm(spec.algorithm)?;
        if spec.extractable {
            return Err(KeyStoreError::ExtractableUnsupported { backend: "yubikey" });
        }
        self.run(move |inner, yk| {
            let slot = slot_name(inner.settings.slot);
            let slot_check = match slot_state(yk, inner.settings.slot)? {
                SlotState::Empty => SlotCheck::ProvenEmpty,
                SlotState::Occupied { evidence, .. } => {
                    return Err(KeyStoreError::SlotOccupied { slot, evidence });
                }
                SlotState::Unverifiable { firmware } => {
                    if !inner.settings.dangerously_generate_into_unverified_slot {
                        return Err(KeyStoreError::SlotUnverifiable { slot, firmware });
                    }
                    tracing::warn!(
                        slot = %slot,
                        firmware = %firmware,
                        "generating into a slot the card cannot prove empty \
                         (dangerously_generate_into_unverified_slot is set)"
                    );
                    SlotCheck::UnverifiedOverride
                }
            };
            yk.authenticate(&inner.management_key()?)
                .map_err(card_error)?;
            let spki = piv::generate(
                yk,
                inner.settings.slot,
                alg,
                inner.settings.pin_policy,
                inner.settings.touch_policy,
            )
            .map_err(card_error)?;
            Ok(GeneratedKey {
                handle: inner.handle(),
                public_key_der: spki.to_der().map_err(KeyStoreError::Encoding)?,
                slot_check,
            })
        })
        .await
    }

    async fn public_key(&self, handle: &KeyHandle) -> Result<Vec<u8>, KeyStoreError> {
        self.inner.check_handle(handle)?;
        self.run(move |inner, yk| slot_public_key(yk, inner.settings.slot, &inner.handle()))
            .await
    }

    async fn sign(
        &self,
        handle: &KeyHandle,
        algorithm: KeyAlgorithm,
        message: &[u8],
    ) -> Result<Vec<u8>, KeyStoreError> {
        self.inner.check_handle(handle)?;
        let alg = piv_algorithm(algorithm)?;
        let digest = algorithm
            .digest(message)
            .ok_or(KeyStoreError::Unsupported(algorithm))?;
        self.run(move |inner, yk| {
            // PIN policy `always` (the default of slot 9c) needs the VERIFY right before the sign.
            yk.verify_pin(inner.settings.pin.expose_secret().as_bytes())
                .map_err(card_error)?;
            let sig = piv::sign_data(yk, &digest, alg, inner.settings.slot).map_err(card_error)?;
            Ok(sig.to_vec())
        })
        .await
    }

    async fn exists(&self, handle: &KeyHandle) -> Result<bool, KeyStoreError> {
        self.inner.check_handle(handle)?;
        // "Cannot tell" counts as "may hold a key": callers must never take
        // an unverifiable slot for an empty one.
        self.run(|inner, yk| {
            Ok(!matches!(
                slot_state(yk, inner.settings.slot)?,
                SlotState::Empty
            ))
        })
        .await
    }

    async fn protection(&self, handle: &KeyHandle) -> Result<KeyProtection, KeyStoreError> {
        self.inner.check_handle(handle)?;
        self.run(move |inner, yk| {
            let generated = match slot_state(yk, inner.settings.slot)? {
                SlotState::Occupied {
                    generated_on_card, ..
                } => generated_on_card.unwrap_or(false),
                SlotState::Empty => return Err(KeyStoreError::KeyNotFound(inner.handle())),
                SlotState::Unverifiable { firmware } => {
                    return Err(KeyStoreError::PublicKeyUnreadable {
                        slot: slot_name(inner.settings.slot),
                        firmware,
                    });
                }
            };
            Ok(KeyProtection {
                sensitive: true,
                extractable: false,
                always_sensitive: generated,
                never_extractable: generated,
            })
        })
        .await
    }

    /// PIV has no portable "delete key"; the key stays until the slot is
    /// generated into again or the applet is reset.
    async fn destroy(&self, handle: &KeyHandle) -> Result<(), KeyStoreError> {
        self.inner.check_handle(handle)?;
        Err(KeyStoreError::OperationUnsupported {
            backend: "yubikey",
            operation: "destroy (PIV keys are replaced, not deleted)",
        })
    }

    async fn store_certificate(
        &self,
        handle: &KeyHandle,
        cert_der: &[u8],
    ) -> Result<(), KeyStoreError> {
        self.inner.check_handle(handle)?;
        let cert = cert_der.to_vec();
        self.run(move |inner, yk| {
            yk.authenticate(&inner.management_key()?)
                .map_err(card_error)?;
            let c =
                yubikey::certificate::Certificate::from_bytes(cert.clone()).map_err(card_error)?;
            c.write(
                yk,
                inner.settings.slot,
                yubikey::certificate::CertInfo::Uncompressed,
            )
            .map_err(card_error)
        })
        .await
    }

    async fn attestation(&self, handle: &KeyHandle) -> Result<Option<Vec<Vec<u8>>>, KeyStoreError> {
        if self.inner.settings.attestation_root_der.is_none() {
            return Ok(None);
        }
        let a = self.attest(handle).await?;
        Ok(Some(vec![a.certificate_der, a.intermediate_der]))
    }

    async fn health(&self) -> Result<(), KeyStoreError> {
        self.run(|_, yk| yk.get_pin_retries().map(drop).map_err(card_error))
            .await
    }

    async fn close(&self) -> Result<(), KeyStoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            if let Ok(mut g) = inner.card.lock() {
                *g = None;
            }
        })
        .await
        .map_err(KeyStoreError::Worker)
    }

    /// Calls waiting for the card behind the one it works on: a counter
    /// read, the card is not touched.
    fn pool_stats(&self) -> Option<PoolStats> {
        Some(PoolStats::Queue {
            waiting: self.waiting.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use yubikey::piv::SlotId;
    use yubikey::{MgmAlgorithmId, PinPolicy, TouchPolicy};

    /// A key store for a card that is not there (serial 1): nothing here
    /// reaches the card until the queue lets a call through.
    fn store(sign_timeout: Duration) -> Arc<YubiKeyKeyStore> {
        Arc::new(YubiKeyKeyStore::new(YubiKeySettings {
            serial: 1,
            slot: SlotId::Signature,
            pin: "123456".to_string().into(),
            management_key: "00".repeat(24).into(),
            management_key_algorithm: MgmAlgorithmId::ThreeDes,
            pin_policy: PinPolicy::Default,
            touch_policy: TouchPolicy::Default,
            attestation_root_der: None,
            sign_timeout,
            dangerously_generate_into_unverified_slot: false,
        }))
    }

    fn waiting(ks: &YubiKeyKeyStore) -> usize {
        match ks.pool_stats() {
            Some(PoolStats::Queue { waiting }) => waiting,
            other => panic!("{other:?}"),
        }
    }

    /// Polls until `ks` has `n` calls waiting (the tasks get there on their own time).
    async fn until_waiting(ks: &YubiKeyKeyStore, n: usize) {
        for _ in 0..1000 {
            if waiting(ks) == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(waiting(ks), n);
    }

    /// The queue depth counts calls waiting behind the one holding the
    /// card; a call leaves it when it gets the card, when its caller gives
    /// up (future dropped), or when it times out.
    #[tokio::test]
    async fn queue_depth_counts_the_calls_waiting_for_the_card() {
        let ks = store(Duration::from_secs(600));
        assert_eq!(waiting(&ks), 0);
        let held = ks.queue.clone().acquire_owned().await.unwrap();
        let calls: Vec<_> = (0..2)
            .map(|_| {
                let ks = ks.clone();
                tokio::spawn(async move { ks.health().await })
            })
            .collect();
        until_waiting(&ks, 2).await;
        calls[0].abort();
        until_waiting(&ks, 1).await;
        drop(held);
        // The card is absent: the call that got through fails, and left the queue.
        let [_, last] = <[_; 2]>::try_from(calls).unwrap();
        assert!(last.await.unwrap().is_err());
        assert_eq!(waiting(&ks), 0);

        let ks = store(Duration::from_millis(20));
        let _held = ks.queue.clone().acquire_owned().await.unwrap();
        let e = ks.health().await.unwrap_err();
        assert!(matches!(e, KeyStoreError::Busy(_)), "{e:?}");
        assert_eq!(waiting(&ks), 0);
    }
}
