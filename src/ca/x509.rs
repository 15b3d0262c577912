//! Certificate structures and RFC 5280 extensions, encoded in DER.
//!
//! keyward builds the TBSCertificate itself (rather than through a builder)
//! so that every field is chosen by policy, the HSM signs the exact bytes,
//! and nothing a CSR asks for leaks into the certificate.

use crate::keystore::KeyAlgorithm;
use crate::policy::{ExtendedKeyUsage as Eku, SubjectPolicy};
use const_oid::ObjectIdentifier;
use const_oid::db::{rfc4519, rfc5280};
use der::asn1::{AnyRef, BitStringRef, Ia5String, OctetString, PrintableString, Utf8StringRef};
use der::{Decode, Encode};
use spki::AlgorithmIdentifierOwned;
use std::time::{Duration, SystemTime};
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::crl::dp::DistributionPoint;
use x509_cert::ext::pkix::name::DistributionPointName;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AccessDescription, AuthorityInfoAccessSyntax, AuthorityKeyIdentifier, BasicConstraints,
    CrlDistributionPoints, ExtendedKeyUsage, KeyUsage, KeyUsages, SubjectAltName,
    SubjectKeyIdentifier,
};
use x509_cert::name::{RdnSequence, RelativeDistinguishedName};
use x509_cert::time::Time;

#[derive(der::Sequence)]
struct Validity {
    not_before: Time,
    not_after: Time,
}

#[derive(der::Sequence)]
struct Tbs<'a> {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    version: u8,
    serial: der::asn1::UintRef<'a>,
    signature: AlgorithmIdentifierOwned,
    issuer: AnyRef<'a>,
    validity: Validity,
    subject: AnyRef<'a>,
    spki: AnyRef<'a>,
    #[asn1(context_specific = "3", tag_mode = "EXPLICIT")]
    extensions: Vec<Extension>,
}

#[derive(der::Sequence)]
struct Cert<'a> {
    tbs: AnyRef<'a>,
    algorithm: AlgorithmIdentifierOwned,
    signature: BitStringRef<'a>,
}

/// Everything that goes into a TBSCertificate.
pub struct TbsParams<'a> {
    pub serial: &'a [u8],
    pub signer: KeyAlgorithm,
    pub issuer_name_der: &'a [u8],
    pub subject_name_der: &'a [u8],
    pub spki_der: &'a [u8],
    pub not_before: i64,
    pub not_after: i64,
    pub extensions: Vec<Extension>,
}

fn time(unix: i64) -> der::Result<Time> {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    Time::try_from(t)
}

/// DER of the TBSCertificate to be signed.
pub fn encode_tbs(p: TbsParams<'_>) -> der::Result<Vec<u8>> {
    Tbs {
        version: 2,
        serial: der::asn1::UintRef::new(p.serial)?,
        signature: p.signer.signature_algorithm(),
        issuer: AnyRef::from_der(p.issuer_name_der)?,
        validity: Validity {
            not_before: time(p.not_before)?,
            not_after: time(p.not_after)?,
        },
        subject: AnyRef::from_der(p.subject_name_der)?,
        spki: AnyRef::from_der(p.spki_der)?,
        extensions: p.extensions,
    }
    .to_der()
}

/// Wraps a signed TBS into a Certificate.
pub fn assemble(tbs_der: &[u8], signer: KeyAlgorithm, signature: &[u8]) -> der::Result<Vec<u8>> {
    Cert {
        tbs: AnyRef::from_der(tbs_der)?,
        algorithm: signer.signature_algorithm(),
        signature: BitStringRef::new(0, signature)?,
    }
    .to_der()
}

fn atv(oid: ObjectIdentifier, value: der::asn1::Any) -> AttributeTypeAndValue {
    AttributeTypeAndValue { oid, value }
}

/// A distinguished name from a policy subject (C, O, OU, CN in that order).
pub fn name_from_policy(s: &SubjectPolicy) -> der::Result<Vec<u8>> {
    let mut rdns = Vec::new();
    if let Some(c) = &s.country {
        rdns.push(atv(
            rfc4519::C,
            der::asn1::Any::encode_from(&PrintableString::new(c)?)?,
        ));
    }
    if let Some(o) = &s.organization {
        rdns.push(atv(
            rfc4519::O,
            der::asn1::Any::encode_from(&Utf8StringRef::new(o)?)?,
        ));
    }
    if let Some(ou) = &s.organizational_unit {
        rdns.push(atv(
            rfc4519::OU,
            der::asn1::Any::encode_from(&Utf8StringRef::new(ou)?)?,
        ));
    }
    rdns.push(atv(
        rfc4519::CN,
        der::asn1::Any::encode_from(&Utf8StringRef::new(&s.common_name)?)?,
    ));
    encode_name(rdns)
}

