//! The full conformance kit on dotdo-sqlite, on a file-backed database (one fresh file per case).

use std::sync::Arc;

use dotdo_core::testkit::{hot_factory, HotFactory, HotFixture};
use dotdo_sqlite::SqliteStore;

fn factory() -> HotFactory {
    hot_factory(|clock| async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::builder(dir.path().join("hot.db"))
            .with_clock(Arc::new(clock))
            .open()
            .await
            .expect("open sqlite store");
        HotFixture { hot: Arc::new(store.clone()), guard: Arc::new(store), keep_alive: Box::new(dir) }
    })
}

dotdo_core::hot_conformance!(factory());
