//! A minimal PKCS#12 (RFC 7292) writer: one PBES2-shrouded key bag and the
//! certificate bags, MAC'd with HMAC-SHA-256.
//!
//! Written here rather than taken from a crate because the one maintained
//! writer (`p12-keystore`) copies the private key into plain `Vec`s it never
//! zeroizes and pulls in a second X.509 parser; the format we need is small.
//! Algorithms are those OpenSSL 3 uses by default: PBES2 with PBKDF2-HMAC-SHA-256
//! and AES-256-CBC for the key, HMAC-SHA-256 with the PKCS#12 KDF for the
//! MAC. No RC2 or 3DES. Certificates are public and stored unencrypted.

use super::{DeliveryError, check_certificate, check_pkcs8, random};
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{BlockModeEncrypt, KeyIvInit};
use const_oid::ObjectIdentifier;
use const_oid::db::rfc5911::{ID_AES_256_CBC, ID_DATA};
use const_oid::db::rfc5912::ID_SHA_256;
use der::asn1::{Any, BmpString, OctetString, SetOfVec};
use der::{Encode, Sequence};
use ring::digest;
use secrecy::{ExposeSecret, SecretString};
use spki::AlgorithmIdentifierOwned;
use x509_cert::attr::Attribute;
use zeroize::Zeroizing;

const ID_HMAC_WITH_SHA_256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.2.9");
const PBES2: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.5.13");
const PBKDF2: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.5.12");
const SHROUDED_KEY_BAG: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.2.840.113549.1.12.10.1.2");
const CERT_BAG: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.12.10.1.3");
const X509_CERTIFICATE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.22.1");
const FRIENDLY_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.20");
const LOCAL_KEY_ID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.21");

/// PBKDF2 rounds for the key. The password is a random one-time value of at
/// least 128 bits, so the work factor is not what protects it.
const KEY_ITERATIONS: u32 = 100_000;
/// PKCS#12 KDF rounds for the MAC key (OpenSSL's default).
const MAC_ITERATIONS: u32 = 2048;

#[derive(Sequence)]
struct Pfx {
    version: u8,
    auth_safe: ContentInfo,
    mac_data: MacData,
}

/// `ContentInfo` for `id-data`: the content is an OCTET STRING.
#[derive(Sequence)]
struct ContentInfo {
    content_type: ObjectIdentifier,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    content: OctetString,
}

#[derive(Sequence)]
struct MacData {
    mac: DigestInfo,
    mac_salt: OctetString,
    iterations: u32,
}

#[derive(Sequence)]
struct DigestInfo {
    algorithm: AlgorithmIdentifierOwned,
    digest: OctetString,
}

#[derive(Sequence)]
struct SafeBag {
    bag_id: ObjectIdentifier,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    bag_value: Any,
    bag_attributes: SetOfVec<Attribute>,
}

#[derive(Sequence)]
struct CertBag {
    cert_id: ObjectIdentifier,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    cert_value: OctetString,
}

#[derive(Sequence)]
struct EncryptedPrivateKeyInfo {
    encryption_algorithm: AlgorithmIdentifierOwned,
    encrypted_data: OctetString,
}

#[derive(Sequence)]
struct Pbes2Params {
    key_derivation_func: AlgorithmIdentifierOwned,
    encryption_scheme: AlgorithmIdentifierOwned,
}

#[derive(Sequence)]
struct Pbkdf2Params {
    salt: OctetString,
    iteration_count: u32,
    key_length: u8,
    prf: AlgorithmIdentifierOwned,
}

fn enc(e: der::Error) -> DeliveryError {
    DeliveryError::Encoding(e)
}

fn attribute(oid: ObjectIdentifier, value: Any) -> Result<Attribute, DeliveryError> {
    Ok(Attribute {
        oid,
        values: SetOfVec::try_from(vec![value]).map_err(enc)?,
    })
}

