//! YubiKey PIV backend (`yubikey` crate over PC/SC): for low-volume keys
//! such as an offline root CA.
//!
//! A YubiKey signs one operation at a time, so calls queue on a semaphore
//! with a timeout instead of failing. The card is chosen by serial only.
//! The connection is opened lazily and dropped on any PC/SC error (card
//! pulled, reader reset); the next call reconnects by serial, so the backend
//! recovers when the card returns. The PIN is not tried at start-up: a
//! restart loop must not burn PIN retries; after one rejection the backend
//! latches and never sends the PIN again (see the `keystore` module doc).
//!
//! PIV replaces the key in a slot without asking, so generation first proves
//! the slot empty. Firmware 5.3+ answers GET METADATA; older cards cannot say
//! "empty", only show a key (an attestation, 4.3+, or a certificate). Where
//! nothing proves either way generation is refused unless the operator sets
//! `dangerously_generate_into_unverified_slot`. A card error during the check
//! is an error, never "empty".

use crate::keystore::{
    Capabilities, GeneratedKey, KeyAlgorithm, KeyHandle, KeyProtection, KeySpec, KeyStore,
    KeyStoreError, PinFailure, SlotCheck, SlotEvidence,
};
use async_trait::async_trait;
use der::{Decode, Encode};
use secrecy::{ExposeSecret, SecretString};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::Semaphore;
use yubikey::piv::{self, AlgorithmId, SlotAlgorithmId, SlotId};
use yubikey::{MgmAlgorithmId, MgmKey, PinPolicy, Serial, TouchPolicy, YubiKey};

/// Object id of the attestation intermediate certificate (slot F9).
const ATTESTATION_CERT_OBJECT: u32 = 0x005f_ff01;

pub fn parse_slot(s: &str) -> Result<SlotId, String> {
    let lower = s.to_ascii_lowercase();
    match lower.parse::<SlotId>() {
        Ok(SlotId::Attestation) | Ok(SlotId::Management(_)) => Err(format!(
            "slot `{s}` cannot hold a signing key (use 9a, 9c, 9d, 9e or 82-95)"
        )),
        Ok(slot) => Ok(slot),
        Err(_) => Err(format!(
            "unknown PIV slot `{s}` (use 9a, 9c, 9d, 9e or 82-95)"
        )),
    }
}

fn slot_name(slot: SlotId) -> String {
    format!("{:02x}", u8::from(slot))
}

pub fn parse_management_algorithm(s: &str) -> Result<MgmAlgorithmId, String> {
    match s {
        "3des" => Ok(MgmAlgorithmId::ThreeDes),
        "aes128" => Ok(MgmAlgorithmId::Aes128),
        "aes192" => Ok(MgmAlgorithmId::Aes192),
        "aes256" => Ok(MgmAlgorithmId::Aes256),
        other => Err(format!(
            "unknown management key algorithm `{other}` (3des, aes128, aes192, aes256)"
        )),
    }
}

pub fn parse_pin_policy(s: &str) -> Result<PinPolicy, String> {
    match s {
        "never" => Ok(PinPolicy::Never),
        "once" => Ok(PinPolicy::Once),
        "always" => Ok(PinPolicy::Always),
        other => Err(format!(
            "unknown PIN policy `{other}` (never, once, always)"
        )),
    }
}

pub fn parse_touch_policy(s: &str) -> Result<TouchPolicy, String> {
    match s {
        "never" => Ok(TouchPolicy::Never),
        "always" => Ok(TouchPolicy::Always),
        "cached" => Ok(TouchPolicy::Cached),
        other => Err(format!(
            "unknown touch policy `{other}` (never, always, cached)"
        )),
    }
}

