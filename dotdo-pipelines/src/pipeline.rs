//! [`Pipeline`]: `send` into a bounded buffer, roll into batched, exactly-once cold commits.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dotdo_core::time::Stopwatch;
use dotdo_core::{ChangeRecord, Clock};
use dotdo_core::{ColdBatch, ColdSink, Error, ErrorKind, ObjectChanges, ObjectId, Result, SystemClock, Timestamp};
use parking_lot::Mutex;

use crate::event::{Event, Transformed};
use crate::log::{Log, MemoryLog, NamedLog, Row, SpillLog, SqliteLog};
use crate::settings::{Backpressure, Durability, PipelineSettings};

/// The longest pause [`Pipeline::run`] makes between failed rolls in a row.
pub const MAX_ROLL_BACKOFF: Duration = Duration::from_secs(30);

/// A transform applied to every event at `send`: filter, map or re-route.
pub type Transform = Arc<dyn Fn(Event) -> Transformed + Send + Sync>;

/// Counters of a pipeline (monotonic) and its current depth.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct PipelineMetrics {
    /// Events accepted by `send`. A durable `send` answered `AmbiguousOutcome` (its COMMIT
    /// failed with an I/O error) is not counted, though its events may be in the log and then
    /// delivered (and counted in `events_committed`): a backlog computed as `events_in -
    /// events_committed` can go below zero.
    pub events_in: u64,
    /// Events dropped by the transform.
    pub events_dropped: u64,
    /// Bytes accepted.
    pub bytes_in: u64,
    /// Sends refused: the buffer full (backpressure: at once with `FailFast`, past the deadline
    /// with `Wait`), a send over the buffer's capacity, or the durable log busy or failing.
    pub rejected: u64,
    /// Rolls that committed at least one event.
    pub rolls: u64,
    /// Events committed to cold storage (each once, also when an attempt's answer was lost or
    /// its roll dropped after the commit landed).
    pub events_committed: u64,
    /// Events skipped at commit because cold storage already had them from an earlier pipeline
    /// on the same log (replays after a crash or a restart).
    pub events_replayed: u64,
    /// Latency of the last claimed batch's cold commits (a roll commits one per claimed batch
    /// and route): from just after the claim to the log's acknowledgement of the batch.
    pub last_commit_latency: Duration,
    /// Events waiting now (claimed ones included).
    pub buffer_depth: u64,
    /// Bytes waiting now.
    pub buffer_bytes: u64,
    /// Events waiting in the spill file now (spill policy).
    pub buffer_spilled: u64,
    /// End-to-end lag of the last committed batch: its commit time minus its oldest event's
    /// timestamp.
    pub last_lag: Duration,
}

/// What one roll did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RollReport {
    /// Cold commits made (one per claimed batch per route touched; a roll claims at most
    /// `roll_rows` events and about `roll_bytes` bytes at a time), counted as [`events`](Self::events)
    /// are.
    pub commits: u64,
    /// Events committed by this roll (also those an earlier attempt of this process landed, its
    /// answer lost or its roll dropped, and not counted then).
    pub events: u64,
    /// Events already in cold storage from an earlier pipeline on the same log (a replay after a
    /// crash or a restart). Of a batch an earlier pipeline claimed, every event the sink holds
    /// already counts here, also one an attempt of this roll landed with its answer lost (the
    /// sink's answer cannot tell them apart).
    pub replayed: u64,
}

/// Builds a [`Pipeline`].
pub struct PipelineBuilder {
    sink: Arc<dyn ColdSink>,
    routes: HashMap<String, Arc<dyn ColdSink>>,
    settings: PipelineSettings,
    transform: Option<Transform>,
    clock: Option<Arc<dyn Clock>>,
}

impl std::fmt::Debug for PipelineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineBuilder")
            .field("sink", &self.sink)
            .field("routes", &self.routes)
            .field("settings", &self.settings)
            .field("transform", &self.transform.is_some())
            .field("clock", &self.clock)
            .finish()
    }
}