/// A PKCS#12 holding `key_pkcs8` (shrouded under `password`), its certificate
/// (with the key's friendly name and local key id) and the chain certificates.
/// `openssl pkcs12 -in F -passin pass:… -nodes` reads it.
pub fn pkcs12(
    key_pkcs8: &[u8],
    certificate_der: &[u8],
    chain_der: &[Vec<u8>],
    password: &SecretString,
    friendly_name: &str,
) -> Result<Vec<u8>, DeliveryError> {
    check_pkcs8(key_pkcs8)?;
    check_certificate(certificate_der)?;
    for c in chain_der {
        check_certificate(c)?;
    }
    let password = password.expose_secret();
    if password.is_empty() {
        return Err(DeliveryError::EmptyPassword);
    }
    if friendly_name.is_empty() {
        return Err(DeliveryError::BadFriendlyName);
    }
    let name = BmpString::from_utf8(friendly_name).map_err(|_| DeliveryError::BadFriendlyName)?;
    let local_key_id = digest::digest(&digest::SHA256, certificate_der);
    let key_attributes = SetOfVec::try_from(vec![
        attribute(FRIENDLY_NAME, Any::encode_from(&name).map_err(enc)?)?,
        attribute(
            LOCAL_KEY_ID,
            Any::encode_from(&OctetString::new(local_key_id.as_ref()).map_err(enc)?)
                .map_err(enc)?,
        )?,
    ])
    .map_err(enc)?;

    let key_bag = SafeBag {
        bag_id: SHROUDED_KEY_BAG,
        bag_value: Any::encode_from(&shroud(key_pkcs8, password.as_bytes())?).map_err(enc)?,
        bag_attributes: key_attributes.clone(),
    };
    let mut cert_bags = vec![cert_bag(certificate_der, key_attributes)?];
    for c in chain_der {
        cert_bags.push(cert_bag(c, SetOfVec::new())?);
    }

    let auth_safe = vec![data(cert_bags)?, data(vec![key_bag])?]
        .to_der()
        .map_err(enc)?;
    let mac_salt: [u8; 16] = random()?;
    let mac_key = pkcs12_kdf_sha256(password, &mac_salt, 3, MAC_ITERATIONS);
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, mac_key.as_ref()),
        &auth_safe,
    );
    Pfx {
        version: 3,
        auth_safe: ContentInfo {
            content_type: ID_DATA,
            content: OctetString::new(auth_safe).map_err(enc)?,
        },
        mac_data: MacData {
            mac: DigestInfo {
                algorithm: AlgorithmIdentifierOwned {
                    oid: ID_SHA_256,
                    parameters: Some(Any::null()),
                },
                digest: OctetString::new(mac.as_ref()).map_err(enc)?,
            },
            mac_salt: OctetString::new(mac_salt).map_err(enc)?,
            iterations: MAC_ITERATIONS,
        },
    }
    .to_der()
    .map_err(enc)
}

fn cert_bag(cert_der: &[u8], attributes: SetOfVec<Attribute>) -> Result<SafeBag, DeliveryError> {
    Ok(SafeBag {
        bag_id: CERT_BAG,
        bag_value: Any::encode_from(&CertBag {
            cert_id: X509_CERTIFICATE,
            cert_value: OctetString::new(cert_der).map_err(enc)?,
        })
        .map_err(enc)?,
        bag_attributes: attributes,
    })
}

/// An unencrypted `id-data` ContentInfo around a SafeContents (SEQUENCE OF SafeBag).
fn data(bags: Vec<SafeBag>) -> Result<ContentInfo, DeliveryError> {
    Ok(ContentInfo {
        content_type: ID_DATA,
        content: OctetString::new(bags.to_der().map_err(enc)?).map_err(enc)?,
    })
}

