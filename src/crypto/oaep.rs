//! RSA-OAEP encryption to a public key, in software: how audit data keys
//! are made ready for the HSM `audit-encryption` key, which alone can
//! decrypt them ([`crate::keystore::KeyStore::decrypt_data_key`]).
//!
//! The parameters are fixed: SHA-1 for the label hash and for MGF1, empty
//! label. SHA-1 because SoftHSM2 2.6 (and other modules) accept no other
//! OAEP hash; OAEP's security rests on the hash behaving as a random
//! oracle, not on collision resistance, so SHA-1 stays sound for key
//! transport (RFC 8017 still lists it; NIST SP 800-56B allows it).

use der::Decode;
use ring::rand::SecureRandom;
use rsa::traits::PaddingScheme;

#[derive(Debug, thiserror::Error)]
pub enum OaepError {
    #[error("the public key is not an RSA SubjectPublicKeyInfo: {0}")]
    NotRsa(String),
    #[error("RSA-OAEP encryption failed: {0}")]
    Encrypt(String),
}

/// The OS CSPRNG (ring) as the RNG the `rsa` crate asks for; its failure
/// is an error, never a panic.
struct SystemRng(ring::rand::SystemRandom);

impl rsa::rand_core::TryRng for SystemRng {
    type Error = super::RandomError;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.0.fill(dst).map_err(|_| super::RandomError)
    }
}

impl rsa::rand_core::TryCryptoRng for SystemRng {}

/// Encrypts `plaintext` (at most modulus length − 42 bytes) to the RSA
/// public key `spki_der` with RSA-OAEP (SHA-1, MGF1-SHA-1, empty label).
pub fn oaep_encrypt(spki_der: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, OaepError> {
    let spki = spki::SubjectPublicKeyInfoRef::from_der(spki_der)
        .map_err(|e| OaepError::NotRsa(e.to_string()))?;
    if spki.algorithm.oid != const_oid::db::rfc5912::RSA_ENCRYPTION {
        return Err(OaepError::NotRsa(format!(
            "algorithm {} is not rsaEncryption",
            spki.algorithm.oid
        )));
    }
    let key = <rsa::RsaPublicKey as rsa::pkcs8::DecodePublicKey>::from_public_key_der(spki_der)
        .map_err(|e| OaepError::NotRsa(e.to_string()))?;
    let mut rng = SystemRng(ring::rand::SystemRandom::new());
    rsa::Oaep::<sha1::Sha1>::new()
        .encrypt(&mut rng, &key, plaintext)
        .map_err(|e| OaepError::Encrypt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_rsa_key_is_refused() {
        // An Ed25519 SPKI (RFC 8410 test vector).
        let spki = hex::decode(
            "302a300506032b657003210019bf44096984cdfe8541bac167dc3b96c85086aa30b6b6cb0c5c38ad703166e1",
        )
        .unwrap();
        assert!(matches!(
            oaep_encrypt(&spki, b"x"),
            Err(OaepError::NotRsa(_))
        ));
        assert!(matches!(
            oaep_encrypt(b"not der", b"x"),
            Err(OaepError::NotRsa(_))
        ));
    }
}
