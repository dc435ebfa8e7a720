//! Where accepted events wait for their roll: in memory, or in a local SQLite log.
//!
//! A roll *claims* the oldest events: it assigns each its per-object sequence number and a batch
//! id, durably (for the SQLite log) before the cold commit. If the commit fails or the process
//! dies, the claimed batch is committed again with the same sequence numbers and the sink skips
//! what it already has: exactly once.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use dotdo_core::{ChangeRecord, Error, FencingToken, ObjectId, Op, Result, Timestamp};
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};

use crate::event::Event;

/// An accepted event and its route ("" = default).
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub(crate) route: String,
    pub(crate) event: Event,
}

/// A claimed batch: rows with sequence numbers, in send order. The rows are shared: the memory
/// log keeps its batch for a retry without copying it under its lock (sends wait for that lock).
#[derive(Clone, Debug)]
pub(crate) struct Claimed {
    pub(crate) id: u64,
    pub(crate) rows: Arc<Vec<(String, ChangeRecord)>>,
}

impl Claimed {
    /// A batch of `rows`.
    pub(crate) fn new(id: u64, rows: Vec<(String, ChangeRecord)>) -> Self {
        Claimed { id, rows: Arc::new(rows) }
    }

    /// The rows, owned: copied only if the log still holds them (the memory log's batch).
    pub(crate) fn into_rows(self) -> Vec<(String, ChangeRecord)> {
        Arc::try_unwrap(self.rows).unwrap_or_else(|rows| (*rows).clone())
    }
}

/// Assigns the next sequence number of (route, object), or `None` if unknown yet.
pub(crate) type NextSeq<'a> = &'a mut dyn FnMut(&str, &ObjectId) -> Option<u64>;

/// Whether the events of (route, object) can never be claimed (see [`Log::take_stuck`]).
pub(crate) type Stuck<'a> = &'a mut dyn FnMut(&str, &ObjectId) -> bool;

pub(crate) trait Log: Send + Sync {
    fn append(&self, rows: Vec<Row>) -> Result<()>;
    /// (events, bytes) waiting, claimed ones included.
    fn depth(&self) -> (usize, usize);
    fn oldest(&self) -> Option<Timestamp>;
    fn claimed(&self, token: FencingToken) -> Result<Option<Claimed>>;
    fn next_objects(&self, max: usize) -> Result<Vec<(String, ObjectId)>>;
    /// Claim the oldest waiting events: at most `max` of them, and no more than `max_bytes`
    /// (measured like [`Event::size`]) unless the first alone is larger.
    fn claim(
        &self,
        max: usize,
        max_bytes: usize,
        token: FencingToken,
        next_seq: NextSeq<'_>,
    ) -> Result<Option<Claimed>>;
    fn ack(&self, id: u64) -> Result<()>;
    /// Take out the oldest waiting (unclaimed) events for as long as `stuck(route, object)` says
    /// their object's events can never be claimed: at most `max` of them, and no more than
    /// `max_bytes` unless the first alone is larger (as [`claim`](Log::claim)); gone durably
    /// (disk logs: `synchronous=FULL`), as a batch handed to the caller is.
    fn take_stuck(&self, max: usize, max_bytes: usize, stuck: Stuck<'_>) -> Result<Vec<Row>>;
    /// [`ack`](Log::ack), durable across a power loss (disk logs: `synchronous=FULL`): for a
    /// batch handed to the caller, which must not come back.
    fn ack_durably(&self, id: u64) -> Result<()> {
        self.ack(id)
    }
    /// Events overflowed to disk (spill policy only).
    fn spilled(&self) -> usize {
        0
    }
    /// The routes of the events left in the log by an earlier process (disk logs only).
    fn routes(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// A disk log's file, watched: in WAL mode SQLite never notices its file deleted or replaced
/// (a temp-file cleaner, a backup restored over it), and goes on writing to the unlinked file,
/// whose contents are gone when the process exits: acknowledged sends lost. Every call on the
/// log checks the file first and is `Corrupt` once it is not the one opened (as dotdo-sqlite's
/// store is). A replacement between the check and a commit is not seen by that call.
pub(crate) struct WatchedFile {
    watch: dotdo_core::sql_schema::FileWatch,
    path: String,
    lock: WatchedLock,
}

/// A disk log's lock file (`<log>.<kind>.lock`, see [`lock_log`]), watched too: an empty file
/// never written, the first one an age-based temp cleaner deletes (the log itself, written all
/// the time, stays). Unlinked, its lock guarded nothing: a second pipeline opening the log
/// created a new lock file, locked it and ran beside the first, each numbering the same objects'
/// events from its own counters, and the sink dropped one's as replays of the other's
/// (acknowledged sends lost). A lock file found gone is created and locked again (nobody opened
/// the log since: opening makes the file); one found replaced by another file means another
/// pipeline opened the log meanwhile, and may have claimed and committed from it, leaving this
/// one's counters stale: every call is then a `Conflict` that asks for the pipeline to be
/// opened again.
struct WatchedLock {
    path: std::path::PathBuf,
    /// The identity (device, inode) of the lock file this log holds, read from the locked handle
    /// itself (`None`: not known on this platform, no watch), and the file locked again after
    /// the first was deleted (the first stays open with the log).
    held: parking_lot::Mutex<(Option<FileId>, Option<std::fs::File>)>,
}

/// A file's identity: (device, inode).
type FileId = (u64, u64);

/// The identity of a file, where the platform has one.
fn identity(m: &std::fs::Metadata) -> Option<FileId> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = m;
        None
    }
}

impl WatchedLock {
    fn new(log: &Path, kind: &str, lock: &std::fs::File) -> Self {
        let held = lock.metadata().ok().and_then(|m| identity(&m));
        WatchedLock { path: lock_path(log, kind), held: parking_lot::Mutex::new((held, None)) }
    }

    fn check(&self, log: &str, doing: &str) -> Result<()> {
        let mut held = self.held.lock();
        let Some(id) = held.0 else { return Ok(()) };
        match std::fs::metadata(&self.path) {
            Ok(m) if identity(&m) == Some(id) => Ok(()),
            Ok(_) => Err(Error::new(
                dotdo_core::ErrorKind::Conflict,
                format!(
                    "pipeline log: {doing} on {log}: its lock file {} was replaced since the log was opened: \
                     another pipeline opened the log meanwhile and may have committed from it (this one's \
                     sequence numbers may be stale); drop this pipeline and open the log again",
                    self.path.display()
                ),
            )
            .with_retryable(false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let file = take_lock(&self.path, &format!("{doing} on {log} (its lock file was deleted)"))?;
                *held = (file.metadata().ok().and_then(|m| identity(&m)), Some(file));
                tracing::warn!(lock = %self.path.display(), "dotdo pipeline log: lock file deleted; created and locked again");
                Ok(())
            }
            // No verdict this round (a transient error reading the path).
            Err(_) => Ok(()),
        }
    }
}

impl WatchedFile {
    /// Watch the log file at `path` (its path with links resolved, right after opening it) and
    /// its lock file of `kind`, `lock` (as [`lock_log`] locked it).
    pub(crate) fn new(path: &Path, kind: &str, lock: &std::fs::File) -> Self {
        WatchedFile {
            watch: dotdo_core::sql_schema::FileWatch::new(path),
            path: path.display().to_string(),
            lock: WatchedLock::new(path, kind, lock),
        }
    }

    /// `Corrupt` if the log file at the path is no longer the one opened; a non-retryable
    /// `Conflict` if its lock file was replaced (see [`WatchedLock`]).
    pub(crate) fn check(&self, doing: &str) -> Result<()> {
        if self.watch.replaced() {
            return Err(dotdo_core::sql_schema::replaced_file_error(&format!("pipeline log: {doing}"), &self.path));
        }
        self.lock.check(&self.path, doing)
    }
}

/// A disk log whose errors name its file (an operator needs to know which log is damaged,
/// full or unreadable; the log's own errors say only what it was doing), and, for a durable
/// log, whose file is watched ([`WatchedFile`]). (A spill log's file is not: its events in
/// memory, the usual case, must not stop when an unused spill file is cleaned away.)
pub(crate) struct NamedLog<L> {
    inner: L,
    path: String,
    file: Option<WatchedFile>,
}

impl<L: Log> NamedLog<L> {
    /// `inner`, its errors naming `path`.
    pub(crate) fn new(inner: L, path: &Path) -> Self {
        NamedLog { inner, path: path.display().to_string(), file: None }
    }

    /// `inner`, its errors naming `path`, refused once what `file` watches (the log file, its
    /// lock file) is deleted or replaced.
    pub(crate) fn watched(inner: L, path: &Path, file: WatchedFile) -> Self {
        NamedLog { inner, path: path.display().to_string(), file: Some(file) }
    }

