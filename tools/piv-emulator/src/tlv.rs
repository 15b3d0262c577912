//! BER-TLV helpers for the one-byte tags and 1–3 byte lengths PIV uses.

/// Appends a BER length (`L`, `81 L`, `82 H L`) to `out`.
pub fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.push(0x81);
        out.push(len as u8);
    } else {
        out.push(0x82);
        out.push((len >> 8) as u8);
        out.push((len & 0xff) as u8);
    }
}

/// Encodes `tag` (one or more bytes) followed by the length of `value` and `value` itself.
pub fn tlv(tag: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(tag.len() + 3 + value.len());
    out.extend_from_slice(tag);
    push_len(&mut out, value.len());
    out.extend_from_slice(value);
    out
}

/// Reads a BER length at the start of `buf`: returns (length, bytes used).
pub fn read_len(buf: &[u8]) -> Option<(usize, usize)> {
    match *buf.first()? {
        l if l < 0x80 => Some((usize::from(l), 1)),
        0x81 => Some((usize::from(*buf.get(1)?), 2)),
        0x82 => Some((
            (usize::from(*buf.get(1)?) << 8) | usize::from(*buf.get(2)?),
            3,
        )),
        _ => None,
    }
}

/// Splits the first one-byte-tag TLV off `buf`: returns (tag, value, rest).
pub fn split_first(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *buf.first()?;
    let (len, used) = read_len(buf.get(1..)?)?;
    let start = 1 + used;
    let end = start.checked_add(len)?;
    let value = buf.get(start..end)?;
    Some((tag, value, buf.get(end..)?))
}

/// Parses a whole buffer as a sequence of one-byte-tag TLVs.
pub fn parse_all(mut buf: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (tag, value, rest) = split_first(buf)?;
        out.push((tag, value));
        buf = rest;
    }
    Some(out)
}

/// Finds the value of the first TLV with `tag` in a parsed list.
pub fn find<'a>(tlvs: &[(u8, &'a [u8])], tag: u8) -> Option<&'a [u8]> {
    tlvs.iter().find(|(t, _)| *t == tag).map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_trip() {
        for len in [0usize, 1, 0x7f, 0x80, 0xff, 0x100, 0xbf7] {
            let value = vec![0xaa; len];
            let enc = tlv(&[0x53], &value);
            let (tag, v, rest) = split_first(&enc).unwrap();
            assert_eq!(tag, 0x53);
            assert_eq!(v.len(), len);
            assert!(rest.is_empty());
        }
        assert_eq!(tlv(&[0x53], &[0; 0x80])[..3], [0x53, 0x81, 0x80]);
        assert_eq!(tlv(&[0x53], &[0; 0x100])[..4], [0x53, 0x82, 0x01, 0x00]);
    }

    #[test]
    fn truncated_is_rejected() {
        assert!(split_first(&[0x7c, 0x05, 0x80]).is_none());
        assert!(parse_all(&[0x80, 0x00, 0x81]).is_none());
        assert!(read_len(&[0x83, 0, 0, 0]).is_none());
    }
}
