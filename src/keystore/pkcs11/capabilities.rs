//! What a PKCS#11 token can do, discovered from its mechanisms at open and, for what no query
//! reveals (whether keys can be made unmodifiable), learned from the first key generation.

use crate::keystore::{Capabilities, KeyAlgorithm};
use cryptoki::context::Pkcs11;
use cryptoki::mechanism::MechanismType;
use cryptoki::slot::Slot;
use std::sync::OnceLock;

const WANTED_MECHANISMS: [MechanismType; 7] = [
    MechanismType::ECC_KEY_PAIR_GEN,
    MechanismType::ECDSA,
    MechanismType::RSA_PKCS_KEY_PAIR_GEN,
    MechanismType::RSA_PKCS,
    MechanismType::ECC_EDWARDS_KEY_PAIR_GEN,
    MechanismType::EDDSA,
    MechanismType::AES_KEY_WRAP_PAD,
];

/// Asks for the mechanisms keyward uses, one by one: C_GetMechanismList also
/// returns vendor mechanisms that cryptoki logs as errors.
pub(super) fn discover(ctx: &Pkcs11, slot: Slot, sessions: usize) -> Capabilities {
    let mechanisms: Vec<MechanismType> = WANTED_MECHANISMS
        .iter()
        .copied()
        .filter(|m| match ctx.get_mechanism_info(slot, *m) {
            // Key export needs the mechanism to wrap (CKF_WRAP), not only to exist.
            Ok(info) if *m == MechanismType::AES_KEY_WRAP_PAD => info.wrap(),
            Ok(_) => true,
            Err(_) => false,
        })
        .collect();
    from_mechanisms(&mechanisms, sessions)
}

fn from_mechanisms(mechanisms: &[MechanismType], sessions: usize) -> Capabilities {
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

/// The capabilities known at open, completed once a generation has shown
/// whether the module accepts `CKA_MODIFIABLE=false`.
pub(super) struct LearnedCapabilities {
    at_open: Capabilities,
    learned: OnceLock<Capabilities>,
}

impl LearnedCapabilities {
    pub(super) fn new(at_open: Capabilities) -> Self {
        Self {
            at_open,
            learned: OnceLock::new(),
        }
    }

    pub(super) fn get(&self) -> &Capabilities {
        self.learned.get().unwrap_or(&self.at_open)
    }

    /// Whether to ask for unmodifiable keys: yes until the module refused.
    pub(super) fn try_unmodifiable(&self) -> bool {
        self.get().unmodifiable_keys.unwrap_or(true)
    }

    /// Records what the module did with `CKA_MODIFIABLE=false` (first answer wins).
    pub(super) fn record_unmodifiable(&self, accepted: bool) {
        let _ = self.learned.set(Capabilities {
            unmodifiable_keys: Some(accepted),
            ..self.at_open.clone()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithms_need_both_generation_and_signing() {
        let c = from_mechanisms(&[MechanismType::ECC_KEY_PAIR_GEN], 3);
        assert!(c.algorithms.is_empty());
        assert_eq!(c.max_concurrent_signers, 3);
        let c = from_mechanisms(
            &[
                MechanismType::ECC_KEY_PAIR_GEN,
                MechanismType::ECDSA,
                MechanismType::AES_KEY_WRAP_PAD,
            ],
            1,
        );
        assert_eq!(
            c.algorithms,
            vec![KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384]
        );
        assert!(c.can_wrap_keys);
    }

    #[test]
    fn unmodifiable_is_learned_once() {
        let l = LearnedCapabilities::new(from_mechanisms(&[], 1));
        assert_eq!(l.get().unmodifiable_keys, None);
        assert!(l.try_unmodifiable());
        l.record_unmodifiable(false);
        l.record_unmodifiable(true);
        assert_eq!(l.get().unmodifiable_keys, Some(false));
        assert!(!l.try_unmodifiable());
    }
}
