//! Background WAL checkpoints of a local libSQL file ([`LibsqlSettings::background_checkpoint`]).
//!
//! [`LibsqlSettings::background_checkpoint`]: crate::LibsqlSettings::background_checkpoint

use std::sync::Arc;
use std::time::Duration;

use dotdo_core::{Error, Result};
use parking_lot::{Condvar, Mutex};

/// WAL frames the background checkpoint could not copy for it to say so (64 MiB of 4 KiB pages).
const STUCK_WAL_FRAMES: i64 = 16 * 1024;

/// A thread running `PRAGMA wal_checkpoint(PASSIVE)` on its own connection every `every`;
/// stopped (and joined) on drop.
pub(crate) struct Checkpointer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// Start checkpointing the local database `db` (`shown`: its path, for log lines).
    pub(crate) fn start(db: &libsql::Database, busy_timeout: Duration, every: Duration, shown: String) -> Result<Self> {
        let conn = db
            .connect()
            .map_err(|e| Error::backend(format!("opening the WAL checkpoint connection of {shown}: {e}")))?;
        // A checkpoint never waits on a lock (PASSIVE); the timeout only covers reading the
        // schema and the WAL index while another connection rebuilds it.
        conn.busy_timeout(busy_timeout).map_err(|e| {
            Error::backend(format!("setting the busy timeout of the checkpoint connection of {shown}: {e}"))
        })?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("dotdo-libsql-checkpoint".into())
            .spawn(move || {
                let mut failures = 0u64;
                let mut stuck = false;
                loop {
                    {
                        let (lock, cv) = &*flag;
                        let mut stopped = lock.lock();
                        if !*stopped {
                            cv.wait_for(&mut stopped, every);
                        }
                        if *stopped {
                            return;
                        }
                    }
                    // libsql's local calls run SQLite synchronously inside their futures: no
                    // runtime is needed to drive them.
                    match futures::executor::block_on(round(&conn)) {
                        Ok((log, done)) => {
                            failures = 0;
                            // Frames nothing can copy (a reader holds them): the WAL only grows.
                            let behind = log.saturating_sub(done);
                            if behind >= STUCK_WAL_FRAMES && !stuck {
                                tracing::warn!(frames = behind, path = %shown, "the WAL is not shrinking: a long read transaction holds frames the checkpoint cannot copy");
                            }
                            stuck = behind >= STUCK_WAL_FRAMES;
                        }
                        Err(e) => {
                            // An error is not routine (I/O, a full disk, a damaged file): said at
                            // once, then every 100th of a streak.
                            failures += 1;
                            if failures % 100 == 1 {
                                tracing::warn!(error = %e, failures, path = %shown, "background WAL checkpoint failed");
                            } else {
                                tracing::debug!(error = %e, "background WAL checkpoint failed; retrying next round");
                            }
                        }
                    }
                }
            })
            .map_err(|e| Error::backend(format!("starting the WAL checkpoint thread: {e}")))?;
        Ok(Checkpointer { stop, thread: Some(thread) })
    }
}

/// One passive checkpoint: (frames in the WAL, frames copied into the database file). A
/// checkpoint running in another process, or frames a reader still needs, wait for the next
/// round (SQLite reports them as busy, not as an error).
async fn round(conn: &libsql::Connection) -> libsql::Result<(i64, i64)> {
    let mut rows = conn.query("PRAGMA wal_checkpoint(PASSIVE)", ()).await?;
    let row = rows.next().await?.ok_or_else(|| libsql::Error::QueryReturnedNoRows)?;
    Ok((row.get::<i64>(1)?, row.get::<i64>(2)?))
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock() = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            // At most one checkpoint round in progress.
            let _ = t.join();
        }
    }
}