    /// `f` on the log, once its file is found to be the one opened; errors name the file.
    fn named<T>(&self, doing: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.file.as_ref().map_or(Ok(()), |w| w.check(doing)).and_then(|()| f()).map_err(|e| {
            if e.to_string().contains(&self.path) {
                e
            } else {
                e.context(&self.path)
            }
        })
    }
}

impl<L: Log> Log for NamedLog<L> {
    fn append(&self, rows: Vec<Row>) -> Result<()> {
        self.named("append", || self.inner.append(rows))
    }
    fn depth(&self) -> (usize, usize) {
        self.inner.depth()
    }
    fn oldest(&self) -> Option<Timestamp> {
        self.inner.oldest()
    }
    fn claimed(&self, token: FencingToken) -> Result<Option<Claimed>> {
        self.named("reading claimed batch", || self.inner.claimed(token))
    }
    fn next_objects(&self, max: usize) -> Result<Vec<(String, ObjectId)>> {
        self.named("peeking", || self.inner.next_objects(max))
    }
    fn claim(
        &self,
        max: usize,
        max_bytes: usize,
        token: FencingToken,
        next_seq: NextSeq<'_>,
    ) -> Result<Option<Claimed>> {
        self.named("claim", || self.inner.claim(max, max_bytes, token, next_seq))
    }
    fn ack(&self, id: u64) -> Result<()> {
        self.named("ack", || self.inner.ack(id))
    }
    fn take_stuck(&self, max: usize, max_bytes: usize, stuck: Stuck<'_>) -> Result<Vec<Row>> {
        self.named("taking out events", || self.inner.take_stuck(max, max_bytes, stuck))
    }
    fn ack_durably(&self, id: u64) -> Result<()> {
        self.named("ack", || self.inner.ack_durably(id))
    }
    fn spilled(&self) -> usize {
        self.inner.spilled()
    }
    fn routes(&self) -> Result<Vec<String>> {
        self.named("listing routes", || self.inner.routes())
    }
}

fn record(e: Event, seq: u64, token: FencingToken) -> ChangeRecord {
    ChangeRecord {
        object: e.object,
        seq,
        key: e.key,
        op: Op::Put,
        value: e.value,
        token,
        timestamp: e.timestamp,
        type_name: e.type_name,
    }
}

/// `keys` without repeats, in order of first appearance (a roll over many distinct objects
/// must not take quadratic time).
fn distinct_in_order(keys: Vec<(String, ObjectId)>) -> Vec<(String, ObjectId)> {
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    keys.into_iter().filter(|k| seen.insert(k.clone())).collect()
}

/// Events and bytes waiting in a log (claimed ones included).
#[derive(Default)]
struct Depth {
    events: AtomicUsize,
    bytes: AtomicUsize,
}

impl Depth {
    fn add(&self, events: usize, bytes: usize) {
        self.events.fetch_add(events, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn sub(&self, events: usize, bytes: usize) {
        self.events.fetch_sub(events.min(self.events.load(Ordering::Relaxed)), Ordering::Relaxed);
        self.bytes.fetch_sub(bytes.min(self.bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
    }

    fn get(&self) -> (usize, usize) {
        (self.events.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }

    fn set(&self, (events, bytes): (usize, usize)) {
        self.events.store(events, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct MemState {
    rows: VecDeque<Row>,
    claimed: Option<Claimed>,
    next_batch: u64,
}

/// The most rows a memory-log claim reserves room for up front (the pipeline's largest learn
/// window): a claim of `roll_rows = usize::MAX` reserved room for every waiting event.
const CLAIM_RESERVE: usize = 65_536;

/// The in-memory log.
#[derive(Default)]
pub(crate) struct MemoryLog {
    state: Mutex<MemState>,
    depth: Depth,
}

impl Log for MemoryLog {
    fn append(&self, rows: Vec<Row>) -> Result<()> {
        let bytes: usize = rows.iter().map(|r| r.event.size()).sum();
        let n = rows.len();
        let mut st = self.state.lock();
        st.rows.extend(rows);
        // Under `state`, as `claim` and `ack` count: a roll that claims and acknowledges these
        // rows in between would otherwise subtract them before they were added, leaving the
        // depth counting events that no longer exist (a buffer that looks full forever).
        self.depth.add(n, bytes);
        Ok(())
    }

    fn depth(&self) -> (usize, usize) {
        self.depth.get()
    }

    fn oldest(&self) -> Option<Timestamp> {
        let st = self.state.lock();
        st.claimed
            .as_ref()
            .and_then(|c| c.rows.iter().map(|(_, r)| r.timestamp).min())
            .or_else(|| st.rows.front().map(|r| r.event.timestamp))
    }

    fn claimed(&self, _token: FencingToken) -> Result<Option<Claimed>> {
        Ok(self.state.lock().claimed.clone())
    }

    fn next_objects(&self, max: usize) -> Result<Vec<(String, ObjectId)>> {
        // Under the lock (sends wait for it), but copying only the distinct keys: a copy of
        // every waiting row's key held sends for milliseconds at each roll.
        let st = self.state.lock();
        let mut seen = std::collections::HashSet::new();
        Ok(st
            .rows
            .iter()
            .take(max)
            .filter(|r| seen.insert((r.route.as_str(), &r.event.object)))
            .map(|r| (r.route.clone(), r.event.object.clone()))
            .collect())
    }

    fn claim(
        &self,
        max: usize,
        max_bytes: usize,
        token: FencingToken,
        next_seq: NextSeq<'_>,
    ) -> Result<Option<Claimed>> {
        let mut st = self.state.lock();
        if st.claimed.is_some() {
            return Err(Error::backend("a claimed batch is still unacknowledged"));
        }
        // Sized once: growing a batch of 47k rows copied it over and over under the lock. At
        // most one learn window: a claim stops at the first object not learned (and a byte
        // bound or sequence limit may stop it sooner: then the room is given back below).
        let mut rows = Vec::with_capacity(max.min(st.rows.len()).min(CLAIM_RESERVE));
        let mut bytes = 0usize;
        while rows.len() < max {
            let Some(front) = st.rows.front() else { break };
            bytes = bytes.saturating_add(front.event.size());
            if !rows.is_empty() && bytes > max_bytes {
                break;
            }
            let Some(seq) = next_seq(&front.route, &front.event.object) else { break };
            let r = st.rows.pop_front().expect("front exists");
            rows.push((r.route, record(r.event, seq, token)));
        }
        if rows.is_empty() {
            return Ok(None);
        }
        if rows.capacity() > 2 * rows.len() {
            // Kept as long as the batch stays claimed.
            rows.shrink_to_fit();
        }
        st.next_batch += 1;
        // Moved, not copied, and kept shared: sends wait while the claim holds the lock (a
        // copy of a 47k-row batch held them for 20 ms, an event's lag for as long).
        let c = Claimed::new(st.next_batch, rows);
        st.claimed = Some(c.clone());
        Ok(Some(c))
    }

    fn ack(&self, id: u64) -> Result<()> {
        let mut st = self.state.lock();
        let acked = st.claimed.take_if(|c| c.id == id);
        if let Some(c) = &acked {
            let bytes: usize = c
                .rows
                .iter()
                .map(|(_, r)| r.value.len() + r.key.len() + r.type_name.len() + r.object.as_str().len() + 32)
                .sum();
            self.depth.sub(c.rows.len(), bytes);
        }
        drop(st);
        // The batch is freed after unlocking: sends wait for the lock.
        drop(acked);
        Ok(())
    }

    fn take_stuck(&self, max: usize, max_bytes: usize, stuck: Stuck<'_>) -> Result<Vec<Row>> {
        let mut st = self.state.lock();
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        while out.len() < max {
            let Some(front) = st.rows.front() else { break };
            bytes = bytes.saturating_add(front.event.size());
            if (!out.is_empty() && bytes > max_bytes) || !stuck(&front.route, &front.event.object) {
                break;
            }
            out.extend(st.rows.pop_front());
        }
        self.depth.sub(out.len(), out.iter().map(|r| r.event.size()).sum());
        Ok(out)
    }
}

/// Run `f` (which commits) with `synchronous=FULL` on a log connection that otherwise runs
/// `NORMAL`, then go back. A claim must survive a power loss once its batch may be committed to
/// cold: a claim rolled back by power loss while its commit landed would have its events claimed
/// again under new sequence numbers (or a new batch id) and delivered twice.
pub(crate) fn fully_synced<T>(conn: &mut Connection, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
    // (On macOS, FULL's fsync reaches the disk only with F_FULLFSYNC.)
    conn.pragma_update(None, "fullfsync", "ON").map_err(|e| sql(e, "fullfsync for a claim"))?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(|e| sql(e, "synchronous=FULL for a claim"))?;
    let out = f(conn);
    // A claim that committed is reported as done even if going back to NORMAL fails (the
    // connection then stays at FULL: slower, as safe): reported as failed, the caller would
    // not know the rows are claimed and could claim them again under another id.
    for (pragma, value) in [("synchronous", "NORMAL"), ("fullfsync", "OFF")] {
        if let Err(e) = conn.pragma_update(None, pragma, value) {
            tracing::warn!(error = %e, pragma, "dotdo pipeline log: a pragma could not be set back after a claim; it stays (slower, as safe)");
        }
    }
    out
}

/// Run `step` (one transaction on a log connection) again while it fails only because the file
/// was busy past the busy timeout, up to four times in all: SQLite's busy handler polls without
/// fairness, so a log file another pipeline writes in a tight loop can starve one transaction
/// for the whole timeout (seen on a loaded 2-core machine). A busy transaction applied nothing.
pub(crate) fn retry_busy<T>(mut step: impl FnMut() -> Result<T>) -> Result<T> {
    let mut tries = 1;
    loop {
        match step() {
            Err(e) if tries < 4 && is_busy(&e) => tries += 1,
            other => return other,
        }
    }
}

/// Whether `e` is a log statement refused with `SQLITE_BUSY`, `SQLITE_LOCKED` or
/// `SQLITE_PROTOCOL` (a race for the WAL's locks, as dotdo-sqlite treats it: busy).
fn is_busy(e: &Error) -> bool {
    use std::error::Error as _;
    e.source().and_then(|s| s.downcast_ref::<rusqlite::Error>()).is_some_and(|s| {
        matches!(
            s.sqlite_error_code(),
            Some(
                rusqlite::ErrorCode::DatabaseBusy
                    | rusqlite::ErrorCode::DatabaseLocked
                    | rusqlite::ErrorCode::FileLockingProtocolFailed
            )
        )
    })
}

// SQLITE_IOERR_CORRUPTFS: the file system reported damage under the log file;
// SQLITE_IOERR_GETTEMPPATH: no directory for a temporary file.
use rusqlite::ffi::{SQLITE_IOERR_CORRUPTFS, SQLITE_IOERR_GETTEMPPATH};

/// A pipeline log's SQLite error as a dotdo error: busy, locked, full or I/O failures are a
/// retryable `Unavailable`, a damaged file `Corrupt`, the rest `Backend`.
pub(crate) fn sql(e: rusqlite::Error, doing: &str) -> Error {
    use rusqlite::ErrorCode::*;
    let code = match &e {
        // The file system reported damage under the file (an I/O error by its primary code):
        // `Corrupt`, as in dotdo-sqlite, not an outage to wait out.
        rusqlite::Error::SqliteFailure(f, _) if f.extended_code == SQLITE_IOERR_CORRUPTFS => {
            return Error::corrupt(format!("pipeline log: {doing}: the file system reports the file damaged: {e}"))
                .with_source(e)
        }
        // No directory for temporary files: the host's setup, not mended by a retry (as in
        // dotdo-sqlite).
        rusqlite::Error::SqliteFailure(f, _) if f.extended_code == SQLITE_IOERR_GETTEMPPATH => {
            return Error::unavailable(format!("pipeline log: {doing}: no directory for temporary files: {e}"))
                .with_retryable(false)
                .with_source(e)
        }
        rusqlite::Error::SqliteFailure(f, _) => Some(f.code),
        // A stored value that does not fit the log's schema (an invalid object id, text where a
        // number belongs): the file was damaged or written by something else.
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => {
            return Error::corrupt(format!("pipeline log: {doing}: a row does not fit the log's schema ({e})"))
                .with_source(e)
        }
        _ => None,
    };
    let err = match code {
        // (SQLite's own text in the message: a disk-full log shows in a host's log line, which
        // prints the message, not the source.)
        Some(DatabaseBusy | DatabaseLocked | FileLockingProtocolFailed | DiskFull | SystemIoFailure) => {
            Error::unavailable(format!("pipeline log: {doing}: {e}"))
        }
        // Out of file descriptors (a connection or temporary file that cannot be opened just
        // now): the moment's, retryable (as in dotdo-sqlite).
        Some(CannotOpen) if dotdo_core::sql_schema::out_of_file_descriptors() => Error::unavailable(format!(
            "pipeline log: {doing}: a file cannot be opened (out of file descriptors?): {e}"
        )),
        // The file cannot be opened or written at all (a missing directory, permissions, a
        // read-only mount): no retry mends that (as in dotdo-sqlite).
        Some(CannotOpen | ReadOnly | PermissionDenied) => {
            Error::unavailable(format!("pipeline log: {doing}: the file cannot be opened or written: {e}"))
                .with_retryable(false)
        }
        Some(DatabaseCorrupt | NotADatabase) => {
            Error::corrupt(format!("pipeline log: {doing}: not a healthy SQLite database: {e}"))
        }
        _ => Error::backend(format!("pipeline log: {doing}: {e}")),
    };
    err.with_source(e)
}

/// A failed COMMIT of events sent to the log: an I/O error there may leave the transaction
/// durable (WAL recovery applies it), so it is an unknown outcome, not a retryable failure: a
/// caller retrying the send would have the events delivered twice. Other failures as [`sql`].
pub(crate) fn commit_error(e: rusqlite::Error, doing: &str) -> Error {
    match &e {
        // (Out of memory too: SQLite indexes the WAL after writing the commit's frames.)
        rusqlite::Error::SqliteFailure(f, _)
            if (f.code == rusqlite::ErrorCode::SystemIoFailure && f.extended_code != SQLITE_IOERR_CORRUPTFS)
                || f.code == rusqlite::ErrorCode::OutOfMemory =>
        {
            // (Of a send: the events may be in the log, delivered once, or not.)
            let resend = if doing.starts_with("append") { "; sending them again may deliver them twice" } else { "" };
            Error::new(
                dotdo_core::ErrorKind::AmbiguousOutcome,
                format!(
                    "pipeline log: {doing}: COMMIT failed ({}), so its changes may be in the log (WAL \
                     recovery applies them) or not{resend}",
                    if f.code == rusqlite::ErrorCode::OutOfMemory { "out of memory" } else { "an I/O error" }
                ),
            )
            .with_source(e)
        }
        _ => sql(e, doing),
    }
}

/// Run an acknowledgement (`ack`) again once after an unknown outcome (an I/O error at its
/// COMMIT): SQLite rolled that COMMIT back in this process, but WAL recovery after a crash
/// could still apply its frames, so the batch might later vanish, or stay, unknown to the
/// caller. The delete is idempotent, and a second attempt that commits settles it either way
/// (its frames overwrite the failed ones). A second unknown outcome is returned.
pub(crate) fn settle_ack<T>(mut ack: impl FnMut() -> Result<T>) -> Result<T> {
    match ack() {
        Err(e) if e.kind() == &dotdo_core::ErrorKind::AmbiguousOutcome => {
            tracing::warn!(error = %e, "dotdo pipeline log: an acknowledgement's COMMIT failed; running it again");
            ack()
        }
        other => other,
    }
}

/// The SQL size of a log row, counted like [`Event::size`](crate::Event::size): UTF-8 bytes of
/// the id, type and key, bytes of the value, plus 32. (A macro, for `concat!`.)
// The value is always stored as a BLOB, whose `length` SQLite reads from the record header
// without loading it (a CAST would load every value of the rows summed: up to `roll_bytes` read
// again on each ack); the text columns are cast for their byte lengths.
macro_rules! row_bytes {
    () => {
        "length(CAST(do_id AS BLOB)) + length(CAST(type AS BLOB)) + length(CAST(key AS BLOB)) + length(value) + 32"
    };
}

/// A row of the SQLite log: (row id, route, event, assigned sequence number).
type LogRow = (i64, String, Event, Option<u64>);

/// The durable log: one SQLite file (WAL, synchronous=NORMAL: an acknowledged append survives a
/// process kill).
pub(crate) struct SqliteLog {
    conn: Mutex<Connection>,
    /// The file opened: the path as `lock_log` resolved it.
    file: std::path::PathBuf,
    depth: Depth,
    /// `<log>.<kind>.lock`, locked for as long as the log is open: a log serves one pipeline at a time.
    lock: std::fs::File,
}

/// A connection to a pipeline log file (event or Arrow): a 2 s busy timeout (another
/// connection, a backup or a tool reading the file, may hold a lock for a moment), and plans
/// that do not depend on bound values (SQLite 3.5x re-prepares a statement on every rebind of a
/// parameter its planner looked at).
pub(crate) fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(2))?;
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    // On macOS a plain fsync leaves data in the drive's cache: checkpoints (which `NORMAL`'s
    // never-corrupted guarantee relies on) sync fully; claims do too (`fully_synced`).
    conn.pragma_update(None, "checkpoint_fullfsync", "ON")?;
    Ok(conn)
}

/// Put a log in WAL mode (persistent in the file). SQLite answers with the mode it is in: a
/// file that stays in a rollback journal (a VFS without shared memory) would run
/// `synchronous=NORMAL` where a power loss may corrupt it, so it is refused (`InvalidInput`),
/// as the SQL hot stores refuse one.
pub(crate) fn wal_mode(conn: &Connection, doing: &str) -> Result<()> {
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(|e| sql(e, doing))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::invalid(format!(
            "{doing}: the log cannot run in WAL mode (SQLite answered journal_mode {mode:?})"
        )));
    }
    Ok(())
}

/// Lock the log of `kind` (`pipeline` or `arrow`: the two kinds keep separate tables and may
/// share a file) at `path` for one pipeline (`<path>.<kind>.lock`, held as long as the returned
/// file is open). A log another pipeline of the kind has open, in this process or another, is a
/// retryable `Conflict`. Also returns `path` resolved as the lock resolved it: the log is
/// opened by that name, so that a link retargeted meanwhile cannot lead to another file.
pub(crate) fn lock_log(path: &Path, kind: &str) -> Result<(std::fs::File, std::path::PathBuf)> {
    let doing = format!("opening {}", path.display());
    let text = path.to_string_lossy();
    if dotdo_core::sql_schema::is_private_database(path) || text.starts_with("file:") {
        // `:memory:` (or an empty path) is no durable log, and a `file:` URI's name is not the
        // file's (its lock would guard another name).
        return Err(Error::invalid(format!("pipeline log: {doing}: a durable log needs a file path (not {text:?})")));
    }
    // The lock belongs to the file, not to the name it was opened by: a symlink (or a path
    // through another directory link) to the same log takes the same lock. (A hard link under
    // another name is not recognised.)
    let resolved = resolve_links(path);
    let lock = take_lock(&lock_path(&resolved, kind), &doing)?;
    Ok((lock, resolved))
}

/// The lock file of the log of `kind` at `resolved` (its path with links resolved).
fn lock_path(resolved: &Path, kind: &str) -> std::path::PathBuf {
    let mut lock_path = resolved.as_os_str().to_owned();
    lock_path.push(format!(".{kind}.lock"));
    lock_path.into()
}

/// Open (or create) the lock file at `lock_path` and lock it: a retryable `Conflict` if another
/// pipeline holds it.
fn take_lock(lock_path: &Path, doing: &str) -> Result<std::fs::File> {
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(lock_path).map_err(|e| {
        // As for the log itself: a file that cannot be created (a missing directory,
        // permissions, a read-only mount) is not mended by a retry.
        Error::unavailable(format!("pipeline log: {doing}: its lock file cannot be opened: {e}"))
            .with_retryable(transient_io(&e))
            .with_source(e)
    })?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(Error::new(
                dotdo_core::ErrorKind::Conflict,
                format!("{doing}: another pipeline has this log open (one log serves one pipeline at a time)"),
            )
            .with_retryable(true))
        }
        // A file system without locks (some NFS or FUSE mounts: `Unsupported`, `ENOLCK`) is
        // not mended by a retry.
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Error::unavailable(format!("{doing}: cannot lock it: {e}"))
                .with_retryable(transient_io(&e))
                .with_source(e))
        }
    }
    Ok(lock)
}

/// `path` with its symlinks resolved, also when the file (or a link's target) does not exist
/// yet: the links are followed by hand (a few hops) and the directory resolved.
fn resolve_links(path: &Path) -> std::path::PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    let mut p = path.to_path_buf();
    for _ in 0..8 {
        let Ok(target) = std::fs::read_link(&p) else { break };
        p = match p.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
    }
    let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match (std::fs::canonicalize(dir), p.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => p,
    }
}

/// Whether an I/O error may pass on a retry: also a full disk or exhausted quota, and a process
/// or system out of file descriptors (`EMFILE`, `ENFILE`), which freeing space or descriptors
/// mends (as the log's own `SQLITE_FULL` is a retryable `Unavailable`).
fn transient_io(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    matches!(e.kind(), K::Interrupted | K::WouldBlock | K::TimedOut | K::StorageFull | K::QuotaExceeded)
        || (cfg!(unix) && matches!(e.raw_os_error(), Some(ENFILE | EMFILE)))
}

impl SqliteLog {
    /// Open (or create) the log at `path`. A log another pipeline has open, in this process or
    /// another, is refused with a retryable `Conflict`: two pipelines numbering batches from one
    /// log would each commit events at sequence numbers the other already used, and the sink
    /// would drop the second as replays.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let doing = format!("opening {}", path.display());
        let (lock, resolved) = lock_log(path, "pipeline")?;
        let conn = open_connection(&resolved).map_err(|e| sql(e, &doing))?;
        wal_mode(&conn, &doing)?;
        conn.execute_batch(
            "PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 16384; PRAGMA journal_size_limit = 67108864;
             CREATE TABLE IF NOT EXISTS pipeline_log (
                id INTEGER PRIMARY KEY, route TEXT NOT NULL, do_id TEXT NOT NULL, type TEXT NOT NULL,
                key TEXT NOT NULL, value BLOB NOT NULL, ts INTEGER NOT NULL, batch INTEGER, seq INTEGER);
             CREATE INDEX IF NOT EXISTS pipeline_log_batch ON pipeline_log (batch) WHERE batch IS NOT NULL;
             CREATE TABLE IF NOT EXISTS pipeline_meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);",
        )
        .map_err(|e| sql(e, &doing))?;
        let log = SqliteLog { conn: Mutex::new(conn), file: resolved, depth: Depth::default(), lock };
        log.depth.set(Self::rows_in(&log.conn.lock()).map_err(|e| sql(e, &doing))?);
        Ok(log)
    }

    /// The file opened (symlinks resolved).
    pub(crate) fn file(&self) -> &Path {
        &self.file
    }

    /// Its lock file, locked (see [`lock_log`]).
    pub(crate) fn lock_file(&self) -> &std::fs::File {
        &self.lock
    }

    /// The events and bytes the log holds (claimed ones included), counted in SQL.
    fn rows_in(conn: &Connection) -> rusqlite::Result<(usize, usize)> {
        let (n, b): (i64, i64) = conn.query_row(
            concat!("SELECT count(*), coalesce(sum(", row_bytes!(), "), 0) FROM pipeline_log"),
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((usize::try_from(n).unwrap_or(0), usize::try_from(b).unwrap_or(0)))
    }

    fn rows_of(conn: &Connection, sql_text: &str, p: &[&dyn rusqlite::ToSql]) -> rusqlite::Result<Vec<LogRow>> {
        let mut st = conn.prepare_cached(sql_text)?;
        let rows = st.query_map(p, |r| {
            let do_id: String = r.get(2)?;
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                do_id,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Vec<u8>>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Option<u64>>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, route, do_id, type_name, key, value, ts, seq) = row?;
            // Naming the row: the repair by hand deletes or mends it by id (docs/errors.md).
            let object = ObjectId::new(&do_id).map_err(|e| {
                let e = std::io::Error::other(format!("log row {id}: invalid object id {do_id:?}: {e}"));
                rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
            })?;
            let event =
                Event { object, type_name, key, value: Bytes::from(value), timestamp: Timestamp::from_micros(ts) };
            // Every event was validated at `send`: one that no longer passes (an empty key, an
            // oversized value) was damaged on disk or written by something else. As a sink's
            // refusal it would read as the caller's bad input, retried by `run` for ever.
            event.validate().map_err(|e| {
                let e = std::io::Error::other(format!("log row {id}: {e}"));
                rusqlite::Error::FromSqlConversionFailure(4, rusqlite::types::Type::Text, Box::new(e))
            })?;
            out.push((id, route, event, seq));
        }
        Ok(out)
    }
}

