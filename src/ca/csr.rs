//! PKCS#10 requests: parse, identify the key, verify the self-signature over
//! the exact bytes the device signed. Nothing the CSR asks for (subject,
//! extensions, CA flags) is copied into certificates; only its public key,
//! checked and re-encoded by [`PublicKey`].

use super::public_key::PublicKey;
use crate::keystore::KeyAlgorithm;
use const_oid::ObjectIdentifier;
use const_oid::db::{rfc5912, rfc8410};
use der::asn1::{AnyRef, BitStringRef};
use der::{Decode, Encode};
use spki::AlgorithmIdentifierRef;
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
    #[error("rsaEncryption parameters must be NULL")]
    RsaParameters,
    #[error("RSA public exponent must be odd and at least 3")]
    RsaExponent,
    #[error("Ed25519 keys must not carry algorithm parameters (RFC 8410)")]
    Ed25519Parameters,
    #[error("an Ed25519 public key is 32 bytes, not {0}")]
    Ed25519Length(usize),
    #[error("compressed EC points are not accepted; send the uncompressed point (0x04 || X || Y)")]
    EcPointCompressed,
    #[error("the EC public key is not an uncompressed point (0x04 || X || Y)")]
    EcPointEncoding,
    #[error("the EC point is {found} bytes; this curve's uncompressed point is {expected}")]
    EcPointLength { expected: usize, found: usize },
    #[error("the EC point is not on the named curve")]
    EcPointNotOnCurve,
}

/// An algorithm keyward does not issue for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unsupported {
    #[error("key algorithm {0}")]
    KeyAlgorithm(ObjectIdentifier),
    #[error("EC curve {0}")]
    Curve(ObjectIdentifier),
    #[error("EC parameters that do not name a curve (explicit or implicit curve parameters)")]
    CurveNotNamed,
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
    /// Canonical DER SubjectPublicKeyInfo built by keyward (never the CSR's
    /// own bytes), as the certificate carries it.
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

/// Parses a DER CSR, checks its public key and verifies its self-signature.
pub fn verify(der_bytes: &[u8]) -> Result<VerifiedCsr, CsrError> {
    let req = RawCertReq::from_der(der_bytes)?;
    let info_der = req.info.to_der()?;
    let info = CertReqInfo::from_der(&info_der)?;
    if info.version != Version::V1 {
        return Err(Malformed::Version.into());
    }
    let key = PublicKey::from_spki(&info.public_key)?;
    let verifier = verification_algorithm(key.algorithm(), req.algorithm.oid)?;
    let signature = req
        .signature
        .as_bytes()
        .ok_or(Malformed::BitString("signature"))?;
    if ring::signature::UnparsedPublicKey::new(verifier, key.key_bytes())
        .verify(&info_der, signature)
        .is_err()
    {
        return Err(key.explain_bad_signature());
    }
    Ok(VerifiedCsr {
        algorithm: key.algorithm(),
        spki_der: key.to_spki_der()?,
    })
}

#[cfg(test)]
mod tests {
    //! CSRs with odd public-key encodings: made by the stock `openssl` CLI
    //! where it can make them, otherwise built here and signed with the real
    //! private key so that only the encoding under test is wrong.
    use super::*;
    use der::asn1::{Any, BitString};
    use ring::rand::SystemRandom;
    use ring::signature::{self as rs, KeyPair};
    use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
    use std::process::Command;
    use std::sync::OnceLock;

    enum Key {
        Ec(rs::EcdsaKeyPair, ObjectIdentifier),
        Ed(rs::Ed25519KeyPair),
        Rsa(rs::RsaKeyPair),
    }

    impl Key {
        fn ec(alg: KeyAlgorithm) -> Self {
            let (signing, curve) = match alg {
                KeyAlgorithm::EcdsaP384 => {
                    (&rs::ECDSA_P384_SHA384_ASN1_SIGNING, rfc5912::SECP_384_R_1)
                }
                _ => (&rs::ECDSA_P256_SHA256_ASN1_SIGNING, rfc5912::SECP_256_R_1),
            };
            let rng = SystemRandom::new();
            let pkcs8 = rs::EcdsaKeyPair::generate_pkcs8(signing, &rng).unwrap();
            let key = rs::EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref(), &rng).unwrap();
            Self::Ec(key, curve)
        }

        fn ed25519() -> Self {
            let pkcs8 = rs::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
            Self::Ed(rs::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap())
        }

