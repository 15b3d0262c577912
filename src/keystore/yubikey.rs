//! YubiKey PIV backend (`yubikey` crate over PC/SC): for low-volume keys
//! such as an offline root CA.
//!
//! A YubiKey signs one operation at a time, so calls queue on a semaphore
//! with a timeout instead of failing. The card is chosen by serial only.
//! The connection is opened lazily and dropped on any PC/SC error (card
//! pulled, reader reset); the next call reconnects by serial, so the backend
//! recovers when the card returns. The PIN is not tried at start-up: a
//! restart loop must not burn PIN retries.

use crate::keystore::{
    Capabilities, GeneratedKey, KeyAlgorithm, KeyHandle, KeyProtection, KeySpec, KeyStore,
    KeyStoreError,
};
use async_trait::async_trait;
use der::{Decode, Encode};
use secrecy::{ExposeSecret, SecretString};
use std::sync::{Arc, Mutex};
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
        E::WrongPin { tries: 0 } | E::PinLocked => KeyStoreError::PinLocked,
        E::WrongPin { tries } => KeyStoreError::PinIncorrectRetries(tries),
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
    /// failure drops the connection so that the next call reconnects.
    fn with_card<T>(
        &self,
        f: impl FnOnce(&Inner, &mut YubiKey) -> Result<T, KeyStoreError>,
    ) -> Result<T, KeyStoreError> {
        let mut guard = self
            .card
            .lock()
            .map_err(|_| KeyStoreError::Worker("YubiKey connection lock poisoned".into()))?;
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
        if matches!(&result, Err(e) if is_connection_error(e)) {
            *guard = None;
        }
        result
    }

    /// The slot's public key, or `None` when the slot is empty.
    fn slot_public_key(
        &self,
        yk: &mut YubiKey,
    ) -> Result<Option<(AlgorithmId, Vec<u8>)>, KeyStoreError> {
        match piv::metadata(yk, self.settings.slot) {
            Ok(meta) => {
                let alg = match meta.algorithm {
                    SlotAlgorithmId::Asymmetric(a) => a,
                    _ => {
                        return Err(KeyStoreError::Malformed(
                            "slot metadata names no key algorithm".into(),
                        ));
                    }
                };
                match meta.public {
                    Some(spki) => Ok(Some((
                        alg,
                        spki.to_der()
                            .map_err(|e| KeyStoreError::Malformed(e.to_string()))?,
                    ))),
                    None => Ok(None),
                }
            }
            Err(yubikey::Error::NotFound) => Ok(None),
            Err(e) => match map_err(e) {
                KeyStoreError::Device(_) => Ok(None),
                other => Err(other),
            },
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
            }),
            queue: Arc::new(Semaphore::new(1)),
            caps: Capabilities {
                algorithms: vec![KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384],
                max_concurrent_signers: 1,
                can_wrap_keys: false,
            },
        }
    }

    pub fn serial(&self) -> u32 {
        self.inner.settings.serial
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &mut YubiKey) -> Result<T, KeyStoreError> + Send + 'static,
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
            let (_, public) = inner
                .slot_public_key(yk)?
                .ok_or_else(|| KeyStoreError::Attestation("slot is empty".into()))?;
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
    if !crate::crypto::verify_issued_by(intermediate, root) {
        return Err(bad(
            "the card's attestation intermediate (F9) does not chain to the configured root",
        ));
    }
    if !crate::crypto::verify_issued_by(cert, intermediate) {
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
            if inner.slot_public_key(yk)?.is_some() {
                return Err(KeyStoreError::SlotOccupied(slot_name(inner.settings.slot)));
            }
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
            })
        })
        .await
    }

    async fn public_key(&self, handle: &KeyHandle) -> Result<Vec<u8>, KeyStoreError> {
        self.inner.check_handle(handle)?;
        let h = handle.clone();
        self.run(move |inner, yk| {
            inner
                .slot_public_key(yk)?
                .map(|(_, der)| der)
                .ok_or(KeyStoreError::KeyNotFound(h))
        })
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
                .map_err(map_err)?;
            let sig = piv::sign_data(yk, &digest, alg, inner.settings.slot).map_err(map_err)?;
            Ok(sig.to_vec())
        })
        .await
    }

    async fn exists(&self, handle: &KeyHandle) -> Result<bool, KeyStoreError> {
        self.inner.check_handle(handle)?;
        self.run(|inner, yk| Ok(inner.slot_public_key(yk)?.is_some()))
            .await
    }

    async fn protection(&self, handle: &KeyHandle) -> Result<KeyProtection, KeyStoreError> {
        self.inner.check_handle(handle)?;
        let h = handle.clone();
        self.run(move |inner, yk| {
            let meta = piv::metadata(yk, inner.settings.slot)
                .map_err(|_| KeyStoreError::KeyNotFound(h))?;
            let generated = matches!(meta.origin, Some(piv::Origin::Generated));
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
            let c = yubikey::certificate::Certificate::from_bytes(cert).map_err(map_err)?;
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
