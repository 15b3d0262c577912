//! Scheduled, crash-safe key rotation.
//!
//! - [`executor`]: one persisted rotation record per rotation, moved one
//!   committed step at a time (each step idempotent and resumable);
//! - [`fault`]: the test-only pause points at each step boundary (debug
//!   builds only) that the kill -9 tests use.

pub mod executor;
pub mod fault;

pub use executor::{RotationError, Rotator};
