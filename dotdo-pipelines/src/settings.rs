//! Pipeline settings: plain data with documented defaults.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dotdo_core::FencingToken;

/// What `send` does when the buffer is full.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backpressure {
    /// Fail at once with a retryable `Unavailable` naming the buffer depth.
    FailFast,
    /// [`Pipeline::send_wait`](crate::Pipeline::send_wait) waits up to this long for room (a roll
    /// frees it), then fails with a retryable `Unavailable`; `send` behaves like `FailFast`.
    Wait(Duration),
    /// Overflow to a SQLite file at this path once `capacity` events or `capacity_bytes` bytes
    /// wait in memory; events are still delivered in order, exactly once. Sends are never
    /// refused for room; a roll reads back at most `roll_rows` events and about `roll_bytes`
    /// bytes at a time. With [`Durability::Durable`] every event is on disk already: `Spill`
    /// then only lifts the capacity bounds, and this path is not used. With
    /// [`Durability::Memory`], a process that dies loses the events still in memory, while
    /// those in the spill file stay there: the next pipeline opened with this path delivers
    /// them (after that gap). Such a gap can also cost spilled events: if the dead process's
    /// last commit of in-memory events was still under way (sent to a remote catalog) and lands
    /// after the next pipeline numbered spilled events of the same objects, the sink takes
    /// those as replays. Use `Durable` where no accepted event may be lost.
    Spill(PathBuf),
}

/// Where accepted events wait for their roll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Durability {
    /// In memory: fastest; events accepted but not yet rolled are lost if the process dies.
    /// A pipeline whose roll was dropped (a timeout around `roll` or `close`), or dropped itself
    /// while its `run` loop was rolling (the loop's roll goes on until its commit answers), may
    /// still have its commit under way: a new pipeline on the same tables that numbers
    /// events of the same objects before that commit lands loses them (the sink takes them as
    /// replays of the dropped roll's, and the roll counts them as committed). Let a dropped roll's
    /// request time out (the catalog client's timeout) before starting another pipeline, or use
    /// `Durable`, whose successor commits the inherited claim first.
    Memory,
    /// A local SQLite log at this path (WAL, `synchronous=NORMAL`): an acknowledged `send`
    /// survives a process kill and is delivered exactly once after restart. Claims (what a roll
    /// is about to commit) are written with `synchronous=FULL`, so a power loss can lose the
    /// latest sends but never deliver a committed batch twice. One pipeline at a time: the log
    /// is locked (`<path>.pipeline.lock`, symlinks resolved) while a pipeline has it open, and
    /// a second one is refused with a retryable `Conflict`.
    Durable(PathBuf),
}

/// Settings of a [`Pipeline`](crate::Pipeline).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineSettings {
    /// Roll at least this often when events are pending (default 10 s; the predecessor used 10 s
    /// to 300 s; milliseconds work).
    pub roll_interval: Duration,
    /// Roll once this many events are pending (default 100 000).
    pub roll_rows: usize,
    /// Roll once this many bytes are pending (default 64 MiB).
    pub roll_bytes: usize,
    /// Most events waiting (default 1 000 000); then the backpressure policy applies. A roll is
    /// due once half of it (or of `capacity_bytes`) waits, whatever `roll_rows`/`roll_bytes` say
    /// (not with `Backpressure::Spill`, which lifts the capacities).
    pub capacity: usize,
    /// Most bytes waiting (default 512 MiB, measured like `roll_bytes`: an event's id, type,
    /// key and value plus 32; an Arrow batch's memory size); then the backpressure policy
    /// applies. With `capacity` this bounds the buffer's memory whatever the event sizes,
    /// counting the bytes an event or batch refers to, not what it keeps alive: an event value
    /// that is a `Bytes` slice of a larger buffer (part of a request body) keeps the whole buffer
    /// while counting its own length, as a small slice of a large Arrow batch keeps the whole
    /// batch's buffers while counting its rows. Send copies of such slices
    /// (`Bytes::copy_from_slice`) when the buffers are much larger than what is sent.
    pub capacity_bytes: usize,
    /// Backpressure policy (default `FailFast`).
    pub backpressure: Backpressure,
    /// Buffer durability (default `Memory`).
    pub durability: Durability,
    /// The committer token of the pipeline's cold commits (default 1; `NONE` is refused). A
    /// pipeline owns the sequence numbers of the objects it writes: do not point a runtime and a
    /// pipeline, or two pipelines, at the same objects of one table (the sink would take the
    /// second writer's records for replays of the first's and skip them).
    pub token: FencingToken,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        PipelineSettings {
            roll_interval: Duration::from_secs(10),
            roll_rows: 100_000,
            roll_bytes: 64 << 20,
            capacity: 1_000_000,
            capacity_bytes: 512 << 20,
            backpressure: Backpressure::FailFast,
            durability: Durability::Memory,
            token: FencingToken::new(1),
        }
    }
}

