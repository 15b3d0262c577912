//! PKCS#10 requests: parse, identify the key, verify the self-signature over
//! the exact bytes the device signed. Nothing the CSR asks for (subject,
//! extensions, CA flags) is copied into certificates; only its public key.

use crate::keystore::KeyAlgorithm;
use const_oid::ObjectIdentifier;
use const_oid::db::{rfc5912, rfc8410};
use der::asn1::{AnyRef, BitStringRef};
use der::{Decode, Encode};
use spki::{AlgorithmIdentifierRef, SubjectPublicKeyInfoOwned};
use x509_cert::request::{CertReqInfo, Version};

/// Why a CSR was refused. Every variant is the requester's fault (a 4xx).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("the CSR is not valid DER PKCS#10: {0}")]
    Malformed(Malformed),
    #[error("the CSR's signature does not verify with its own public key")]
    BadSignature,
    #[error("unsupported CSR key or signature algorithm: {0}")]
    UnsupportedAlgorithm(Unsupported),
    #[error("RSA keys of {0} bits are not allowed (2048, 3072 or 4096)")]
    KeySize(usize),
}

impl CsrError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "invalid_csr",
            Self::BadSignature => "csr_signature_invalid",
            Self::UnsupportedAlgorithm(_) => "unsupported_key_algorithm",
            Self::KeySize(_) => "key_size_not_allowed",
        }
    }
}

/// What is wrong with the encoding of a CSR.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Malformed {
    #[error("not valid PEM: {0}")]
    Pem(der::pem::Error),
    /// The label found (input data, not a message).
    #[error("PEM label `{0}` is not CERTIFICATE REQUEST")]
    PemLabel(String),
    #[error("{0}")]
    Der(der::Error),
    #[error("unknown PKCS#10 version")]
    Version,
    #[error("the {0} BIT STRING is not octet-aligned")]
    BitString(&'static str),
    #[error("EC key without curve parameters")]
    EcParametersMissing,
    #[error("EC curve parameters are not an object identifier: {0}")]
    EcParameters(der::Error),
    #[error("RSA public key is not an RSAPublicKey: {0}")]
    RsaKey(der::Error),
}

/// An algorithm keyward does not issue for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unsupported {
    #[error("key algorithm {0}")]
    KeyAlgorithm(ObjectIdentifier),
    #[error("EC curve {0}")]
    Curve(ObjectIdentifier),
    #[error("signature algorithm {signature} with a {key} key")]
    Signature {
        signature: ObjectIdentifier,
        key: KeyAlgorithm,
    },
}

impl From<Malformed> for CsrError {
    fn from(m: Malformed) -> Self {
        Self::Malformed(m)
    }
}

impl From<Unsupported> for CsrError {
    fn from(u: Unsupported) -> Self {
        Self::UnsupportedAlgorithm(u)
    }
}

impl From<der::Error> for CsrError {
    fn from(e: der::Error) -> Self {
        Self::Malformed(Malformed::Der(e))
    }
}

#[derive(der::Sequence)]
struct RawCertReq<'a> {
    info: AnyRef<'a>,
    algorithm: AlgorithmIdentifierRef<'a>,
    signature: BitStringRef<'a>,
}

/// A CSR whose signature verified.
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    pub algorithm: KeyAlgorithm,
    /// DER SubjectPublicKeyInfo, copied verbatim into the certificate.
    pub spki_der: Vec<u8>,
}

/// Accepts PEM (`CERTIFICATE REQUEST` / `NEW CERTIFICATE REQUEST`) or raw DER.
pub fn decode_pem_or_der(input: &[u8]) -> Result<Vec<u8>, CsrError> {
    let text = std::str::from_utf8(input).ok().map(str::trim_start);
    match text {
        Some(t) if t.starts_with("-----BEGIN") => {
            let (label, der) = der::pem::decode_vec(t.as_bytes()).map_err(Malformed::Pem)?;
            if label != "CERTIFICATE REQUEST" && label != "NEW CERTIFICATE REQUEST" {
                return Err(Malformed::PemLabel(label.to_string()).into());
            }
            Ok(der)
        }
        _ => Ok(input.to_vec()),
    }
}

