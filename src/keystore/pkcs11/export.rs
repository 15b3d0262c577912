//! Private-key export by wrapping: a one-shot session AES-256 key wraps the
//! private key inside the token (`CKM_AES_KEY_WRAP_PAD`, RFC 5649), is
//! destroyed at once, and the wrapped bytes are unwrapped in software into a
//! zeroizing buffer.
//!
//! Steps and undo: (1) 32 random bytes become a session object (CKA_TOKEN=false,
//! CKA_WRAP only: it cannot encrypt, decrypt or unwrap anything); (2) C_WrapKey;
//! (3) the session key is destroyed whatever (2) returned; (4) RFC 5649 unwrap
//! in software. A crash between (1) and (3) leaves nothing on the token: session
//! objects die with the session. Nothing is written anywhere; the caller owns the
//! only plaintext copy.

use super::keys;
use crate::keystore::{KeyHandle, KeySpec, KeyStoreError};
use aes_kw::KwpAes256;
use aes_kw::cipher::KeyInit;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

/// Wraps the private key `key` out of the token and returns its PKCS#8 DER.
/// `handle` is only for the error messages.
pub(super) fn export_pkcs8(
    session: &Session,
    key: ObjectHandle,
    handle: &KeyHandle,
) -> Result<Zeroizing<Vec<u8>>, KeyStoreError> {
    // Refuse before creating anything: the token would refuse too
    // (CKR_KEY_UNEXTRACTABLE), but a typed answer up front is clearer.
    if !keys::protection(session, key)?.extractable {
        return Err(KeyStoreError::NotExtractable(handle.clone()));
    }
    let mut kek = Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(kek.as_mut())
        .map_err(|_| KeyStoreError::RandomUnavailable)?;
    let wrapping_key = create_wrapping_key(session, &kek)?;
    let wrapped = session.wrap_key(&Mechanism::AesKeyWrapPad, wrapping_key, key);
    // The wrapping key goes at once, also when wrapping failed.
    let destroyed = session.destroy_object(wrapping_key);
    let wrapped = wrapped.map_err(|e| match e {
        CkError::Pkcs11(RvError::KeyUnextractable, _) => {
            KeyStoreError::NotExtractable(handle.clone())
        }
        CkError::Pkcs11(RvError::KeyNotWrappable, _) => KeyStoreError::NotWrappable(handle.clone()),
        e => KeyStoreError::Pkcs11(e),
    })?;
    destroyed.map_err(KeyStoreError::Pkcs11)?;
    unwrap_rfc5649(&kek, &wrapped)
}

/// Wraps the private key `key` under the caller's `kek` inside the token
/// (`CKM_AES_KEY_WRAP_PAD`) and returns the wrapped bytes, for backups: no
/// plaintext leaves the token. The session copy of `kek` is destroyed
/// whatever the wrap returned.
pub(super) fn wrap_out(
    session: &Session,
    key: ObjectHandle,
    handle: &KeyHandle,
    kek: &[u8; 32],
) -> Result<Vec<u8>, KeyStoreError> {
    if !keys::protection(session, key)?.extractable {
        return Err(KeyStoreError::NotExtractable(handle.clone()));
    }
    let wrapping_key = create_wrapping_key(session, kek)?;
    let wrapped = session.wrap_key(&Mechanism::AesKeyWrapPad, wrapping_key, key);
    let destroyed = session.destroy_object(wrapping_key);
    let wrapped = wrapped.map_err(|e| match e {
        CkError::Pkcs11(RvError::KeyUnextractable, _) => {
            KeyStoreError::NotExtractable(handle.clone())
        }
        CkError::Pkcs11(RvError::KeyNotWrappable, _) => KeyStoreError::NotWrappable(handle.clone()),
        e => KeyStoreError::Pkcs11(e),
    })?;
    destroyed.map_err(KeyStoreError::Pkcs11)?;
    Ok(wrapped)
}

/// Unwraps `wrapped` (from [`wrap_out`]) under `kek` into the token as a
/// sensitive, sign-only token private key with CKA_ID `id`, and creates its
/// public half from `public_key_der`. On any failure nothing stays behind:
/// the public object made first is destroyed again, and the session copy
/// of `kek` always is. Returns the private key's object handle.
pub(super) fn unwrap_in(
    session: &Session,
    spec: &KeySpec,
    id: &[u8],
    kek: &[u8; 32],
    wrapped: &[u8],
    public_key_der: &[u8],
    unmodifiable: bool,
) -> Result<ObjectHandle, KeyStoreError> {
    let public = keys::create_public(session, spec, id, public_key_der, unmodifiable)?;
    let unwrapping_key = match create_key_object(session, kek, false, true) {
        Ok(k) => k,
        Err(e) => {
            let _ = session.destroy_object(public);
            return Err(e);
        }
    };
    let template = keys::private_template(spec, id, unmodifiable)?;
    let unwrapped = session.unwrap_key(
        &Mechanism::AesKeyWrapPad,
        unwrapping_key,
        wrapped,
        &template,
    );
    let destroyed = session.destroy_object(unwrapping_key);
    match unwrapped {
        Ok(private) => {
            // The session object dies with the session anyway; failing here
            // would leave the restored pair behind with no handle to undo it.
            if let Err(e) = destroyed {
                tracing::warn!(error = %e, "cannot destroy the session unwrapping key; it goes with the session");
            }
            Ok(private)
        }
        Err(e) => {
            let _ = session.destroy_object(public);
            Err(KeyStoreError::UnwrapRefused(e))
        }
    }
}

