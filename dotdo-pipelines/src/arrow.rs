//! Streams of **any user Arrow schema**: [`ArrowPipeline`] buffers `RecordBatch`es and rolls
//! them into numbered, exactly-once appends to an [`ArrowSink`] (an Iceberg table with that
//! schema, `dotdo_iceberg::ArrowTable`, with the default `iceberg` feature).
//!
//! Exactly once: a roll *claims* what is waiting under the next batch id (durably, in durable
//! mode) before appending; the sink records the highest batch id per stream in its snapshot
//! summary and skips ids at or below it, so re-appending a claimed batch after a crash, a failed
//! or an ambiguous commit never duplicates rows.
//!
//! A batch the sink refuses for good (a table whose schema another engine changed, a user sink's
//! refusal) would stop every roll, since a claimed batch is committed first:
//! [`ArrowPipeline::take_refused`] takes it out (it is the caller's then) and the rest goes on,
//! unless the rest is refused too: after another engine changed the table's schema in a way
//! older batches cannot follow (see the schema-evolution section of the cold-store docs), every
//! batch of the old shape is, and once a roll has found so, `send` refuses them
//! (`InvalidInput`). Then open the table and the pipeline again with the new schema, and take
//! the old batches out (`take_refused`, once per claim) to convert and send again.
//!
//! Each roll is one commit, so an Iceberg table fed by a pipeline gains a small file and a
//! snapshot per roll: maintain it with `ArrowTable::compact`, `ArrowTable::expire_snapshots` and
//! `ArrowTable::remove_unreferenced_files` (the batch marks survive all three).

use std::fmt::Debug;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use async_trait::async_trait;
use dotdo_core::{Clock, Error, ErrorKind, Result, SystemClock};
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};

use crate::settings::{Durability, PipelineSettings};

/// The highest batch id: ids are stream marks, at most `i64::MAX`.
const MAX_BATCH_ID: u64 = i64::MAX as u64;

/// A destination for numbered batches of one Arrow schema.
///
/// Contract: `append(stream, id, ..)` is atomic and idempotent per `(stream, id)`: an id at or
/// below [`last_batch`](ArrowSink::last_batch)`(stream)` writes nothing and returns `Ok(0)`.
#[async_trait]
pub trait ArrowSink: Send + Sync + Debug + 'static {
    /// The schema batches must have.
    fn schema(&self) -> SchemaRef;
    /// The highest batch id committed for `stream` (0 if none).
    async fn last_batch(&self, stream: &str) -> Result<u64>;
    /// Append `batches` as batch `id` of `stream`; returns the rows written (0 for a replay).
    async fn append(&self, stream: &str, id: u64, batches: Vec<RecordBatch>) -> Result<u64>;
    /// Why batches of [`schema`](Self::schema) can no longer be appended, if the sink knows
    /// (its table's schema changed under it in a way they cannot follow): `send` then refuses
    /// them (`InvalidInput`) instead of accepting batches no roll can commit. Default `None`.
    /// A sink that says so should look again at [`last_batch`](Self::last_batch), which
    /// `take_refused` and every claim call (dotdo-iceberg's `ArrowTable` does).
    fn refuses_shape(&self) -> Option<String> {
        None
    }
}

#[cfg(feature = "iceberg")]
#[async_trait]
impl ArrowSink for dotdo_iceberg::ArrowTable {
    fn schema(&self) -> SchemaRef {
        dotdo_iceberg::ArrowTable::schema(self)
    }
    async fn last_batch(&self, stream: &str) -> Result<u64> {
        dotdo_iceberg::ArrowTable::last_batch(self, stream).await
    }
    async fn append(&self, stream: &str, id: u64, batches: Vec<RecordBatch>) -> Result<u64> {
        Ok(dotdo_iceberg::ArrowTable::append(self, stream, id, batches).await?.rows)
    }
    fn refuses_shape(&self) -> Option<String> {
        self.shape_refused()
    }
}

fn sql(e: rusqlite::Error, doing: &str) -> Error {
    crate::log::sql(e, &format!("arrow_log {doing}"))
}

fn encode(batch: &RecordBatch) -> Result<Vec<u8>> {
    let batch = &views_compacted(batch)?;
    let mut buf = Vec::new();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut buf, &batch.schema())
        .map_err(|e| Error::backend("encoding a batch as Arrow IPC").with_source(e))?;
    w.write(batch).map_err(|e| Error::backend("encoding a batch as Arrow IPC").with_source(e))?;
    w.finish().map_err(|e| Error::backend("encoding a batch as Arrow IPC").with_source(e))?;
    drop(w);
    Ok(buf)
}

/// `batch` with each view column (`Utf8View`, `BinaryView`, also one inside a struct column)
/// whose data buffers hold far more than its rows use copied down to what they use: arrow's IPC
/// writer writes a view column's data buffers whole, also for a slice of a larger batch (a
/// one-row slice of a 64 MiB batch was logged as 64 MiB, against the few bytes `capacity_bytes`
/// counted, and read back whole on reopen). Views inside struct and list columns (and lists
/// of structs, structs of lists) are compacted too; those inside maps and fixed-size lists are
/// written as arrow writes them.
fn views_compacted(batch: &RecordBatch) -> Result<RecordBatch> {
    let mut changed = false;
    let columns: Vec<arrow_array::ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| {
            Ok(match compacted(c)? {
                Some(n) => {
                    changed = true;
                    n
                }
                None => c.clone(),
            })
        })
        .collect::<Result<_>>()?;
    if !changed {
        return Ok(batch.clone());
    }
    RecordBatch::try_new(batch.schema(), columns)
        .map_err(|e| Error::backend("compacting a batch's view columns").with_source(e))
}