/// `CN=<value>`, the subject of device certificates.
pub fn name_cn(cn: &str) -> der::Result<Vec<u8>> {
    encode_name(vec![atv(
        rfc4519::CN,
        der::asn1::Any::encode_from(&Utf8StringRef::new(cn)?)?,
    )])
}

fn encode_name(atvs: Vec<AttributeTypeAndValue>) -> der::Result<Vec<u8>> {
    let mut seq = RdnSequence::default();
    for a in atvs {
        seq.push(RelativeDistinguishedName::try_from(vec![a])?);
    }
    seq.to_der()
}

/// Key identifier per RFC 7093 §2 method 1: the leftmost 160 bits of the
/// SHA-256 of the subjectPublicKey BIT STRING value.
pub fn key_identifier(spki_der: &[u8]) -> der::Result<Vec<u8>> {
    let spki = spki::SubjectPublicKeyInfoRef::from_der(spki_der)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, spki.subject_public_key.raw_bytes());
    Ok(digest.as_ref()[..20].to_vec())
}

fn ext<T: Encode>(oid: ObjectIdentifier, critical: bool, value: &T) -> der::Result<Extension> {
    Ok(Extension {
        extn_id: oid,
        critical,
        extn_value: OctetString::new(value.to_der()?)?,
    })
}

fn common(ski: &[u8], aki: &[u8]) -> der::Result<Vec<Extension>> {
    Ok(vec![
        ext(
            rfc5280::ID_CE_SUBJECT_KEY_IDENTIFIER,
            false,
            &SubjectKeyIdentifier(OctetString::new(ski)?),
        )?,
        ext(
            rfc5280::ID_CE_AUTHORITY_KEY_IDENTIFIER,
            false,
            &AuthorityKeyIdentifier {
                key_identifier: Some(OctetString::new(aki)?),
                authority_cert_issuer: None,
                authority_cert_serial_number: None,
            },
        )?,
    ])
}

/// Extensions of a CA certificate: CA:TRUE with path length (critical),
/// keyCertSign + cRLSign (critical), SKI and AKI.
pub fn ca_extensions(ski: &[u8], aki: &[u8], path_len: Option<u8>) -> der::Result<Vec<Extension>> {
    let mut v = vec![
        ext(
            rfc5280::ID_CE_BASIC_CONSTRAINTS,
            true,
            &BasicConstraints {
                ca: true,
                path_len_constraint: path_len,
            },
        )?,
        ext(
            rfc5280::ID_CE_KEY_USAGE,
            true,
            &KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign | KeyUsages::DigitalSignature),
        )?,
    ];
    v.extend(common(ski, aki)?);
    Ok(v)
}

/// Where relying parties find revocation information for a certificate's
/// issuer: its CRL, the OCSP responder, and the issuer's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationUrls {
    /// cRLDistributionPoints fullName URI (RFC 5280 §4.2.1.13).
    pub crl: String,
    /// authorityInfoAccess id-ad-ocsp URI (RFC 5280 §4.2.2.1).
    pub ocsp: String,
    /// authorityInfoAccess id-ad-caIssuers URI: the issuer's certificate.
    pub ca_issuers: String,
}

fn uri(s: &str) -> der::Result<GeneralName> {
    Ok(GeneralName::UniformResourceIdentifier(Ia5String::new(s)?))
}

/// cRLDistributionPoints (non-critical) with one fullName URI: on a CA
/// certificate, where its parent's CRL is (`crl_check_all` follows it).
pub fn crl_distribution_point(crl_url: &str) -> der::Result<Extension> {
    ext(
        rfc5280::ID_CE_CRL_DISTRIBUTION_POINTS,
        false,
        &CrlDistributionPoints(vec![DistributionPoint {
            distribution_point: Some(DistributionPointName::FullName(vec![uri(crl_url)?])),
            reasons: None,
            crl_issuer: None,
        }]),
    )
}

/// cRLDistributionPoints and authorityInfoAccess (both non-critical).
pub fn revocation_extensions(urls: &RevocationUrls) -> der::Result<Vec<Extension>> {
    Ok(vec![
        crl_distribution_point(&urls.crl)?,
        ext(
            rfc5280::ID_PE_AUTHORITY_INFO_ACCESS,
            false,
            &AuthorityInfoAccessSyntax(vec![
                AccessDescription {
                    access_method: rfc5280::ID_AD_OCSP,
                    access_location: uri(&urls.ocsp)?,
                },
                AccessDescription {
                    access_method: rfc5280::ID_AD_CA_ISSUERS,
                    access_location: uri(&urls.ca_issuers)?,
                },
            ]),
        )?,
    ])
}

