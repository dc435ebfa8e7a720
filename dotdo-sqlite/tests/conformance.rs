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

/// The kit on `:memory:` (one connection serves reads and writes).
mod in_memory {
    use std::sync::Arc;

    use dotdo_core::testkit::{hot_factory, HotFactory, HotFixture};
    use dotdo_sqlite::SqliteStore;

    fn factory() -> HotFactory {
        hot_factory(|clock| async move {
            let store = SqliteStore::builder(":memory:").with_clock(Arc::new(clock)).open().await.expect("open");
            HotFixture { hot: Arc::new(store.clone()), guard: Arc::new(store), keep_alive: Box::new(()) }
        })
    }

    dotdo_core::hot_conformance!(factory());
}

/// The database file at a directory the kit reopens (a restart), with each durability mode.
mod reopen {
    use std::sync::Arc;

    use dotdo_core::testkit::{hot_reopen_factory, HotFixture, HotReopenFactory};
    use dotdo_sqlite::{Durability, SqliteSettings, SqliteStore};

    fn factory(durability: Durability) -> HotReopenFactory {
        hot_reopen_factory(move |clock, dir| async move {
            let store = SqliteStore::builder(dir.join("hot.db"))
                .with_settings(SqliteSettings { durability, ..SqliteSettings::default() })
                .with_clock(Arc::new(clock))
                .open()
                .await
                .expect("open sqlite store");
            HotFixture { hot: Arc::new(store.clone()), guard: Arc::new(store), keep_alive: Box::new(()) }
        })
    }

    mod normal {
        dotdo_core::hot_reopen_conformance!(super::factory(super::Durability::Normal));
    }

    mod full {
        dotdo_core::hot_reopen_conformance!(super::factory(super::Durability::Full));
    }
}