/// `column` with its wasteful view data compacted (see [`views_compacted`]); `None` if nothing
/// in it is.
fn compacted(column: &arrow_array::ArrayRef) -> Result<Option<arrow_array::ArrayRef>> {
    use arrow_array::cast::AsArray;
    use arrow_schema::DataType;
    // Data buffers of `held` bytes behind `column`: far more than its rows use?
    fn wasteful(held: usize, column: &arrow_array::ArrayRef) -> bool {
        held > 4096 && held / 2 > dotdo_core::arrow_size::rows_bytes(&column.to_data())
    }
    Ok(match column.data_type() {
        DataType::Utf8View => {
            let v = column.as_string_view();
            wasteful(v.data_buffers().iter().map(|b| b.len()).sum(), column)
                .then(|| Arc::new(v.gc()) as arrow_array::ArrayRef)
        }
        DataType::BinaryView => {
            let v = column.as_binary_view();
            wasteful(v.data_buffers().iter().map(|b| b.len()).sum(), column)
                .then(|| Arc::new(v.gc()) as arrow_array::ArrayRef)
        }
        // A list's slice keeps its whole child (arrow's IPC writer then writes the part its
        // offsets span, with a view child's data buffers whole): that part, compacted, under
        // offsets rebased to it.
        DataType::List(field) => compacted_list(column.as_list::<i32>(), field)?,
        DataType::LargeList(field) => compacted_list(column.as_list::<i64>(), field)?,
        // A struct's slice slices its columns: each is compacted as a column of the batch.
        DataType::Struct(fields) => {
            let s = column.as_struct();
            let inner: Vec<Option<arrow_array::ArrayRef>> = s.columns().iter().map(compacted).collect::<Result<_>>()?;
            if inner.iter().all(Option::is_none) {
                return Ok(None);
            }
            let columns = inner.into_iter().zip(s.columns()).map(|(n, c)| n.unwrap_or_else(|| c.clone())).collect();
            let rebuilt =
                arrow_array::StructArray::try_new(fields.clone(), columns, arrow_array::Array::nulls(s).cloned())
                    .map_err(|e| Error::backend("compacting a struct column's views").with_source(e))?;
            Some(Arc::new(rebuilt) as arrow_array::ArrayRef)
        }
        _ => None,
    })
}

/// The list column `l` (of items `field`) with the part of its child its offsets span compacted
/// (see [`compacted`]), under offsets rebased to it; `None` if nothing in it is.
fn compacted_list<O: arrow_array::OffsetSizeTrait>(
    l: &arrow_array::GenericListArray<O>,
    field: &arrow_schema::FieldRef,
) -> Result<Option<arrow_array::ArrayRef>> {
    let offsets = l.offsets();
    let (start, end) = (offsets[0], offsets[offsets.len() - 1]);
    let span = l.values().slice(start.as_usize(), (end - start).as_usize());
    let Some(values) = compacted(&span)? else { return Ok(None) };
    let rebased = arrow_buffer::OffsetBuffer::new(offsets.iter().map(|o| *o - start).collect());
    let rebuilt = arrow_array::GenericListArray::<O>::try_new(
        field.clone(),
        rebased,
        values,
        arrow_array::Array::nulls(l).cloned(),
    )
    .map_err(|e| Error::backend("compacting a list column's views").with_source(e))?;
    Ok(Some(Arc::new(rebuilt)))
}

/// The batches of a logged IPC stream, or `Corrupt`. The stream's framing is checked first:
/// arrow's reader trusts a message's body length and buffer offsets, and a damaged one makes it
/// allocate the length it reads (aborting the process on a huge one) or panic slicing past the
/// body. Whatever else arrow may panic on is caught and is `Corrupt` too.
fn decode(bytes: &[u8]) -> Result<Vec<RecordBatch>> {
    let undecodable = |why: String| Error::corrupt(format!("arrow pipeline log: undecodable batch ({why})"));
    check_ipc_frames(bytes).map_err(undecodable)?;
    let read = || {
        let r = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
        r.collect::<std::result::Result<Vec<_>, _>>()
    };
    match std::panic::catch_unwind(read) {
        Ok(Ok(batches)) => Ok(batches),
        Ok(Err(e)) => Err(undecodable(e.to_string()).with_source(e)),
        Err(_) => Err(undecodable("the Arrow IPC reader panicked on it".to_string())),
    }
}

/// Whether `bytes` is a well-framed Arrow IPC stream: each message's metadata is a valid
/// flatbuffer within the bytes, its body lies within them, and every buffer a record or
/// dictionary batch names lies within its body.
fn check_ipc_frames(bytes: &[u8]) -> std::result::Result<(), String> {
    let mut at = 0usize;
    let word = |at: usize| -> std::result::Result<[u8; 4], String> {
        bytes
            .get(at..at + 4)
            .map(|w| [w[0], w[1], w[2], w[3]])
            .ok_or_else(|| format!("the stream ends at byte {at} inside a message header"))
    };
    loop {
        if at == bytes.len() {
            // A stream without its end marker: arrow's reader takes it as ended.
            return Ok(());
        }
        let mut w = word(at)?;
        at += 4;
        if w == [0xff; 4] {
            w = word(at)?;
            at += 4;
        }
        let len = i32::from_le_bytes(w);
        if len == 0 {
            return Ok(());
        }
        let meta = usize::try_from(len)
            .ok()
            .and_then(|l| bytes.get(at..at.checked_add(l)?))
            .ok_or_else(|| format!("a message's metadata of {len} bytes at byte {at} does not fit in the stream"))?;
        let message = arrow_ipc::root_as_message(meta).map_err(|e| format!("message metadata at byte {at}: {e}"))?;
        at += meta.len();
        let body = usize::try_from(message.bodyLength())
            .ok()
            .filter(|b| at.checked_add(*b).is_some_and(|end| end <= bytes.len()))
            .ok_or_else(|| {
                format!("a message body of {} bytes at byte {at} does not fit in the stream", message.bodyLength())
            })?;
        let batch =
            message.header_as_record_batch().or_else(|| message.header_as_dictionary_batch().and_then(|d| d.data()));
        for b in batch.and_then(|b| b.buffers()).into_iter().flatten() {
            let end = b.offset().checked_add(b.length());
            if b.offset() < 0 || b.length() < 0 || end.is_none_or(|e| e > body as i64) {
                return Err(format!(
                    "a buffer at {} of {} bytes lies outside its {body}-byte message body",
                    b.offset(),
                    b.length()
                ));
            }
        }
        at += body;
    }
}

