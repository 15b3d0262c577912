//! PIV slots and their objects: slot names, certificate objects, and what the card shows about
//! a slot's occupancy (GET METADATA on 5.3+, otherwise an attestation or a certificate).

use super::card_error;
use crate::keystore::{KeyHandle, KeyStoreError, Malformed, SlotEvidence};
use der::{Decode, Encode};
use yubikey::YubiKey;
use yubikey::piv::{self, SlotAlgorithmId, SlotId};

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

pub(super) fn slot_name(slot: SlotId) -> String {
    format!("{:02x}", u8::from(slot))
}

/// What the card shows about the configured slot.
#[derive(Debug)]
pub(super) enum SlotState {
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
pub(super) fn certificate_object(slot: SlotId) -> u32 {
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

/// PIV objects wrap certificates as `70 <len> <DER> 71 01 00 [FE 00]`; return the DER.
pub(super) fn unwrap_object(obj: &[u8]) -> Vec<u8> {
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

/// What the card shows about the slot. Only "reference data not found"
/// from GET METADATA means empty; any other card error is returned.
pub(super) fn slot_state(yk: &mut YubiKey, slot: SlotId) -> Result<SlotState, KeyStoreError> {
    match piv::metadata(yk, slot) {
        Ok(meta) => {
            if !matches!(meta.algorithm, SlotAlgorithmId::Asymmetric(_)) {
                return Err(KeyStoreError::Malformed(Malformed::NoSlotAlgorithm));
            }
            let public = meta
                .public
                .map(|spki| spki.to_der())
                .transpose()
                .map_err(KeyStoreError::Encoding)?;
            Ok(SlotState::Occupied {
                evidence: SlotEvidence::Metadata,
                public,
                generated_on_card: meta.origin.map(|o| matches!(o, piv::Origin::Generated)),
            })
        }
        Err(yubikey::Error::NotFound) => Ok(SlotState::Empty),
        // 6D00: firmware before 5.3 has no GET METADATA.
        Err(yubikey::Error::NotSupported) => slot_state_without_metadata(yk, slot),
        Err(e) => Err(card_error(e)),
    }
}

/// Firmware before 5.3: look for signs of a key. Nothing here can show
/// the slot empty; at best it is [`SlotState::Unverifiable`].
fn slot_state_without_metadata(yk: &mut YubiKey, slot: SlotId) -> Result<SlotState, KeyStoreError> {
    // An attestation (4.3+) is the card itself vouching for a key it
    // generated; it also carries the current public key.
    match piv::attest(yk, slot) {
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
        Err(e) => return Err(card_error(e)),
    }
    match yk.fetch_object(certificate_object(slot)) {
        Ok(obj) if !obj.is_empty() => {
            return Ok(SlotState::Occupied {
                evidence: SlotEvidence::Certificate,
                public: certified_key(&unwrap_object(&obj)),
                generated_on_card: None,
            });
        }
        Ok(_) | Err(yubikey::Error::NotFound) => {}
        Err(e) => return Err(card_error(e)),
    }
    Ok(SlotState::Unverifiable {
        firmware: yk.version().to_string(),
    })
}

/// The slot's public key; `KeyNotFound` (for `handle`) when the slot is proven empty.
pub(super) fn slot_public_key(
    yk: &mut YubiKey,
    slot: SlotId,
    handle: &KeyHandle,
) -> Result<Vec<u8>, KeyStoreError> {
    match slot_state(yk, slot)? {
        SlotState::Occupied {
            public: Some(p), ..
        } => Ok(p),
        SlotState::Occupied { public: None, .. } => {
            Err(KeyStoreError::Malformed(Malformed::UndecodablePublicKey))
        }
        SlotState::Empty => Err(KeyStoreError::KeyNotFound(handle.clone())),
        SlotState::Unverifiable { firmware } => Err(KeyStoreError::PublicKeyUnreadable {
            slot: slot_name(slot),
            firmware,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_parse() {
        assert_eq!(parse_slot("9c").unwrap(), SlotId::Signature);
        assert_eq!(parse_slot("9A").unwrap(), SlotId::Authentication);
        assert!(parse_slot("f9").is_err());
        assert!(parse_slot("zz").is_err());
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