impl SqliteLog {
    /// The id of the last row a claim of up to `limit` waiting rows and about `max_bytes` takes,
    /// if any waits: found by sizes only, a row at a time, so a log that spilled many large
    /// events is never loaded whole.
    fn claim_window(tx: &Connection, limit: i64, max_bytes: usize, doing: &str) -> Result<Option<i64>> {
        let mut sizes = tx
            .prepare_cached(concat!(
                "SELECT id, ",
                row_bytes!(),
                " FROM pipeline_log WHERE batch IS NULL ORDER BY id LIMIT ?1"
            ))
            .map_err(|e| sql(e, doing))?;
        let mut it = sizes.query([limit]).map_err(|e| sql(e, doing))?;
        let (mut last, mut bytes) = (None, 0usize);
        while let Some(r) = it.next().map_err(|e| sql(e, doing))? {
            let (id, size): (i64, i64) = (r.get(0).map_err(|e| sql(e, doing))?, r.get(1).map_err(|e| sql(e, doing))?);
            bytes = bytes.saturating_add(usize::try_from(size).unwrap_or(usize::MAX));
            if last.is_some() && bytes > max_bytes {
                break;
            }
            last = Some(id);
        }
        Ok(last)
    }

    /// The waiting rows a claim of up to `limit` rows ending at row `last` takes (each checked).
    fn claimable_rows(tx: &Connection, limit: i64, last: i64) -> rusqlite::Result<Vec<LogRow>> {
        Self::rows_of(
            tx,
            "SELECT id, route, do_id, type, key, value, ts, seq FROM pipeline_log WHERE batch IS NULL AND id <= ?2 ORDER BY id LIMIT ?1",
            &[&limit, &last],
        )
    }

