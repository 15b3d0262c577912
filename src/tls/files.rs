//! Operator-supplied TLS files: a PEM certificate chain (server certificate
//! first) and its PKCS#8 private key in PEM. This key is in software, in the
//! daemon's memory: the mode for a certificate from an outside CA. With
//! `issue = true` the key is generated in, and never leaves, the HSM.
//!
//! The key file is held to the rule for secret files: owner-only (0600 or
//! 0400). A key readable by group or others is refused, not used.

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Each error names the config key of the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("{key}: cannot read {}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {} holds no PEM certificate", path.display())]
    NoCertificate { key: &'static str, path: PathBuf },
    #[error("{key}: {} is not PEM", path.display())]
    NotPem { key: &'static str, path: PathBuf },
    #[error("{key}: {} holds no PKCS#8 private key in PEM (-----BEGIN PRIVATE KEY-----)", path.display())]
    NoKey { key: &'static str, path: PathBuf },
    #[error("{key}: {} is readable by group or others (mode {mode:o}); make it owner-only (chmod 600)", path.display())]
    Permissions {
        key: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error("server.tls.key_file: the key is not one rustls can use ({0})")]
    UnusableKey(#[source] rustls::Error),
    #[error(
        "server.tls.key_file: the key does not match the certificate in server.tls.certificate_file"
    )]
    KeyMismatch,
}

impl TlsFileError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Read { .. } => "tls_file_unreadable",
            Self::NoCertificate { .. } => "tls_no_certificate",
            Self::NotPem { .. } => "tls_file_not_pem",
            Self::NoKey { .. } => "tls_no_key",
            Self::Permissions { .. } => "tls_key_file_permissions",
            Self::UnusableKey(_) => "tls_key_unusable",
            Self::KeyMismatch => "tls_key_mismatch",
        }
    }
}

const CERT_KEY: &str = "server.tls.certificate_file";
const KEY_KEY: &str = "server.tls.key_file";

/// Reads the certificate chain (server certificate first).
pub fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let pem = std::fs::read(path).map_err(|source| TlsFileError::Read {
        key: CERT_KEY,
        path: path.to_path_buf(),
        source,
    })?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsFileError::NotPem {
            key: CERT_KEY,
            path: path.to_path_buf(),
        })?;
    if chain.is_empty() {
        return Err(TlsFileError::NoCertificate {
            key: CERT_KEY,
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

fn check_owner_only(path: &Path) -> Result<(), TlsFileError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| TlsFileError::Read {
            key: KEY_KEY,
            path: path.to_path_buf(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(TlsFileError::Permissions {
                key: KEY_KEY,
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    Ok(())
}

/// Reads the PKCS#8 private key; the file must be owner-only.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    check_owner_only(path)?;
    let pem = Zeroizing::new(std::fs::read(path).map_err(|source| TlsFileError::Read {
        key: KEY_KEY,
        path: path.to_path_buf(),
        source,
    })?);
    let key = PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|_| TlsFileError::NoKey {
        key: KEY_KEY,
        path: path.to_path_buf(),
    })?;
    Ok(PrivateKeyDer::Pkcs8(key))
}

/// The served certificate and key from the two files; the key must match
/// the first certificate.
pub fn load(
    certificate_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsFileError> {
    let chain = read_chain(certificate_file)?;
    let key = read_key(key_file)?;
    match CertifiedKey::from_der(chain, key, provider) {
        Ok(k) => Ok(k),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsFileError::KeyMismatch),
        Err(e) => Err(TlsFileError::UnusableKey(e)),
    }
}
