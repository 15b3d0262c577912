//! Backups: what to keep (retention); creation, verification, restore and replication join here.

pub mod retention;
