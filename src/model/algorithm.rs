//! Key algorithms, their X.509 identifiers and the digests they sign.

use const_oid::ObjectIdentifier;
use const_oid::db::{rfc5912, rfc8410};
use serde::{Deserialize, Serialize};
use spki::AlgorithmIdentifierOwned;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum KeyAlgorithm {
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    #[serde(rename = "ecdsa-p384")]
    EcdsaP384,
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    #[serde(rename = "rsa-3072")]
    Rsa3072,
    #[serde(rename = "rsa-4096")]
    Rsa4096,
    #[serde(rename = "ed25519")]
    Ed25519,
}

pub const ALL: [KeyAlgorithm; 6] = [
    KeyAlgorithm::EcdsaP256,
    KeyAlgorithm::EcdsaP384,
    KeyAlgorithm::Rsa2048,
    KeyAlgorithm::Rsa3072,
    KeyAlgorithm::Rsa4096,
    KeyAlgorithm::Ed25519,
];

impl KeyAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::EcdsaP384 => "ecdsa-p384",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa3072 => "rsa-3072",
            Self::Rsa4096 => "rsa-4096",
            Self::Ed25519 => "ed25519",
        }
    }

    pub fn rsa_bits(self) -> Option<u32> {
        match self {
            Self::Rsa2048 => Some(2048),
            Self::Rsa3072 => Some(3072),
            Self::Rsa4096 => Some(4096),
            _ => None,
        }
    }

    /// Named-curve OID for EC keys.
    pub fn curve_oid(self) -> Option<ObjectIdentifier> {
        match self {
            Self::EcdsaP256 => Some(rfc5912::SECP_256_R_1),
            Self::EcdsaP384 => Some(rfc5912::SECP_384_R_1),
            _ => None,
        }
    }

    /// The signature algorithm a certificate signed by this key carries.
    /// ECDSA and RSA identifiers follow RFC 5758 / RFC 4055 (RSA keeps a NULL parameter).
    pub fn signature_algorithm(self) -> AlgorithmIdentifierOwned {
        match self {
            Self::EcdsaP256 => AlgorithmIdentifierOwned {
                oid: rfc5912::ECDSA_WITH_SHA_256,
                parameters: None,
            },
            Self::EcdsaP384 => AlgorithmIdentifierOwned {
                oid: rfc5912::ECDSA_WITH_SHA_384,
                parameters: None,
            },
            Self::Rsa2048 | Self::Rsa3072 | Self::Rsa4096 => AlgorithmIdentifierOwned {
                oid: rfc5912::SHA_256_WITH_RSA_ENCRYPTION,
                parameters: Some(der::asn1::Any::null()),
            },
            Self::Ed25519 => AlgorithmIdentifierOwned {
                oid: rfc8410::ID_ED_25519,
                parameters: None,
            },
        }
    }

    /// The digest the HSM is given (ECDSA, RSA) or `None` when the mechanism
    /// takes the whole message (EdDSA).
    pub fn digest(self, message: &[u8]) -> Option<Vec<u8>> {
        match self {
            Self::EcdsaP256 | Self::Rsa2048 | Self::Rsa3072 | Self::Rsa4096 => Some(
                ring::digest::digest(&ring::digest::SHA256, message)
                    .as_ref()
                    .to_vec(),
            ),
            Self::EcdsaP384 => Some(
                ring::digest::digest(&ring::digest::SHA384, message)
                    .as_ref()
                    .to_vec(),
            ),
            Self::Ed25519 => None,
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "unknown key algorithm `{0}` (expected one of ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096, ed25519)"
)]
pub struct UnknownAlgorithm(pub String);

impl FromStr for KeyAlgorithm {
    type Err = UnknownAlgorithm;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL.iter()
            .copied()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownAlgorithm(s.to_string()))
    }
}

/// Converts a raw `r‖s` ECDSA signature (what PKCS#11 `CKM_ECDSA` returns)
/// into the DER `Ecdsa-Sig-Value` X.509 expects.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Result<Vec<u8>, der::Error> {
    use der::Encode;
    use der::asn1::UintRef;
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return Err(der::ErrorKind::Length {
            tag: der::Tag::Sequence,
        }
        .into());
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    #[derive(der::Sequence)]
    struct EcdsaSig<'a> {
        r: UintRef<'a>,
        s: UintRef<'a>,
    }
    EcdsaSig {
        r: UintRef::new(r)?,
        s: UintRef::new(s)?,
    }
    .to_der()
}

/// DigestInfo prefixes for RSA PKCS#1 v1.5 over SHA-256 (RFC 8017 §9.2 note 1),
/// used with plain `CKM_RSA_PKCS`, which every token has.
pub const SHA256_DIGEST_INFO_PREFIX: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in ALL {
            assert_eq!(a.as_str().parse::<KeyAlgorithm>().unwrap(), a);
        }
        assert!("dsa-1024".parse::<KeyAlgorithm>().is_err());
    }

    #[test]
    fn raw_signature_converts_to_der_with_leading_zero_handling() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x80; // high bit set: needs a 0x00 pad in DER
        raw[32] = 0x00;
        raw[33] = 0x01; // leading zero: must be stripped
        let der = ecdsa_raw_to_der(&raw).unwrap();
        assert_eq!(der[0], 0x30);
        assert_eq!(&der[2..5], &[0x02, 0x21, 0x00]);
        assert!(ecdsa_raw_to_der(&[1, 2, 3]).is_err());
    }
}