        /// ring cannot generate RSA keys; openssl makes one (PKCS#1 DER) per test run.
        fn rsa() -> Self {
            static PKCS8: OnceLock<Vec<u8>> = OnceLock::new();
            let pkcs8 = PKCS8.get_or_init(|| {
                let out = Command::new("openssl")
                    .args([
                        "genpkey",
                        "-algorithm",
                        "RSA",
                        "-pkeyopt",
                        "rsa_keygen_bits:2048",
                        "-outform",
                        "DER",
                    ])
                    .output()
                    .expect("openssl missing: run scripts/test.sh");
                assert!(out.status.success());
                out.stdout
            });
            Self::Rsa(rs::RsaKeyPair::from_der(pkcs8).unwrap())
        }

        fn public(&self) -> Vec<u8> {
            match self {
                Self::Ec(k, _) => k.public_key().as_ref().to_vec(),
                Self::Ed(k) => k.public_key().as_ref().to_vec(),
                Self::Rsa(k) => k.public_key().as_ref().to_vec(),
            }
        }

        /// The SubjectPublicKeyInfo a careful encoder writes.
        fn canonical_spki(&self) -> Vec<u8> {
            match self {
                Self::Ec(_, curve) => spki(
                    rfc5912::ID_EC_PUBLIC_KEY,
                    Some((*curve).into()),
                    &self.public(),
                ),
                Self::Ed(_) => spki(rfc8410::ID_ED_25519, None, &self.public()),
                Self::Rsa(_) => spki(rfc5912::RSA_ENCRYPTION, Some(Any::null()), &self.public()),
            }
        }

        fn sign(&self, msg: &[u8]) -> (AlgorithmIdentifierOwned, Vec<u8>) {
            let rng = SystemRandom::new();
            let (oid, parameters, sig) = match self {
                Self::Ec(k, curve) => {
                    let oid = if *curve == rfc5912::SECP_384_R_1 {
                        rfc5912::ECDSA_WITH_SHA_384
                    } else {
                        rfc5912::ECDSA_WITH_SHA_256
                    };
                    (oid, None, k.sign(&rng, msg).unwrap().as_ref().to_vec())
                }
                Self::Ed(k) => (rfc8410::ID_ED_25519, None, k.sign(msg).as_ref().to_vec()),
                Self::Rsa(k) => {
                    let mut sig = vec![0; k.public().modulus_len()];
                    k.sign(&rs::RSA_PKCS1_SHA256, &rng, msg, &mut sig).unwrap();
                    (rfc5912::SHA_256_WITH_RSA_ENCRYPTION, Some(Any::null()), sig)
                }
            };
            (AlgorithmIdentifierOwned { oid, parameters }, sig)
        }

