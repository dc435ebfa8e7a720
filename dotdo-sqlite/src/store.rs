//! [`SqliteStore`]: the hot store and the lease guard on one SQLite database.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dotdo_core::guard::rules::{self, LeaseRow};
use dotdo_core::ids::validate_key;
use dotdo_core::sql_schema::{CheckpointRound, CheckpointThread, FileWatch};
use dotdo_core::{
    ChangeRecord, Clock, ConsistencyGuard, Entry, Error, ErrorKind, FencingToken, HotStore, KeyRange, Lease, NodeId,
    ObjectId, ObjectInfo, Result, Seq, SystemClock, Timestamp, WriteBatch, WriteOp, WriteReceipt,
};
use parking_lot::Mutex;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::error::{class_of, map, Class};
use crate::schema;
use crate::settings::{Durability, Execution, SqliteSettings};

/// An error inside a transaction: either SQLite's (classified and maybe retried) or a decided API
/// error (fenced, conflict, …) that aborts the transaction.
enum TxError {
    Sql(rusqlite::Error),
    Api(Error),
}

impl From<rusqlite::Error> for TxError {
    fn from(e: rusqlite::Error) -> Self {
        TxError::Sql(e)
    }
}

impl From<Error> for TxError {
    fn from(e: Error) -> Self {
        TxError::Api(e)
    }
}

type TxResult<T> = std::result::Result<T, TxError>;

struct Inner {
    path: PathBuf,
    settings: SqliteSettings,
    clock: Arc<dyn Clock>,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    /// A private database (`:memory:`, or the empty path's temporary one): each connection
    /// would open its own, so reads use the write connection (and wait for a write in progress
    /// within the write budget, then `Unavailable`).
    memory: bool,
    /// The background checkpoint thread, stopped when the last clone is dropped. It also finds
    /// the file at `path` deleted or replaced by another file (a restored backup renamed over
    /// it; a copy written into the same file is not seen): every call is refused then.
    checkpointer: Option<CheckpointThread>,
}

/// The background checkpoint thread of a store: `PRAGMA wal_checkpoint(PASSIVE)` on its own
/// connection every `every`, watching the file at `path`.
fn start_checkpoints(path: &Path, settings: &SqliteSettings, every: Duration) -> Result<CheckpointThread> {
    let conn = open_connection(path, settings, false)?;
    let shown = path.display().to_string();
    CheckpointThread::start("dotdo-sqlite-checkpoint", every, shown, FileWatch::new(path), move || {
        let round = || -> rusqlite::Result<CheckpointRound> {
            // Read first: a commit after it is synced too, and counts as a change next round.
            let data_version = conn.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))?;
            let (log, copied) = conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))?;
            Ok(CheckpointRound::Done { log, copied, data_version: Some(data_version) })
        };
        round().unwrap_or_else(|e| CheckpointRound::Failed(e.to_string()))
    })
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("settings", &self.settings)
            .field("background_checkpoints", &self.checkpointer.is_some())
            .finish()
    }
}

/// [`HotStore`] + [`ConsistencyGuard`] on one SQLite database file (rusqlite, bundled SQLite).
///
/// The lease table (`do_locks`), per-object counters, state and change log share one database,
/// so the fencing-token check and the write are a single transaction. Many threads and many OS
/// processes may open the same file: writers serialize on SQLite's lock (`BEGIN IMMEDIATE`,
/// busy timeout, bounded retries with backoff); a caller gets a retryable `Unavailable` rather
/// than a hang. Cheap to clone; clones share connections.
///
/// Dropping the last clone stops the background checkpoint thread and closes the database on
/// the dropping thread (SQLite's closing checkpoint and fsync included): drop it outside the
/// async executor's threads (in `spawn_blocking`, or after the runtime) if that matters.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> dotdo_core::Result<()> {
/// use std::time::Duration;
/// use dotdo_core::{ConsistencyGuard, HotStore, HotStoreExt, NodeId, ObjectId};
/// use dotdo_sqlite::SqliteStore;
///
/// let dir = tempfile::tempdir().expect("tempdir");
/// let store = SqliteStore::builder(dir.path().join("hot.db")).open().await?;
/// let obj = ObjectId::new("user:1")?;
/// let lease = store.acquire(&obj, &NodeId::new("node-a")?, Duration::from_secs(10)).await?;
/// store.put(&obj, lease.token, "User", "name", "Ada".into()).await?;
/// assert_eq!(store.get(&obj, "name").await?.as_deref(), Some(&b"Ada"[..]));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

/// Builds a [`SqliteStore`]: a path plus settings and an optional clock.
#[derive(Debug)]
pub struct SqliteStoreBuilder {
    path: PathBuf,
    settings: SqliteSettings,
    clock: Option<Arc<dyn Clock>>,
}

impl SqliteStoreBuilder {
    /// Use these settings (default: [`SqliteSettings::default`]).
    pub fn with_settings(mut self, settings: SqliteSettings) -> Self {
        self.settings = settings;
        self
    }

    /// Read time from `clock` (default: [`SystemClock`]). Every process sharing a database must
    /// use clocks that agree (the system clock) for lease expiry to be meaningful.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Open (creating if needed) the database and its schema. A file that is not a SQLite
    /// database gives `Corrupt`; an unopenable path gives `Unavailable`.
    pub async fn open(self) -> Result<SqliteStore> {
        let settings = self.settings.clone();
        if settings.read_connections == 0 {
            return Err(Error::invalid("read_connections must be at least 1"));
        }
        dotdo_core::sql_schema::validate_busy_timeout(settings.busy_timeout)?;
        // Bounded so that a call's budget (every attempt's busy timeout plus the backoff) is
        // bounded too: a huge value would hang a call instead of giving `Unavailable`.
        if settings.busy_retries > MAX_BUSY_RETRIES {
            return Err(Error::invalid(format!("busy_retries {} is over {MAX_BUSY_RETRIES}", settings.busy_retries)));
        }
        if settings.retry_backoff > Duration::from_secs(1) {
            return Err(Error::invalid(format!("retry_backoff {:?} is over 1 s", settings.retry_backoff)));
        }
        // A sub-millisecond period would spin a core on checkpoints (zero turns them off).
        if settings.background_checkpoint.is_some_and(|d| !d.is_zero() && d < Duration::from_millis(1)) {
            return Err(Error::invalid(format!(
                "background_checkpoint {:?} is under 1 ms (None or zero turns it off)",
                settings.background_checkpoint
            )));
        }
        dotdo_core::sql_schema::validate_cache_kib(settings.cache_kib)?;
        dotdo_core::sql_schema::refuse_shared_cache(&self.path)?;
        let memory = dotdo_core::sql_schema::is_private_database(&self.path);
        // A private database has no WAL to checkpoint.
        if !memory {
            dotdo_core::sql_schema::validate_checkpointing(
                settings.wal_autocheckpoint_pages,
                settings.background_checkpoint,
            )?;
            let checkpoints = settings.background_checkpoint.is_some_and(|d| !d.is_zero());
            refuse_wal_reset_bug(rusqlite::version_number(), rusqlite::version(), checkpoints)?;
        }
        let clock = self.clock.unwrap_or_else(|| Arc::new(SystemClock::new()));
        // Absolute from here on: read connections open lazily, and must open the writer's file
        // even if the process changes its working directory meanwhile.
        if self.path.to_string_lossy().contains('\0') {
            return Err(Error::invalid(format!("database path {:?} contains a NUL byte", self.path)));
        }
        let path = if memory { self.path } else { dotdo_core::sql_schema::absolute_database_path(&self.path)? };
        let open = move || -> Result<SqliteStore> {
            let writer = open_connection(&path, &settings, true)?;
            let checkpointer = match settings.background_checkpoint {
                Some(every) if !every.is_zero() && !memory => Some(start_checkpoints(&path, &settings, every)?),
                _ => None,
            };
            Ok(SqliteStore {
                inner: Arc::new(Inner {
                    path,
                    settings,
                    clock,
                    writer: Mutex::new(writer),
                    readers: Mutex::new(Vec::new()),
                    memory,
                    checkpointer,
                }),
            })
        };
        offload(self.settings.execution, open).await
    }
}