/// Everything needed to reach and use one YubiKey slot.
pub struct YubiKeySettings {
    pub serial: u32,
    pub slot: SlotId,
    pub pin: SecretString,
    /// Hex-encoded management key.
    pub management_key: SecretString,
    pub management_key_algorithm: MgmAlgorithmId,
    pub pin_policy: PinPolicy,
    pub touch_policy: TouchPolicy,
    /// DER of the PIV attestation trust root, if attestation is to be checked.
    pub attestation_root_der: Option<Vec<u8>>,
    pub sign_timeout: Duration,
    /// Generate even when the card cannot prove the slot empty (firmware
    /// before 5.3 with no certificate or attestation in the slot). Whatever
    /// key is there is then lost. A slot proven occupied is refused anyway.
    /// Meant for one supervised run; generations it allowed come back as
    /// [`SlotCheck::UnverifiedOverride`] for the audit trail.
    pub dangerously_generate_into_unverified_slot: bool,
}

/// What the card shows about the configured slot.
#[derive(Debug)]
enum SlotState {
    /// GET METADATA says there is no key.
    Empty,
    /// A key is there.
    Occupied {
        evidence: SlotEvidence,
        /// DER SubjectPublicKeyInfo, when the evidence carries it.
        public: Option<Vec<u8>>,
        /// Whether the card generated the key (`None`: the card does not say).
        generated_on_card: Option<bool>,
    },
    /// The card cannot say (firmware before 5.3) and shows no sign of a key.
    Unverifiable { firmware: String },
}

/// Object id of a key slot's certificate (SP 800-73-4 / Yubico's retired slots).
fn certificate_object(slot: SlotId) -> u32 {
    match u8::from(slot) {
        0x9a => 0x005f_c105,
        0x9c => 0x005f_c10a,
        0x9d => 0x005f_c10b,
        0x9e => 0x005f_c101,
        // Retired key management slots 82..=95 map to 5FC10D..=5FC120.
        r => 0x005f_c10d + u32::from(r.saturating_sub(0x82)),
    }
}

/// The SubjectPublicKeyInfo a DER certificate certifies.
fn certified_key(cert_der: &[u8]) -> Option<Vec<u8>> {
    x509_cert::Certificate::from_der(cert_der)
        .ok()?
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .ok()
}

/// A verified attestation: the slot's attestation certificate and the F9
/// intermediate that signed it, both checked against the configured root.
#[derive(Debug, Clone)]
pub struct Attestation {
    pub certificate_der: Vec<u8>,
    pub intermediate_der: Vec<u8>,
}

struct Inner {
    settings: YubiKeySettings,
    card: Mutex<Option<YubiKey>>,
    /// Set by the first rejected PIN; never cleared (a restart is the operator action).
    pin_latch: OnceLock<PinFailure>,
}

pub struct YubiKeyKeyStore {
    inner: Arc<Inner>,
    queue: Arc<Semaphore>,
    caps: Capabilities,
}

fn map_err(e: yubikey::Error) -> KeyStoreError {
    use yubikey::Error as E;
    match e {
        // The crate reports a blocked PIN (SW 6983 on VERIFY) as "0 tries left".
        E::WrongPin { tries: 0 } | E::PinLocked => KeyStoreError::PinRejected(PinFailure::Locked),
        E::WrongPin { tries } => KeyStoreError::PinRejected(PinFailure::Incorrect {
            retries_left: Some(tries),
        }),
        E::AuthenticationError => KeyStoreError::ManagementKeyRejected,
        E::PcscError { .. } | E::NotFound => KeyStoreError::DeviceUnavailable(e.to_string()),
        other => KeyStoreError::Device(other.to_string()),
    }
}

