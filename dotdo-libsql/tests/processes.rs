//! Real OS processes on one local libSQL file: cross-process fencing under contention, and
//! SIGKILL crash recovery, with the shared tests of `dotdo_core::testkit::process` (the same ones
//! dotdo-sqlite runs). `DOTDO_CRASH_KILLS` raises the number of kills (default 20).

use std::path::PathBuf;
use std::sync::Arc;

use dotdo_core::testkit::process::{self, ProcessKit};
use dotdo_core::{ConsistencyGuard, HotStore};
use dotdo_libsql::LibsqlStore;

fn kit() -> ProcessKit {
    ProcessKit {
        open: Arc::new(|path: PathBuf| {
            Box::pin(async move {
                let s = LibsqlStore::local(path).open().await?;
                Ok((Arc::new(s.clone()) as Arc<dyn HotStore>, Arc::new(s) as Arc<dyn ConsistencyGuard>))
            })
        }),
        integrity: Arc::new(|path: PathBuf| {
            Box::pin(async move { LibsqlStore::local(path).open().await?.integrity_check().await })
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
