//! Scheduled, crash-safe rotation of the keys keyward holds (issuing CA,
//! OCSP signing), and renewal planning for device certificates.
//!
//! - [`plan`]: the pure planner, `(keys, rotations, policy, now) -> plan`,
//!   no I/O and no clock reads, so every decision is unit-tested with
//!   explicit instants;
//! - [`executor`]: one persisted rotation record per rotation, moved one
//!   committed step at a time (each step idempotent and resumable);
//! - [`fault`]: the test-only pause points at each step boundary (debug
//!   builds only) that the kill -9 tests use.
//!
//! The rotation job (`crate::jobs::rotation`) builds the planner's input
//! from the store when the policy's schedule fires, starts the rotations
//! that are due, and has the executor carry out every open rotation.

pub mod executor;
pub mod fault;
pub mod plan;

pub use executor::{RotationError, Rotator};
