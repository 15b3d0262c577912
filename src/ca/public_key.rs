//! Device public keys: the CSR's SubjectPublicKeyInfo checked against the key
//! types keyward issues for, and re-encoded canonically for the certificate.
//!
//! Certificates never carry the requester's encoding: the algorithm
//! identifier is rebuilt from the key type (EC: id-ecPublicKey + the named
//! curve; RSA: rsaEncryption + NULL; Ed25519: no parameters) and the key
//! itself is re-encoded from its parsed parts. Anything whose meaning is not
//! exactly one of those keys is refused; the only tolerated deviation is an
//! RSA identifier without its NULL parameter (a known encoder quirk with one
//! possible meaning), which the certificate carries canonically.

use super::csr::{CsrError, Malformed, Unsupported};
use crate::keystore::KeyAlgorithm;
use const_oid::ObjectIdentifier;
use const_oid::db::{rfc5912, rfc8410};
use der::asn1::{Any, BitString, UintRef};
use der::{Decode, Encode, Tag, Tagged};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};

#[derive(der::Sequence)]
struct RsaPublicKey<'a> {
    n: UintRef<'a>,
    e: UintRef<'a>,
}

/// A public key of a type keyward issues for, with its canonical key bytes
/// (the contents of the subjectPublicKey BIT STRING).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    algorithm: KeyAlgorithm,
    key: Vec<u8>,
}

