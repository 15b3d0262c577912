//! Admins, roles and secrets that authenticate callers.
//!
//! Admin tokens and registration secrets are random 256-bit values shown
//! once; the store keeps only HMAC-SHA-256(pepper, token), so a copy of the
//! database alone does not let anyone act as an admin.

pub mod admins;

use base64::Engine;
use ring::rand::SecureRandom;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What an admin may do. Ordered: `Admin` can do everything `Approver` can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads registrations, audit reports; changes nothing.
    Auditor,
    /// Approves or denies registrations.
    Approver,
    /// Everything, including managing admins.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auditor => "auditor",
            Self::Approver => "approver",
            Self::Admin => "admin",
        }
    }

    /// Whether this role includes `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auditor" => Ok(Self::Auditor),
            "approver" => Ok(Self::Approver),
            "admin" => Ok(Self::Admin),
            other => Err(format!(
                "unknown role `{other}` (expected auditor, approver or admin)"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the system random generator failed")]
pub struct RandomError;

/// Fills `n` bytes from the OS CSPRNG.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, RandomError> {
    let mut buf = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| RandomError)?;
    Ok(buf)
}

/// A new bearer secret with a recognisable prefix (`kwa_` admin, `kwr_`
/// registration), so leaked tokens can be found by secret scanners.
pub fn new_secret(prefix: &str) -> Result<SecretString, RandomError> {
    let bytes = zeroize::Zeroizing::new(random_bytes(32)?);
    let body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes.as_slice());
    Ok(SecretString::from(format!("{prefix}{body}")))
}

/// Hashes bearer secrets with a server-side pepper.
#[derive(Clone)]
pub struct TokenHasher {
    key: ring::hmac::Key,
}

impl fmt::Debug for TokenHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHasher(..)")
    }
}

impl TokenHasher {
    pub fn new(pepper: &SecretString) -> Self {
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, pepper.expose_secret().as_bytes()),
        }
    }

    pub fn hash(&self, token: &str) -> Vec<u8> {
        ring::hmac::sign(&self.key, token.as_bytes())
            .as_ref()
            .to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin.allows(Role::Approver));
        assert!(Role::Approver.allows(Role::Approver));
        assert!(!Role::Approver.allows(Role::Admin));
        assert!(!Role::Auditor.allows(Role::Approver));
        assert_eq!("approver".parse::<Role>().unwrap(), Role::Approver);
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn secrets_are_unique_and_hashes_depend_on_pepper() {
        let a = new_secret("kwa_").unwrap();
        let b = new_secret("kwa_").unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert!(a.expose_secret().starts_with("kwa_"));
        let h1 = TokenHasher::new(&SecretString::from("p1".to_string()));
        let h2 = TokenHasher::new(&SecretString::from("p2".to_string()));
        assert_ne!(h1.hash("t"), h2.hash("t"));
        assert_eq!(h1.hash("t"), h1.hash("t"));
    }
}
