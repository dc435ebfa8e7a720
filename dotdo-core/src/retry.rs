//! Retrying idempotent operations whose failure is transient or whose outcome is unknown.

use std::future::Future;
use std::time::Duration;

use crate::error::{ErrorKind, Result};
use crate::time::Clock;

/// How often and how patiently to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub retries: u32,
    /// The n-th retry waits between half and all of `base << min(n, 7)`, chosen at random so
    /// that callers retrying the same outage do not all come back in step.
    pub base: Duration,
}

/// Run `op` until it succeeds, fails for good, or `policy.retries` retries are used. Retried
/// are retryable errors and `AmbiguousOutcome` — so `op` must be idempotent, like a cold append
/// (the sink skips what it already has): re-running it is how an unknown outcome is resolved.
pub async fn retry_idempotent<T, F, Fut>(clock: &dyn Clock, policy: RetryPolicy, op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    retry_idempotent_noting_unknown(clock, policy, op).await.0
}

/// [`retry_idempotent`], also saying whether any attempt's outcome was unknown
/// (`AmbiguousOutcome`): that request may still land, whatever the later attempts answered (and
/// an answer that finds the work done may be that request's landing).
pub async fn retry_idempotent_noting_unknown<T, F, Fut>(
    clock: &dyn Clock,
    policy: RetryPolicy,
    mut op: F,
) -> (Result<T>, bool)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let (mut attempt, mut unknown) = (0u32, false);
    loop {
        match op().await {
            Ok(v) => return (Ok(v), unknown),
            Err(e) => {
                let ambiguous = e.kind() == &ErrorKind::AmbiguousOutcome;
                unknown |= ambiguous;
                if !(e.is_retryable() || ambiguous) || attempt >= policy.retries {
                    return (Err(e), unknown);
                }
                attempt += 1;
                clock.sleep(jittered(policy.base.saturating_mul(1u32 << attempt.min(7)))).await;
            }
        }
    }
}

/// A random duration between half of `d` and `d` ("equal jitter"): a backoff keeps growing with
/// the attempt, and many callers that failed together spread their retries over half of it
/// instead of coming back in step. The retry helpers here and the backends' retry loops wait
/// this way (the runtime's lease waits do not: they wait for a lease's expiry, at most 50 ms at
/// a time); a budget computed from the un-jittered waits stays an upper bound.
pub fn jittered(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // A fresh `RandomState` is randomly keyed (per process, then varied per call), so hashing
    // nothing with it yields a random number without a dependency on a randomness crate.
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    let half = d / 2;
    let spread = u64::try_from((d - half).as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(random % spread.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::time::SystemClock;

    #[test]
    fn retries_transient_and_ambiguous_then_gives_up_or_stops_at_permanent() {
        let clock = SystemClock::new();
        let policy = RetryPolicy { retries: 3, base: Duration::from_micros(1) };
        let mut calls = 0;
        let r: Result<u32> = futures::executor::block_on(retry_idempotent(&clock, policy, || {
            calls += 1;
            let c = calls;
            async move {
                match c {
                    1 => Err(Error::unavailable("busy")),
                    2 => Err(Error::new(ErrorKind::AmbiguousOutcome, "reply lost")),
                    _ => Ok(c),
                }
            }
        }));
        assert_eq!(r.expect("third call succeeds"), 3);
        let mut calls = 0;
        let r: Result<()> = futures::executor::block_on(retry_idempotent(&clock, policy, || {
            calls += 1;
            async { Err(Error::unavailable("down")) }
        }));
        assert!(r.is_err());
        assert_eq!(calls, 4, "one attempt plus three retries");
        let mut calls = 0;
        let r: Result<()> = futures::executor::block_on(retry_idempotent(&clock, policy, || {
            calls += 1;
            async { Err(Error::invalid("bad")) }
        }));
        assert!(r.is_err());
        assert_eq!(calls, 1, "permanent errors are not retried");
    }

    /// A clock whose sleeps end at once and are recorded.
    #[derive(Debug, Default)]
    struct RecordingClock {
        sleeps: parking_lot::Mutex<Vec<Duration>>,
    }

    impl Clock for RecordingClock {
        fn now(&self) -> crate::time::Timestamp {
            crate::time::Timestamp::EPOCH
        }
        fn monotonic(&self) -> Duration {
            Duration::ZERO
        }
        fn sleep(&self, duration: Duration) -> crate::time::Sleep {
            self.sleeps.lock().push(duration);
            Box::pin(async {})
        }
    }

    #[test]
    fn waits_grow_with_the_attempt_and_are_spread_at_random() {
        let policy = RetryPolicy { retries: 9, base: Duration::from_millis(10) };
        let mut all = Vec::new();
        for _ in 0..20 {
            let clock = RecordingClock::default();
            let r: Result<()> = futures::executor::block_on(retry_idempotent(&clock, policy, || async {
                Err(Error::unavailable("down"))
            }));
            assert!(r.is_err());
            let sleeps = clock.sleeps.into_inner();
            assert_eq!(sleeps.len(), 9);
            for (i, s) in sleeps.iter().enumerate() {
                let full = policy.base * (1u32 << (i as u32 + 1).min(7));
                assert!(
                    *s >= full / 2 && *s <= full,
                    "retry {} waited {s:?}, outside [{:?}, {full:?}]",
                    i + 1,
                    full / 2
                );
            }
            all.push(sleeps);
        }
        // Twenty callers failing together do not all wait the same: at 20 draws from a spread
        // of 10 ms, equal first waits everywhere would be a broken random source.
        let firsts: std::collections::HashSet<Duration> = all.iter().map(|s| s[0]).collect();
        assert!(firsts.len() > 10, "first waits barely vary: {firsts:?}");
    }
}