        /// A CSR carrying `spki_der` as its public key, signed by this key.
        fn csr(&self, spki_der: &[u8]) -> Vec<u8> {
            csr_with(spki_der, |info| self.sign(info))
        }
    }

    fn spki(oid: ObjectIdentifier, parameters: Option<Any>, key: &[u8]) -> Vec<u8> {
        SubjectPublicKeyInfoOwned {
            algorithm: AlgorithmIdentifierOwned { oid, parameters },
            subject_public_key: BitString::from_bytes(key).unwrap(),
        }
        .to_der()
        .unwrap()
    }

    #[derive(der::Sequence)]
    struct Req {
        info: Any,
        algorithm: AlgorithmIdentifierOwned,
        signature: BitString,
    }

    /// CertificationRequestInfo as raw elements, so that any SPKI bytes fit.
    fn csr_with(
        spki_der: &[u8],
        sign: impl Fn(&[u8]) -> (AlgorithmIdentifierOwned, Vec<u8>),
    ) -> Vec<u8> {
        let subject = crate::ca::x509::name_cn("test").unwrap();
        let info: Vec<Any> = vec![
            Any::encode_from(&0u8).unwrap(),
            Any::from_der(&subject).unwrap(),
            Any::from_der(spki_der).unwrap(),
            // [0] IMPLICIT SET OF Attribute, empty.
            Any::from_der(&[0xa0, 0x00]).unwrap(),
        ];
        let info_der = info.to_der().unwrap();
        let (algorithm, sig) = sign(&info_der);
        Req {
            info: Any::from_der(&info_der).unwrap(),
            algorithm,
            signature: BitString::from_bytes(&sig).unwrap(),
        }
        .to_der()
        .unwrap()
    }

    /// A CSR from `openssl req` for a key made by `openssl <keygen...>`.
    fn openssl_csr(keygen: &[&str]) -> Vec<u8> {
        openssl_csr_converted(keygen, &[])
    }

    fn run(cmd: &mut Command) -> Vec<u8> {
        let out = cmd.output().expect("openssl missing: run scripts/test.sh");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        out.stdout
    }

    /// Like [`openssl_csr`], the key passed through `openssl ec <convert...>` first.
    fn openssl_csr_converted(keygen: &[&str], convert: &[&str]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        run(Command::new("openssl").args(keygen).arg("-out").arg(&key));
        if !convert.is_empty() {
            let converted = dir.path().join("k2.pem");
            run(Command::new("openssl")
                .arg("ec")
                .args(convert)
                .arg("-in")
                .arg(&key)
                .arg("-out")
                .arg(&converted));
            std::fs::rename(converted, &key).unwrap();
        }
        run(Command::new("openssl")
            .args(["req", "-new", "-subj", "/CN=t", "-outform", "DER", "-key"])
            .arg(&key))
    }

    fn csr_spki(csr: &[u8]) -> Vec<u8> {
        let req = x509_cert::request::CertReq::from_der(csr).unwrap();
        req.info.public_key.to_der().unwrap()
    }

    #[test]
    fn canonical_keys_come_out_byte_for_byte() {
        for key in [
            Key::ec(KeyAlgorithm::EcdsaP256),
            Key::ec(KeyAlgorithm::EcdsaP384),
            Key::ed25519(),
            Key::rsa(),
        ] {
            let spki = key.canonical_spki();
            let v = verify(&key.csr(&spki)).unwrap();
            assert_eq!(v.spki_der, spki, "{}", v.algorithm);
        }
        for keygen in [
            &["ecparam", "-name", "prime256v1", "-genkey"][..],
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ],
            &["genpkey", "-algorithm", "ED25519"],
        ] {
            let csr = openssl_csr(keygen);
            assert_eq!(verify(&csr).unwrap().spki_der, csr_spki(&csr), "{keygen:?}");
        }
    }

    #[test]
    fn rsa_key_without_null_parameters_gets_the_canonical_identifier() {
        let key = Key::rsa();
        let odd = spki(rfc5912::RSA_ENCRYPTION, None, &key.public());
        let v = verify(&key.csr(&odd)).unwrap();
        assert_eq!(v.algorithm, KeyAlgorithm::Rsa2048);
        assert_ne!(v.spki_der, odd);
        assert_eq!(v.spki_der, key.canonical_spki());
        let out = SubjectPublicKeyInfoOwned::from_der(&v.spki_der).unwrap();
        assert_eq!(out.algorithm.parameters, Some(Any::null()));
    }

    fn refused(csr: &[u8]) -> CsrError {
        let e = verify(csr).unwrap_err();
        assert!(!e.to_string().is_empty());
        e
    }

    #[test]
    fn ec_keys_with_explicit_implicit_or_missing_curves_are_refused() {
        // openssl's explicit domain parameters (the full curve, not its name).
        let csr = openssl_csr(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-param_enc",
            "explicit",
            "-genkey",
        ]);
        let e = refused(&csr);
        assert_eq!(
            e,
            CsrError::UnsupportedAlgorithm(Unsupported::CurveNotNamed)
        );
        assert_eq!(e.code(), "unsupported_key_algorithm");

        let key = Key::ec(KeyAlgorithm::EcdsaP256);
        let point = key.public();
        let null = spki(rfc5912::ID_EC_PUBLIC_KEY, Some(Any::null()), &point);
        assert_eq!(
            refused(&key.csr(&null)),
            CsrError::UnsupportedAlgorithm(Unsupported::CurveNotNamed)
        );
        let absent = spki(rfc5912::ID_EC_PUBLIC_KEY, None, &point);
        let e = refused(&key.csr(&absent));
        assert_eq!(e, CsrError::Malformed(Malformed::EcParametersMissing));
        assert_eq!(e.code(), "invalid_csr");
        let k1 = ObjectIdentifier::new_unwrap("1.3.132.0.10");
        let other = spki(rfc5912::ID_EC_PUBLIC_KEY, Some(k1.into()), &point);
        assert_eq!(
            refused(&key.csr(&other)),
            CsrError::UnsupportedAlgorithm(Unsupported::Curve(k1))
        );
    }

    #[test]
    fn ec_points_must_be_uncompressed_exact_and_on_the_curve() {
        let csr = openssl_csr_converted(
            &["ecparam", "-name", "prime256v1", "-genkey"],
            &["-conv_form", "compressed"],
        );
        assert_eq!(
            refused(&csr),
            CsrError::Malformed(Malformed::EcPointCompressed)
        );

        let key = Key::ec(KeyAlgorithm::EcdsaP256);
        let curve = Some(Any::from(rfc5912::SECP_256_R_1));
        let mut trailing = key.public();
        trailing.push(0);
        let e = refused(&key.csr(&spki(rfc5912::ID_EC_PUBLIC_KEY, curve.clone(), &trailing)));
        assert_eq!(
            e,
            CsrError::Malformed(Malformed::EcPointLength {
                expected: 65,
                found: 66
            })
        );

        let mut off_curve = key.public();
        off_curve[64] ^= 0x01;
        let e = refused(&key.csr(&spki(rfc5912::ID_EC_PUBLIC_KEY, curve.clone(), &off_curve)));
        assert_eq!(e, CsrError::Malformed(Malformed::EcPointNotOnCurve));

        // The right point with a wrong signature is a signature error, not a point error.
        let mut csr = key.csr(&key.canonical_spki());
        let last = csr.len() - 1;
        csr[last] ^= 0x01;
        assert_eq!(refused(&csr), CsrError::BadSignature);
    }

    #[test]
    fn rsa_keys_with_other_parameters_or_trailing_bytes_are_refused() {
        let key = Key::rsa();
        let zero = Any::encode_from(&0u8).unwrap();
        let e = refused(&key.csr(&spki(rfc5912::RSA_ENCRYPTION, Some(zero), &key.public())));
        assert_eq!(e, CsrError::Malformed(Malformed::RsaParameters));
        let mut trailing = key.public();
        trailing.push(0);
        let e = refused(&key.csr(&spki(rfc5912::RSA_ENCRYPTION, Some(Any::null()), &trailing)));
        assert!(
            matches!(e, CsrError::Malformed(Malformed::RsaKey(_))),
            "{e:?}"
        );
        let csr = openssl_csr(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:1024",
        ]);
        let e = refused(&csr);
        assert_eq!(e, CsrError::KeySize(1024));
        assert_eq!(e.code(), "key_size_not_allowed");
    }

    #[test]
    fn ed25519_keys_with_parameters_or_the_wrong_length_are_refused() {
        let key = Key::ed25519();
        let e = refused(&key.csr(&spki(
            rfc8410::ID_ED_25519,
            Some(Any::null()),
            &key.public(),
        )));
        assert_eq!(e, CsrError::Malformed(Malformed::Ed25519Parameters));
        let mut long = key.public();
        long.push(0);
        let e = refused(&key.csr(&spki(rfc8410::ID_ED_25519, None, &long)));
        assert_eq!(e, CsrError::Malformed(Malformed::Ed25519Length(33)));
    }

    #[test]
    fn trailing_data_unknown_algorithms_and_unaligned_keys_are_refused() {
        let key = Key::ec(KeyAlgorithm::EcdsaP256);
        // An extra element inside the SubjectPublicKeyInfo SEQUENCE.
        let mut parts: Vec<Any> = Vec::from_der(&key.canonical_spki()).unwrap();
        parts.push(Any::null());
        let e = refused(&key.csr(&parts.to_der().unwrap()));
        assert!(matches!(e, CsrError::Malformed(Malformed::Der(_))), "{e:?}");
        // A byte after the CSR.
        let mut csr = key.csr(&key.canonical_spki());
        csr.push(0);
        assert!(matches!(
            refused(&csr),
            CsrError::Malformed(Malformed::Der(_))
        ));
        // X25519 is a key-agreement key, not a signing key.
        let x25519 = ObjectIdentifier::new_unwrap("1.3.101.110");
        let e = refused(&key.csr(&spki(x25519, None, &[9; 32])));
        assert_eq!(
            e,
            CsrError::UnsupportedAlgorithm(Unsupported::KeyAlgorithm(x25519))
        );
        // A BIT STRING with unused bits cannot hold a key.
        let unaligned = SubjectPublicKeyInfoOwned {
            algorithm: AlgorithmIdentifierOwned {
                oid: rfc5912::ID_EC_PUBLIC_KEY,
                parameters: Some(rfc5912::SECP_256_R_1.into()),
            },
            subject_public_key: BitString::new(1, key.public()).unwrap(),
        };
        let e = refused(&key.csr(&unaligned.to_der().unwrap()));
        assert_eq!(e, CsrError::Malformed(Malformed::BitString("public key")));
    }
}
