//! Enrollment attestation: how a device proves which group it belongs to.

pub mod jwt;