/// The bytes `batch` holds for `roll_bytes` and `capacity_bytes`: the memory of its own rows
/// (a slice of a larger batch counts its slice, not the buffers it shares with the rest).
fn batch_bytes(batch: &RecordBatch) -> usize {
    batch.columns().iter().map(|c| dotdo_core::arrow_size::rows_bytes(&c.to_data())).sum()
}

#[derive(Default)]
struct Buf {
    pending: Vec<RecordBatch>,
    rows: usize,
    bytes: usize,
    claimed: Option<(u64, Vec<RecordBatch>)>,
    /// Batches a durable log held under further claimed ids at open, in id order: committed one
    /// after another after `claimed`, each under its own id.
    later_claims: std::collections::VecDeque<(u64, Vec<RecordBatch>)>,
    /// Rows and bytes of `claimed` and `later_claims`, kept with them (`send` reads them on
    /// every call).
    claimed_rows: usize,
    claimed_bytes: usize,
    /// Ids of the claims the durable log held at open whose fate is not checked yet: an earlier
    /// pipeline claimed them and may have committed them before it stopped (then they count 0).
    from_earlier: std::collections::HashSet<u64>,
    /// Ids of the claims the durable log held at open, until taken out or acknowledged (unlike
    /// `from_earlier`, kept once a roll checked them): `take_refused` hands one out only once the
    /// sink has answered this process (see `CommitWatch`).
    inherited: std::collections::HashSet<u64>,
    /// The claimed batch whose rows this pipeline counted as committed (its commit landed, its
    /// log entry is not deleted yet): counted once, however often its ack is retried.
    counted: Option<u64>,
}

impl Buf {
    /// Rows pending or claimed but not yet committed.
    fn waiting(&self) -> usize {
        self.rows + self.claimed_rows
    }

    /// Whether anything waits for a roll (pending rows, or a claimed batch not yet committed).
    fn has_waiting(&self) -> bool {
        self.rows > 0 || self.claimed.is_some()
    }

    /// Bytes (Arrow memory size) pending or claimed but not yet committed.
    fn waiting_bytes(&self) -> usize {
        self.bytes + self.claimed_bytes
    }
}

struct Inner {
    stream: String,
    sink: Arc<dyn ArrowSink>,
    settings: PipelineSettings,
    clock: Arc<dyn Clock>,
    buf: Mutex<Buf>,
    log: Option<Mutex<Connection>>,
    /// The durable log's file, checked before each use of `log`.
    log_file: Option<crate::log::WatchedFile>,
    /// Held while the durable log is open (`<log>.<kind>.lock`).
    _log_lock: Option<std::fs::File>,
    next_id: Mutex<Option<u64>>,
    roll_lock: futures::lock::Mutex<()>,
    /// Whether a dropped roll's sink commit may still be under way (see `take_refused`).
    commits: crate::settings::CommitWatch,
    closed: AtomicBool,
    /// The live roll loops' slots, for `close` to hand a memory pipeline over at once.
    adopters: crate::settings::Adopters<ArrowPipeline>,
    /// When the last roll started (the clock's monotonic time).
    last_roll: Mutex<std::time::Duration>,
    rows_in: AtomicU64,
    rows_committed: AtomicU64,
    rolls: AtomicU64,
}

/// A claimed batch taken out of an [`ArrowPipeline`] by
/// [`take_refused`](ArrowPipeline::take_refused): never committed under its id.
#[derive(Debug, Clone)]
pub struct RefusedBatch {
    /// The batch id it was claimed under.
    pub id: u64,
    /// Its record batches, in the order they were sent.
    pub batches: Vec<RecordBatch>,
}

/// Buffers `RecordBatch`es of the sink's schema and rolls them into exactly-once appends.
///
/// Uses the [`PipelineSettings`] of the event pipeline: `roll_interval`, `roll_rows` and
/// `roll_bytes` (a roll is due at either, and once half of `capacity` or `capacity_bytes` waits;
/// each commit holds at most `roll_rows` rows and about
/// `roll_bytes` bytes, whole batches, at least one: a roll commits what waits in as many
/// commits as that takes), `capacity` (rows) and `capacity_bytes` (Arrow memory size; a full buffer fails
/// fast with a retryable `Unavailable`) and
/// `durability` (`Durable(path)`: a SQLite log of Arrow IPC batches; an acknowledged `send`
/// survives a process kill; one pipeline at a time, like the event pipeline's log).
/// `backpressure` must be `FailFast`: `Wait` and `Spill` apply to event pipelines only and are
/// `InvalidInput` here. `token` is not used (batch ids are the exactly-once key).
#[derive(Clone)]
pub struct ArrowPipeline {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ArrowPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArrowPipeline").field("stream", &self.inner.stream).field("sink", &self.inner.sink).finish()
    }
}

impl ArrowPipeline {
    /// A pipeline named `stream` (1..=128 of ASCII letters, digits, `-_.`; the name the sink
    /// records batch ids under) into `sink`. Reopens a durable log left by an earlier process.
    /// One live pipeline per stream name and table: batch ids are the exactly-once key, so two
    /// producers under one name would drop each other's batches as replays.
    pub fn open(stream: &str, sink: Arc<dyn ArrowSink>, settings: PipelineSettings) -> Result<Self> {
        Self::open_with_clock(stream, sink, settings, Arc::new(SystemClock::new()))
    }

