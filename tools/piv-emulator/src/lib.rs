//! Software YubiKey PIV card for tests: the APDU applet, its transport and the vpcd socket loop.
//!
//! The crate emulates the subset of a YubiKey 5 PIV applet that the `yubikey` crate,
//! `yubico-piv-tool` and `ykcs11` use, and plugs it into vsmartcard's `vpcd` virtual reader so
//! that the real PC/SC stack (pcsc crate → pcscd → vpcd) talks to it. It is a test tool: secrets
//! live in memory and on the command line, and nothing here is hardened.

pub mod apdu;
pub mod attest;
pub mod crypto;
pub mod piv;
pub mod tlv;
pub mod vpcd;

pub use piv::{Card, CardConfig};
