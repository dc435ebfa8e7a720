//! Runtime and recovery metrics, readable by the host and emitted through `tracing`.

use std::collections::VecDeque;
use std::time::Duration;

use crate::cold::SnapshotId;
use crate::ids::ObjectId;

/// How an activation obtained the object's state.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Recovery {
    /// The hot store had the state (the common case).
    Hot,
    /// Hot state was missing (or behind cold storage's, in any restore mode); all of it was
    /// restored from cold before the handler ran.
    Eager,
    /// Hot state was missing; keys are read from cold on demand until the restore completes.
    Lazy,
    /// Like `Lazy`, with named keys / prefixes preloaded first.
    Hybrid,
}

/// One activation of an object on this runtime (seed 003's cold-start breakdown).
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct ActivationMetrics {
    /// The object.
    pub object: ObjectId,
    /// How its state was obtained.
    pub recovery: Recovery,
    /// Lease acquisition plus activation, until the handler could run.
    pub cold_start: Duration,
    /// Time from the lease in hand until the object was ready: deciding how to recover it
    /// (reading hot and cold watermarks, checking pending changes against cold, raising a token
    /// floor), plus loading state from cold storage (eager restore or preload). Nonzero for
    /// `Recovery::Hot` too.
    pub state_loading: Duration,
    /// Keys loaded during activation: an eager restore's whole state, a hybrid activation's
    /// preloaded (named) keys. (A hybrid activation without an accelerator reads the object's
    /// whole state and keeps it cached, but counts only the named keys here.)
    pub keys_loaded: u64,
    /// Value bytes of those keys.
    pub bytes_loaded: u64,
    /// The cold snapshot restored from, if any.
    pub snapshot: Option<SnapshotId>,
}

impl ActivationMetrics {
    /// The activation's tracing event (at `info`).
    pub(crate) fn log(&self) {
        tracing::info!(
            object = %self.object,
            recovery = ?self.recovery,
            cold_start_us = self.cold_start.as_micros() as u64,
            state_loading_us = self.state_loading.as_micros() as u64,
            keys_loaded = self.keys_loaded,
            "dotdo activation"
        );
    }
}

/// Counters of one runtime, monotonic since the runtime was built, and one gauge
/// ([`in_flight`](Self::in_flight)).
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct RuntimeMetrics {
    /// Calls in progress at the time of the reading, of every kind shutdown waits for
    /// (`invoke`, `prefetch`, flushes, evictions, restores, maintenance rounds): a gauge.
    pub in_flight: u64,
    /// Calls to `invoke` past argument checks and shutdown, counted before activation: calls
    /// refused later (`LeaseHeld`, a failed restore) count too, so this is calls, not handlers
    /// run.
    pub invokes: u64,
    /// Handler transactions committed with at least one write.
    pub commits: u64,
    /// Activations (a lease acquired and the object made ready).
    pub activations: u64,
    /// Activations that restored eagerly from cold.
    pub eager_restores: u64,
    /// Activations that started a lazy (or hybrid) restore.
    pub lazy_restores: u64,
    /// Lazy reads answered from the runtime's cache of cold lookups.
    pub lazy_cache_hits: u64,
    /// Lazy reads that had to look up cold storage.
    pub lazy_cache_misses: u64,
    /// Keys preloaded by hybrid activations or prefetch hooks (that exist; each once; counted as
    /// loaded, also when the activation then fails).
    pub preloaded_keys: u64,
    /// Preloaded keys read at least once (preload effectiveness = hits / preloaded keys, at
    /// most 1).
    pub preload_hits: u64,
    /// Writes rejected because a newer holder fenced this runtime.
    pub fenced: u64,
    /// Handlers aborted because the lease could not be renewed in time, calls refused because
    /// the lease ran out before the handler finished (a read-only answer or an error), and
    /// commits whose lease ran out before they could refresh it (self-fencing).
    pub self_fenced: u64,
    /// Cold flushes (commits to cold storage).
    pub flushes: u64,
    /// Automatic flushes after a commit (`flush_after_changes`) that failed; the committed
    /// changes stay in the hot log for the next flush.
    pub flush_failures: u64,
    /// Records written to cold storage.
    pub records_flushed: u64,
    /// Objects tiered out of hot storage.
    pub evictions: u64,
    /// The most recent activations (at most 256), oldest first.
    pub recent_activations: VecDeque<ActivationMetrics>,
}

impl RuntimeMetrics {
    /// Count `m` as the most recent activation (logged by [`ActivationMetrics::log`], outside
    /// the metrics' lock: a tracing layer that reads the metrics on events deadlocked).
    pub(crate) fn push_activation(&mut self, m: ActivationMetrics) {
        if self.recent_activations.len() >= 256 {
            self.recent_activations.pop_front();
        }
        self.recent_activations.push_back(m);
    }
}