fn key_algorithm(spki: &SubjectPublicKeyInfoOwned) -> Result<KeyAlgorithm, CsrError> {
    let oid = spki.algorithm.oid;
    if oid == rfc5912::ID_EC_PUBLIC_KEY {
        let curve: ObjectIdentifier = spki
            .algorithm
            .parameters
            .as_ref()
            .ok_or(Malformed::EcParametersMissing)?
            .decode_as::<ObjectIdentifier>()
            .map_err(Malformed::EcParameters)?;
        if curve == rfc5912::SECP_256_R_1 {
            Ok(KeyAlgorithm::EcdsaP256)
        } else if curve == rfc5912::SECP_384_R_1 {
            Ok(KeyAlgorithm::EcdsaP384)
        } else {
            Err(Unsupported::Curve(curve).into())
        }
    } else if oid == rfc5912::RSA_ENCRYPTION {
        #[derive(der::Sequence)]
        struct RsaPublicKey<'a> {
            n: der::asn1::UintRef<'a>,
            e: der::asn1::UintRef<'a>,
        }
        let raw = spki
            .subject_public_key
            .as_bytes()
            .ok_or(Malformed::BitString("public key"))?;
        let key = RsaPublicKey::from_der(raw).map_err(Malformed::RsaKey)?;
        let bits = key.n.as_bytes().len() * 8;
        match bits {
            2048 => Ok(KeyAlgorithm::Rsa2048),
            3072 => Ok(KeyAlgorithm::Rsa3072),
            4096 => Ok(KeyAlgorithm::Rsa4096),
            other => Err(CsrError::KeySize(other)),
        }
    } else if oid == rfc8410::ID_ED_25519 {
        Ok(KeyAlgorithm::Ed25519)
    } else {
        Err(Unsupported::KeyAlgorithm(oid).into())
    }
}

fn verification_algorithm(
    key: KeyAlgorithm,
    sig: ObjectIdentifier,
) -> Result<&'static dyn ring::signature::VerificationAlgorithm, CsrError> {
    use ring::signature as s;
    let alg: &'static dyn s::VerificationAlgorithm = match (key, sig) {
        (KeyAlgorithm::EcdsaP256, o) if o == rfc5912::ECDSA_WITH_SHA_256 => {
            &s::ECDSA_P256_SHA256_ASN1
        }
        (KeyAlgorithm::EcdsaP256, o) if o == rfc5912::ECDSA_WITH_SHA_384 => {
            &s::ECDSA_P256_SHA384_ASN1
        }
        (KeyAlgorithm::EcdsaP384, o) if o == rfc5912::ECDSA_WITH_SHA_384 => {
            &s::ECDSA_P384_SHA384_ASN1
        }
        (KeyAlgorithm::EcdsaP384, o) if o == rfc5912::ECDSA_WITH_SHA_256 => {
            &s::ECDSA_P384_SHA256_ASN1
        }
        (KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096, o)
            if o == rfc5912::SHA_256_WITH_RSA_ENCRYPTION =>
        {
            &s::RSA_PKCS1_2048_8192_SHA256
        }
        (KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096, o)
            if o == rfc5912::SHA_384_WITH_RSA_ENCRYPTION =>
        {
            &s::RSA_PKCS1_2048_8192_SHA384
        }
        (KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096, o)
            if o == rfc5912::SHA_512_WITH_RSA_ENCRYPTION =>
        {
            &s::RSA_PKCS1_2048_8192_SHA512
        }
        (KeyAlgorithm::Ed25519, o) if o == rfc8410::ID_ED_25519 => &s::ED25519,
        (key, signature) => {
            return Err(Unsupported::Signature { signature, key }.into());
        }
    };
    Ok(alg)
}

/// Parses a DER CSR and verifies its self-signature.
pub fn verify(der_bytes: &[u8]) -> Result<VerifiedCsr, CsrError> {
    let req = RawCertReq::from_der(der_bytes)?;
    let info_der = req.info.to_der()?;
    let info = CertReqInfo::from_der(&info_der)?;
    if info.version != Version::V1 {
        return Err(Malformed::Version.into());
    }
    let algorithm = key_algorithm(&info.public_key)?;
    let verifier = verification_algorithm(algorithm, req.algorithm.oid)?;
    let public_key = info
        .public_key
        .subject_public_key
        .as_bytes()
        .ok_or(Malformed::BitString("public key"))?;
    let signature = req
        .signature
        .as_bytes()
        .ok_or(Malformed::BitString("signature"))?;
    ring::signature::UnparsedPublicKey::new(verifier, public_key)
        .verify(&info_der, signature)
        .map_err(|_| CsrError::BadSignature)?;
    Ok(VerifiedCsr {
        algorithm,
        spki_der: info.public_key.to_der()?,
    })
}