impl PublicKey {
    /// Checks a SubjectPublicKeyInfo (from a CSR) and identifies its key.
    pub fn from_spki(spki: &SubjectPublicKeyInfoOwned) -> Result<Self, CsrError> {
        let raw = spki
            .subject_public_key
            .as_bytes()
            .ok_or(Malformed::BitString("public key"))?;
        let params = spki.algorithm.parameters.as_ref();
        let oid = spki.algorithm.oid;
        if oid == rfc5912::ID_EC_PUBLIC_KEY {
            let algorithm = ec_curve(params)?;
            check_ec_point(algorithm, raw)?;
            Ok(Self {
                algorithm,
                key: raw.to_vec(),
            })
        } else if oid == rfc5912::RSA_ENCRYPTION {
            // RFC 3279 §2.3.1: the parameters MUST be NULL. Absent is
            // tolerated (it can mean nothing else); anything else is refused.
            if params.is_some_and(|p| p.tag() != Tag::Null || !p.value().is_empty()) {
                return Err(Malformed::RsaParameters.into());
            }
            let key = RsaPublicKey::from_der(raw).map_err(Malformed::RsaKey)?;
            let algorithm = match bit_length(key.n.as_bytes()) {
                2048 => KeyAlgorithm::Rsa2048,
                3072 => KeyAlgorithm::Rsa3072,
                4096 => KeyAlgorithm::Rsa4096,
                other => return Err(CsrError::KeySize(other)),
            };
            let e = key.e.as_bytes();
            if e.last().is_none_or(|b| b & 1 == 0) || bit_length(e) < 2 {
                return Err(Malformed::RsaExponent.into());
            }
            Ok(Self {
                algorithm,
                key: RsaPublicKey { n: key.n, e: key.e }.to_der()?,
            })
        } else if oid == rfc8410::ID_ED_25519 {
            // RFC 8410 §3: the parameters MUST be absent.
            if params.is_some() {
                return Err(Malformed::Ed25519Parameters.into());
            }
            if raw.len() != 32 {
                return Err(Malformed::Ed25519Length(raw.len()).into());
            }
            Ok(Self {
                algorithm: KeyAlgorithm::Ed25519,
                key: raw.to_vec(),
            })
        } else {
            Err(Unsupported::KeyAlgorithm(oid).into())
        }
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The key as signature verification takes it (EC point, RSAPublicKey
    /// DER, or the 32 Ed25519 bytes).
    pub fn key_bytes(&self) -> &[u8] {
        &self.key
    }

    /// The canonical DER SubjectPublicKeyInfo for a certificate.
    pub fn to_spki_der(&self) -> der::Result<Vec<u8>> {
        let (oid, parameters) = match self.algorithm {
            KeyAlgorithm::EcdsaP256 => (
                rfc5912::ID_EC_PUBLIC_KEY,
                Some(Any::from(rfc5912::SECP_256_R_1)),
            ),
            KeyAlgorithm::EcdsaP384 => (
                rfc5912::ID_EC_PUBLIC_KEY,
                Some(Any::from(rfc5912::SECP_384_R_1)),
            ),
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
                (rfc5912::RSA_ENCRYPTION, Some(Any::null()))
            }
            KeyAlgorithm::Ed25519 => (rfc8410::ID_ED_25519, None),
        };
        SubjectPublicKeyInfoOwned {
            algorithm: AlgorithmIdentifierOwned { oid, parameters },
            subject_public_key: BitString::from_bytes(&self.key)?,
        }
        .to_der()
    }

    /// Why a CSR signature did not verify: ring rejects a point that is not
    /// on its curve as a failed verification, so an EC key gets checked on
    /// its own (this failure path only) to say which it was.
    pub fn explain_bad_signature(&self) -> CsrError {
        use ring::agreement;
        let curve = match self.algorithm {
            KeyAlgorithm::EcdsaP256 => &agreement::ECDH_P256,
            KeyAlgorithm::EcdsaP384 => &agreement::ECDH_P384,
            _ => return CsrError::BadSignature,
        };
        let rng = ring::rand::SystemRandom::new();
        let Ok(ours) = agreement::EphemeralPrivateKey::generate(curve, &rng) else {
            return CsrError::BadSignature;
        };
        // ECDH validates the peer's point fully (on the curve, not the identity).
        let peer = agreement::UnparsedPublicKey::new(curve, &self.key);
        match agreement::agree_ephemeral(ours, &peer, |_| ()) {
            Ok(()) => CsrError::BadSignature,
            Err(_) => Malformed::EcPointNotOnCurve.into(),
        }
    }
}

/// The curve an id-ecPublicKey names. Only a named curve (RFC 5480 §2.1.1)
/// is accepted: explicit domain parameters could describe any curve.
fn ec_curve(params: Option<&Any>) -> Result<KeyAlgorithm, CsrError> {
    let params = params.ok_or(Malformed::EcParametersMissing)?;
    if params.tag() != Tag::ObjectIdentifier {
        return Err(Unsupported::CurveNotNamed.into());
    }
    let curve: ObjectIdentifier = params.decode_as().map_err(Malformed::EcParameters)?;
    if curve == rfc5912::SECP_256_R_1 {
        Ok(KeyAlgorithm::EcdsaP256)
    } else if curve == rfc5912::SECP_384_R_1 {
        Ok(KeyAlgorithm::EcdsaP384)
    } else {
        Err(Unsupported::Curve(curve).into())
    }
}

/// An uncompressed point (0x04 ‖ X ‖ Y) of the curve's size. Whether it lies
/// on the curve is checked by the CSR's signature verification (ring
/// validates the point before verifying), see [`PublicKey::explain_bad_signature`].
fn check_ec_point(algorithm: KeyAlgorithm, point: &[u8]) -> Result<(), CsrError> {
    let coordinate = match algorithm {
        KeyAlgorithm::EcdsaP384 => 48,
        _ => 32,
    };
    match point.first() {
        Some(0x04) => {}
        Some(0x02 | 0x03) => return Err(Malformed::EcPointCompressed.into()),
        _ => return Err(Malformed::EcPointEncoding.into()),
    }
    if point.len() != 1 + 2 * coordinate {
        return Err(Malformed::EcPointLength {
            expected: 1 + 2 * coordinate,
            found: point.len(),
        }
        .into());
    }
    Ok(())
}

/// Bits of a big-endian unsigned integer without leading zero octets.
fn bit_length(be: &[u8]) -> usize {
    match be.iter().position(|b| *b != 0) {
        Some(i) => (be.len() - i) * 8 - be[i].leading_zeros() as usize,
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_length_counts_from_the_top_set_bit() {
        assert_eq!(bit_length(&[]), 0);
        assert_eq!(bit_length(&[0, 0]), 0);
        assert_eq!(bit_length(&[1]), 1);
        assert_eq!(bit_length(&[0x01, 0x00, 0x01]), 17);
        assert_eq!(bit_length(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(bit_length(&[0x7f; 256]), 2047);
    }
}
