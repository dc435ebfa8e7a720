//! The dotdo conformance kit on Iceberg tables: local files with the SQL (SQLite) catalog, and
//! an in-memory warehouse with iceberg's memory catalog.

use std::sync::Arc;

use dotdo_core::testkit::{cold_factory, ColdFactory, ColdFixture};
use dotdo_iceberg::{CatalogConfig, IcebergColdStore};

/// A fresh table in a new temporary directory, SQLite catalog at `<dir>/catalog.db`.
fn local_sql_factory() -> ColdFactory {
    cold_factory(|clock| async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = IcebergColdStore::builder(dir.path().to_str().expect("utf-8 path"))
            .table(["kit"], "changes")
            .with_clock(Arc::new(clock))
            .build()
            .await
            .expect("open iceberg cold store");
        ColdFixture { sink: Arc::new(store.clone()), accel: Some(Arc::new(store)), keep_alive: Box::new(dir) }
    })
}

/// A fresh in-memory warehouse with iceberg's memory catalog.
fn memory_factory() -> ColdFactory {
    cold_factory(|clock| async move {
        let store = IcebergColdStore::builder("memory://kit")
            .catalog(CatalogConfig::Memory)
            .table(["kit"], "changes")
            .with_clock(Arc::new(clock))
            .build()
            .await
            .expect("open iceberg cold store");
        ColdFixture { sink: Arc::new(store.clone()), accel: Some(Arc::new(store)), keep_alive: Box::new(()) }
    })
}

mod common;

/// Local files and a SQL catalog that loses the reply of an armed commit after applying it.
fn lost_reply_factory() -> dotdo_core::testkit::ColdFaultFactory {
    dotdo_core::testkit::cold_fault_factory(|clock| async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let warehouse = format!("file://{}", dir.path().display());
        common::switched_fault_fixture(dir, warehouse, Vec::new(), clock).await
    })
}

mod lost_replies_sql_catalog {
    dotdo_core::cold_fault_conformance!(super::lost_reply_factory());
}

mod local_files_sql_catalog {
    dotdo_core::cold_conformance!(super::local_sql_factory(), with_accelerator);
}

mod memory_store_memory_catalog {
    dotdo_core::cold_conformance!(super::memory_factory(), with_accelerator);
}

/// Local files, SQL catalog, and a watermark checkpoint file written by every commit (the
/// inline summary part is always empty), so every watermark read goes through a checkpoint.
fn local_checkpoint_factory() -> ColdFactory {
    cold_factory(|clock| async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = IcebergColdStore::builder(dir.path().to_str().expect("utf-8 path"))
            .table(["kit"], "changes")
            .with_clock(Arc::new(clock))
            .settings(dotdo_iceberg::Settings { watermark_checkpoint_objects: 0, ..Default::default() })
            .build()
            .await
            .expect("open iceberg cold store");
        ColdFixture { sink: Arc::new(store.clone()), accel: Some(Arc::new(store)), keep_alive: Box::new(dir) }
    })
}

mod local_files_watermark_checkpoints {
    dotdo_core::cold_conformance!(super::local_checkpoint_factory(), with_accelerator);
}

/// The warehouse (and its SQL catalog) at a directory the kit reopens: what a commit
/// acknowledged is there after a restart, also when every watermark read goes through a
/// checkpoint file.
mod reopen {
    use std::sync::Arc;

    use dotdo_core::testkit::{cold_reopen_factory, ColdFixture, ColdReopenFactory};
    use dotdo_iceberg::IcebergColdStore;

    fn factory(checkpoint_every_commit: bool) -> ColdReopenFactory {
        cold_reopen_factory(move |clock, dir| async move {
            let mut settings = dotdo_iceberg::Settings::default();
            if checkpoint_every_commit {
                settings.watermark_checkpoint_objects = 0;
            }
            let store = IcebergColdStore::builder(dir.to_str().expect("utf-8 path"))
                .table(["kit"], "changes")
                .with_clock(Arc::new(clock))
                .settings(settings)
                .build()
                .await
                .expect("open iceberg cold store");
            ColdFixture { sink: Arc::new(store.clone()), accel: Some(Arc::new(store)), keep_alive: Box::new(()) }
        })
    }

    mod inline_watermarks {
        dotdo_core::cold_reopen_conformance!(super::factory(false));
    }

    mod checkpointed_watermarks {
        dotdo_core::cold_reopen_conformance!(super::factory(true));
    }
}
