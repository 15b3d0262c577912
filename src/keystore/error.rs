//! `KeyStoreError`: what can go wrong with a key store, typed, with the device library's error
//! kept as the source, and a stable machine-readable `code()`.

use super::{KeyAlgorithm, KeyHandle, SlotEvidence};
use serde::Serialize;
use std::fmt;
use std::path::PathBuf;

/// Why a device refused the PIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum PinFailure {
    /// Wrong PIN (CKR_PIN_INCORRECT, PIV `63Cx`); the retries left when the device says.
    Incorrect { retries_left: Option<u8> },
    /// The PIN is blocked (CKR_PIN_LOCKED, PIV `6983`): the SO PIN or PUK unblocks it.
    Locked,
    /// The PIN must be changed before use (CKR_PIN_EXPIRED).
    Expired,
}

impl fmt::Display for PinFailure {
    /// Names the device's own status too: operators search for it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Only PIV reports the retries left.
            Self::Incorrect {
                retries_left: Some(n),
            } => write!(
                f,
                "wrong PIN (PIV 63Cx), {n} attempt(s) left before it locks"
            ),
            Self::Incorrect { retries_left: None } => f.write_str("wrong PIN (CKR_PIN_INCORRECT)"),
            Self::Locked => f.write_str(
                "the PIN is locked (CKR_PIN_LOCKED / PIV 6983); unblock it with the SO PIN or PUK",
            ),
            Self::Expired => {
                f.write_str("the PIN has expired (CKR_PIN_EXPIRED) and must be changed")
            }
        }
    }
}

/// Why a configured management key cannot be used (checked before the card sees it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ManagementKeyError {
    #[error("it is not valid hex")]
    NotHex,
    #[error("its length does not fit the configured management key algorithm")]
    WrongLength,
}

