//! keyward: a key management daemon that keeps CA and device keys in hardware.
//!
//! `model` (shared domain types) and `crypto` (chain checks, RNG) sit at the
//! bottom and import nothing of keyward. The crate is organised as ports (traits in `keystore`, `store`) with
//! backends behind them, services that depend only on the ports (`ca`,
//! `registry`, `auth`, `audit`, `policy`), the HTTP surface (`http`) and the
//! operator CLI (`cli`). `app` is the one composition root that names
//! concrete backends. `softhsm` is dev and test support (`keyward dev`,
//! tests, benchmark), not used by the daemon.

#![forbid(unsafe_code)]

pub mod app;
pub mod audit;
pub mod auth;
pub mod backup;
pub mod broker;
pub mod ca;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod http;
pub mod jobs;
pub mod keystore;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod policy;
pub mod ratelimit;
pub mod redis;
pub mod registry;
pub mod rotation;
pub mod secret;
pub mod softhsm;
pub mod store;
pub mod tls;