impl PipelineSettings {
    /// `InvalidInput` unless every capacity, threshold and interval is positive.
    pub(crate) fn validate(&self) -> dotdo_core::Result<()> {
        if self.capacity == 0
            || self.capacity_bytes == 0
            || self.roll_rows == 0
            || self.roll_bytes == 0
            || self.roll_interval.is_zero()
        {
            return Err(dotdo_core::Error::invalid(
                "capacity, capacity_bytes, roll_rows, roll_bytes and roll_interval must be positive",
            ));
        }
        Ok(())
    }

    /// Whether the capacities bound the buffer (every policy but `Spill`, which lifts them).
    pub(crate) fn bounded(&self) -> bool {
        !matches!(self.backpressure, Backpressure::Spill(_))
    }

    /// Whether `events` (rows) and `bytes` waiting fill a bounded buffer half: a roll is then due
    /// whatever `roll_rows`/`roll_bytes` say.
    pub(crate) fn half_full(&self, events: usize, bytes: usize) -> bool {
        self.bounded() && (events.saturating_mul(2) >= self.capacity || bytes.saturating_mul(2) >= self.capacity_bytes)
    }

    /// Whether waiting events or batches live in memory only (not a durable log): the roll loop
    /// holds such a pipeline once it is closed, since they die with it.
    pub(crate) fn holds_in_memory(&self) -> bool {
        !matches!(self.durability, Durability::Durable(_))
    }

    /// How long until the roll interval, counted from the last roll's start `last_roll` (on
    /// `clock`'s monotonic time), ends: zero once it has.
    pub(crate) fn interval_left(&self, clock: &dyn dotdo_core::Clock, last_roll: Duration) -> Duration {
        self.roll_interval.saturating_sub(clock.monotonic().saturating_sub(last_roll))
    }

    /// How often a roll loop checks whether a roll is due.
    pub(crate) fn tick(&self) -> Duration {
        (self.roll_interval / 4).clamp(Duration::from_millis(1), Duration::from_millis(50))
    }
}

/// Whether a sink commit a roll started may still be under way, per sink (an event pipeline's
/// route; `""` for an Arrow pipeline's one sink): its roll was dropped (its caller gave up on it,
/// or the sink panicked) during the commit, or the commit's answer was an unknown outcome, and
/// no answer of that sink has settled the batch since. Such a commit may still land (a request
/// queued at a remote catalog), so `take_refused` does not hand the batch out meanwhile (sent
/// again, its rows could land twice). Likewise a batch an earlier process claimed (its commit
/// may have been under way when it ended), until each of its sinks has answered this process.
#[derive(Debug, Default)]
pub(crate) struct CommitWatch {
    /// Per sink: (a commit is under way, left so by a roll dropped during it; a roll was
    /// dropped during a commit, or its answer was an unknown outcome, and no answer has settled
    /// the batch since).
    open: parking_lot::Mutex<std::collections::HashMap<String, (bool, bool)>>,
    /// Sinks that have given this process an answer settling a commit (`Ok`, or a refusal for
    /// good).
    answered: parking_lot::Mutex<std::collections::HashSet<String>>,
}

