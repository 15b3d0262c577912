//! PostgreSQL backend (for several daemons sharing one store).
//!
//! Only the snapshot side lives here on the `pgmigrate` branch; the store
//! itself (`PgStore`) comes from the `pgstore` branch, whose `mod.rs`
//! replaces this one (keep `pub mod snapshot;`).

pub mod snapshot;
