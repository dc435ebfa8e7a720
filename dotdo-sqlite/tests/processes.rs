//! Real OS processes on one SQLite file: cross-process fencing under contention, and SIGKILL
//! crash recovery. `DOTDO_CRASH_KILLS` raises the number of kills (default 20).

use std::path::PathBuf;
use std::sync::Arc;

use dotdo_core::testkit::process::{self, ProcessKit};
use dotdo_core::{ConsistencyGuard, HotStore};
use dotdo_sqlite::SqliteStore;

fn kit() -> ProcessKit {
    ProcessKit {
        open: Arc::new(|path: PathBuf| {
            Box::pin(async move {
                let s = SqliteStore::builder(path).open().await?;
                Ok((Arc::new(s.clone()) as Arc<dyn HotStore>, Arc::new(s) as Arc<dyn ConsistencyGuard>))
            })
        }),
        integrity: Arc::new(|path: PathBuf| {
            Box::pin(async move { SqliteStore::builder(path).open().await?.integrity_check().await })
        }),
    }
}

#[test]
fn cross_process_fencing_rejects_every_stale_write() {
    process::fencing_contention(&kit(), "process_child");
}

#[test]
fn sigkill_loses_no_acknowledged_write() {
    process::crash_recovery(&kit(), "process_child");
}

/// The child side of the tests above; does nothing when run directly.
#[test]
fn process_child() {
    process::child_main(&kit());
}
