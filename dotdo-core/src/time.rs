//! Time: timestamps and the injectable [`Clock`].
//!
//! Library code never reads ambient time; it asks a [`Clock`]. Hosts use [`SystemClock`]; tests
//! use [`ManualClock`] and move time by hand, which makes lease expiry and renewal deterministic.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;

/// Wall-clock time in microseconds since the Unix epoch (UTC), the resolution of Iceberg's
/// `timestamptz`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// From microseconds since the epoch.
    pub const fn from_micros(us: i64) -> Self {
        Timestamp(us)
    }

    /// From milliseconds since the epoch.
    pub const fn from_millis(ms: i64) -> Self {
        Timestamp(ms.saturating_mul(1000))
    }

    /// Microseconds since the epoch.
    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// Milliseconds since the epoch (rounded down, also before the epoch).
    pub const fn as_millis(self) -> i64 {
        self.0.div_euclid(1000)
    }

    /// This time plus a duration (saturating).
    pub fn plus(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)))
    }

    /// The duration from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Sign, then whole seconds and microseconds of the magnitude: -1 µs is "-0.000001s".
        let sign = if self.0 < 0 { "-" } else { "" };
        let m = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:06}s", m / 1_000_000, m % 1_000_000)
    }
}

/// A future that completes after a sleep.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Source of time for every dotdo component.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Current wall-clock time.
    fn now(&self) -> Timestamp;

    /// Monotonic time since an arbitrary fixed origin; use for measuring durations. It must
    /// not follow steps of the wall clock: the runtime also judges leases by it, so that a wall
    /// clock stepped back does not stretch them.
    fn monotonic(&self) -> Duration;

    /// A future that completes once `duration` has passed on this clock.
    fn sleep(&self, duration: Duration) -> Sleep;
}

/// The real clock: `SystemTime` for wall time, `Instant` for durations, a runtime-agnostic timer
/// thread (`futures-timer`) for sleeps.
#[derive(Debug, Clone)]
pub struct SystemClock {
    origin: std::time::Instant,
}

impl SystemClock {
    /// A new system clock.
    #[allow(clippy::disallowed_methods)]
    pub fn new() -> Self {
        SystemClock { origin: std::time::Instant::now() }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)]
    fn now(&self) -> Timestamp {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or(Duration::ZERO);
        Timestamp(i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
    }

    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        Box::pin(futures_timer::Delay::new(duration))
    }
}

#[derive(Debug, Default)]
struct ManualState {
    now: i64,
    /// Where monotonic time counts from: 0, or the start if it is before the epoch (monotonic
    /// time then still moves with every advance).
    origin: i64,
    sleepers: Vec<(i64, Arc<Mutex<SleepSlot>>)>,
}

#[derive(Debug, Default)]
struct SleepSlot {
    done: bool,
    waker: Option<Waker>,
}

/// A clock that moves only when told to. Sleeps complete when [`ManualClock::advance`] passes
/// their deadline. Cheap to clone; clones share time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    state: Arc<Mutex<ManualState>>,
}

impl ManualClock {
    /// A manual clock starting at `start`.
    pub fn new(start: Timestamp) -> Self {
        let origin = start.0.min(0);
        ManualClock { state: Arc::new(Mutex::new(ManualState { now: start.0, origin, sleepers: Vec::new() })) }
    }

    /// Move time forward and wake every sleeper whose deadline has passed. Like sleeps, `by`
    /// counts in whole microseconds rounded up, so `advance(d)` always ends a `sleep(d)`.
    pub fn advance(&self, by: Duration) {
        let mut st = self.state.lock();
        let to = st.now.saturating_add(micros_rounded_up(by));
        Self::move_to(&mut st, to);
    }

    /// Set the time to `to` (held under the lock) and wake the sleepers due by then.
    fn move_to(st: &mut ManualState, to: i64) {
        st.now = to;
        let now = st.now;
        st.sleepers.retain(|(deadline, slot)| {
            if *deadline <= now {
                let mut s = slot.lock();
                s.done = true;
                if let Some(w) = s.waker.take() {
                    w.wake();
                }
                false
            } else {
                true
            }
        });
    }

    /// Sleeps on this clock that are waiting (started, not ended, not dropped): a test can wait
    /// for a background task to be asleep before it moves the clock.
    pub fn pending_sleeps(&self) -> usize {
        self.state.lock().sleepers.iter().filter(|(_, s)| Arc::strong_count(s) > 1).count()
    }

    /// Set the time (never backwards: an earlier time is ignored), in one step with any
    /// concurrent `advance`.
    pub fn set(&self, to: Timestamp) {
        let mut st = self.state.lock();
        if to.0 > st.now {
            Self::move_to(&mut st, to.0);
        }
    }
}

/// `d` in whole microseconds, rounded up (saturating): the manual clock's unit for sleeps and
/// advances alike, so that `advance(d)` always ends a `sleep(d)`.
fn micros_rounded_up(d: Duration) -> i64 {
    i64::try_from(d.as_nanos().div_ceil(1000)).unwrap_or(i64::MAX)
}

struct ManualSleep {
    slot: Arc<Mutex<SleepSlot>>,
}

