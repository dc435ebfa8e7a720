//! The stateless object runtime: the piece a host calls.
//!
//! [`ObjectRuntime`] composes a [`ConsistencyGuard`], a [`HotStore`], a [`ColdSink`] and
//! optionally an [`IndexAccelerator`]. [`ObjectRuntime::invoke`] runs a handler against one
//! object's state:
//!
//! 1. the runtime takes (or reuses) the object's lease, renewing it at about TTL/3;
//! 2. on first use it activates the object: if hot storage has no state but cold storage does
//!    (the object was evicted, moved, or the hot database was lost) it recovers it — eagerly,
//!    lazily (first key fast, read from cold through the accelerator) or hybrid (named keys and
//!    prefixes preloaded, the rest lazily);
//! 3. the handler reads and writes through an [`ObjectTxn`]; its writes commit as one atomic,
//!    fenced batch when it returns `Ok`;
//! 4. during a long handler the lease is renewed; if the lease is lost, or renewal keeps failing
//!    (transient failures are retried with backoff) until the lease expires, the handler is
//!    abandoned and nothing is written (self-fencing);
//! 5. the lease is released or kept warm for the next call; the change log is drained to cold
//!    storage exactly once by [`flush`](ObjectRuntime::flush) / [`flush_all`](ObjectRuntime::flush_all)
//!    or automatically past a threshold; idle objects are tiered out by
//!    [`evict_idle`](ObjectRuntime::evict_idle) and come back identically.
//!
//! The runtime spawns nothing and needs no particular async runtime: renewals run concurrently
//! with the handler inside `invoke`, and periodic work is a future the host drives
//! ([`run_maintenance`](ObjectRuntime::run_maintenance)).

mod metrics;
mod txn;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::Either;
use futures::StreamExt as _;

pub use metrics::{ActivationMetrics, Recovery, RuntimeMetrics};
use txn::LazyState;
pub use txn::ObjectTxn;

use crate::accel::ScanQuery;
use crate::cold::{AsOf, ColdBatch, ColdSink, ObjectChanges, Watermark};
use crate::error::{Error, ErrorKind, Result};
use crate::guard::{ConsistencyGuard, Lease};
use crate::hot::HotStore;
use crate::ids::{FencingToken, NodeId, ObjectId};
use crate::record::{ChangeRecord, KeyRange, WriteBatch};
use crate::ring::HashRing;
use crate::time::{Clock, Stopwatch, SystemClock, Timestamp};
use crate::{IndexAccelerator, Seq};

/// How an object whose hot state is missing is recovered from cold storage.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RestoreMode {
    /// Restore everything before the handler runs.
    #[default]
    Eager,
    /// Serve reads key by key from cold storage (through the accelerator); complete the restore
    /// on the first write, list or [`ObjectRuntime::complete_restores`].
    Lazy,
    /// Preload these keys and key prefixes, then behave like `Lazy`.
    Hybrid {
        /// Exact keys to preload.
        keys: Vec<String>,
        /// Key prefixes to preload.
        prefixes: Vec<String>,
    },
}

/// Runtime settings: plain data with documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeSettings {
    /// Lease TTL. Default 10 s. Renewal happens at about a third of it.
    pub lease_ttl: Duration,
    /// How long a lease is kept after a call for the next one (0: release after every call).
    /// Default 30 s. With 0, a call answers once its release has (its write, if any, is
    /// committed before): a guard whose release does not answer holds the call's answer for up
    /// to `lease_ttl` (then the lease is left to be released by the object's next activation
    /// or `maintain`). A caller that gives up on a call sooner must treat it as of unknown
    /// outcome, as after any timeout.
    pub keep_warm: Duration,
    /// How long `invoke` waits for a lease held by another node before failing with
    /// `LeaseHeld`. Default 0 (fail at once, the caller routes elsewhere).
    pub acquire_timeout: Duration,
    /// A commit with less than this left on the lease refreshes the lease first (and fails if
    /// that refresh fails; a lease already run out fails the commit with `LeaseLost` at once):
    /// a write must not race the lease's expiry. Default 1 s (clamped to TTL/3).
    pub commit_margin: Duration,
    /// Recovery mode for objects with no hot state.
    pub restore: RestoreMode,
    /// Type name recorded with each change when the handler does not set one. Default "Object".
    pub type_name: String,
    /// Flush an object's changes to cold storage after a commit once this many are pending
    /// (0: never automatically; call `flush`). Default 0. Best effort: the commit is durable
    /// before it, so a failed automatic flush does not fail the call (it is logged and counted in
    /// `RuntimeMetrics::flush_failures`; the changes wait in the hot log for the next flush).
    /// After a failure the next automatic flushes are skipped for [`AUTO_FLUSH_PAUSE`], doubling
    /// with failures in a row up to [`AUTO_FLUSH_MAX_PAUSE`], so calls do not each wait out a cold
    /// outage's retries: only the object's after a refusal about it (`InvalidInput`,
    /// `LimitExceeded`, `Corrupt`, `Fenced`, `LeaseLost`: cold refusing its records, its hot
    /// changes differing from cold's, a newer holder; the pause outlives the activation and ends
    /// once the object is drained), every object's after any other failure (cold out of reach,
    /// an unknown outcome, access denied, a full warehouse). An automatic flush makes one cold
    /// commit (`flush_batch_records`): a longer backlog drains over the next calls, or with
    /// `flush` / `flush_all`.
    pub flush_after_changes: u64,
    /// Longest an automatic flush may take (its one cold commit, the lease renewed meanwhile)
    /// before it is abandoned: the call, durable already, then answers, and the flush counts as
    /// failed (the changes wait in hot storage; a commit landing late is skipped by the next
    /// drain as a re-send) and pauses the next automatic flushes. Without a bound a cold store
    /// that stopped answering (a hung connection) held the call's answer, and every later call
    /// of the object, for as long as it hung. Must be above zero. Default 60 s.
    pub auto_flush_timeout: Duration,
    /// Most change records per cold commit when flushing. Default 100 000.
    pub flush_batch_records: usize,
    /// Most bytes (keys, values, type names and 64 per record) per cold commit when flushing;
    /// a commit holds at least one record whatever its size. Bounds what a flush holds in
    /// memory: values go up to 2 MiB, so `flush_batch_records` alone would let 100 000 of them
    /// (about 200 GB) into one commit after a long cold outage. Default 64 MiB.
    pub flush_batch_bytes: usize,
    /// Objects idle this long are tiered out by `evict_idle` and `maintain` (None: never).
    /// Must not exceed `keep_warm`, which must be above zero (objects released after
    /// `keep_warm` are no longer this runtime's to evict). An object whose eviction failed for a passing reason (cold storage
    /// unreachable) stays held past `keep_warm`, its lease renewed, until a later `maintain`
    /// evicts it. Default None.
    pub evict_idle_after: Option<Duration>,
    /// Whether [`flush_all`](ObjectRuntime::flush_all) and shutdown also take, drain and give
    /// back objects whose changes wait in the hot store with no holder (released after a call
    /// with `keep_warm` 0, released idle, left by a runtime that is gone). Default true. On a
    /// hot store several runtimes share without a ring, each flush then tries every pending
    /// object (one acquire each, a failed one for those another runtime holds): turn it off
    /// there, or set a ring, and make sure some runtime drains released objects. Off,
    /// `flush_all` and shutdown still take again the objects an earlier `flush_all` of this
    /// runtime gave back undrained (a lease that ran out during it, hot diverged from or behind
    /// cold), until they are drained, another holder has them or the ring gives them to another
    /// node (remembered in memory only: not after a restart).
    pub drain_released: bool,
    /// Most bytes (keys twice, values and 64 per entry), per object, of cold values a lazily
    /// restored object keeps cached when they come from the accelerator one key at a time; past
    /// it the least recently used of those entries are dropped until half the budget is left
    /// (and read again if asked for); keys preloaded by `Hybrid` or `prefetch` stay (a key named
    /// for preloading that does not exist is cached as absent like any read, and may be dropped). Without an
    /// accelerator the whole state is read and kept, whatever its size. Default 64 MiB.
    pub lazy_cache_bytes: usize,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings {
            lease_ttl: Duration::from_secs(10),
            keep_warm: Duration::from_secs(30),
            acquire_timeout: Duration::ZERO,
            commit_margin: Duration::from_secs(1),
            restore: RestoreMode::Eager,
            type_name: "Object".to_string(),
            flush_after_changes: 0,
            auto_flush_timeout: Duration::from_secs(60),
            flush_batch_records: 100_000,
            flush_batch_bytes: 64 << 20,
            evict_idle_after: None,
            drain_released: true,
            lazy_cache_bytes: 64 << 20,
        }
    }
}

/// An object `flush_all` drains, its slot locked.
struct Held {
    object: ObjectId,
    token: FencingToken,
    guard: futures::lock::OwnedMutexGuard<Slot>,
    /// Taken by this flush only (it had changes and no holder): given back afterwards, or, if
    /// the flush is dropped first (a host's timeout), left for `maintain` to release (kept, it
    /// would stay warm for `keep_warm`, refusing its owner's calls).
    taken: Option<Arc<Inner>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(inner) = &self.taken {
            if let Some(active) = self.guard.active.take() {
                leave_orphan(inner, active.lease.granted);
            }
        }
    }
}

/// An object's slot while `flush` or `evict` drains it. If the object was activated only for
/// that (`only`) and the future is dropped before [`finish`](Self::finish) (a host's timeout
/// around a slow cold append), its lease is left for `maintain` to release, as `flush_all`'s
/// [`Held`] does: kept in the slot, it stayed warm for `keep_warm`, refusing its owner's calls.
struct TakenOnlyFor<'a> {
    inner: &'a Inner,
    slot: &'a mut Slot,
    only: bool,
}

impl<'a> TakenOnlyFor<'a> {
    fn new(inner: &'a Inner, slot: &'a mut Slot, only: bool) -> Self {
        TakenOnlyFor { inner, slot, only }
    }

    /// Disarmed: the drain ended. Whether the object was activated only for it.
    fn finish(mut self) -> bool {
        std::mem::take(&mut self.only)
    }
}

impl Drop for TakenOnlyFor<'_> {
    fn drop(&mut self) {
        if self.only {
            if let Some(active) = self.slot.active.take() {
                leave_orphan(self.inner, active.lease.granted);
            }
        }
    }
}

/// A lapsed warm activation that `flush_all` took out of its slot to take the object again. If
/// the flush is dropped before that answers (a host's timeout around an acquire or lookup that
/// hangs), the object is owed to the next flush ([`owe`]) and the lapsed lease left as an
/// orphan: dropped with the flush, the object was neither active here nor owed, and every later
/// flush answered `Ok` with its changes in hot storage (`drain_released` off).
struct LapsedInHand<'a> {
    inner: &'a Inner,
    object: &'a ObjectId,
    /// The activation taken out of the slot; `None` once disarmed.
    lapsed: Option<Option<Active>>,
}

impl LapsedInHand<'_> {
    /// Disarmed: the retake answered. The lapsed activation, for the flush to decide on.
    fn disarm(mut self) -> Option<Active> {
        self.lapsed.take().flatten()
    }
}

impl Drop for LapsedInHand<'_> {
    fn drop(&mut self) {
        if let Some(lapsed) = self.lapsed.take() {
            owe(self.inner, self.object);
            if let Some(a) = lapsed {
                leave_orphan(self.inner, a.lease.granted);
            }
        }
    }
}

/// What one `flush_all` has done so far, across its drain rounds.
#[derive(Default)]
struct DrainRounds {
    /// Objects drained (each counts once in the report).
    drained: std::collections::BTreeSet<ObjectId>,
    /// Objects left out of later rounds: taken over by another node, or diverged from cold.
    left_out: std::collections::BTreeSet<ObjectId>,
    /// Objects left out of later rounds of this flush because their hot state could not be read
    /// or their truncation failed (maybe passing: a hot store's blip), still active here.
    unreadable: std::collections::BTreeSet<ObjectId>,
    /// The first error that left one object out while the others went on.
    first_err: Option<Error>,
    /// Objects whose lease ran out (or could not be renewed) while the flush held them, with
    /// that error: one for the flush only if the object's changes still wait in hot storage
    /// once its page is drained ([`settle_lapsed`]); its changes may have landed and been
    /// truncated in a commit already in flight.
    lapsed: std::collections::BTreeMap<ObjectId, Error>,
    /// Objects skipped because a call on them was in progress (each counts once:
    /// `FlushReport::busy`).
    busy: std::collections::BTreeSet<ObjectId>,
    /// A call of this pass (a lease check, an acquire, a release) did not answer in time:
    /// objects are no longer checked or taken in it (see [`not_asked`]), and the leases it took
    /// are left as orphans ([`give_back_in_pass`]).
    unanswered: bool,
}

impl Active {
    /// Whether `maintain` gives this activation back for idleness at `now` (monotonic): unused
    /// for `keep_warm`, unless its eviction is to be tried again.
    fn idle_past_keep_warm(&self, inner: &Inner, now: Duration) -> bool {
        now.saturating_sub(self.last_used) >= inner.settings.keep_warm && !self.evict_again
    }
}

/// An activated object held by this runtime.
#[derive(Debug)]
struct Active {
    lease: HeldLease,
    /// When a call last used it, on the clock's monotonic time: idleness is a local duration,
    /// which a wall-clock step must not stretch or cut.
    last_used: Duration,
    lazy: Option<LazyState>,
    /// Its idle eviction failed with a retryable error (cold unreachable): `maintain` keeps it
    /// (renewed) past `keep_warm` so that the next round tries again; released, it would no
    /// longer be this runtime's to evict, and its hot state would stay until someone used it.
    evict_again: bool,
    /// Activated from hot storage while cold storage was unreachable: its pending changes were
    /// not compared with cold's (see [`verify_against_cold`]), which the first drain does
    /// before it appends anything.
    cold_unverified: bool,
    /// The hot store's `truncated_through` of the object as last read by the auto-flush check
    /// (`flush_after_changes`), at most the current one (truncation only raises it): the check
    /// reads `object_info` (whose key count and value bytes cost a pass over the object's keys)
    /// only once its estimate of the pending changes, from a write's `last_seq`, reaches the
    /// threshold. Read on every write, a put into an object of 100k keys cost ~20 ms.
    truncated_hint: Option<Seq>,
}

#[derive(Debug, Default)]
struct Slot {
    active: Option<Active>,
}

impl Slot {
    /// Whether a lazy restore of this activation can never complete: its cold state moved on
    /// ([`LazyState::moved`]), or the hot store refused it for good ([`LazyState::refused`]).
    fn lazy_moved(&self) -> bool {
        self.active.as_ref().and_then(|a| a.lazy.as_ref()).is_some_and(|l| l.moved || l.refused)
    }

    /// Whether a lazy restore of this call was fenced (see [`LazyState::fenced`]).
    fn lazy_fenced(&self) -> bool {
        self.active.as_ref().and_then(|a| a.lazy.as_ref()).is_some_and(|l| l.fenced)
    }
}

/// An object's slot: its activation on this runtime, one call at a time.
type SlotRef = Arc<futures::lock::Mutex<Slot>>;

pub(crate) struct Inner {
    node: NodeId,
    hot: Arc<dyn HotStore>,
    guard: Arc<dyn ConsistencyGuard>,
    cold: Arc<dyn ColdSink>,
    accel: Option<Arc<dyn IndexAccelerator>>,
    clock: Arc<dyn Clock>,
    settings: RuntimeSettings,
    ring: parking_lot::RwLock<Option<HashRing>>,
    /// Objects a [`set_ring`](ObjectRuntime::set_ring) moved from this node (or, for a runtime
    /// that had no ring, from anywhere) to another node, not handed over yet: `maintain` gives
    /// their leases back once no call uses them.
    handover: parking_lot::Mutex<std::collections::HashSet<ObjectId>>,
    slots: parking_lot::Mutex<HashMap<ObjectId, SlotRef>>,
    /// Leases a cancelled call (its future dropped) took or held but could neither keep in a
    /// slot nor release; the next activation of the object releases them first, so this node
    /// does not lock itself (and everyone) out of the object until they expire.
    orphans: parking_lot::Mutex<HashMap<ObjectId, Lease>>,
    /// Acquires whose outcome this runtime never learned: the call was cancelled while the
    /// guard worked on it, or its reply was lost and the guard could not be asked. Object → when
    /// such an acquire was sent (this runtime's clock). A lease granted to this node since then
    /// is that acquire's (it may be granted after the call gave up: a blocking task or a queued
    /// request runs on): the object's next activation asks the guard first and adopts it
    /// (instead of waiting out a lease it holds itself), and `maintain` and `shutdown` give it
    /// back. An answer from the guard settles the entry. (The guard's clock and the runtime's
    /// must agree, as they do when both are the process clock; otherwise such a lease is only
    /// waited out.)
    unsure: parking_lot::Mutex<HashMap<ObjectId, Timestamp>>,
    /// Per object, the highest token this runtime gave back or left as an orphan (recorded at
    /// every give-back; `maintain` and `shutdown` forget the objects with no acquire of unknown
    /// outcome remembered, so it holds at most the objects touched between two of them, like the
    /// slots). Such a lease is never taken for the landing of an unknown acquire: it may have
    /// been given back to fence a write of unknown outcome, and adopting it (its release failed,
    /// so it is still current) would let that write land unfenced.
    given_back: parking_lot::Mutex<HashMap<ObjectId, FencingToken>>,
    /// Objects a `flush_all` gave back undrained with `drain_released` off (left out: a lease
    /// that ran out, taken over, hot diverged from or behind cold; see [`owe`]): the next
    /// `flush_all` (shutdown's included) takes them again until nothing of them waits, another
    /// holder has them or the ring gives them to another node. In memory only. Without this,
    /// the next `flush_all` and `shutdown` answered `Ok` with their acknowledged changes left in
    /// hot storage (and a diverged object's `Corrupt` said once).
    owed: parking_lot::Mutex<std::collections::BTreeSet<ObjectId>>,
    shutting_down: AtomicBool,
    /// Set once shutdown's flush has run: a call ending after it gives its lease back.
    shutdown_flushed: AtomicBool,
    /// Set when shutdown's flush begins: a call that only then gets its object (it waited for
    /// the slot past shutdown's wait) is refused, as it could commit after the flush passed.
    shutdown_flushing: AtomicBool,
    in_flight: AtomicUsize,
    metrics: parking_lot::Mutex<RuntimeMetrics>,
    /// Automatic flushes that failed in a row, and until when (the clock's monotonic time) the
    /// next ones are skipped: see [`AUTO_FLUSH_PAUSE`].
    auto_flush_pause: parking_lot::Mutex<(u32, Duration)>,
    /// Per object: automatic flushes that failed in a row for a reason about the object (see
    /// [`about_the_object`]), and until when its next ones are skipped. Such a failure pauses
    /// only that object's (pausing the runtime's, one object refused at every commit held back
    /// every other object's); kept here, not with the activation, so that the pause outlives
    /// it (with `keep_warm = 0` every call is an activation of its own). Entries go once the
    /// object is drained (its automatic flush, `flush`, `flush_all`), and expired ones when an
    /// entry is added to 1,024 or more.
    object_flush_pause: parking_lot::Mutex<HashMap<ObjectId, (u32, Duration)>>,
}

/// After an automatic flush fails (cold storage unreachable, say), the next commits skip theirs
/// for this long, doubling with each failure in a row up to [`AUTO_FLUSH_MAX_PAUSE`]: each one
/// ran the flush's retries inside the caller's `invoke` after its write was durable, so every
/// call of a busy object waited out the outage's retries (and a caller timing out would repeat a
/// write that had landed). The changes wait in the hot log for the next flush either way.
pub const AUTO_FLUSH_PAUSE: Duration = Duration::from_secs(1);

/// The longest pause of automatic flushes after failures in a row (60 s).
pub const AUTO_FLUSH_MAX_PAUSE: Duration = Duration::from_secs(60);

/// How long [`ObjectRuntime::run_maintenance`] sleeps at most before it looks whether shutdown
/// has begun (100 ms): asleep between rounds when shutdown begins, it ends within this, whatever
/// its period (a round in progress runs to its end first).
pub const MAINTENANCE_WAKE: Duration = Duration::from_millis(100);

/// Builds an [`ObjectRuntime`]; components are injected, settings are plain data.
#[derive(Debug)]
pub struct ObjectRuntimeBuilder {
    node: NodeId,
    hot: Option<Arc<dyn HotStore>>,
    guard: Option<Arc<dyn ConsistencyGuard>>,
    cold: Option<Arc<dyn ColdSink>>,
    accel: Option<Arc<dyn IndexAccelerator>>,
    clock: Option<Arc<dyn Clock>>,
    settings: RuntimeSettings,
    ring: Option<HashRing>,
}

