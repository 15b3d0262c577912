//! Key handles and key-store names.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The name of the key store configured as `[keystore]`.
pub const DEFAULT_KEYSTORE: &str = "default";

/// An opaque, backend-specific reference to a key pair, stored in the
/// database. For PKCS#11 it is an RFC 7512 URI carrying the CKA_ID.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyHandle(pub String);

impl fmt::Debug for KeyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHandle({})", self.0)
    }
}

impl fmt::Display for KeyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
