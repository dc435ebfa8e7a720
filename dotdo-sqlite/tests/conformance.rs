//! The full conformance kit on dotdo-sqlite, on a file-backed database (one fresh file per case).

use std::sync::Arc;

use dotdo_core::testkit::{hot_factory, HotFactory, HotFixture};
use dotdo_sqlite::{SqliteSettings, SqliteStore};

fn factory_with(settings: SqliteSettings) -> HotFactory {
    hot_factory(move |clock| {
        let settings = settings.clone();
        async move {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = SqliteStore::builder(dir.path().join("hot.db"))
                .with_settings(settings)
                .with_clock(Arc::new(clock))
                .open()
                .await
                .expect("open sqlite store");
            HotFixture { hot: Arc::new(store.clone()), guard: Arc::new(store), keep_alive: Box::new(dir) }
        }
    })
}

fn factory() -> HotFactory {
    factory_with(SqliteSettings::default())
}

dotdo_core::hot_conformance!(factory());

/// The kit again with SQLite reading the file through a memory map (`mmap_bytes`), which
/// changes how pages reach SQLite's cache but must change nothing a caller sees.
mod with_memory_map {
    use dotdo_core::testkit::HotFactory;
    use dotdo_sqlite::SqliteSettings;

    fn factory() -> HotFactory {
        super::factory_with(SqliteSettings { mmap_bytes: 64 << 20, ..SqliteSettings::default() })
    }

    dotdo_core::hot_conformance!(factory());
}