/// A session AES-256 key holding `value`, usable for wrapping only.
fn create_wrapping_key(session: &Session, value: &[u8; 32]) -> Result<ObjectHandle, KeyStoreError> {
    create_key_object(session, value, true, false)
}

/// A session AES-256 key holding `value`, usable only to wrap or only to
/// unwrap.
fn create_key_object(
    session: &Session,
    value: &[u8; 32],
    wrap: bool,
    unwrap: bool,
) -> Result<ObjectHandle, KeyStoreError> {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(wrap),
        Attribute::Unwrap(unwrap),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Value(value.to_vec()),
    ];
    let created = session.create_object(&template);
    for a in &mut template {
        if let Attribute::Value(v) = a {
            v.zeroize();
        }
    }
    created.map_err(KeyStoreError::Pkcs11)
}

/// RFC 5649 unwrap into a zeroizing buffer.
pub(crate) fn unwrap_rfc5649(
    kek: &[u8; 32],
    wrapped: &[u8],
) -> Result<Zeroizing<Vec<u8>>, KeyStoreError> {
    let kwp = KwpAes256::new(kek.into());
    let mut buf = Zeroizing::new(vec![0u8; wrapped.len().saturating_sub(8)]);
    let len = kwp
        .unwrap_key(wrapped, &mut buf)
        .map_err(|_| KeyStoreError::UnwrapFailed)?
        .len();
    buf.truncate(len);
    // The token hands out a PKCS#8 PrivateKeyInfo (a DER SEQUENCE). SoftHSM 2.6
    // zero-pads it to a multiple of 8 bytes before the RFC 5649 wrap, so the
    // unwrapped length can exceed the DER length by up to 7 zero bytes; a
    // complete DER value makes that padding unambiguous to strip.
    let der_len = der_sequence_len(&buf).ok_or(KeyStoreError::UnwrapFailed)?;
    let padding = &buf[der_len..];
    if padding.len() >= 8 || padding.iter().any(|b| *b != 0) {
        return Err(KeyStoreError::UnwrapFailed);
    }
    buf.truncate(der_len);
    Ok(buf)
}

/// Length of the DER SEQUENCE at the start of `bytes`, if there is a whole one.
fn der_sequence_len(bytes: &[u8]) -> Option<usize> {
    use der::{Decode, Reader, SliceReader, Tagged};
    let mut reader = SliceReader::new(bytes).ok()?;
    let value = der::asn1::AnyRef::decode(&mut reader).ok()?;
    if value.tag() != der::Tag::Sequence {
        return None;
    }
    usize::try_from(reader.position()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5649 section 6, the 20-octet example, checks our use of the crate.
    #[test]
    fn rfc5649_vector_and_tampering() {
        let kek: [u8; 24] = *b"\x58\x40\xdf\x6e\x29\xb0\x2a\xf1\xab\x49\x3b\x70\x5b\xf1\x6e\xa1\xae\x83\x38\xf4\xdc\xc1\x76\xa8";
        let wrapped =
            hex::decode("138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a")
                .unwrap();
        let kwp = aes_kw::KwpAes192::new((&kek).into());
        let mut out = [0u8; 24];
        let key = kwp.unwrap_key(&wrapped, &mut out).unwrap();
        assert_eq!(hex::encode(key), "c37b7e6492584340bed12207808941155068f738");

        // Our own path: wrap a DER SEQUENCE, unwrap it; a flipped bit is refused.
        let kek = [7u8; 32];
        let plain = [0x30, 0x03, 0x02, 0x01, 0x00];
        let mut buf = [0u8; 16];
        let w = KwpAes256::new((&kek).into())
            .wrap_key(&plain, &mut buf)
            .unwrap()
            .to_vec();
        assert_eq!(unwrap_rfc5649(&kek, &w).unwrap().as_slice(), &plain);
        let mut bad = w.clone();
        bad[3] ^= 1;
        assert!(matches!(
            unwrap_rfc5649(&kek, &bad),
            Err(KeyStoreError::UnwrapFailed)
        ));
        assert!(matches!(
            unwrap_rfc5649(&[8u8; 32], &w),
            Err(KeyStoreError::UnwrapFailed)
        ));
        // SoftHSM 2.6 zero-pads to a multiple of 8 before wrapping: stripped.
        let w = KwpAes256::new((&kek).into())
            .wrap_key(&[0x30, 0x03, 0x02, 0x01, 0x00, 0, 0, 0], &mut buf)
            .unwrap()
            .to_vec();
        assert_eq!(unwrap_rfc5649(&kek, &w).unwrap().as_slice(), &plain);
        // Non-zero bytes after the DER value are not padding.
        let w = KwpAes256::new((&kek).into())
            .wrap_key(&[0x30, 0x03, 0x02, 0x01, 0x00, 0, 1, 0], &mut buf)
            .unwrap()
            .to_vec();
        assert!(matches!(
            unwrap_rfc5649(&kek, &w),
            Err(KeyStoreError::UnwrapFailed)
        ));
        // Not a DER SEQUENCE: refused even though the wrap is intact.
        let w = KwpAes256::new((&kek).into())
            .wrap_key(b"not der!", &mut buf)
            .unwrap()
            .to_vec();
        assert!(matches!(
            unwrap_rfc5649(&kek, &w),
            Err(KeyStoreError::UnwrapFailed)
        ));
    }
}
