//! Key material: management-key block ciphers (3DES, AES) and the EC slot keys (P-256, P-384).

use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::elliptic_curve::Generate;

/// Fills `buf` with system randomness.
pub fn random(buf: &mut [u8]) -> Result<(), String> {
    getrandom::fill(buf).map_err(|e| format!("getrandom: {e}"))
}

/// Management key algorithm, with its PIV algorithm reference (GENERAL AUTHENTICATE P1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MgmAlg {
    Tdes,
    Aes128,
    Aes192,
    Aes256,
}

impl MgmAlg {
    pub fn id(self) -> u8 {
        match self {
            MgmAlg::Tdes => 0x03,
            MgmAlg::Aes128 => 0x08,
            MgmAlg::Aes192 => 0x0a,
            MgmAlg::Aes256 => 0x0c,
        }
    }

    pub fn from_id(id: u8) -> Option<MgmAlg> {
        match id {
            0x03 => Some(MgmAlg::Tdes),
            0x08 => Some(MgmAlg::Aes128),
            0x0a => Some(MgmAlg::Aes192),
            0x0c => Some(MgmAlg::Aes256),
            _ => None,
        }
    }

    pub fn key_len(self) -> usize {
        match self {
            MgmAlg::Tdes | MgmAlg::Aes192 => 24,
            MgmAlg::Aes128 => 16,
            MgmAlg::Aes256 => 32,
        }
    }

    pub fn block_len(self) -> usize {
        match self {
            MgmAlg::Tdes => 8,
            _ => 16,
        }
    }

    /// Parses the CLI spelling (`3des`, `aes128`, `aes192`, `aes256`).
    pub fn parse(name: &str) -> Option<MgmAlg> {
        match name.to_ascii_lowercase().as_str() {
            "3des" | "tdes" => Some(MgmAlg::Tdes),
            "aes128" => Some(MgmAlg::Aes128),
            "aes192" => Some(MgmAlg::Aes192),
            "aes256" => Some(MgmAlg::Aes256),
            _ => None,
        }
    }
}

/// A management key: algorithm plus raw key bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MgmKey {
    pub alg: MgmAlg,
    pub key: Vec<u8>,
}

impl MgmKey {
    pub fn new(alg: MgmAlg, key: Vec<u8>) -> Result<MgmKey, String> {
        if key.len() != alg.key_len() {
            return Err(format!(
                "{alg:?} management key must be {} bytes, got {}",
                alg.key_len(),
                key.len()
            ));
        }
        Ok(MgmKey { alg, key })
    }

    fn run(&self, block: &mut [u8], encrypt: bool) -> Result<(), String> {
        fn go<C: KeyInit + BlockCipherEncrypt + BlockCipherDecrypt>(
            key: &[u8],
            block: &mut [u8],
            encrypt: bool,
        ) -> Result<(), String> {
            let cipher = C::new_from_slice(key).map_err(|_| "bad key length".to_string())?;
            let block = block
                .try_into()
                .map_err(|_| "bad block length".to_string())?;
            if encrypt {
                cipher.encrypt_block(block);
            } else {
                cipher.decrypt_block(block);
            }
            Ok(())
        }
        match self.alg {
            MgmAlg::Tdes => go::<des::TdesEde3>(&self.key, block, encrypt),
            MgmAlg::Aes128 => go::<aes::Aes128>(&self.key, block, encrypt),
            MgmAlg::Aes192 => go::<aes::Aes192>(&self.key, block, encrypt),
            MgmAlg::Aes256 => go::<aes::Aes256>(&self.key, block, encrypt),
        }
    }

    /// Encrypts one block (length = `alg.block_len()`).
    pub fn encrypt(&self, block: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = block.to_vec();
        self.run(&mut out, true)?;
        Ok(out)
    }

    /// Decrypts one block (length = `alg.block_len()`).
    pub fn decrypt(&self, block: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = block.to_vec();
        self.run(&mut out, false)?;
        Ok(out)
    }
}

/// Asymmetric algorithms the emulator implements, with their PIV ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlg {
    P256,
    P384,
}

impl KeyAlg {
    pub fn id(self) -> u8 {
        match self {
            KeyAlg::P256 => 0x11,
            KeyAlg::P384 => 0x14,
        }
    }

    pub fn from_id(id: u8) -> Option<KeyAlg> {
        match id {
            0x11 => Some(KeyAlg::P256),
            0x14 => Some(KeyAlg::P384),
            _ => None,
        }
    }

    /// Field (and digest input) size in bytes.
    pub fn field_len(self) -> usize {
        match self {
            KeyAlg::P256 => 32,
            KeyAlg::P384 => 48,
        }
    }
}