    /// Claim up to `max` waiting rows, and about `max_bytes`, in one transaction on `conn`.
    fn claim_in(
        conn: &mut Connection,
        max: usize,
        max_bytes: usize,
        token: FencingToken,
        next_seq: NextSeq<'_>,
    ) -> Result<Option<Claimed>> {
        // Immediate: the claim reads before it writes, and a deferred transaction's upgrade to a
        // writer fails at once (`SQLITE_BUSY`, no busy timeout) if another connection on the
        // file (a pipeline sharing it) committed since the read began.
        let tx =
            conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(|e| sql(e, "claim"))?;
        // One claimed batch at a time, as in the memory log (a roll settles the claimed batch
        // before it claims): a second one found here was claimed by another pipeline on this
        // log (its lock file deleted under them), whose counters numbered the same objects'
        // events; claimed too, the sink dropped one batch's events as replays of the other's.
        let open: Option<u64> = tx
            .query_row("SELECT min(batch) FROM pipeline_log WHERE batch IS NOT NULL", [], |r| r.get(0))
            .map_err(|e| sql(e, "claim"))?;
        if let Some(open) = open {
            return Err(Error::new(
                dotdo_core::ErrorKind::Conflict,
                format!("claim: batch {open} is claimed and not acknowledged (another pipeline on this log?)"),
            )
            .with_retryable(true));
        }
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let Some(last) = Self::claim_window(&tx, limit, max_bytes, "claim")? else { return Ok(None) };
        let rows = Self::claimable_rows(&tx, limit, last).map_err(|e| sql(e, "claim"))?;
        let id: u64 = tx
            .query_row("SELECT coalesce((SELECT v FROM pipeline_meta WHERE k = 'batch'), 0) + 1", [], |r| r.get(0))
            .map_err(|e| sql(e, "claim"))?;
        let mut out = Vec::new();
        {
            let mut upd = tx
                .prepare_cached("UPDATE pipeline_log SET batch = ?2, seq = ?3 WHERE id = ?1")
                .map_err(|e| sql(e, "claim"))?;
            for (row_id, route, e, _) in rows {
                let Some(seq) = next_seq(&route, &e.object) else { break };
                upd.execute(params![row_id, id, seq]).map_err(|e| sql(e, "claim"))?;
                out.push((route, record(e, seq, token)));
            }
        }
        if out.is_empty() {
            return Ok(None);
        }
        tx.execute(
            "INSERT INTO pipeline_meta (k, v) VALUES ('batch', ?1) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            [id],
        )
        .map_err(|e| sql(e, "claim"))?;
        tx.commit().map_err(|e| sql(e, "claim commit"))?;
        Ok(Some(Claimed::new(id, out)))
    }
}