impl CommitWatch {
    /// Before a commit to `sink`.
    pub(crate) fn start(&self, sink: &str) {
        let mut open = self.open.lock();
        let (committing, unsettled) = open.entry(sink.to_string()).or_default();
        // The previous commit to this sink never returned: its roll was dropped during it.
        *unsettled |= *committing;
        *committing = true;
    }

    /// After a commit to `sink` that returned `out`, `unknown` if one of its attempts had an
    /// unknown outcome: settled by an answer that says whether the batch landed (`Ok`, or a
    /// refusal for good of a commit none of whose attempts may be under way); a retryable failure
    /// or an unknown outcome leaves a dropped roll's commit possibly under way.
    pub(crate) fn end<T>(&self, sink: &str, out: &dotdo_core::Result<T>, unknown: bool) {
        // An attempt of unknown outcome (its reply lost or timed out), also one followed by
        // attempts that failed otherwise: its request may still be queued at the sink, as a
        // dropped roll's may. Only the batch landing (`Ok`: the late request finds it and skips
        // it) settles it.
        let unknown =
            out.is_err() && (unknown || matches!(out, Err(e) if e.kind() == &dotdo_core::ErrorKind::AmbiguousOutcome));
        let settled = match out {
            Ok(_) => true,
            Err(e) => !unknown && !e.is_retryable(),
        };
        if settled {
            self.answered.lock().insert(sink.to_string());
        }
        let mut open = self.open.lock();
        if let Some((committing, unsettled)) = open.get_mut(sink) {
            *committing = false;
            *unsettled = (*unsettled || unknown) && !settled;
            if !*unsettled {
                open.remove(sink);
            }
        }
    }

    /// `take_refused`'s refusal of batch `id`, claimed by an earlier process, while one of its
    /// `sinks` has not answered this process: that process may have ended with its commit under
    /// way (a request a remote catalog still holds), which may land after the batch is handed
    /// out.
    pub(crate) fn refuse_if_inherited_unanswered<'s>(
        &self,
        id: u64,
        mut sinks: impl Iterator<Item = &'s str>,
    ) -> dotdo_core::Result<()> {
        let answered = self.answered.lock();
        if let Some(sink) = sinks.find(|s| !answered.contains(*s)) {
            let to = to_route(sink);
            return Err(dotdo_core::Error::new(
                dotdo_core::ErrorKind::Conflict,
                format!(
                    "batch {id} was claimed by an earlier process, whose commit{to} may still land; roll first \
                     (the sink's answer settles it), then take the batch out"
                ),
            ));
        }
        Ok(())
    }

    /// Whether a dropped roll's commit to `sink` may still be under way.
    pub(crate) fn is_open(&self, sink: &str) -> bool {
        self.open.lock().get(sink).is_some_and(|(c, u)| *c || *u)
    }

    /// `take_refused`'s refusal of claimed batch `id` (called with the roll lock held, so no
    /// roll's commit is under way but a dropped one's).
    pub(crate) fn refuse_if_open(&self, id: u64) -> dotdo_core::Result<()> {
        let open = self.open.lock();
        if let Some(sink) = open.iter().find(|(_, (c, u))| *c || *u).map(|(s, _)| s) {
            let to = to_route(sink);
            return Err(dotdo_core::Error::new(
                dotdo_core::ErrorKind::Conflict,
                format!(
                    "batch {id}: a commit{to} may still land (its roll was dropped during it, or its answer was \
                     an unknown outcome); roll again (a roll the sink answers settles it) before taking the batch \
                     out"
                ),
            ));
        }
        Ok(())
    }
}

/// `" to route \"name\""` for an event pipeline's route in a refusal's message; nothing for an
/// Arrow pipeline's one sink (`""`).
fn to_route(sink: &str) -> String {
    if sink.is_empty() {
        String::new()
    } else {
        format!(" to route {sink:?}")
    }
}