/// A private EC key held in a slot.
#[derive(Clone)]
pub enum EcKey {
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
}

impl std::fmt::Debug for EcKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EcKey::{:?}", self.alg())
    }
}

impl EcKey {
    pub fn generate(alg: KeyAlg) -> Result<EcKey, String> {
        let mut rng = getrandom::SysRng;
        Ok(match alg {
            KeyAlg::P256 => EcKey::P256(
                p256::ecdsa::SigningKey::try_generate_from_rng(&mut rng)
                    .map_err(|e| format!("keygen: {e}"))?,
            ),
            KeyAlg::P384 => EcKey::P384(
                p384::ecdsa::SigningKey::try_generate_from_rng(&mut rng)
                    .map_err(|e| format!("keygen: {e}"))?,
            ),
        })
    }

    /// Imports a private scalar (big-endian, exactly the field size).
    pub fn from_scalar(alg: KeyAlg, scalar: &[u8]) -> Option<EcKey> {
        if scalar.len() != alg.field_len() {
            return None;
        }
        match alg {
            KeyAlg::P256 => p256::ecdsa::SigningKey::from_slice(scalar)
                .ok()
                .map(EcKey::P256),
            KeyAlg::P384 => p384::ecdsa::SigningKey::from_slice(scalar)
                .ok()
                .map(EcKey::P384),
        }
    }

    pub fn alg(&self) -> KeyAlg {
        match self {
            EcKey::P256(_) => KeyAlg::P256,
            EcKey::P384(_) => KeyAlg::P384,
        }
    }

    /// Uncompressed SEC1 point `04 ‖ X ‖ Y`.
    pub fn public_point(&self) -> Vec<u8> {
        match self {
            EcKey::P256(k) => k.verifying_key().to_sec1_point(false).as_bytes().to_vec(),
            EcKey::P384(k) => k.verifying_key().to_sec1_point(false).as_bytes().to_vec(),
        }
    }

    /// DER SubjectPublicKeyInfo of the public key.
    pub fn spki_der(&self) -> Result<Vec<u8>, String> {
        use p256::pkcs8::EncodePublicKey;
        let doc = match self {
            EcKey::P256(k) => k.verifying_key().to_public_key_der(),
            EcKey::P384(k) => k.verifying_key().to_public_key_der(),
        }
        .map_err(|e| format!("spki: {e}"))?;
        Ok(doc.as_bytes().to_vec())
    }

    /// ECDSA over a precomputed digest, as the card does: the input is left-padded to the
    /// field size when shorter. Returns the DER signature.
    pub fn sign_digest(&self, digest: &[u8]) -> Result<Vec<u8>, String> {
        let n = self.alg().field_len();
        if digest.len() > n || digest.is_empty() {
            return Err("digest length".into());
        }
        let mut padded = vec![0u8; n - digest.len()];
        padded.extend_from_slice(digest);
        match self {
            EcKey::P256(k) => {
                let sig: p256::ecdsa::Signature =
                    k.sign_prehash(&padded).map_err(|e| format!("sign: {e}"))?;
                Ok(sig.to_der().as_bytes().to_vec())
            }
            EcKey::P384(k) => {
                let sig: p384::ecdsa::Signature =
                    k.sign_prehash(&padded).map_err(|e| format!("sign: {e}"))?;
                Ok(sig.to_der().as_bytes().to_vec())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_ciphers_round_trip() {
        for alg in [MgmAlg::Tdes, MgmAlg::Aes128, MgmAlg::Aes192, MgmAlg::Aes256] {
            let key = MgmKey::new(alg, vec![7; alg.key_len()]).unwrap();
            let block = vec![1; alg.block_len()];
            let enc = key.encrypt(&block).unwrap();
            assert_ne!(enc, block);
            assert_eq!(key.decrypt(&enc).unwrap(), block);
            assert!(key.encrypt(&[0; 3]).is_err());
        }
        assert!(MgmKey::new(MgmAlg::Aes128, vec![0; 24]).is_err());
    }

    #[test]
    fn ec_sign_verifies() {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        let key = EcKey::generate(KeyAlg::P256).unwrap();
        let digest = [5u8; 32];
        let der = key.sign_digest(&digest).unwrap();
        let EcKey::P256(sk) = &key else { panic!() };
        let sig = p256::ecdsa::Signature::from_der(&der).unwrap();
        sk.verifying_key().verify_prehash(&digest, &sig).unwrap();
        assert_eq!(key.public_point().len(), 65);
        let k384 = EcKey::generate(KeyAlg::P384).unwrap();
        assert_eq!(k384.public_point().len(), 97);
        assert!(k384.sign_digest(&[1; 48]).is_ok());
        assert!(k384.sign_digest(&[1; 49]).is_err());
    }
}
