//! PIV attestation: the slot's attestation certificate, the card's F9 intermediate, and their
//! check against the configured trust root and the slot's current public key.

use super::card_error;
use super::objects::{slot_public_key, unwrap_object};
use crate::keystore::{AttestationError, KeyHandle, KeyStoreError};
use der::{Decode, Encode};
use yubikey::YubiKey;
use yubikey::piv::{self, SlotId};

/// Object id of the attestation intermediate certificate (slot F9).
const ATTESTATION_CERT_OBJECT: u32 = 0x005f_ff01;

/// A verified attestation: the slot's attestation certificate and the F9
/// intermediate that signed it, both checked against the configured root.
#[derive(Debug, Clone)]
pub struct Attestation {
    pub certificate_der: Vec<u8>,
    pub intermediate_der: Vec<u8>,
}

/// Reads the slot's attestation and F9 certificates and verifies them
/// against `root` and the slot's public key.
pub(super) fn attest(
    yk: &mut YubiKey,
    slot: SlotId,
    handle: &KeyHandle,
    root: &[u8],
) -> Result<Attestation, KeyStoreError> {
    let cert = piv::attest(yk, slot).map_err(card_error)?.to_vec();
    let intermediate = yk
        .fetch_object(ATTESTATION_CERT_OBJECT)
        .map_err(card_error)?
        .to_vec();
    let intermediate = unwrap_object(&intermediate);
    let public = slot_public_key(yk, slot, handle)?;
    verify_attestation(&cert, &intermediate, root, &public)?;
    Ok(Attestation {
        certificate_der: cert,
        intermediate_der: intermediate,
    })
}

fn verify_attestation(
    cert: &[u8],
    intermediate: &[u8],
    root: &[u8],
    public_key: &[u8],
) -> Result<(), KeyStoreError> {
    if !crate::crypto::verify_issued_by(intermediate, root) {
        return Err(KeyStoreError::Attestation(
            AttestationError::IntermediateNotFromRoot,
        ));
    }
    if !crate::crypto::verify_issued_by(cert, intermediate) {
        return Err(KeyStoreError::Attestation(
            AttestationError::NotSignedByIntermediate,
        ));
    }
    let attested = x509_cert::Certificate::from_der(cert)
        .and_then(|c| c.tbs_certificate().subject_public_key_info().to_der())
        .map_err(|e| KeyStoreError::Attestation(AttestationError::Unparsable(e)))?;
    if attested != public_key {
        return Err(KeyStoreError::Attestation(AttestationError::DifferentKey));
    }
    Ok(())
}