impl SqliteLog {
    /// One attempt of [`Log::take_stuck`] on `conn`: one transaction. The events, and whether
    /// their deletion's outcome is unknown (an I/O error at COMMIT, which WAL recovery may still
    /// apply): they are handed out all the same, since applied it would lose them, and not
    /// applied a later take-out hands them out again (a repeat, never a loss).
    fn take_stuck_in(
        conn: &mut Connection,
        max: usize,
        max_bytes: usize,
        stuck: Stuck<'_>,
    ) -> Result<(Vec<Row>, bool)> {
        const DOING: &str = "taking out events";
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(|e| sql(e, DOING))?;
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        // First the last row to take, by id, route, object and size only (as a claim finds its
        // last row: a log that spilled many large events is never loaded whole).
        let last = {
            let mut st = tx
                .prepare_cached(concat!(
                    "SELECT id, route, do_id, ",
                    row_bytes!(),
                    " FROM pipeline_log WHERE batch IS NULL ORDER BY id LIMIT ?1"
                ))
                .map_err(|e| sql(e, DOING))?;
            let mut it = st.query([limit]).map_err(|e| sql(e, DOING))?;
            let (mut last, mut bytes) = (None, 0usize);
            while let Some(r) = it.next().map_err(|e| sql(e, DOING))? {
                let row = (|| Ok::<_, rusqlite::Error>((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))();
                let (id, route, do_id, size): (i64, String, String, i64) = row.map_err(|e| sql(e, DOING))?;
                bytes = bytes.saturating_add(usize::try_from(size).unwrap_or(usize::MAX));
                let object = ObjectId::new(&do_id).map_err(|e| {
                    Error::corrupt(format!("pipeline log row {id}: invalid object id {do_id:?}")).with_source(e)
                })?;
                if (last.is_some() && bytes > max_bytes) || !stuck(&route, &object) {
                    break;
                }
                last = Some(id);
            }
            last
        };
        let Some(last) = last else {
            // Nothing to take out. A claim failing on a damaged waiting row would stop every
            // roll while this answered "nothing refused": that row's `Corrupt` is the answer
            // (the claim's rows are read as a claim reads them; the log stays as it is).
            if let Some(end) = Self::claim_window(&tx, limit, max_bytes, DOING)? {
                Self::claimable_rows(&tx, limit, end).map_err(|e| sql(e, DOING))?;
            }
            return Ok((Vec::new(), false));
        };
        let rows = Self::rows_of(
            &tx,
            "SELECT id, route, do_id, type, key, value, ts, seq FROM pipeline_log WHERE batch IS NULL AND id <= ?1 ORDER BY id",
            &[&last],
        )
        .map_err(|e| sql(e, DOING))?;
        tx.execute("DELETE FROM pipeline_log WHERE batch IS NULL AND id <= ?1", [last]).map_err(|e| sql(e, DOING))?;
        let unsure = match tx.commit().map_err(|e| commit_error(e, "taking out events commit")) {
            Ok(()) => false,
            Err(e) if e.kind() == &dotdo_core::ErrorKind::AmbiguousOutcome => {
                tracing::warn!(error = %e, "dotdo pipeline log: events taken out may also stay in the log");
                true
            }
            Err(e) => return Err(e),
        };
        Ok((rows.into_iter().map(|(_, route, event, _)| Row { route, event }).collect(), unsure))
    }

    /// One attempt of [`Log::append`]: one transaction.
    fn append_once(&self, rows: &[Row]) -> Result<()> {
        let bytes: usize = rows.iter().map(|r| r.event.size()).sum();
        let n = rows.len();
        let mut conn = self.conn.lock();
        let tx = conn.transaction().map_err(|e| sql(e, "append"))?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO pipeline_log (route, do_id, type, key, value, ts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(|e| sql(e, "append"))?;
            for r in rows {
                let e = &r.event;
                st.execute(params![
                    r.route,
                    e.object.as_str(),
                    e.type_name,
                    e.key,
                    &e.value[..],
                    e.timestamp.as_micros()
                ])
                .map_err(|e| sql(e, "append"))?;
            }
        }
        if let Err(e) = tx.commit() {
            let err = commit_error(e, "append commit");
            if err.kind() == &dotdo_core::ErrorKind::AmbiguousOutcome {
                // The events may be in the log: counted as the log says (else a roll or `close`
                // would leave them out, and an ack of a batch claiming them would count the
                // waiting events short). Unreadable: counted as not there, until a reopen.
                if let Ok(depth) = Self::rows_in(&conn) {
                    self.depth.set(depth);
                }
            }
            return Err(err);
        }
        self.depth.add(n, bytes);
        Ok(())
    }
}

impl Log for SqliteLog {
    // Run again while starved by a busy shared file (`retry_busy`: a busy transaction applied
    // nothing), as acknowledgements are: a send failed `Unavailable` after the busy timeout
    // while another pipeline sent to the same file in a tight loop.
    fn append(&self, rows: Vec<Row>) -> Result<()> {
        retry_busy(|| self.append_once(&rows))
    }

    fn depth(&self) -> (usize, usize) {
        self.depth.get()
    }

    fn oldest(&self) -> Option<Timestamp> {
        let conn = self.conn.lock();
        // As the memory log answers: the earliest of the claimed events (at most a roll's worth,
        // found by the claim index), else the first event waiting (the oldest id not claimed).
        // `min(ts)` over the whole log read every row, under the lock sends wait on.
        let oldest = "SELECT coalesce((SELECT min(ts) FROM pipeline_log WHERE batch IS NOT NULL), \
                      (SELECT ts FROM pipeline_log WHERE batch IS NULL ORDER BY id LIMIT 1))";
        match conn.query_row(oldest, [], |r| r.get::<_, Option<i64>>(0)) {
            Ok(ts) => ts.map(Timestamp::from_micros),
            Err(e) => {
                // Not "nothing pending": say so (the answer is only a hint for lag reporting).
                tracing::warn!(error = %e, "dotdo pipeline log: the oldest pending event could not be read");
                None
            }
        }
    }

