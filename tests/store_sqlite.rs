//! The Store conformance suite against SQLite on a real file in a temp dir,
//! plus what only the SQLite backend has (schema versions, file modes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "common/store_suite.rs"]
mod store_suite;

use futures::future::BoxFuture;
use keyward::clock::ManualClock;
use keyward::store::Store;
use keyward::store::sqlite::SqliteStore;
use std::sync::Arc;
use store_suite::Cx;

/// A fresh database file in its own temp dir; a small batch size so that
/// concurrent cases span several group commits.
fn open(clock: Arc<ManualClock>) -> BoxFuture<'static, Cx> {
    Box::pin(async move {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyward.db");
        let store = SqliteStore::open(&path, 8, clock.clone()).unwrap();
        Cx::new(
            Arc::new(store),
            clock,
            move || {
                let path = path.clone();
                Box::pin(async move {
                    Arc::new(SqliteStore::open_read_only(&path).unwrap()) as Arc<dyn Store>
                })
            },
            dir,
        )
    })
}

mod conformance {
    use super::*;
    store_suite!(open);
}