fn open_connection(path: &Path, settings: &SqliteSettings, create: bool) -> Result<Connection> {
    let doing = format!("opening {}", path.display());
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    let conn = if create {
        Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_CREATE)
    } else {
        Connection::open_with_flags(dotdo_core::sql_schema::without_create_mode(path), flags)
    }
    .map_err(|e| map(e, &doing))?;
    // SQLite opens a file it may not write (its permissions, a read-only mount) read-only without
    // an error, and a dotdo file already in WAL mode needs no write to open: every write would
    // then fail. Refused at open, as a file that cannot be written at all.
    if create && conn.is_readonly(rusqlite::DatabaseName::Main).map_err(|e| map(e, &doing))? {
        return Err(Error::new(
            ErrorKind::Unavailable,
            format!("{doing}: the file cannot be written (its permissions, or a read-only mount)"),
        )
        .with_retryable(false));
    }
    conn.busy_timeout(settings.busy_timeout).map_err(|e| map(e, &doing))?;
    conn.set_prepared_statement_cache_capacity(64);
    // Plans that do not depend on bound values: SQLite 3.5x re-prepares a statement on every
    // rebind of a parameter its planner looked at (here the object id of the write path's
    // read), which cost a fenced put 12 us (16.7 -> 28.8 us p50) over 3.46.
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map_err(|e| map(e, &doing))?;
    let (sync, fullfsync) = match settings.durability {
        Durability::Normal => ("NORMAL", "OFF"),
        Durability::Full => ("FULL", "ON"),
    };
    // On macOS a plain fsync does not flush the drive's cache: `fullfsync` makes a FULL commit's
    // sync reach the disk, `checkpoint_fullfsync` a checkpoint's (the ordering NORMAL relies on
    // to never corrupt). No effect elsewhere (Linux's fsync flushes).
    let pragmas = format!(
        "PRAGMA synchronous = {sync}; PRAGMA fullfsync = {fullfsync}; PRAGMA checkpoint_fullfsync = ON; \
         PRAGMA cache_size = -{}; PRAGMA foreign_keys = OFF; PRAGMA wal_autocheckpoint = {}; PRAGMA mmap_size = {}; \
         PRAGMA journal_size_limit = {};",
        settings.cache_kib,
        settings.wal_autocheckpoint_pages,
        settings.mmap_bytes,
        dotdo_core::sql_schema::wal_size_limit(settings.wal_autocheckpoint_pages)
    );
    if create {
        let newer = |version: i64| -> TxResult<()> {
            if version > schema::VERSION {
                return Err(TxError::Api(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "{}: schema version {version} is newer than this library's {}",
                        path.display(),
                        schema::VERSION
                    ),
                )));
            }
            Ok(())
        };
        let source = path.display().to_string();
        let tables = || -> TxResult<Vec<(String, String)>> {
            let mut stmt = conn.prepare(dotdo_core::sql_schema::SQL_TABLE_COLUMNS)?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<Vec<(String, String)>>>()?)
        };
        // The unique keys of the dotdo tables the file has (`columns`): `Corrupt` if one lacks it.
        let check_keys = |columns: &[(String, String)]| -> TxResult<()> {
            let mut stmt = conn.prepare(dotdo_core::sql_schema::SQL_UNIQUE_KEYS)?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            let keys = rows.collect::<rusqlite::Result<Vec<(String, String, String)>>>()?;
            dotdo_core::sql_schema::check_keys(&keys, columns, &source).map_err(TxError::Api)
        };
        let version = with_busy_retry(settings, &doing, || {
            let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            let columns = tables()?;
            dotdo_core::sql_schema::refuse_foreign(version, &columns, &source).map_err(TxError::Api)?;
            newer(version)?;
            if version == schema::VERSION {
                dotdo_core::sql_schema::check_tables_after(&columns, &source).map_err(TxError::Api)?;
            } else {
                // Before the WAL switch, which persists in the file: a look-alike or damaged file
                // (dotdo's table names, other columns) is refused untouched, as dotdo-libsql does.
                dotdo_core::sql_schema::check_tables_before(version, &columns, &source).map_err(TxError::Api)?;
            }
            check_keys(&columns)?;
            Ok(version)
        })?;
        // After the read-only checks (the WAL switch persists in the file's header: another
        // application's database, or a newer dotdo file, refused above, is left untouched) and
        // before the schema is written (a file that cannot run in WAL mode is left untouched
        // too).
        switch_to_wal(&conn, path, settings, &doing)?;
        if version < schema::VERSION {
            with_busy_retry(settings, &doing, || {
                // Decided again under the write lock: another process may have upgraded the
                // file (to this version, or a newer one) since it was read above.
                conn.execute_batch("BEGIN IMMEDIATE")?;
                let upgraded = (|| -> TxResult<()> {
                    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
                    newer(version)?;
                    // Another application's database is left as it is; a dotdo file must have
                    // dotdo's tables, before and after the upgrade.
                    dotdo_core::sql_schema::check_tables_before(version, &tables()?, &source).map_err(TxError::Api)?;
                    if version < schema::VERSION {
                        conn.execute_batch(&format!("{} PRAGMA user_version = {};", schema::CREATE, schema::VERSION))?;
                        let columns = tables()?;
                        dotdo_core::sql_schema::check_tables_after(&columns, &source).map_err(TxError::Api)?;
                        check_keys(&columns)?;
                    }
                    conn.execute_batch("COMMIT")?;
                    Ok(())
                })();
                if upgraded.is_err() && !conn.is_autocommit() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
                upgraded
            })?;
        }
    } else {
        switch_to_wal(&conn, path, settings, &doing)?;
    }
    with_busy_retry(settings, &doing, || conn.execute_batch(&pragmas).map_err(TxError::Sql))?;
    Ok(conn)
}

/// Put the database in WAL mode. SQLite answers with the mode it is in: a VFS without shared
/// memory (`vfs=unix-dotfile`), or a file opened `immutable`, stays in a rollback journal (where
/// `synchronous=NORMAL` may corrupt the file on power loss, and readers block writers) without
/// an error; that is `InvalidInput` here, except for a private database (`:memory:`).
fn switch_to_wal(conn: &Connection, path: &Path, settings: &SqliteSettings, doing: &str) -> Result<()> {
    let mode = with_busy_retry(settings, doing, || {
        Ok(conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))?)
    })?;
    if !mode.eq_ignore_ascii_case("wal") && !dotdo_core::sql_schema::is_private_database(path) {
        return Err(dotdo_core::sql_schema::not_wal_error(doing, &mode, "dotdo-sqlite"));
    }
    Ok(())
}

/// The most busy retries a store accepts.
pub const MAX_BUSY_RETRIES: u32 = 100;

/// The longest one write call may spend in busy waits and backoff: every attempt's busy
/// timeout plus the backoff between attempts.
fn write_budget(settings: &SqliteSettings) -> Duration {
    let mut backoff = settings.retry_backoff;
    let mut total = settings.busy_timeout;
    for _ in 0..settings.busy_retries {
        total = total.saturating_add(settings.busy_timeout).saturating_add(backoff);
        backoff = backoff.saturating_mul(2).min(Duration::from_secs(1));
    }
    total
}