/// Commit retries of both pipeline kinds: 8 retries, waiting 10 ms doubling to 640 ms. Returns
/// the last answer and whether any attempt's outcome was unknown (`AmbiguousOutcome`: its
/// request may still land, whatever the later attempts answered).
pub(crate) async fn retry<T, F, Fut>(clock: &dyn dotdo_core::Clock, op: F) -> (dotdo_core::Result<T>, bool)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = dotdo_core::Result<T>>,
{
    let policy = dotdo_core::retry::RetryPolicy { retries: 8, base: Duration::from_millis(5) };
    dotdo_core::retry::retry_idempotent_noting_unknown(clock, policy, op).await
}

/// The slots through which `close` hands a memory pipeline to its live roll loops
/// ([`run_rolls`]'s `adopted`), at once: a loop that learned of the close only at its next tick
/// found no pipeline there when the host had dropped every handle after a `close` that failed
/// fast (a sink's watermark read refused), and ended; the events waiting in memory were gone.
/// Weak references: a loop that has ended is not kept, and the pipeline holds no loop.
pub(crate) struct Adopters<P>(parking_lot::Mutex<Vec<std::sync::Weak<parking_lot::Mutex<Option<P>>>>>);

impl<P> Default for Adopters<P> {
    fn default() -> Self {
        Adopters(parking_lot::Mutex::new(Vec::new()))
    }
}

impl<P: Clone> Adopters<P> {
    /// A new loop's slot.
    pub(crate) fn register(&self) -> Arc<parking_lot::Mutex<Option<P>>> {
        let slot = Arc::new(parking_lot::Mutex::new(None));
        let mut slots = self.0.lock();
        slots.retain(|s| s.strong_count() > 0);
        slots.push(Arc::downgrade(&slot));
        slot
    }

    /// Give every live loop a handle of `p` (closed, with a memory log).
    pub(crate) fn hand_over(&self, p: &P) {
        for slot in self.0.lock().iter().filter_map(std::sync::Weak::upgrade) {
            *slot.lock() = Some(p.clone());
        }
    }
}