    fn claimed(&self, token: FencingToken) -> Result<Option<Claimed>> {
        let conn = self.conn.lock();
        let batch: Option<u64> = conn
            .query_row("SELECT min(batch) FROM pipeline_log WHERE batch IS NOT NULL", [], |r| r.get(0))
            .optional()
            .map_err(|e| sql(e, "reading claimed batch"))?
            .flatten();
        let Some(id) = batch else { return Ok(None) };
        let rows = Self::rows_of(
            &conn,
            "SELECT id, route, do_id, type, key, value, ts, seq FROM pipeline_log WHERE batch = ?1 ORDER BY id",
            &[&id],
        )
        .map_err(|e| sql(e, "reading claimed batch"))?;
        let mut out = Vec::with_capacity(rows.len());
        // A claim numbers each object's events of a route consecutively, in row order: other
        // numbers are damage, `Corrupt` naming the row (passed on, the sink refused the batch as
        // the caller's `InvalidInput`, retried by every roll for ever).
        let mut last: std::collections::HashMap<(String, ObjectId), u64> = std::collections::HashMap::new();
        for (row, route, e, seq) in rows {
            let seq = seq
                .ok_or_else(|| Error::corrupt(format!("pipeline log row {row}: claimed without a sequence number")))?;
            let prev = last.insert((route.clone(), e.object.clone()), seq);
            if seq == 0 || seq > dotdo_core::MAX_SEQ || prev.is_some_and(|p| p.checked_add(1) != Some(seq)) {
                return Err(Error::corrupt(format!(
                    "pipeline log row {row}: claimed sequence number {seq} of {} (route {route:?}) does not follow {}",
                    e.object,
                    prev.map_or_else(
                        || "nothing (it must be 1 or above, at most MAX_SEQ)".to_string(),
                        |p| p.to_string()
                    )
                )));
            }
            out.push((route, record(e, seq, token)));
        }
        Ok(Some(Claimed::new(id, out)))
    }

    fn routes(&self) -> Result<Vec<String>> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare("SELECT DISTINCT route FROM pipeline_log").map_err(|e| sql(e, "listing routes"))?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(|e| sql(e, "listing routes"))?;
        rows.collect::<rusqlite::Result<Vec<String>>>().map_err(|e| sql(e, "listing routes"))
    }

    fn next_objects(&self, max: usize) -> Result<Vec<(String, ObjectId)>> {
        let conn = self.conn.lock();
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let keys: Vec<(String, ObjectId)> = {
            let mut stmt = conn
                .prepare_cached("SELECT route, do_id, id FROM pipeline_log WHERE batch IS NULL ORDER BY id LIMIT ?1")
                .map_err(|e| sql(e, "peeking"))?;
            let rows = stmt
                .query_map([limit], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))
                .map_err(|e| sql(e, "peeking"))?;
            let mut keys = Vec::new();
            for row in rows {
                let (route, id, row) = row.map_err(|e| sql(e, "peeking"))?;
                let object = ObjectId::new(&id).map_err(|e| {
                    Error::corrupt(format!("pipeline log row {row}: invalid object id {id:?}")).with_source(e)
                })?;
                keys.push((route, object));
            }
            keys
        };
        drop(conn);
        Ok(distinct_in_order(keys))
    }

    fn claim(
        &self,
        max: usize,
        max_bytes: usize,
        token: FencingToken,
        next_seq: NextSeq<'_>,
    ) -> Result<Option<Claimed>> {
        let mut conn = self.conn.lock();
        fully_synced(&mut conn, |conn| Self::claim_in(conn, max, max_bytes, token, next_seq))
    }

    // Acknowledgements are run again while starved by a busy file (`retry_busy`), as the Arrow
    // log's are: a roll whose ack failed commits its batch again (a replay) on every retry. (A
    // claim is not: its sequence numbers were assigned as it ran; a failed one forgets them.)
    fn ack(&self, id: u64) -> Result<()> {
        settle_ack(|| retry_busy(|| self.ack_on(&self.conn.lock(), id)))
    }

    fn ack_durably(&self, id: u64) -> Result<()> {
        settle_ack(|| retry_busy(|| fully_synced(&mut self.conn.lock(), |c| self.ack_on(c, id))))
    }

    // Run again while starved by a busy shared file (`retry_busy`), as acknowledgements are: a
    // busy transaction took nothing out.
    fn take_stuck(&self, max: usize, max_bytes: usize, stuck: Stuck<'_>) -> Result<Vec<Row>> {
        let (taken, unsure) = retry_busy(|| {
            fully_synced(&mut self.conn.lock(), |c| Self::take_stuck_in(c, max, max_bytes, &mut *stuck))
        })?;
        match unsure {
            // Counted as the log says, as an append of unknown outcome is (unreadable: until a
            // reopen).
            true => {
                if let Ok(depth) = Self::rows_in(&self.conn.lock()) {
                    self.depth.set(depth);
                }
            }
            false => self.depth.sub(taken.len(), taken.iter().map(|r| r.event.size()).sum()),
        }
        Ok(taken)
    }
}

impl SqliteLog {
    /// Delete the rows of claimed batch `id` through `conn` (the log's connection).
    fn ack_on(&self, conn: &Connection, id: u64) -> Result<()> {
        let (n, b): (i64, i64) = conn
            .query_row(
                concat!("SELECT count(*), coalesce(sum(", row_bytes!(), "), 0) FROM pipeline_log WHERE batch = ?1"),
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| sql(e, "ack"))?;
        // An autocommit delete: an I/O error may come from its COMMIT, after which WAL recovery
        // may still apply it (`AmbiguousOutcome`; counted as the log says then).
        #[cfg(test)]
        let deleted = match tests::FAIL_ACK_AT_COMMIT.with(|f| f.replace(false)) {
            true => Err(tests::io_error_at_commit()),
            false => conn.execute("DELETE FROM pipeline_log WHERE batch = ?1", [id]),
        };
        #[cfg(not(test))]
        let deleted = conn.execute("DELETE FROM pipeline_log WHERE batch = ?1", [id]);
        if let Err(e) = deleted {
            let err = commit_error(e, "ack");
            if err.kind() == &dotdo_core::ErrorKind::AmbiguousOutcome {
                if let Ok(depth) = Self::rows_in(conn) {
                    self.depth.set(depth);
                }
            }
            return Err(err);
        }
        let (n, b) = (usize::try_from(n).unwrap_or(0), usize::try_from(b).unwrap_or(0));
        self.depth.sub(n, b);
        Ok(())
    }
}

/// Memory first; once memory is full, overflow goes to a SQLite file, and keeps going there until
/// the file is drained, so events stay in send order.
pub(crate) struct SpillLog {
    mem: MemoryLog,
    disk: SqliteLog,
    mem_capacity: usize,
    mem_capacity_bytes: usize,
    claimed_from_disk: Mutex<Option<bool>>,
}

impl SpillLog {
    /// Acknowledge claim `id` in the log it was claimed from (the file: `durably` if asked).
    fn ack_with(&self, id: u64, durably: bool) -> Result<()> {
        match self.claimed_from_disk.lock().take() {
            Some(true) if durably => self.disk.ack_durably(id),
            Some(true) => self.disk.ack(id),
            Some(false) => self.mem.ack(id),
            None => Ok(()),
        }
    }

    pub(crate) fn open(path: &Path, mem_capacity: usize, mem_capacity_bytes: usize) -> Result<Self> {
        Ok(SpillLog {
            mem: MemoryLog::default(),
            disk: SqliteLog::open(path)?,
            mem_capacity,
            mem_capacity_bytes,
            claimed_from_disk: Mutex::new(None),
        })
    }
}

impl Log for SpillLog {
    fn append(&self, rows: Vec<Row>) -> Result<()> {
        let (events, bytes) = self.mem.depth();
        let adding: usize = rows.iter().map(|r| r.event.size()).sum();
        if self.disk.depth().0 > 0
            || events + rows.len() > self.mem_capacity
            || bytes.saturating_add(adding) > self.mem_capacity_bytes
        {
            self.disk.append(rows)
        } else {
            self.mem.append(rows)
        }
    }

    fn routes(&self) -> Result<Vec<String>> {
        self.disk.routes()
    }

    fn depth(&self) -> (usize, usize) {
        let (a, b) = self.mem.depth();
        let (c, d) = self.disk.depth();
        (a + c, b + d)
    }

    fn oldest(&self) -> Option<Timestamp> {
        self.mem.oldest().or_else(|| self.disk.oldest())
    }

    fn claimed(&self, token: FencingToken) -> Result<Option<Claimed>> {
        if let Some(c) = self.mem.claimed(token)? {
            *self.claimed_from_disk.lock() = Some(false);
            return Ok(Some(c));
        }
        let c = self.disk.claimed(token)?;
        if c.is_some() {
            *self.claimed_from_disk.lock() = Some(true);
        }
        Ok(c)
    }

    fn next_objects(&self, max: usize) -> Result<Vec<(String, ObjectId)>> {
        let mut v = self.mem.next_objects(max)?;
        if v.is_empty() {
            v = self.disk.next_objects(max)?;
        }
        Ok(v)
    }

    fn claim(
        &self,
        max: usize,
        max_bytes: usize,
        token: FencingToken,
        next_seq: NextSeq<'_>,
    ) -> Result<Option<Claimed>> {
        if self.mem.depth().0 > 0 {
            let c = self.mem.claim(max, max_bytes, token, next_seq)?;
            *self.claimed_from_disk.lock() = c.as_ref().map(|_| false);
            return Ok(c);
        }
        let c = self.disk.claim(max, max_bytes, token, next_seq)?;
        *self.claimed_from_disk.lock() = c.as_ref().map(|_| true);
        Ok(c)
    }

    fn spilled(&self) -> usize {
        self.disk.depth().0
    }

