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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("the CSR is not valid DER PKCS#10: {0}")]
    Malformed(String),
    #[error("the CSR's signature does not verify with its own public key")]
    BadSignature,
    #[error("unsupported CSR key or signature algorithm: {0}")]
    UnsupportedAlgorithm(String),
    #[error("RSA keys of {0} bits are not allowed (2048, 3072 or 4096)")]
    KeySize(usize),
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
            let (label, der) = der::pem::decode_vec(t.as_bytes())
                .map_err(|e| CsrError::Malformed(e.to_string()))?;
            if label != "CERTIFICATE REQUEST" && label != "NEW CERTIFICATE REQUEST" {
                return Err(CsrError::Malformed(format!(
                    "PEM label `{label}` is not CERTIFICATE REQUEST"
                )));
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
            .ok_or_else(|| CsrError::Malformed("EC key without curve parameters".into()))?
            .decode_as::<ObjectIdentifier>()
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        if curve == rfc5912::SECP_256_R_1 {
            Ok(KeyAlgorithm::EcdsaP256)
        } else if curve == rfc5912::SECP_384_R_1 {
            Ok(KeyAlgorithm::EcdsaP384)
        } else {
            Err(CsrError::UnsupportedAlgorithm(format!("EC curve {curve}")))
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
            .ok_or_else(|| CsrError::Malformed("RSA key bit string not octet-aligned".into()))?;
        let key = RsaPublicKey::from_der(raw).map_err(|e| CsrError::Malformed(e.to_string()))?;
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
        Err(CsrError::UnsupportedAlgorithm(format!(
            "key algorithm {oid}"
        )))
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
        (k, o) => {
            return Err(CsrError::UnsupportedAlgorithm(format!(
                "signature algorithm {o} with a {k} key"
            )));
        }
    };
    Ok(alg)
}

/// Parses a DER CSR and verifies its self-signature.
pub fn verify(der_bytes: &[u8]) -> Result<VerifiedCsr, CsrError> {
    let malformed = |e: der::Error| CsrError::Malformed(e.to_string());
    let req = RawCertReq::from_der(der_bytes).map_err(malformed)?;
    let info_der = req.info.to_der().map_err(malformed)?;
    let info = CertReqInfo::from_der(&info_der).map_err(malformed)?;
    if info.version != Version::V1 {
        return Err(CsrError::Malformed("unknown PKCS#10 version".into()));
    }
    let algorithm = key_algorithm(&info.public_key)?;
    let verifier = verification_algorithm(algorithm, req.algorithm.oid)?;
    let public_key = info
        .public_key
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| CsrError::Malformed("public key bit string not octet-aligned".into()))?;
    let signature = req
        .signature
        .as_bytes()
        .ok_or_else(|| CsrError::Malformed("signature bit string not octet-aligned".into()))?;
    ring::signature::UnparsedPublicKey::new(verifier, public_key)
        .verify(&info_der, signature)
        .map_err(|_| CsrError::BadSignature)?;
    Ok(VerifiedCsr {
        algorithm,
        spki_der: info.public_key.to_der().map_err(malformed)?,
    })
}