/// The roll loop of both pipeline kinds: roll whenever due until `closed`. A failed roll is
/// tried again (the claimed batch stays and is committed again) after a pause that doubles
/// with each failure in a row, from twice the tick up to
/// [`MAX_ROLL_BACKOFF`](crate::MAX_ROLL_BACKOFF), so a sink that refuses the batch for good is
/// not hammered. Time is the clock's monotonic time: a wall clock set back must not stop rolls.
/// Once a pipeline that `holds` (a memory log, whose waiting rows die with it) is closed with
/// something waiting, the loop holds it (every handle may be dropped after a failed `close`)
/// until that is committed or refused for good (`close` hands it over through `adopted` at
/// once: see [`Adopters`]). A durable log is let go with the last handle (its lock with it):
/// what waits there is delivered by the next pipeline on it.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_rolls<P: Clone, R, Fut>(
    clock: Arc<dyn dotdo_core::Clock>,
    tick: Duration,
    adopted: Arc<parking_lot::Mutex<Option<P>>>,
    live: impl Fn() -> Option<P>,
    closed: impl Fn(&P) -> bool,
    holds: impl Fn(&P) -> bool,
    waiting: impl Fn(&P) -> bool,
    due: impl Fn(&P) -> bool,
    interval_left: impl Fn(&P) -> Duration,
    roll: impl Fn(P) -> Fut,
) where
    Fut: std::future::Future<Output = dotdo_core::Result<R>>,
{
    let (mut failures, mut next_try) = (0u32, clock.monotonic());
    // The pipeline is held only while it rolls: once every handle is dropped (without `close`),
    // the loop ends and the log's lock goes with the pipeline. After `close`, what waits in a
    // memory log is the loop's to commit: it holds the pipeline from then on (`held`). Without
    // that, a host that dropped its handles after a failed `close` (the docs leave what waits to
    // this loop) had the loop end at its next tick, and the events were gone without a word.
    // (A durable log's stay in its file, and its lock is not kept from the next pipeline.)
    let mut held: Option<P> = None;
    loop {
        if held.is_none() {
            held = adopted.lock().take();
        }
        let Some(p) = held.clone().or_else(&live) else { return };
        // Closed: done once nothing waits. A `close` whose roll failed (or that its caller
        // dropped) leaves what waits to this loop, rolled with the same backoff until it is
        // committed: the loop stopping then left it for good.
        let closed = closed(&p);
        if closed && !waiting(&p) {
            return;
        }
        if closed && held.is_none() && holds(&p) {
            held = Some(p.clone());
        }
        if clock.monotonic() >= next_try && (closed || due(&p)) {
            match roll(p).await {
                Ok(_) => failures = 0,
                // After `close`, a refusal no retry can mend (a sink refusing the batch for good,
                // sequence numbers used up, a log to reopen) ends the loop: a host awaiting it
                // at shutdown must not wait for ever. What waits stays in the log.
                Err(e) if closed && !e.is_retryable() && e.kind() != &dotdo_core::ErrorKind::AmbiguousOutcome => {
                    tracing::error!(error = %e, "dotdo pipeline: the roll after close was refused for good; the loop ends");
                    return;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    // Doubling until the cap, whatever the tick (the doubling once stopped at 2^12
                    // ticks: with 1 ms ticks at 4 s, far short of `MAX_ROLL_BACKOFF`).
                    let pause = tick.saturating_mul(1u32 << failures.min(31)).min(crate::MAX_ROLL_BACKOFF);
                    next_try = clock.monotonic().saturating_add(pause);
                    tracing::warn!(error = %e, failures, retry_in = ?pause, "dotdo pipeline roll failed; will retry");
                }
            }
        } else {
            drop(p);
        }
        // With events waiting, wake when the roll interval ends, not at the next tick after it:
        // an event waited up to a tick (a quarter of the interval, at most 50 ms) past it.
        let wake = match held.clone().or_else(&live) {
            Some(p) if waiting(&p) => match interval_left(&p) {
                left if left.is_zero() => tick,
                left => tick.min(left),
            },
            _ => tick,
        };
        clock.sleep(wake).await;
    }
}

#[cfg(test)]
mod tests {
    use super::CommitWatch;
    use dotdo_core::{Error, ErrorKind};

    /// A commit whose answer is an unknown outcome leaves the sink unsettled (a request may still
    /// be queued there), as a dropped roll does, until an answer settles it; an answer that
    /// settles it counts as answered for batches of earlier processes.
    #[test]
    fn an_unknown_outcome_leaves_the_commit_open_until_an_answer_settles_it() {
        let w = CommitWatch::default();
        w.start("r");
        w.end::<()>("r", &Err(Error::new(ErrorKind::AmbiguousOutcome, "every reply lost")), true);
        assert!(w.is_open("r"));
        assert_eq!(w.refuse_if_open(7).expect_err("open").kind(), &ErrorKind::Conflict);
        assert!(w.refuse_if_inherited_unanswered(7, std::iter::once("r")).is_err(), "not answered yet");
        w.start("r");
        w.end::<()>("r", &Err(Error::unavailable("down")), false);
        assert!(w.is_open("r"), "a passing failure settles nothing");
        w.start("r");
        w.end::<()>("r", &Err(Error::invalid("refused for good")), true);
        assert!(w.is_open("r"), "a refusal after an attempt of unknown outcome settles nothing");
        w.start("r");
        w.end::<()>("r", &Err(Error::invalid("refused for good")), false);
        assert!(!w.is_open("r"));
        w.refuse_if_open(7).expect("settled");
        w.refuse_if_inherited_unanswered(7, std::iter::once("r")).expect("answered");
        assert!(w.refuse_if_inherited_unanswered(7, ["r", "other"].into_iter()).is_err(), "other has not answered");
    }
}
