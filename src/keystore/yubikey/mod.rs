//! YubiKey PIV backend (`yubikey` crate over PC/SC): for low-volume keys
//! such as an offline root CA. `backend` is the `KeyStore`; `objects` knows
//! slots, certificate objects and slot occupancy; `attestation` checks the
//! card's attestation chain; `settings` holds the configuration.
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

mod attestation;
mod backend;
mod objects;
mod settings;

pub use attestation::Attestation;
pub use backend::YubiKeyKeyStore;
pub use objects::parse_slot;
pub use settings::{
    YubiKeySettings, parse_management_algorithm, parse_pin_policy, parse_touch_policy,
};

use crate::keystore::{KeyStoreError, PinFailure};

/// The key store error for a card error.
fn card_error(e: yubikey::Error) -> KeyStoreError {
    use yubikey::Error as E;
    match e {
        // The crate reports a blocked PIN (SW 6983 on VERIFY) as "0 tries left".
        E::WrongPin { tries: 0 } | E::PinLocked => KeyStoreError::PinRejected(PinFailure::Locked),
        E::WrongPin { tries } => KeyStoreError::PinRejected(PinFailure::Incorrect {
            retries_left: Some(tries),
        }),
        E::AuthenticationError => KeyStoreError::ManagementKeyRejected,
        E::PcscError { .. } | E::NotFound => KeyStoreError::DeviceUnavailable { source: e },
        other => KeyStoreError::Device { source: other },
    }
}