impl ObjectRuntimeBuilder {
    /// The hot store (required).
    pub fn with_hot_store(mut self, hot: Arc<dyn HotStore>) -> Self {
        self.hot = Some(hot);
        self
    }
    /// The lease guard (required). It must share fencing state with the hot store: an acquire
    /// raises the token floor the hot store fences writes against, as each SQL store does as
    /// its own guard (pass the same store to both). With a guard of its own, the hot store learns
    /// a new holder's token only at that holder's first write: until then a late write of the
    /// previous activation (a cancelled call's, queued at a remote primary) is not fenced.
    pub fn with_guard(mut self, guard: Arc<dyn ConsistencyGuard>) -> Self {
        self.guard = Some(guard);
        self
    }
    /// The cold sink (required).
    pub fn with_cold_sink(mut self, cold: Arc<dyn ColdSink>) -> Self {
        self.cold = Some(cold);
        self
    }
    /// The accelerator used for lazy recovery reads (optional; without it every lazy read of a
    /// key not yet cached loads the object's whole cold state, so give lazy and hybrid restores
    /// an accelerator).
    pub fn with_accelerator(mut self, accel: Arc<dyn IndexAccelerator>) -> Self {
        self.accel = Some(accel);
        self
    }
    /// The clock (default: [`SystemClock`]).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }
    /// Settings (default: [`RuntimeSettings::default`]).
    pub fn with_settings(mut self, settings: RuntimeSettings) -> Self {
        self.settings = settings;
        self
    }
    /// A consistent-hash ring of the cluster's nodes, for routing-affinity hints.
    pub fn with_ring(mut self, ring: HashRing) -> Self {
        self.ring = Some(ring);
        self
    }

    /// Validate and build.
    pub fn build(self) -> Result<ObjectRuntime> {
        let missing = |what: &str| Error::invalid(format!("ObjectRuntimeBuilder: {what} is required"));
        crate::guard::validate_ttl(self.settings.lease_ttl)?;
        if self.settings.flush_batch_records == 0 {
            return Err(Error::invalid("flush_batch_records must be at least 1"));
        }
        if self.settings.flush_batch_bytes == 0 {
            return Err(Error::invalid("flush_batch_bytes must be at least 1"));
        }
        if self.settings.auto_flush_timeout.is_zero() {
            return Err(Error::invalid("auto_flush_timeout must be above zero"));
        }
        crate::ids::validate_type_name(&self.settings.type_name)?;
        if let RestoreMode::Hybrid { keys, .. } = &self.settings.restore {
            // Checked once here, not at every activation (with an accelerator each one failed;
            // without, a bad key was silently ignored).
            for k in keys {
                crate::ids::validate_key(k).map_err(|e| e.context("RestoreMode::Hybrid keys"))?;
            }
        }
        if let Some(idle) = self.settings.evict_idle_after {
            if self.settings.keep_warm.is_zero() {
                return Err(Error::invalid(
                    "evict_idle_after needs keep_warm above zero: with keep_warm 0 every call gives its lease \
                     back, so no object stays held to be tiered out (hot storage would only grow)",
                ));
            }
            if idle > self.settings.keep_warm {
                return Err(Error::invalid(format!(
                    "evict_idle_after ({idle:?}) must not exceed keep_warm ({:?}): an object whose lease is \
                     released after keep_warm is no longer this runtime's to evict",
                    self.settings.keep_warm
                )));
            }
        }
        Ok(ObjectRuntime {
            inner: Arc::new(Inner {
                node: self.node,
                hot: self.hot.ok_or_else(|| missing("a hot store"))?,
                guard: self.guard.ok_or_else(|| missing("a guard"))?,
                cold: self.cold.ok_or_else(|| missing("a cold sink"))?,
                accel: self.accel,
                clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock::new())),
                settings: self.settings,
                ring: parking_lot::RwLock::new(self.ring),
                handover: parking_lot::Mutex::new(std::collections::HashSet::new()),
                slots: parking_lot::Mutex::new(HashMap::new()),
                orphans: parking_lot::Mutex::new(HashMap::new()),
                unsure: parking_lot::Mutex::new(HashMap::new()),
                given_back: parking_lot::Mutex::new(HashMap::new()),
                owed: parking_lot::Mutex::new(std::collections::BTreeSet::new()),
                shutting_down: AtomicBool::new(false),
                shutdown_flushed: AtomicBool::new(false),
                shutdown_flushing: AtomicBool::new(false),
                in_flight: AtomicUsize::new(0),
                metrics: parking_lot::Mutex::new(RuntimeMetrics::default()),
                auto_flush_pause: parking_lot::Mutex::new((0, Duration::ZERO)),
                object_flush_pause: Default::default(),
            }),
        })
    }
}

/// Runs handlers against durable objects whose state lives in the injected stores. Cheap to
/// clone; clones share leases, caches and metrics.
///
/// ```
/// # futures::executor::block_on(async {
/// use std::sync::Arc;
/// use dotdo_core::*;
/// use dotdo_core::runtime::ObjectRuntime;
///
/// let hot = MemoryBackend::new();
/// let rt = ObjectRuntime::builder(NodeId::new("node-a")?)
///     .with_hot_store(Arc::new(hot.clone()))
///     .with_guard(Arc::new(hot))
///     .with_cold_sink(Arc::new(MemoryColdStore::new()))
///     .build()?;
/// let obj = ObjectId::new("counter:1")?;
/// let n = rt
///     .invoke(&obj, async |txn: &mut runtime::ObjectTxn<'_>| {
///         // A stored value that is not a number is an error, not a count of 0 to overwrite.
///         let n: u64 = match txn.get("n").await? {
///             Some(b) => std::str::from_utf8(&b)
///                 .ok()
///                 .and_then(|s| s.parse().ok())
///                 .ok_or_else(|| Error::corrupt("counter:1: n is not a number"))?,
///             None => 0,
///         };
///         txn.put("n", (n + 1).to_string())?;
///         Ok::<_, Error>(n + 1)
///     })
///     .await?;
/// assert_eq!(n, 1);
/// rt.flush(&obj).await?; // drain the change log to cold storage
/// rt.shutdown().await?;
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct ObjectRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ObjectRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectRuntime").field("node", &self.inner.node).field("settings", &self.inner.settings).finish()
    }
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a flush wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlushReport {
    /// Cold commits made.
    pub commits: u64,
    /// Records written to cold storage.
    pub records: u64,
    /// Objects whose changes were drained.
    pub objects: u64,
    /// Objects `flush_all` skipped because a call on them was in progress (a handler may be
    /// invoking other objects, so waiting for it could deadlock), or housekeeping held them.
    /// Counted whether or not they had changes then (a call in progress may still write):
    /// `busy > 0` means some changes may be left, not that some are. Their changes stay in hot
    /// storage for the next flush.
    pub busy: u64,
}

impl ObjectRuntime {
    /// A builder for a runtime identified as `node` (the lease holder identity).
    ///
    /// Give every runtime that is alive at the same time on one guard its own node id (host and
    /// process id, say; a restarted process may take its predecessor's). Leases name node ids
    /// only: an acquire whose outcome was unknown adopts a lease granted to its node id since it
    /// was sent, and one granted meanwhile to another live runtime under the same id would be
    /// taken for its own, both then writing under one token.
    pub fn builder(node: NodeId) -> ObjectRuntimeBuilder {
        ObjectRuntimeBuilder {
            node,
            hot: None,
            guard: None,
            cold: None,
            accel: None,
            clock: None,
            settings: RuntimeSettings::default(),
            ring: None,
        }
    }

    /// This runtime's node id.
    pub fn node(&self) -> &NodeId {
        &self.inner.node
    }

    /// A snapshot of the runtime's counters and recent activations.
    pub fn metrics(&self) -> RuntimeMetrics {
        let mut m = self.inner.metrics.lock().clone();
        m.in_flight = self.inner.in_flight.load(Ordering::SeqCst) as u64;
        m
    }

    /// The node the ring prefers for `object` (a routing hint), if a ring was configured.
    pub fn owner_hint(&self, object: &ObjectId) -> Option<NodeId> {
        self.inner.ring.read().as_ref().and_then(|r| r.node_for(object).cloned())
    }

    /// Set or replace the ring (nodes joined or left); a runtime built without one starts
    /// using it from here on. The next [`maintain`](Self::maintain) gives back the leases of
    /// objects this change moved from this node (or, for a runtime that had no ring, from
    /// anywhere) to another node, each once no call is using it.
    pub fn set_ring(&self, ring: HashRing) {
        let node = &self.inner.node;
        let objects: Vec<ObjectId> = self.inner.slots.lock().keys().cloned().collect();
        let mut current = self.inner.ring.write();
        let moved: Vec<ObjectId> = objects
            .into_iter()
            .filter(|o| {
                // No ring, or one without members (no owner anywhere), counts as "here".
                let was_here = current.as_ref().is_none_or(|r| r.node_for(o).is_none_or(|n| n == node));
                was_here && ring.node_for(o).is_some_and(|n| n != node)
            })
            .collect();
        *current = Some(ring);
        drop(current);
        // Kept until handed over, also across later ring changes.
        self.inner.handover.lock().extend(moved);
    }

    fn slot(&self, object: &ObjectId) -> SlotRef {
        self.inner.slot(object)
    }

    /// [`give_back_if_shut_down`](Self::give_back_if_shut_down) for every slot, at the end of
    /// a call that holds many (`flush_all`, `maintain`, `evict_idle`, `complete_restores`).
    async fn give_back_all_if_shut_down(&self) {
        if self.inner.shutdown_flushed.load(Ordering::SeqCst) {
            for (_, slot) in self.active_slots() {
                self.give_back_if_shut_down(&slot).await;
            }
        }
    }

    /// At the end of a call: if shutdown's flush ran while the call held its slot, give the
    /// object's lease back. The call may have decided to keep the lease just before shutdown
    /// set its flag, and shutdown then skipped the slot the call still held; the flag is set
    /// before that skip, so it is seen here. (A slot another call holds is left to that call's
    /// own check.)
    async fn give_back_if_shut_down(&self, slot: &SlotRef) {
        if self.inner.shutdown_flushed.load(Ordering::SeqCst) {
            if let Some(mut held) = slot.try_lock() {
                give_back(&self.inner, &mut held.active).await;
            }
        }
    }

