//! A rustls signing key whose private half stays in a key store: every
//! handshake signature is one `KeyStore::sign` call.
//!
//! Bridge: rustls calls [`Signer::sign`] synchronously from inside the
//! handshake, which tokio-rustls drives on a runtime worker, while
//! `KeyStore::sign` is async (PKCS#11 runs on the blocking pool, a YubiKey
//! queues for its one signer). The signer uses
//! `tokio::task::block_in_place` + `Handle::block_on`: `block_in_place`
//! first hands this worker's other tasks to another worker, so the wait for
//! the HSM blocks only the connection being handshaken, never the runtime.
//! It needs the multi-thread runtime (the daemon's); on a current-thread
//! runtime the signer refuses (an error, not a panic). Handshakes running at
//! once are capped by the listener, so they cannot use up the worker pool.
//!
//! Encodings: `KeyStore::sign` hashes as the algorithm requires and returns
//! the signature as X.509 carries it: DER `Ecdsa-Sig-Value` for ECDSA (what
//! TLS wants too), raw 64 bytes for Ed25519. RSA keys are not offered: the
//! key stores sign RSA with PKCS#1 v1.5 only, which TLS 1.3 forbids for
//! handshake signatures.

use super::TlsError;
use crate::keystore::{KeyAlgorithm, KeyHandle, KeyStore};
use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use std::sync::Arc;

/// The TLS signature scheme a key store signature of `algorithm` is, if any.
pub fn scheme_for(algorithm: KeyAlgorithm) -> Option<SignatureScheme> {
    match algorithm {
        KeyAlgorithm::EcdsaP256 => Some(SignatureScheme::ECDSA_NISTP256_SHA256),
        KeyAlgorithm::EcdsaP384 => Some(SignatureScheme::ECDSA_NISTP384_SHA384),
        KeyAlgorithm::Ed25519 => Some(SignatureScheme::ED25519),
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => None,
    }
}

/// A server key held in a key store.
pub struct HsmSigningKey {
    inner: Arc<Inner>,
}

struct Inner {
    keystore: Arc<dyn KeyStore>,
    handle: KeyHandle,
    algorithm: KeyAlgorithm,
    scheme: SignatureScheme,
    spki_der: Vec<u8>,
}

impl std::fmt::Debug for HsmSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmSigningKey")
            .field("backend", &self.inner.keystore.backend())
            .field("handle", &self.inner.handle.0)
            .field("algorithm", &self.inner.algorithm)
            .finish()
    }
}

impl HsmSigningKey {
    /// `spki_der` is the key's public key (checked against the certificate
    /// by `CertifiedKey::keys_match`).
    pub fn new(
        keystore: Arc<dyn KeyStore>,
        handle: KeyHandle,
        algorithm: KeyAlgorithm,
        spki_der: Vec<u8>,
    ) -> Result<Self, TlsError> {
        let scheme = scheme_for(algorithm).ok_or(TlsError::UnsupportedKey(algorithm))?;
        Ok(Self {
            inner: Arc::new(Inner {
                keystore,
                handle,
                algorithm,
                scheme,
                spki_der,
            }),
        })
    }
}

impl SigningKey for HsmSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&self.inner.scheme)
            .then(|| Box::new(HsmSigner(self.inner.clone())) as Box<dyn Signer>)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(
            self.inner.spki_der.as_slice(),
        ))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.inner.algorithm {
            KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => SignatureAlgorithm::ECDSA,
            KeyAlgorithm::Ed25519 => SignatureAlgorithm::ED25519,
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
                SignatureAlgorithm::RSA
            }
        }
    }
}

struct HsmSigner(Arc<Inner>);

impl std::fmt::Debug for HsmSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HsmSigner").field(&self.0.scheme).finish()
    }
}

impl Signer for HsmSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let inner = &self.0;
        let handle = Handle::try_current().map_err(|_| {
            rustls::Error::General("TLS signing needs the tokio runtime".to_string())
        })?;
        if handle.runtime_flavor() != RuntimeFlavor::MultiThread {
            return Err(rustls::Error::General(
                "TLS signing with a key store needs the multi-thread runtime".to_string(),
            ));
        }
        let result = tokio::task::block_in_place(|| {
            handle.block_on(inner.keystore.sign(&inner.handle, inner.algorithm, message))
        });
        result.map_err(|e| {
            tracing::error!(code = e.code(), error = %e, "TLS handshake signature failed in the key store");
            rustls::Error::General("the key store could not sign".to_string())
        })
    }

    fn scheme(&self) -> SignatureScheme {
        self.0.scheme
    }
}

/// The served certificate chain with its key in a key store; refuses a key
/// that is not the certificate's.
pub fn certified_key(
    key: HsmSigningKey,
    chain: Vec<Vec<u8>>,
) -> Result<rustls::sign::CertifiedKey, TlsError> {
    let chain = chain
        .into_iter()
        .map(rustls::pki_types::CertificateDer::from)
        .collect();
    let certified = rustls::sign::CertifiedKey::new(chain, Arc::new(key));
    certified.keys_match()?;
    Ok(certified)
}
