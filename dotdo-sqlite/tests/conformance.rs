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

/// The kit again with SQLite reading the file through a memory map (`mmap_bytes`), which
/// changes how pages reach SQLite's cache but must change nothing a caller sees.
mod with_memory_map {
    use std::sync::Arc;

    use dotdo_core::testkit::{hot_factory, HotFactory, HotFixture};
    use dotdo_sqlite::{SqliteSettings, SqliteStore};

    fn factory() -> HotFactory {
        hot_factory(|clock| async move {
            let dir = tempfile::tempdir().expect("tempdir");
            let settings = SqliteSettings { mmap_bytes: 64 << 20, ..SqliteSettings::default() };
            let store = SqliteStore::builder(dir.path().join("hot.db"))
                .with_settings(settings)
                .with_clock(Arc::new(clock))
                .open()
                .await
                .expect("open sqlite store");
            HotFixture { hot: Arc::new(store.clone()), guard: Arc::new(store), keep_alive: Box::new(dir) }
        })
    }

    dotdo_core::hot_conformance!(factory());
}