fn is_connection_error(e: &KeyStoreError) -> bool {
    matches!(e, KeyStoreError::DeviceUnavailable(_))
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
                .map_err(|_| KeyStoreError::Device("management key is not valid hex".into()))?,
        );
        MgmKey::from_bytes(
            bytes.as_slice(),
            Some(self.settings.management_key_algorithm),
        )
        .map_err(|_| {
            KeyStoreError::Device("management key has the wrong length for its algorithm".into())
        })
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
            .map_err(|_| KeyStoreError::Worker("YubiKey connection lock poisoned".into()))?;
        // Checked under the card lock: calls queued behind the one whose PIN
        // was rejected must not try it again.
        if let Some(f) = self.pin_latch.get() {
            return Err(KeyStoreError::PinLatched(*f));
        }
        let mut reused = guard.is_some();
        loop {
            if guard.is_none() {
                let yk = YubiKey::open_by_serial(Serial(self.settings.serial)).map_err(|e| {
                    KeyStoreError::DeviceUnavailable(format!(
                        "no YubiKey with serial {} ({e})",
                        self.settings.serial
                    ))
                })?;
                *guard = Some(yk);
            }
            let yk = guard
                .as_mut()
                .ok_or_else(|| KeyStoreError::Worker("YubiKey connection vanished".into()))?;
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

    /// What the card shows about the slot. Only "reference data not found"
    /// from GET METADATA means empty; any other card error is returned.
    fn slot_state(&self, yk: &mut YubiKey) -> Result<SlotState, KeyStoreError> {
        match piv::metadata(yk, self.settings.slot) {
            Ok(meta) => {
                if !matches!(meta.algorithm, SlotAlgorithmId::Asymmetric(_)) {
                    return Err(KeyStoreError::Malformed(
                        "slot metadata names no key algorithm".into(),
                    ));
                }
                let public = meta
                    .public
                    .map(|spki| spki.to_der())
                    .transpose()
                    .map_err(|e| KeyStoreError::Malformed(e.to_string()))?;
                Ok(SlotState::Occupied {
                    evidence: SlotEvidence::Metadata,
                    public,
                    generated_on_card: meta.origin.map(|o| matches!(o, piv::Origin::Generated)),
                })
            }
            Err(yubikey::Error::NotFound) => Ok(SlotState::Empty),
            // 6D00: firmware before 5.3 has no GET METADATA.
            Err(yubikey::Error::NotSupported) => self.slot_state_without_metadata(yk),
            Err(e) => Err(map_err(e)),
        }
    }

    /// Firmware before 5.3: look for signs of a key. Nothing here can show
    /// the slot empty; at best it is [`SlotState::Unverifiable`].
    fn slot_state_without_metadata(&self, yk: &mut YubiKey) -> Result<SlotState, KeyStoreError> {
        // An attestation (4.3+) is the card itself vouching for a key it
        // generated; it also carries the current public key.
        match piv::attest(yk, self.settings.slot) {
            Ok(cert) => {
                return Ok(SlotState::Occupied {
                    evidence: SlotEvidence::Attestation,
                    public: certified_key(&cert),
                    generated_on_card: Some(true),
                });
            }
            // 6D00: no ATTEST before 4.3.
            Err(yubikey::Error::NotSupported) => {}
            // The card answered with an error status, which the crate does not
            // pass on: an empty slot, an imported key and attestation trouble
            // all look alike. No evidence either way.
            Err(yubikey::Error::GenericError) => {}
            Err(e) => return Err(map_err(e)),
        }
        match yk.fetch_object(certificate_object(self.settings.slot)) {
            Ok(obj) if !obj.is_empty() => {
                return Ok(SlotState::Occupied {
                    evidence: SlotEvidence::Certificate,
                    public: certified_key(&unwrap_object(&obj)),
                    generated_on_card: None,
                });
            }
            Ok(_) | Err(yubikey::Error::NotFound) => {}
            Err(e) => return Err(map_err(e)),
        }
        Ok(SlotState::Unverifiable {
            firmware: yk.version().to_string(),
        })
    }

    /// The slot's public key; `KeyNotFound` when the slot is proven empty.
    fn slot_public_key(&self, yk: &mut YubiKey) -> Result<Vec<u8>, KeyStoreError> {
        match self.slot_state(yk)? {
            SlotState::Occupied {
                public: Some(p), ..
            } => Ok(p),
            SlotState::Occupied { public: None, .. } => Err(KeyStoreError::Malformed(
                "the slot's key is there but its public key could not be decoded".into(),
            )),
            SlotState::Empty => Err(KeyStoreError::KeyNotFound(self.handle())),
            SlotState::Unverifiable { firmware } => Err(KeyStoreError::PublicKeyUnreadable {
                slot: slot_name(self.settings.slot),
                firmware,
            }),
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
        let permit = tokio::time::timeout(timeout, self.queue.clone().acquire_owned())
            .await
            .map_err(|_| KeyStoreError::Busy(timeout))?
            .map_err(|e| KeyStoreError::Worker(e.to_string()))?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            inner.with_card(f)
        })
        .await
        .map_err(|e| KeyStoreError::Worker(e.to_string()))?
    }

    /// Reads the slot's attestation certificate and checks it: signed by the
    /// card's F9 intermediate, which is signed by the configured root, and
    /// certifying the slot's current public key.
    pub async fn attest(&self, handle: &KeyHandle) -> Result<Attestation, KeyStoreError> {
        self.inner.check_handle(handle)?;
        self.run(|inner, yk| {
            let root = inner.settings.attestation_root_der.clone().ok_or_else(|| {
                KeyStoreError::Attestation("no attestation_root configured".into())
            })?;
            let cert = piv::attest(yk, inner.settings.slot)
                .map_err(map_err)?
                .to_vec();
            let intermediate = yk
                .fetch_object(ATTESTATION_CERT_OBJECT)
                .map_err(map_err)?
                .to_vec();
            let intermediate = unwrap_object(&intermediate);
            let public = inner.slot_public_key(yk)?;
            verify_attestation(&cert, &intermediate, &root, &public)?;
            Ok(Attestation {
                certificate_der: cert,
                intermediate_der: intermediate,
            })
        })
        .await
    }
}