    fn ack(&self, id: u64) -> Result<()> {
        self.ack_with(id, false)
    }

    fn ack_durably(&self, id: u64) -> Result<()> {
        self.ack_with(id, true)
    }

    fn take_stuck(&self, max: usize, max_bytes: usize, stuck: Stuck<'_>) -> Result<Vec<Row>> {
        // Where `claim` would claim from: memory while it holds events, then the file.
        if self.mem.depth().0 > 0 {
            self.mem.take_stuck(max, max_bytes, stuck)
        } else {
            self.disk.take_stuck(max, max_bytes, stuck)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A memory-log claim stopped early by its byte bound keeps no room for the rows it did not
    /// take (the batch is kept while claimed): it reserved room for every waiting event.
    #[test]
    fn a_claim_keeps_no_room_for_rows_it_did_not_take() {
        let log = MemoryLog::default();
        let object = ObjectId::new("o").expect("id");
        let rows = (0..10_000)
            .map(|i| Row {
                route: String::new(),
                event: Event::new(object.clone(), "T", format!("k{i}"), vec![0u8; 1024], Timestamp::EPOCH),
            })
            .collect();
        log.append(rows).expect("append");
        let mut seq = 0;
        let c = log
            .claim(usize::MAX, 4096, FencingToken::new(1), &mut |_, _| {
                seq += 1;
                Some(seq)
            })
            .expect("claim")
            .expect("a batch");
        assert!((1..=4).contains(&c.rows.len()), "{} rows", c.rows.len());
        assert!(c.rows.capacity() < 64, "room for {} rows kept", c.rows.capacity());
    }

    thread_local! {
        /// Fail the next ack on this thread as a COMMIT whose sync failed (SQLite rolled it back
        /// in this process; WAL recovery after a crash might still apply its frames).
        pub(crate) static FAIL_ACK_AT_COMMIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// The error of a COMMIT whose sync failed.
    pub(crate) fn io_error_at_commit() -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_FSYNC),
            Some("an I/O error at the COMMIT (test)".into()),
        )
    }

