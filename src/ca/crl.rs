//! Certificate revocation lists (RFC 5280 §5): the TBSCertList encoded by
//! hand into one buffer of its exact size, then the signed CertificateList.
//!
//! The signer is the caller's: it sends [`encode_tbs`]'s bytes to the
//! KeyStore and hands the signature to [`assemble`]. A list of 100,000
//! entries costs one allocation for the entries (the caller's slice of
//! [`RevokedEntry`], serials held inline) and one for the DER.

use super::der_write::{self as w, TimeKind};
use super::serial::Serial;
use crate::keystore::KeyAlgorithm;
use der::Encode;

pub use crate::model::RevocationReason;

/// One revoked certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevokedEntry {
    pub serial: Serial,
    /// Seconds since the epoch.
    pub revoked_at: i64,
    pub reason: RevocationReason,
}

/// Everything that goes into a TBSCertList.
pub struct CrlParams<'a> {
    /// The issuer's key algorithm: picks the signature algorithm.
    pub signer: KeyAlgorithm,
    /// DER of the issuer's subject Name.
    pub issuer_name_der: &'a [u8],
    /// The issuer's OWN subject key identifier, which becomes the CRL's AKI
    /// (RFC 5280 §5.2.1) — not the AKI of the issuer's certificate.
    pub issuer_key_id: &'a [u8],
    /// Monotonic per issuer (RFC 5280 §5.2.3); chosen by the caller.
    pub crl_number: u64,
    pub this_update: i64,
    pub next_update: i64,
    pub revoked: &'a [RevokedEntry],
}

// Fixed encodings.
/// `Extensions` of an entry holding one reasonCode, up to the ENUMERATED's value octet:
/// SEQUENCE { SEQUENCE { OID 2.5.29.21, OCTET STRING { ENUMERATED r } } }.
const REASON_EXT_PREFIX: [u8; 13] = [
    0x30, 0x0c, 0x30, 0x0a, 0x06, 0x03, 0x55, 0x1d, 0x15, 0x04, 0x03, 0x0a, 0x01,
];
const REASON_EXT_LEN: usize = REASON_EXT_PREFIX.len() + 1;
/// OID 2.5.29.35 (authorityKeyIdentifier), encoded.
const OID_AKI: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x23];
/// OID 2.5.29.20 (cRLNumber), encoded.
const OID_CRL_NUMBER: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x14];

fn has_reason(e: &RevokedEntry) -> bool {
    // RFC 5280 §5.3.1: the reasonCode unspecified SHOULD be absent.
    e.reason.code() != 0
}

fn entry_content_len(e: &RevokedEntry) -> usize {
    w::tlv_len(e.serial.der_content().len())
        + w::time_len(e.revoked_at, TimeKind::X509)
        + if has_reason(e) { REASON_EXT_LEN } else { 0 }
}

fn put_entry(out: &mut Vec<u8>, e: &RevokedEntry) -> der::Result<()> {
    w::put_header(out, w::SEQUENCE, entry_content_len(e));
    w::put_tlv(out, w::INTEGER, e.serial.der_content());
    w::put_time(out, e.revoked_at, TimeKind::X509)?;
    if has_reason(e) {
        out.extend_from_slice(&REASON_EXT_PREFIX);
        out.push(e.reason.code());
    }
    Ok(())
}

