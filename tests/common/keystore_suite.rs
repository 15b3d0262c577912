//! The KeyStore conformance suite, written once and run against every
//! backend: SoftHSM2 over PKCS#11 here, the YubiKey PIV backend later.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use der::Decode;
use keyward::keystore::{KeyAlgorithm, KeyHandle, KeySpec, KeyStore, KeyStoreError};
use std::sync::Arc;

/// Destroys a test key where the device can (PIV slots cannot delete keys).
pub async fn cleanup(ks: &dyn KeyStore, handle: &KeyHandle) {
    match ks.destroy(handle).await {
        Ok(()) | Err(KeyStoreError::OperationUnsupported { .. }) => {}
        Err(e) => panic!("destroy failed: {e}"),
    }
}

pub fn spec(algorithm: KeyAlgorithm) -> KeySpec {
    let id = uuid::Uuid::new_v4();
    KeySpec {
        id,
        label: format!("conformance-{}", &id.simple().to_string()[..8]),
        algorithm,
        extractable: false,
        usage: keyward::keystore::KeyUsage::Sign,
    }
}

/// Verifies `sig` over `msg` with the SPKI, using ring (not the code under test).
pub fn verify(spki_der: &[u8], algorithm: KeyAlgorithm, msg: &[u8], sig: &[u8]) -> bool {
    use ring::signature as s;
    let spki = spki::SubjectPublicKeyInfoRef::from_der(spki_der).unwrap();
    let alg: &dyn s::VerificationAlgorithm = match algorithm {
        KeyAlgorithm::EcdsaP256 => &s::ECDSA_P256_SHA256_ASN1,
        KeyAlgorithm::EcdsaP384 => &s::ECDSA_P384_SHA384_ASN1,
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
            &s::RSA_PKCS1_2048_8192_SHA256
        }
        KeyAlgorithm::Ed25519 => &s::ED25519,
    };
    s::UnparsedPublicKey::new(alg, spki.subject_public_key.raw_bytes())
        .verify(msg, sig)
        .is_ok()
}

/// Generate, sign, verify with an independent implementation; a tampered
/// message must not verify; the public key read back equals the generated one.
pub async fn sign_and_verify(ks: &dyn KeyStore, algorithm: KeyAlgorithm) {
    let key = ks.generate(&spec(algorithm)).await.unwrap();
    let msg = b"keyward conformance: the TBS bytes of a certificate";
    let sig = ks.sign(&key.handle, algorithm, msg).await.unwrap();
    assert!(
        verify(&key.public_key_der, algorithm, msg, &sig),
        "{algorithm} signature does not verify"
    );
    assert!(!verify(
        &key.public_key_der,
        algorithm,
        b"another message",
        &sig
    ));
    assert_eq!(
        ks.public_key(&key.handle).await.unwrap(),
        key.public_key_der
    );
    cleanup(ks, &key.handle).await;
}

/// Private keys are created sensitive and non-extractable unless asked otherwise.
pub async fn keys_are_sensitive_and_not_extractable(ks: &dyn KeyStore) {
    let key = ks.generate(&spec(KeyAlgorithm::EcdsaP256)).await.unwrap();
    let p = ks.protection(&key.handle).await.unwrap();
    assert!(p.sensitive && p.always_sensitive, "{p:?}");
    assert!(!p.extractable && p.never_extractable, "{p:?}");
    cleanup(ks, &key.handle).await;
}

/// Destroyed keys are gone; destroying twice is fine; signing with them fails clearly.
pub async fn destroy_removes_the_key(ks: &dyn KeyStore) {
    let key = ks.generate(&spec(KeyAlgorithm::EcdsaP256)).await.unwrap();
    assert!(ks.exists(&key.handle).await.unwrap());
    ks.destroy(&key.handle).await.unwrap();
    assert!(!ks.exists(&key.handle).await.unwrap());
    ks.destroy(&key.handle).await.unwrap();
    let err = ks
        .sign(&key.handle, KeyAlgorithm::EcdsaP256, b"x")
        .await
        .unwrap_err();
    assert!(matches!(err, KeyStoreError::KeyNotFound(_)), "{err:?}");
}

/// A handle the backend never issued is refused, not panicked on.
pub async fn foreign_handles_are_refused(ks: &dyn KeyStore) {
    let err = ks
        .sign(
            &KeyHandle("not a handle".into()),
            KeyAlgorithm::EcdsaP256,
            b"x",
        )
        .await
        .unwrap_err();
    assert!(matches!(err, KeyStoreError::BadHandle(_)), "{err:?}");
}