    /// SQLite errors the log meets: a file system reporting the file damaged is `Corrupt` (also
    /// at a COMMIT: not an unknown outcome to wait out), a race for the WAL's locks
    /// (`SQLITE_PROTOCOL`) a busy file, retried.
    #[test]
    fn damaged_file_systems_are_corrupt_and_wal_lock_races_are_busy() {
        let failure = |code| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
        let e = sql(failure(SQLITE_IOERR_CORRUPTFS), "append");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{e}");
        assert!(!e.is_retryable(), "{e}");
        let e = commit_error(failure(SQLITE_IOERR_CORRUPTFS), "append commit");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{e}");
        let e = sql(failure(rusqlite::ffi::SQLITE_PROTOCOL), "append");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Unavailable, "{e}");
        assert!(e.is_retryable(), "{e}");
        let mut tries = 0;
        let r = retry_busy(|| {
            tries += 1;
            match tries {
                1 => Err(sql(failure(rusqlite::ffi::SQLITE_PROTOCOL), "append")),
                _ => Ok(tries),
            }
        });
        assert_eq!(r.expect("retried"), 2);
    }

    /// An ack whose delete fails with an I/O error at its COMMIT is an unknown outcome (WAL
    /// recovery after a crash may still apply it; it was a retryable `Unavailable`), counted as
    /// the log says; `ack`/`ack_durably` settle it by running the delete again.
    #[test]
    fn an_ack_io_error_at_commit_is_an_unknown_outcome() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.db");
        let log = SqliteLog::open(&path).expect("open");
        log.conn
            .lock()
            .execute_batch(
                "INSERT INTO pipeline_log (route, do_id, type, key, value, ts, batch, seq) \
                 VALUES ('', 'o', 'T', 'k', x'00', 0, 1, 1);",
            )
            .expect("insert");
        log.depth.set(SqliteLog::rows_in(&log.conn.lock()).expect("rows"));
        assert_eq!(log.depth().0, 1);
        FAIL_ACK_AT_COMMIT.with(|f| f.set(true));
        let e = log.ack_on(&log.conn.lock(), 1).expect_err("the I/O error");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::AmbiguousOutcome, "{e}");
        assert_eq!(log.depth().0, 1, "counted as the log says: the delete rolled back");
        // The acknowledgement settles it: run again (its delete is idempotent), it commits.
        FAIL_ACK_AT_COMMIT.with(|f| f.set(true));
        log.ack_durably(1).expect("settled by running the ack again");
        assert!(!FAIL_ACK_AT_COMMIT.with(|f| f.get()), "the fault fired");
        assert_eq!(log.depth(), (0, 0));
        drop(log);
        let log = SqliteLog::open(&path).expect("reopen");
        assert_eq!(log.depth(), (0, 0), "gone from the file");
    }

    /// A log's connection runs in WAL mode and syncs checkpoints fully, and a claim's commit
    /// (`synchronous=FULL`) fully too (on macOS a plain fsync leaves data in the drive's cache);
    /// after the claim the connection is back at `NORMAL`.
    #[test]
    fn log_connections_sync_fully_where_it_matters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = SqliteLog::open(&dir.path().join("log.db")).expect("open");
        let mut conn = log.conn.lock();
        let pragma = |c: &Connection, p: &str| -> String {
            c.query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, rusqlite::types::Value>(0))
                .map(|v| match v {
                    rusqlite::types::Value::Text(t) => t,
                    rusqlite::types::Value::Integer(i) => i.to_string(),
                    other => format!("{other:?}"),
                })
                .expect("pragma")
        };
        assert_eq!(pragma(&conn, "journal_mode"), "wal");
        assert_eq!(pragma(&conn, "checkpoint_fullfsync"), "1");
        // A WAL grown by one large send is cut back to 64 MiB once checkpointed.
        assert_eq!(pragma(&conn, "journal_size_limit"), "67108864");
        let during =
            fully_synced(&mut conn, |c| Ok((pragma(c, "synchronous"), pragma(c, "fullfsync")))).expect("claim");
        assert_eq!(during, ("2".to_string(), "1".to_string()), "FULL and fullfsync during a claim");
        assert_eq!((pragma(&conn, "synchronous"), pragma(&conn, "fullfsync")), ("1".to_string(), "0".to_string()));
    }

    /// A lock the file system cannot take (no lock support) is not retryable; an interrupted
    /// call, a full disk and exhausted file descriptors are. The log's SQLite errors carry
    /// SQLite's text.
    #[test]
    fn lock_failures_without_lock_support_are_not_retryable() {
        use std::io::{Error as IoError, ErrorKind as K};
        assert!(!transient_io(&IoError::from(K::Unsupported)));
        assert!(!transient_io(&IoError::from_raw_os_error(37))); // ENOLCK on Linux
        assert!(transient_io(&IoError::from(K::Interrupted)));
        // Freeing space or file descriptors mends these.
        assert!(transient_io(&IoError::from(K::StorageFull)));
        // EMFILE (on Linux, macOS and the BSDs alike).
        #[cfg(unix)]
        assert!(transient_io(&IoError::from_raw_os_error(24)));
        // The log's SQLite errors say what SQLite said (a host logs the message).
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            Some("database or disk is full".into()),
        );
        let e = sql(full, "ack");
        assert_eq!((e.kind(), e.is_retryable()), (&dotdo_core::ErrorKind::Unavailable, true), "{e}");
        assert!(e.to_string().contains("full"), "{e}");
    }

    /// A claim's transaction commits with `synchronous=FULL` (it must survive a power loss once
    /// its batch may be in cold storage); the log's other commits stay `NORMAL`.
    #[test]
    fn claims_commit_fully_synced_and_the_log_goes_back_to_normal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = SqliteLog::open(&dir.path().join("log.db")).expect("open");
        let mut conn = log.conn.lock();
        let level = |c: &Connection| c.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0));
        assert_eq!(level(&conn).expect("level"), 1, "NORMAL");
        let during = fully_synced(&mut conn, |c| level(c).map_err(|e| sql(e, "reading"))).expect("claim");
        assert_eq!(during, 2, "FULL while claiming");
        assert_eq!(level(&conn).expect("level"), 1, "NORMAL again");
        let failed: Result<()> = fully_synced(&mut conn, |_| Err(Error::unavailable("claim failed")));
        assert!(failed.is_err());
        assert_eq!(level(&conn).expect("level"), 1, "NORMAL again after a failed claim");
    }

    /// The oldest pending event is found as the memory log finds it (the earliest claimed one,
    /// else the first waiting) without reading the whole log.
    #[test]
    fn the_oldest_pending_event_is_the_earliest_claimed_or_the_first_waiting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = SqliteLog::open(&dir.path().join("log.db")).expect("open");
        assert_eq!(log.oldest(), None);
        let insert = |batch: &str, ts: i64| {
            log.conn
                .lock()
                .execute_batch(&format!(
                    "INSERT INTO pipeline_log (route, do_id, type, key, value, ts, batch, seq) \
                     VALUES ('r', 'o', 'T', 'k', x'00', {ts}, {batch}, NULL);"
                ))
                .expect("insert");
        };
        insert("1", 50);
        insert("1", 20);
        insert("NULL", 40);
        insert("NULL", 5);
        assert_eq!(log.oldest(), Some(Timestamp::from_micros(20)), "the earliest claimed");
        log.conn.lock().execute_batch("DELETE FROM pipeline_log WHERE batch IS NOT NULL;").expect("ack");
        assert_eq!(log.oldest(), Some(Timestamp::from_micros(40)), "the first sent of those waiting");
        let plan: Vec<String> = {
            let c = log.conn.lock();
            let mut st =
                c.prepare("EXPLAIN QUERY PLAN SELECT ts FROM pipeline_log WHERE batch IS NOT NULL").expect("plan");
            let rows = st.query_map([], |r| r.get::<_, String>(3)).expect("rows");
            rows.map(|r| r.expect("row")).collect()
        };
        assert!(plan.iter().any(|p| p.contains("pipeline_log_batch")), "the claimed rows by their index: {plan:?}");
    }

    /// A log transaction refused as busy is run again (a bounded number of times); any other
    /// failure is returned at once.
    #[test]
    fn busy_log_transactions_are_run_again_a_bounded_number_of_times() {
        let busy =
            || sql(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY), None), "ack");
        let mut calls = 0;
        let out = retry_busy(|| {
            calls += 1;
            if calls < 3 {
                Err(busy())
            } else {
                Ok(calls)
            }
        });
        assert_eq!(out.expect("the third try"), 3);
        let mut calls = 0;
        let e = retry_busy(|| -> Result<()> {
            calls += 1;
            Err(busy())
        })
        .expect_err("always busy");
        assert_eq!((calls, e.kind()), (4, &dotdo_core::ErrorKind::Unavailable));
        let mut calls = 0;
        let _ = retry_busy(|| -> Result<()> {
            calls += 1;
            Err(Error::corrupt("damaged"))
        });
        assert_eq!(calls, 1, "not busy: not run again");
    }

    /// A durable log needs a file path: `:memory:`, an empty path or a `file:` URI is refused
    /// (the first would lose everything at exit; a URI's name is not the file's, so its lock
    /// would guard another name).
    #[test]
    fn a_durable_log_needs_a_file_path() {
        for bad in [":memory:", "", "file:log.db?mode=rwc", "file::memory:"] {
            let Err(e) = lock_log(Path::new(bad), "pipeline") else { panic!("{bad:?} accepted") };
            assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{bad:?}: {e}");
        }
    }

    /// An I/O error at the COMMIT of a send is an unknown outcome (the events may be durable),
    /// never a retryable `Unavailable`; other COMMIT failures map as any log error.
    #[test]
    fn a_send_commit_io_error_is_an_unknown_outcome() {
        let failure = |code| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
        // (Out of memory too: SQLite indexes the WAL after writing the commit's frames.)
        for code in [rusqlite::ffi::SQLITE_IOERR, rusqlite::ffi::SQLITE_NOMEM] {
            let e = commit_error(failure(code), "append commit");
            assert_eq!(e.kind(), &dotdo_core::ErrorKind::AmbiguousOutcome, "{code}: {e}");
            assert!(!e.is_retryable(), "{e}");
        }
        let e = commit_error(failure(rusqlite::ffi::SQLITE_BUSY), "append commit");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Unavailable, "{e}");
        assert!(e.is_retryable(), "{e}");
    }

    /// A claimed log row with an empty (invalid) object id.
    const CLAIMED_ROW_WITHOUT_OBJECT: &str =
        "INSERT INTO pipeline_log (route, do_id, type, key, value, ts, batch, seq) \
                                              VALUES ('r', '', 'T', 'k', x'00', 0, 1, 1);";

    /// A log row that does not fit the schema (an invalid object id, a sequence number that is
    /// not a number) is `Corrupt`, not a backend failure to retry.
    #[test]
    fn rows_that_do_not_fit_the_schema_are_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = SqliteLog::open(&dir.path().join("log.db")).expect("open");
        log.conn.lock().execute_batch(CLAIMED_ROW_WITHOUT_OBJECT).expect("insert");
        let Err(e) = log.claimed(FencingToken::new(1)) else { panic!("an invalid object id was read") };
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{e}");
        log.conn.lock().execute_batch("UPDATE pipeline_log SET do_id = 'obj', seq = 'x';").expect("update");
        let Err(e) = log.claimed(FencingToken::new(1)) else { panic!("a text sequence number was read") };
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{e}");
        // Rows that fit the schema but not an event's limits (every event was validated at
        // `send`), claimed or waiting: `Corrupt` naming the row, not the sink's InvalidInput.
        for damage in ["key = ''", "type = ''", "value = zeroblob(2 * 1024 * 1024 + 1)"] {
            let c = log.conn.lock();
            c.execute_batch("UPDATE pipeline_log SET seq = 1, key = 'k', type = 'T', value = x'00';").expect("mend");
            c.execute_batch(&format!("UPDATE pipeline_log SET {damage};")).expect("damage");
            drop(c);
            let Err(e) = log.claimed(FencingToken::new(1)) else { panic!("a damaged claimed row ({damage}) was read") };
            assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{damage}: {e}");
            assert!(e.to_string().contains("log row 1"), "{damage}: {e}");
            log.conn.lock().execute_batch("UPDATE pipeline_log SET batch = NULL, seq = NULL;").expect("unclaim");
            let Err(e) = log.claim(100, usize::MAX, FencingToken::new(1), &mut |_, _| Some(1)) else {
                panic!("a damaged waiting row ({damage}) was claimed")
            };
            assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{damage}: {e}");
            log.conn.lock().execute_batch("UPDATE pipeline_log SET batch = 1;").expect("claim again");
        }
    }

    /// A log's SQLite errors for want of a temporary directory are not retried (no retry mends
    /// the host's setup), other I/O errors are; a file that cannot be opened with descriptors to
    /// spare is not retried either.
    #[test]
    fn log_errors_are_retried_only_where_a_retry_can_help() {
        let failure = |code| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
        let e = sql(failure(SQLITE_IOERR_GETTEMPPATH), "claim");
        assert_eq!((e.kind(), e.is_retryable()), (&dotdo_core::ErrorKind::Unavailable, false), "{e}");
        let e = sql(failure(rusqlite::ffi::SQLITE_IOERR_WRITE), "claim");
        assert_eq!((e.kind(), e.is_retryable()), (&dotdo_core::ErrorKind::Unavailable, true), "{e}");
        let e = sql(failure(rusqlite::ffi::SQLITE_CANTOPEN), "open");
        assert_eq!((e.kind(), e.is_retryable()), (&dotdo_core::ErrorKind::Unavailable, false), "{e}");
    }

    /// A disk log claims one batch at a time, as the memory log does: a claim while another
    /// batch is claimed and unacknowledged (another pipeline's, on a log whose lock file was
    /// deleted under them) is a retryable `Conflict` and claims nothing; once the batch is
    /// acknowledged the next claim goes through. A second claimed batch numbered the same objects'
    /// events from another counter, and the sink dropped one batch's as replays.
    #[test]
    fn a_disk_log_claims_one_batch_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = SqliteLog::open(&dir.path().join("log.db")).expect("open");
        let object = ObjectId::new("o").expect("id");
        let row = |i: usize| Row {
            route: String::new(),
            event: Event::new(object.clone(), "T", format!("k{i}"), vec![0u8; 8], Timestamp::EPOCH),
        };
        log.append((0..4).map(row).collect()).expect("append");
        let mut seq = 0;
        let mut next = |_: &str, _: &ObjectId| {
            seq += 1;
            Some(seq)
        };
        let first = log.claim(2, usize::MAX, FencingToken::new(1), &mut next).expect("claim").expect("a batch");
        let e = log.claim(2, usize::MAX, FencingToken::new(1), &mut next).expect_err("a batch is claimed");
        assert_eq!((e.kind(), e.is_retryable()), (&dotdo_core::ErrorKind::Conflict, true), "{e}");
        assert!(e.to_string().contains(&format!("batch {}", first.id)), "{e}");
        assert_eq!(log.claimed(FencingToken::new(1)).expect("claimed").map(|c| c.id), Some(first.id));
        log.ack(first.id).expect("ack");
        let second = log.claim(2, usize::MAX, FencingToken::new(1), &mut next).expect("claim").expect("a batch");
        assert_eq!(second.rows.len(), 2);
        assert_eq!(second.rows[0].1.seq, 3, "numbered on from the first batch");
    }

    /// A log's errors, as a pipeline sees them, name its file.
    #[test]
    fn a_named_log_names_its_file_in_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.db");
        let log = NamedLog::new(SqliteLog::open(&path).expect("open"), &path);
        log.inner.conn.lock().execute_batch(CLAIMED_ROW_WITHOUT_OBJECT).expect("insert");
        let Err(e) = log.claimed(FencingToken::new(1)) else { panic!("an invalid object id was read") };
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "names the log file: {e}");
    }
}
