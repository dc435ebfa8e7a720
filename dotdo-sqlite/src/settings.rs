//! Settings of the SQLite backend: plain data with documented defaults.

use std::time::Duration;

/// How durable an acknowledged write is (SQLite's `synchronous` pragma in WAL mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous = NORMAL` (default). A committed write is in the WAL file before the call
    /// returns, so it **survives a crash or SIGKILL of the process**. After a power loss or OS
    /// crash the transactions committed since the WAL was last synced (at a checkpoint) may be
    /// lost (never corrupted), lease acquires included: a token may then be issued again. The
    /// holders that had it ran on this machine and died with it; a cold store that saw the token
    /// makes the runtime raise the object's token floor above it on the next activation.
    #[default]
    Normal,
    /// `synchronous = FULL`. The WAL is fsynced on every commit: a committed write also
    /// **survives power loss**. Costs one fsync per write.
    Full,
}

/// Where SQLite work runs when called from async code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Execution {
    /// Choose per call (default): on a multi-threaded tokio runtime use `block_in_place` (no
    /// thread hop; tokio moves other tasks off this worker); on a current-thread tokio runtime use
    /// `spawn_blocking`; outside tokio run inline.
    ///
    /// Under `block_in_place` a call that waits (for a file another process holds, up to the
    /// busy budget of [`SqliteSettings::busy_retries`]) keeps a thread of tokio's blocking pool
    /// while tokio hands its worker's core to another: with more such calls waiting at once than
    /// the pool has threads (`max_blocking_threads`, 512 by default), the cores wait for pool
    /// threads too and the runtime's other tasks stall until calls finish. A host that may queue
    /// that many calls on a busy file bounds its concurrency (a semaphore around store calls) or
    /// uses [`SpawnBlocking`](Execution::SpawnBlocking), which queues calls without taking cores.
    #[default]
    Auto,
    /// Always `tokio::task::spawn_blocking` (a hop to the blocking pool per call).
    SpawnBlocking,
    /// Run on the calling thread. Only for hosts that call from dedicated threads; it blocks an
    /// async executor for the duration of the SQLite call.
    Inline,
}

/// Settings of a [`SqliteStore`](crate::SqliteStore).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqliteSettings {
    /// Durability of acknowledged writes. Default [`Durability::Normal`].
    pub durability: Durability,
    /// How long one SQLite call waits for a lock held by another connection or process before
    /// reporting busy. Default 2 s.
    pub busy_timeout: Duration,
    /// How many times a busy transaction is retried (with doubling backoff from
    /// `retry_backoff`) before the call fails with a retryable `Unavailable`. Default 5. The
    /// same budget (every attempt's `busy_timeout` plus the backoff) bounds a write call's wait
    /// for the store's own write connection, so writers queued in one process also fail in
    /// bounded time: a write call waits at most twice the budget in all (for a blocking thread
    /// and the connection, then in its own busy retries; about 25 s with the defaults); one that
    /// already waited longer than the budget for a blocking thread fails right away. With
    /// `Execution::Auto` on a multi-threaded runtime the call runs under `block_in_place`, so a
    /// caller's own timeout around it cannot fire before that bound. At most
    /// [`MAX_BUSY_RETRIES`](crate::MAX_BUSY_RETRIES) (100).
    pub busy_retries: u32,
    /// First backoff between busy retries (doubling, at most 1 s each; each wait a random length
    /// between half of that and all of it). Default 10 ms; at most 1 s.
    pub retry_backoff: Duration,
    /// Maximum number of read connections kept open. Default 4.
    pub read_connections: usize,
    /// Where SQLite work runs. Default [`Execution::Auto`].
    pub execution: Execution,
    /// WAL auto-checkpoint threshold in pages (`PRAGMA wal_autocheckpoint`). The commit that
    /// crosses it copies the WAL into the database file and fsyncs, inline. A larger value makes
    /// that rarer (amortizing the fsync over more writes) at the cost of a larger WAL file.
    /// Default 16 384 pages (64 MiB with 4 KiB pages); SQLite's own default is 1 000. Also the
    /// size the WAL file is cut back to when it starts over (`journal_size_limit`, at least
    /// 4 MiB). Zero turns automatic checkpoints off; with `background_checkpoint` off too,
    /// nothing would checkpoint, and the store refuses to open (`InvalidInput`; not a private
    /// `:memory:` database, which has no WAL).
    pub wal_autocheckpoint_pages: u32,
    /// SQLite page cache per connection, in KiB (allocated as used). Default 64 MiB, so a batch of 100k rows does not spill dirty pages mid-transaction.
    pub cache_kib: u32,
    /// Bytes of the database file SQLite reads through a memory map (`PRAGMA mmap_size`) instead
    /// of `read()` calls into its page cache. Pages missing from the page cache then cost no
    /// system call and no copy: worth it for large batches once the file has outgrown
    /// `cache_kib` (measured with raw rusqlite: 100k-row batches into a 90-150 MB file went from
    /// ~175k to ~330k rows/s with a 1 GiB map). It costs small write transactions: a lease
    /// acquire + release went from 24.6-25.2 µs to 29-31 µs with the map in the same bench, so
    /// the default is off. Writes still go through the WAL with `write()`; the map is address
    /// space, not memory. Default `0` (no map). SQLite maps at most its compile-time
    /// `SQLITE_MAX_MMAP_SIZE` (0x7fff0000 bytes, just under 2 GiB, in the bundled build): a
    /// larger value maps that much. With a map, a file truncated under the store by another
    /// program (a backup copied into it) kills the process with `SIGBUS` on the next read of a
    /// page past the new end, where `read()` would have given an error.
    pub mmap_bytes: u64,
    /// Background WAL checkpoints: a thread per store copies committed WAL frames into the
    /// database file every this often (`PRAGMA wal_checkpoint(PASSIVE)`: it never waits for
    /// readers or writers), so a commit rarely crosses `wal_autocheckpoint_pages` and pays
    /// for the copy and its fsync inline; that threshold stays as the safety net. `None` (or
    /// zero): checkpoints only inline, on the committing writer's thread. Under `Durability::Normal`
    /// the WAL reaches the disk at checkpoints, so this period bounds what a power loss can
    /// take (see docs/durability.md). Default 50 ms.
    pub background_checkpoint: Option<Duration>,
}

impl Default for SqliteSettings {
    fn default() -> Self {
        SqliteSettings {
            durability: Durability::Normal,
            busy_timeout: Duration::from_secs(2),
            busy_retries: 5,
            retry_backoff: Duration::from_millis(10),
            read_connections: 4,
            execution: Execution::Auto,
            cache_kib: 64 * 1024,
            mmap_bytes: 0,
            wal_autocheckpoint_pages: 16 * 1024,
            background_checkpoint: Some(Duration::from_millis(50)),
        }
    }
}
