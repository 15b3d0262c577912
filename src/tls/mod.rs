//! The TLS listener: rustls with the server key held in a key store, a
//! server certificate that can be swapped while serving, optional client
//! authentication against keyward's own issuing CAs with a revocation hook
//! run during the handshake, and an accept loop that hands the verified
//! client certificate to handlers.
//!
//! An infrastructure layer between `keystore` and `http`: it knows the
//! `KeyStore` port and rustls, and no store or HTTP types (the accept loop
//! serves any tower service; `http` reads [`PeerCertificate`]).
//!
//! - [`signer`]: a rustls `SigningKey` whose signatures come from `KeyStore::sign`;
//! - [`resolver`]: the current certificate and key, swappable (renewal without restart);
//! - [`client_auth`]: the client-certificate verifier and the [`ClientCertCheck`] hook;
//! - [`files`]: operator-supplied PEM certificate chain and PKCS#8 key;
//! - [`listener`]: the accept loop (handshake timeout, handshake cap, graceful shutdown).

pub mod client_auth;
pub mod files;
pub mod listener;
pub mod resolver;
pub mod signer;

pub use client_auth::{ClientCertCheck, ClientCertRefused};
pub use resolver::ServerCertResolver;
pub use signer::HsmSigningKey;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::{ServerConfig, ServerSessionMemoryCache, WebPkiClientVerifier};
use std::sync::Arc;

/// Whether and how clients present certificates (`server.tls.client_auth`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientAuth {
    /// No certificate is asked for.
    #[default]
    None,
    /// Asked for; a client without one still connects (admins, enrolling
    /// devices), a client with one must present a valid, unrevoked one.
    Optional,
    /// Every client must present a valid, unrevoked device certificate.
    Required,
}

impl std::str::FromStr for ClientAuth {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "optional" => Ok(Self::Optional),
            "required" => Ok(Self::Required),
            other => Err(format!(
                "`{other}` is not one of \"none\", \"optional\", \"required\""
            )),
        }
    }
}

impl ClientAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Optional => "optional",
            Self::Required => "required",
        }
    }
}

/// The client's certificate (DER of the leaf), verified during the TLS
/// handshake: it chains to one of keyward's issuing CAs and passed the
/// [`ClientCertCheck`]. A request extension next to
/// `ConnectInfo<SocketAddr>`; absent on plain HTTP and when the client sent none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate(pub Arc<[u8]>);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration refused by rustls")]
    Rustls(#[from] rustls::Error),
    #[error("client authentication needs at least one issuing CA certificate as trust anchor")]
    NoTrustAnchors,
    #[error("cannot build the client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("client authentication is `{0}` but no revocation check was supplied")]
    NoRevocationCheck(&'static str),
    #[error(transparent)]
    Files(#[from] files::TlsFileError),
    #[error(
        "key algorithm {0} cannot sign TLS handshakes with this key store (TLS 1.3 needs RSA-PSS; use ecdsa-p256, ecdsa-p384 or ed25519)"
    )]
    UnsupportedKey(crate::model::KeyAlgorithm),
}

impl TlsError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Rustls(_) => "tls_config_refused",
            Self::NoTrustAnchors => "tls_no_trust_anchors",
            Self::Verifier(_) => "tls_verifier_invalid",
            Self::NoRevocationCheck(_) => "tls_no_revocation_check",
            Self::Files(e) => e.code(),
            Self::UnsupportedKey(_) => "tls_key_unsupported",
        }
    }
}

/// The one crypto provider of the process (ring, as for everything else in
/// keyward), passed explicitly so that the listener does not depend on a
/// process-wide default having been installed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client authentication: mode, trust anchors and the revocation hook.
pub struct ClientAuthSettings {
    pub mode: ClientAuth,
    /// DER certificates of keyward's issuing CAs. Anchoring at the issuing
    /// CAs (not the root) lets devices send only their leaf.
    pub trust_anchors: Vec<Vec<u8>>,
    /// Required unless `mode` is `None`.
    pub check: Option<Arc<dyn ClientCertCheck>>,
}

/// Sessions kept for stateful resumption (TLS 1.2 session ids, TLS 1.3
/// when tickets are off). Each costs a few hundred bytes.
const SESSION_CACHE_SIZE: usize = 16 * 1024;

/// The rustls server configuration: certificate from `resolver`, TLS 1.2
/// and 1.3, HTTP/1.1 by ALPN, session resumption by cache and tickets (a
/// resumed handshake costs no signature: with the key in an HSM, every full
/// handshake is one HSM operation), and the client verifier for `client_auth`.
pub fn server_config(
    resolver: Arc<ServerCertResolver>,
    client_auth: ClientAuthSettings,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::ALL_VERSIONS)?;
    let builder = match client_auth.mode {
        ClientAuth::None => builder.with_no_client_auth(),
        mode => {
            let check = client_auth
                .check
                .ok_or(TlsError::NoRevocationCheck(mode.as_str()))?;
            let mut roots = RootCertStore::empty();
            for der in client_auth.trust_anchors {
                roots.add(CertificateDer::from(der))?;
            }
            if roots.is_empty() {
                return Err(TlsError::NoTrustAnchors);
            }
            let mut vb = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if mode == ClientAuth::Optional {
                vb = vb.allow_unauthenticated();
            }
            let verifier = client_auth::CheckedClientVerifier::new(vb.build()?, check);
            builder.with_client_cert_verifier(Arc::new(verifier))
        }
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
}