/// Extensions of a delegated OCSP responder certificate (RFC 6960 §4.2.2.2):
/// CA:FALSE (critical), digitalSignature (critical), EKU id-kp-OCSPSigning,
/// id-pkix-ocsp-nocheck (NULL: relying parties do not check its revocation,
/// so it must be short-lived), SKI and AKI.
pub fn ocsp_signer_extensions(ski: &[u8], aki: &[u8]) -> der::Result<Vec<Extension>> {
    let mut v = vec![
        ext(
            rfc5280::ID_CE_BASIC_CONSTRAINTS,
            true,
            &BasicConstraints {
                ca: false,
                path_len_constraint: None,
            },
        )?,
        ext(
            rfc5280::ID_CE_KEY_USAGE,
            true,
            &KeyUsage(KeyUsages::DigitalSignature.into()),
        )?,
        ext(
            rfc5280::ID_CE_EXT_KEY_USAGE,
            false,
            &ExtendedKeyUsage(vec![rfc5280::ID_KP_OCSP_SIGNING]),
        )?,
        ext(
            const_oid::db::rfc6960::ID_PKIX_OCSP_NOCHECK,
            false,
            &der::asn1::Null,
        )?,
    ];
    v.extend(common(ski, aki)?);
    Ok(v)
}

/// Key usage of an end-entity key: digitalSignature, plus keyEncipherment
/// for RSA (TLS RSA key exchange).
fn leaf_key_usages(key: KeyAlgorithm) -> der::flagset::FlagSet<KeyUsages> {
    match key {
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
            KeyUsages::DigitalSignature | KeyUsages::KeyEncipherment
        }
        _ => KeyUsages::DigitalSignature.into(),
    }
}

/// Extensions of a device certificate: CA:FALSE (critical), key usage for
/// the key type (critical), EKU from the profile, SAN `urn:uuid:<device>`,
/// and with `revocation` the CRL distribution point and AIA.
pub fn device_extensions(
    ski: &[u8],
    aki: &[u8],
    key: KeyAlgorithm,
    eku: &[Eku],
    device_uri: &str,
    revocation: Option<&RevocationUrls>,
) -> der::Result<Vec<Extension>> {
    let eku_oids = eku
        .iter()
        .map(|e| match e {
            Eku::ClientAuth => rfc5280::ID_KP_CLIENT_AUTH,
            Eku::ServerAuth => rfc5280::ID_KP_SERVER_AUTH,
        })
        .collect();
    let mut v = vec![
        ext(
            rfc5280::ID_CE_BASIC_CONSTRAINTS,
            true,
            &BasicConstraints {
                ca: false,
                path_len_constraint: None,
            },
        )?,
        ext(
            rfc5280::ID_CE_KEY_USAGE,
            true,
            &KeyUsage(leaf_key_usages(key)),
        )?,
        ext(
            rfc5280::ID_CE_EXT_KEY_USAGE,
            false,
            &ExtendedKeyUsage(eku_oids),
        )?,
        ext(
            rfc5280::ID_CE_SUBJECT_ALT_NAME,
            false,
            &SubjectAltName(vec![GeneralName::UniformResourceIdentifier(
                Ia5String::new(device_uri)?,
            )]),
        )?,
    ];
    v.extend(common(ski, aki)?);
    if let Some(urls) = revocation {
        v.extend(revocation_extensions(urls)?);
    }
    Ok(v)
}

