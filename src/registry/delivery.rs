//! Delivery encodings for server-generated device keys: an age-encrypted PEM
//! bundle to the device's X25519 recipient, or a PKCS#12 under a one-time
//! password. Pure functions: no store, no HTTP, no files, no logs.
//!
//! The private key arrives as PKCS#8 DER in a zeroizing buffer (from
//! `KeyStore::export_private_key`) and every plaintext copy made here (the PEM
//! bundle) is zeroizing too; what leaves is ciphertext only.

mod pkcs12;

use ring::rand::{SecureRandom, SystemRandom};
use secrecy::SecretString;
use std::fmt;
use std::io::Write;
use zeroize::Zeroizing;

pub use pkcs12::pkcs12;

/// An age X25519 recipient (`age1…`) a device supplied at registration.
#[derive(Clone)]
pub struct AgeRecipient {
    text: String,
    recipient: age::x25519::Recipient,
}

/// Longest accepted recipient text; an X25519 recipient is 62 characters.
const MAX_RECIPIENT_LEN: usize = 100;

impl AgeRecipient {
    /// Accepts exactly one X25519 recipient (`age1` + Bech32 with a valid
    /// checksum); SSH keys, plugin and post-quantum recipients, identities
    /// (`AGE-SECRET-KEY-1…`) and anything with surrounding whitespace are refused.
    pub fn parse(text: &str) -> Result<Self, DeliveryError> {
        let malformed = |reason| DeliveryError::MalformedAgeRecipient { reason };
        if text.is_empty() {
            return Err(malformed("it is empty"));
        }
        if text.len() > MAX_RECIPIENT_LEN {
            return Err(malformed("it is too long for an X25519 recipient"));
        }
        if !text.starts_with("age1") {
            return Err(malformed(
                "it does not start with `age1` (only age X25519 recipients are accepted)",
            ));
        }
        let recipient = text.parse::<age::x25519::Recipient>().map_err(|_| {
            malformed("it is not a valid X25519 recipient (bad Bech32 or checksum)")
        })?;
        Ok(Self {
            text: text.to_string(),
            recipient,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for AgeRecipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AgeRecipient").field(&self.text).finish()
    }
}

impl fmt::Display for AgeRecipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("malformed age recipient: {reason}")]
    MalformedAgeRecipient { reason: &'static str },
    #[error("the private key is not PKCS#8 DER")]
    MalformedPrivateKey,
    #[error("a certificate is not DER X.509")]
    MalformedCertificate(#[source] der::Error),
    #[error("the PKCS#12 password is empty")]
    EmptyPassword,
    #[error("the friendly name cannot be a BMPString (empty, or characters outside the BMP)")]
    BadFriendlyName,
    #[error("age encryption failed")]
    Encrypt(#[source] age::EncryptError),
    #[error("writing the encrypted bundle failed")]
    Io(#[source] std::io::Error),
    #[error("a value could not be DER- or PEM-encoded")]
    Encoding(#[source] der::Error),
    #[error("the system random number generator failed")]
    RandomUnavailable,
}

impl DeliveryError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedAgeRecipient { .. } => "malformed_age_recipient",
            Self::MalformedPrivateKey => "malformed_private_key",
            Self::MalformedCertificate(_) => "malformed_certificate",
            Self::EmptyPassword => "empty_password",
            Self::BadFriendlyName => "bad_friendly_name",
            Self::Encrypt(_) => "age_encrypt_failed",
            Self::Io(_) => "delivery_io_failed",
            Self::Encoding(_) => "encoding_failed",
            Self::RandomUnavailable => "random_unavailable",
        }
    }

    /// Whether the caller's input is at fault (4xx) rather than keyward (5xx).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Self::MalformedAgeRecipient { .. })
    }
}

/// Checks the outer shape of a PKCS#8 PrivateKeyInfo: SEQUENCE { INTEGER
/// version, AlgorithmIdentifier, OCTET STRING, … }. Borrows; copies nothing.
fn check_pkcs8(key: &[u8]) -> Result<(), DeliveryError> {
    use der::{Decode, Reader, SliceReader, Tag, Tagged};
    let bad = |_| DeliveryError::MalformedPrivateKey;
    let outer = der::asn1::AnyRef::from_der(key).map_err(bad)?;
    if outer.tag() != Tag::Sequence {
        return Err(DeliveryError::MalformedPrivateKey);
    }
    let mut r = SliceReader::new(outer.value()).map_err(bad)?;
    let version = der::asn1::UintRef::decode(&mut r).map_err(bad)?;
    if version.as_bytes().len() != 1 || version.as_bytes()[0] > 1 {
        return Err(DeliveryError::MalformedPrivateKey);
    }
    spki::AlgorithmIdentifierRef::decode(&mut r).map_err(bad)?;
    if der::asn1::AnyRef::decode(&mut r).map_err(bad)?.tag() != Tag::OctetString {
        return Err(DeliveryError::MalformedPrivateKey);
    }
    // Attributes [0] and publicKey [1] (v2) may follow.
    while !r.is_finished() {
        der::asn1::AnyRef::decode(&mut r).map_err(bad)?;
    }
    Ok(())
}

fn check_certificate(cert_der: &[u8]) -> Result<(), DeliveryError> {
    use der::Decode;
    x509_cert::Certificate::from_der(cert_der)
        .map(|_| ())
        .map_err(DeliveryError::MalformedCertificate)
}

/// Appends `der` as a PEM block to `out` without an intermediate non-zeroizing copy.
fn push_pem(out: &mut Zeroizing<Vec<u8>>, label: &str, der: &[u8]) -> Result<(), DeliveryError> {
    use der::pem::{LineEnding, encode, encoded_len};
    let len =
        encoded_len(label, LineEnding::LF, der).map_err(|e| DeliveryError::Encoding(e.into()))?;
    let start = out.len();
    // Reserve first: a reallocation would leave an unzeroized copy behind.
    out.reserve_exact(len + 1);
    out.resize(start + len, 0);
    let written = encode(label, LineEnding::LF, der, &mut out[start..])
        .map_err(|e| DeliveryError::Encoding(e.into()))?
        .len();
    out.truncate(start + written);
    if !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    Ok(())
}

/// An ASCII-armored age file for `recipient` whose plaintext is a PEM bundle:
/// the private key (`PRIVATE KEY`, PKCS#8), the certificate, then `chain_pem`
/// (issuing CA first). `age -d -i identity.txt` decrypts it.
pub fn age_bundle(
    recipient: &AgeRecipient,
    key_pkcs8: &[u8],
    certificate_der: &[u8],
    chain_pem: &str,
) -> Result<Vec<u8>, DeliveryError> {
    check_pkcs8(key_pkcs8)?;
    check_certificate(certificate_der)?;
    // Size the buffer once so that growing never copies the key elsewhere.
    let capacity = key_pkcs8.len() * 2 + certificate_der.len() * 2 + chain_pem.len() + 256;
    let mut plaintext = Zeroizing::new(Vec::with_capacity(capacity));
    push_pem(&mut plaintext, "PRIVATE KEY", key_pkcs8)?;
    push_pem(&mut plaintext, "CERTIFICATE", certificate_der)?;
    plaintext.extend_from_slice(chain_pem.as_bytes());
    if !chain_pem.is_empty() && !chain_pem.ends_with('\n') {
        plaintext.push(b'\n');
    }

    // age's StreamWriter copies the plaintext into a 64 KiB chunk `Vec` that
    // it frees without zeroing (age 0.12); our own copies are zeroized.
    let encryptor = age::Encryptor::with_recipients(std::iter::once(
        &recipient.recipient as &dyn age::Recipient,
    ))
    .map_err(DeliveryError::Encrypt)?;
    let mut out = Vec::with_capacity(plaintext.len() * 2 + 512);
    let armor = age::armor::ArmoredWriter::wrap_output(&mut out, age::armor::Format::AsciiArmor)
        .map_err(DeliveryError::Io)?;
    let mut writer = encryptor.wrap_output(armor).map_err(DeliveryError::Io)?;
    writer.write_all(&plaintext).map_err(DeliveryError::Io)?;
    writer
        .finish()
        .and_then(|armor| armor.finish())
        .map_err(DeliveryError::Io)?;
    Ok(out)
}

/// A one-time password for a PKCS#12: 24 random bytes (192 bits) as 32
/// characters of unpadded base64url.
pub fn one_time_password() -> Result<SecretString, DeliveryError> {
    use base64::Engine;
    let mut bytes = Zeroizing::new([0u8; 24]);
    SystemRandom::new()
        .fill(bytes.as_mut())
        .map_err(|_| DeliveryError::RandomUnavailable)?;
    Ok(SecretString::from(
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes[..]),
    ))
}

