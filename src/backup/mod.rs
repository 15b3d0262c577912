//! Backups: encrypted archives of the store, policies and wrapped keys, and their replication.

pub mod location;
