//! A minimal DER writer for the large or hot encodings (CRLs with 100,000
//! entries, OCSP responses): every length is computed before anything is
//! written, so a structure goes into one buffer allocated at its exact size,
//! with no per-entry allocation and no re-copying of nested contents.

use std::time::Duration;

pub(crate) const INTEGER: u8 = 0x02;
pub(crate) const BIT_STRING: u8 = 0x03;
pub(crate) const OCTET_STRING: u8 = 0x04;
pub(crate) const OID: u8 = 0x06;
pub(crate) const ENUMERATED: u8 = 0x0a;
pub(crate) const UTC_TIME: u8 = 0x17;
pub(crate) const GENERALIZED_TIME: u8 = 0x18;
pub(crate) const SEQUENCE: u8 = 0x30;

/// `[n]` constructed, context-specific (EXPLICIT tagging).
pub(crate) const fn explicit(n: u8) -> u8 {
    0xa0 | n
}

/// `[n]` primitive, context-specific (IMPLICIT tagging of a primitive type).
pub(crate) const fn implicit_primitive(n: u8) -> u8 {
    0x80 | n
}

/// Length of the length octets for `content` bytes.
pub(crate) const fn len_len(content: usize) -> usize {
    if content < 0x80 {
        1
    } else {
        1 + (usize::BITS - content.leading_zeros()).div_ceil(8) as usize
    }
}

/// Length of a whole TLV (single-octet tag) with `content` bytes of value.
pub(crate) const fn tlv_len(content: usize) -> usize {
    1 + len_len(content) + content
}

/// Writes a tag and a definite length.
pub(crate) fn put_header(out: &mut Vec<u8>, tag: u8, content: usize) {
    out.push(tag);
    if content < 0x80 {
        out.push(content as u8);
    } else {
        let n = len_len(content) - 1;
        out.push(0x80 | n as u8);
        out.extend_from_slice(&content.to_be_bytes()[size_of::<usize>() - n..]);
    }
}

/// Writes a whole TLV.
pub(crate) fn put_tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    put_header(out, tag, content.len());
    out.extend_from_slice(content);
}

/// Content octets of a non-negative INTEGER: big-endian, minimal, with a
/// leading 0x00 when the high bit is set. Returns the buffer and the offset
/// where the content starts.
pub(crate) fn uint_content(value: u64) -> ([u8; 9], usize) {
    let mut buf = [0u8; 9];
    buf[1..].copy_from_slice(&value.to_be_bytes());
    let mut start = 1;
    while start < 8 && buf[start] == 0 {
        start += 1;
    }
    if buf[start] & 0x80 != 0 {
        start -= 1;
    }
    (buf, start)
}

/// 2050-01-01T00:00:00Z: RFC 5280 §4.1.2.5 switches from UTCTime to
/// GeneralizedTime here.
const Y2050: i64 = 2_524_608_000;

/// Which time type a field uses.
#[derive(Clone, Copy)]
pub(crate) enum TimeKind {
    /// X.509 `Time`: UTCTime through 2049, GeneralizedTime from 2050.
    X509,
    /// Always GeneralizedTime (OCSP).
    Generalized,
}

fn generalized(unix: i64, kind: TimeKind) -> bool {
    matches!(kind, TimeKind::Generalized) || unix >= Y2050
}

/// Length of the whole time TLV.
pub(crate) fn time_len(unix: i64, kind: TimeKind) -> usize {
    if generalized(unix, kind) { 17 } else { 15 }
}

/// Writes a time in seconds since the epoch (negative values clamp to the
/// epoch, as certificates do); years past 9999 are an error.
pub(crate) fn put_time(out: &mut Vec<u8>, unix: i64, kind: TimeKind) -> der::Result<()> {
    let dt = der::DateTime::from_unix_duration(Duration::from_secs(unix.max(0) as u64))?;
    let two = |out: &mut Vec<u8>, v: u8| {
        out.push(b'0' + v / 10);
        out.push(b'0' + v % 10);
    };
    if generalized(unix, kind) {
        out.extend_from_slice(&[GENERALIZED_TIME, 15]);
        let y = dt.year();
        two(out, (y / 100) as u8);
        two(out, (y % 100) as u8);
    } else {
        out.extend_from_slice(&[UTC_TIME, 13]);
        two(out, (dt.year() % 100) as u8);
    }
    two(out, dt.month());
    two(out, dt.day());
    two(out, dt.hour());
    two(out, dt.minutes());
    two(out, dt.seconds());
    out.push(b'Z');
    Ok(())
}

/// Checks that `der` is exactly one TLV with the given tag (for DER that a
/// caller hands in and that is copied verbatim).
pub(crate) fn check_tlv(der: &[u8], tag: der::Tag) -> der::Result<()> {
    use der::{Decode, Tagged};
    let any = der::asn1::AnyRef::from_der(der)?;
    if any.tag() != tag {
        return Err(any.tag().unexpected_error(Some(tag)).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use der::Encode;

    #[test]
    fn lengths_match_der() {
        for n in [0usize, 1, 127, 128, 255, 256, 65_535, 65_536, 5_000_000] {
            let content = vec![0u8; n];
            let mut out = Vec::new();
            put_tlv(&mut out, OCTET_STRING, &content);
            let reference = der::asn1::OctetStringRef::new(&content)
                .unwrap()
                .to_der()
                .unwrap();
            assert_eq!(out, reference, "length {n}");
            assert_eq!(tlv_len(n), out.len());
        }
    }

    #[test]
    fn integers_are_minimal() {
        for v in [0u64, 1, 127, 128, 255, 256, 0x7fff_ffff, u64::MAX] {
            let (buf, start) = uint_content(v);
            let mut out = Vec::new();
            put_tlv(&mut out, INTEGER, &buf[start..]);
            assert_eq!(out, v.to_der().unwrap(), "value {v}");
        }
    }

    #[test]
    fn times_match_der() {
        use x509_cert::time::Time;
        for t in [0i64, 1_795_000_000, Y2050 - 1, Y2050, 4_102_444_800] {
            for kind in [TimeKind::X509, TimeKind::Generalized] {
                let mut out = Vec::new();
                put_time(&mut out, t, kind).unwrap();
                assert_eq!(out.len(), time_len(t, kind));
                let st = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(t as u64);
                let reference = match kind {
                    TimeKind::X509 => Time::try_from(st).unwrap().to_der().unwrap(),
                    TimeKind::Generalized => der::asn1::GeneralizedTime::from_system_time(st)
                        .unwrap()
                        .to_der()
                        .unwrap(),
                };
                assert_eq!(out, reference, "time {t}");
            }
        }
    }
}