pub(crate) fn random<const N: usize>() -> Result<[u8; N], DeliveryError> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| DeliveryError::RandomUnavailable)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    // Generated with `age-keygen`; public values only.
    const RECIPIENT: &str = "age1rs2xnsf50jayxw94qr0ptsazf2u8qd5gdrwl6qrprfj6lfmrgqasal4p4v";

    #[test]
    fn recipients_are_x25519_only() {
        let r = AgeRecipient::parse(RECIPIENT).unwrap();
        assert_eq!(r.as_str(), RECIPIENT);
        assert_eq!(r.to_string(), RECIPIENT);
        let mut bad_checksum = RECIPIENT.to_string();
        bad_checksum.pop();
        bad_checksum.push('q');
        let garbage = "x".repeat(10 * 1024);
        for bad in [
            "",
            " ",
            &bad_checksum,
            &format!(" {RECIPIENT}"),
            &format!("{RECIPIENT}\n"),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsDHfZQa0fEB9ogtXPVp7bJ2vVXzrKC9XSAEbp2IQ2p user@host",
            "AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX",
            "age1",
            &garbage,
            &format!("age1{garbage}"),
        ] {
            let e = AgeRecipient::parse(bad).unwrap_err();
            assert_eq!(e.code(), "malformed_age_recipient", "{bad:?}");
            assert!(e.is_bad_input());
        }
    }

    #[test]
    fn one_time_passwords_are_long_url_safe_and_fresh() {
        let a = one_time_password().unwrap();
        let b = one_time_password().unwrap();
        assert_eq!(a.expose_secret().len(), 32);
        assert!(
            a.expose_secret()
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert_ne!(a.expose_secret(), b.expose_secret());
    }

    #[test]
    fn bundles_refuse_what_is_not_a_key_or_a_certificate() {
        let r = AgeRecipient::parse(RECIPIENT).unwrap();
        let e = age_bundle(&r, b"not a key", &[], "").unwrap_err();
        assert_eq!(e.code(), "malformed_private_key");
        assert!(!e.is_bad_input());
        // A minimal PrivateKeyInfo shape (version 0, ecPublicKey, empty key).
        let key = [
            0x30, 0x0f, 0x02, 0x01, 0x00, 0x30, 0x07, 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a,
            0x04, 0x01, 0x00,
        ];
        check_pkcs8(&key).unwrap();
        let e = age_bundle(&r, &key, b"\x30\x00", "").unwrap_err();
        assert_eq!(e.code(), "malformed_certificate");
    }
}