    /// [`open`](Self::open) with the clock that times rolls (the roll interval), commit retries
    /// and the background loop's ticks and backoff, e.g. a `ManualClock` in tests.
    pub fn open_with_clock(
        stream: &str,
        sink: Arc<dyn ArrowSink>,
        settings: PipelineSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        if stream.is_empty()
            || stream.len() > 128
            || !stream.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(Error::invalid(format!("stream name {stream:?}: 1..=128 ASCII letters, digits, -_.")));
        }
        settings.validate()?;
        if settings.backpressure != crate::Backpressure::FailFast {
            return Err(Error::invalid(format!(
                "ArrowPipeline: backpressure {:?} applies to event pipelines only; use FailFast",
                settings.backpressure
            )));
        }
        let mut buf = Buf::default();
        let mut next_id = None;
        let (log, log_lock, log_file) = match &settings.durability {
            Durability::Memory => (None, None, None),
            Durability::Durable(path) => {
                let (lock, resolved) = crate::log::lock_log(path, "arrow")?;
                let c = Self::open_log(&resolved, stream, &mut buf)?;
                next_id = Self::next_id_floor(&c, &resolved)?;
                // (The lock's identity is read from the locked handle: the path may have changed
                // while the log was read.)
                let watch = crate::log::WatchedFile::new(&resolved, "arrow", &lock);
                (Some(Mutex::new(c)), Some(lock), Some(watch))
            }
        };
        let now = clock.monotonic();
        Ok(ArrowPipeline {
            inner: Arc::new(Inner {
                stream: stream.to_string(),
                sink,
                settings,
                clock,
                buf: Mutex::new(buf),
                log,
                log_file,
                _log_lock: log_lock,
                next_id: Mutex::new(next_id),
                roll_lock: futures::lock::Mutex::new(()),
                commits: Default::default(),
                closed: AtomicBool::new(false),
                adopters: Default::default(),
                last_roll: Mutex::new(now),
                rows_in: AtomicU64::new(0),
                rows_committed: AtomicU64::new(0),
                rolls: AtomicU64::new(0),
            }),
        })
    }

    fn open_log(path: &Path, stream: &str, buf: &mut Buf) -> Result<Connection> {
        let doing = format!("opening {}", path.display());
        let c = crate::log::open_connection(path).map_err(|e| sql(e, &doing))?;
        crate::log::wal_mode(&c, &doing)?;
        c.execute_batch(
            "PRAGMA synchronous = NORMAL; PRAGMA journal_size_limit = 67108864;
             CREATE TABLE IF NOT EXISTS arrow_log (id INTEGER PRIMARY KEY, ipc BLOB NOT NULL, batch INTEGER);
             CREATE TABLE IF NOT EXISTS arrow_log_meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);",
        )
        .map_err(|e| sql(e, &doing))?;
        // The log's claimed batch ids are the stream's: opened for another stream, a claim that
        // landed would be committed again under that stream's marks, or one that did not would
        // be dropped as a replay. The first stream to open a log owns it.
        c.execute("INSERT OR IGNORE INTO arrow_log_meta (k, v) VALUES ('stream', ?1)", [stream])
            .map_err(|e| sql(e, &doing))?;
        let owner: String = c
            .query_row("SELECT v FROM arrow_log_meta WHERE k = 'stream'", [], |r| r.get(0))
            .map_err(|e| sql(e, &doing))?;
        if owner != stream {
            return Err(Error::invalid(format!(
                "{}: this durable log belongs to stream {owner:?}, not {stream:?} (its claimed batch ids are that \
                 stream's); give each stream its own log",
                path.display()
            )));
        }
        let rows: Vec<(i64, Vec<u8>, Option<u64>)> = c
            .prepare("SELECT id, ipc, batch FROM arrow_log ORDER BY id")
            .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect())
            .map_err(|e| sql(e, &doing))?;
        // Claimed rows stay grouped by their id: each id is committed (or found committed) on
        // its own, so rows of a later claim are never committed under an earlier id and then
        // again under their own.
        let mut claims: std::collections::BTreeMap<u64, Vec<RecordBatch>> = Default::default();
        for (row, ipc, batch) in rows {
            let batches = decode(&ipc).map_err(|e| e.context(format!("{}: arrow_log row {row}", path.display())))?;
            // Every row is one batch, as `send` logs them (a claim marks rows, it does not merge
            // them): a row of no batch (its bytes cut after the schema, or a zeroed length word,
            // which IPC reads as the end of the stream) is damage. Taken as empty, a claimed one
            // was committed as nothing and its log rows deleted. (A batch of no rows is not:
            // earlier versions logged them.)
            if batches.len() != 1 {
                return Err(Error::corrupt(format!(
                    "{}: arrow_log row {row} holds {} batches (a send logs one)",
                    path.display(),
                    batches.len()
                )));
            }
            match batch {
                // No claim takes id 0 (batch ids start at 1): read as committed, the rows were
                // dropped by a sink that answers replays with 0 rows, or refused at every roll.
                Some(0) => {
                    return Err(Error::corrupt(format!(
                        "{}: arrow_log row {row} is claimed under batch id 0, which no claim takes",
                        path.display()
                    )));
                }
                Some(id) => {
                    buf.claimed_rows += batches.iter().map(RecordBatch::num_rows).sum::<usize>();
                    buf.claimed_bytes += batches.iter().map(batch_bytes).sum::<usize>();
                    claims.entry(id).or_default().extend(batches);
                }
                None => {
                    for b in batches {
                        buf.rows += b.num_rows();
                        buf.bytes += batch_bytes(&b);
                        buf.pending.push(b);
                    }
                }
            }
        }
        buf.from_earlier = claims.keys().copied().collect();
        buf.inherited = buf.from_earlier.clone();
        let mut claims = claims.into_iter();
        buf.claimed = claims.next();
        buf.later_claims = claims.collect();
        Ok(c)
    }

    /// The lowest batch id the log's next claim may take: above every id a batch was taken out
    /// under ([`take_refused`](Self::take_refused)), recorded so that no later pipeline on the
    /// log claims such an id again (`None` if none was).
    fn next_id_floor(c: &Connection, path: &Path) -> Result<Option<u64>> {
        let doing = format!("opening {}", path.display());
        let v: Option<String> = c
            .query_row("SELECT v FROM arrow_log_meta WHERE k = 'next_id'", [], |r| r.get(0))
            .optional()
            .map_err(|e| sql(e, &doing))?;
        v.map(|v| {
            // Batch ids are stream marks, at most `MAX_BATCH_ID` (and bound as `i64` in the log):
            // the floor is one above the last id claimed, so at most one above that (every id
            // used: claims are then `LimitExceeded`); a floor above it is damage.
            v.parse::<u64>().ok().filter(|&n| n > 0 && n <= MAX_BATCH_ID + 1).ok_or_else(|| {
                Error::corrupt(format!("{}: arrow_log_meta next_id {v:?} is not a batch id", path.display()))
            })
        })
        .transpose()
    }

    /// Take the claimed batch out of the pipeline (the one every roll commits first), so that
    /// the batches behind it go on: the way out of a batch the sink refuses for good (a table
    /// whose schema another engine changed, a user sink's refusal), which otherwise stops the
    /// pipeline for good. The sink is asked first: a batch it has committed (an attempt whose
    /// reply was lost) is acknowledged as a roll would, and so is `None` returned, as when no
    /// claimed batch waits. Otherwise the batch leaves the pipeline (and its durable log) and is
    /// the caller's: store it, fix it, send it again. Its id is not claimed again, by this
    /// pipeline nor (with a durable log) by the next one on the log (an older dotdo version
    /// reopening the log ignores that). Waits for a roll in progress. `None` may also mean the
    /// head batch was found committed while others are claimed behind it: call again until
    /// the refused one comes out, then `roll` (the background loop keeps its backoff from the
    /// failed rolls). Rows taken out are not counted as committed. A retryable `Conflict` if a
    /// roll was dropped (by its caller) while the sink committed the batch, or an attempt of the
    /// commit had an unknown outcome (also when later attempts failed otherwise): that commit
    /// may still land, and the batch is not handed out until
    /// a roll settles it (call `roll`, then again). Likewise for a batch an earlier process
    /// claimed, until the sink has answered a roll of this process. A later roll's refusal for
    /// good settles it: with the SQL catalog an earlier request can no longer land then (its
    /// pointer swap names the exact metadata it was built on), but a REST catalog checks only the
    /// table and its head snapshot, and an earlier request still queued there may land after, say,
    /// another engine's schema change refused the later one (its rows then land beside the
    /// caller's re-send). With nothing claimed and the sink refusing this pipeline's schema
    /// ([`ArrowSink::refuses_shape`]), the sink is asked again (its table's schema may have been
    /// put back): its error then (say, a catalog out of reach) is this call's.
    pub async fn take_refused(&self) -> Result<Option<RefusedBatch>> {
        let inner = &self.inner;
        let _g = inner.roll_lock.lock().await;
        let claimed = inner.buf.lock().claimed.clone();
        let Some((id, batches)) = claimed else {
            // Nothing claimed: a sink refusing this schema is asked again (its table's schema
            // may have been put back), so that `send` takes batches once it would commit them.
            if inner.sink.refuses_shape().is_some() {
                inner.sink.last_batch(&inner.stream).await?;
            }
            return Ok(None);
        };
        inner.commits.refuse_if_open(id)?;
        if inner.buf.lock().inherited.contains(&id) {
            inner.commits.refuse_if_inherited_unanswered(id, std::iter::once(""))?;
        }
        if inner.sink.last_batch(&inner.stream).await? >= id {
            // Committed: by this pipeline (its reply lost: count it) or an earlier one (not).
            let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
            let mut b = inner.buf.lock();
            if !b.from_earlier.contains(&id) && b.counted.replace(id) != Some(id) {
                inner.rows_committed.fetch_add(rows, Ordering::Relaxed);
            }
            drop(b);
            self.finish_claim(id, None)?;
            return Ok(None);
        }
        self.finish_claim(id, Some(id.saturating_add(1)))?;
        Ok(Some(RefusedBatch { id, batches }))
    }

    /// `Corrupt` once the durable log's file is not the one opened (deleted or replaced: SQLite
    /// goes on writing to the unlinked file, and what it acknowledges is lost at exit).
    fn log_file_check(&self, doing: &str) -> Result<()> {
        self.inner.log_file.as_ref().map_or(Ok(()), |f| f.check(doing))
    }

    /// The claimed batch `id` is done (committed, or taken out): its log rows go (with a durable
    /// `floor` for the next id, for a batch taken out), and the next claim left by an earlier
    /// process becomes the claimed one.
    fn finish_claim(&self, id: u64, floor: Option<u64>) -> Result<()> {
        let inner = &self.inner;
        if let Some(log) = &inner.log {
            self.log_file_check("ack")?;
            let ack = |c: &mut Connection| -> Result<()> {
                let tx = c.transaction().map_err(|e| sql(e, "ack"))?;
                tx.execute("DELETE FROM arrow_log WHERE batch = ?1", params![id]).map_err(|e| sql(e, "ack"))?;
                if let Some(floor) = floor {
                    tx.execute(
                        "INSERT OR REPLACE INTO arrow_log_meta (k, v) VALUES ('next_id', ?1)",
                        [floor.to_string()],
                    )
                    .map_err(|e| sql(e, "ack"))?;
                }
                // (Dropped uncommitted, the transaction rolls back.)
                #[cfg(test)]
                if crate::log::tests::FAIL_ACK_AT_COMMIT.with(|f| f.replace(false)) {
                    return Err(crate::log::commit_error(crate::log::tests::io_error_at_commit(), "arrow_log ack"));
                }
                tx.commit().map_err(|e| crate::log::commit_error(e, "arrow_log ack"))
            };
            let mut c = log.lock();
            // An I/O error at the COMMIT is settled by running the ack again (see `settle_ack`).
            crate::log::settle_ack(|| {
                crate::log::retry_busy(|| match floor {
                    // A batch handed to the caller leaves the log for good, also across a power
                    // loss: come back, it could be committed beside the caller's own re-send.
                    Some(_) => crate::log::fully_synced(&mut c, ack),
                    None => ack(&mut c),
                })
            })?;
        }
        let mut b = inner.buf.lock();
        b.counted = None;
        b.from_earlier.remove(&id);
        b.inherited.remove(&id);
        if let Some((_, done)) = b.claimed.take() {
            let (rows, bytes) = done.iter().fold((0, 0), |(r, by), x| (r + x.num_rows(), by + batch_bytes(x)));
            b.claimed_rows = b.claimed_rows.saturating_sub(rows);
            b.claimed_bytes = b.claimed_bytes.saturating_sub(bytes);
        }
        b.claimed = b.later_claims.pop_front();
        drop(b);
        let mut next = inner.next_id.lock();
        *next = Some(next.unwrap_or(0).max(id.saturating_add(1)));
        Ok(())
    }

    /// Accept `batch` (it must have the sink's schema). With a durable log, `Ok` means it
    /// survives a process kill. A full buffer fails with a retryable `Unavailable`; a batch of
    /// more rows than `capacity` or more bytes than `capacity_bytes` with `LimitExceeded`; after
    /// [`close`](Self::close), `Shutdown`; once the sink says it refuses this schema for good
    /// ([`ArrowSink::refuses_shape`]: a roll found the table's schema changed under it),
    /// `InvalidInput`. A durable log's I/O error at the send's commit is
    /// `AmbiguousOutcome`: the batch may be in the log. If it is, the pipeline's rolls fail with
    /// `Corrupt` (its log holds a row it does not count as pending) until it is reopened, which
    /// delivers whatever the log holds: reopen the pipeline after such an error.
    pub fn send(&self, batch: RecordBatch) -> Result<()> {
        let inner = &self.inner;
        if !dotdo_core::arrow_shape::same_shape(batch.schema_ref(), &inner.sink.schema()) {
            return Err(Error::invalid(format!(
                "batch schema {:?} is not the sink's {:?}",
                batch.schema(),
                inner.sink.schema()
            )));
        }
        // A batch the table would refuse for good, caught before it is logged (a roll could
        // never commit it, and the batches behind it would wait).
        dotdo_core::arrow_shape::check_values(&batch)?;
        // Likewise every batch of this schema once the sink's table changed under it (another
        // engine dropped a column, say): accepted, they filled the buffer, and then every send
        // was a retryable `Unavailable` for ever.
        if let Some(why) = inner.sink.refuses_shape() {
            return Err(Error::invalid(format!(
                "the sink refuses batches of this pipeline's schema for good ({why}): open the table and the \
                 pipeline again with the table's schema; take_refused hands out the batches waiting"
            )));
        }
        if batch.num_rows() == 0 {
            // Nothing to deliver. Buffered (and logged), each empty batch would hold memory and a
            // log row that no capacity counts and no roll is ever due for.
            if inner.closed.load(Ordering::Acquire) {
                return Err(Error::new(ErrorKind::Shutdown, "the pipeline is closed"));
            }
            return Ok(());
        }
        let (capacity, capacity_bytes) = (inner.settings.capacity, inner.settings.capacity_bytes);
        let size = batch_bytes(&batch);
        // No roll ever makes room for these: not a retryable condition.
        if batch.num_rows() > capacity {
            return Err(Error::limit("rows in one batch", capacity as u64, batch.num_rows() as u64));
        }
        if size > capacity_bytes {
            return Err(Error::limit("bytes in one batch", capacity_bytes as u64, size as u64));
        }
        let ipc = inner.log.as_ref().map(|_| encode(&batch)).transpose()?;
        // Everything below happens under one hold of `buf` (lock order: buf, then log, as in
        // `roll`): `close` sets the flag under the same lock, so a send that gets `Ok` is pending
        // before close's roll looks; the capacity check and the push cannot interleave with
        // another send; and a roll's claim can never mark a logged row that is not yet pending
        // (which it would then delete without having committed it).
        let mut b = inner.buf.lock();
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::new(ErrorKind::Shutdown, "the pipeline is closed"));
        }
        let (waiting, waiting_bytes) = (b.waiting(), b.waiting_bytes());
        if waiting + batch.num_rows() > capacity || waiting_bytes.saturating_add(size) > capacity_bytes {
            return Err(Error::unavailable(format!(
                "arrow pipeline buffer full: {waiting} rows ({waiting_bytes} bytes) waiting, capacity {capacity} rows \
                 ({capacity_bytes} bytes)"
            )));
        }
        if let (Some(log), Some(ipc)) = (&inner.log, ipc) {
            self.log_file_check("append")?;
            // An autocommit insert: an I/O error may come from its COMMIT, after which the row
            // may be durable. `AmbiguousOutcome` (a re-send could deliver the batch twice); the
            // next roll then finds the log out of step with what is pending and asks for a
            // reopen, which delivers such a row once.
            // Run again while starved by a busy shared file (a busy insert applied nothing).
            let log = log.lock();
            crate::log::retry_busy(|| {
                log.execute("INSERT INTO arrow_log (ipc) VALUES (?1)", [&ipc])
                    .map_err(|e| crate::log::commit_error(e, "append"))
            })?;
        }
        b.rows += batch.num_rows();
        b.bytes += size;
        inner.rows_in.fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
        b.pending.push(batch);
        Ok(())
    }

    /// How long until the roll interval, counted from the last roll's start, ends (zero once it
    /// has).
    fn interval_left(&self) -> std::time::Duration {
        self.inner.settings.interval_left(&*self.inner.clock, *self.inner.last_roll.lock())
    }

    /// Whether a roll is due (interval elapsed with rows waiting, a row/byte threshold hit, or
    /// the buffer half full by rows or bytes: with thresholds above the capacity, senders were
    /// refused as "full" until the interval passed).
    pub fn roll_due(&self) -> bool {
        let inner = &self.inner;
        let b = inner.buf.lock();
        b.has_waiting()
            && (b.rows >= inner.settings.roll_rows
                || b.bytes >= inner.settings.roll_bytes
                || inner.settings.half_full(b.waiting(), b.waiting_bytes())
                || b.claimed.is_some()
                || self.interval_left().is_zero())
    }

    /// Roll now: commit a claimed batch left by an earlier attempt or process, then everything
    /// waiting, as the next batch id. Returns the rows this roll made durable in the sink.
    pub async fn roll(&self) -> Result<u64> {
        self.roll_in(false).await
    }

    /// [`roll`](Self::roll); a roll of the background loop (`background`) does nothing once the
    /// pipeline is closed with nothing waiting; what a failed `close` left is its to roll.
    async fn roll_in(&self, background: bool) -> Result<u64> {
        let inner = &self.inner;
        let _g = inner.roll_lock.lock().await;
        if background && inner.closed.load(Ordering::Acquire) && !inner.buf.lock().has_waiting() {
            return Ok(0);
        }
        let started = inner.clock.monotonic();
        let mut written = 0;
        let result = self.roll_batches(&mut written).await;
        // A roll that committed rows counts, also when a later batch of it failed.
        inner.rolls.fetch_add(u64::from(written > 0), Ordering::Relaxed);
        result?;
        *inner.last_roll.lock() = started;
        Ok(written)
    }

    /// The batches of one roll (see [`roll`](Self::roll)), their rows counted into `written` as
    /// they land.
    async fn roll_batches(&self, written: &mut u64) -> Result<()> {
        let inner = &self.inner;
        // Commit what is waiting now (claims left over, then the batches pending at the start,
        // at most `roll_rows` rows and about `roll_bytes` bytes per commit), not the tail that
        // keeps arriving during the roll.
        let mut to_claim = inner.buf.lock().pending.len();
        loop {
            let claimed = inner.buf.lock().claimed.clone();
            let (id, batches) = match claimed {
                Some(c) => c,
                None => {
                    if to_claim == 0 || inner.buf.lock().pending.is_empty() {
                        break;
                    }
                    let last = inner.sink.last_batch(&inner.stream).await?;
                    let id = {
                        let mut next = inner.next_id.lock();
                        let id = next.unwrap_or(0).max(last.saturating_add(1));
                        // Batch ids are stream marks, at most `i64::MAX` (bound as `i64` in a
                        // durable log: a larger one failed every claim as a backend error).
                        if id > MAX_BATCH_ID {
                            return Err(Error::limit("batch id", MAX_BATCH_ID, id).context(format!(
                                "stream {:?} has used every batch id; its batches stay pending",
                                inner.stream
                            )));
                        }
                        *next = Some(id.saturating_add(1));
                        id
                    };
                    let mut b = inner.buf.lock();
                    // The first pending batches, at least one, within the roll's bounds.
                    let (mut n, mut rows, mut bytes) = (0, 0usize, 0usize);
                    for batch in b.pending.iter().take(to_claim) {
                        let (r, by) = (batch.num_rows(), batch_bytes(batch));
                        if n > 0
                            && (rows.saturating_add(r) > inner.settings.roll_rows
                                || bytes.saturating_add(by) > inner.settings.roll_bytes)
                        {
                            break;
                        }
                        (n, rows, bytes) = (n + 1, rows.saturating_add(r), bytes.saturating_add(by));
                    }
                    if let Some(log) = &inner.log {
                        // Claim durably before committing: a restart re-commits the same id.
                        // Before `pending` is taken, so a failed claim leaves everything in place.
                        // The log's unclaimed rows are the pending batches, in the same order.
                        let pending = b.pending.len();
                        self.log_file_check("claim")?;
                        let mut c = log.lock();
                        crate::log::retry_busy(|| {
                            crate::log::fully_synced(&mut c, |c| {
                                // Immediate, as the event log's claim (it reads before it writes).
                                let tx = c
                                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                                    .map_err(|e| sql(e, "claim"))?;
                                let unclaimed: i64 = tx
                                    .query_row("SELECT count(*) FROM arrow_log WHERE batch IS NULL", [], |r| r.get(0))
                                    .map_err(|e| sql(e, "claim"))?;
                                if usize::try_from(unclaimed).ok() != Some(pending) {
                                    // A send whose outcome was unknown left a row that is not pending
                                    // (or the file was changed): claiming by position would commit
                                    // the wrong rows under this id. A reopen reads the log afresh.
                                    return Err(Error::corrupt(format!(
                                        "arrow pipeline log: {unclaimed} unclaimed rows but {pending} batches \
                                     pending; reopen the pipeline (it delivers what the log holds)"
                                    )));
                                }
                                // Exactly `n` rows: as many are unclaimed as pending (checked above).
                                tx.execute(
                                    "UPDATE arrow_log SET batch = ?1 WHERE id IN \
                                 (SELECT id FROM arrow_log WHERE batch IS NULL ORDER BY id LIMIT ?2)",
                                    params![id, n as i64],
                                )
                                .map_err(|e| sql(e, "claim"))?;
                                tx.commit().map_err(|e| sql(e, "claim"))
                            })
                        })?;
                    }
                    let batches: Vec<RecordBatch> = b.pending.drain(..n).collect();
                    to_claim -= n;
                    b.rows = b.rows.saturating_sub(rows);
                    b.bytes = b.bytes.saturating_sub(bytes);
                    b.claimed_rows = rows;
                    b.claimed_bytes = bytes;
                    b.claimed = Some((id, batches.clone()));
                    (id, batches)
                }
            };
            let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
            // A batch an earlier pipeline claimed: committed by it already if the sink's mark
            // covers it (then it counts nothing here); otherwise it is this pipeline's to count,
            // also if an attempt of this one lands with its reply lost.
            if inner.buf.lock().from_earlier.contains(&id) {
                let committed_before = inner.sink.last_batch(&inner.stream).await? >= id;
                let mut b = inner.buf.lock();
                b.from_earlier.remove(&id);
                if committed_before {
                    b.counted = Some(id);
                }
            }
            // `Ok` means the batch is in the table exactly once, whether this call or an earlier
            // attempt whose reply was lost wrote it.
            self.append_resolving(id, batches).await?;
            // Counted as it lands (a later commit of this roll may still fail), once.
            let add = if inner.buf.lock().counted.replace(id) == Some(id) { 0 } else { rows };
            *written += add;
            inner.rows_committed.fetch_add(add, Ordering::Relaxed);
            self.finish_claim(id, None)?;
        }
        Ok(())
    }

    async fn append_resolving(&self, id: u64, batches: Vec<RecordBatch>) -> Result<u64> {
        let inner = &self.inner;
        inner.commits.start("");
        let (out, unknown) =
            crate::settings::retry(&*inner.clock, || inner.sink.append(&inner.stream, id, batches.clone())).await;
        // Not reached if this roll is dropped while the sink commits.
        inner.commits.end("", &out, unknown);
        out
    }

    /// Roll whenever due until [`close`](Self::close) (spawn it on the host's executor). A failed
    /// roll is tried again after a pause that doubles with each failure in a row, up to
    /// [`MAX_ROLL_BACKOFF`](crate::MAX_ROLL_BACKOFF), as [`Pipeline::run`](crate::Pipeline::run) does.
    /// Like the event pipeline's, it ends once every handle is dropped (a memory pipeline closed
    /// with batches waiting is held until they are committed or refused for good), and after `close` once
    /// nothing waits (what a failed or dropped `close` left, it keeps rolling) or once a roll is
    /// refused for good (not retryable, not an unknown outcome): what waits then stays pending,
    /// for [`take_refused`](Self::take_refused) or a `roll` once the cause is mended.
    pub fn run(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let weak = Arc::downgrade(&self.inner);
        let (clock, tick) = (self.inner.clock.clone(), self.inner.settings.tick());
        crate::settings::run_rolls(
            clock,
            tick,
            self.inner.adopters.register(),
            move || weak.upgrade().map(|inner| ArrowPipeline { inner }),
            |p: &ArrowPipeline| p.inner.closed.load(Ordering::Acquire),
            |p: &ArrowPipeline| p.inner.settings.holds_in_memory(),
            |p: &ArrowPipeline| p.inner.buf.lock().has_waiting(),
            |p: &ArrowPipeline| p.roll_due(),
            |p: &ArrowPipeline| p.interval_left(),
            |p: ArrowPipeline| async move { p.roll_in(true).await },
        )
    }

    /// Stop accepting batches and roll what is waiting. If that roll fails (or this call is
    /// dropped), what waits stays pending: the background loop ([`run`](Self::run)) keeps
    /// rolling it until it is committed or a roll is refused for good (see `run`), and `close`
    /// (or `roll`) may be called again.
    pub async fn close(&self) -> Result<u64> {
        {
            // Under `buf`, as `send` checks it: every send that got `Ok` is pending now.
            let _b = self.inner.buf.lock();
            self.inner.closed.store(true, Ordering::Release);
        }
        if self.inner.settings.holds_in_memory() {
            // What waits in memory is the roll loops' from now on, whatever the host does with
            // its handles once this returns.
            self.inner.adopters.hand_over(self);
        }
        self.roll().await
    }

    /// (rows accepted, rows committed, rolls, rows waiting).
    pub fn counters(&self) -> (u64, u64, u64, u64) {
        let i = &self.inner;
        let b = i.buf.lock();
        let waiting = b.waiting();
        (
            i.rows_in.load(Ordering::Relaxed),
            i.rows_committed.load(Ordering::Relaxed),
            i.rolls.load(Ordering::Relaxed),
            waiting as u64,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema, SchemaRef};
    use async_trait::async_trait;
    use dotdo_core::{Error, Result};

    use super::{ArrowPipeline, ArrowSink};
    use crate::{Durability, PipelineSettings};

    /// A sink that refuses every batch for good.
    #[derive(Debug)]
    struct Refusing(SchemaRef);

    #[async_trait]
    impl ArrowSink for Refusing {
        fn schema(&self) -> SchemaRef {
            self.0.clone()
        }
        async fn last_batch(&self, _stream: &str) -> Result<u64> {
            Ok(0)
        }
        async fn append(&self, _stream: &str, _id: u64, _batches: Vec<RecordBatch>) -> Result<u64> {
            Err(Error::invalid("the sink refuses this batch for good (test)"))
        }
    }

    /// `take_refused` whose removal of the batch from a durable log fails with an I/O error at
    /// its COMMIT (rolled back in this process, but WAL recovery after a crash might apply it)
    /// runs the removal again, which settles it: the batch is handed out once, and gone from the
    /// log. (It failed, leaving the caller to guess whether a crash would remove it.)
    #[tokio::test]
    async fn a_refused_batch_comes_out_when_its_removal_has_an_unknown_outcome() {
        let dir = tempfile::tempdir().expect("tempdir");
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let sink = Arc::new(Refusing(schema.clone()));
        let settings =
            PipelineSettings { durability: Durability::Durable(dir.path().join("log.db")), ..Default::default() };
        let p = ArrowPipeline::open("s", sink.clone(), settings.clone()).expect("pipeline");
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1, 2]))]).expect("batch");
        p.send(batch).expect("send");
        p.roll().await.expect_err("refused for good");
        crate::log::tests::FAIL_ACK_AT_COMMIT.with(|f| f.set(true));
        let taken = p.take_refused().await.expect("handed out").expect("the batch");
        assert!(!crate::log::tests::FAIL_ACK_AT_COMMIT.with(|f| f.get()), "the fault fired");
        assert_eq!(taken.batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 2);
        drop(p);
        let p = ArrowPipeline::open("s", sink, settings).expect("reopened");
        assert_eq!(p.counters().3, 0, "the removal landed");
        assert!(p.take_refused().await.expect("nothing claimed").is_none());
    }
}