/// Rolls back the transaction of a write still open when the attempt ends: one that failed, or
/// that panicked between its `BEGIN` and `COMMIT` (a store's clock is the caller's code). Nothing
/// of a failed transaction may stay applied, and left open it would hold the database's write
/// lock, every other process's writers waiting on it, until this store's next write. (After a
/// `COMMIT` the connection is back in autocommit: nothing to do.)
struct RollBackIfOpen<'c>(&'c Connection);

impl Drop for RollBackIfOpen<'_> {
    fn drop(&mut self) {
        if !self.0.is_autocommit() {
            let _ = self.0.prepare_cached("ROLLBACK").and_then(|mut s| s.execute([]));
        }
    }
}

/// Run `f`, retrying busy failures with doubling backoff; map the final error.
fn with_busy_retry<T>(settings: &SqliteSettings, doing: &str, mut f: impl FnMut() -> TxResult<T>) -> Result<T> {
    let mut backoff = settings.retry_backoff;
    let mut attempt = 0;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(TxError::Api(e)) => return Err(e),
            Err(TxError::Sql(e)) => {
                if class_of(&e) == Class::Busy && attempt < settings.busy_retries {
                    attempt += 1;
                    // Real time on purpose: this runs on a blocking thread, and a backoff must not
                    // wait on an injected (possibly manual) clock that only tests move.
                    std::thread::sleep(dotdo_core::retry::jittered(backoff));
                    backoff = backoff.saturating_mul(2).min(Duration::from_secs(1));
                    continue;
                }
                let err = map(e, doing);
                return Err(if attempt > 0 { err.context(format!("after {attempt} retries")) } else { err });
            }
        }
    }
}

/// A failed `COMMIT`: an I/O error may come after the commit record reached the WAL (then the
/// transaction is durable), and so may running out of memory (SQLite indexes the WAL after
/// writing its frames), so its outcome is unknown, not a retryable failure (a retry would apply
/// the writes again under new sequence numbers). Busy and full-disk failures leave nothing
/// committed and stay what they are, and so does the file system reporting damage
/// (`SQLITE_IOERR_CORRUPTFS`: `Corrupt`, as anywhere else; taken for an unknown outcome, the
/// runtime took a new lease and went on writing into the damaged file).
fn commit_error(e: rusqlite::Error, doing: &str) -> TxError {
    use rusqlite::ErrorCode::{OutOfMemory, SystemIoFailure};
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, SystemIoFailure | OutOfMemory)
                && f.extended_code != crate::error::SQLITE_IOERR_CORRUPTFS =>
        {
            TxError::Api(
                Error::new(
                    ErrorKind::AmbiguousOutcome,
                    format!(
                        "{doing}: COMMIT failed ({}), so the transaction may be durable; read back \
                         (a hot write: take a new lease before writing the object again)",
                        if f.code == OutOfMemory { "out of memory" } else { "an I/O error" }
                    ),
                )
                .with_source(e),
            )
        }
        _ => TxError::Sql(e),
    }
}

/// The first SQLite release without the WAL-reset bug (https://www.sqlite.org/wal.html#walresetbug).
const WAL_RESET_FIXED: i32 = 3_051_003;

/// `InvalidInput` if background checkpoints are asked for on a SQLite with the WAL-reset bug
/// (`number` below 3.51.3): a checkpoint connection beside the writer meets its race routinely,
/// and it can corrupt the database (a build of this crate without the workspace's patch of
/// libsqlite3-sys links SQLite 3.46.0).
fn refuse_wal_reset_bug(number: i32, version: &str, checkpoints: bool) -> Result<()> {
    if checkpoints && number < WAL_RESET_FIXED {
        return Err(Error::invalid(format!(
            "this build links SQLite {version}, which has the WAL-reset bug that background checkpoints meet \
             (https://www.sqlite.org/wal.html#walresetbug): link SQLite 3.51.3 or later (the `[patch.crates-io]` \
             of libsqlite3-sys in dotdo's workspace, see vendor/libsqlite3-sys/VENDORED.md), or set \
             SqliteSettings::background_checkpoint to None"
        )));
    }
    Ok(())
}

/// Run blocking SQLite work according to the execution mode (see [`Execution`]).
async fn offload<T: Send + 'static>(mode: Execution, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let spawn = |f: Box<dyn FnOnce() -> Result<T> + Send>| async move {
        tokio::task::spawn_blocking(f).await.map_err(|e| {
            if e.is_cancelled() {
                // The runtime is shutting down: the work never ran.
                Error::new(ErrorKind::Shutdown, "the tokio runtime is shutting down; the sqlite call did not run")
                    .with_source(e)
            } else {
                Error::backend("sqlite task failed").with_source(e)
            }
        })?
    };
    match mode {
        Execution::Inline => f(),
        Execution::SpawnBlocking => match Handle::try_current() {
            Ok(_) => spawn(Box::new(f)).await,
            // tokio's blocking pool needs a tokio runtime (this would panic on another executor).
            Err(_) => Err(Error::invalid(
                "Execution::SpawnBlocking needs a tokio runtime; use Execution::Auto or Inline on another executor",
            )),
        },
        Execution::Auto => match Handle::try_current() {
            Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread && !BLOCK_IN_PLACE_REFUSED.get() => {
                match in_place(f) {
                    Ok(out) => out,
                    // Not allowed here (a `LocalSet` on the runtime's `block_on` thread): this
                    // call and the thread's later ones go to the blocking pool instead.
                    Err(f) => {
                        BLOCK_IN_PLACE_REFUSED.set(true);
                        spawn(f).await
                    }
                }
            }
            Ok(_) => spawn(Box::new(f)).await,
            Err(_) => f(),
        },
    }
}

thread_local! {
    /// tokio refused `block_in_place` on this thread (see [`in_place`]).
    static BLOCK_IN_PLACE_REFUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// How long the call running on this thread waited for it (a blocking-pool thread), which
    /// counts against its write budget.
    static QUEUED: std::cell::Cell<Duration> = const { std::cell::Cell::new(Duration::ZERO) };
    /// Set once the caller of the call running on this thread (a blocking-pool thread) has
    /// dropped its future: a transaction not begun yet is not begun, one not committed yet is
    /// rolled back (a lease acquired after its caller gave up would refuse the caller's retry).
    static ABANDONED: std::cell::RefCell<Option<Arc<std::sync::atomic::AtomicBool>>> =
        const { std::cell::RefCell::new(None) };
}

/// Whether the caller of the call running on this thread has given up on it (see `ABANDONED`).
fn abandoned() -> bool {
    ABANDONED.with_borrow(|a| a.as_ref().is_some_and(|a| a.load(std::sync::atomic::Ordering::SeqCst)))
}

/// Sets its flag when dropped: if the call's future is dropped while its work waits or runs,
/// the work sees it; once the call has returned, the work is done and nothing reads the flag.
struct Abandon(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Abandon {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A blocking job handed back to the caller when it could not run.
type Job<T> = Box<dyn FnOnce() -> Result<T> + Send>;

/// Run `f` under tokio's `block_in_place`, or hand it back if tokio refuses: it panics, before
/// running anything, on a thread where blocking in place is not allowed although the runtime is
/// multi-threaded (inside a `LocalSet`, which turns it off). The refusal is caught (a panic
/// message is printed once per such thread) so that the caller falls back to the blocking pool
/// instead of panicking; a panic of `f` itself goes on. (With `panic = "abort"`, use
/// `Execution::SpawnBlocking` inside a `LocalSet`.)
fn in_place<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::result::Result<Result<T>, Job<T>> {
    let job = std::sync::Mutex::new(Some(f));
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tokio::task::block_in_place(|| {
            let f = job.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            f.map(|f| f())
        })
    }));
    match ran {
        Ok(Some(out)) => Ok(out),
        Ok(None) => Ok(Err(Error::backend("sqlite job ran twice"))),
        Err(panic) => match job.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
            // Refused before the job started: run it elsewhere.
            Some(f) => Err(Box::new(f)),
            None => std::panic::resume_unwind(panic),
        },
    }
}