impl PipelineBuilder {
    /// Settings (default: [`PipelineSettings::default`]).
    pub fn with_settings(mut self, settings: PipelineSettings) -> Self {
        self.settings = settings;
        self
    }
    /// A transform run on every event at `send` (filter, map, re-route).
    pub fn with_transform(mut self, t: impl Fn(Event) -> Transformed + Send + Sync + 'static) -> Self {
        self.transform = Some(Arc::new(t));
        self
    }
    /// A named route to another sink (another table), for [`Transformed::Route`]. Each route
    /// needs its own table: `build` refuses two routes given the same sink handle (handles
    /// opened separately on one table are not detected; don't).
    ///
    /// Routes roll together: a claimed batch is committed to each route it touches in turn and
    /// acknowledged once all have it, so a route whose sink keeps failing holds back every
    /// route (the log keeps the events; once the sink answers again, the routes that already
    /// committed the batch answer its retry as a replay). Give a sink that may be down for long
    /// a pipeline of its own.
    pub fn with_route(mut self, name: impl Into<String>, sink: Arc<dyn ColdSink>) -> Self {
        self.routes.insert(name.into(), sink);
        self
    }
    /// The clock (default: system clock).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Validate and open the buffer (replaying a durable log left by a previous process).
    pub fn build(self) -> Result<Pipeline> {
        let s = &self.settings;
        s.validate()?;
        if self.routes.contains_key("") {
            return Err(Error::invalid("the empty route name is the default route"));
        }
        if s.token == dotdo_core::FencingToken::NONE {
            return Err(Error::invalid("the pipeline's committer token must not be FencingToken::NONE"));
        }
        // A token above the limit would be accepted by `send` and refused by every commit.
        s.token.validate()?;
        let log: Box<dyn Log> = match (&s.durability, &s.backpressure) {
            (Durability::Durable(path), _) => {
                let log = SqliteLog::open(path)?;
                let file = log.file().to_path_buf();
                let watch = crate::log::WatchedFile::new(&file, "pipeline", log.lock_file());
                Box::new(NamedLog::watched(log, path, watch))
            }
            (Durability::Memory, Backpressure::Spill(path)) => {
                Box::new(NamedLog::new(SpillLog::open(path, s.capacity, s.capacity_bytes)?, path))
            }
            (Durability::Memory, _) => Box::new(MemoryLog::default()),
        };
        let mut routes = self.routes;
        routes.insert(String::new(), self.sink);
        // Events an earlier process left for a route this build does not have could never be
        // rolled, and every roll would stop at them.
        if let Some(r) = log.routes()?.into_iter().find(|r| !routes.contains_key(r)) {
            return Err(Error::invalid(format!(
                "the pipeline's log holds events for route {r:?}, which this pipeline does not register; \
                 add it with `with_route`"
            )));
        }
        // Sequence numbers are per (route, object) but a sink's watermark is per object: two
        // routes into one sink would number an object's events alike, and the second commit's
        // would be skipped as replays.
        let mut sinks: Vec<(*const (), &str)> =
            routes.iter().map(|(name, s)| (Arc::as_ptr(s) as *const (), name.as_str())).collect();
        sinks.sort_unstable();
        if let Some(w) = sinks.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Error::invalid(format!(
                "routes {:?} and {:?} share one sink; each route needs its own table",
                w[0].1, w[1].1
            )));
        }
        // A batch an earlier process claimed is due at once (see `roll_due`), as the Arrow
        // pipeline's is. One that cannot be read (damaged, a busy file) does not keep the
        // pipeline from opening: it is due too, and the first roll reads it again (and reports
        // what it finds).
        let inherited = match log.claimed(self.settings.token) {
            Ok(claimed) => claimed.map(|c| OwnClaim { id: c.id, counted: Default::default(), inherited: true }),
            Err(e) => {
                tracing::warn!(error = %e, "dotdo pipeline: the batch claimed by an earlier process could not be read");
                // (An id no claim is matched against: the roll's read replaces it.)
                Some(OwnClaim { id: u64::MAX, counted: Default::default(), inherited: true })
            }
        };
        let clock = self.clock.unwrap_or_else(|| Arc::new(SystemClock::new()));
        let now = clock.monotonic();
        Ok(Pipeline {
            inner: Arc::new(Inner {
                settings: self.settings,
                log,
                routes,
                transform: self.transform,
                clock,
                next_seq: Mutex::new(SeqCounters::default()),
                own_claim: Mutex::new(inherited),
                roll_lock: futures::lock::Mutex::new(()),
                commits: Default::default(),
                send_gate: Mutex::new(()),
                closed: AtomicBool::new(false),
                adopters: Default::default(),
                last_roll: Mutex::new(now),
                counters: Counters::default(),
                last: Mutex::new((Duration::ZERO, Duration::ZERO)),
            }),
        })
    }
}

#[derive(Default)]
struct Counters {
    events_in: AtomicU64,
    dropped: AtomicU64,
    bytes_in: AtomicU64,
    rejected: AtomicU64,
    rolls: AtomicU64,
    committed: AtomicU64,
    replayed: AtomicU64,
}

struct Inner {
    settings: PipelineSettings,
    log: Box<dyn Log>,
    routes: HashMap<String, Arc<dyn ColdSink>>,
    transform: Option<Transform>,
    clock: Arc<dyn Clock>,
    /// Next sequence number per (route, object), learned from the sink's watermark and advanced
    /// by claims. The pipeline owns these objects' sequence numbers.
    next_seq: Mutex<SeqCounters>,
    /// The claimed batch this process is committing and has not acknowledged yet, with the
    /// routes whose commit of it is counted already (see [`OwnClaim`]).
    own_claim: Mutex<Option<OwnClaim>>,
    roll_lock: futures::lock::Mutex<()>,
    /// Whether a dropped roll's sink commit may still be under way (see `take_refused`).
    commits: crate::settings::CommitWatch,
    /// Held by `send` from its closed and capacity checks through the append, and by `close`
    /// while it sets `closed`: a send that gets `Ok` is in the log before close's roll reads the
    /// depth, and two sends cannot both pass the capacity check on the same room.
    send_gate: Mutex<()>,
    closed: AtomicBool,
    /// The live roll loops' slots, for `close` to hand a memory pipeline over at once.
    adopters: crate::settings::Adopters<Pipeline>,
    /// When the last roll started (the clock's monotonic time).
    last_roll: Mutex<Duration>,
    counters: Counters,
    /// (last commit latency, last lag)
    last: Mutex<(Duration, Duration)>,
}

/// The batched streaming write path: cheap `send`, rolls by time / rows / bytes (and once the
/// buffer is half full) into one cold
/// commit per claimed batch and route, exactly once across crashes and retries.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> dotdo_core::Result<()> {
/// use std::sync::Arc;
/// use dotdo_core::{AsOf, ColdSink, MemoryColdStore, ObjectId, SystemClock, Clock};
/// use dotdo_pipelines::{Event, Pipeline};
///
/// let cold = MemoryColdStore::new();
/// let p = Pipeline::builder(Arc::new(cold.clone())).build()?;
/// let obj = ObjectId::new("user:1")?;
/// let now = SystemClock::new().now();
/// p.send(vec![Event::new(obj.clone(), "User", "profile", r#"{"name":"Ada"}"#, now)])?;
/// let r = p.roll().await?; // the host normally drives `p.run()` instead
/// assert_eq!(r.events, 1);
/// assert_eq!(cold.load_state(&obj, AsOf::Latest).await?.entries.len(), 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").field("settings", &self.inner.settings).finish()
    }
}

/// Events of one send, validated and transformed, with their bytes and the count the transform
/// dropped.
#[derive(Clone)]
struct Prepared {
    rows: Vec<Row>,
    bytes: u64,
    dropped: u64,
}

/// The most waiting events whose objects one claim learns the sequence counters of: `roll_rows`,
/// at most [`MAX_LEARN_WINDOW`]. A claim stops at the first object it has not learned, so a
/// smaller window only makes more claims; with `roll_rows` of `usize::MAX` (rolls by bytes or
/// time) every claim read the whole log and the counters were never forgotten.
fn learn_window(settings: &PipelineSettings) -> usize {
    settings.roll_rows.min(MAX_LEARN_WINDOW)
}

