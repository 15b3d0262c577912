//! Signature checks between certificates, for chains keyward did not build
//! (PIV attestation) and for what the HSM signed before it is stored.

use const_oid::ObjectIdentifier;
use der::asn1::{AnyRef, BitStringRef};
use der::{Decode, Encode};
use spki::AlgorithmIdentifierOwned;

/// A certificate split into its three parts, keeping the TBS bytes as they
/// were signed (re-encoding could change them).
#[derive(der::Sequence)]
struct Cert<'a> {
    tbs: AnyRef<'a>,
    algorithm: AlgorithmIdentifierOwned,
    signature: BitStringRef<'a>,
}

/// Whether `cert_der` carries a valid signature by the key of the
/// certificate `issuer_der`, whatever the issuer's algorithm (ECDSA P-256 or
/// P-384 with SHA-256/384, RSA PKCS#1 v1.5 with SHA-256/384/512, Ed25519).
/// Used for chains keyward did not build, such as PIV attestation.
pub fn verify_issued_by(cert_der: &[u8], issuer_der: &[u8]) -> bool {
    use const_oid::db::{rfc5912, rfc8410};
    use ring::signature as s;
    let (Ok(cert), Ok(issuer)) = (
        Cert::from_der(cert_der),
        x509_cert::Certificate::from_der(issuer_der),
    ) else {
        return false;
    };
    let (Ok(tbs), Some(sig)) = (cert.tbs.to_der(), cert.signature.as_bytes()) else {
        return false;
    };
    let spki = issuer.tbs_certificate().subject_public_key_info();
    let Some(pk) = spki.subject_public_key.as_bytes() else {
        return false;
    };
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
    let p256 = curve == Some(rfc5912::SECP_256_R_1);
    let p384 = curve == Some(rfc5912::SECP_384_R_1);
    let oid = cert.algorithm.oid;
    let alg: &dyn s::VerificationAlgorithm = match oid {
        o if o == rfc5912::ECDSA_WITH_SHA_256 && p256 => &s::ECDSA_P256_SHA256_ASN1,
        o if o == rfc5912::ECDSA_WITH_SHA_384 && p256 => &s::ECDSA_P256_SHA384_ASN1,
        o if o == rfc5912::ECDSA_WITH_SHA_256 && p384 => &s::ECDSA_P384_SHA256_ASN1,
        o if o == rfc5912::ECDSA_WITH_SHA_384 && p384 => &s::ECDSA_P384_SHA384_ASN1,
        o if o == rfc5912::SHA_256_WITH_RSA_ENCRYPTION => &s::RSA_PKCS1_2048_8192_SHA256,
        o if o == rfc5912::SHA_384_WITH_RSA_ENCRYPTION => &s::RSA_PKCS1_2048_8192_SHA384,
        o if o == rfc5912::SHA_512_WITH_RSA_ENCRYPTION => &s::RSA_PKCS1_2048_8192_SHA512,
        o if o == rfc8410::ID_ED_25519 => &s::ED25519,
        _ => return false,
    };
    s::UnparsedPublicKey::new(alg, pk).verify(&tbs, sig).is_ok()
}

/// Whether `signature` over `message` verifies under the DER
/// SubjectPublicKeyInfo `spki_der`, for a signature as a key store makes it
/// with `algorithm` (ECDSA DER with SHA-256 / SHA-384 by curve, RSA PKCS#1
/// v1.5 with SHA-256, Ed25519).
pub fn verify_spki_signature(
    spki_der: &[u8],
    algorithm: crate::model::KeyAlgorithm,
    message: &[u8],
    signature: &[u8],
) -> bool {
    use crate::model::KeyAlgorithm;
    use ring::signature as s;
    let Ok(spki) = spki::SubjectPublicKeyInfoRef::from_der(spki_der) else {
        return false;
    };
    let Some(key) = spki.subject_public_key.as_bytes() else {
        return false;
    };
    let alg: &'static dyn s::VerificationAlgorithm = match algorithm {
        KeyAlgorithm::EcdsaP256 => &s::ECDSA_P256_SHA256_ASN1,
        KeyAlgorithm::EcdsaP384 => &s::ECDSA_P384_SHA384_ASN1,
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
            &s::RSA_PKCS1_2048_8192_SHA256
        }
        KeyAlgorithm::Ed25519 => &s::ED25519,
    };
    s::UnparsedPublicKey::new(alg, key)
        .verify(message, signature)
        .is_ok()
}