/// More signers than the device has: callers queue, none fail.
pub async fn concurrent_signers_queue(ks: Arc<dyn KeyStore>) {
    let key = ks.generate(&spec(KeyAlgorithm::EcdsaP256)).await.unwrap();
    let n = ks.capabilities().max_concurrent_signers * 16;
    assert!(n >= 16);
    let mut tasks = Vec::new();
    for i in 0..n {
        let ks = ks.clone();
        let h = key.handle.clone();
        let spki = key.public_key_der.clone();
        tasks.push(tokio::spawn(async move {
            let msg = format!("message {i}");
            let sig = ks
                .sign(&h, KeyAlgorithm::EcdsaP256, msg.as_bytes())
                .await
                .unwrap();
            assert!(verify(&spki, KeyAlgorithm::EcdsaP256, msg.as_bytes(), &sig));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    cleanup(ks.as_ref(), &key.handle).await;
}

/// After `close` (logout), the next call logs in again by itself.
pub async fn recovers_after_logout(ks: &dyn KeyStore) {
    let key = ks.generate(&spec(KeyAlgorithm::EcdsaP256)).await.unwrap();
    ks.close().await.unwrap();
    let sig = ks
        .sign(&key.handle, KeyAlgorithm::EcdsaP256, b"after logout")
        .await
        .unwrap();
    assert!(verify(
        &key.public_key_der,
        KeyAlgorithm::EcdsaP256,
        b"after logout",
        &sig
    ));
    ks.health().await.unwrap();
    cleanup(ks, &key.handle).await;
}

/// The public key of a PKCS#8 private key as DER SPKI, computed by the stock
/// `openssl pkey` over pipes (no file).
pub fn openssl_public_of_pkcs8(pkcs8: &[u8]) -> Vec<u8> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("openssl")
        .args(["pkey", "-inform", "DER", "-pubout", "-outform", "DER"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl");
    child.stdin.take().unwrap().write_all(pkcs8).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl pkey: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A key generated extractable leaves the device as PKCS#8 whose public key
/// (computed by openssl) is the one generated; the key still signs afterwards.
/// Backends that cannot wrap keys out say so with `operation_unsupported`.
pub async fn export_gives_the_generated_key(ks: &dyn KeyStore, algorithm: KeyAlgorithm) {
    if !ks.capabilities().can_wrap_keys {
        let key = ks.generate(&spec(algorithm)).await.unwrap();
        let err = ks.export_private_key(&key.handle).await.unwrap_err();
        assert_eq!(err.code(), "operation_unsupported", "{err}");
        cleanup(ks, &key.handle).await;
        return;
    }
    let mut s = spec(algorithm);
    s.extractable = true;
    let key = ks.generate(&s).await.unwrap();
    let pkcs8 = ks.export_private_key(&key.handle).await.unwrap();
    assert_eq!(
        openssl_public_of_pkcs8(&pkcs8),
        key.public_key_der,
        "{algorithm}: exported key does not match the generated public key"
    );
    // Exporting twice gives the same key (each under its own one-time wrapping key).
    let again = ks.export_private_key(&key.handle).await.unwrap();
    assert_eq!(again.as_slice(), pkcs8.as_slice());
    let sig = ks
        .sign(&key.handle, algorithm, b"after export")
        .await
        .unwrap();
    assert!(verify(
        &key.public_key_der,
        algorithm,
        b"after export",
        &sig
    ));
    cleanup(ks, &key.handle).await;
}

/// A key generated non-extractable is never exported: a typed refusal with a
/// stable code, and the key is untouched.
pub async fn export_refuses_non_extractable_keys(ks: &dyn KeyStore) {
    let key = ks.generate(&spec(KeyAlgorithm::EcdsaP256)).await.unwrap();
    let err = ks.export_private_key(&key.handle).await.unwrap_err();
    if ks.capabilities().can_wrap_keys {
        assert!(matches!(err, KeyStoreError::NotExtractable(_)), "{err:?}");
        assert_eq!(err.code(), "not_extractable");
    } else {
        assert_eq!(err.code(), "operation_unsupported", "{err}");
    }
    let sig = ks
        .sign(&key.handle, KeyAlgorithm::EcdsaP256, b"still here")
        .await
        .unwrap();
    assert!(verify(
        &key.public_key_der,
        KeyAlgorithm::EcdsaP256,
        b"still here",
        &sig
    ));
    let err = ks
        .export_private_key(&KeyHandle("not a handle".into()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            KeyStoreError::BadHandle(_) | KeyStoreError::OperationUnsupported { .. }
        ),
        "{err:?}"
    );
    cleanup(ks, &key.handle).await;
}

/// For algorithms a token may refuse to wrap (SoftHSM 2.6 cannot wrap
/// Ed25519): either the export gives the generated key, or it is refused with
/// `key_not_wrappable` and the key is left as it was.
pub async fn export_gives_the_generated_key_or_says_not_wrappable(
    ks: &dyn KeyStore,
    algorithm: KeyAlgorithm,
) {
    let mut s = spec(algorithm);
    s.extractable = true;
    let key = ks.generate(&s).await.unwrap();
    match ks.export_private_key(&key.handle).await {
        Ok(pkcs8) => assert_eq!(openssl_public_of_pkcs8(&pkcs8), key.public_key_der),
        Err(e) => {
            assert!(matches!(e, KeyStoreError::NotWrappable(_)), "{e:?}");
            assert_eq!(e.code(), "key_not_wrappable");
        }
    }
    let sig = ks
        .sign(&key.handle, algorithm, b"after export")
        .await
        .unwrap();
    assert!(verify(
        &key.public_key_der,
        algorithm,
        b"after export",
        &sig
    ));
    cleanup(ks, &key.handle).await;
}

/// A decrypt-only RSA key (`KeyUsage::Decrypt`, the audit-encryption key):
/// a data key RSA-OAEP encrypted in software to its public half comes back
/// from the device as it was; an altered ciphertext, a signing key, a
/// signature with the decrypt key and a decrypt key of a non-RSA algorithm
/// are each refused. Backends without decryption say so.
pub async fn decrypt_data_key_round_trip(ks: &dyn KeyStore) {
    use keyward::keystore::KeyUsage;
    let mut spec = spec(KeyAlgorithm::Rsa3072);
    spec.usage = KeyUsage::Decrypt;
    let key = match ks.generate(&spec).await {
        Err(KeyStoreError::OperationUnsupported { .. } | KeyStoreError::Unsupported(_)) => return,
        other => other.unwrap(),
    };
    let data_key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37)).collect();
    let ct = keyward::crypto::oaep_encrypt(&key.public_key_der, &data_key).unwrap();
    assert_eq!(ct.len(), 384, "RSA-3072 ciphertext");
    let back = ks.decrypt_data_key(&key.handle, &ct).await.unwrap();
    assert_eq!(back.as_slice(), data_key.as_slice());
    // Two encryptions of one key differ (OAEP is randomised); both decrypt.
    let ct2 = keyward::crypto::oaep_encrypt(&key.public_key_der, &data_key).unwrap();
    assert_ne!(ct, ct2);
    assert_eq!(
        ks.decrypt_data_key(&key.handle, &ct2)
            .await
            .unwrap()
            .as_slice(),
        data_key.as_slice()
    );
    let mut bad = ct.clone();
    bad[100] ^= 0x01;
    assert!(ks.decrypt_data_key(&key.handle, &bad).await.is_err());
    assert!(ks.decrypt_data_key(&key.handle, b"short").await.is_err());
    // The decrypt key cannot sign.
    assert!(
        ks.sign(&key.handle, KeyAlgorithm::Rsa3072, b"m")
            .await
            .is_err()
    );
    // A signing key cannot decrypt.
    let signer = ks
        .generate(&self::spec(KeyAlgorithm::Rsa2048))
        .await
        .unwrap();
    let to_signer = keyward::crypto::oaep_encrypt(&signer.public_key_der, &data_key).unwrap();
    assert!(
        ks.decrypt_data_key(&signer.handle, &to_signer)
            .await
            .is_err()
    );
    // Only RSA keys decrypt.
    let mut ec = self::spec(KeyAlgorithm::EcdsaP256);
    ec.usage = KeyUsage::Decrypt;
    assert!(matches!(
        ks.generate(&ec).await,
        Err(KeyStoreError::Unsupported(KeyAlgorithm::EcdsaP256))
    ));
    cleanup(ks, &key.handle).await;
    cleanup(ks, &signer.handle).await;
}