/// DER of the TBSCertList (v2) to be signed.
///
/// `revokedCertificates` is omitted when empty (RFC 5280 §5.1.2.6);
/// crlExtensions carry the AKI (the issuer's own key id) and the cRLNumber.
pub fn encode_tbs(p: &CrlParams<'_>) -> der::Result<Vec<u8>> {
    w::check_tlv(p.issuer_name_der, der::Tag::Sequence)?;
    let alg = p.signer.signature_algorithm().to_der()?;

    // crlExtensions, built small and copied (a few dozen bytes).
    let mut exts = Vec::with_capacity(64 + p.issuer_key_id.len());
    {
        let keyid = w::tlv_len(p.issuer_key_id.len()); // [0] keyIdentifier
        let aki_value = w::tlv_len(keyid); // AuthorityKeyIdentifier SEQUENCE
        let aki_ext = OID_AKI.len() + w::tlv_len(aki_value);
        let (num, start) = w::uint_content(p.crl_number);
        let num = &num[start..];
        let num_value = w::tlv_len(num.len());
        let num_ext = OID_CRL_NUMBER.len() + w::tlv_len(num_value);
        let list = w::tlv_len(aki_ext) + w::tlv_len(num_ext);
        w::put_header(&mut exts, w::explicit(0), w::tlv_len(list));
        w::put_header(&mut exts, w::SEQUENCE, list);
        w::put_header(&mut exts, w::SEQUENCE, aki_ext);
        exts.extend_from_slice(&OID_AKI);
        w::put_header(&mut exts, w::OCTET_STRING, aki_value);
        w::put_header(&mut exts, w::SEQUENCE, keyid);
        w::put_tlv(&mut exts, w::implicit_primitive(0), p.issuer_key_id);
        w::put_header(&mut exts, w::SEQUENCE, num_ext);
        exts.extend_from_slice(&OID_CRL_NUMBER);
        w::put_header(&mut exts, w::OCTET_STRING, num_value);
        w::put_tlv(&mut exts, w::INTEGER, num);
    }

    let entries: usize = p
        .revoked
        .iter()
        .map(|e| w::tlv_len(entry_content_len(e)))
        .sum();
    let content = 3 // version INTEGER 1
        + alg.len()
        + p.issuer_name_der.len()
        + w::time_len(p.this_update, TimeKind::X509)
        + w::time_len(p.next_update, TimeKind::X509)
        + if p.revoked.is_empty() { 0 } else { w::tlv_len(entries) }
        + exts.len();

    let mut out = Vec::with_capacity(w::tlv_len(content));
    w::put_header(&mut out, w::SEQUENCE, content);
    out.extend_from_slice(&[w::INTEGER, 1, 1]);
    out.extend_from_slice(&alg);
    out.extend_from_slice(p.issuer_name_der);
    w::put_time(&mut out, p.this_update, TimeKind::X509)?;
    w::put_time(&mut out, p.next_update, TimeKind::X509)?;
    if !p.revoked.is_empty() {
        w::put_header(&mut out, w::SEQUENCE, entries);
        for e in p.revoked {
            put_entry(&mut out, e)?;
        }
    }
    out.extend_from_slice(&exts);
    debug_assert_eq!(out.len(), w::tlv_len(content), "lengths computed up front");
    Ok(out)
}

/// Wraps a signed TBSCertList into a CertificateList. `signature` is what
/// the KeyStore returns (DER `Ecdsa-Sig-Value` for ECDSA).
pub fn assemble(tbs_der: &[u8], signer: KeyAlgorithm, signature: &[u8]) -> der::Result<Vec<u8>> {
    w::check_tlv(tbs_der, der::Tag::Sequence)?;
    let alg = signer.signature_algorithm().to_der()?;
    let content = tbs_der.len() + alg.len() + w::tlv_len(1 + signature.len());
    let mut out = Vec::with_capacity(w::tlv_len(content));
    w::put_header(&mut out, w::SEQUENCE, content);
    out.extend_from_slice(tbs_der);
    out.extend_from_slice(&alg);
    w::put_header(&mut out, w::BIT_STRING, 1 + signature.len());
    out.push(0);
    out.extend_from_slice(signature);
    Ok(out)
}

