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
    /// The n-th retry waits `base << min(n, 7)`.
    pub base: Duration,
}

/// Run `op` until it succeeds, fails for good, or `policy.retries` retries are used. Retried
/// are retryable errors and `AmbiguousOutcome` — so `op` must be idempotent, like a cold append
/// (the sink skips what it already has): re-running it is how an unknown outcome is resolved.
pub async fn retry_idempotent<T, F, Fut>(clock: &dyn Clock, policy: RetryPolicy, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 0u32;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if (e.is_retryable() || e.kind() == &ErrorKind::AmbiguousOutcome) && attempt < policy.retries => {
                attempt += 1;
                clock.sleep(policy.base.saturating_mul(1u32 << attempt.min(7))).await;
            }
            Err(e) => return Err(e),
        }
    }
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
}