/// Extensions of a TLS server certificate (keyward's own listener):
/// CA:FALSE (critical), digitalSignature (+ keyEncipherment for RSA,
/// critical), EKU serverAuth, SAN with the DNS names and IP addresses
/// (RFC 5280 §4.2.1.6: an IPv4 address is 4 octets, IPv6 16), SKI and AKI.
pub fn server_extensions(
    ski: &[u8],
    aki: &[u8],
    key: KeyAlgorithm,
    dns_names: &[String],
    ips: &[std::net::IpAddr],
) -> der::Result<Vec<Extension>> {
    let mut names = Vec::with_capacity(dns_names.len() + ips.len());
    for d in dns_names {
        names.push(GeneralName::DnsName(Ia5String::new(d)?));
    }
    for ip in ips {
        let octets = match ip {
            std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
            std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        names.push(GeneralName::IpAddress(OctetString::new(octets)?));
    }
    let mut v = vec![
        ext(
            rfc5280::ID_CE_BASIC_CONSTRAINTS,
            true,
            &BasicConstraints {
                ca: false,
                path_len_constraint: None,
            },
        )?,
        ext(
            rfc5280::ID_CE_KEY_USAGE,
            true,
            &KeyUsage(leaf_key_usages(key)),
        )?,
        ext(
            rfc5280::ID_CE_EXT_KEY_USAGE,
            false,
            &ExtendedKeyUsage(vec![rfc5280::ID_KP_SERVER_AUTH]),
        )?,
    ];
    if !names.is_empty() {
        v.push(ext(
            rfc5280::ID_CE_SUBJECT_ALT_NAME,
            false,
            &SubjectAltName(names),
        )?);
    }
    v.extend(common(ski, aki)?);
    Ok(v)
}

/// Serial number: 48-bit millisecond timestamp then 80 bits from the CSPRNG.
/// Positive and at most 20 octets (RFC 5280 §4.1.2.2), with more than the
/// 64 bits of unpredictable output CA/B Forum asks for. The time prefix keeps
/// serials increasing, so the store's serial index grows at its right edge
/// instead of dirtying a random page per certificate.
pub fn random_serial(unix_ms: i64) -> Result<[u8; 16], crate::crypto::RandomError> {
    let bytes = crate::crypto::random_bytes(10)?;
    let mut s = [0u8; 16];
    let ms = (unix_ms.max(0) as u64) & 0x7fff_ffff_ffff;
    s[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    s[6..].copy_from_slice(&bytes);
    if s[0] == 0 {
        // Keep 16 octets (no leading zero to strip) for clocks near the epoch.
        s[0] = 0x01;
    }
    Ok(s)
}

/// What the store and the API need to know about a certificate.
pub struct CertSummary {
    pub serial_hex: String,
    pub subject_name_der: Vec<u8>,
    pub ski: Option<Vec<u8>>,
    pub not_before: i64,
    pub not_after: i64,
    pub spki_der: Vec<u8>,
}

/// Parses a certificate we hold (CA certificates) for its key facts.
pub fn summarize(cert_der: &[u8]) -> der::Result<CertSummary> {
    let cert = x509_cert::Certificate::from_der(cert_der)?;
    let tbs = cert.tbs_certificate();
    let ski = tbs
        .get_extension::<SubjectKeyIdentifier>()?
        .map(|(_, s)| s.0.as_bytes().to_vec());
    Ok(CertSummary {
        serial_hex: hex::encode_upper(tbs.serial_number().as_bytes()),
        subject_name_der: tbs.subject().to_der()?,
        ski,
        not_before: tbs.validity().not_before.to_unix_duration().as_secs() as i64,
        not_after: tbs.validity().not_after.to_unix_duration().as_secs() as i64,
        spki_der: tbs.subject_public_key_info().to_der()?,
    })
}

pub fn to_pem(cert_der: &[u8]) -> Result<String, der::Error> {
    der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, cert_der)
        .map_err(der::Error::from)
}

pub use crate::crypto::verify_issued_by;

/// Errors reading a PEM certificate chain.
#[derive(Debug, thiserror::Error)]
pub enum PemChainError {
    #[error("no CERTIFICATE block found")]
    Empty,
    #[error("more than {0} certificates")]
    TooMany(usize),
    #[error("not PEM certificates: {0}")]
    Pem(String),
}

/// The DER certificates of a PEM bundle, in order (at most 8; only
/// `CERTIFICATE` blocks; other text between blocks is ignored).
pub fn pem_chain_to_der(pem: &str) -> Result<Vec<Vec<u8>>, PemChainError> {
    const MAX: usize = 8;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let Some(end) = rest[start..].find(END) else {
            return Err(PemChainError::Pem("unterminated CERTIFICATE block".into()));
        };
        let block = &rest[start..start + end + END.len()];
        let (label, der) = der::pem::decode_vec(block.as_bytes())
            .map_err(|e| PemChainError::Pem(e.to_string()))?;
        if label != "CERTIFICATE" {
            return Err(PemChainError::Pem(format!("unexpected label {label}")));
        }
        out.push(der);
        if out.len() > MAX {
            return Err(PemChainError::TooMany(MAX));
        }
        rest = &rest[start + end + END.len()..];
    }
    if out.is_empty() {
        return Err(PemChainError::Empty);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_positive_increasing_and_mostly_random() {
        let a = random_serial(1_795_000_000_000).unwrap();
        let b = random_serial(1_795_000_000_001).unwrap();
        let c = random_serial(1_795_000_000_001).unwrap();
        assert!(a[0] > 0 && a[0] < 0x80, "positive, no leading zero octet");
        assert!(a < b, "later serials sort after earlier ones");
        assert_eq!(b[..6], c[..6]);
        assert_ne!(b[6..], c[6..], "80 random bits differ");
        assert!(random_serial(0).unwrap()[0] != 0);
    }
}
