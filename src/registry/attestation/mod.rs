//! Enrollment attestation verifiers: one module per method, each pure (no
//! store, no clock, no HTTP); the registry picks the group and records.

pub mod jwt;
pub mod x509;
