//! Certificate serial numbers as CRLs and OCSP carry them: a positive
//! INTEGER of at most 20 octets (RFC 5280 §4.1.2.2), held inline so that a
//! list of 100,000 revoked serials is one allocation.

use std::fmt;

/// The longest serial RFC 5280 allows, in octets of magnitude.
pub const MAX_SERIAL_OCTETS: usize = 20;

/// A positive certificate serial number, stored as the content octets of its
/// DER INTEGER (minimal, with a leading 0x00 when the high bit is set).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial {
    len: u8,
    content: [u8; MAX_SERIAL_OCTETS + 1],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SerialError {
    #[error("a serial number has at most 20 octets (RFC 5280 §4.1.2.2), this one has {0}")]
    TooLong(usize),
    #[error("a serial number is an even number of hexadecimal digits")]
    Hex,
}

impl SerialError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLong(_) => "serial_too_long",
            Self::Hex => "serial_not_hex",
        }
    }
}

impl Serial {
    /// From the big-endian magnitude (leading zero octets are ignored).
    pub fn from_bytes(magnitude: &[u8]) -> Result<Self, SerialError> {
        let start = magnitude
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(magnitude.len());
        let m = &magnitude[start..];
        if m.len() > MAX_SERIAL_OCTETS {
            return Err(SerialError::TooLong(m.len()));
        }
        let mut content = [0u8; MAX_SERIAL_OCTETS + 1];
        let pad = usize::from(m.first().is_none_or(|b| b & 0x80 != 0));
        content[pad..pad + m.len()].copy_from_slice(m);
        Ok(Self {
            len: (pad + m.len()) as u8,
            content,
        })
    }

    /// From hexadecimal (either case), the store's form of a serial.
    pub fn from_hex(hex: &str) -> Result<Self, SerialError> {
        if hex.len() > 2 * (MAX_SERIAL_OCTETS + 1) {
            return Err(SerialError::TooLong(hex.len() / 2));
        }
        let mut buf = [0u8; MAX_SERIAL_OCTETS + 1];
        let n = hex.len() / 2;
        hex::decode_to_slice(hex, &mut buf[..n]).map_err(|_| SerialError::Hex)?;
        Self::from_bytes(&buf[..n])
    }

    /// The big-endian magnitude, without leading zero octets (empty for 0).
    pub fn magnitude(&self) -> &[u8] {
        let c = self.der_content();
        if c.first() == Some(&0) { &c[1..] } else { c }
    }

    /// Upper-case hexadecimal of the magnitude: the store's form
    /// (`CertificateRecord::serial`). Zero is `00`.
    pub fn to_hex(&self) -> String {
        let m = self.magnitude();
        if m.is_empty() {
            "00".to_string()
        } else {
            hex::encode_upper(m)
        }
    }

    /// Content octets of the DER INTEGER.
    pub(crate) fn der_content(&self) -> &[u8] {
        &self.content[..usize::from(self.len)]
    }

    /// From the content octets of a DER INTEGER already checked to be
    /// minimal and non-negative (der's `UintRef` strips the sign octet).
    pub(crate) fn from_uint(uint: der::asn1::UintRef<'_>) -> Result<Self, SerialError> {
        Self::from_bytes(uint.as_bytes())
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({})", self.to_hex())
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use der::Encode;

    #[test]
    fn encodes_like_der_and_round_trips_the_store_form() {
        for hex in [
            "01",
            "7F",
            "80",
            "00FF",
            "0195E3A1B2C3D4E5F60718293A4B5C6D",
            "FF".repeat(20).as_str(),
        ] {
            let s = Serial::from_hex(hex).unwrap();
            let reference = der::asn1::UintRef::new(&hex::decode(hex).unwrap())
                .unwrap()
                .to_der()
                .unwrap();
            assert_eq!(&reference[2..], s.der_content(), "{hex}");
            assert_eq!(s.to_hex(), hex.trim_start_matches("00"));
        }
        assert_eq!(Serial::from_bytes(&[]).unwrap().der_content(), &[0]);
        assert_eq!(Serial::from_bytes(&[0, 0]).unwrap().to_hex(), "00");
    }

    #[test]
    fn refuses_long_and_non_hex_serials() {
        assert_eq!(Serial::from_bytes(&[1; 21]), Err(SerialError::TooLong(21)));
        assert!(
            Serial::from_bytes(&[0; 30]).is_ok(),
            "leading zeros do not count"
        );
        assert_eq!(Serial::from_hex("0G"), Err(SerialError::Hex));
        assert_eq!(Serial::from_hex("ABC"), Err(SerialError::Hex));
        assert_eq!(
            Serial::from_hex(&"11".repeat(21)),
            Err(SerialError::TooLong(21))
        );
    }
}