/// See [`learn_window`].
const MAX_LEARN_WINDOW: usize = 65_536;

/// The next sequence number of each (route, object) a roll has learned, looked up without
/// building a key: a claim looks up every event it takes, under the log's lock (a key of a
/// copied route and object per event was most of a claim's time).
#[derive(Default)]
struct SeqCounters {
    by_route: HashMap<String, HashMap<ObjectId, u64>>,
}

impl SeqCounters {
    fn get(&self, route: &str, object: &ObjectId) -> Option<u64> {
        self.by_route.get(route)?.get(object).copied()
    }

    fn get_mut(&mut self, route: &str, object: &ObjectId) -> Option<&mut u64> {
        self.by_route.get_mut(route)?.get_mut(object)
    }

    /// The counter of (`route`, `object`), set to `next` if not known yet.
    fn insert_if_absent(&mut self, route: &str, object: ObjectId, next: u64) -> &mut u64 {
        // A route's name copied per object learned, not per event claimed.
        self.by_route.entry(route.to_string()).or_default().entry(object).or_insert(next)
    }

    /// The counter of (`route`, `object`), raised to `next` if below it or not known.
    fn raise_to(&mut self, route: &str, object: &ObjectId, next: u64) {
        let slot = self.insert_if_absent(route, object.clone(), next);
        *slot = (*slot).max(next);
    }

    /// How many counters are known.
    fn len(&self) -> usize {
        self.by_route.values().map(HashMap::len).sum()
    }

    fn clear(&mut self) {
        self.by_route.clear();
    }
}

/// A claimed batch being committed (see `Inner::own_claim`). A roll dropped by its caller after
/// a route's commit landed, or failed on a later route, leaves it, and the next roll commits the
/// batch again, where the sink skips what landed: each route is counted once. Events of a
/// batch this process claimed count as committed; of one an earlier process claimed
/// (`inherited`), what the sink skipped counts as replayed (that process committed it).
#[derive(Debug)]
struct OwnClaim {
    id: u64,
    counted: std::collections::HashSet<String>,
    inherited: bool,
}

impl Pipeline {
    /// A builder writing to `sink` (the default route).
    pub fn builder(sink: Arc<dyn ColdSink>) -> PipelineBuilder {
        PipelineBuilder {
            sink,
            routes: HashMap::new(),
            settings: PipelineSettings::default(),
            transform: None,
            clock: None,
        }
    }

    /// Accept `events` (validated, transformed) into the buffer. Returns how many were accepted
    /// (dropped ones excluded). With [`Durability::Durable`], `Ok` means they survive a process
    /// kill. When the buffer is full: `FailFast` and `Wait` fail with a retryable `Unavailable`
    /// (use [`send_wait`](Self::send_wait) to wait), `Spill` overflows to disk. More events than
    /// `capacity` or `capacity_bytes` in one call (bounded policies): `LimitExceeded`; after
    /// [`close`](Self::close): `Shutdown`. A durable log whose COMMIT failed with an I/O error:
    /// `AmbiguousOutcome` (the events may be in the log and then are delivered once; sending
    /// them again may deliver them twice). With a durable (or spilling) log, `send` commits to
    /// SQLite on the calling thread, and may wait for a roll's fully synced claim: from an async
    /// task, expect a disk write's latency (use `spawn_blocking` for large or hot paths).
    pub fn send(&self, events: impl IntoIterator<Item = Event>) -> Result<usize> {
        self.send_counting(events, true)
    }

    /// [`send`](Self::send); a refusal for a full buffer counts in `rejected` only if
    /// `count_full` (a [`send_wait`](Self::send_wait) that tries again counts once, at the end).
    fn send_counting(&self, events: impl IntoIterator<Item = Event>, count_full: bool) -> Result<usize> {
        let prepared = self.prepare(events)?;
        self.admit(prepared, count_full)
    }