    /// Count a call in flight, or refuse it with `Shutdown` once shutdown has begun. The call is
    /// counted before the flag is read (shutdown sets the flag before counting): either the call
    /// sees the flag, or shutdown sees the call and waits for it. Without this, a call after
    /// shutdown would take a lease that nothing releases any more.
    fn enter(&self) -> Result<InFlight<'_>> {
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(&self.inner.in_flight);
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Shutdown, "the runtime is shutting down"));
        }
        Ok(guard)
    }

    /// Run `handler` against `object`'s state with the default type name.
    pub async fn invoke<T, E, F>(&self, object: &ObjectId, handler: F) -> Result<T, E>
    where
        F: AsyncFnOnce(&mut ObjectTxn<'_>) -> Result<T, E>,
        E: From<Error>,
    {
        let type_name = self.inner.settings.type_name.clone();
        self.invoke_typed(object, &type_name, handler).await
    }

    /// Run `handler` against `object`'s state; its writes are recorded with `type_name`.
    ///
    /// Calls for one object are serialized within a runtime (one handler at a time, like a
    /// durable object); across runtimes the lease guarantees it. A handler must therefore never
    /// call `invoke`, `flush`, `evict` or `prefetch` on its own object (directly or through a
    /// cycle of objects): that call waits for the handler itself, forever, while renewal keeps
    /// the lease. Calls on other objects are fine. Errors: `LeaseHeld` if another
    /// node holds the lease (after `acquire_timeout`), `Fenced` / `LeaseLost` if the lease was
    /// lost (a read-only call also if its lease ran out before the handler finished),
    /// `Conflict` (retryable) if a lazy restore found the object's cold state moved on while the
    /// handler read (its answer or error rests on the old state; the lease is given back and the
    /// next call activates afresh), `Shutdown` during shutdown, the handler's own error (nothing
    /// written), or any store error.
    pub async fn invoke_typed<T, E, F>(&self, object: &ObjectId, type_name: &str, handler: F) -> Result<T, E>
    where
        F: AsyncFnOnce(&mut ObjectTxn<'_>) -> Result<T, E>,
        E: From<Error>,
    {
        crate::ids::validate_type_name(type_name)?;
        let _guard = self.enter()?;
        self.inner.metrics.lock().invokes += 1;
        let slot = self.slot(object);
        let out = self.invoke_in(object, type_name, handler, &slot).await;
        self.give_back_if_shut_down(&slot).await;
        out
    }

    /// [`invoke_typed`](Self::invoke_typed) in the object's slot.
    async fn invoke_in<T, E, F>(&self, object: &ObjectId, type_name: &str, handler: F, slot: &SlotRef) -> Result<T, E>
    where
        F: AsyncFnOnce(&mut ObjectTxn<'_>) -> Result<T, E>,
        E: From<Error>,
    {
        let mut slot = slot.lock().await;
        self.ensure_active(object, &mut slot).await?;
        let lease = slot.active.as_ref().expect("ensure_active leaves the object active").lease.clone();
        // From here until the handler's outcome is known, a dropped call (cancelled by its
        // caller) or a panicking handler leaves through `CallEnd`'s drop.
        let mut end = CallEnd { inner: &self.inner, slot: Some(slot), renewed: parking_lot::Mutex::new(lease.clone()) };
        let (outcome, ops) = {
            let CallEnd { slot, renewed, .. } = &mut end;
            let active = slot.as_mut().and_then(|s| s.active.as_mut()).expect("ensure_active leaves the object active");
            let mut txn = ObjectTxn {
                inner: &self.inner,
                object,
                token: lease.granted.token,
                lazy: &mut active.lazy,
                writes: BTreeMap::new(),
                ops: Vec::new(),
                bytes: 0,
            };
            // Run the handler while renewing the lease; a failed renewal abandons the handler.
            let outcome = renewing(&self.inner, renewed, handler(&mut txn), DURING_HANDLER).await;
            (outcome, std::mem::take(&mut txn.ops))
        };
        let (slot, renewed) = end.finish();
        // From here on (the commit, its refresh and restore, an automatic flush), a dropped call
        // leaves through `Settling`'s drop.
        let mut slot = Settling { inner: &self.inner, slot, settled: false };
        let active = slot.active.as_mut().expect("still active");
        active.lease = renewed;
        active.last_used = self.inner.clock.monotonic();
        let out: Result<T, E> = async {
            let value = match outcome {
                Err(lost) => {
                    self.inner.metrics.lock().self_fenced += 1;
                    // Given back in case the renewal failed without the lease being lost (a release
                    // of a lease that is no longer current changes nothing).
                    give_back(&self.inner, &mut slot.active).await;
                    return Err(lost.into());
                }
                Ok(Err(handler_err)) => {
                    // An error is an answer too: it may rest on stale reads, refused like a
                    // read-only answer.
                    if let Some(e) = self.refuse_if_stale(object, &mut slot, "its error").await {
                        return Err(e.into());
                    }
                    self.after_call(&mut slot).await;
                    return Err(handler_err);
                }
                Ok(Ok(v)) => v,
            };
            if ops.is_empty() {
                // A read-only call answers from this node's state, which is current only while its
                // lease holds (and while the cold state a lazy restore reads has not moved on).
                if let Some(e) = self.refuse_if_stale(object, &mut slot, "its answer").await {
                    return Err(e.into());
                }
            } else {
                if let Err(e) = self.commit(object, type_name, ops, &mut slot).await {
                    if e.is_fenced() {
                        // A newer holder has the object: the lease is gone.
                        self.inner.metrics.lock().fenced += 1;
                        slot.active = None;
                    } else if lease_gone(&e) {
                        // The lease ran out before the commit could refresh it, or a renewal during
                        // a lazy restore failed (self-fencing, like a handler whose renewal failed):
                        // given back in case the renewal failed without the lease being lost (a
                        // release of a lease that is no longer current changes nothing).
                        self.inner.metrics.lock().self_fenced += 1;
                        give_back(&self.inner, &mut slot.active).await;
                    } else if activation_spent(&e) || slot.lazy_moved() {
                        // The hot store is behind cold storage, or a lazy restore found hot state it
                        // cannot build on, or found the cold state moved on: the next activation
                        // starts afresh (its lease goes back now, not at the next call or `maintain`).
                        give_back(&self.inner, &mut slot.active).await;
                    } else if e.kind() == &ErrorKind::AmbiguousOutcome {
                        // The write may still land later (a request queued at a remote primary):
                        // reading back cannot settle that. Give the lease back, so that the next
                        // call writes under a newer token, which fences the write if it lands late.
                        give_back(&self.inner, &mut slot.active).await;
                    } else {
                        // With keep_warm = 0 the lease goes back after every call, failed ones too.
                        self.after_call(&mut slot).await;
                    }
                    return Err(e.into());
                }
            }
            self.after_call(&mut slot).await;
            Ok(value)
        }
        .await;
        slot.settled = true;
        out
    }

    async fn commit(
        &self,
        object: &ObjectId,
        type_name: &str,
        ops: Vec<crate::WriteOp>,
        slot: &mut Slot,
    ) -> Result<()> {
        let inner = &self.inner;
        let active = slot.active.as_mut().expect("active");
        if active.lazy.is_some() {
            // A read of the whole cold state and its restore into hot storage: the lease is
            // renewed meanwhile, as during the handler (a lost renewal abandons the restore,
            // whose outcome a later activation settles, and fails the call: nothing written).
            let restore = complete_restore(inner, object, active.lease.granted.token, &mut active.lazy);
            let restore = async {
                restore
                    .await
                    .map_err(|e| before_the_call(e, object, "completing the object's restore before the commit"))
            };
            with_renewal(inner, &mut active.lease, restore).await?;
        }
        // Never race the lease's expiry: refresh first if too little is left.
        let margin = inner.settings.commit_margin.min(inner.settings.lease_ttl / 3);
        let left = active.lease.left(inner);
        if left.is_zero() {
            // Run out already (a process pause during the handler): self-fencing, not a refresh
            // raced against a zero timer, which answered a retryable `Unavailable` when the timer
            // won and kept the run-out activation.
            return Err(Error::new(
                ErrorKind::LeaseLost { object: object.clone() },
                "the lease ran out before the commit; nothing was written",
            ));
        }
        if left <= margin {
            // Bounded by what the lease has left, as every other guard call: a refresh that
            // never answers (a hung connection) held the object's slot for ever.
            let refreshed = within(
                inner,
                left,
                refresh_lease(inner, &active.lease.granted),
                "the lease refresh before the commit did not answer before the lease expired; nothing was written",
            );
            active.lease = refreshed.await.map_err(|e| {
                if e.kind() == &ErrorKind::AmbiguousOutcome {
                    // The refresh's outcome is unknown, not the write's: nothing was written.
                    Error::unavailable(
                        "refreshing the lease before the commit had an unknown outcome; nothing was written",
                    )
                    .with_source(e)
                } else {
                    e
                }
            })?;
        }
        // While the write is in flight the activation is out of the slot, its lease in hand: a
        // call cancelled here (a caller's timeout) leaves a write of unknown outcome, which may
        // still land (a request queued at a remote primary, a blocking task running on). The
        // lease then becomes an orphan, released before the object's next activation, so the
        // next call writes under a newer token and a late landing is fenced. (Left in the slot,
        // the next calls kept writing under this token and the late write overwrote them.)
        let taken = slot.active.take().expect("active");
        let token = taken.lease.granted.token;
        let hand = LeaseInHand::new(inner, taken.lease.granted.clone());
        let written = inner.hot.write(object, token, WriteBatch { type_name: type_name.to_string(), ops }).await;
        hand.disarm();
        slot.active = Some(taken);
        let active = slot.active.as_mut().expect("active");
        let receipt = written?;
        inner.metrics.lock().commits += 1;
        tracing::debug!(object = %object, last_seq = receipt.last_seq, "dotdo commit");
        // The write is durable from here on: what follows is best effort, and its failure is not
        // the call's (a caller told "failed" would repeat a write that happened). Undrained
        // changes stay in the hot log for the next flush.
        let threshold = inner.settings.flush_after_changes;
        if threshold > 0 && !auto_flush_paused(inner) && !object_flush_paused(inner, object) {
            let token = active.lease.granted.token;
            let flushed = async {
                // An estimate at least the pending count (see `Active::truncated_hint`): below
                // the threshold, so is the count.
                if active.truncated_hint.is_some_and(|t| receipt.last_seq.saturating_sub(t) < threshold) {
                    return Ok::<_, Error>(false);
                }
                let info = inner.hot.object_info(object).await?;
                active.truncated_hint = info.as_ref().map(|i| i.truncated_through);
                let pending = info.map_or(0, |i| i.last_seq.saturating_sub(i.truncated_through));
                if pending < threshold {
                    return Ok(false);
                }
                // One commit per call: a backlog an outage left (many commits' worth) is not
                // drained inside one caller's call; the next calls and `flush_all` go on.
                verified_then(inner, object, active, drain(inner, object, token, 1)).await?;
                Ok(true)
            };
            // Within `auto_flush_timeout`: a cold store that does not answer (a hung
            // connection) held the durable call's answer, and every later call of the object,
            // for as long as it hung; a caller timing out would repeat a write that happened.
            // Abandoned, it is a failed flush (the changes wait in hot storage; a commit landing
            // late is skipped by the next drain, as a re-send).
            let limit = inner.settings.auto_flush_timeout;
            let flushed =
                within(inner, limit, flushed, &format!("the automatic flush did not end within {limit:?}")).await;
            match flushed {
                // Only a flush that ran ends the backoff: commits below the threshold (other
                // objects', during a cold outage) kept resetting it to its first second.
                Ok(true) => {
                    inner.auto_flush_pause.lock().0 = 0;
                    inner.object_flush_pause.lock().remove(object);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(object = %object, error = %e, "dotdo: committed; the auto-flush to cold failed and is left to the next flush");
                    inner.metrics.lock().flush_failures += 1;
                    if about_the_object(&e) {
                        pause_object_flush(inner, object);
                    } else {
                        pause_auto_flush(inner);
                    }
                    if activation_spent(&e) {
                        // Another holder took over while draining, or the hot store is behind
                        // cold: stop using this activation.
                        give_back(inner, &mut slot.active).await;
                    }
                }
            }
        }
        Ok(())
    }

    /// `LeaseLost` if the activation's lease ran out before the handler finished (the
    /// activation is dropped and its lease given back: the guard's clock may not have reached
    /// the expiry yet, and this node's next call must not be refused by its own lease); what
    /// the handler returned (`what`) may be stale.
    async fn refuse_if_ran_out(&self, object: &ObjectId, slot: &mut Slot, what: &str) -> Option<Error> {
        let expired = slot.active.as_ref().filter(|a| a.lease.left(&self.inner).is_zero());
        let lease = expired.map(|a| a.lease.granted.clone())?;
        self.inner.metrics.lock().self_fenced += 1;
        slot.active = None;
        release_quietly(&self.inner, &lease).await;
        Some(Error::new(
            ErrorKind::LeaseLost { object: object.clone() },
            format!("the lease ran out before the handler finished; {what} may be stale"),
        ))
    }

    /// What a call made (`what`: its answer, or its error) may rest on stale reads: refused
    /// (`LeaseLost`, the activation dropped) if its lazy restore was fenced, then by
    /// [`refuse_if_ran_out`](Self::refuse_if_ran_out) (the lease ran out before the handler
    /// finished: a process pause, or the handler finishing just as the renewal timed out; another
    /// node may have written since), then by [`refuse_if_lazy_moved`](Self::refuse_if_lazy_moved).
    async fn refuse_if_stale(&self, object: &ObjectId, slot: &mut Slot, what: &str) -> Option<Error> {
        if slot.lazy_fenced() {
            // The hot store refused this node's token: a newer holder has the object, even if
            // this node's clock says the lease still runs (the handler swallowed that error).
            self.inner.metrics.lock().fenced += 1;
            slot.active = None;
            return Some(Error::new(
                ErrorKind::LeaseLost { object: object.clone() },
                format!(
                    "the lazy restore of {object} during the call was fenced (a newer holder has the object); {what} \
                     may be stale"
                ),
            ));
        }
        match self.refuse_if_ran_out(object, slot, what).await {
            Some(e) => Some(e),
            None => self.refuse_if_lazy_moved(object, slot, what).await,
        }
    }

    /// `Conflict` if a lazy restore found the object's cold state moved on during the call, or
    /// the hot store refused it for good: what the handler made anyway (`what`: its answer, or
    /// its error; it swallowed that `Conflict`) rests on the old state's cache. The activation
    /// is spent (the next call starts afresh): its lease goes back now, not at its expiry (no
    /// later call or `maintain` may come for it).
    async fn refuse_if_lazy_moved(&self, object: &ObjectId, slot: &mut Slot, what: &str) -> Option<Error> {
        if !slot.lazy_moved() {
            return None;
        }
        let moved = slot.active.as_ref().and_then(|a| a.lazy.as_ref()).is_some_and(|l| l.moved);
        give_back(&self.inner, &mut slot.active).await;
        let why = if moved {
            format!("the cold state of {object} moved on during the call's lazy restore")
        } else {
            format!("the hot store refused the call's lazy restore of {object} (its sequence is past the cold state's)")
        };
        Some(Error::new(ErrorKind::Conflict, format!("{why}; {what} may be stale (the next call activates afresh)")))
    }

    /// With `keep_warm` 0, or once shutdown's flush has run (a call that outlived shutdown's
    /// wait: no `maintain` will release it any more), the lease goes back after the call. A call
    /// ending during shutdown's wait keeps it, so that the flush drains its object as held
    /// (with `keep_warm` 0 it goes back as after any call: the flush then takes the object as a
    /// released one, with `drain_released` on).
    async fn after_call(&self, slot: &mut Slot) {
        if leases_go_back_after_calls(&self.inner) {
            give_back(&self.inner, &mut slot.active).await;
        }
    }

    /// Make sure the object is active on this runtime: a current lease and recovered state.
    async fn ensure_active(&self, object: &ObjectId, slot: &mut Slot) -> Result<()> {
        self.refuse_if_shutting_down(object)?;
        self.ensure_active_within(object, slot, self.inner.settings.acquire_timeout).await
    }

    /// [`ensure_active`](Self::ensure_active) for a drain: an object not active here is activated
    /// only if, once its lease is taken, its changes still wait in hot storage (`false`: nothing
    /// to drain, the lease given back, nothing restored). Between a look at the hot store and
    /// the acquire, another runtime, or an `evict` here, may drain and evict the object:
    /// activating it then would restore its whole state from cold storage into hot storage,
    /// undoing the eviction.
    async fn ensure_active_to_drain(&self, object: &ObjectId, slot: &mut Slot, wait: Duration) -> Result<bool> {
        self.activate(object, slot, wait, ActivateFor::Drain).await
    }

    /// [`ensure_active`](Self::ensure_active) for an eviction (`wait`: how long to wait for a
    /// lease another node holds, `None` as a call does): an object not active here is activated
    /// only if, once its lease is taken, hot storage holds something of it (`false`: out of hot
    /// storage already, the lease given back, nothing restored; see [`ActivateFor`]).
    async fn ensure_active_to_evict(&self, object: &ObjectId, slot: &mut Slot, wait: Option<Duration>) -> Result<bool> {
        let wait = match wait {
            None => {
                self.refuse_if_shutting_down(object)?;
                self.inner.settings.acquire_timeout
            }
            Some(wait) => wait,
        };
        self.activate(object, slot, wait, ActivateFor::Evict).await
    }

    /// `Shutdown` for a call admitted before shutdown that waited for its slot past shutdown's
    /// wait (shutdown's own flush takes objects through `ensure_active_within`).
    fn refuse_if_shutting_down(&self, object: &ObjectId) -> Result<()> {
        if self.inner.shutdown_flushing.load(Ordering::SeqCst) {
            // A call admitted before shutdown that waited for its slot past shutdown's wait
            // (shutdown's own flush takes objects through `ensure_active_within`).
            return Err(Error::new(
                ErrorKind::Shutdown,
                format!("the runtime began shutting down while the call waited for {object}; nothing of it ran"),
            ));
        }
        Ok(())
    }

    /// [`ensure_active`](Self::ensure_active), waiting at most `wait` for a lease another node
    /// holds.
    async fn ensure_active_within(&self, object: &ObjectId, slot: &mut Slot, wait: Duration) -> Result<()> {
        self.activate(object, slot, wait, ActivateFor::Call).await.map(|_| ())
    }

    /// Activate `object` (see [`ensure_active_within`](Self::ensure_active_within)) for `purpose`
    /// (see [`ActivateFor`]). Whether it is active.
    async fn activate(&self, object: &ObjectId, slot: &mut Slot, wait: Duration, purpose: ActivateFor) -> Result<bool> {
        let inner = &self.inner;
        if slot.lazy_moved() {
            // A lazy activation whose cold state moved on (or whose restore the hot store refused
            // for good) answers `Conflict` to every read it cannot serve from its cache and to
            // every write: start afresh.
            tracing::info!(object = %object, "dotdo: a lazy restore cannot complete; re-activating");
            give_back(inner, &mut slot.active).await;
        }
        if let Some(active) = slot.active.as_mut() {
            match renew_if_due(inner, &mut active.lease).await {
                Ok(()) => return Ok(true),
                Err(e) => {
                    tracing::info!(object = %object, error = %e, "dotdo warm lease lost; re-activating");
                    // Given back in case it is still valid (a failure that did not say it was
                    // lost): kept, it would refuse this node's own acquire until it expired.
                    give_back(inner, &mut slot.active).await;
                }
            }
        }
        let orphan = inner.orphans.lock().remove(object);
        if let Some(lease) = orphan {
            release_quietly(inner, &lease).await;
        }
        if inner.shutdown_flushed.load(Ordering::SeqCst) {
            // A call admitted before shutdown that waited on a busy slot past shutdown's flush:
            // no new lease (and no restore) once shutdown has given the leases back.
            return Err(shut_down_while_waiting(object));
        }
        let sw = Stopwatch::start(inner.clock.clone());
        let lease =
            self.acquire_within(object, wait).await.map_err(|e| before_the_call(e, object, "acquiring the lease"))?;
        let mut hand = LeaseInHand::new(inner, lease.granted.clone());
        if inner.shutdown_flushed.load(Ordering::SeqCst) {
            // Granted after shutdown gave the leases back (the call waited for another node's
            // lease meanwhile): given back at once, nothing restored, nothing run.
            release_quietly(inner, &lease.granted).await;
            hand.disarm();
            return Err(shut_down_while_waiting(object));
        }
        if purpose != ActivateFor::Call {
            // Looked at again under the lease: no other runtime drains or evicts it from now on.
            let needed =
                inner.hot.object_info(object).await.map(|i| {
                    i.is_some_and(|i| i.has_pending_changes() || (purpose == ActivateFor::Evict && i.keys > 0))
                });
            if !matches!(needed, Ok(true)) {
                release_quietly(inner, &lease.granted).await;
                hand.disarm();
                return needed.map_err(|e| before_the_call(e, object, "reading the object's hot state"));
            }
        }
        let mut active = Active {
            lease,
            last_used: inner.clock.monotonic(),
            lazy: None,
            evict_again: false,
            cold_unverified: false,
            truncated_hint: None,
        };
        let loading = Stopwatch::start(inner.clock.clone());
        let (recovery, keys, bytes, snapshot) = match self.recover(object, &mut active, &mut hand).await {
            Ok(r) => r,
            Err(e) => {
                // Give the lease back: kept unreleased it would lock every node, this one
                // included, out of the object until it expired.
                release_quietly(inner, &active.lease.granted).await;
                hand.disarm();
                return Err(before_the_call(e, object, "activating the object"));
            }
        };
        hand.disarm();
        let state_loading = loading.elapsed();
        slot.active = Some(active);
        let activation = ActivationMetrics {
            object: object.clone(),
            recovery,
            cold_start: sw.elapsed(),
            state_loading,
            keys_loaded: keys,
            bytes_loaded: bytes,
            snapshot,
        };
        activation.log();
        let mut m = inner.metrics.lock();
        m.activations += 1;
        m.push_activation(activation);
        Ok(true)
    }

    async fn acquire(&self, object: &ObjectId) -> Result<HeldLease> {
        self.acquire_within(object, self.inner.settings.acquire_timeout).await
    }

    async fn acquire_within(&self, object: &ObjectId, wait: Duration) -> Result<HeldLease> {
        let inner = &self.inner;
        // How long this acquire has waited, on the clock's monotonic time (a wall-clock step
        // must not stretch or cut `acquire_timeout`).
        let started = inner.clock.monotonic();
        let mut flight =
            AcquireInFlight { inner, object, pending: inner.unsure.lock().remove(object), sent: None, earlier: None };
        // An earlier acquire of this object whose outcome was never learned (a cancelled call)
        // may have left this node a lease, granted since it was sent (possibly after the call
        // gave up: a blocking task or a queued request runs on). Settled first, on its own.
        if let Some(since) = flight.pending {
            match current_within_ttl(inner, object).await {
                Ok(Some(l)) if granted_here_since(inner, &l, since) => {
                    flight.pending = None;
                    return Ok(HeldLease::new(inner, flight.done(l), SentAt::now(inner)));
                }
                // Not granted (yet): that acquire may still land while this one is sent, and
                // then refuse it naming this node (see `LeaseHeld` below).
                Ok(_) => flight.not_granted_yet(since),
                // Still unknown: remembered for the next activation and `maintain`.
                Err(e) => return Err(e.context(format!("settling an earlier acquire of {object} on {}", inner.node))),
            }
        }
        let mut unknown = 0;
        loop {
            if inner.shutdown_flushed.load(Ordering::SeqCst) {
                // Waiting for another node's lease past shutdown's flush: no lease is taken once
                // shutdown has given the leases back.
                return Err(shut_down_while_waiting(object));
            }
            // Until its answer arrives, this acquire's outcome is unknown (to a cancelled call,
            // for good).
            let sent_at = SentAt::now(inner);
            let sent = sent_at.wall;
            flight.sent = Some(sent);
            // An acquire that does not answer within a TTL (a hung connection) is given up on: the
            // call holds the object's slot meanwhile, and `flush_all` the slots of every object
            // it collected. Its outcome stays unknown (`flight` records it when dropped), settled
            // by the object's next activation or `maintain`.
            let acquire = inner.guard.acquire(object, &inner.node, inner.settings.lease_ttl);
            let Some(result) = timed(inner, inner.settings.lease_ttl, acquire).await else {
                return Err(Error::unavailable(format!(
                    "acquiring {object} on {}: the guard did not answer within the lease's TTL; the acquire may \
                     still land (the next activation settles it)",
                    inner.node
                ))
                .with_source(NoAnswer));
            };
            flight.sent = None;
            let e = match result {
                Ok(l) => return Ok(HeldLease::new(inner, flight.done(l), sent_at)),
                Err(e) => e,
            };
            if e.kind() == &ErrorKind::AmbiguousOutcome {
                // It may have landed, its reply lost: the guard says whether this node holds the
                // object now. A lease granted to this node since the acquire was sent is the
                // acquire's; an older one is another runtime's under the same node id
                // (adopting it would share its token) and is waited for.
                flight.pending = Some(sent);
                match current_within_ttl(inner, object).await {
                    Ok(Some(l)) if granted_here_since(inner, &l, sent) => {
                        flight.pending = None;
                        // Granted no earlier than this acquire was sent.
                        return Ok(HeldLease::new(inner, flight.done(l), sent_at));
                    }
                    // Not landed: settled, and forgotten. (With a remote guard a queued request
                    // might still land later; remembering it would also adopt, or give back, a
                    // lease another runtime under the same node id takes later, which breaks that
                    // runtime's fencing. A late landing leaves the object held for at most a
                    // TTL, by no call: every node waits it out.)
                    Ok(_) => {
                        flight.pending = None;
                        if unknown < 3 {
                            unknown += 1;
                            tracing::debug!(object = %object, "dotdo: an acquire with an unknown outcome did not land; retrying");
                            continue;
                        }
                        return Err(e.context(format!("acquiring {object} on {}", inner.node)));
                    }
                    // Still unknown: remembered for the next activation and `maintain`.
                    Err(_) => return Err(e.context(format!("acquiring {object} on {}", inner.node))),
                }
            }
            let now = inner.clock.now();
            let pause = match e.kind() {
                ErrorKind::LeaseHeld { holder, expires_at, .. } => {
                    // Refused naming this node: the earlier acquire settled above as not granted
                    // landed meanwhile (its task ran on). Its lease is this call's to adopt, not
                    // one to wait out for a TTL.
                    if let (true, Some(since)) = (*holder == inner.node, flight.earlier) {
                        match current_within_ttl(inner, object).await {
                            Ok(Some(l)) if granted_here_since(inner, &l, since) => {
                                // Settled: landed, and adopted. Remembered still, it would have
                                // `maintain` release (or a call adopt) a lease another runtime
                                // under this node id takes once this one is given back.
                                flight.earlier = None;
                                return Ok(HeldLease::new(inner, flight.done(l), SentAt::now(inner)));
                            }
                            Ok(_) => {}
                            Err(e) => return Err(e.context(format!("acquiring {object} on {}", inner.node))),
                        }
                    }
                    expires_at.since(now)
                }
                _ if e.is_retryable() => Duration::from_millis(10),
                _ => return Err(e.context(format!("acquiring {object} on {}", inner.node))),
            };
            let left = wait.saturating_sub(inner.clock.monotonic().saturating_sub(started));
            if left.is_zero() {
                let hint = self
                    .owner_hint(object)
                    .filter(|n| *n != inner.node)
                    .map(|n| format!(" (ring owner: {n})"))
                    .unwrap_or_default();
                return Err(e.context(format!("acquiring {object} on {}{hint}", inner.node)));
            }
            let pause = pause.min(left).clamp(Duration::from_millis(1), Duration::from_millis(50));
            inner.clock.sleep(pause).await;
        }
    }

    /// Decide whether the object needs recovery from cold storage and perform it per the
    /// restore mode. Returns (recovery, keys loaded, bytes loaded, snapshot).
    async fn recover(
        &self,
        object: &ObjectId,
        active: &mut Active,
        hand: &mut LeaseInHand<'_>,
    ) -> Result<(Recovery, u64, u64, Option<i64>)> {
        let inner = &self.inner;
        let mut raised = false;
        let (info, hot_has_state, wm) = loop {
            let info = inner.hot.object_info(object).await?;
            // Live keys, changes to drain, or a state the store knows is whole (an object whose
            // keys were all deleted, not an evicted one: nothing to restore).
            let hot_has_state = info.as_ref().is_some_and(|i| i.keys > 0 || i.has_pending_changes() || i.resident);
            let wm = match inner.cold.watermark(object).await {
                Ok(wm) => wm,
                // The checks against cold below are a safety net for a hot store that lost
                // state; an unreachable cold store does not keep an object with hot state from
                // running (its drains, and a later activation, compare what it wrote meanwhile
                // with cold).
                Err(e) if hot_has_state && e.is_retryable() => {
                    tracing::warn!(object = %object, error = %e, "dotdo: cold watermark unavailable; activating from hot state");
                    active.cold_unverified = true;
                    return Ok((Recovery::Hot, 0, 0, None));
                }
                Err(e) => return Err(e),
            };
            // Tokens only go up and a lease is never issued twice: a new lease at or below a
            // token cold storage has already seen means the hot store or the guard lost
            // (rolled back) lease state.
            if active.lease.granted.token <= wm.token {
                if raised {
                    return Err(Error::corrupt(format!(
                        "{object}: the guard issues token {} but cold storage has already seen token {}; \
                         the guard's lease state was lost and it does not floor tokens at the hot store's",
                        active.lease.granted.token, wm.token
                    )));
                }
                // Raise the hot store's token floor to cold's and take a lease above it, or
                // every cold commit would be fenced; then decide afresh under the new lease.
                tracing::warn!(object = %object, lease = %active.lease.granted.token, cold = %wm.token,
                    "dotdo: the lease token is not above cold storage's; the hot store or guard lost state");
                let floor = WriteBatch::new(inner.settings.type_name.clone());
                if let Err(e) = inner.hot.write(object, wm.token, floor).await {
                    // The hot store already accepted a token above cold's, and the guard issued one
                    // below both while this lease is still the current one: the guard does not
                    // floor its tokens at the hot store's (which the builder requires). (Ours run
                    // out meanwhile, another holder's newer lease fences this write: that stands.)
                    // (Bounded as every guard call made holding the slot: one that does not
                    // answer leaves the lease not known to be current, and the refusal stands.)
                    let ours_current = e.is_fenced() && {
                        let check = inner.guard.validate(&active.lease.granted);
                        within(inner, inner.settings.lease_ttl, check, "the lease check did not answer").await.is_ok()
                    };
                    return Err(if ours_current {
                        Error::corrupt(format!(
                            "{object}: the guard issues token {} while cold storage has seen token {} and the \
                             hot store a higher one ({e}); the guard does not floor tokens at the hot store's",
                            active.lease.granted.token, wm.token
                        ))
                    } else {
                        e
                    });
                }
                release_quietly(inner, &active.lease.granted).await;
                active.lease = self.acquire(object).await?;
                hand.replace(active.lease.granted.clone());
                raised = true;
                continue;
            }
            break (info, hot_has_state, wm);
        };
        let hot_seq = info.as_ref().map_or(0, |i| i.last_seq);
        if let Some(i) = info.as_ref().filter(|i| i.has_pending_changes() && i.truncated_through < wm.through) {
            // Renewed as the restores are: the check reads every pending change cold also has,
            // which can outlast the lease (a crash between a large commit and its truncation);
            // without renewal the activation ended on a lease already run out, and every later
            // activation, flushes included, ran the same check again: the object was stuck.
            let check = check_pending_against_cold(inner, object, i.truncated_through, &wm);
            with_renewal(inner, &mut active.lease, check).await?;
        }
        if hot_has_state && hot_seq >= wm.through {
            return Ok((Recovery::Hot, 0, 0, None));
        }
        if let Some(i) = info.as_ref().filter(|i| !hot_has_state && i.truncated_through > wm.through) {
            // The hot store dropped changes through `truncated_through` because cold storage
            // acknowledged them, and cold no longer has them: activating from the empty hot
            // state would silently serve (and build on) an object without its state.
            return Err(Error::corrupt(format!(
                "{object}: cold storage acknowledged changes through seq {} (the hot store truncated them), \
                 but now holds them only through seq {}; the cold store lost data, this runtime \
                 uses a different table or cold store than the one that acknowledged them, or its \
                 cold store reads a stale table (Iceberg with refresh_reads off)",
                i.truncated_through, wm.through
            )));
        }
        if !hot_has_state && (wm.through == 0 || hot_seq > wm.through) {
            return Ok((Recovery::Hot, 0, 0, None));
        }
        let token = active.lease.granted.token;
        if hot_has_state {
            // The hot store is behind cold storage (it lost committed transactions: power loss
            // under synchronous=NORMAL, a restored backup, a lagging replica). Cold has every
            // change up to `wm.through`, the hot store's included: replace the hot state with
            // cold's, so that new writes take sequence numbers after cold's and are not
            // skipped there as replays.
            tracing::warn!(object = %object, hot_seq, cold_through = wm.through,
                "dotdo: the hot store is behind cold storage; restoring from cold");
            if info.as_ref().is_some_and(|i| i.has_pending_changes()) {
                // Checked against cold above: these are the very changes cold has.
                inner.hot.truncate_changes(object, token, hot_seq).await?;
            }
            return with_renewal(inner, &mut active.lease, restore_eager(inner, object, token, &wm)).await;
        }
        match &inner.settings.restore {
            RestoreMode::Eager => {
                with_renewal(inner, &mut active.lease, restore_eager(inner, object, token, &wm)).await
            }
            mode => {
                // The snapshot and the watermark it pins, from one answer: reads are served there as
                // the state through the watermark.
                // (A sink without a single read of its table reads the object's state for it:
                // renewed as a restore is.)
                let (snapshot, at) = with_renewal(inner, &mut active.lease, inner.cold.head(object)).await?;
                // Decided on `wm` above: a store answering an older table now must not pin state
                // older than what it acknowledged.
                refuse_older_than_decided(object, "watermark", at.through, &wm)?;
                let mut lazy = LazyState::new(snapshot, at.through);
                let (mut keys, mut bytes) = (0, 0);
                let recovery = if let RestoreMode::Hybrid { keys: named, prefixes } = mode {
                    let (k, b) =
                        with_renewal(inner, &mut active.lease, preload(inner, object, &mut lazy, named, prefixes))
                            .await?;
                    keys += k;
                    bytes += b;
                    Recovery::Hybrid
                } else {
                    Recovery::Lazy
                };
                // The snapshot reads are served at: a preload may have re-pinned a newer one
                // (the first was expired meanwhile).
                let pinned = lazy.snapshot;
                active.lazy = Some(lazy);
                inner.metrics.lock().lazy_restores += 1;
                Ok((recovery, keys, bytes, pinned))
            }
        }
    }

    /// Prefetch hook: activate `object` ahead of a predicted call (take the lease, recover its
    /// state per the restore mode, preload `keys` and `prefixes` into the lazy cache).
    /// `Shutdown` once [`shutdown`](Self::shutdown) has begun. The object stays active, its
    /// lease held, until a call, [`maintain`](Self::maintain) or eviction lets it go, whatever
    /// [`keep_warm`](RuntimeSettings::keep_warm) says (0 included: a prefetch that handed its
    /// lease back at once would prefetch nothing); another node's call meanwhile finds the
    /// object held.
    pub async fn prefetch(&self, object: &ObjectId, keys: &[String], prefixes: &[String]) -> Result<()> {
        for k in keys {
            crate::ids::validate_key(k)?;
        }
        let _guard = self.enter()?;
        let slot = self.slot(object);
        let out = self.prefetch_in(object, keys, prefixes, &slot).await;
        self.give_back_if_shut_down(&slot).await;
        out
    }

    async fn prefetch_in(&self, object: &ObjectId, keys: &[String], prefixes: &[String], slot: &SlotRef) -> Result<()> {
        let mut slot = slot.lock().await;
        self.ensure_active(object, &mut slot).await?;
        let active = slot.active.as_mut().expect("active");
        // A prefetch announces use: `maintain` must not release or evict the object as idle
        // right after it.
        active.last_used = self.inner.clock.monotonic();
        if let Some(lazy) = active.lazy.as_mut() {
            let preloaded =
                with_renewal(&self.inner, &mut active.lease, preload(&self.inner, object, lazy, keys, prefixes)).await;
            if let Err(e) = preloaded {
                give_back_if_spent(&self.inner, &mut slot, &e).await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Complete every pending lazy restore (e.g. from an idle moment). Objects with a call in
    /// progress are skipped (their next write completes the restore), so this never waits for a
    /// handler, and may be called from one. One object that fails does not stop the others; the
    /// first failure is returned at the end. `Shutdown` once shutdown has begun.
    pub async fn complete_restores(&self) -> Result<()> {
        let out = self.complete_restores_in().await;
        self.give_back_all_if_shut_down().await;
        out
    }

    async fn complete_restores_in(&self) -> Result<()> {
        let _guard = self.enter()?;
        let mut first_err = None;
        let mut swept = self.inner.clock.monotonic();
        for (object, slot) in self.active_slots() {
            self.renew_during_pass(&mut swept).await;
            let Some(mut slot) = slot.try_lock() else { continue };
            if let Some(active) = slot.active.as_mut() {
                if active.lazy.is_some() {
                    let token = active.lease.granted.token;
                    let restored = complete_restore(&self.inner, &object, token, &mut active.lazy);
                    if let Err(e) = with_renewal(&self.inner, &mut active.lease, restored).await {
                        tracing::warn!(object = %object, error = %e, "dotdo: lazy restore not completed");
                        give_back_if_spent(&self.inner, &mut slot, &e).await;
                        // A restore of unknown outcome is simply done again (it is idempotent
                        // under the lease): nothing for the caller to settle.
                        let e = if e.kind() == &ErrorKind::AmbiguousOutcome {
                            Error::unavailable(format!(
                                "{object}: completing its lazy restore had an unknown outcome; it is done again \
                                 on the next try (nothing else was written)"
                            ))
                            .with_source(e)
                        } else {
                            e
                        };
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Within a pass over the objects that may take long (`evict_idle`, `complete_restores`:
    /// each object a cold commit or read), the leases of the others are renewed as they fall
    /// due, looked at every sixth of the TTL at most (renewal is due with two thirds left), as
    /// `flush_all` renews the leases it holds: a pass longer than the TTL let a warm object's
    /// lease run out, and `maintain` gave it back (its next call a cold start; an object kept
    /// for another eviction attempt released with its state in hot storage). Only renewed here:
    /// a lease that cannot be is left to the pass and to `maintain` (an idle object whose lease
    /// lapsed is still evicted). `last` is when the leases were last looked at.
    async fn renew_during_pass(&self, last: &mut Duration) {
        let inner = &self.inner;
        let now = inner.clock.monotonic();
        if now.saturating_sub(*last) < inner.settings.lease_ttl / 6 {
            return;
        }
        *last = now;
        for (object, slot) in self.active_slots() {
            let Some(mut guard) = slot.try_lock() else { continue };
            let Some(active) = guard.active.as_mut() else { continue };
            // (Not one `maintain` gives back anyway.)
            if active.idle_past_keep_warm(inner, now) {
                continue;
            }
            if let Err(e) = renew_if_due(inner, &mut active.lease).await {
                tracing::debug!(object = %object, error = %e, "dotdo: lease not renewed during a pass; left to maintain");
            }
        }
    }

    fn active_slots(&self) -> Vec<(ObjectId, Arc<futures::lock::Mutex<Slot>>)> {
        let mut v: Vec<_> = self.inner.slots.lock().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Drain `object`'s change log to cold storage (exactly once) and truncate it. Takes the
    /// lease if this runtime does not hold it and there are changes to drain (with none, it
    /// returns an empty report at once). `Shutdown` once [`shutdown`](Self::shutdown) has
    /// begun (shutdown flushes every held object itself).
    pub async fn flush(&self, object: &ObjectId) -> Result<FlushReport> {
        let _guard = self.enter()?;
        let slot = self.slot(object);
        let out = self.flush_in(object, &slot).await;
        self.give_back_if_shut_down(&slot).await;
        out
    }

    async fn flush_in(&self, object: &ObjectId, slot: &SlotRef) -> Result<FlushReport> {
        let mut slot = slot.lock().await;
        // Nothing to drain for an object not active here: no activation (which, for an evicted
        // object, would restore its whole state into hot storage).
        if slot.active.is_none() && !self.inner.hot.object_info(object).await?.is_some_and(|i| i.has_pending_changes())
        {
            return Ok(FlushReport::default());
        }
        self.refuse_if_shutting_down(object)?;
        let taken_to_drain = slot.active.is_none();
        if !self.ensure_active_to_drain(object, &mut slot, self.inner.settings.acquire_timeout).await? {
            // Drained and evicted by another runtime meanwhile.
            return Ok(FlushReport::default());
        }
        let taken = TakenOnlyFor::new(&self.inner, &mut slot, taken_to_drain);
        let active = taken.slot.active.as_mut().expect("active");
        let token = active.lease.granted.token;
        let r = verified_then(&self.inner, object, active, drain(&self.inner, object, token, usize::MAX)).await;
        // A lease taken only to drain goes back at once, as `flush_all` gives such objects back:
        // kept warm, it refused its owner's calls for `keep_warm`.
        if taken.finish() || r.as_ref().is_err_and(activation_spent) {
            give_back(&self.inner, &mut slot.active).await;
        }
        self.after_call(&mut slot).await;
        r.map_err(retry_restores)
    }

    /// Drain the change logs of every object this runtime holds, batching many objects into each
    /// cold commit (fewer, larger snapshots). Objects with a call in progress are skipped and
    /// counted in [`FlushReport::busy`]; only objects with changes to drain are held (their
    /// leases renewed between and during commits), and an object whose warm lease lapsed is
    /// taken again.
    /// An object taken over by another node during its commit is left to that node (its changes
    /// are in cold storage, where the new holder's drain finds them). Then the objects whose
    /// changes wait in the hot store with no holder (released after each call with `keep_warm`
    /// 0, released idle by
    /// [`maintain`](Self::maintain), or left by a runtime that is gone) are taken without
    /// waiting, drained and given back, except those another node holds or, with a ring, those
    /// the ring gives another node. An object whose skipped replays differ from cold's changes is left
    /// untruncated while the others are drained, and its `Corrupt` is returned at the end; so
    /// is the error of an object whose hot state or lease could not be read (it stays active,
    /// its changes in hot storage). A guard call that does not answer within the lease's time
    /// (a hung connection) fails as a retryable `Unavailable`.
    /// `Shutdown` once [`shutdown`](Self::shutdown) has begun (it flushes itself).
    pub async fn flush_all(&self) -> Result<FlushReport> {
        let out = self.flush_all_in().await;
        self.give_back_all_if_shut_down().await;
        out.map_err(retry_restores)
    }

    async fn flush_all_in(&self) -> Result<FlushReport> {
        let _guard = self.enter()?;
        self.flush_held().await
    }

    /// Take `object` again to drain it after its warm lease (token `lapsed`) ran out here, without
    /// waiting for another holder: whether it is active again (`false`: drained and evicted
    /// meanwhile, or another runtime under this node id holds it), and whether the lapsed lease
    /// was given back. Refused naming this very node, the lapsed lease may still be current at
    /// the guard (counted as run out here a round trip, or a clock skew, before the guard's
    /// expiry): then it is given back and the object taken again; one that ran out meanwhile is
    /// simply taken again. A lease under another token is another runtime's under this node
    /// id, left to it as another holder's.
    async fn retake_lapsed(
        &self,
        object: &ObjectId,
        slot: &mut Slot,
        lapsed: Option<FencingToken>,
    ) -> (Result<bool>, bool) {
        let inner = &self.inner;
        let mut released = false;
        for _ in 0..2 {
            let attempt = self.ensure_active_to_drain(object, slot, Duration::ZERO).await;
            if !matches!(&attempt, Err(e) if held_by(e, &inner.node) == Some(true)) {
                return (attempt, released);
            }
            match current_within_ttl(inner, object).await {
                Ok(Some(cur)) if Some(cur.token) == lapsed && !released => {
                    release_quietly(inner, &cur).await;
                    released = true;
                }
                // Ran out meanwhile: taken again at once.
                Ok(None) => {}
                // Still this runtime's (its release failed): reported by the caller.
                Ok(Some(cur)) if Some(cur.token) == lapsed => return (attempt, released),
                Ok(Some(_)) => {
                    tracing::info!(object = %object, "dotdo flush_all: held by another runtime under this node id; skipped");
                    return (Ok(false), released);
                }
                Err(e) => return (Err(e), released),
            }
        }
        (self.ensure_active_to_drain(object, slot, Duration::ZERO).await, released)
    }

    /// [`flush_all`](Self::flush_all) without the shutdown check (shutdown's own flush).
    async fn flush_held(&self) -> Result<FlushReport> {
        let inner = &self.inner;
        let mut report = FlushReport::default();
        let mut rounds = DrainRounds::default();
        let mut held: Vec<Held> = Vec::new();
        for (object, slot) in self.active_slots() {
            // Never wait for a busy slot while holding others: a handler of that object that
            // invokes one of the held objects would wait for us while we wait for it.
            // The leases held so far, renewed where due: collecting the objects to drain (a cold
            // watermark read and an acquire per released object, pages of 256) can outlast a
            // lease, and the first drain round found them run out and failed the flush.
            renew_held(inner, &mut held, &mut rounds.left_out, &mut rounds.lapsed).await;
            let Some(mut guard) = slot.try_lock_owned() else {
                rounds.busy.insert(object);
                continue;
            };
            let Some(a) = guard.active.as_ref() else { continue };
            // Only objects with changes to drain are held: a call on a clean object need not
            // wait for the whole flush.
            // A failure here leaves this object out (still active, its changes in hot storage)
            // and the flush goes on with the others; it is returned at the end. (It failed the
            // whole flush, and a shutdown then drained nothing.)
            match inner.hot.object_info(&object).await {
                Ok(Some(info)) if info.has_pending_changes() => {}
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(object = %object, error = %e, "dotdo flush_all: object not read; left out");
                    rounds.first_err.get_or_insert(e);
                    continue;
                }
            }
            // Only objects whose lease is still this runtime's: a stale one would either fence
            // the whole multi-object commit or append another holder's changes under it. A
            // lease run out already goes straight to being taken again (checked, it raced a
            // zero-length timer, which beat any guard that does not answer at once). The check
            // is bounded by one TTL, as every guard call made holding a slot: one that never
            // answers (a hung connection) held the slot, and the flush, for ever. After one
            // such call the guard is not asked again in this pass: with a TTL per object, a
            // guard out of reach held a shutdown of N warm objects for about N TTLs.
            if rounds.unanswered {
                rounds.first_err.get_or_insert_with(not_asked);
                continue;
            }
            let checked = if a.lease.left(inner).is_zero() {
                Err(Error::new(
                    ErrorKind::LeaseLost { object: object.clone() },
                    "the warm lease ran out (nothing renewed it)",
                ))
            } else {
                let check = inner.guard.validate(&a.lease.granted);
                within(inner, inner.settings.lease_ttl, check, "the lease check did not answer within the lease's TTL")
                    .await
            };
            rounds.unanswered |= checked.as_ref().is_err_and(unanswered);
            match checked {
                Ok(()) => {
                    let token = a.lease.granted.token;
                    held.push(Held { object, token, guard, taken: None });
                }
                // Lapsed (a warm lease nobody renewed: no `maintain` ran): take the object again
                // and drain it, unless another holder has it now. Without waiting for that
                // holder (slots are held meanwhile). Any other failure leaves the object out and
                // fails the flush at its end: the pass over released objects may not reach it
                // (`drain_released` off, or the ring gives it to another node), and this
                // runtime's acknowledged changes would wait in hot storage behind an `Ok`.
                Err(e) if matches!(e.kind(), ErrorKind::LeaseLost { .. }) => {
                    let lapsed = guard.active.take();
                    let lapsed_token = lapsed.as_ref().map(|a| a.lease.granted.token);
                    let in_hand = LapsedInHand { inner, object: &object, lapsed: Some(lapsed) };
                    let (retaken, released) = self.retake_lapsed(&object, &mut guard, lapsed_token).await;
                    let lapsed = in_hand.disarm();
                    rounds.unanswered |= retaken.as_ref().is_err_and(unanswered);
                    let retaken = match retaken {
                        Err(e) if released && held_by(&e, &inner.node) != Some(false) => {
                            // Given back (or queued for release as an orphan): the lapsed
                            // activation is never restored, its lease no longer this runtime's.
                            // Its changes are still this runtime's to drain: the next flush.
                            drop(lapsed);
                            owe(inner, &object);
                            tracing::warn!(object = %object, error = %e, "dotdo flush_all: lapsed lease given back, object not retaken");
                            rounds.first_err.get_or_insert(e);
                            continue;
                        }
                        r => r,
                    };
                    match retaken {
                        // Drained and evicted by another runtime since it lapsed.
                        Ok(false) => {}
                        Ok(true) => {
                            let token = guard
                                .active
                                .as_ref()
                                .expect("ensure_active leaves the object active")
                                .lease
                                .granted
                                .token;
                            held.push(Held { object, token, guard, taken: None });
                        }
                        Err(e) if held_by(&e, &inner.node) == Some(false) => {
                            tracing::info!(object = %object, error = %e, "dotdo flush_all: lapsed lease taken by another holder; skipped");
                        }
                        // Any other failure (this node's lapsed lease not given back, say): the
                        // changes are this runtime's to drain and were not, which the flush
                        // reports. (A refusal naming this node counted as another holder's, and
                        // the flush answered `Ok` with them left in hot storage.)
                        Err(e) => {
                            tracing::warn!(object = %object, error = %e, "dotdo flush_all: lapsed lease not retaken");
                            // Still this runtime's to drain: the next flush (or the next call)
                            // finds the lapsed activation and takes the object again.
                            guard.active = lapsed;
                            rounds.first_err.get_or_insert(e);
                        }
                    }
                }
                Err(e) if lease_gone(&e) => {
                    tracing::info!(object = %object, error = %e, "dotdo flush_all: lease no longer held; skipped");
                    guard.active = None;
                }
                Err(e) => {
                    tracing::warn!(object = %object, error = %e, "dotdo flush_all: lease not checked; left out");
                    rounds.first_err.get_or_insert(e);
                }
            }
        }
        // Then the objects whose changes wait with no holder, a page at a time; the first page
        // joins the held objects' commits.
        let mut after: Option<ObjectId> = None;
        loop {
            // A failure to list them leaves the held objects to be drained all the same.
            let more = if self.inner.settings.drain_released {
                match self.take_pending(&mut held, &mut after, &mut rounds).await {
                    Ok(more) => more,
                    Err(e) => {
                        tracing::warn!(error = %e, "dotdo flush_all: objects with pending changes not listed");
                        rounds.first_err.get_or_insert(e);
                        false
                    }
                }
            } else {
                // Only those an earlier flush gave back undrained (see `Inner::owed`).
                if after.is_none() {
                    let owed: Vec<ObjectId> = inner.owed.lock().iter().cloned().collect();
                    self.take_listed(owed, &mut held, &mut rounds).await;
                }
                false
            };
            let r = self.drain_rounds(&mut held, &mut report, &mut rounds).await;
            // Objects taken only for this flush go back, and so do those left out (taken over,
            // diverged from cold, or behind it: the next activation decides afresh); with
            // `drain_released` off a left-out one is owed to the next flush, a drained one no
            // longer.
            for h in &mut held {
                if rounds.left_out.contains(&h.object) {
                    // Owed before the release is awaited: a flush dropped during it (a host's
                    // timeout around a release that hangs) left the object neither held nor
                    // owed, and every later flush answered `Ok` with its changes in hot storage.
                    owe(inner, &h.object);
                    give_back_in_pass(inner, &mut h.guard.active, &mut rounds).await;
                    continue;
                }
                if h.taken.is_some() {
                    give_back_in_pass(inner, &mut h.guard.active, &mut rounds).await;
                }
                // Drained whole only if every round went through (a round after a first
                // commit of the object can still fail).
                if r.is_ok() && rounds.drained.contains(&h.object) && !rounds.unreadable.contains(&h.object) {
                    inner.owed.lock().remove(&h.object);
                }
            }
            r?;
            settle_lapsed(inner, &mut rounds).await;
            held.clear();
            if !more {
                break;
            }
            if rounds.unanswered {
                // The next pages would only be read to be left out (a release of this page's
                // leases may be what went unanswered: then nothing said so yet).
                rounds.first_err.get_or_insert_with(not_asked);
                break;
            }
        }
        report.busy = rounds.busy.len() as u64;
        match rounds.first_err {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Drain the pending changes of `held` objects (this runtime holds each one's lease and
    /// slot) in cold commits of at most `flush_batch_records` records.
    async fn drain_rounds(&self, held: &mut [Held], report: &mut FlushReport, rounds: &mut DrainRounds) -> Result<()> {
        let inner = &self.inner;
        let DrainRounds { drained, left_out, unreadable, first_err, lapsed, .. } = rounds;
        // Activations made while cold storage was unreachable: compared with cold before any of
        // their changes goes into a commit (the others' leases renewed between them: after a
        // cold outage, many may wait to be compared).
        for i in 0..held.len() {
            let flagged = held[i].guard.active.as_ref().is_some_and(|a| a.cold_unverified);
            if !flagged || left_out.contains(&held[i].object) {
                continue;
            }
            renew_held(inner, held, left_out, lapsed).await;
            let (before, rest) = held.split_at_mut(i);
            let Some((h, after)) = rest.split_first_mut() else { continue };
            if left_out.contains(&h.object) {
                continue;
            }
            let Some(active) = h.guard.active.as_mut() else { continue };
            // (The others' leases renewed meanwhile: the check can read a large overlap.)
            let check = verify_against_cold(inner, &h.object, active);
            if let Err(e) = renewing_parts(inner, &mut [before, after], left_out, lapsed, check).await {
                tracing::error!(object = %h.object, error = %e, "dotdo flush_all: pending changes not verified against cold; left out");
                left_out.insert(h.object.clone());
                first_err.get_or_insert(e);
            }
        }
        loop {
            renew_held(inner, held, left_out, lapsed).await;
            let mut last_seqs = HashMap::new();
            let mut batch = ColdBatch::default();
            let mut budget = inner.settings.flush_batch_records;
            let mut bytes_left = inner.settings.flush_batch_bytes;
            for Held { object, token, .. } in held.iter() {
                if budget == 0 || bytes_left == 0 {
                    break;
                }
                if left_out.contains(object) || unreadable.contains(object) {
                    continue;
                }
                // An object whose hot state cannot be read (its change log damaged, or a passing
                // failure) is left out and the others are drained; the first such error is
                // returned at the end (it ended the whole drain: every object of this commit and
                // of later rounds stayed undrained, at every `flush_all`).
                // (Still active: as in the collection of held objects, an object whose hot state
                // is unreadable for a moment is no reason to give its activation back.)
                let mut leave_out = |e: Error| {
                    tracing::error!(object = %object, error = %e, "dotdo flush_all: hot state unreadable; left out");
                    unreadable.insert(object.clone());
                    first_err.get_or_insert(e);
                };
                let info = match inner.hot.object_info(object).await {
                    Ok(Some(info)) => info,
                    Ok(None) => continue,
                    Err(e) => {
                        leave_out(e);
                        continue;
                    }
                };
                if !info.has_pending_changes() {
                    continue;
                }
                let first_in_commit = batch.objects.is_empty();
                let read = read_for_commit(inner, object, info.truncated_through, budget, bytes_left, first_in_commit);
                let (records, used, read_any) = match read.await {
                    Ok(r) => r,
                    Err(e) => {
                        leave_out(e);
                        continue;
                    }
                };
                if newer_holder(&records, *token).is_some() {
                    tracing::info!(object = %object, "dotdo flush_all: another node took the object over; skipped");
                    left_out.insert(object.clone());
                    continue;
                }
                if read_any && records.is_empty() {
                    // The commit is full: this object's changes go in the next round.
                    break;
                }
                bytes_left -= used;
                budget -= records.len().min(budget);
                last_seqs.insert(object.clone(), info.last_seq);
                if !records.is_empty() {
                    batch.objects.push(ObjectChanges { object: object.clone(), token: *token, records });
                }
            }
            if batch.objects.is_empty() {
                break;
            }
            let n = batch.record_count() as u64;
            let appended = renewing_held(inner, held, left_out, lapsed, append_resolving(inner, batch.clone())).await;
            let appended = match appended {
                Ok(c) => c,
                // Refused for good: find which objects cold refuses, each appended alone. Those
                // are left out (the first error is returned at the end); the others' records are
                // now in cold, and the next round truncates them (found there, and verified).
                Err(e) if !e.is_retryable() && e.kind() != &ErrorKind::AmbiguousOutcome => {
                    if batch.objects.len() == 1 {
                        let oc = &batch.objects[0];
                        if e.is_fenced() {
                            // Taken over, and drained by its new holder under a newer token
                            // during this commit: left to that node, as a fenced renewal is.
                            tracing::info!(object = %oc.object, error = %e, "dotdo flush_all: cold fenced the object; left to its new holder");
                            left_out.insert(oc.object.clone());
                            continue;
                        }
                        let first_seq = oc.records.first().map_or(0, |r| r.seq);
                        let e = explain_gap(inner, &oc.object, first_seq, e).await;
                        tracing::error!(object = %oc.object, error = %e, "dotdo flush_all: cold refused the object's changes");
                        left_out.insert(oc.object.clone());
                        first_err.get_or_insert(e);
                        continue;
                    }
                    for oc in batch.objects {
                        // The held leases stay renewed between these commits, as between rounds.
                        renew_held(inner, held, left_out, lapsed).await;
                        if left_out.contains(&oc.object) {
                            continue;
                        }
                        let object = oc.object.clone();
                        let first_seq = oc.records.first().map_or(0, |r| r.seq);
                        let alone = append_resolving(inner, ColdBatch { objects: vec![oc] });
                        match renewing_held(inner, held, left_out, lapsed, alone).await {
                            Ok(c) => {
                                // Counted here: the next round finds these records in cold
                                // (skipped, written 0) when it truncates them.
                                count_commit(inner, report, &c);
                            }
                            Err(e) if e.is_fenced() => {
                                tracing::info!(object = %object, error = %e, "dotdo flush_all: cold fenced the object; left to its new holder");
                                left_out.insert(object);
                            }
                            Err(e) if !e.is_retryable() && e.kind() != &ErrorKind::AmbiguousOutcome => {
                                let e = explain_gap(inner, &object, first_seq, e).await;
                                tracing::error!(object = %object, error = %e, "dotdo flush_all: cold refused the object's changes");
                                left_out.insert(object);
                                first_err.get_or_insert(e);
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            // Counted as it lands: a check or a truncation below may still fail.
            count_commit(inner, report, &appended);
            let commit = appended.commit;
            let mut diverged_now = std::collections::BTreeSet::new();
            if commit.records_skipped > 0 {
                // With the held leases renewed meanwhile, as during the commit: the checks read
                // every skipped change back from hot and cold, which can outlast the leases
                // (each object's then ran out, and the flush failed with its changes left in hot).
                let checks = async {
                    let mut failed = Vec::new();
                    for oc in &batch.objects {
                        let after = oc.records.first().map_or(0, |r| r.seq.saturating_sub(1));
                        if let Err(e) = check_skipped(inner, &oc.object, after, &commit).await {
                            failed.push((oc.object.clone(), e));
                        }
                    }
                    failed
                };
                for (object, e) in renewing_held(inner, held, left_out, lapsed, checks).await {
                    // This object is left alone (nothing truncated, out of later rounds); the
                    // others are drained, and the first such error is returned at the end.
                    tracing::error!(object = %object, error = %e, "dotdo flush_all: not truncated");
                    diverged_now.insert(object.clone());
                    left_out.insert(object);
                    first_err.get_or_insert(e);
                }
            }
            for oc in batch.objects.iter().filter(|oc| !diverged_now.contains(&oc.object)) {
                let through = commit.watermarks.get(&oc.object).map_or(0, |w| w.through);
                let hot_last = last_seqs.get(&oc.object).copied().unwrap_or(Seq::MAX);
                let appended = oc.records.last().map_or(0, |r| r.seq);
                if let Err(e) = check_durable_through(&oc.object, hot_last, appended, through) {
                    tracing::error!(object = %oc.object, error = %e, "dotdo flush_all: not truncated");
                    left_out.insert(oc.object.clone());
                    first_err.get_or_insert(e);
                    continue;
                }
                match inner.hot.truncate_changes(&oc.object, oc.token, through).await {
                    // Drained: a pause of its automatic flushes after a refusal is over.
                    Ok(()) => {
                        inner.object_flush_pause.lock().remove(&oc.object);
                    }
                    // Taken over since it was held (its changes are in cold all the same; the
                    // new holder's drain finds them there): left out, the others go on.
                    Err(e) if lease_gone(&e) => {
                        tracing::info!(object = %oc.object, error = %e, "dotdo flush_all: taken over before its truncation");
                        left_out.insert(oc.object.clone());
                        continue;
                    }
                    // Its changes are in cold all the same (the next flush finds them there and
                    // truncates); the others are truncated and drained.
                    Err(e) => {
                        tracing::error!(object = %oc.object, error = %e, "dotdo flush_all: not truncated");
                        unreadable.insert(oc.object.clone());
                        first_err.get_or_insert(drain_settles(e, &format!("{}: the truncation", oc.object)));
                        continue;
                    }
                }
                // An object whose changes span several commits counts once.
                if drained.insert(oc.object.clone()) {
                    report.objects += 1;
                }
            }
            tracing::debug!(records = n, snapshot = ?commit.snapshot, "dotdo flush");
        }
        Ok(())
    }

    /// Take the next page of objects whose changes wait in the hot log with no activation on
    /// this runtime (released after a call with `keep_warm` 0, released idle by
    /// [`maintain`](Self::maintain), or left by a runtime that is gone), appending them to `held`
    /// to be drained and given back. Each is taken without waiting, unless another node holds
    /// it or, with a ring, the ring gives it to another node. Returns whether more pages may
    /// follow.
    async fn take_pending(
        &self,
        held: &mut Vec<Held>,
        after: &mut Option<ObjectId>,
        rounds: &mut DrainRounds,
    ) -> Result<bool> {
        const PAGE: usize = 256;
        let page = self.inner.hot.objects_with_pending_changes(after.as_ref(), PAGE).await?;
        let more = page.len() == PAGE;
        *after = page.last().cloned();
        self.take_listed(page, held, rounds).await;
        Ok(more)
    }

    /// Take `objects` (not active here) to drain them in this flush: the page of
    /// [`take_pending`](Self::take_pending), or the objects an earlier flush gave back
    /// undrained ([`Inner::owed`]; forgotten once nothing of them waits, another holder has
    /// them or the ring gives them to another node).
    async fn take_listed(&self, objects: Vec<ObjectId>, held: &mut Vec<Held>, rounds: &mut DrainRounds) {
        let inner = &self.inner;
        for object in objects {
            if rounds.unanswered {
                // As for the held objects: not asked, once a call of this pass went unanswered.
                rounds.first_err.get_or_insert_with(not_asked);
                return;
            }
            if self.owner_hint(&object).is_some_and(|n| n != inner.node) {
                // The ring gives it to another node now: that node's to drain.
                inner.owed.lock().remove(&object);
                continue;
            }
            if rounds.left_out.contains(&object)
                || rounds.busy.contains(&object)
                || held.iter().any(|h| h.object == object)
            {
                continue;
            }
            // As while collecting the held objects.
            renew_held(inner, held, &mut rounds.left_out, &mut rounds.lapsed).await;
            let slot = self.slot(&object);
            let Some(mut guard) = slot.try_lock_owned() else {
                rounds.busy.insert(object);
                continue;
            };
            // Activated here since the held objects were collected: the next flush has it.
            if guard.active.is_some() {
                continue;
            }
            // The held objects' leases renewed meanwhile: the activation may check a large
            // overlap against cold or restore from it.
            let activation = self.ensure_active_to_drain(&object, &mut guard, Duration::ZERO);
            let activated = renewing_held(inner, held, &mut rounds.left_out, &mut rounds.lapsed, activation).await;
            rounds.unanswered |= activated.as_ref().is_err_and(unanswered);
            match activated {
                // Nothing left to drain (drained by its holder since the page was read, or an owed
                // object drained since): no longer owed.
                Ok(false) => {
                    inner.owed.lock().remove(&object);
                }
                Ok(true) => {
                    let token =
                        guard.active.as_ref().expect("ensure_active leaves the object active").lease.granted.token;
                    held.push(Held { object, token, guard, taken: Some(inner.clone()) });
                }
                // Another node's (or another runtime's under this node id): its holder drains it.
                // (A lease this runtime could not give back, its release failing again, is an
                // error: its changes were not drained.)
                Err(e) if matches!(e.kind(), ErrorKind::LeaseHeld { .. }) && !own_leftover(inner, &e, &object) => {
                    tracing::debug!(object = %object, "dotdo flush_all: pending changes of an object another node holds; skipped");
                    inner.owed.lock().remove(&object);
                }
                Err(e) => {
                    tracing::warn!(object = %object, error = %e, "dotdo flush_all: object with pending changes not taken");
                    rounds.first_err.get_or_insert(e);
                }
            }
        }
    }

    /// Tier `object` out of hot storage: drain its changes to cold, drop its hot state, release
    /// the lease. The next call recovers it from cold storage identically. An object not active
    /// here with no live keys and nothing to drain in hot storage (already evicted, or emptied
    /// by deletes) is left as it is. `Shutdown` once [`shutdown`](Self::shutdown) has begun.
    pub async fn evict(&self, object: &ObjectId) -> Result<()> {
        let _guard = self.enter()?;
        let slot = self.slot(object);
        let out = self.evict_locked(object, &mut *slot.lock().await, None).await.map(|_| ());
        self.give_back_if_shut_down(&slot).await;
        out
    }

    /// [`evict`](Self::evict) of an object whose slot the caller has locked: whether this call
    /// evicted it (`false`: there was nothing to evict). `wait`: how long to wait for a lease
    /// another node holds (`None`: as a call does).
    async fn evict_locked(&self, object: &ObjectId, slot: &mut Slot, wait: Option<Duration>) -> Result<bool> {
        // Already out of hot storage, or emptied by deletes (no live keys, nothing to drain), and
        // not active here: done, without an activation that would first restore it.
        if slot.active.is_none()
            && self.inner.hot.object_info(object).await?.is_none_or(|i| i.keys == 0 && !i.has_pending_changes())
        {
            return Ok(false);
        }
        let taken_to_evict = slot.active.is_none();
        if !self.ensure_active_to_evict(object, slot, wait).await? {
            // Out of hot storage already (or emptied by deletes) once the lease was taken (again:
            // a warm lease that lapsed here): another runtime evicted it meanwhile.
            return Ok(false);
        }
        // The object stays in its slot while draining (the hot state is intact whatever
        // happens, a cancelled call included).
        let taken = TakenOnlyFor::new(&self.inner, slot, taken_to_evict);
        let active = taken.slot.active.as_mut().expect("active");
        let token = active.lease.granted.token;
        // A lazy activation's state is in cold storage already (nothing of it was written to
        // hot; a write completes the restore first): it is not loaded into hot storage only to
        // be dropped. Whatever hot holds of the object (a late write of an earlier activation,
        // a restore of unknown outcome) is drained and dropped like any hot state.
        let drained = async {
            let report = drain(&self.inner, object, token, usize::MAX).await?;
            if report.objects == 0 {
                // Nothing was left to drain, so no commit just showed that cold storage holds
                // the object's changes: make sure it still does before the only other copy goes.
                cold_holds_hot_changes(&self.inner, object).await?;
            }
            Ok(())
        };
        let drained = verified_then(&self.inner, object, active, drained).await;
        let taken_to_evict = taken.finish();
        if let Err(e) = drained {
            // Keep the object active for the next call, unless the lease is gone (or the hot
            // store is behind cold storage), or it was taken only for this eviction (kept warm,
            // it would refuse its owner's calls for `keep_warm`).
            if activation_spent(&e) || taken_to_evict {
                give_back(&self.inner, &mut slot.active).await;
            } else {
                self.after_call(slot).await;
            }
            return Err(retry_restores(e));
        }
        // From here the hot state may go: never run on it under this activation again.
        let active = slot.active.take().expect("active");
        let hand = LeaseInHand::new(&self.inner, active.lease.granted.clone());
        if let Err(e) = self.inner.hot.evict(object, token).await {
            // Refused, or not applied (`Unavailable`: a busy or unreachable store did not run
            // it, as the hot-store contract has it): nothing was dropped. (An idle eviction the
            // store refused busy released the object, and nothing evicted it again.)
            if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::InvalidInput | ErrorKind::Unavailable) {
                // Still active, unless activated only for this eviction (kept warm, it would
                // refuse its owner's calls).
                hand.disarm();
                slot.active = Some(active);
                if taken_to_evict {
                    give_back(&self.inner, &mut slot.active).await;
                } else {
                    self.after_call(slot).await;
                }
            } else {
                // The hot state may or may not be gone (a remote store's ambiguous reply): never
                // run on it again under this activation. The next call activates afresh and
                // recovers from cold if the state was dropped.
                release_quietly(&self.inner, &active.lease.granted).await;
                hand.disarm();
            }
            return Err(e);
        }
        // Evicted: a failed release only means the lease runs out on its own.
        release_quietly(&self.inner, &active.lease.granted).await;
        hand.disarm();
        self.inner.metrics.lock().evictions += 1;
        Ok(true)
    }

    /// Tier out every object idle longer than `evict_idle_after` (judged when its turn comes; an
    /// object in use is skipped); returns how many (0 without `evict_idle_after`). `Shutdown`
    /// once shutdown has begun. An object that cannot be evicted (cold storage unreachable, taken
    /// over) does not stop the others: each failure is logged, and the first one is the error
    /// only if nothing was evicted (otherwise `Ok` with the count; the others are tried again
    /// next time).
    pub async fn evict_idle(&self) -> Result<usize> {
        let out = match self.enter() {
            Ok(_guard) => self.evict_idle_in().await,
            Err(e) => Err(e),
        };
        self.give_back_all_if_shut_down().await;
        out
    }

    /// [`evict_idle`](Self::evict_idle) of a call (or `maintain` round) already counted.
    async fn evict_idle_in(&self) -> Result<usize> {
        let Some(idle) = self.inner.settings.evict_idle_after else { return Ok(0) };
        // One object that cannot be evicted (taken over, cold unreachable) does not keep the
        // others in hot storage: every failure is logged, and the first one is returned only if
        // nothing could be evicted (otherwise the count of evicted objects).
        let (mut evicted, mut first_err) = (0, None);
        let mut swept = self.inner.clock.monotonic();
        for (object, slot) in self.active_slots() {
            self.renew_during_pass(&mut swept).await;
            // An object in use is not idle; idleness is judged under the lock, at the time of its
            // own eviction (evicting the ones before can take a while).
            let Some(mut guard) = slot.try_lock() else { continue };
            let now = self.inner.clock.monotonic();
            if guard.active.as_ref().is_none_or(|a| now.saturating_sub(a.last_used) < idle) {
                continue;
            }
            // Not waiting for another node: an idle activation whose lease lapsed (no `maintain`
            // renewed it) and that another node took meanwhile is that node's now, not to be
            // taken back just to be evicted (it waited `acquire_timeout` and failed `LeaseHeld`).
            match self.evict_locked(&object, &mut guard, Some(Duration::ZERO)).await {
                Ok(true) => evicted += 1,
                // Out of hot storage already (another node evicted it): its stale activation
                // was given back.
                Ok(false) => {}
                // (A lease of its own it could not give back, the release failing, is an error
                // of this round: the leftover lease is released by a later `maintain` and the
                // object evicted then.)
                Err(e)
                    if matches!(e.kind(), ErrorKind::LeaseHeld { .. }) && !own_leftover(&self.inner, &e, &object) =>
                {
                    tracing::info!(object = %object, error = %e, "dotdo: idle object held by another node now; its stale activation dropped");
                    give_back(&self.inner, &mut guard.active).await;
                }
                Err(e) => {
                    tracing::warn!(object = %object, error = %e, "dotdo: idle object not evicted");
                    if let Some(a) = guard.active.as_mut() {
                        // A cold commit or truncation of unknown outcome comes as a retryable
                        // `Unavailable` (`drain_settles`); the next attempt re-sends the same
                        // records and the sink skips what it has.
                        a.evict_again = e.is_retryable() || e.kind() == &ErrorKind::AmbiguousOutcome;
                    }
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if evicted == 0 => Err(e),
            _ => Ok(evicted),
        }
    }

    /// One round of housekeeping: renew warm leases that need it, release leases idle past
    /// `keep_warm` and those of objects the last ring change moved to another node (see
    /// [`set_ring`](Self::set_ring)), tier out idle objects, give back leases that cancelled
    /// calls left behind. Counted as a call: `Shutdown` once [`shutdown`](Self::shutdown) has
    /// begun, and shutdown waits for a round in progress.
    pub async fn maintain(&self) -> Result<()> {
        let out = self.maintain_in().await;
        self.give_back_all_if_shut_down().await;
        out
    }

    async fn maintain_in(&self) -> Result<()> {
        let inner = &self.inner;
        // Counted like a call: shutdown waits for a round in progress (which may hold a slot
        // while it renews) rather than skipping that object, and no round renews a lease after
        // shutdown has begun.
        let _guard = self.enter()?;
        release_orphans(inner).await;
        // Tier out first: an object released for `keep_warm` is no longer this runtime's to evict.
        // (Within this round's count: one round is one call in progress.)
        let evicted = self.evict_idle_in().await;
        for (object, slot) in self.active_slots() {
            let Some(mut guard) = slot.try_lock() else { continue };
            // A `set_ring` moved the object from this node to another (and the ring still says
            // so): handed over while no call is using it, so the new owner need not wait for
            // `keep_warm`. (Objects the ring always gave another node, as on a gateway outside
            // the ring, stay warm.)
            // (The handover lock is released before the ring's is taken: `set_ring` takes them
            // the other way round.)
            let pending_move = self.inner.handover.lock().remove(&object);
            let moved =
                pending_move && guard.active.is_some() && self.owner_hint(&object).is_some_and(|n| n != inner.node);
            let Some(active) = guard.active.as_mut() else { continue };
            // Moved, idle past `keep_warm` (unless its eviction is to be tried again), or
            // (otherwise renewed when due) lost: given back.
            let idle = active.idle_past_keep_warm(inner, inner.clock.monotonic());
            if moved || idle || renew_if_due(inner, &mut active.lease).await.is_err() {
                give_back(inner, &mut guard.active).await;
            }
        }
        // Forget objects this runtime no longer holds, so the table of slots does not grow with
        // every object ever touched. Only slots nobody else references (clones are made under
        // this same lock) and that are neither locked nor active.
        self.inner
            .slots
            .lock()
            .retain(|_, slot| Arc::strong_count(slot) > 1 || slot.try_lock().is_none_or(|s| s.active.is_some()));
        let slots = self.inner.slots.lock();
        self.inner.handover.lock().retain(|o| slots.contains_key(o));
        evicted.map(|_| ())
    }

    /// How many objects this runtime currently keeps a slot for (active ones and ones touched
    /// since the last [`maintain`](Self::maintain)).
    pub fn tracked_objects(&self) -> usize {
        self.inner.slots.lock().len()
    }

    /// Run [`maintain`](Self::maintain) every `period` (at least 1 ms: a zero period would
    /// never yield to the executor) until shutdown (spawn this on the host's executor). Asleep
    /// between rounds when shutdown begins, it ends within [`MAINTENANCE_WAKE`], whatever the
    /// period (a host awaiting it after `shutdown` does not wait out a long period); a round in
    /// progress runs to its end first.
    pub async fn run_maintenance(&self, period: Duration) {
        let period = period.max(Duration::from_millis(1));
        loop {
            // The period in steps of at most `MAINTENANCE_WAKE`, each looking for shutdown.
            let started = self.inner.clock.monotonic();
            loop {
                if self.inner.shutting_down.load(Ordering::SeqCst) {
                    return;
                }
                let left = period.saturating_sub(self.inner.clock.monotonic().saturating_sub(started));
                if left.is_zero() {
                    break;
                }
                self.inner.clock.sleep(left.min(MAINTENANCE_WAKE)).await;
            }
            match self.maintain().await {
                Ok(()) => {}
                Err(e) if e.kind() == &ErrorKind::Shutdown => break,
                Err(e) => tracing::warn!(error = %e, "dotdo maintenance round failed"),
            }
        }
    }

    /// Graceful shutdown: refuse new calls, wait for in-flight handlers (up to the lease TTL),
    /// flush every held object's changes to cold storage (and, like
    /// [`flush_all`](Self::flush_all), those of objects nobody holds), release every lease.
    /// Changes that could not be flushed stay in the hot change log, and the next `flush_all`
    /// on the same hot store drains them (with `drain_released` off, only the `flush_all` of a
    /// runtime that activates the object again, or of one that drains released objects).
    /// Bounded by about two lease TTLs plus the flush: up to one waiting for handlers, up to one
    /// giving leases back (those a guard that does not answer has not taken back by then are
    /// left to expire). A
    /// handler still running after the wait (counted in [`FlushReport::busy`]) keeps its lease,
    /// renewed, until it ends, may still commit, and then gives the lease back. A shutdown
    /// whose future is dropped before it returns (a host's timeout shorter than that bound)
    /// leaves the runtime refusing calls and `maintain`, its leases held and its changes
    /// unflushed: call `shutdown` again to finish.
    pub async fn shutdown(&self) -> Result<FlushReport> {
        let inner = &self.inner;
        inner.shutting_down.store(true, Ordering::SeqCst);
        // On the clock's monotonic time, as every local wait: a wall-clock step back would
        // stretch it by the step.
        let started = inner.clock.monotonic();
        while inner.in_flight.load(Ordering::SeqCst) > 0
            && inner.clock.monotonic().saturating_sub(started) < inner.settings.lease_ttl
        {
            inner.clock.sleep(Duration::from_millis(2)).await;
        }
        inner.shutdown_flushing.store(true, Ordering::SeqCst);
        let flushed = self.flush_held().await;
        inner.shutdown_flushed.store(true, Ordering::SeqCst);
        // The leases go back a few at a time, all within one lease TTL: each release waits up to
        // a TTL for the guard, so one by one a hung guard held shutdown for a TTL per warm
        // object, while every lease would have expired after the first. What is not given back
        // by then is left to expire (a release cut short is recorded as an orphan first).
        let slots = self.active_slots();
        let give_backs = async {
            futures::stream::iter(&slots)
                .for_each_concurrent(SHUTDOWN_RELEASES, |(object, slot)| async move {
                    // A call still running after the wait keeps its slot and its lease:
                    // releasing under it would let another node in while it writes. The call
                    // gives the lease back when it ends (`after_call`); its changes wait in the
                    // hot log for the next `flush_all` on this hot store.
                    let Some(mut guard) = slot.try_lock() else {
                        tracing::warn!(object = %object, "dotdo shutdown: a call is still running; its lease is left to expire");
                        return;
                    };
                    give_back(inner, &mut guard.active).await;
                })
                .await;
            release_orphans(inner).await;
            Ok(())
        };
        let limit = inner.settings.lease_ttl;
        if let Err(e) = within(inner, limit, give_backs, "the leases were not all given back within a lease TTL").await
        {
            tracing::warn!(error = %e, "dotdo shutdown: leases not given back are left to expire");
        }
        flushed
    }
}

/// `Shutdown` for a call that waited for `object` (its slot, or another node's lease) until
/// shutdown had given the leases back.
fn shut_down_while_waiting(object: &ObjectId) -> Error {
    Error::new(ErrorKind::Shutdown, format!("{object}: the runtime shut down while the call waited for the object"))
}

async fn preload(
    inner: &Arc<Inner>,
    object: &ObjectId,
    lazy: &mut LazyState,
    keys: &[String],
    prefixes: &[String],
) -> Result<(u64, u64)> {
    let (mut n, mut bytes) = (0u64, 0u64);
    // A key named for preloading that does not exist is cached as absent (its reads need not
    // ask cold) but not counted; a key preloaded already (a second prefetch) counts once.
    let mut put = |lazy: &mut LazyState, k: String, v: Option<bytes::Bytes>| {
        if let Some(v) = &v {
            if !lazy.preloaded.contains_key(&k) {
                lazy.preloaded.insert(k.clone(), false);
                bytes += v.len() as u64;
                n += 1;
                // Counted as it is preloaded: a prefetch that fails partway keeps the keys it
                // preloaded, and their first reads count as preload hits.
                inner.metrics.lock().preloaded_keys += 1;
            }
        }
        lazy.remember(k, v, inner.settings.lazy_cache_bytes);
    };
    match &inner.accel {
        Some(a) => {
            for k in keys {
                let found = at_pinned(inner, object, lazy, |as_of| a.lookup(object, k, as_of)).await?;
                put(lazy, k.clone(), found.value.map(|v| v.value));
            }
            for p in prefixes {
                let query =
                    |as_of| a.scan(ScanQuery::object(object.clone()).keys(KeyRange::prefix(p.clone())).as_of(as_of));
                for e in at_pinned(inner, object, lazy, query).await?.entries {
                    put(lazy, e.key, Some(e.value));
                }
            }
        }
        None => {
            // The whole state is read anyway (once: a complete cache is not read again): keep
            // all of it (a named key that does not exist is then known absent too), counting
            // only the named keys and prefixes.
            if !lazy.complete {
                cache_whole_state(inner, object, lazy).await?;
            }
            let named: Vec<(String, bytes::Bytes)> = lazy
                .cache
                .iter()
                .filter(|(k, _)| keys.contains(k) || prefixes.iter().any(|p| k.starts_with(p.as_str())))
                .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
                .collect();
            for (k, v) in named {
                put(lazy, k, Some(v));
            }
        }
    }
    Ok((n, bytes))
}

/// The snapshot a lazy object reads was expired by maintenance (`NotFound`): pin the newest
/// snapshot instead, provided the object's cold state has not moved since activation (the lease
/// keeps every other writer of this object away, so the newest snapshot holds the same state).
/// The snapshot and the watermark in it come from one answer ([`ColdSink::head`]), as at
/// activation: from two reads (the watermark, then the snapshot list), a list a lagging catalog
/// replica answered pinned an older snapshot, whose values were served as the object's. A
/// watermark older than the activation's is such an older table too: retryable `Unavailable`.
pub(crate) async fn repin(inner: &Arc<Inner>, object: &ObjectId, lazy: &mut LazyState) -> Result<AsOf> {
    let (snapshot, at) = inner.cold.head(object).await?;
    refuse_older_than_decided(
        object,
        "watermark",
        at.through,
        &Watermark { through: lazy.through, ..Default::default() },
    )?;
    if at.through != lazy.through {
        return Err(lazy.moved_on(object, Some(at.through)));
    }
    lazy.snapshot = snapshot;
    tracing::debug!(object = %object, snapshot = ?lazy.snapshot, "dotdo lazy snapshot expired; re-pinned");
    Ok(lazy.snapshot.map_or(AsOf::Latest, AsOf::Snapshot))
}

/// Read the object's whole cold state at the lazy activation's snapshot into its cache (for a
/// runtime without an accelerator, where any one key costs that read); re-pins an expired
/// snapshot like any lazy read.
pub(crate) async fn cache_whole_state(inner: &Arc<Inner>, object: &ObjectId, lazy: &mut LazyState) -> Result<()> {
    let st = load_pinned(inner, object, lazy).await?;
    for e in st.entries {
        lazy.remember_whole(e.key, e.value);
    }
    lazy.complete = true;
    Ok(())
}

/// The object's whole cold state at the lazy activation's snapshot, re-pinning an expired one.
async fn load_pinned(inner: &Arc<Inner>, object: &ObjectId, lazy: &mut LazyState) -> Result<crate::ColdState> {
    at_pinned(inner, object, lazy, |as_of| inner.cold.load_state(object, as_of)).await
}

/// `read` at the lazy activation's snapshot; if that snapshot has expired since (`NotFound`),
/// re-pinned ([`repin`]) and read again, up to [`REPINS`] times (the newly pinned snapshot may
/// expire too, on a table that expires aggressively); then a retryable `Unavailable` (`NotFound`
/// said "no such object" for one that exists).
pub(crate) async fn at_pinned<T, F>(
    inner: &Arc<Inner>,
    object: &ObjectId,
    lazy: &mut LazyState,
    read: impl Fn(AsOf) -> F,
) -> Result<T>
where
    F: std::future::Future<Output = Result<T>>,
{
    let mut as_of = lazy.snapshot.map_or(AsOf::Latest, AsOf::Snapshot);
    let mut repins = 0;
    loop {
        match read(as_of).await {
            Err(e) if e.kind() == &ErrorKind::NotFound && lazy.snapshot.is_some() => {
                if repins == REPINS {
                    return Err(Error::unavailable(format!(
                        "{object}: the snapshots a lazy restore pinned expired {} times in a row while it read \
                         them; try again",
                        REPINS + 1
                    ))
                    .with_source(e));
                }
                repins += 1;
                as_of = repin(inner, object, lazy).await?;
            }
            r => return r,
        }
    }
}

/// How many times in a row [`at_pinned`] re-pins an expired snapshot before it gives up.
const REPINS: u32 = 3;

/// Install the object's cold state in hot storage and leave lazy mode.
pub(crate) async fn complete_restore(
    inner: &Arc<Inner>,
    object: &ObjectId,
    token: FencingToken,
    lazy: &mut Option<LazyState>,
) -> Result<()> {
    let Some(state) = lazy.as_mut() else { return Ok(()) };
    if state.moved {
        // Spent: found moved by an earlier read of this activation.
        return Err(state.moved_on(object, None));
    }
    let st = load_pinned(inner, object, state).await?;
    if st.through != state.through {
        return Err(state.moved_on(object, Some(st.through)));
    }
    restore_cold_state(inner, object, token, st.entries, st.through).await.map_err(|e| {
        state.fenced |= e.is_fenced();
        // Its sequence past `through` (`restore_behind_hot`): no retry of this restore succeeds,
        // but the activation is spent (given back), and the next call's activation starts
        // from the hot store's newer state: retryable for the caller.
        if e.kind() == &ErrorKind::Conflict && !e.is_retryable() {
            state.refused = true;
            return e
                .context(format!("{object}: the lazy restore is refused for good; the next call activates afresh"))
                .with_retryable(true);
        }
        e
    })?;
    *lazy = None;
    Ok(())
}

/// What a lost renewal says of a handler it abandoned.
const DURING_HANDLER: &str = "lease renewal failed during the handler; nothing was written";
/// What a lost renewal says of a drain, restore or check it abandoned (see [`with_renewal`]).
const DURING_WORK: &str = "lease renewal failed during a drain, restore or check under the lease, which was \
     abandoned (cold commits made before it stay, and the next flush skips them; a restore is settled by the \
     next activation)";

/// Run `fut` while renewing `lease` (which holds the latest renewal, see [`renew_loop`]); a
/// renewal that fails abandons `fut` with the (lost-lease) error, saying `during`.
async fn renewing<T>(
    inner: &Arc<Inner>,
    lease: &parking_lot::Mutex<HeldLease>,
    fut: impl std::future::Future<Output = T>,
    during: &'static str,
) -> std::result::Result<T, Error> {
    let fut = std::pin::pin!(fut);
    let renew = std::pin::pin!(renew_loop(inner, lease, during));
    match futures::future::select(fut, renew).await {
        Either::Left((out, _)) => Ok(out),
        Either::Right((lost, _)) => Err(lost),
    }
}

/// Run `fut`, a long operation on one object under `lease` (a drain of a large backlog, an
/// eager restore of a large state), with the lease renewed meanwhile as during a handler, and
/// keep the renewed lease. A lost renewal abandons `fut` (a drain's commits are idempotent, a
/// restore's outcome is settled by the next activation) and is the error. Without it an
/// operation outlasting the TTL let another node take the object over and then failed fenced
/// (a drain after its commits had landed, a restore after loading the whole state).
async fn with_renewal<T>(
    inner: &Arc<Inner>,
    lease: &mut HeldLease,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    /// Writes the renewed lease back also when the operation is dropped unfinished (its caller
    /// cancelled): the slot kept the old expiry, and a later transient refresh failure past it
    /// read as a lost lease.
    struct WriteBack<'a> {
        lease: &'a mut HeldLease,
        renewed: parking_lot::Mutex<HeldLease>,
    }
    impl Drop for WriteBack<'_> {
        fn drop(&mut self) {
            *self.lease = self.renewed.lock().clone();
        }
    }
    let renewed = parking_lot::Mutex::new(lease.clone());
    let back = WriteBack { lease, renewed };
    let out = renewing(inner, &back.renewed, fut, DURING_WORK).await;
    drop(back);
    out?
}

/// Renew `lease` at about TTL/3 until it cannot be renewed; then return the error, saying
/// `during` (the caller abandons the handler: self-fencing). Never returns while renewals
/// succeed.
async fn renew_loop(inner: &Arc<Inner>, lease: &parking_lot::Mutex<HeldLease>, during: &'static str) -> Error {
    let ttl = inner.settings.lease_ttl;
    // After a transient failure the next refresh is due at once: back off (doubling from 5 ms,
    // at most a tenth of the TTL) instead of hammering a guard that is already struggling.
    let mut backoff = Duration::ZERO;
    // After a success, the next refresh waits at least a tenth of the TTL (or a third of what
    // the renewed lease has left, if less): a guard whose leases come back with less than two
    // thirds of the TTL left (its clock behind this runtime's) made every wait zero, a refresh
    // per millisecond for the whole handler.
    let mut floor = Duration::ZERO;
    loop {
        let current = lease.lock().clone();
        let renew_at = current.left(inner).saturating_sub(ttl * 2 / 3);
        // Never past what the lease has left: a backoff (up to a tenth of the TTL) that overslept
        // the expiry kept the handler running beside a new holder's for that long.
        let wait = renew_at.max(backoff).max(floor).max(Duration::from_millis(1)).min(current.left(inner));
        inner.clock.sleep(wait).await;
        // A refresh that does not answer before the lease runs out (a hung connection) must not
        // keep the handler running past expiry, beside a new holder's.
        let left = current.left(inner);
        let refreshed = within(
            inner,
            left,
            refresh_lease(inner, &current.granted),
            "lease renewal did not answer before the lease expired",
        )
        .await;
        match refreshed {
            Ok(l) => {
                floor = (ttl / 10).min(l.left(inner) / 3);
                *lease.lock() = l;
                backoff = Duration::ZERO;
            }
            Err(e) if refresh_may_retry(&e) && !current.left(inner).is_zero() => {
                floor = Duration::ZERO;
                backoff = (backoff * 2).max(Duration::from_millis(5)).min(ttl / 10);
                tracing::debug!(object = %current.granted.object, error = %e, ?backoff, "dotdo lease renewal failed transiently");
            }
            Err(e) => {
                tracing::warn!(object = %current.granted.object, error = %e, "dotdo lease renewal failed; self-fencing");
                return Error::new(ErrorKind::LeaseLost { object: current.granted.object.clone() }, during)
                    .with_source(e);
            }
        }
    }
}

/// What an activation is for: a call's is always made; a drain's only if changes wait in hot
/// storage, and an eviction's only if hot storage holds something of the object (live keys or
/// changes to drain), both looked at once the lease is taken. Between a look at the hot store
/// and the acquire (or while a warm lease lapsed here), another runtime may drain and evict the
/// object: activating it then would restore its whole state from cold storage into hot storage,
/// undoing that eviction (and an eviction's own activation would evict it again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ActivateFor {
    Call,
    Drain,
    Evict,
}

/// Cold storage acknowledged changes past the hot store's last one: the hot store lost commits
/// (a power loss, a restored backup) and the object was activated while cold storage could not
/// be asked. Its next activation restores it from cold storage; this one must not go on.
fn hot_behind_cold(object: &ObjectId, hot_last: Seq, cold_through: Seq) -> Error {
    Error::new(
        ErrorKind::Conflict,
        format!(
            "{object}: cold storage holds changes through {cold_through} but the hot store's last is {hot_last} \
             (it lost commits); {HOT_BEHIND_COLD}"
        ),
    )
    .with_retryable(false)
}

/// A flush's or evict's error for its caller: [`hot_behind_cold`] is non-retryable inside the
/// runtime (it marks the activation spent), but the activation has been given back and the
/// next one restores the object from cold storage, so a caller's retry succeeds: retryable.
fn retry_restores(e: Error) -> Error {
    if is_hot_behind_cold(&e) {
        e.with_retryable(true)
    } else {
        e
    }
}

/// The words [`hot_behind_cold`] errors carry.
const HOT_BEHIND_COLD: &str = "the object is restored from cold storage on its next activation";

/// Whether a drain may truncate the hot change log through `through`, the object's durable
/// watermark after a cold commit of its changes up to `appended`: not if cold is ahead of the
/// hot store's last change `hot_last` ([`hot_behind_cold`]), nor if the commit reports the
/// object durable below what was appended, which breaks the `ColdSink` contract (truncating
/// to it and draining again would loop forever).
fn check_durable_through(object: &ObjectId, hot_last: Seq, appended: Seq, through: Seq) -> Result<()> {
    if through > hot_last {
        return Err(hot_behind_cold(object, hot_last, through));
    }
    if through < appended {
        return Err(Error::backend(format!(
            "{object}: the cold sink acknowledged an append of changes through seq {appended} but reports \
             the object durable only through seq {through} (a ColdSink must report every appended object's \
             watermark); nothing was truncated"
        )));
    }
    Ok(())
}

/// Give the activation in `slot` back if `e` (from working on it outside a call) left it of no
/// further use: its lease is gone, or its lazy restore found the cold state moved on (the next
/// call activates afresh). Kept, it held the lease for nothing, and other nodes met `LeaseHeld`.
async fn give_back_if_spent(inner: &Arc<Inner>, slot: &mut Slot, e: &Error) {
    if activation_spent(e) || slot.lazy_moved() {
        give_back(inner, &mut slot.active).await;
    }
}

/// Whether a failed drain leaves the activation unusable (the lease is gone, or the hot store
/// is behind cold storage): the activation is dropped and its lease given back.
fn activation_spent(e: &Error) -> bool {
    // Only this runtime's own `hot_behind_cold`: a cold commit still conflicting after its
    // attempts (contention, retryable) or one the sink gave up on (a non-retryable `Conflict`,
    // such as dotdo-iceberg's "too slow to commit") leaves the activation alone.
    lease_gone(e) || is_hot_behind_cold(e)
}

/// Whether `e` is [`hot_behind_cold`]'s error.
fn is_hot_behind_cold(e: &Error) -> bool {
    e.kind() == &ErrorKind::Conflict && !e.is_retryable() && e.message().contains(HOT_BEHIND_COLD)
}

/// Whether a failed lease refresh may be tried again while the lease is still valid: a transient
/// failure, or one whose outcome is unknown (a refresh is idempotent, so trying again is safe).
fn refresh_may_retry(e: &Error) -> bool {
    e.is_retryable() || e.kind() == &ErrorKind::AmbiguousOutcome
}

/// Whether `e` says this runtime's lease is no longer valid (fenced by a newer holder, or lost):
/// the activation must be dropped.
fn lease_gone(e: &Error) -> bool {
    e.is_fenced() || matches!(e.kind(), ErrorKind::LeaseLost { .. })
}

/// Refresh the leases of the objects a flush holds that need it, as `maintain` would (it skips
/// them while they are held, and a flush of many rounds can outlast a lease). An object whose
/// lease is gone is left out of the rest of the flush.
async fn renew_held(
    inner: &Arc<Inner>,
    held: &mut [Held],
    left_out: &mut std::collections::BTreeSet<ObjectId>,
    lapsed: &mut std::collections::BTreeMap<ObjectId, Error>,
) {
    renew_parts(inner, &mut [held], left_out, lapsed).await
}

/// [`renew_held`] of held objects in several slices (all of them but one whose own work runs
/// meanwhile, see [`renewing_parts`]).
async fn renew_parts(
    inner: &Arc<Inner>,
    parts: &mut [&mut [Held]],
    left_out: &mut std::collections::BTreeSet<ObjectId>,
    lapsed: &mut std::collections::BTreeMap<ObjectId, Error>,
) {
    for h in parts.iter_mut().flat_map(|p| p.iter_mut()) {
        if left_out.contains(&h.object) {
            continue;
        }
        let Some(a) = h.guard.active.as_mut() else { continue };
        match renew_if_due(inner, &mut a.lease).await {
            Ok(()) => {}
            // Taken over: the new holder drains its changes.
            Err(e) if e.is_fenced() => {
                tracing::info!(object = %h.object, error = %e, "dotdo flush_all: object taken over during the flush; skipped");
                left_out.insert(h.object.clone());
            }
            // Run out (a flush longer than the TTL) or unrenewable: its changes are still this
            // runtime's and still only in hot storage, so the flush must not answer `Ok`.
            Err(e) => {
                tracing::warn!(object = %h.object, error = %e, "dotdo flush_all: lease lost during the flush; not drained");
                left_out.insert(h.object.clone());
                lapsed.insert(
                    h.object.clone(),
                    e.context(format!(
                        "{}: the lease ran out during the flush; its changes wait in hot storage",
                        h.object
                    )),
                );
            }
        }
    }
}

/// The objects whose lease ran out while a flush held them ([`DrainRounds::lapsed`]): an error
/// for the flush if their changes still wait in hot storage (or that cannot be read); none if
/// they were drained before the lease was found run out (a commit in flight landed them and
/// they were truncated).
async fn settle_lapsed(inner: &Arc<Inner>, rounds: &mut DrainRounds) {
    for (object, e) in std::mem::take(&mut rounds.lapsed) {
        match inner.hot.object_info(&object).await {
            Ok(info) if !info.as_ref().is_some_and(|i| i.has_pending_changes()) => {
                tracing::debug!(object = %object, "dotdo flush_all: the lease ran out after the object was drained");
            }
            _ => {
                rounds.first_err.get_or_insert(e);
            }
        }
    }
}

/// `fut`, a cold commit of the held objects' changes, with their leases renewed meanwhile
/// ([`renew_held`] every tenth of a TTL, or sooner for a lease with less than a fifth left): one commit (up to `flush_batch_bytes`, with its
/// retries, to a slow store) can outlast the leases, and the objects were then lost to the flush
/// (another node could take them over) after their changes had landed.
async fn renewing_held<T>(
    inner: &Arc<Inner>,
    held: &mut [Held],
    left_out: &mut std::collections::BTreeSet<ObjectId>,
    lapsed: &mut std::collections::BTreeMap<ObjectId, Error>,
    fut: impl std::future::Future<Output = T>,
) -> T {
    renewing_parts(inner, &mut [held], left_out, lapsed, fut).await
}

/// [`renewing_held`] of held objects in several slices: all of them but one, whose own work
/// `fut` is (renewing its lease itself), so that a long check of one object (a large overlap
/// read back from cold) does not let the others' leases run out (the flush then failed for
/// them).
async fn renewing_parts<T>(
    inner: &Arc<Inner>,
    parts: &mut [&mut [Held]],
    left_out: &mut std::collections::BTreeSet<ObjectId>,
    lapsed: &mut std::collections::BTreeMap<ObjectId, Error>,
    fut: impl std::future::Future<Output = T>,
) -> T {
    let renew = async {
        loop {
            // Sooner for a lease with little left (its last refresh failed transiently): half
            // of what it has left, so that it is tried again before it runs out.
            let soonest = parts
                .iter()
                .flat_map(|p| p.iter())
                .filter(|h| !left_out.contains(&h.object))
                .filter_map(|h| h.guard.active.as_ref().map(|a| a.lease.left(inner)))
                .min()
                .unwrap_or(Duration::MAX);
            let wait = (inner.settings.lease_ttl / 10).min(soonest / 2).max(Duration::from_millis(1));
            inner.clock.sleep(wait).await;
            renew_parts(inner, parts, left_out, lapsed).await;
        }
    };
    match futures::future::select(std::pin::pin!(fut), std::pin::pin!(renew)).await {
        Either::Left((out, _)) => out,
        Either::Right(((), fut)) => fut.await,
    }
}

/// Refresh `lease` if no more than two thirds of its TTL are left (activation, `maintain` and a
/// long flush renew alike). `Err` if the lease is lost; a transient failure while the lease is still valid
/// keeps it (the next round, or call, tries again). The time is read for each lease: a round over
/// many leases, one guard round trip each, must not judge the last of them by the time it began.
async fn renew_if_due(inner: &Inner, lease: &mut HeldLease) -> Result<()> {
    let left = lease.left(inner);
    if left > inner.settings.lease_ttl * 2 / 3 {
        return Ok(());
    }
    // A refresh that does not answer before the lease runs out (a hung connection) fails: the
    // callers (`maintain`, `flush_all`, an activation's reuse) hold the object's slot meanwhile,
    // and every call on it waited for as long as the guard did.
    let refreshed = within(
        inner,
        left,
        refresh_lease(inner, &lease.granted),
        "the lease refresh did not answer before the lease expired",
    )
    .await;
    match refreshed {
        Ok(l) => *lease = l,
        // A transient failure does not lose a lease that is still valid (dropping it would lock
        // this runtime out of its own object until the TTL ran out); valid now, after the wait.
        Err(e) if refresh_may_retry(&e) && !lease.left(inner).is_zero() => {
            tracing::debug!(object = %lease.granted.object, error = %e, "dotdo lease refresh failed transiently; keeping the lease");
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// `fut`'s outcome, or `Unavailable` saying `what` if it does not end within `limit` on the
/// runtime's clock (a guard call on a hung connection).
async fn within<T>(
    inner: &Inner,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
    what: &str,
) -> Result<T> {
    timed(inner, limit, fut).await.unwrap_or_else(|| Err(Error::unavailable(what).with_source(NoAnswer)))
}

/// The source of an error of a call given up on because it did not answer in time ([`within`],
/// an acquire): a flush stops asking the guard for the rest of its pass ([`unanswered`]).
#[derive(Debug)]
struct NoAnswer;

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no answer in time")
    }
}

impl std::error::Error for NoAnswer {}

/// Whether `e` is a call given up on for not answering in time (see [`NoAnswer`]).
fn unanswered(e: &Error) -> bool {
    std::error::Error::source(e).is_some_and(|s| s.is::<NoAnswer>())
}

/// The error of an object a flush left out without asking the guard, after an earlier call of
/// the same pass did not answer in time.
fn not_asked() -> Error {
    Error::unavailable(
        "not asked: an earlier call of this flush did not answer within the lease's TTL (a guard or store out of \
         reach); the objects after it were left out, their changes in hot storage for the next flush",
    )
}

/// `fut`'s output, or `None` if it does not end within `limit` on the runtime's clock.
async fn timed<T>(inner: &Inner, limit: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    match futures::future::select(std::pin::pin!(fut), inner.clock.sleep(limit)).await {
        Either::Left((r, _)) => Some(r),
        Either::Right(_) => None,
    }
}

/// Whether `e` refuses an acquire of `object` for a lease this runtime holds as a leftover (one
/// it could not give back: its release failed), not another node's or another runtime's under
/// this node id.
fn own_leftover(inner: &Inner, e: &Error, object: &ObjectId) -> bool {
    held_by(e, &inner.node) == Some(true) && inner.orphans.lock().contains_key(object)
}

/// Whether `e` is a refusal naming `node` as the holder (`Some(true)`), naming another holder
/// (`Some(false)`), or no `LeaseHeld` at all (`None`).
fn held_by(e: &Error, node: &NodeId) -> Option<bool> {
    match e.kind() {
        ErrorKind::LeaseHeld { holder, .. } => Some(holder == node),
        _ => None,
    }
}

/// The guard's current lease of `object`, or `Unavailable` if it does not answer within a lease
/// TTL (a hung connection): every caller holds a slot meanwhile.
async fn current_within_ttl(inner: &Inner, object: &ObjectId) -> Result<Option<Lease>> {
    let lookup = inner.guard.current(object);
    within(inner, inner.settings.lease_ttl, lookup, "the lease lookup did not answer within the lease's TTL").await
}

/// `lease` refreshed for the runtime's TTL, checked to keep its token ([`same_token`]).
async fn refresh_lease(inner: &Inner, lease: &Lease) -> Result<HeldLease> {
    let sent = SentAt::now(inner);
    let renewed = inner.guard.refresh(lease, inner.settings.lease_ttl).await?;
    Ok(HeldLease::new(inner, same_token(lease, renewed)?, sent))
}

/// When a request to the guard was sent, on both of the runtime's clocks.
#[derive(Clone, Copy, Debug)]
struct SentAt {
    wall: Timestamp,
    monotonic: Duration,
}

impl SentAt {
    fn now(inner: &Inner) -> Self {
        SentAt { wall: inner.clock.now(), monotonic: inner.clock.monotonic() }
    }
}

/// A lease this runtime holds, and when it runs out on the clock's monotonic time. The runtime
/// counts a lease as run out at the earlier of its `expires_at` on the wall clock and that
/// deadline: a wall clock stepped back (by NTP, by hand) must not stretch it, since another
/// node whose clock did not step takes the object over once the guard's time passes the expiry,
/// and an answer read under the stretched lease would be stale. (No `Deref` to [`Lease`]: its
/// wall-clock-only `remaining_at` must not judge a held lease; [`left`](Self::left) does.)
#[derive(Clone, Debug)]
struct HeldLease {
    granted: Lease,
    /// The clock's monotonic time at which the lease runs out: its TTL (or what the guard's
    /// `expires_at` left of it, if less) after the request that got it was sent.
    deadline: Duration,
}

impl HeldLease {
    /// `lease`, granted (or refreshed) in answer to a request sent at `sent`: it lasts at most
    /// the runtime's TTL from then (the guard granted it no earlier).
    fn new(inner: &Inner, lease: Lease, sent: SentAt) -> Self {
        let lasts = inner.settings.lease_ttl.min(lease.expires_at.since(sent.wall));
        HeldLease { deadline: sent.monotonic.saturating_add(lasts), granted: lease }
    }

    /// Time left before the lease runs out, by the earlier of the two clocks (zero once it has).
    fn left(&self, inner: &Inner) -> Duration {
        let by_wall = self.granted.expires_at.since(inner.clock.now());
        by_wall.min(self.deadline.saturating_sub(inner.clock.monotonic()))
    }
}

/// `renewed`, the answer to a refresh of `current`, if it kept `current`'s token; else
/// `LeaseLost`. A refresh never changes the token (the guard contract): reads made under the old
/// token, committed under a new one, would overwrite what another holder wrote in between.
fn same_token(current: &Lease, renewed: Lease) -> Result<Lease> {
    if renewed.token == current.token && renewed.object == current.object {
        return Ok(renewed);
    }
    Err(Error::new(
        ErrorKind::LeaseLost { object: current.object.clone() },
        format!(
            "the guard renewed the lease of {} under token {} (it held {}): a refresh must keep the token",
            current.object,
            renewed.token.get(),
            current.token.get()
        ),
    ))
}

/// An error of a step that runs before a call's own writes (activation, completing a restore):
/// if that step's outcome is unknown, the call's writes still were not attempted, so the caller
/// gets a retryable `Unavailable` saying so, not `AmbiguousOutcome` (which would tell it to read
/// back and take a new lease for a write that never ran).
pub(crate) fn before_the_call(e: Error, object: &ObjectId, step: &str) -> Error {
    if e.kind() == &ErrorKind::AmbiguousOutcome {
        Error::unavailable(format!("{object}: {step} had an unknown outcome; nothing of the call was written"))
            .with_source(e)
    } else {
        e
    }
}

/// Whether `lease` is this node's and was granted at or after `since`, within a TTL of it: the
/// lease an acquire of unknown outcome sent then got. An older one, or one granted much later, is
/// taken for another runtime's under the same node id (adopting or releasing it would break
/// that runtime's fencing); a late acquire landing more than a TTL after it was sent is not
/// recognised, and its lease is waited out.
fn granted_here_since(inner: &Inner, lease: &Lease, since: Timestamp) -> bool {
    lease.holder == inner.node
        && lease.acquired_at >= since
        && lease.acquired_at < since.plus(inner.settings.lease_ttl)
        && inner.given_back.lock().get(&lease.object).is_none_or(|t| lease.token > *t)
}

/// `lease` is being given back (or left as an orphan): never adopt it (see [`Inner::given_back`]).
fn note_given_back(inner: &Inner, lease: &Lease) {
    let mut g = inner.given_back.lock();
    let t = g.entry(lease.object.clone()).or_insert(lease.token);
    *t = (*t).max(lease.token);
}

/// Whether an acquire of unknown outcome sent at `since` is still remembered: within a TTL of
/// it, it may land (and [`granted_here_since`] recognises its lease).
fn may_still_land(inner: &Inner, since: Timestamp) -> bool {
    inner.clock.now() < since.plus(inner.settings.lease_ttl)
}

/// How many leases `shutdown` gives back at once.
const SHUTDOWN_RELEASES: usize = 16;

/// Release the leases cancelled calls left behind ([`Inner::orphans`]).
async fn release_orphans(inner: &Arc<Inner>) {
    // Taken one at a time: if this is cancelled (a host's timeout around `maintain`), the
    // orphans not yet released stay recorded (the one being released is put back by
    // `release_quietly`). Each under its object's slot lock (a busy one is skipped: the call
    // there finds and releases the orphan itself): taken off the list while its release was
    // under way, a call activating the object meanwhile found no orphan and took the guard's
    // refusal naming this node for another node's lease, and a flush took the object, owed to
    // it, for another node's and forgot it (its changes left in hot storage).
    let objects: Vec<ObjectId> = inner.orphans.lock().keys().cloned().collect();
    for object in objects {
        let slot = inner.slot(&object);
        let Some(_held) = slot.try_lock() else { continue };
        let Some(lease) = inner.orphans.lock().remove(&object) else { continue };
        release_quietly(inner, &lease).await;
    }
    // Acquires of unknown outcome: a lease granted to this node since one began is given back,
    // unless a call is activating the object now (it adopts that lease) or holds it. Each record
    // is taken only under its object's slot lock: a call activating the object meanwhile finds
    // it (and settles it itself).
    let objects: Vec<ObjectId> = inner.unsure.lock().keys().cloned().collect();
    for object in objects {
        let slot = inner.slot(&object);
        let Some(guard) = slot.try_lock() else { continue };
        // Read, and removed only once settled: a cancelled round leaves it recorded.
        let Some(since) = inner.unsure.lock().get(&object).copied() else { continue };
        let keep = if guard.active.is_some() {
            // Held now (not through that acquire: it cannot land while this lease is current).
            // Kept while it may still land after this lease is given back.
            may_still_land(inner, since)
        } else {
            match current_within_ttl(inner, &object).await {
                Ok(Some(l)) if granted_here_since(inner, &l, since) => {
                    release_quietly(inner, &l).await;
                    false
                }
                // Not granted yet: within a TTL of being sent it may still land (its task runs
                // on), and would then refuse this node's next acquire naming this node; kept so
                // that acquire adopts it.
                Ok(_) => may_still_land(inner, since),
                Err(e) => {
                    tracing::warn!(object = %object, error = %e, "dotdo: lease of an acquire with an unknown outcome not checked");
                    true
                }
            }
        };
        if !keep {
            inner.unsure.lock().remove(&object);
        }
    }
    // Given-back tokens matter only while an acquire of unknown outcome may land: forgotten for
    // objects with no such acquire remembered, under the slot lock (a call holding it may be
    // settling one).
    let objects: Vec<ObjectId> = inner.given_back.lock().keys().cloned().collect();
    for object in objects {
        let slot = inner.slot(&object);
        let Some(_held) = slot.try_lock() else { continue };
        if !inner.unsure.lock().contains_key(&object) {
            inner.given_back.lock().remove(&object);
        }
    }
}

/// Install `entries` (an object's state read from cold storage, through `through`) in the hot
/// store under `token`. Entries that break the restore's rules (a key twice, an entry above the
/// watermark, a value over the size limit) come from a cold sink that broke its contract:
/// `Corrupt`, checked before the hot store is asked. The hot store's own refusals pass with
/// their kind (a remote primary or a proxy refusing the request as too large is
/// `LimitExceeded`, not damage in cold storage).
async fn restore_cold_state(
    inner: &Arc<Inner>,
    object: &ObjectId,
    token: FencingToken,
    entries: Vec<crate::record::Entry>,
    through: crate::Seq,
) -> Result<()> {
    crate::record::validate_restore(&entries, through)
        .map_err(|e| Error::corrupt(format!("cold state of {object} cannot be restored: {e}")).with_source(e))?;
    inner.hot.restore(object, token, entries, through).await.map_err(|e| {
        if matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::LimitExceeded { .. }) {
            e.context(format!("the hot store refused the restore of {object}'s cold state"))
        } else {
            e
        }
    })
}

/// Drop the activation in `active`, if any, and give its lease back (a release of a lease that
/// is no longer current changes nothing).
async fn give_back(inner: &Arc<Inner>, active: &mut Option<Active>) {
    if let Some(a) = active.take() {
        release_quietly(inner, &a.lease.granted).await;
    }
}

/// Give `lease` back; if that fails (logged), it is kept as an orphan and released again later.
/// Whether the guard answered (`false`: the release did not answer within a TTL).
async fn release_quietly(inner: &Arc<Inner>, lease: &Lease) -> bool {
    note_given_back(inner, lease);
    let hand = LeaseInHand::new(inner, lease.clone());
    // A release that does not answer within a TTL (a hung connection) is left to the orphan
    // path: the callers (`maintain` among them) hold the object's slot meanwhile.
    let ttl = inner.settings.lease_ttl;
    match within(inner, ttl, inner.guard.release(lease), "the lease release did not answer within the lease's TTL")
        .await
    {
        Ok(()) => {
            hand.disarm();
            true
        }
        // Kept as an orphan (the hand's drop): the next activation of the object, or
        // `maintain`, tries again, so this node is not locked out until the lease expires.
        Err(e) => {
            tracing::warn!(object = %lease.object, error = %e, "dotdo lease release failed; will retry");
            !unanswered(&e)
        }
    }
}

/// [`give_back`] within a flush pass: once a guard call of the pass went unanswered
/// (`rounds.unanswered`, set here too by a release that does not answer), the lease is left as
/// an orphan without asking (released by a later `maintain` or activation of the object): one
/// release after another, each waiting a TTL, held the flush for a TTL per object taken.
async fn give_back_in_pass(inner: &Arc<Inner>, active: &mut Option<Active>, rounds: &mut DrainRounds) {
    let Some(a) = active.take() else { return };
    if rounds.unanswered {
        leave_orphan(inner, a.lease.granted.clone());
    } else {
        rounds.unanswered |= !release_quietly(inner, &a.lease.granted).await;
    }
}

/// A call's slot while its handler runs. If the call never gets the handler's outcome (its
/// future dropped by the caller, or the handler panicked), the drop writes the lease the
/// renewal kept back into the slot (a stale expiry would make a later transient refresh
/// failure look like a lost lease), and where the lease goes back after every call
/// (`keep_warm` 0, or after shutdown's flush) the activation's lease becomes an orphan,
/// released by the object's next activation here or by `maintain` (not held until it expires;
/// once shutdown has returned, by calling `shutdown` again, or it expires).
struct CallEnd<'a> {
    inner: &'a Inner,
    slot: Option<futures::lock::MutexGuard<'a, Slot>>,
    renewed: parking_lot::Mutex<HeldLease>,
}

impl<'a> CallEnd<'a> {
    /// The handler's outcome is known: the slot and the renewed lease, for the call to settle.
    fn finish(mut self) -> (futures::lock::MutexGuard<'a, Slot>, HeldLease) {
        let slot = self.slot.take().expect("finish is called once");
        (slot, self.renewed.lock().clone())
    }
}

impl Drop for CallEnd<'_> {
    fn drop(&mut self) {
        let Some(slot) = self.slot.as_mut() else { return };
        let Some(active) = slot.active.as_mut() else { return };
        active.lease = self.renewed.lock().clone();
        if leases_go_back_after_calls(self.inner) {
            if let Some(a) = slot.active.take() {
                leave_orphan(self.inner, a.lease.granted);
            }
        }
    }
}

/// A call's slot once its handler's outcome is known, while the call settles it (commits, and
/// flushes automatically). If the call is dropped meanwhile (its caller's timeout) where the
/// lease goes back after every call (`keep_warm` 0, or after shutdown's flush), the activation's
/// lease becomes an orphan, released by the object's next activation here or by `maintain`
/// (kept, the next call reused it and other nodes met `LeaseHeld` until it expired; once
/// shutdown has returned, by calling `shutdown` again, or it expires).
struct Settling<'a> {
    inner: &'a Inner,
    slot: futures::lock::MutexGuard<'a, Slot>,
    /// The call ran to its end (it settled the activation itself: given back, or kept, as the
    /// call decided; a call kept during shutdown's wait is given back by the caller's
    /// `give_back_if_shut_down`).
    settled: bool,
}

impl std::ops::Deref for Settling<'_> {
    type Target = Slot;
    fn deref(&self) -> &Slot {
        &self.slot
    }
}

impl std::ops::DerefMut for Settling<'_> {
    fn deref_mut(&mut self) -> &mut Slot {
        &mut self.slot
    }
}

impl Drop for Settling<'_> {
    fn drop(&mut self) {
        if !self.settled && leases_go_back_after_calls(self.inner) {
            if let Some(a) = self.slot.active.take() {
                leave_orphan(self.inner, a.lease.granted);
            }
        }
    }
}

/// Whether a call gives its lease back when it ends: with `keep_warm` 0, or once shutdown's
/// flush has run (no `maintain` will release it any more).
impl Inner {
    /// The slot of `object` (made on first use).
    fn slot(&self, object: &ObjectId) -> SlotRef {
        self.slots.lock().entry(object.clone()).or_default().clone()
    }
}

fn leases_go_back_after_calls(inner: &Inner) -> bool {
    inner.settings.keep_warm.is_zero() || inner.shutdown_flushed.load(Ordering::SeqCst)
}

/// Keep `lease` in [`Inner::orphans`], given back, for the object's next activation here (or
/// `maintain`) to release: a call that cannot await the release (its future dropped).
fn leave_orphan(inner: &Inner, lease: Lease) {
    note_given_back(inner, &lease);
    let mut orphans = inner.orphans.lock();
    // One per object, the newest: an older one (a cancelled release put back after a newer
    // call's lease was left here) is no longer current, and releasing it would change nothing.
    if orphans.get(&lease.object).is_none_or(|kept| kept.token < lease.token) {
        orphans.insert(lease.object.clone(), lease);
    }
}

/// A lease between being taken and being kept in a slot (or given back). If the future holding
/// it is dropped first (a cancelled call), the lease goes to [`Inner::orphans`] for the next
/// activation of the object to release.
struct LeaseInHand<'a> {
    inner: &'a Inner,
    lease: Option<Lease>,
}

impl<'a> LeaseInHand<'a> {
    fn new(inner: &'a Inner, lease: Lease) -> Self {
        LeaseInHand { inner, lease: Some(lease) }
    }

    /// The holder now holds `lease` instead (a re-acquire).
    fn replace(&mut self, lease: Lease) {
        self.lease = Some(lease);
    }

    /// The lease was kept or given back.
    fn disarm(mut self) {
        self.lease = None;
    }
}

impl Drop for LeaseInHand<'_> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            leave_orphan(self.inner, lease);
        }
    }
}

/// The acquire of one `acquire_within` call whose outcome is not known: one answered
/// ambiguously and not settled since, or one in flight. Dropped with one (the call was
/// cancelled, or it ended without learning the outcome), it records in [`Inner::unsure`] when
/// that acquire was sent.
struct AcquireInFlight<'a> {
    inner: &'a Inner,
    object: &'a ObjectId,
    /// When an acquire of unknown outcome, not settled since, was sent.
    pending: Option<Timestamp>,
    /// When the acquire now in flight was sent.
    sent: Option<Timestamp>,
    /// When the earliest acquire of unknown outcome this call found not granted was sent (it may
    /// still land, also after this call got a lease of its own and gave it back): remembered
    /// for a TTL after it was sent, also after the call.
    earlier: Option<Timestamp>,
}

impl AcquireInFlight<'_> {
    /// The acquire sent at `sent` had not been granted when the guard was asked.
    fn not_granted_yet(&mut self, sent: Timestamp) {
        self.pending = None;
        self.earlier = Some(self.earlier.map_or(sent, |t| t.min(sent)));
    }

    /// The call got `lease`. A lease also kept as an orphan (its release failed) is this call's
    /// now, not one to release.
    fn done(&mut self, lease: Lease) -> Lease {
        self.pending = None;
        self.sent = None;
        let mut orphans = self.inner.orphans.lock();
        if orphans.get(self.object).is_some_and(|o| o.token == lease.token) {
            orphans.remove(self.object);
        }
        lease
    }
}

impl Drop for AcquireInFlight<'_> {
    fn drop(&mut self) {
        let young = self.earlier.filter(|t| may_still_land(self.inner, *t));
        let Some(since) = self.pending.into_iter().chain(self.sent).chain(young).min() else { return };
        let mut unsure = self.inner.unsure.lock();
        let since = unsure.get(self.object).map_or(since, |t| (*t).min(since));
        unsure.insert(self.object.clone(), since);
    }
}

/// A retryable `Unavailable` if cold storage answered `what` `through` older than `wm`, the
/// watermark a restore was decided on (it answered an older table, as a lagging catalog replica
/// may).
fn refuse_older_than_decided(object: &ObjectId, what: &str, through: Seq, wm: &Watermark) -> Result<()> {
    if through < wm.through {
        return Err(Error::unavailable(format!(
            "{object}: cold storage answered {what} {through} after watermark {}: it answered an older table; retry",
            wm.through
        )));
    }
    Ok(())
}

/// Install the object's latest cold state in the hot store under `token`: retryable `Unavailable`
/// if cold answers a state older than `wm`, the watermark the restore was decided on.
async fn restore_eager(
    inner: &Arc<Inner>,
    object: &ObjectId,
    token: FencingToken,
    wm: &Watermark,
) -> Result<(Recovery, u64, u64, Option<i64>)> {
    let st = inner.cold.load_state(object, AsOf::Latest).await?;
    // Decided on `wm`: a store answering an older table to this read (a lagging catalog
    // replica) must not have its state installed as the object's. Into a fresh hot store that
    // state would be served, and new writes would take sequence numbers cold holds.
    refuse_older_than_decided(object, "the state through seq", st.through, wm)?;
    let (keys, bytes) = (st.entries.len() as u64, st.entries.iter().map(|e| e.value.len() as u64).sum());
    restore_cold_state(inner, object, token, st.entries, st.through).await?;
    inner.metrics.lock().eager_restores += 1;
    Ok((Recovery::Eager, keys, bytes, st.snapshot))
}

/// Pending hot changes at sequence numbers cold storage already holds (a crash between a cold
/// append and the truncation, or writes made while a rolled-back hot store ran without cold)
/// must be the very changes cold has: a different change at the same sequence number means hot
/// and cold diverged, and dropping either side would lose acknowledged writes. `Corrupt` then,
/// with nothing changed. (A change cold no longer lists, collapsed away, is not compared.)
async fn check_pending_against_cold(inner: &Arc<Inner>, object: &ObjectId, after: Seq, wm: &Watermark) -> Result<()> {
    // Only the changes cold may also have (through its watermark): after a long cold outage the
    // pending changes beyond it can be many, and none of them needs checking.
    // A page at a time: a backend may answer fewer changes than asked for (a remote one bounds
    // an answer's bytes).
    let mut from = after;
    while from < wm.through {
        let want = usize::try_from(wm.through - from).unwrap_or(usize::MAX);
        let pending = inner.hot.read_changes(object, from, want).await?;
        let overlap: Vec<&ChangeRecord> = pending.iter().filter(|r| r.seq <= wm.through).collect();
        let Some(last) = overlap.last().map(|r| r.seq) else { return Ok(()) };
        // Cold's changes up to the last overlapping one only: a hot store restored from an old
        // backup may hold two pending changes where cold holds millions after them.
        let cold = inner.cold.read_changes_through(object, from, last, AsOf::Latest).await?;
        let by_seq: HashMap<Seq, &ChangeRecord> = cold.iter().map(|r| (r.seq, r)).collect();
        for r in overlap {
            let differs = r.token > wm.token
                || by_seq.get(&r.seq).is_some_and(|c| c.key != r.key || c.op != r.op || c.value != r.value);
            if differs {
                return Err(Error::corrupt(format!(
                    "{object}: hot change {} (key {:?}, token {}) differs from cold storage's change at that \
                     sequence number (cold through {}, token {}): hot and cold diverged; nothing was changed \
                     (operator attention)",
                    r.seq, r.key, r.token, wm.through, wm.token
                )));
            }
        }
        if last <= from {
            break; // no progress (a misbehaving backend): checked what it gave
        }
        from = last;
    }
    Ok(())
}

/// For an activation made from hot storage while cold storage was unreachable
/// ([`Active::cold_unverified`]): compare its pending changes with cold's before a drain appends
/// any of them, as an activation with cold reachable does. A drain appends first and compares
/// the records cold skipped as replays after: a hot store rolled back (restored from an old
/// backup) that ran meanwhile had its newer, diverged changes committed to cold on top of cold's
/// own before the divergence showed, and every later drain went on adding to that mix. Until
/// the comparison passes, every drain of the activation fails with its error (`Corrupt` for a
/// divergence; nothing reaches cold). A hot store behind cold (its last change before cold's
/// watermark, with nothing diverged) ends the activation as a drain finding it does
/// ([`hot_behind_cold`]): the next activation restores the object from cold, as one made with
/// cold reachable would have (taken as verified, its next writes reused cold's sequence numbers).
async fn verify_against_cold(inner: &Arc<Inner>, object: &ObjectId, active: &mut Active) -> Result<()> {
    if !active.cold_unverified {
        return Ok(());
    }
    let verify = async {
        let wm = inner.cold.watermark(object).await?;
        let info = inner.hot.object_info(object).await?;
        if let Some(i) = info.as_ref().filter(|i| i.has_pending_changes() && i.truncated_through < wm.through) {
            check_pending_against_cold(inner, object, i.truncated_through, &wm).await?;
        }
        let hot_last = info.as_ref().map_or(0, |i| i.last_seq);
        if hot_last < wm.through {
            return Err(hot_behind_cold(object, hot_last, wm.through));
        }
        Ok(())
    };
    with_renewal(inner, &mut active.lease, verify).await?;
    active.cold_unverified = false;
    Ok(())
}

/// `drain`, a drain of `active`'s object, once [`verify_against_cold`] passed, with the lease
/// renewed meanwhile: how every drain of one activation runs (`flush_all` verifies its held
/// objects itself, between renewals of all of them).
async fn verified_then<T>(
    inner: &Arc<Inner>,
    object: &ObjectId,
    active: &mut Active,
    drain: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    verify_against_cold(inner, object, active).await?;
    with_renewal(inner, &mut active.lease, drain).await
}

/// A drain's commit skipped records as already in cold (replays): before they are truncated
/// from hot, check that cold holds the same changes at those sequence numbers. Differing ones
/// mean hot and cold diverged (a hot store rolled back behind cold and written again while cold
/// was unreachable at activation): `Corrupt`, and nothing is truncated, instead of dropping
/// acknowledged writes as replays.
async fn check_skipped(inner: &Arc<Inner>, object: &ObjectId, after: Seq, commit: &crate::ColdCommit) -> Result<()> {
    match commit.watermarks.get(object) {
        Some(wm) => check_pending_against_cold(inner, object, after, wm).await,
        None => Ok(()),
    }
}

/// Append with the exactly-once rules: on an unknown outcome, retry the same batch (the sink
/// skips what it already has).
async fn append_resolving(inner: &Arc<Inner>, batch: ColdBatch) -> Result<Appended> {
    let policy = crate::retry::RetryPolicy { retries: 5, base: Duration::from_millis(10) };
    let (out, unsure) =
        crate::retry::retry_idempotent_noting_unknown(&*inner.clock, policy, || inner.cold.append(batch.clone())).await;
    let commit = out.map_err(|e| drain_settles(e, "the cold commit"))?;
    // An attempt whose outcome was unknown, and a later one that found every record already
    // in cold: the first landed them (a commit is whole or absent).
    let landed_unseen = unsure && commit.snapshot.is_none() && commit.records_skipped > 0;
    Ok(Appended { commit, landed_unseen })
}

/// Remember `object`, given back undrained by a `flush_all`, for the next one ([`Inner::owed`]),
/// when nothing else would drain it (`drain_released` off: with it on, every flush takes the
/// objects whose changes wait).
fn owe(inner: &Inner, object: &ObjectId) {
    if !inner.settings.drain_released {
        inner.owed.lock().insert(object.clone());
    }
}

/// A drain's step whose outcome stayed unknown (a cold commit after its attempts, a hot
/// truncation): a retryable `Unavailable`, not `AmbiguousOutcome`. A drain is safe to run
/// again: it re-sends what hot still holds and cold skips what landed (exactly once), so there
/// is nothing for the caller to read back or settle; `AmbiguousOutcome` (not retryable) made a
/// host that retries retryable errors stop flushing. The unknown outcome stays in the source.
fn drain_settles(e: Error, step: &str) -> Error {
    if e.kind() == &ErrorKind::AmbiguousOutcome {
        Error::unavailable(format!(
            "{step} had an unknown outcome; the next flush settles it (what landed is skipped then: exactly once)"
        ))
        .with_source(e)
    } else {
        e
    }
}

/// A cold append's answer, and whether an attempt of the call whose reply was lost landed it
/// (the answer then reports its records as skipped: [`count_commit`] counts them as written).
struct Appended {
    commit: crate::ColdCommit,
    landed_unseen: bool,
}

/// Whether automatic flushes are paused after a failure (see [`pause_auto_flush`]).
fn auto_flush_paused(inner: &Inner) -> bool {
    let until = inner.auto_flush_pause.lock().1;
    inner.clock.monotonic() < until
}

/// Skip automatic flushes for a while after one failed ([`AUTO_FLUSH_PAUSE`], doubling with
/// failures in a row up to [`AUTO_FLUSH_MAX_PAUSE`]).
fn pause_auto_flush(inner: &Inner) {
    let now = inner.clock.monotonic();
    let mut pause = inner.auto_flush_pause.lock();
    pause.0 = pause.0.saturating_add(1);
    pause.1 = now.saturating_add(auto_flush_wait(pause.0));
}

/// Whether `object`'s automatic flushes are paused after a refusal about it.
fn object_flush_paused(inner: &Inner, object: &ObjectId) -> bool {
    let now = inner.clock.monotonic();
    inner.object_flush_pause.lock().get(object).is_some_and(|(_, until)| now < *until)
}

/// Skip `object`'s automatic flushes for a while after one was refused for a reason about it
/// (as [`pause_auto_flush`] the runtime's); expired pauses of other objects are dropped.
fn pause_object_flush(inner: &Inner, object: &ObjectId) {
    let now = inner.clock.monotonic();
    let mut pauses = inner.object_flush_pause.lock();
    // Expired pauses keep their count of failures in a row (the next failure doubles it) only
    // while few objects are paused: a long list is trimmed to the current ones.
    if pauses.len() >= 1024 {
        pauses.retain(|_, (_, until)| now < *until);
    }
    let p = pauses.entry(object.clone()).or_insert((0, Duration::ZERO));
    p.0 = p.0.saturating_add(1);
    p.1 = now.saturating_add(auto_flush_wait(p.0));
}

/// How long automatic flushes pause after `failures` (at least 1) in a row.
fn auto_flush_wait(failures: u32) -> Duration {
    AUTO_FLUSH_PAUSE.saturating_mul(1 << (failures.max(1) - 1).min(6)).min(AUTO_FLUSH_MAX_PAUSE)
}

/// Whether an automatic flush's failure is about its object (cold refusing its records, its hot
/// changes differing from cold's, a newer holder: not mended by waiting), rather than about cold
/// storage (out of reach, busy, an answer lost, access denied, full), which pauses every
/// object's automatic flushes.
fn about_the_object(e: &Error) -> bool {
    // Named, not inferred: a non-retryable `Backend` or `Conflict` (access denied, a full or
    // read-only warehouse, a store too slow to commit) is about cold storage, every object's.
    !e.is_retryable()
        && matches!(
            e.kind(),
            ErrorKind::InvalidInput
                | ErrorKind::LimitExceeded { .. }
                | ErrorKind::Corrupt
                | ErrorKind::Fenced { .. }
                | ErrorKind::LeaseLost { .. }
        )
}

/// The token of a change written by a newer holder than `token`, if `records` hold one: the
/// lease ran out and another node wrote since. Such changes must never reach cold under `token`
/// (cold fences committers, not record tokens): the newer holder drains them under its own.
fn newer_holder(records: &[ChangeRecord], token: FencingToken) -> Option<FencingToken> {
    records.iter().map(|r| r.token).find(|t| *t > token)
}

/// `Corrupt` if cold storage no longer holds every change the hot store has of `object` (it
/// truncated them once cold acknowledged them): the cold store lost data, or this runtime uses
/// another table than the one that acknowledged them. Evicting then would drop the only copy.
async fn cold_holds_hot_changes(inner: &Arc<Inner>, object: &ObjectId) -> Result<()> {
    let Some(info) = inner.hot.object_info(object).await? else { return Ok(()) };
    // With nothing of the object in hot storage (no live keys, nothing pending: a lazy
    // activation of an evicted object, or every key deleted and drained) no copy goes: cold
    // storage is not asked (an idle lazy object was kept, its lease renewed past `keep_warm`,
    // for as long as cold storage was down; a cold store that lost the object's changes is
    // found by its next activation).
    if info.last_seq == 0 || (info.keys == 0 && !info.has_pending_changes()) {
        return Ok(());
    }
    let through = inner.cold.watermark(object).await?.through;
    if through < info.last_seq {
        return Err(Error::corrupt(format!(
            "{object}: the hot store holds changes through seq {} and cold storage acknowledged them, \
             but cold storage now holds them only through seq {through}; the object is not evicted \
             (its hot state is the only copy). The cold store lost data, this runtime uses a \
             different table or cold store than the one that acknowledged them, or its cold store \
             reads a stale table (Iceberg with refresh_reads off)",
            info.last_seq
        )));
    }
    Ok(())
}

/// Drain one object's change log to cold storage and truncate it, in at most `max_commits`
/// cold commits (of `flush_batch_records` records each).
async fn drain(inner: &Arc<Inner>, object: &ObjectId, token: FencingToken, max_commits: usize) -> Result<FlushReport> {
    let mut report = FlushReport::default();
    for _ in 0..max_commits {
        let Some(info) = inner.hot.object_info(object).await? else { break };
        if !info.has_pending_changes() {
            break;
        }
        let (records, _, _) = read_for_commit(
            inner,
            object,
            info.truncated_through,
            inner.settings.flush_batch_records,
            inner.settings.flush_batch_bytes,
            true,
        )
        .await?;
        if records.is_empty() {
            break;
        }
        if let Some(newer) = newer_holder(&records, token) {
            return Err(Error::fenced(object, token, newer));
        }
        let appended = records.last().map_or(0, |r| r.seq);
        let first = records.first().map_or(0, |r| r.seq);
        let resolved = match append_resolving(inner, ColdBatch::single(object.clone(), token, records)).await {
            Ok(c) => c,
            Err(e) => return Err(explain_gap(inner, object, first, e).await),
        };
        // Counted as it lands: a check or the truncation below may still fail (the next drain
        // then finds these records in cold and commits nothing to count).
        count_commit(inner, &mut report, &resolved);
        let commit = resolved.commit;
        if commit.records_skipped > 0 {
            check_skipped(inner, object, info.truncated_through, &commit).await?;
        }
        let through: Seq = commit.watermarks.get(object).map_or(0, |w| w.through);
        check_durable_through(object, info.last_seq, appended, through)?;
        inner
            .hot
            .truncate_changes(object, token, through)
            .await
            .map_err(|e| drain_settles(e, &format!("{object}: the truncation")))?;
        // Drained: a pause of its automatic flushes after a refusal has served its purpose.
        inner.object_flush_pause.lock().remove(object);
        report.objects = 1;
    }
    Ok(report)
}

/// The next changes of `object` after `after` for one cold commit: read page after page (a hot
/// store may answer a read with fewer changes than asked, as the SQL stores do past 8 MiB of
/// values) until `max_records` changes or `max_bytes` bytes ([`record_bytes`]) are reached or
/// the log is read to its end, then cut to `max_bytes` (at least one change if `at_least_one`).
/// Returns the changes, the bytes they count, and whether any change was read (none kept then
/// means the commit is full).
async fn read_for_commit(
    inner: &Inner,
    object: &ObjectId,
    after: Seq,
    max_records: usize,
    max_bytes: usize,
    at_least_one: bool,
) -> Result<(Vec<ChangeRecord>, usize, bool)> {
    let (mut records, mut bytes, mut after) = (Vec::new(), 0usize, after);
    while records.len() < max_records && bytes < max_bytes {
        let page = inner.hot.read_changes(object, after, max_records - records.len()).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        bytes = page.iter().map(record_bytes).fold(bytes, usize::saturating_add);
        records.extend(page);
    }
    let read_any = !records.is_empty();
    let used = cut_to_bytes(&mut records, max_bytes, at_least_one);
    Ok((records, used, read_any))
}

/// The bytes a change record counts against `flush_batch_bytes`.
fn record_bytes(r: &ChangeRecord) -> usize {
    r.key.len().saturating_add(r.value.len()).saturating_add(r.type_name.len()).saturating_add(64)
}

/// Keep the longest prefix of `records` within `budget` bytes (at least one record if
/// `at_least_one`, whatever its size); returns the bytes kept (at most `budget`, or the one
/// record's).
fn cut_to_bytes(records: &mut Vec<ChangeRecord>, budget: usize, at_least_one: bool) -> usize {
    let (mut total, mut keep) = (0usize, 0usize);
    for r in records.iter() {
        let b = record_bytes(r);
        if total.saturating_add(b) > budget && (keep > 0 || !at_least_one) {
            break;
        }
        total = total.saturating_add(b);
        keep += 1;
    }
    records.truncate(keep);
    total.min(budget)
}

/// A drain's append that cold refused as `InvalidInput`, starting at seq `first`: if cold holds
/// the object only through a seq before `first - 1` (the hot store truncated changes cold had
/// acknowledged, and cold no longer has them), `Corrupt` saying so: no input can be fixed, and
/// every later drain fails alike. Any other error is returned as it is.
async fn explain_gap(inner: &Arc<Inner>, object: &ObjectId, first: Seq, e: Error) -> Error {
    if e.kind() != &ErrorKind::InvalidInput {
        return e;
    }
    match inner.cold.watermark(object).await {
        Ok(wm) if wm.through.saturating_add(1) < first => Error::corrupt(format!(
            "{object}: cold storage holds changes only through seq {} but the hot store's next change to \
             drain is seq {first} (it truncated the changes between once cold storage acknowledged them); \
             the cold store lost data, or this runtime uses a different table or cold store than the one \
             that acknowledged them",
            wm.through
        ))
        .with_source(e),
        _ => e,
    }
}

/// Count a cold commit of a drain in the flush's report and the runtime's metrics (one an
/// attempt whose reply was lost made too: its records are the answer's skipped ones).
fn count_commit(inner: &Inner, report: &mut FlushReport, appended: &Appended) {
    let c = &appended.commit;
    let (commits, records) = if appended.landed_unseen {
        (1, c.records_skipped)
    } else {
        (u64::from(c.snapshot.is_some()), c.records_written)
    };
    report.commits += commits;
    report.records = report.records.saturating_add(records);
    let mut m = inner.metrics.lock();
    m.flushes += commits;
    m.records_flushed = m.records_flushed.saturating_add(records);
}
