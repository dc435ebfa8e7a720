//! Background WAL checkpoints of a local libSQL file ([`LibsqlSettings::background_checkpoint`]).
//!
//! [`LibsqlSettings::background_checkpoint`]: crate::LibsqlSettings::background_checkpoint

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dotdo_core::sql_schema::{CheckpointRound, CheckpointThread, FileWatch};
use dotdo_core::{Error, Result};

/// Start checkpointing the local database `db` every `every` on a connection of its own
/// (`shown`: its path, for log lines), watching the file as `watch` remembers it; stopped and
/// joined when the returned thread is dropped.
///
/// Each round holds the store's write connection (`writer`), so that no commit of this store
/// runs while it checkpoints: libSQL bundles an SQLite before 3.51.3, whose "WAL-reset bug" can
/// corrupt a WAL database when a checkpoint that starts right after another completed races a
/// commit on another connection (https://www.sqlite.org/wal.html#walresetbug). Commits of
/// other processes, or of other store handles in this process, on the same file can still race
/// it (see docs/durability.md).
pub(crate) async fn start(
    db: &libsql::Database,
    busy_timeout: Duration,
    every: Duration,
    shown: String,
    watch: FileWatch,
    writer: Arc<tokio::sync::Mutex<crate::conn::Conn>>,
) -> Result<CheckpointThread> {
    let conn =
        db.connect().map_err(|e| Error::backend(format!("opening the WAL checkpoint connection of {shown}: {e}")))?;
    // A checkpoint never waits on a lock (PASSIVE); the timeout only covers reading the schema
    // and the WAL index while another connection rebuilds it.
    conn.busy_timeout(busy_timeout).map_err(|e| {
        Error::backend(format!("setting the busy timeout of the checkpoint connection of {shown}: {e}"))
    })?;
    // macOS: a checkpoint's syncs reach the disk (a plain fsync leaves them in the drive's cache).
    conn.execute("PRAGMA checkpoint_fullfsync = ON", ()).await.map_err(|e| {
        Error::backend(format!("setting checkpoint_fullfsync on the checkpoint connection of {shown}: {e}"))
    })?;
    let file = watch.clone();
    CheckpointThread::start("dotdo-libsql-checkpoint", every, shown, watch, move || {
        // Between the store's writes (a thread of its own, outside any runtime: it may block).
        // In the writer's queue like any write (a `try_lock` never got a turn while writes kept
        // queuing: the lock passes straight to the next waiter), and looking at the file while
        // it waits: waiting blind, the thread missed a file replaced while a write held the
        // writer through a long busy wait (another process's lock), and that write, committed
        // into the old file, answered `Ok` (dotdo-sqlite's thread never waits on its writer).
        let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = std::task::Context::from_waker(&waker);
        let mut turn = std::pin::pin!(writer.lock());
        let _no_commit_meanwhile = loop {
            if let std::task::Poll::Ready(guard) = turn.as_mut().poll(&mut cx) {
                break guard;
            }
            if file.replaced() {
                return CheckpointRound::Replaced;
            }
            std::thread::park_timeout(WRITER_POLL);
        };
        // libsql's local calls run SQLite synchronously inside their futures: no runtime is
        // needed to drive them.
        match futures::executor::block_on(round(&conn)) {
            Ok((log, copied, data_version)) => CheckpointRound::Done { log, copied, data_version: Some(data_version) },
            Err(e) => CheckpointRound::Failed(e.to_string()),
        }
    })
}

/// Wakes the checkpoint thread when the store's writer is its turn.
struct Unpark(std::thread::Thread);

impl std::task::Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// How often a checkpoint round waiting for the store's writer looks at the file.
const WRITER_POLL: Duration = Duration::from_millis(5);

/// One passive checkpoint: (frames in the WAL, frames copied into the database file, the
/// connection's `data_version` read before it).
async fn round(conn: &libsql::Connection) -> libsql::Result<(i64, i64, i64)> {
    let mut rows = conn.query("PRAGMA data_version", ()).await?;
    let data_version = rows.next().await?.ok_or(libsql::Error::QueryReturnedNoRows)?.get::<i64>(0)?;
    drop(rows);
    let mut rows = conn.query("PRAGMA wal_checkpoint(PASSIVE)", ()).await?;
    let row = rows.next().await?.ok_or(libsql::Error::QueryReturnedNoRows)?;
    Ok((row.get::<i64>(1)?, row.get::<i64>(2)?, data_version))
}