    /// `events` validated and transformed, ready for [`admit`](Self::admit).
    fn prepare(&self, events: impl IntoIterator<Item = Event>) -> Result<Prepared> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::new(ErrorKind::Shutdown, "the pipeline is closed"));
        }
        let events = events.into_iter();
        // (Reserved up to a small bound: a long iterator's hint is no promise it fits.)
        let mut rows = Vec::with_capacity(events.size_hint().0.min(inner.settings.capacity).min(1024));
        let mut bytes = 0u64;
        let mut dropped = 0u64;
        // Which event of the call was refused, and whether as sent or as the transform made it
        // (labelled only then: two labels formatted per event cost a durable send of 100 events
        // about as much as its SQL).
        fn named(err: Error, i: usize, e: &Event, transformed: bool) -> Error {
            let how = if transformed { ", as the transform returned it" } else { "" };
            err.context(format!("event {i} of the send ({}{how})", e.label()))
        }
        for (i, e) in events.enumerate() {
            e.validate().map_err(|err| named(err, i, &e, false))?;
            let (route, e) = match &inner.transform {
                None => (String::new(), e),
                Some(t) => match t(e) {
                    Transformed::Drop => {
                        dropped += 1;
                        continue;
                    }
                    Transformed::Keep(e) => (String::new(), e),
                    Transformed::Route(r, e) => {
                        if !inner.routes.contains_key(&r) {
                            return Err(Error::invalid(format!("transform routed to unknown route {r:?}")));
                        }
                        (r, e)
                    }
                },
            };
            // (Validated above as sent, and again only as a transform returned it.)
            if inner.transform.is_some() {
                e.validate().map_err(|err| named(err, i, &e, true))?;
            }
            bytes += e.size() as u64;
            rows.push(Row { route, event: e });
            // A call that can never fit is refused at its first event past the bounds, not
            // after reading (and transforming) the rest of a long or endless iterator.
            if inner.settings.bounded() {
                self.refuse_oversized(rows.len(), bytes)
                    .map_err(|e| e.context("events were read up to the first past the bound"))?;
            }
        }
        Ok(Prepared { rows, bytes, dropped })
    }

    /// `LimitExceeded` (counted as a refusal) if `n` events of `bytes` are more than a bounded
    /// buffer ever holds.
    fn refuse_oversized(&self, n: usize, bytes: u64) -> Result<()> {
        let inner = &self.inner;
        let (capacity, capacity_bytes) = (inner.settings.capacity, inner.settings.capacity_bytes as u64);
        if n > capacity || bytes > capacity_bytes {
            // No roll ever makes room for this: not a retryable condition.
            inner.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(if n > capacity {
                Error::limit("events in one send", capacity as u64, n as u64)
            } else {
                Error::limit("bytes in one send", capacity_bytes, bytes)
            });
        }
        Ok(())
    }

    /// Whether `n` events of `bytes` fit in a bounded buffer now: `LimitExceeded` if they never
    /// will (counted as a refusal), a retryable `Unavailable` if it is full now (counted only if
    /// `count_full`). Decided under the send gate by [`admit`](Self::admit).
    fn room(&self, n: usize, bytes: u64, count_full: bool) -> Result<()> {
        let inner = &self.inner;
        if !inner.settings.bounded() {
            return Ok(());
        }
        let (depth, depth_bytes) = inner.log.depth();
        let (capacity, capacity_bytes) = (inner.settings.capacity, inner.settings.capacity_bytes as u64);
        self.refuse_oversized(n, bytes)?;
        if depth + n > capacity || depth_bytes as u64 + bytes > capacity_bytes {
            inner.counters.rejected.fetch_add(u64::from(count_full), Ordering::Relaxed);
            return Err(Error::unavailable(format!(
                "pipeline buffer full: {depth} events ({depth_bytes} bytes) waiting, capacity {capacity} events \
                 ({capacity_bytes} bytes); retry after the next roll"
            )));
        }
        Ok(())
    }

    /// Append `prepared` to the buffer, within its capacity (see [`send`](Self::send)).
    fn admit(&self, prepared: Prepared, count_full: bool) -> Result<usize> {
        let inner = &self.inner;
        let Prepared { rows, bytes, dropped } = prepared;
        if rows.is_empty() {
            inner.counters.dropped.fetch_add(dropped, Ordering::Relaxed);
            return Ok(0);
        }
        let _gate = inner.send_gate.lock();
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::new(ErrorKind::Shutdown, "the pipeline is closed"));
        }
        self.room(rows.len(), bytes, count_full)?;
        let n = rows.len();
        if let Err(e) = inner.log.append(rows) {
            // A busy log is waited out like a full buffer by `send_wait` (which counts the final
            // refusal once); any other failure is a refusal now.
            // An unknown outcome is no refusal: the events may be in the log (and committed later).
            let full_like = e.kind() == &ErrorKind::Unavailable && e.is_retryable();
            let refused = e.kind() != &ErrorKind::AmbiguousOutcome && (count_full || !full_like);
            inner.counters.rejected.fetch_add(u64::from(refused), Ordering::Relaxed);
            return Err(e);
        }
        // Counted only for a send that was accepted (a refused one is retried, and transformed
        // again).
        inner.counters.dropped.fetch_add(dropped, Ordering::Relaxed);
        inner.counters.events_in.fetch_add(n as u64, Ordering::Relaxed);
        inner.counters.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        Ok(n)
    }

    /// Like [`send`](Self::send), but under the `Wait(deadline)` policy waits for room until the
    /// deadline (a roll frees room), then fails with a retryable `Unavailable`.
    pub async fn send_wait(&self, events: Vec<Event>) -> Result<usize> {
        let deadline = match self.inner.settings.backpressure {
            Backpressure::Wait(d) => d,
            _ => Duration::ZERO,
        };
        let clock = self.inner.clock.clone();
        let sw = Stopwatch::start(clock.clone());
        // Validated and transformed once (a transform's side effects happen once per send).
        let prepared = self.prepare(events)?;
        loop {
            // Copied for an attempt only when there is room for it (or nothing to send, or the
            // pipeline closed: then `admit` says so).
            let attempt = if self.inner.closed.load(Ordering::Acquire) || prepared.rows.is_empty() {
                self.admit(prepared.clone(), false)
            } else {
                self.room(prepared.rows.len(), prepared.bytes, false).and_then(|()| self.admit(prepared.clone(), false))
            };
            match attempt {
                // Only a full buffer is waited out; a log that cannot take the events (read-only,
                // cannot be opened) fails at once.
                Err(e) if e.kind() == &ErrorKind::Unavailable && e.is_retryable() => {
                    if sw.elapsed() >= deadline {
                        // Refused in the end: one rejection (not one per try).
                        self.inner.counters.rejected.fetch_add(1, Ordering::Relaxed);
                        return Err(e);
                    }
                    clock.sleep(Duration::from_millis(1)).await;
                }
                other => return other,
            }
        }
    }

    /// How long until the roll interval, counted from the last roll's start, ends (zero once it
    /// has).
    fn interval_left(&self) -> std::time::Duration {
        self.inner.settings.interval_left(&*self.inner.clock, *self.inner.last_roll.lock())
    }

    /// Whether a roll is due (interval elapsed with events waiting, a row/byte threshold hit, the
    /// buffer half full by events or bytes: with thresholds above the capacity, senders were
    /// refused as "full" until the interval passed; or a batch claimed and not yet committed,
    /// such as one an earlier process left, which may be in the sink already and which
    /// `take_refused` answers `Conflict` about until a roll has tried it).
    pub fn roll_due(&self) -> bool {
        let inner = &self.inner;
        let (events, bytes) = inner.log.depth();
        events > 0
            && (events >= inner.settings.roll_rows
                || bytes >= inner.settings.roll_bytes
                || inner.settings.half_full(events, bytes)
                || inner.own_claim.lock().is_some()
                || self.interval_left().is_zero())
    }

    /// Roll now: commit everything waiting (in batches of at most `roll_rows` events and about
    /// `roll_bytes` bytes, one cold commit per route each), exactly once. A batch claimed by a previous attempt or process is
    /// committed first, with the same sequence numbers.
    pub async fn roll(&self) -> Result<RollReport> {
        self.roll_in(false).await
    }

    /// [`roll`](Self::roll); a roll of the background loop (`background`) does nothing once the
    /// pipeline is closed with nothing waiting (it may have waited for the lock behind `close`'s
    /// own roll); what a failed `close` left is its to roll.
    async fn roll_in(&self, background: bool) -> Result<RollReport> {
        let inner = &self.inner;
        let _guard = inner.roll_lock.lock().await;
        if background && inner.closed.load(Ordering::Acquire) && inner.log.depth().0 == 0 {
            return Ok(RollReport::default());
        }
        let started = inner.clock.monotonic();
        let mut report = RollReport::default();
        let result = self.roll_batches(&mut report).await;
        // A roll that committed events counts, also when a later batch of it failed.
        inner.counters.rolls.fetch_add(u64::from(report.events > 0), Ordering::Relaxed);
        result?;
        // The interval runs from roll start to roll start, so an event waits at most about one
        // interval plus one commit.
        *inner.last_roll.lock() = started;
        if report.events > 0 {
            tracing::debug!(events = report.events, commits = report.commits, "dotdo pipeline roll");
        }
        Ok(report)
    }

    /// The batches of one roll (see [`roll`](Self::roll)), counted into `report` as they land.
    async fn roll_batches(&self, report: &mut RollReport) -> Result<()> {
        let inner = &self.inner;
        // Commit what is waiting now, not the tail that keeps arriving during the roll: counted
        // by the events claimed, not by what the sinks report landed (a route counted by an
        // earlier, failed roll reports nothing when its batch is committed again, and a user's
        // sink may report anything: under steady sends, such a roll never ended).
        let waiting = inner.log.depth().0;
        let mut taken = 0usize;
        while taken < waiting {
            let claimed = match inner.log.claimed(inner.settings.token)? {
                Some(c) => {
                    // A batch an earlier process (or a failed roll of this one) claimed: which of
                    // its routes this process saw land is remembered, so that a route counted once
                    // is not counted again when a later route fails and the batch is re-committed.
                    self.own_claim_for(c.id);
                    c
                }
                None => {
                    self.learn_next_seqs().await?;
                    let mut seqs = inner.next_seq.lock();
                    // An object whose sequence numbers ran out stops the claim before its event
                    // (nothing of it is claimed): the roll fails with `LimitExceeded`, where a
                    // claimed number above the limit would be refused by the sink on every roll;
                    // `take_refused` takes such events out.
                    let mut exhausted: Option<(ObjectId, u64)> = None;
                    let mut next = |route: &str, object: &ObjectId| -> Option<u64> {
                        let slot = seqs.get_mut(route, object)?;
                        let s = *slot;
                        if s > dotdo_core::MAX_SEQ {
                            exhausted = Some((object.clone(), s));
                            return None;
                        }
                        *slot += 1;
                        Some(s)
                    };
                    let c = inner.log.claim(
                        inner.settings.roll_rows,
                        inner.settings.roll_bytes,
                        inner.settings.token,
                        &mut next,
                    );
                    drop(seqs);
                    match c {
                        Ok(Some(c)) => {
                            *inner.own_claim.lock() =
                                Some(OwnClaim { id: c.id, counted: Default::default(), inherited: false });
                            c
                        }
                        Ok(None) => match exhausted {
                            Some((object, seq)) => {
                                return Err(Error::limit("sequence number", dotdo_core::MAX_SEQ, seq).context(
                                    format!(
                                        "object {object} has used every sequence number; its events stay in the log \
                                         (take_refused takes them out)"
                                    ),
                                ));
                            }
                            None => break,
                        },
                        Err(e) => {
                            // The claim did not happen: forget the advanced counters.
                            inner.next_seq.lock().clear();
                            return Err(e);
                        }
                    }
                }
            };
            taken = taken.saturating_add(claimed.rows.len().max(1));
            let sw = Stopwatch::start(inner.clock.clone());
            let oldest = claimed.rows.iter().map(|(_, r)| r.timestamp).min();
            // Grouped by reference: each attempt's batch is copied from the claimed rows (which
            // the memory log shares, keeping them for a retry), once, as it is sent.
            let (claim_id, rows) = (claimed.id, claimed.rows);
            let mut by_route: BTreeMap<&str, BTreeMap<&ObjectId, Vec<&ChangeRecord>>> = BTreeMap::new();
            for (route, r) in rows.iter() {
                by_route.entry(route.as_str()).or_default().entry(&r.object).or_default().push(r);
            }
            // Routes whose commit a dropped roll left open go first: their answer settles it (a
            // route refused for good ahead of them would keep every roll from reaching them,
            // and `take_refused` waits for them).
            let mut routes: Vec<_> = by_route.into_iter().collect();
            routes.sort_by_key(|(route, _)| !inner.commits.is_open(route));
            // Every route is asked, also after one failed (its error is the roll's, the batch
            // stays claimed): the routes are separate sinks, and a batch an earlier process
            // claimed is handed out by `take_refused` only once each of its routes has answered
            // this process (a route refusing for good ahead of another kept it from ever
            // answering, and `take_refused` answered `Conflict` for ever).
            let mut failed: Option<Error> = None;
            for (route, objects) in routes {
                let batch = || ColdBatch {
                    objects: objects
                        .iter()
                        .map(|(object, records)| ObjectChanges {
                            object: (*object).clone(),
                            token: inner.settings.token,
                            records: records.iter().map(|r| (*r).clone()).collect(),
                        })
                        .collect(),
                };
                let commit = match self.append_resolving(route, batch).await {
                    Ok(c) => c,
                    Err(e) => {
                        failed.get_or_insert(e);
                        continue;
                    }
                };
                // Counted as it lands: a later route or batch of this roll may still fail.
                let (written, replayed) =
                    self.count_landed(claim_id, route, commit.records_written, commit.records_skipped);
                inner.counters.committed.fetch_add(written, Ordering::Relaxed);
                inner.counters.replayed.fetch_add(replayed, Ordering::Relaxed);
                // A commit of this roll, also one an earlier attempt landed, its answer lost
                // (counted as its events are).
                report.commits += u64::from(commit.snapshot.is_some() || written > 0);
                // Saturating: the counts are a sink's (a user's `ColdSink` may report anything).
                report.events = report.events.saturating_add(written);
                report.replayed = report.replayed.saturating_add(replayed);
                for (object, wm) in &commit.watermarks {
                    inner.next_seq.lock().raise_to(route, object, wm.through.saturating_add(1));
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
            inner.log.ack(claim_id)?;
            *inner.own_claim.lock() = None;
            // With no claim outstanding every assigned sequence number is in the sink, so the
            // counters can be learned again from its watermarks: forget them rather than keep
            // one per (route, object) ever seen.
            let mut seqs = inner.next_seq.lock();
            if seqs.len() > learn_window(&inner.settings).saturating_mul(4) {
                seqs.clear();
            }
            drop(seqs);
            let now = inner.clock.now();
            *inner.last.lock() = (sw.elapsed(), oldest.map_or(Duration::ZERO, |o| now.since(o)));
        }
        Ok(())
    }

    /// Make `id` the claim being committed, as one an earlier process claimed unless this
    /// process claimed it (its record is kept).
    fn own_claim_for(&self, id: u64) {
        let mut own = self.inner.own_claim.lock();
        if own.as_ref().is_none_or(|o| o.id != id) {
            *own = Some(OwnClaim { id, counted: Default::default(), inherited: true });
        }
    }

    /// (committed, replayed) for `route`'s landing of claim `id`, whose commit wrote `written`
    /// records and skipped `skipped` (see [`OwnClaim`]): nothing if the route was counted
    /// already; an earlier process's batch counts what the sink skipped as replayed, this
    /// process's own as committed (an earlier, dropped attempt landed it uncounted).
    fn count_landed(&self, id: u64, route: &str, written: u64, skipped: u64) -> (u64, u64) {
        let mut own = self.inner.own_claim.lock();
        let Some(o) = own.as_mut().filter(|o| o.id == id) else { return (written, skipped) };
        if !o.counted.insert(route.to_string()) {
            (0, 0)
        } else if o.inherited {
            (written, skipped)
        } else {
            (written.saturating_add(skipped), 0)
        }
    }

    /// The watermarks of `objects` in `route`'s sink, one per object (checked: a sink is a
    /// user's to write).
    async fn watermarks(&self, route: &str, objects: &[ObjectId]) -> Result<Vec<dotdo_core::Watermark>> {
        let wms = self.sink(route)?.watermarks(objects).await?;
        if wms.len() != objects.len() {
            return Err(Error::backend(format!(
                "route {route:?}: the sink returned {} watermarks for {} objects",
                wms.len(),
                objects.len()
            )));
        }
        Ok(wms)
    }

    /// Learn the watermark of the waiting objects not seen yet (the next sequence number of
    /// each): one batched read per route (one snapshot for an Iceberg sink), not one per object.
    async fn learn_next_seqs(&self) -> Result<()> {
        let inner = &self.inner;
        let objects = inner.log.next_objects(learn_window(&inner.settings))?;
        let mut unknown: BTreeMap<String, Vec<ObjectId>> = BTreeMap::new();
        {
            let seqs = inner.next_seq.lock();
            for (route, object) in objects {
                if seqs.get(&route, &object).is_none() {
                    unknown.entry(route).or_default().push(object);
                }
            }
        }
        for (route, objects) in unknown {
            let wms = self.watermarks(&route, &objects).await?;
            let mut seqs = inner.next_seq.lock();
            for (object, wm) in objects.into_iter().zip(wms) {
                seqs.insert_if_absent(&route, object, wm.through.saturating_add(1));
            }
        }
        Ok(())
    }

    /// With no batch claimed: take out the events at the head of the log whose object has used
    /// every sequence number (a roll stops at them with `LimitExceeded`, for ever).
    async fn take_exhausted(&self) -> Result<Vec<(String, Event)>> {
        let inner = &self.inner;
        self.learn_next_seqs().await?;
        let seqs = inner.next_seq.lock();
        let mut stuck =
            |route: &str, object: &ObjectId| seqs.get(route, object).is_some_and(|s| s > dotdo_core::MAX_SEQ);
        let rows = inner.log.take_stuck(inner.settings.roll_rows, inner.settings.roll_bytes, &mut stuck)?;
        Ok(rows.into_iter().map(|r| (r.route, r.event)).collect())
    }

    fn sink(&self, route: &str) -> Result<&Arc<dyn ColdSink>> {
        self.inner.routes.get(route).ok_or_else(|| Error::invalid(format!("unknown route {route:?}")))
    }

    /// Commit `batch()` (built for each attempt) to `route`'s sink, retried (see
    /// [`retry`](crate::settings::retry)), its answer noted for the route (see `CommitWatch`).
    async fn append_resolving(&self, route: &str, batch: impl Fn() -> ColdBatch) -> Result<dotdo_core::ColdCommit> {
        let sink = self.sink(route)?;
        self.inner.commits.start(route);
        let (out, unknown) = crate::settings::retry(&*self.inner.clock, || sink.append(batch())).await;
        // Not reached if this roll is dropped while the sink commits.
        self.inner.commits.end(route, &out, unknown);
        out
    }

    /// Roll whenever due, until [`close`](Self::close) or until every handle of the pipeline is
    /// dropped; spawn it on the host's executor (`tokio::spawn(p.run())`: the future holds the
    /// pipeline only while it rolls, so a dropped pipeline lets go of its durable log; a memory
    /// pipeline closed with events waiting is held until they are committed or refused for good,
    /// since dropping it would lose them). A failed
    /// roll is tried again (the claimed batch stays and is committed again) after a pause that
    /// doubles with each failure in a row, from twice the tick up to [`MAX_ROLL_BACKOFF`]: a
    /// sink that refuses the batch for good is not hammered. After [`close`](Self::close) it
    /// ends once nothing waits: what a failed (or dropped) `close` left, it keeps rolling with
    /// the same backoff until it is committed, unless a roll is refused for good (not retryable,
    /// not an unknown outcome: a sink refusing the batch, sequence numbers used up, a log to
    /// reopen). Then the loop ends, so that a host awaiting it at shutdown does not wait for
    /// ever, and what waits stays pending: with [`Durability::Memory`](crate::Durability::Memory)
    /// take it out with [`take_refused`](Self::take_refused) (or mend the cause and `roll`)
    /// before dropping the pipeline, or it is lost.
    pub fn run(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let weak = Arc::downgrade(&self.inner);
        let (clock, tick) = (self.inner.clock.clone(), self.inner.settings.tick());
        crate::settings::run_rolls(
            clock,
            tick,
            self.inner.adopters.register(),
            move || weak.upgrade().map(|inner| Pipeline { inner }),
            |p: &Pipeline| p.inner.closed.load(Ordering::Acquire),
            |p: &Pipeline| p.inner.settings.holds_in_memory(),
            |p: &Pipeline| p.inner.log.depth().0 > 0,
            |p: &Pipeline| p.roll_due(),
            |p: &Pipeline| p.interval_left(),
            |p: Pipeline| async move { p.roll_in(true).await },
        )
    }

    /// Take the events of the claimed batch that did not land out of the pipeline (the batch
    /// every roll commits first), so that the events behind them go on: the way out of events a
    /// sink refuses for good, which otherwise stop the pipeline for good. Each event comes with
    /// its route (`""`: the default sink). Events of the batch a sink holds already (a route
    /// whose commit landed, an attempt whose reply was lost) stay committed and are not
    /// returned. With no batch claimed, the events at the head of the log whose object has used
    /// every sequence number (a roll fails with `LimitExceeded` on them, every time) are taken
    /// out instead, at most [`roll_rows`](crate::PipelineSettings::roll_rows) of them and about
    /// [`roll_bytes`](crate::PipelineSettings::roll_bytes) (call again for more); else an empty
    /// list. (A durable log whose deletion of events out of sequence numbers fails with an I/O
    /// error at its COMMIT hands them out all the same: a later call may hand the same events out
    /// again, never none. Refused events' deletion is run again after such an error, and an
    /// error that persists leaves them in the log.) The taken-out events are the caller's
    /// (store them, fix them, send them again: they get new sequence numbers then, and pass the
    /// transform again: they are returned as the transform made them). Waits for a roll in
    /// progress; then `roll` (the background loop keeps its backoff from the failed rolls).
    /// Taken-out events are not counted as committed. A retryable `Conflict` if a roll was dropped
    /// (by its caller) while a sink committed the batch, or an attempt of a commit had an
    /// unknown outcome (also when later attempts failed otherwise): that commit may still land, and the events are not handed out until a roll
    /// settles it (call `roll`, then again). Likewise for a batch an earlier process claimed
    /// (a durable log's), until each of its routes has answered a roll of this process. A later
    /// roll's refusal for good settles it: with the SQL catalog an earlier request can no longer
    /// land then (its pointer swap names the exact metadata it was built on), but a REST catalog
    /// checks only the table and its head snapshot, and an earlier request still queued there may
    /// land after, say, credentials revoked or another engine's schema change refused the later
    /// one: the events then land as they were, and their re-send, under the same sequence
    /// numbers if the sink has not moved on, is skipped as a replay (the re-sent version is
    /// lost), or else lands beside them (twice). A claimed batch whose log rows are damaged
    /// (`Corrupt`, as every roll answers) cannot be taken out: it needs repair of the log file by
    /// hand (docs/errors.md, "A pipeline log whose claimed batch (or a waiting row) is damaged");
    /// nor can a damaged waiting row that stops every roll (`Corrupt` naming the row here too).
    pub async fn take_refused(&self) -> Result<Vec<(String, Event)>> {
        let inner = &self.inner;
        let _guard = inner.roll_lock.lock().await;
        let Some(claimed) = inner.log.claimed(inner.settings.token)? else { return self.take_exhausted().await };
        inner.commits.refuse_if_open(claimed.id)?;
        if inner.own_claim.lock().as_ref().is_none_or(|o| o.id != claimed.id || o.inherited) {
            inner.commits.refuse_if_inherited_unanswered(claimed.id, claimed.rows.iter().map(|(r, _)| r.as_str()))?;
        }
        let mut by_route: BTreeMap<String, Vec<ChangeRecord>> = BTreeMap::new();
        let claim_id = claimed.id;
        for (route, r) in claimed.into_rows() {
            by_route.entry(route).or_default().push(r);
        }
        let mut refused = Vec::new();
        self.own_claim_for(claim_id);
        for (route, records) in by_route {
            let mut objects: Vec<ObjectId> = records.iter().map(|r| r.object.clone()).collect();
            objects.sort();
            objects.dedup();
            let wms = self.watermarks(&route, &objects).await?;
            let through: HashMap<ObjectId, u64> = objects.into_iter().zip(wms.iter().map(|w| w.through)).collect();
            let mut landed = 0u64;
            for r in records {
                if through.get(&r.object).is_none_or(|t| r.seq > *t) {
                    let event = Event::new(r.object, r.type_name, r.key, r.value, r.timestamp);
                    refused.push((route.clone(), event));
                } else {
                    landed += 1;
                }
            }
            // Landed events not counted yet are counted as a roll would.
            let (written, replayed) = self.count_landed(claim_id, &route, 0, landed);
            inner.counters.committed.fetch_add(written, Ordering::Relaxed);
            inner.counters.replayed.fetch_add(replayed, Ordering::Relaxed);
        }
        // Gone for good, also across a power loss: come back, the events could land beside the
        // caller's own re-send. (A delete whose COMMIT failed with an I/O error is run again
        // by the log, which settles it; an error here leaves the events in the log, claimed.)
        inner.log.ack_durably(claim_id)?;
        *inner.own_claim.lock() = None;
        // The taken-out events' sequence numbers never landed: every counter is learned again
        // from the sinks, so that the next events of those objects follow their watermarks.
        inner.next_seq.lock().clear();
        Ok(refused)
    }

    /// Stop accepting events and roll what is waiting. If that roll fails (or this call is
    /// dropped), what waits stays pending and `close` (or `roll`) may be called again. In memory
    /// (and `Spill`), the background loop ([`run`](Self::run)) keeps rolling it until it is
    /// committed or a roll is refused for good (see `run`), whatever the host does with its
    /// handles; with `Durable`, only while a handle is kept (the loop lets a dropped durable
    /// pipeline go): dropped, its events wait in the log file, and the next pipeline opened on
    /// it delivers them.
    pub async fn close(&self) -> Result<RollReport> {
        {
            let _gate = self.inner.send_gate.lock();
            self.inner.closed.store(true, Ordering::Release);
        }
        if self.inner.settings.holds_in_memory() {
            // What waits in memory is the roll loops' from now on, whatever the host does with
            // its handles once this returns.
            self.inner.adopters.hand_over(self);
        }
        self.roll().await
    }

    /// Current counters and depth.
    pub fn metrics(&self) -> PipelineMetrics {
        let c = &self.inner.counters;
        let (depth, bytes) = self.inner.log.depth();
        let (latency, lag) = *self.inner.last.lock();
        PipelineMetrics {
            events_in: c.events_in.load(Ordering::Relaxed),
            events_dropped: c.dropped.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            rolls: c.rolls.load(Ordering::Relaxed),
            events_committed: c.committed.load(Ordering::Relaxed),
            events_replayed: c.replayed.load(Ordering::Relaxed),
            last_commit_latency: latency,
            buffer_depth: depth as u64,
            buffer_bytes: bytes as u64,
            buffer_spilled: self.inner.log.spilled() as u64,
            last_lag: lag,
        }
    }

    /// The timestamp of the oldest event waiting, if any: the earliest among the events of the
    /// roll under way, or with none under way the first event sent (events are committed in
    /// send order; a later-sent event with an earlier timestamp is not looked for). Also `None`,
    /// with a warning logged, if a durable log cannot be read just now.
    pub fn oldest_pending(&self) -> Option<Timestamp> {
        self.inner.log.oldest()
    }
}

#[cfg(test)]
mod seq_counter_tests {
    use super::SeqCounters;
    use dotdo_core::ObjectId;

    /// Counters are per (route, object); a known one is kept by `insert_if_absent` and only
    /// raised by `raise_to`; `len` counts each pair once (it decides when they are forgotten).
    #[test]
    fn counters_are_per_route_and_object_and_only_go_up() {
        let (a, b) = (ObjectId::new("a").expect("id"), ObjectId::new("b").expect("id"));
        let mut c = SeqCounters::default();
        assert_eq!(c.get("", &a), None);
        *c.insert_if_absent("", a.clone(), 5) += 1;
        assert_eq!(*c.insert_if_absent("", a.clone(), 1), 6, "a known counter is kept");
        c.insert_if_absent("r", a.clone(), 2);
        c.raise_to("", &b, 3);
        assert_eq!(c.len(), 3);
        c.raise_to("", &a, 4);
        assert_eq!(c.get("", &a), Some(6), "raised only");
        c.raise_to("r", &a, 9);
        assert_eq!(c.get("r", &a), Some(9));
        *c.get_mut("", &b).expect("known") += 1;
        assert_eq!((c.get("", &b), c.get("r", &b), c.len()), (Some(4), None, 3));
        c.clear();
        assert_eq!((c.get("", &a), c.len()), (None, 0));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use async_trait::async_trait;
    use dotdo_core::{
        AsOf, ChangeRecord, ColdBatch, ColdCommit, ColdSink, ColdState, Error, MemoryColdStore, ObjectId, Result, Seq,
        SnapshotInfo, Timestamp, Watermark,
    };

    use crate::{Durability, Event, Pipeline, PipelineSettings};

    /// A memory sink that refuses every batch for good while `refusing`.
    #[derive(Default, Debug)]
    struct Refusing {
        inner: MemoryColdStore,
        refusing: AtomicBool,
    }

    #[async_trait]
    impl ColdSink for Refusing {
        async fn append(&self, batch: ColdBatch) -> Result<ColdCommit> {
            if self.refusing.load(Ordering::SeqCst) {
                return Err(Error::invalid("the sink refuses this batch for good (test)"));
            }
            self.inner.append(batch).await
        }
        async fn watermark(&self, object: &ObjectId) -> Result<Watermark> {
            self.inner.watermark(object).await
        }
        async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
            self.inner.snapshots().await
        }
        async fn load_state(&self, object: &ObjectId, as_of: AsOf) -> Result<ColdState> {
            self.inner.load_state(object, as_of).await
        }
        async fn read_changes(&self, object: &ObjectId, after: Seq, as_of: AsOf) -> Result<Vec<ChangeRecord>> {
            self.inner.read_changes(object, after, as_of).await
        }
    }

    /// `take_refused` whose removal of the events from a durable log fails with an I/O error at
    /// its COMMIT (rolled back in this process, but WAL recovery after a crash might apply it)
    /// runs the removal again, which settles it: the events are handed out once, and gone from
    /// the log. (It failed, leaving the caller to guess whether a crash would remove them.)
    #[tokio::test]
    async fn refused_events_come_out_when_their_removal_has_an_unknown_outcome() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.db");
        let sink = Arc::new(Refusing::default());
        let settings = PipelineSettings { durability: Durability::Durable(path.clone()), ..Default::default() };
        let p = Pipeline::builder(sink.clone()).with_settings(settings.clone()).build().expect("pipeline");
        sink.refusing.store(true, Ordering::SeqCst);
        let o = ObjectId::new("o").expect("id");
        p.send([Event::new(o.clone(), "T", "k", "v", Timestamp::from_micros(1))]).expect("send");
        p.roll().await.expect_err("refused for good");
        crate::log::tests::FAIL_ACK_AT_COMMIT.with(|f| f.set(true));
        let taken = p.take_refused().await.expect("handed out");
        assert!(!crate::log::tests::FAIL_ACK_AT_COMMIT.with(|f| f.get()), "the fault fired");
        assert_eq!(taken.iter().map(|(_, e)| e.key.as_str()).collect::<Vec<_>>(), ["k"]);
        drop(p);
        let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("reopened");
        assert_eq!(p.metrics().buffer_depth, 0, "the removal landed");
        assert!(p.take_refused().await.expect("nothing claimed").is_empty(), "handed out once");
    }
}
