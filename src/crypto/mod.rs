//! Cryptographic helpers shared by every layer: certificate signature checks
//! and the CSPRNG. Sits below everything with `model`; imports nothing of keyward.

mod chain;
mod oaep;
mod random;

pub use chain::{verify_issued_by, verify_spki_signature};
pub use oaep::{OaepError, oaep_encrypt};
pub use random::{RandomError, new_secret, random_bytes};