/// Why a PIV attestation did not verify.
#[derive(Debug, thiserror::Error)]
pub enum AttestationError {
    #[error("no attestation_root is configured")]
    NoRoot,
    #[error("the card's attestation intermediate (F9) does not chain to the configured root")]
    IntermediateNotFromRoot,
    #[error("the slot attestation certificate is not signed by the card's F9 key")]
    NotSignedByIntermediate,
    #[error("the attestation certifies a different public key than the slot holds")]
    DifferentKey,
    #[error("the attestation certificate cannot be parsed")]
    Unparsable(#[source] der::Error),
}

/// Something the device returned that keyward cannot use.
#[derive(Debug, thiserror::Error)]
pub enum Malformed {
    #[error("the public key object is missing")]
    NoPublicKey,
    #[error("the public key has no CKA_EC_POINT")]
    NoEcPoint,
    #[error("the RSA public key lacks its modulus or exponent")]
    NoRsaComponents,
    #[error("the EC key has no named curve")]
    NoNamedCurve,
    #[error("unsupported curve {0}")]
    UnsupportedCurve(const_oid::ObjectIdentifier),
    #[error("unsupported RSA key size {0} bits")]
    UnsupportedRsaSize(usize),
    #[error("unsupported key type {0:?}")]
    UnsupportedKeyType(Option<cryptoki::object::KeyType>),
    #[error("the slot metadata names no key algorithm")]
    NoSlotAlgorithm,
    #[error("the slot's key is there but its public key could not be decoded")]
    UndecodablePublicKey,
}

/// Token labels and serials, listed in a "token not found" error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokensPresent(pub Vec<String>);

impl TokensPresent {
    pub fn contains(&self, needle: &str) -> bool {
        self.0.iter().any(|t| t.contains(needle))
    }
}

impl fmt::Display for TokensPresent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&self.0.join(", "))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error("cannot load PKCS#11 module {}", path.display())]
    ModuleLoad {
        path: PathBuf,
        #[source]
        source: cryptoki::error::Error,
    },
    #[error("no initialised token matches {selector}; tokens present: {present}")]
    TokenNotFound {
        selector: String,
        present: TokensPresent,
    },
    #[error(
        "the device rejected the PIN ({0}); keyward will not try it again: correct the PIN \
         (file or env) and restart keyward"
    )]
    PinRejected(PinFailure),
    #[error(
        "the device rejected the PIN earlier ({0}) and keyward stopped logging in so as not to \
         use up the PIN's retries; operator action needed: correct the PIN (file or env) and \
         restart keyward"
    )]
    PinLatched(PinFailure),
    #[error("the device rejected the management key")]
    ManagementKeyRejected,
    #[error("the configured management key cannot be used: {0}")]
    ManagementKeyInvalid(ManagementKeyError),
    #[error("no YubiKey with serial {serial} is connected")]
    CardNotFound {
        serial: u32,
        #[source]
        source: yubikey::Error,
    },
    #[error("the YubiKey is not available (removed, reset or disconnected)")]
    DeviceUnavailable {
        #[source]
        source: yubikey::Error,
    },
    #[error("the YubiKey refused the operation")]
    Device {
        #[source]
        source: yubikey::Error,
    },
    #[error("the {backend} backend cannot create extractable keys")]
    ExtractableUnsupported { backend: &'static str },
    #[error("slot {slot} already holds a key ({evidence}); refusing to overwrite it")]
    SlotOccupied {
        slot: String,
        evidence: SlotEvidence,
    },
    #[error(
        "slot {slot}: a card with firmware {firmware} cannot prove the slot is empty (GET METADATA \
         needs 5.3 or later) and shows no certificate or attestation for it, so generating could \
         silently replace a key there; refusing. To proceed, check the slot with a tool you trust \
         or reset the PIV applet, then set `dangerously_generate_into_unverified_slot = true` on \
         this key store for that one run (it is recorded in the audit trail) and remove it afterwards"
    )]
    SlotUnverifiable { slot: String, firmware: String },
    #[error(
        "slot {slot}: a card with firmware {firmware} cannot report the slot's public key \
         (GET METADATA needs 5.3 or later; no attestation or certificate for it)"
    )]
    PublicKeyUnreadable { slot: String, firmware: String },
    #[error("the device was busy for {0:?} (it signs one operation at a time)")]
    Busy(std::time::Duration),
    #[error("attestation failed: {0}")]
    Attestation(#[source] AttestationError),
    #[error("key store `{0}` is not configured")]
    UnknownKeyStore(String),
    #[error("key not found on the token: {0}")]
    KeyNotFound(KeyHandle),
    #[error("the key {0} is not extractable; only keys generated extractable can be wrapped out")]
    NotExtractable(KeyHandle),
    #[error(
        "the token cannot wrap the key {0} out (CKR_KEY_NOT_WRAPPABLE; SoftHSM 2.6 cannot wrap \
         Ed25519 keys): use another algorithm for keys that must be exported"
    )]
    NotWrappable(KeyHandle),
    #[error("the wrapped key did not unwrap to a PKCS#8 private key")]
    UnwrapFailed,
    #[error(
        "the token refused to unwrap the key into itself ({0}): a wrong wrapping key, a damaged \
         wrapped key, or a token that cannot import this key type"
    )]
    UnwrapRefused(#[source] cryptoki::error::Error),
    #[error("the token already holds a key with the id of {0}; refusing to restore over it")]
    KeyIdInUse(KeyHandle),
    #[error("the restored key's public half does not match the recorded public key")]
    PublicKeyMismatch,
    #[error("the system random number generator failed")]
    RandomUnavailable,
    #[error("invalid key handle `{0}`")]
    BadHandle(String),
    #[error("algorithm {0} is not supported by this token")]
    Unsupported(KeyAlgorithm),
    #[error("operation not supported by the {backend} backend: {operation}")]
    OperationUnsupported {
        backend: &'static str,
        operation: &'static str,
    },
    #[error("the device returned an unusable value: {0}")]
    Malformed(#[source] Malformed),
    #[error("a key or signature could not be encoded")]
    Encoding(#[source] der::Error),
    #[error("HSM call failed: {0}")]
    Pkcs11(#[source] cryptoki::error::Error),
    #[error("the HSM worker thread failed")]
    Worker(#[source] tokio::task::JoinError),
    #[error("the key store's request queue is closed")]
    QueueClosed(#[source] tokio::sync::AcquireError),
    #[error("internal lock poisoned: {0}")]
    Poisoned(&'static str),
    /// A dedicated signer thread is gone (it could not start, or panicked
    /// with the request).
    #[error("the HSM signer thread is gone")]
    SignerGone,
}

impl KeyStoreError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::ModuleLoad { .. } => "module_load",
            Self::TokenNotFound { .. } => "token_not_found",
            Self::PinRejected(_) => "pin_rejected",
            Self::PinLatched(_) => "pin_latched",
            Self::ManagementKeyRejected => "management_key_rejected",
            Self::ManagementKeyInvalid(_) => "management_key_invalid",
            Self::CardNotFound { .. } => "device_not_found",
            Self::DeviceUnavailable { .. } => "device_unavailable",
            Self::Device { .. } => "device_error",
            Self::ExtractableUnsupported { .. } => "extractable_unsupported",
            Self::SlotOccupied { .. } => "slot_occupied",
            Self::SlotUnverifiable { .. } => "slot_unverifiable",
            Self::PublicKeyUnreadable { .. } => "public_key_unreadable",
            Self::Busy(_) => "busy",
            Self::Attestation(_) => "attestation_failed",
            Self::UnknownKeyStore(_) => "unknown_keystore",
            Self::KeyNotFound(_) => "key_not_found",
            Self::NotExtractable(_) => "not_extractable",
            Self::NotWrappable(_) => "key_not_wrappable",
            Self::UnwrapFailed => "unwrap_failed",
            Self::UnwrapRefused(_) => "unwrap_refused",
            Self::PublicKeyMismatch => "public_key_mismatch",
            Self::KeyIdInUse(_) => "key_id_in_use",
            Self::RandomUnavailable => "random_unavailable",
            Self::BadHandle(_) => "bad_handle",
            Self::Unsupported(_) => "algorithm_unsupported",
            Self::OperationUnsupported { .. } => "operation_unsupported",
            Self::Malformed(_) => "malformed_response",
            Self::Encoding(_) => "encoding_failed",
            Self::Pkcs11(_) => "pkcs11_error",
            Self::Worker(_) => "worker_failed",
            Self::QueueClosed(_) => "queue_closed",
            Self::Poisoned(_) => "lock_poisoned",
            Self::SignerGone => "signer_gone",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_and_sources_kept() {
        let e = KeyStoreError::Pkcs11(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::DeviceError,
            cryptoki::context::Function::Sign,
        ));
        assert_eq!(e.code(), "pkcs11_error");
        let source = std::error::Error::source(&e).map(ToString::to_string);
        assert!(source.is_some_and(|s| s.contains("Sign")), "{e}");
        let e = KeyStoreError::Attestation(AttestationError::NoRoot);
        assert_eq!(e.code(), "attestation_failed");
        assert!(e.to_string().contains("attestation_root"));
        let e = KeyStoreError::TokenNotFound {
            selector: "token label `x`".into(),
            present: TokensPresent(vec![]),
        };
        assert!(e.to_string().ends_with("tokens present: none"), "{e}");
    }
}
