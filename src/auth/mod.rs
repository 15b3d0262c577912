//! Admins, roles and secrets that authenticate callers.
//!
//! Admin tokens and registration secrets are random 256-bit values shown
//! once; the store keeps only HMAC-SHA-256(pepper, token), so a copy of the
//! database alone does not let anyone act as an admin.

pub mod admins;
mod error;
pub mod requests;
pub mod tokens;

pub use error::AdminError;

use secrecy::{ExposeSecret, SecretString};
use std::fmt;

pub use crate::crypto::{RandomError, new_secret, random_bytes};
pub use crate::model::Role;

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