/// PEM (`X509 CRL`), as `openssl crl` and Mosquitto's `crlfile` read it.
pub fn to_pem(crl_der: &[u8]) -> der::Result<String> {
    der::pem::encode_string("X509 CRL", der::pem::LineEnding::LF, crl_der).map_err(der::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use der::Decode;
    use x509_cert::crl::CertificateList;
    use x509_cert::ext::pkix::{AuthorityKeyIdentifier, CrlNumber, CrlReason};

    fn name() -> Vec<u8> {
        super::super::x509::name_cn("Test Issuing CA").unwrap()
    }

    fn entries(n: usize) -> Vec<RevokedEntry> {
        let reasons = [
            RevocationReason::Unspecified,
            RevocationReason::KeyCompromise,
            RevocationReason::CertificateHold,
            RevocationReason::Superseded,
        ];
        (0..n)
            .map(|i| {
                let mut s = [0u8; 16];
                s[0] = 0x01 + (i % 0xfe) as u8; // some with the high bit set
                s[8..].copy_from_slice(&(i as u64).to_be_bytes());
                RevokedEntry {
                    serial: Serial::from_bytes(&s).unwrap(),
                    revoked_at: 1_795_000_000 + i as i64,
                    reason: reasons[i % reasons.len()],
                }
            })
            .collect()
    }

    fn params<'a>(name: &'a [u8], revoked: &'a [RevokedEntry]) -> CrlParams<'a> {
        CrlParams {
            signer: KeyAlgorithm::EcdsaP256,
            issuer_name_der: name,
            issuer_key_id: &[0xab; 20],
            crl_number: 0x80,
            this_update: 1_795_000_000,
            next_update: 2_600_000_000, // after 2049: GeneralizedTime
            revoked,
        }
    }

    #[test]
    fn decodes_with_x509_cert_and_carries_every_field() {
        let name = name();
        let revoked = entries(10);
        let tbs = encode_tbs(&params(&name, &revoked)).unwrap();
        let crl = assemble(&tbs, KeyAlgorithm::EcdsaP256, &[0x30, 0x00]).unwrap();
        let list: CertificateList = CertificateList::from_der(&crl).unwrap();
        let t = &list.tbs_cert_list;
        assert_eq!(t.version, x509_cert::Version::V2);
        assert_eq!(t.issuer.to_der().unwrap(), name);
        assert_eq!(t.this_update.to_unix_duration().as_secs(), 1_795_000_000);
        assert_eq!(
            t.next_update.unwrap().to_unix_duration().as_secs(),
            2_600_000_000
        );
        let got = t.revoked_certificates.as_ref().unwrap();
        assert_eq!(got.len(), 10);
        for (g, e) in got.iter().zip(&revoked) {
            assert_eq!(g.serial_number.as_bytes(), e.serial.magnitude());
            assert_eq!(
                g.revocation_date.to_unix_duration().as_secs() as i64,
                e.revoked_at
            );
            let reason = g.crl_entry_extensions.as_ref().map(|x| {
                assert_eq!(x.len(), 1);
                CrlReason::from_der(x[0].extn_value.as_bytes()).unwrap() as u8
            });
            if e.reason == RevocationReason::Unspecified {
                assert_eq!(reason, None, "unspecified is omitted");
            } else {
                assert_eq!(reason, Some(e.reason.code()));
            }
        }
        let exts = t.crl_extensions.as_ref().unwrap();
        let aki = AuthorityKeyIdentifier::from_der(exts[0].extn_value.as_bytes()).unwrap();
        assert_eq!(aki.key_identifier.unwrap().as_bytes(), &[0xab; 20]);
        let num = CrlNumber::from_der(exts[1].extn_value.as_bytes()).unwrap();
        assert_eq!(num.0.as_bytes(), &[0x80]);
    }

    #[test]
    fn empty_list_omits_revoked_certificates() {
        let name = name();
        let tbs = encode_tbs(&params(&name, &[])).unwrap();
        let crl = assemble(&tbs, KeyAlgorithm::EcdsaP256, &[0x30, 0x00]).unwrap();
        let list: CertificateList = CertificateList::from_der(&crl).unwrap();
        assert!(list.tbs_cert_list.revoked_certificates.is_none());
    }

    #[test]
    fn refuses_a_name_that_is_not_one_sequence() {
        let mut name = name();
        name.push(0);
        assert!(encode_tbs(&params(&name, &[])).is_err());
        assert!(encode_tbs(&params(&[0x04, 0x00], &[])).is_err());
    }

    /// Not a timed assertion: prints what 100,000 entries cost to encode
    /// (`cargo nextest run -E 'test(crl_100k)' --no-capture`).
    #[test]
    fn crl_100k_entries_encoding_cost() {
        let name = name();
        let revoked = entries(100_000);
        let start = std::time::Instant::now();
        let tbs = encode_tbs(&params(&name, &revoked)).unwrap();
        let encode = start.elapsed();
        let digest = std::time::Instant::now();
        let _ = KeyAlgorithm::EcdsaP256.digest(&tbs);
        println!(
            "CRL TBS with 100,000 entries: {} bytes, encoded in {:?}, SHA-256 in {:?}",
            tbs.len(),
            encode,
            digest.elapsed()
        );
        let crl = assemble(&tbs, KeyAlgorithm::EcdsaP256, &[0x30, 0x00]).unwrap();
        let list: CertificateList = CertificateList::from_der(&crl).unwrap();
        assert_eq!(
            list.tbs_cert_list.revoked_certificates.unwrap().len(),
            100_000
        );
    }
}
