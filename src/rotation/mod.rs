//! Scheduled, crash-safe rotation of the keys keyward holds (issuing CA,
//! OCSP signing, TLS server), and renewal planning for device certificates.
//!
//! `plan` is the pure planner: `(keys, rotations, policy, now) -> plan`, no
//! I/O and no clock reads, so every decision is unit-tested with explicit
//! instants. The rotation job builds its input from the store, runs it, and
//! hands the items to the executor, which persists one rotation record per
//! rotation and moves it through `RotationStep`.

pub mod plan;