impl Future for ManualSleep {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.slot.lock();
        if s.done {
            Poll::Ready(())
        } else {
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.state.lock().now)
    }

    fn monotonic(&self) -> Duration {
        // The microseconds since the epoch, or since the start if that is before the epoch (such
        // a start read 0 until time passed the epoch, and a timeout measured on it never ended).
        let st = self.state.lock();
        Duration::from_micros(st.now.abs_diff(st.origin))
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        let mut st = self.state.lock();
        // A sleep never ends before its duration has passed (and a sub-microsecond one ends
        // with the next advance, not never).
        let deadline = st.now.saturating_add(micros_rounded_up(duration));
        let slot = Arc::new(Mutex::new(SleepSlot { done: duration.is_zero(), waker: None }));
        if !duration.is_zero() {
            // Sleeps dropped unfinished (a timeout's, a `select!` loser's) are forgotten here:
            // kept, a loop that makes and drops long sleeps grew the list, and every advance
            // walked it all.
            st.sleepers.retain(|(_, s)| Arc::strong_count(s) > 1);
            st.sleepers.push((deadline, slot.clone()));
        }
        Box::pin(ManualSleep { slot })
    }
}

/// Measures elapsed time on a [`Clock`].
#[derive(Debug, Clone)]
pub struct Stopwatch {
    clock: Arc<dyn Clock>,
    start: Duration,
}

impl Stopwatch {
    /// Start measuring now.
    pub fn start(clock: Arc<dyn Clock>) -> Self {
        let start = clock.monotonic();
        Stopwatch { clock, start }
    }

    /// Time since start.
    pub fn elapsed(&self) -> Duration {
        self.clock.monotonic().saturating_sub(self.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    /// Sleeps dropped unfinished are forgotten: 10,000 made and dropped leave only the live ones
    /// (each advance walked every one ever made), and the live ones still end on time.
    #[test]
    fn dropped_manual_sleeps_are_forgotten() {
        let clock = ManualClock::new(Timestamp::from_millis(1_000));
        let mut live = clock.sleep(Duration::from_secs(10));
        for _ in 0..10_000 {
            drop(clock.sleep(Duration::from_secs(3600)));
        }
        let _another = clock.sleep(Duration::from_secs(3600));
        assert!(clock.state.lock().sleepers.len() <= 3, "{}", clock.state.lock().sleepers.len());
        clock.advance(Duration::from_secs(10));
        assert!((&mut live).now_or_never().is_some());
    }

    #[test]
    fn manual_clock_monotonic_time_moves_also_before_the_epoch() {
        let c = ManualClock::new(Timestamp::from_micros(-10_000_000));
        let m0 = c.monotonic();
        c.advance(Duration::from_secs(5));
        assert_eq!(c.monotonic() - m0, Duration::from_secs(5));
        let c = ManualClock::new(Timestamp::from_millis(1_000));
        assert_eq!(c.monotonic(), Duration::from_secs(1), "after the epoch: the time since it, as before");
    }

    #[test]
    fn manual_clock_sleep_completes_only_after_advance() {
        let clock = ManualClock::new(Timestamp::from_millis(1_000));
        let mut s = clock.sleep(Duration::from_millis(50));
        assert!((&mut s).now_or_never().is_none());
        clock.advance(Duration::from_millis(49));
        assert!((&mut s).now_or_never().is_none());
        clock.advance(Duration::from_millis(1));
        assert!(s.now_or_never().is_some());
        assert_eq!(clock.now(), Timestamp::from_millis(1_050));
    }

    /// A sleep shorter than the clock's microsecond resolution ends with the next advance (it
    /// did never end), and a sleep of 1.5 µs does not end after 1 µs.
    #[test]
    fn manual_clock_sleeps_round_up_to_whole_microseconds() {
        let clock = ManualClock::new(Timestamp::from_millis(1_000));
        let mut short = clock.sleep(Duration::from_nanos(500));
        let mut odd = clock.sleep(Duration::from_nanos(1_500));
        assert!((&mut short).now_or_never().is_none());
        clock.advance(Duration::from_micros(1));
        assert!(short.now_or_never().is_some(), "a sub-microsecond sleep ends");
        assert!((&mut odd).now_or_never().is_none(), "1.5 µs have not passed");
        clock.set(Timestamp::from_micros(1_000_002));
        assert!(odd.now_or_never().is_some());
        clock.set(Timestamp::from_micros(1_000_001));
        assert_eq!(clock.now(), Timestamp::from_micros(1_000_002), "never backwards");
        // A computed duration with a fraction of a microsecond (two thirds of a 10 s TTL):
        // advancing by it ends a sleep of it.
        let d = Duration::from_secs(10) * 2 / 3;
        let mut s = clock.sleep(d);
        clock.advance(d);
        assert!((&mut s).now_or_never().is_some(), "advance(d) ends sleep(d)");
    }

    #[test]
    fn timestamp_arithmetic() {
        let t = Timestamp::from_millis(5);
        assert_eq!(t.plus(Duration::from_millis(3)).as_millis(), 8);
        assert_eq!(t.since(Timestamp::from_millis(10)), Duration::ZERO);
        assert_eq!(t.to_string(), "0.005000s");
        assert_eq!(Timestamp::from_micros(-1).to_string(), "-0.000001s");
        assert_eq!(Timestamp::from_micros(-1_500_000).to_string(), "-1.500000s");
        assert_eq!(Timestamp::from_micros(i64::MIN).to_string(), "-9223372036854.775808s");
        assert_eq!(Timestamp::from_micros(-1).as_millis(), -1, "rounded down");
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock::new().now() > Timestamp::from_millis(1_577_836_800_000));
    }
}
