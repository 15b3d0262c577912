//! Client authentication: rustls' WebPKI verifier anchored at keyward's
//! issuing CAs, followed by a revocation hook, so that a revoked or
//! suspended device is refused during the handshake, before any request.
//!
//! The hook is synchronous because rustls' verifier is; an implementation
//! answers from memory (or bridges to the store as the signer does). A
//! resumed session skips certificate verification, so the listener runs the
//! hook again after every resumed handshake ([`super::listener`]).

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::Arc;

/// Why a client certificate that chains correctly is still refused.
#[derive(Debug, thiserror::Error)]
pub enum ClientCertRefused {
    #[error("the certificate is revoked")]
    Revoked,
    #[error("the certificate is suspended (certificateHold)")]
    Suspended,
    #[error("the certificate is not one keyward issued")]
    Unknown,
    #[error("the certificate's device is not active")]
    DeviceInactive,
    /// The revocation state could not be read: refused, never let through.
    #[error("the revocation state is unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ClientCertRefused {
    /// Stable machine-readable code (logged; the client sees a TLS alert).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Revoked => "certificate_revoked",
            Self::Suspended => "certificate_suspended",
            Self::Unknown => "certificate_unknown",
            Self::DeviceInactive => "device_inactive",
            Self::Unavailable(_) => "revocation_state_unavailable",
        }
    }
}

/// The revocation check run on every client certificate that chains to an
/// issuing CA (full handshakes and resumptions alike).
pub trait ClientCertCheck: Send + Sync + std::fmt::Debug {
    fn check(&self, leaf_der: &[u8]) -> Result<(), ClientCertRefused>;
}

/// WebPKI verification, then the revocation hook.
#[derive(Debug)]
pub struct CheckedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    check: Arc<dyn ClientCertCheck>,
}

impl CheckedClientVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>, check: Arc<dyn ClientCertCheck>) -> Self {
        Self { inner, check }
    }
}

/// Runs `check` on `leaf`, logging a refusal; the error is the TLS alert to send.
pub fn run_check(check: &dyn ClientCertCheck, leaf: &[u8]) -> Result<(), rustls::Error> {
    check.check(leaf).map_err(|e| {
        tracing::info!(code = e.code(), reason = %e, "client certificate refused");
        rustls::Error::InvalidCertificate(match e {
            ClientCertRefused::Revoked | ClientCertRefused::Suspended => CertificateError::Revoked,
            _ => CertificateError::ApplicationVerificationFailure,
        })
    })
}

impl ClientCertVerifier for CheckedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        run_check(self.check.as_ref(), end_entity.as_ref())?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// TEST HOOK, not for production: refuses the certificates whose SHA-256
/// fingerprints (lowercase hex of the DER) are in the set, and accepts the
/// rest. Lets tests prove a refusal happens at the handshake before the
/// store-backed check is wired in.
#[derive(Debug, Default)]
pub struct FingerprintDenyList {
    denied: std::sync::RwLock<std::collections::BTreeSet<String>>,
}

impl FingerprintDenyList {
    pub fn deny(&self, fingerprint_hex: &str) {
        if let Ok(mut g) = self.denied.write() {
            g.insert(fingerprint_hex.to_ascii_lowercase());
        }
    }
}

impl ClientCertCheck for FingerprintDenyList {
    fn check(&self, leaf_der: &[u8]) -> Result<(), ClientCertRefused> {
        let fp = hex::encode(ring::digest::digest(&ring::digest::SHA256, leaf_der));
        match self.denied.read() {
            Ok(g) if g.contains(&fp) => Err(ClientCertRefused::Revoked),
            Ok(_) => Ok(()),
            Err(_) => Err(ClientCertRefused::Unavailable("deny list poisoned".into())),
        }
    }
}
