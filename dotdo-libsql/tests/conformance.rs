//! The full conformance kit on dotdo-libsql, on a local libSQL database file (one fresh file per
//! case), twice: with prepared statements (the local path) and with every round trip rendered as
//! one SQL batch (the path remote primaries use), so the remote code path runs without a server.

use std::sync::Arc;

use dotdo_core::testkit::{hot_factory, HotFactory, HotFixture};
use dotdo_libsql::{LibsqlSettings, LibsqlStore, Transport};

fn factory(transport: Transport) -> HotFactory {
    hot_factory(move |clock| async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LibsqlStore::local(dir.path().join("hot.db"))
            .with_settings(LibsqlSettings { transport, ..Default::default() })
            .with_clock(Arc::new(clock))
            .open()
            .await
            .expect("open libsql store");
        HotFixture { hot: Arc::new(store.clone()), guard: Arc::new(store), keep_alive: Box::new(dir) }
    })
}

mod prepared {
    use super::*;
    dotdo_core::hot_conformance!(factory(Transport::Auto));
}

mod batched {
    use super::*;
    dotdo_core::hot_conformance!(factory(Transport::Batch));
}

/// The local database file at a directory the kit reopens (a restart), on both statement paths.
mod reopen {
    use std::sync::Arc;

    use dotdo_core::testkit::{hot_reopen_factory, HotFixture, HotReopenFactory};
    use dotdo_libsql::{LibsqlSettings, LibsqlStore, Transport};

    fn factory(transport: Transport) -> HotReopenFactory {
        hot_reopen_factory(move |clock, dir| async move {
            let store = LibsqlStore::local(dir.join("hot.db"))
                .with_settings(LibsqlSettings { transport, ..Default::default() })
                .with_clock(Arc::new(clock))
                .open()
                .await
                .expect("open libsql store");
            HotFixture { hot: Arc::new(store.clone()), guard: Arc::new(store), keep_alive: Box::new(()) }
        })
    }

    mod prepared {
        dotdo_core::hot_reopen_conformance!(super::factory(super::Transport::Auto));
    }

    mod batched {
        dotdo_core::hot_reopen_conformance!(super::factory(super::Transport::Batch));
    }
}