/// EncryptedPrivateKeyInfo: PBES2 (PBKDF2-HMAC-SHA-256, AES-256-CBC).
fn shroud(key_pkcs8: &[u8], password: &[u8]) -> Result<EncryptedPrivateKeyInfo, DeliveryError> {
    let salt: [u8; 16] = random()?;
    let iv: [u8; 16] = random()?;
    let mut aes_key = Zeroizing::new([0u8; 32]);
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::MIN.saturating_add(KEY_ITERATIONS - 1),
        &salt,
        password,
        aes_key.as_mut(),
    );
    let mut ciphertext = vec![0u8; (key_pkcs8.len() / 16 + 1) * 16];
    let key: &[u8; 32] = &aes_key;
    let len = cbc::Encryptor::<aes::Aes256>::new(key.into(), (&iv).into())
        .encrypt_padded_b2b::<Pkcs7>(key_pkcs8, &mut ciphertext)
        .map_err(|_| DeliveryError::Encoding(der::ErrorKind::Overlength.into()))?
        .len();
    ciphertext.truncate(len);
    let kdf_params = Pbkdf2Params {
        salt: OctetString::new(salt).map_err(enc)?,
        iteration_count: KEY_ITERATIONS,
        key_length: 32,
        prf: AlgorithmIdentifierOwned {
            oid: ID_HMAC_WITH_SHA_256,
            parameters: Some(Any::null()),
        },
    };
    let params = Pbes2Params {
        key_derivation_func: AlgorithmIdentifierOwned {
            oid: PBKDF2,
            parameters: Some(Any::encode_from(&kdf_params).map_err(enc)?),
        },
        encryption_scheme: AlgorithmIdentifierOwned {
            oid: ID_AES_256_CBC,
            parameters: Some(Any::encode_from(&OctetString::new(iv).map_err(enc)?).map_err(enc)?),
        },
    };
    Ok(EncryptedPrivateKeyInfo {
        encryption_algorithm: AlgorithmIdentifierOwned {
            oid: PBES2,
            parameters: Some(Any::encode_from(&params).map_err(enc)?),
        },
        encrypted_data: OctetString::new(ciphertext).map_err(enc)?,
    })
}

/// RFC 7292 appendix B.2 with SHA-256 (u = 32, v = 64), 32 output bytes.
/// The password is a BMPString with a two-byte terminator, as the RFC says.
fn pkcs12_kdf_sha256(password: &str, salt: &[u8], id: u8, iterations: u32) -> Zeroizing<[u8; 32]> {
    const V: usize = 64;
    let mut bmp = Zeroizing::new(Vec::with_capacity(password.len() * 2 + 2));
    for unit in password.encode_utf16() {
        bmp.extend_from_slice(&unit.to_be_bytes());
    }
    bmp.extend_from_slice(&[0, 0]);
    let fill = |src: &[u8]| -> Zeroizing<Vec<u8>> {
        let len = src.len().div_ceil(V) * V;
        Zeroizing::new(src.iter().copied().cycle().take(len).collect())
    };
    let mut input = Zeroizing::new(Vec::with_capacity(V * 4));
    input.extend_from_slice(&[id; V]);
    input.extend_from_slice(&fill(salt));
    input.extend_from_slice(&fill(&bmp));
    // 32 bytes of output need one round of A (c = ceil(32 / 32) = 1), so the
    // I-block update of step 6C never runs.
    let mut a = Zeroizing::new(digest::digest(&digest::SHA256, &input).as_ref().to_vec());
    for _ in 1..iterations {
        let next = digest::digest(&digest::SHA256, &a);
        a.copy_from_slice(next.as_ref());
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&a);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// OpenSSL's own PKCS12 KDF, computed with `openssl kdf … PKCS12KDF`. That
    /// takes the password bytes as given, so it gets the BMPString with its
    /// terminator, as OpenSSL's PKCS#12 code passes it.
    #[test]
    fn kdf_matches_openssl() {
        let out = std::process::Command::new("openssl")
            .args([
                "kdf",
                "-keylen",
                "32",
                "-kdfopt",
                "digest:SHA256",
                "-kdfopt",
                "hexpass:006100620031002d005f005800590000",
                "-kdfopt",
                "hexsalt:0001020304050607",
                "-kdfopt",
                "iter:2048",
                "-kdfopt",
                "id:3",
                "PKCS12KDF",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .replace(':', "")
            .to_lowercase();
        let got = pkcs12_kdf_sha256("ab1-_XY", &[0, 1, 2, 3, 4, 5, 6, 7], 3, 2048);
        assert_eq!(hex::encode(&got[..]), want);
    }
}