struct ObjRow {
    last_seq: u64,
    truncated: u64,
    /// The object's fencing floor: the larger of `do_objects.max_token` and the lease's token.
    max_token: u64,
}

/// A sequence number or token of column `i`: at most `MAX_SEQ` (= `FencingToken::MAX`), as
/// every writer stores them; above it the row is damage (`Corrupt`), not a token never issued
/// that fences every write and makes every acquire `LimitExceeded`.
fn stored(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<u64> {
    let v: u64 = r.get(i)?;
    if v > dotdo_core::MAX_SEQ {
        return Err(rusqlite::Error::IntegralValueOutOfRange(i, i64::try_from(v).unwrap_or(i64::MAX)));
    }
    Ok(v)
}

/// SQL: the token of the lease row of object `?1` (live or not), 0 without one, -1 if it is no
/// integer (a NULL in a predecessor's table made without `NOT NULL`): [`stored`] refuses that as
/// damage, where read as 0 it let a write under any token through.
macro_rules! lease_token {
    () => {
        "coalesce((SELECT CASE WHEN typeof(fencing_token) = 'integer' THEN fencing_token ELSE -1 END \
         FROM do_locks WHERE do_id = ?1), 0)"
    };
}

fn obj_row(conn: &Connection, object: &str) -> rusqlite::Result<Option<ObjRow>> {
    // `do_objects.last_seq` is a floor kept for truncated and restored changes; the effective last
    // sequence number is the larger of it and the newest change still in the log. This keeps the
    // common write path free of a counter update (one page write fewer per put). Likewise the
    // fencing floor is the larger of `do_objects.max_token` and the lease's token, so that an
    // acquire writes the lease row alone (see the schema's invariant). The lease's token is a
    // column of its own: `max()` in SQL would hide a damaged one (see `lease_token!`).
    conn.prepare_cached(concat!(
        "SELECT max(o.last_seq, coalesce((SELECT max(seq) FROM do_changes c WHERE c.do_id = ?1), 0)), \
         o.truncated_through, o.max_token, ",
        lease_token!(),
        " FROM do_objects o WHERE o.do_id = ?1"
    ))?
    .query_row([object], |r| {
        Ok(ObjRow { last_seq: stored(r, 0)?, truncated: stored(r, 1)?, max_token: stored(r, 2)?.max(stored(r, 3)?) })
    })
    .optional()
}

/// The token of the object's lease row (live or not), 0 without one.
fn lease_token(conn: &Connection, object: &str) -> rusqlite::Result<u64> {
    conn.prepare_cached(concat!("SELECT ", lease_token!()))?.query_row([object], |r| stored(r, 0))
}

/// Check `token` against the object's fencing floor and raise `do_objects.max_token` to it if it
/// is above the floor; creates the object's row if needed.
fn check_and_raise(conn: &Connection, object: &ObjectId, token: FencingToken) -> TxResult<ObjRow> {
    let row = obj_row(conn, object.as_str())?;
    raise_checked(conn, object, token, row)
}

/// [`check_and_raise`] with the object's row (`obj_row`) already read in this transaction.
fn raise_checked(conn: &Connection, object: &ObjectId, token: FencingToken, row: Option<ObjRow>) -> TxResult<ObjRow> {
    match row {
        Some(row) if token.get() < row.max_token => {
            Err(Error::fenced(object, token, FencingToken::new(row.max_token)).into())
        }
        Some(mut row) => {
            if token.get() > row.max_token {
                conn.prepare_cached("UPDATE do_objects SET max_token = ?2 WHERE do_id = ?1")?
                    .execute(params![object.as_str(), token.get()])?;
                row.max_token = token.get();
            }
            Ok(row)
        }
        None => {
            let leased = lease_token(conn, object.as_str())?;
            if token.get() < leased {
                return Err(Error::fenced(object, token, FencingToken::new(leased)).into());
            }
            conn.prepare_cached(
                "INSERT INTO do_objects (do_id, last_seq, truncated_through, max_token) VALUES (?1, 0, 0, ?2)",
            )?
            .execute(params![object.as_str(), token.get()])?;
            Ok(ObjRow { last_seq: 0, truncated: 0, max_token: token.get() })
        }
    }
}

fn lease_row(conn: &Connection, object: &str) -> rusqlite::Result<Option<LeaseRow>> {
    conn.prepare_cached("SELECT node_id, fencing_token, acquired_at, expires_at FROM do_locks WHERE do_id = ?1")?
        .query_row([object], |r| {
            let node: String = r.get(0)?;
            // A holder that is not a valid node id is damage, never "no lease": reading it as
            // free would let anyone take over a live lease.
            let holder = NodeId::new(&node)
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))?;
            Ok(LeaseRow {
                holder,
                token: FencingToken::new(stored(r, 1)?),
                acquired_at: Timestamp::from_micros(r.get::<_, i64>(2)?),
                expires_at: Timestamp::from_micros(r.get::<_, i64>(3)?),
            })
        })
        .optional()
}

fn range_sql(range: &KeyRange) -> (String, Vec<String>) {
    let mut sql = String::from("SELECT key, value, seq FROM do_state WHERE do_id = ?1");
    let mut args = Vec::new();
    for (b, inc, exc) in [(&range.start, ">=", ">"), (&range.end, "<=", "<")] {
        match b {
            Bound::Included(k) => {
                args.push(k.clone());
                sql.push_str(&format!(" AND key {inc} ?{}", args.len() + 1));
            }
            Bound::Excluded(k) => {
                args.push(k.clone());
                sql.push_str(&format!(" AND key {exc} ?{}", args.len() + 1));
            }
            Bound::Unbounded => {}
        }
    }
    sql.push_str(&format!(" ORDER BY key LIMIT ?{}", args.len() + 2));
    (sql, args)
}

impl SqliteStore {
    /// A builder for the database at `path` (created if missing).
    pub fn builder(path: impl Into<PathBuf>) -> SqliteStoreBuilder {
        SqliteStoreBuilder { path: path.into(), settings: SqliteSettings::default(), clock: None }
    }

    /// The database path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The settings in force.
    pub fn settings(&self) -> &SqliteSettings {
        &self.inner.settings
    }

    async fn run<T: Send + 'static>(&self, f: impl FnOnce(&Inner) -> Result<T> + Send + 'static) -> Result<T> {
        let inner = self.inner.clone();
        // Real time, from now (a clock's monotonic time counts from its creation): the store's
        // clock may be a manual one that a test moves meanwhile.
        let queued = dotdo_core::SystemClock::new();
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _abandon = Abandon(flag.clone());
        offload(self.inner.settings.execution, move || {
            // Time spent waiting for a blocking thread counts against the write budget: with
            // more writers than threads, the last ones waited several budgets in all.
            QUEUED.set(queued.monotonic());
            ABANDONED.set(Some(flag));
            let out = f(&inner);
            QUEUED.set(Duration::ZERO);
            ABANDONED.set(None);
            out
        })
        .await
    }

    /// Run `PRAGMA integrity_check`; `Corrupt` with SQLite's report if it is not `ok`.
    pub async fn integrity_check(&self) -> Result<()> {
        self.run(|inner| {
            // On a read connection: in WAL mode it does not hold up this store's writers.
            let report: Vec<String> = inner.read("integrity check", |conn| {
                conn.prepare("PRAGMA integrity_check").and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            })?;
            if report == ["ok"] {
                Ok(())
            } else {
                Err(Error::corrupt(format!("{}: integrity check failed: {}", inner.path.display(), report.join("; "))))
            }
        })
        .await
    }
}