/// PIV objects wrap certificates as `70 <len> <DER> 71 01 00 [FE 00]`; return the DER.
fn unwrap_object(obj: &[u8]) -> Vec<u8> {
    if obj.first() == Some(&0x70)
        && let Some(&first) = obj.get(1)
    {
        // BER length: short form, or 0x81/0x82 followed by 1 or 2 length octets.
        let (len, n) = match first {
            l if l < 0x80 => (usize::from(l), 1),
            0x81 => (obj.get(2).map(|b| usize::from(*b)).unwrap_or(0), 2),
            0x82 => (
                obj.get(2..4)
                    .map(|b| usize::from(b[0]) << 8 | usize::from(b[1]))
                    .unwrap_or(0),
                3,
            ),
            _ => return obj.to_vec(),
        };
        if let Some(der) = obj.get(1 + n..1 + n + len) {
            return der.to_vec();
        }
    }
    obj.to_vec()
}

fn verify_attestation(
    cert: &[u8],
    intermediate: &[u8],
    root: &[u8],
    public_key: &[u8],
) -> Result<(), KeyStoreError> {
    let bad = |m: &str| KeyStoreError::Attestation(m.to_string());
    if !crate::ca::x509::verify_issued_by(intermediate, root) {
        return Err(bad(
            "the card's attestation intermediate (F9) does not chain to the configured root",
        ));
    }
    if !crate::ca::x509::verify_issued_by(cert, intermediate) {
        return Err(bad(
            "the slot attestation certificate is not signed by the card's F9 key",
        ));
    }
    let attested = x509_cert::Certificate::from_der(cert)
        .and_then(|c| c.tbs_certificate().subject_public_key_info().to_der())
        .map_err(|e| bad(&e.to_string()))?;
    if attested != public_key {
        return Err(bad(
            "the attestation certifies a different public key than the slot holds",
        ));
    }
    Ok(())
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
            return Err(KeyStoreError::Device(
                "PIV keys can never be exported; extractable keys are not possible here".into(),
            ));
        }
        self.run(move |inner, yk| {
            let slot = slot_name(inner.settings.slot);
            let slot_check = match inner.slot_state(yk)? {
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
            yk.authenticate(&inner.management_key()?).map_err(map_err)?;
            let spki = piv::generate(
                yk,
                inner.settings.slot,
                alg,
                inner.settings.pin_policy,
                inner.settings.touch_policy,
            )
            .map_err(map_err)?;
            Ok(GeneratedKey {
                handle: inner.handle(),
                public_key_der: spki
                    .to_der()
                    .map_err(|e| KeyStoreError::Malformed(e.to_string()))?,
                slot_check,
            })
        })
        .await
    }

    async fn public_key(&self, handle: &KeyHandle) -> Result<Vec<u8>, KeyStoreError> {
        self.inner.check_handle(handle)?;
        self.run(move |inner, yk| inner.slot_public_key(yk)).await
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
                .map_err(map_err)?;
            let sig = piv::sign_data(yk, &digest, alg, inner.settings.slot).map_err(map_err)?;
            Ok(sig.to_vec())
        })
        .await
    }

    async fn exists(&self, handle: &KeyHandle) -> Result<bool, KeyStoreError> {
        self.inner.check_handle(handle)?;
        // "Cannot tell" counts as "may hold a key": callers must never take
        // an unverifiable slot for an empty one.
        self.run(|inner, yk| Ok(!matches!(inner.slot_state(yk)?, SlotState::Empty)))
            .await
    }

    async fn protection(&self, handle: &KeyHandle) -> Result<KeyProtection, KeyStoreError> {
        self.inner.check_handle(handle)?;
        self.run(move |inner, yk| {
            let generated = match inner.slot_state(yk)? {
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
            yk.authenticate(&inner.management_key()?).map_err(map_err)?;
            let c = yubikey::certificate::Certificate::from_bytes(cert.clone()).map_err(map_err)?;
            c.write(
                yk,
                inner.settings.slot,
                yubikey::certificate::CertInfo::Uncompressed,
            )
            .map_err(map_err)
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
        self.run(|_, yk| yk.get_pin_retries().map(drop).map_err(map_err))
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
        .map_err(|e| KeyStoreError::Worker(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_policies_and_algorithms_parse() {
        assert_eq!(parse_slot("9c").unwrap(), SlotId::Signature);
        assert_eq!(parse_slot("9A").unwrap(), SlotId::Authentication);
        assert!(parse_slot("f9").is_err());
        assert!(parse_slot("zz").is_err());
        assert!(parse_management_algorithm("aes192").is_ok());
        assert!(parse_management_algorithm("des").is_err());
        assert!(parse_pin_policy("sometimes").is_err());
        assert!(parse_touch_policy("cached").is_ok());
    }

    #[test]
    fn certificate_objects_follow_sp800_73() {
        assert_eq!(certificate_object(SlotId::Signature), 0x005f_c10a);
        assert_eq!(certificate_object(parse_slot("9a").unwrap()), 0x005f_c105);
        assert_eq!(certificate_object(parse_slot("9e").unwrap()), 0x005f_c101);
        assert_eq!(certificate_object(parse_slot("82").unwrap()), 0x005f_c10d);
        assert_eq!(certificate_object(parse_slot("95").unwrap()), 0x005f_c120);
    }

    #[test]
    fn piv_objects_are_unwrapped() {
        let der = vec![0x30, 0x03, 0x02, 0x01, 0x05];
        let mut obj = vec![0x70, der.len() as u8];
        obj.extend(&der);
        obj.extend([0x71, 0x01, 0x00, 0xfe, 0x00]);
        assert_eq!(unwrap_object(&obj), der);
        let mut long = vec![0x70, 0x82, 0x00, 0x05];
        long.extend(&der);
        assert_eq!(unwrap_object(&long), der);
        assert_eq!(unwrap_object(&der), der);
    }
}