impl Inner {
    /// `Corrupt` once the checkpoint thread found the file deleted or replaced.
    fn check_unmoved(&self, doing: &str) -> Result<()> {
        if self.checkpointer.as_ref().is_some_and(CheckpointThread::replaced) {
            return Err(dotdo_core::sql_schema::replaced_file_error(doing, &self.path.display().to_string()));
        }
        Ok(())
    }

    /// An error names the database file (which one is damaged, full or locked), unless it does
    /// already.
    fn name_file(&self, e: Error) -> Error {
        let path = self.path.display().to_string();
        if !e.to_string().contains(&path) {
            e.context(path)
        } else {
            e
        }
    }

    /// Run `f` in one `BEGIN IMMEDIATE` transaction (statements cached), retrying on busy; a
    /// `Corrupt` failure names the file.
    fn write_tx<T>(&self, doing: &str, f: impl Fn(&Connection) -> TxResult<T>) -> Result<T> {
        self.check_unmoved(doing)?;
        self.write_tx_in(doing, f).map_err(|e| self.name_file(e))
    }

    /// [`write_tx`](Self::write_tx) without naming the file. The deleted-or-replaced check is
    /// repeated once the writer is this call's and before each `BEGIN` and `COMMIT`: a call that
    /// waited (behind this store's other writers or another process's lock) must not commit
    /// into a file the checkpoint thread has meanwhile found replaced.
    fn write_tx_in<T>(&self, doing: &str, f: impl Fn(&Connection) -> TxResult<T>) -> Result<T> {
        // Writers of this store queue on one connection. Waiting for it counts against the same
        // budget as the busy retries, so that every queued caller behind another process's lock
        // gets `Unavailable` in bounded time, not the 10th after ten budgets.
        let budget = write_budget(&self.settings);
        let queued = QUEUED.get();
        // A zero budget (no busy timeout, no retries: the caller retries itself) takes a free
        // connection at once and is not refused for its wait for a thread (it refused every
        // write, as over budget after 0 ns).
        if !budget.is_zero() && queued >= budget {
            return Err(Error::unavailable(format!(
                "{doing}: waited {queued:?} for a blocking thread, past the write budget of {budget:?} (the \
                 runtime's blocking pool is saturated); nothing written, retry later"
            )));
        }
        let Some(conn) = self.writer.try_lock_for(budget.saturating_sub(queued)) else {
            return Err(Error::unavailable(format!(
                "{doing}: {} is still locked for writing after {budget:?} (with {queued:?} waiting for a \
                 thread; other writers of this store are waiting for it); retry later",
                self.path.display()
            )));
        };
        if !conn.is_autocommit() {
            // A transaction left open (a failed rollback): never build on it.
            let _ = conn.execute_batch("ROLLBACK");
        }
        let gave_up = || {
            // Nobody waits for this answer any more.
            TxError::Api(Error::unavailable(format!(
                "{doing}: the caller dropped the call before it committed; nothing written"
            )))
        };
        with_busy_retry(&self.settings, doing, || {
            if abandoned() {
                return Err(gave_up());
            }
            self.check_unmoved(doing).map_err(TxError::Api)?;
            conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            let _open = RollBackIfOpen(&conn);
            // (The guard drops once the outcome is known: a failed attempt is rolled back
            // before it is retried.)
            f(&conn).and_then(|v| {
                if abandoned() {
                    return Err(gave_up());
                }
                self.check_unmoved(doing).map_err(TxError::Api)?;
                conn.prepare_cached("COMMIT")?.execute([]).map_err(|e| commit_error(e, doing))?;
                Ok(v)
            })
        })
    }

    fn read<T>(&self, doing: &str, f: impl Fn(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        self.check_unmoved(doing)?;
        self.read_in(doing, f).map_err(|e| self.name_file(e))
    }

    fn read_in<T>(&self, doing: &str, f: impl Fn(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        if self.memory {
            // The one connection of a private database: waited for within the same budget as a
            // writer waits (a large write holds it), then `Unavailable`, never without bound.
            let budget = write_budget(&self.settings);
            let Some(conn) = self.writer.try_lock_for(budget) else {
                return Err(Error::unavailable(format!(
                    "{doing}: the in-memory database's connection is still busy with a write after {budget:?}; \
                     retry later"
                )));
            };
            return with_busy_retry(&self.settings, doing, || f(&conn).map_err(TxError::Sql));
        }
        let pooled = self.readers.lock().pop();
        let conn = match pooled {
            Some(c) => c,
            // Another reader of a file this store already holds open: a failure to open it for
            // want of file descriptors is the moment's, retryable (`error::map`), and the same
            // call succeeds once one frees up.
            None => open_connection(&self.path, &self.settings, false)
                .map_err(|e| e.context(format!("{doing}: opening another reader connection")))?,
        };
        let out = with_busy_retry(&self.settings, doing, || f(&conn).map_err(TxError::Sql));
        let mut pool = self.readers.lock();
        if pool.len() < self.settings.read_connections {
            pool.push(conn);
        }
        out
    }
}

/// Rows per multi-row statement of a batched write.
const CHUNK: usize = 32;

/// The multi-row statements of a batched write.
mod chunk_sql {
    use std::sync::LazyLock;

    fn values(n: usize, cols: usize) -> String {
        (0..n)
            .map(|r| {
                let ps: Vec<String> = (1..=cols).map(|c| format!("?{}", r * cols + c)).collect();
                format!("({})", ps.join(", "))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub(super) static PUT: LazyLock<String> = LazyLock::new(|| {
        format!(
            "INSERT INTO do_state (do_id, key, value, seq) VALUES {} \
             ON CONFLICT (do_id, key) DO UPDATE SET value = excluded.value, seq = excluded.seq",
            values(super::CHUNK, 4)
        )
    });
    pub(super) static LOG: LazyLock<String> = LazyLock::new(|| {
        format!(
            "INSERT INTO do_changes (do_id, seq, key, op, value, token, ts, type) VALUES {}",
            values(super::CHUNK, 8)
        )
    });
}

#[async_trait]
impl HotStore for SqliteStore {
    async fn write(&self, object: &ObjectId, token: FencingToken, batch: WriteBatch) -> Result<WriteReceipt> {
        batch.validate()?;
        token.validate()?;
        let object = object.clone();
        self.run(move |inner| {
            let n = batch.ops.len() as u64;
            inner.write_tx("write", |tx| {
                // The changes' time, read once the transaction is this call's (each attempt): read
                // before the wait for the lock, a change committed after another could carry an
                // earlier time than it.
                let now = inner.clock.now().as_micros();
                // Common case: one read, no counter write (the token is the object's fencing floor).
                let prev = match obj_row(tx, object.as_str())? {
                    Some(row) if row.max_token == token.get() => row.last_seq,
                    row => raise_checked(tx, &object, token, row)?.last_seq,
                };
                let WriteReceipt { first_seq: first, last_seq: last } = dotdo_core::record::receipt_after(prev, n)?;
                let mut put = tx.prepare_cached(
                    "INSERT INTO do_state (do_id, key, value, seq) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (do_id, key) DO UPDATE SET value = excluded.value, seq = excluded.seq",
                )?;
                let mut log = tx.prepare_cached(
                    "INSERT INTO do_changes (do_id, seq, key, op, value, token, ts, type) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                // Runs of puts go CHUNK rows per statement (multi-row VALUES): the per-statement
                // cost dominates large batches otherwise. A key repeated inside one statement is
                // applied in order, like separate statements.
                let ops = &batch.ops;
                let (oid, tok) = (object.as_str(), token.get());
                let mut i = 0;
                while i < ops.len() {
                    let run = ops[i..].iter().take(CHUNK).take_while(|op| matches!(op, WriteOp::Put { .. })).count();
                    if run == CHUNK {
                        let mut put_n = tx.prepare_cached(&chunk_sql::PUT)?;
                        let mut log_n = tx.prepare_cached(&chunk_sql::LOG)?;
                        let seqs: Vec<u64> = (0..CHUNK as u64).map(|j| first + (i as u64) + j).collect();
                        let mut sp: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(CHUNK * 4);
                        let mut lp: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(CHUNK * 8);
                        let vals: Vec<&[u8]> = ops[i..i + CHUNK]
                            .iter()
                            .map(|op| match op {
                                WriteOp::Put { value, .. } => &value[..],
                                WriteOp::Delete { .. } => &[][..],
                            })
                            .collect();
                        for ((op, seq), value) in ops[i..i + CHUNK].iter().zip(&seqs).zip(&vals) {
                            if let WriteOp::Put { key, .. } = op {
                                sp.extend([&oid as &dyn rusqlite::ToSql, key, value, seq]);
                                lp.extend([
                                    &oid as &dyn rusqlite::ToSql,
                                    seq,
                                    key,
                                    &0i64,
                                    value,
                                    &tok,
                                    &now,
                                    &batch.type_name,
                                ]);
                            }
                        }
                        put_n.execute(sp.as_slice())?;
                        log_n.execute(lp.as_slice())?;
                        i += CHUNK;
                        continue;
                    }
                    let seq = first + i as u64;
                    match &ops[i] {
                        WriteOp::Put { key, value } => {
                            put.execute(params![oid, key, &value[..], seq])?;
                            log.execute(params![oid, seq, key, 0, &value[..], tok, now, batch.type_name])?;
                        }
                        WriteOp::Delete { key } => {
                            tx.prepare_cached("DELETE FROM do_state WHERE do_id = ?1 AND key = ?2")?
                                .execute(params![oid, key])?;
                            log.execute(params![oid, seq, key, 1, &[][..], tok, now, batch.type_name])?;
                        }
                    }
                    i += 1;
                }
                Ok(WriteReceipt { first_seq: first, last_seq: last })
            })
        })
        .await
    }

    async fn get(&self, object: &ObjectId, key: &str) -> Result<Option<Bytes>> {
        validate_key(key)?;
        let (object, key) = (object.clone(), key.to_string());
        self.run(move |inner| {
            inner.read("get", |c| {
                c.prepare_cached("SELECT value FROM do_state WHERE do_id = ?1 AND key = ?2")?
                    .query_row(params![object.as_str(), key], |r| r.get::<_, Vec<u8>>(0))
                    .optional()
                    .map(|v| v.map(Bytes::from))
            })
        })
        .await
    }

    async fn list(&self, object: &ObjectId, range: KeyRange, limit: Option<usize>) -> Result<Vec<Entry>> {
        let object = object.clone();
        let limit = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        self.run(move |inner| {
            let (sql, args) = range_sql(&range);
            inner.read("list", |c| {
                let mut stmt = c.prepare_cached(&sql)?;
                let oid = object.as_str();
                let mut params: Vec<&dyn rusqlite::ToSql> = vec![&oid];
                params.extend(args.iter().map(|a| a as &dyn rusqlite::ToSql));
                params.push(&limit);
                let rows = stmt.query_map(params.as_slice(), |r| {
                    Ok(Entry { key: r.get(0)?, value: Bytes::from(r.get::<_, Vec<u8>>(1)?), seq: stored(r, 2)? })
                })?;
                rows.collect()
            })
        })
        .await
    }

    async fn read_changes(&self, object: &ObjectId, after: Seq, limit: usize) -> Result<Vec<ChangeRecord>> {
        let object = object.clone();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // Sequence numbers end far below i64::MAX: a larger `after` has nothing after it.
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        self.run(move |inner| {
            let rows: Vec<dotdo_core::sql_schema::ChangeRow> = inner.read("read changes", |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT seq, key, op, value, token, ts, type FROM do_changes \
                     WHERE do_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                )?;
                let mut rows = stmt.query(params![object.as_str(), after, limit])?;
                // At most READ_CHANGES_BYTES of values (at least one change): the rest is read
                // by the next call, never loaded all at once.
                let (mut out, mut bytes) = (Vec::new(), 0usize);
                while let Some(r) = rows.next()? {
                    let value: Vec<u8> = r.get(3)?;
                    bytes = bytes.saturating_add(value.len());
                    if !out.is_empty() && bytes > dotdo_core::sql_schema::READ_CHANGES_BYTES {
                        break;
                    }
                    out.push((r.get(0)?, r.get(1)?, r.get(2)?, value, r.get(4)?, r.get(5)?, r.get(6)?));
                }
                Ok(out)
            })?;
            let source = inner.path.display().to_string();
            rows.into_iter().map(|row| dotdo_core::sql_schema::change_record(&object, row, &source)).collect()
        })
        .await
    }

    async fn truncate_changes(&self, object: &ObjectId, token: FencingToken, through: Seq) -> Result<()> {
        token.validate()?;
        let object = object.clone();
        self.run(move |inner| {
            inner.write_tx("truncate changes", |tx| {
                let row = check_and_raise(tx, &object, token)?;
                if through > row.last_seq {
                    return Err(Error::invalid(format!(
                        "cannot truncate {object} through seq {through}: last seq is {}",
                        row.last_seq
                    ))
                    .into());
                }
                if through > row.truncated {
                    tx.prepare_cached(
                        "UPDATE do_objects SET truncated_through = ?2, last_seq = max(last_seq, ?3) WHERE do_id = ?1",
                    )?
                    .execute(params![object.as_str(), through, row.last_seq])?;
                    tx.prepare_cached("DELETE FROM do_changes WHERE do_id = ?1 AND seq <= ?2")?
                        .execute(params![object.as_str(), through])?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn object_info(&self, object: &ObjectId) -> Result<Option<ObjectInfo>> {
        let object = object.clone();
        self.run(move |inner| {
            inner.read("object info", |c| {
                c.prepare_cached(dotdo_core::sql_schema::SQL_OBJECT_INFO)?
                    .query_row([object.as_str()], |r| {
                        Ok(ObjectInfo {
                            last_seq: stored(r, 0)?,
                            truncated_through: stored(r, 1)?,
                            max_token: FencingToken::new(stored(r, 2)?.max(stored(r, 6)?)),
                            keys: r.get(3)?,
                            value_bytes: r.get(4)?,
                            resident: r.get(5)?,
                        })
                    })
                    .optional()
                    // A row created only by a lease is not yet an object.
                    .map(|o| o.filter(|i| i.last_seq > 0 || i.keys > 0))
            })
        })
        .await
    }

    async fn objects_with_pending_changes(&self, after: Option<&ObjectId>, limit: usize) -> Result<Vec<ObjectId>> {
        let after = after.map(|a| a.as_str().to_string()).unwrap_or_default();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |inner| {
            let ids: Vec<String> = inner.read("pending objects", |c| {
                c.prepare_cached("SELECT DISTINCT do_id FROM do_changes WHERE do_id > ?1 ORDER BY do_id LIMIT ?2")?
                    .query_map(params![after, limit], |r| r.get(0))?
                    .collect()
            })?;
            ids.into_iter()
                .map(|id| {
                    ObjectId::new(&id).map_err(|e| {
                        inner.name_file(Error::corrupt(format!("invalid object id {id:?} in database: {e}")))
                    })
                })
                .collect()
        })
        .await
    }

    async fn evict(&self, object: &ObjectId, token: FencingToken) -> Result<()> {
        token.validate()?;
        let object = object.clone();
        self.run(move |inner| {
            inner.write_tx("evict", |tx| {
                let row = check_and_raise(tx, &object, token)?;
                if row.last_seq > row.truncated {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "{object} has changes {}..={} not yet in cold storage",
                            row.truncated + 1,
                            row.last_seq
                        ),
                    )
                    .into());
                }
                tx.prepare_cached("DELETE FROM do_state WHERE do_id = ?1")?.execute([object.as_str()])?;
                // Told apart from an object whose keys were all deleted until a restore (not one
                // never written: nothing in cold to restore, and the runtime never restores it).
                if row.last_seq > 0 {
                    tx.prepare_cached("INSERT INTO do_evicted (do_id) VALUES (?1) ON CONFLICT (do_id) DO NOTHING")?
                        .execute([object.as_str()])?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn restore(
        &self,
        object: &ObjectId,
        token: FencingToken,
        entries: Vec<Entry>,
        through_seq: Seq,
    ) -> Result<()> {
        token.validate()?;
        dotdo_core::record::validate_restore(&entries, through_seq)?;
        let object = object.clone();
        self.run(move |inner| {
            inner.write_tx("restore", |tx| {
                let row = check_and_raise(tx, &object, token)?;
                if row.last_seq > through_seq {
                    return Err(dotdo_core::record::restore_behind_hot(&object, through_seq, Some(row.last_seq)).into());
                }
                if row.last_seq > row.truncated {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "cannot restore {object} through seq {through_seq}: hot last seq {} (truncated through {})",
                            row.last_seq, row.truncated
                        ),
                    )
                    .into());
                }
                tx.prepare_cached("DELETE FROM do_state WHERE do_id = ?1")?.execute([object.as_str()])?;
                let mut ins =
                    tx.prepare_cached("INSERT INTO do_state (do_id, key, value, seq) VALUES (?1, ?2, ?3, ?4)")?;
                for e in &entries {
                    ins.execute(params![object.as_str(), e.key, &e.value[..], e.seq])?;
                }
                tx.prepare_cached("UPDATE do_objects SET last_seq = ?2, truncated_through = ?2 WHERE do_id = ?1")?
                    .execute(params![object.as_str(), through_seq])?;
                tx.prepare_cached("DELETE FROM do_evicted WHERE do_id = ?1")?.execute([object.as_str()])?;
                Ok(())
            })
        })
        .await
    }
}

#[async_trait]
impl ConsistencyGuard for SqliteStore {
    async fn acquire(&self, object: &ObjectId, holder: &NodeId, ttl: Duration) -> Result<Lease> {
        dotdo_core::guard::validate_ttl(ttl)?;
        let (object, holder) = (object.clone(), holder.clone());
        self.run(move |inner| {
            inner.write_tx("acquire lease", |tx| {
                let now = inner.clock.now();
                let current = lease_row(tx, object.as_str())?;
                let mut row = rules::acquire(&object, current.as_ref(), &holder, ttl, now)?;
                // Tokens written with (a write may carry a token above every lease's).
                let floor = obj_row(tx, object.as_str())?.map_or(0, |o| o.max_token);
                if row.token.get() <= floor {
                    row.token = FencingToken::new(floor).checked_next()?;
                }
                // The lease row alone: writes fence against it and `do_objects` both, so an
                // acquire dirties one page, not two.
                tx.prepare_cached(
                    "INSERT INTO do_locks (do_id, node_id, acquired_at, expires_at, fencing_token) VALUES (?1, ?2, ?3, ?4, ?5) \
                     ON CONFLICT (do_id) DO UPDATE SET node_id = excluded.node_id, acquired_at = excluded.acquired_at, \
                     expires_at = excluded.expires_at, fencing_token = excluded.fencing_token",
                )?
                .execute(params![
                    object.as_str(),
                    holder.as_str(),
                    row.acquired_at.as_micros(),
                    row.expires_at.as_micros(),
                    row.token.get()
                ])?;
                Ok(row.to_lease(&object))
            })
        })
        .await
    }

    async fn refresh(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        dotdo_core::guard::validate_ttl(ttl)?;
        let lease = lease.clone();
        self.run(move |inner| {
            inner.write_tx("refresh lease", |tx| {
                let now = inner.clock.now();
                let expires = now.plus(ttl);
                // A token no guard issues (SQLite integers stop at i64::MAX) is no current lease.
                let issuable = lease.token <= FencingToken::MAX;
                // The stored grant time comes back (the lease passed in is only its object, holder
                // and token: its `acquired_at` may be anything).
                let acquired: Option<i64> = if !issuable {
                    None
                } else {
                    tx.prepare_cached(
                        // Times that are not integers are damage: `Corrupt` below, as every
                        // other guard call answers (SQL compares text above any integer).
                        "UPDATE do_locks SET expires_at = ?4 WHERE do_id = ?1 AND fencing_token = ?2 \
                         AND node_id = ?3 AND expires_at > ?5 AND typeof(expires_at) = 'integer' \
                         AND typeof(acquired_at) = 'integer' RETURNING acquired_at",
                    )?
                    .query_row(
                        params![
                            lease.object.as_str(),
                            lease.token.get(),
                            lease.holder.as_str(),
                            expires.as_micros(),
                            now.as_micros()
                        ],
                        |r| r.get(0),
                    )
                    .optional()?
                };
                if let Some(acquired) = acquired {
                    return Ok(Lease {
                        acquired_at: Timestamp::from_micros(acquired),
                        expires_at: expires,
                        ..lease.clone()
                    });
                }
                let row = lease_row(tx, lease.object.as_str())?;
                rules::check_current(&lease, row.as_ref(), now)?;
                Err(Error::backend("lease refresh changed no row although the lease is current").into())
            })
        })
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        if lease.token > FencingToken::MAX {
            return Ok(()); // never issued: nothing to release
        }
        let lease = lease.clone();
        self.run(move |inner| {
            inner.write_tx("release lease", |tx| {
                // Ended for every node's clock (`rules::RELEASED`), not at this node's time, also
                // when this node's clock sees it ended already (another node's may be behind).
                tx.prepare_cached(
                    "UPDATE do_locks SET expires_at = ?3 WHERE do_id = ?1 AND fencing_token = ?2 AND expires_at > ?3",
                )?
                .execute(params![
                    lease.object.as_str(),
                    lease.token.get(),
                    dotdo_core::guard::rules::RELEASED.as_micros()
                ])?;
                Ok(())
            })
        })
        .await
    }

    async fn validate(&self, lease: &Lease) -> Result<()> {
        let lease = lease.clone();
        self.run(move |inner| {
            let doing = format!("validate lease of {}", lease.object);
            let row = inner.read(&doing, |c| lease_row(c, lease.object.as_str()))?;
            rules::check_current(&lease, row.as_ref(), inner.clock.now())
        })
        .await
    }

    async fn current(&self, object: &ObjectId) -> Result<Option<Lease>> {
        let object = object.clone();
        self.run(move |inner| {
            let doing = format!("read lease of {object}");
            let row = inner.read(&doing, |c| lease_row(c, object.as_str()))?;
            let now = inner.clock.now();
            Ok(row.filter(|r| now < r.expires_at).map(|r| r.to_lease(&object)))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    /// Background checkpoints are refused on a SQLite with the WAL-reset bug (a build without
    /// the workspace's patch links 3.46.0), allowed without them or on a fixed SQLite; the SQLite
    /// this crate links passes.
    #[test]
    fn background_checkpoints_need_a_sqlite_without_the_wal_reset_bug() {
        let e = super::refuse_wal_reset_bug(3_046_000, "3.46.0", true).expect_err("the bug");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("3.46.0") && e.to_string().contains("background_checkpoint"), "{e}");
        super::refuse_wal_reset_bug(3_046_000, "3.46.0", false).expect("no checkpoint thread");
        super::refuse_wal_reset_bug(3_051_003, "3.51.3", true).expect("fixed");
        super::refuse_wal_reset_bug(rusqlite::version_number(), rusqlite::version(), true).expect("linked SQLite");
    }

    use super::*;

    /// A COMMIT that failed with an I/O error may be durable: `AmbiguousOutcome`, not a
    /// retryable failure; busy and full-disk failures keep their kinds.
    #[test]
    fn a_commit_io_error_is_an_unknown_outcome() {
        let failure = |code| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
        // (Out of memory too: SQLite indexes the WAL after writing the commit's frames.)
        for code in [rusqlite::ffi::SQLITE_IOERR, rusqlite::ffi::SQLITE_NOMEM] {
            match commit_error(failure(code), "put") {
                TxError::Api(e) => {
                    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{code}: {e}");
                    assert!(!e.is_retryable(), "{e}");
                }
                TxError::Sql(e) => panic!("{code}: not an unknown outcome: {e}"),
            }
        }
        for code in [rusqlite::ffi::SQLITE_BUSY, rusqlite::ffi::SQLITE_FULL] {
            assert!(matches!(commit_error(failure(code), "put"), TxError::Sql(_)), "{code}");
        }
        // The file system reporting damage stays `Corrupt`, at COMMIT as anywhere.
        match commit_error(failure(crate::error::SQLITE_IOERR_CORRUPTFS), "put") {
            TxError::Sql(e) => {
                let e = crate::error::map(e, "put");
                assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
            }
            TxError::Api(e) => panic!("file system damage taken for an unknown outcome: {e}"),
        }
    }

    /// The SQLite linked in has the fix of the WAL-reset bug (3.51.3): before it, a checkpoint
    /// racing another connection's commit could corrupt a WAL database, and this store
    /// checkpoints on a connection of its own beside the writer (vendor/libsqlite3-sys).
    #[test]
    fn the_linked_sqlite_has_the_wal_reset_fix() {
        assert!(rusqlite::version_number() >= 3_051_003, "SQLite {}", rusqlite::version());
        let conn = rusqlite::Connection::open_in_memory().expect("open");
        let v: String = conn.query_row("SELECT sqlite_version()", [], |r| r.get(0)).expect("version");
        assert_eq!(v, rusqlite::version());
    }

    /// The SQLite linked in gives each connection its own page cache: built with
    /// `SQLITE_ENABLE_MEMORY_MANAGEMENT` (libsqlite3-sys's default), every connection of the
    /// process shares one LRU, and a connection's pages were evicted by another's work (a
    /// pipeline log's sends ran 2.5-3x slower beside a second database; vendor/libsqlite3-sys).
    #[test]
    fn the_linked_sqlite_keeps_a_page_cache_per_connection() {
        let conn = rusqlite::Connection::open_in_memory().expect("open");
        let mut st = conn.prepare("PRAGMA compile_options").expect("prepare");
        let options: Vec<String> = st.query_map([], |r| r.get(0)).expect("query").map(|o| o.expect("option")).collect();
        assert!(options.iter().any(|o| o.starts_with("THREADSAFE")), "{options:?}");
        assert!(!options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"), "{options:?}");
    }

    /// Commits a long read overlaps reach the disk within a checkpoint period: SQLite syncs the
    /// WAL only when a checkpoint copies frames, and the reader keeps every new frame from being
    /// copied, so under `synchronous=NORMAL` they stayed unsynced for as long as the read lasted
    /// (the background checkpoint period is what the docs say a power loss can take).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::disallowed_methods)] // real time: the checkpoint thread runs on its own
    async fn commits_under_a_long_read_are_synced_within_a_checkpoint_period() {
        use dotdo_core::{ConsistencyGuard, HotStoreExt, NodeId, ObjectId};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hot.db");
        let settings = SqliteSettings { background_checkpoint: Some(Duration::from_millis(10)), ..Default::default() };
        let store = SqliteStore::builder(&path).with_settings(settings).open().await.expect("open");
        let o = ObjectId::new("o").expect("id");
        let lease = store.acquire(&o, &NodeId::new("n").expect("node"), Duration::from_secs(60)).await.expect("lease");
        store.put(&o, lease.token, "T", "k", "0".into()).await.expect("put");
        let syncs = || store.inner.checkpointer.as_ref().expect("checkpoint thread").wal_syncs();
        let settle = |want: &dyn Fn(u64) -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !want(syncs()) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // Every frame copied: the checkpoints synced the WAL themselves. (A round that met a
        // commit under way may have synced it too: counted from here.)
        // (Waited until stable, as below: a starved checkpoint thread may sync the earlier put
        // late on a loaded machine.)
        // The sync count once it stays the same for 100 ms (bounded: 10 s).
        let stable = |what: &str| {
            let mut seen = syncs();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                std::thread::sleep(Duration::from_millis(100));
                let now = syncs();
                if now == seen {
                    return seen;
                }
                assert!(std::time::Instant::now() < deadline, "the WAL is synced again and again {what}");
                seen = now;
            }
        };
        let before = stable("before the read");
        let reader = rusqlite::Connection::open(&path).expect("reader");
        reader.execute_batch("BEGIN; SELECT count(*) FROM do_state;").expect("a long read");
        for i in 1..=5 {
            store.put(&o, lease.token, "T", "k", i.to_string().into()).await.expect("put under the read");
        }
        settle(&|n| n > before);
        assert!(syncs() > before, "the WAL was synced while the read held its frames");
        // Nothing committed since: once a round has synced the last of the five puts (a round
        // may have met them half done, and a later one, run late on a loaded machine, syncs the
        // rest), the rounds under the same read do not sync again.
        let synced = stable("with no commit");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(syncs(), synced, "no commit, no sync");
        store.put(&o, lease.token, "T", "k", "6".into()).await.expect("put under the read");
        settle(&|n| n > synced);
        assert!(syncs() > synced, "a new commit under the read is synced");
        reader.execute_batch("COMMIT").expect("the read ends");
    }

    #[test]
    fn connections_get_the_configured_pragmas() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.db");
        for (mmap, cache_kib) in [(0u64, 2048u32), (32 << 20, 4096)] {
            let settings = SqliteSettings { mmap_bytes: mmap, cache_kib, ..SqliteSettings::default() };
            let conn = open_connection(&path, &settings, true).expect("open");
            let got: (u64, i64, String, i64) = (
                conn.query_row("PRAGMA mmap_size", [], |r| r.get(0)).expect("mmap_size"),
                conn.query_row("PRAGMA cache_size", [], |r| r.get(0)).expect("cache_size"),
                conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("journal_mode"),
                conn.query_row("PRAGMA journal_size_limit", [], |r| r.get(0)).expect("journal_size_limit"),
            );
            // The WAL is cut back to 64 MiB (the autocheckpoint size) when it starts over.
            assert_eq!(got, (mmap, -i64::from(cache_kib), "wal".to_string(), 64 << 20));
            // Plans that do not depend on bound values: no re-prepare on every rebind.
            let qpsg = conn.db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG).expect("qpsg");
            assert!(qpsg, "the query planner stability guarantee is on");
        }
        // The durability mode is what reaches SQLite: FULL (2) fsyncs every commit, NORMAL (1)
        // does not; the two cannot be told apart by reopening in the same process.
        // So do the macOS full syncs: a FULL commit's, and every checkpoint's (on any platform
        // they read back as set).
        for (durability, want) in [(crate::Durability::Normal, (1i64, 0i64)), (crate::Durability::Full, (2, 1))] {
            let settings = SqliteSettings { durability, ..SqliteSettings::default() };
            for writer in [true, false] {
                let conn = open_connection(&path, &settings, writer).expect("open");
                let get = |p: &str| -> i64 { conn.query_row(&format!("PRAGMA {p}"), [], |r| r.get(0)).expect(p) };
                let got = (get("synchronous"), get("fullfsync"), get("checkpoint_fullfsync"));
                assert_eq!(got, (want.0, want.1, 1), "{:?} (writer: {writer})", settings.durability);
            }
        }
    }
}
