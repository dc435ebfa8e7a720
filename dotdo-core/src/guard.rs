//! The [`ConsistencyGuard`] contract: leases with TTL, renewal and fencing tokens.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::ids::{FencingToken, NodeId, ObjectId};
use crate::time::Timestamp;

/// A lease on one object, as granted by a [`ConsistencyGuard`]. Mirrors a row of the `do_locks`
/// table: `do_id, node_id, acquired_at, expires_at, fencing_token`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Lease {
    /// The leased object.
    pub object: ObjectId,
    /// Who holds it.
    pub holder: NodeId,
    /// The fencing token of this lease; every write under the lease carries it.
    pub token: FencingToken,
    /// When this lease (this token) was first granted.
    pub acquired_at: Timestamp,
    /// When it expires unless refreshed.
    pub expires_at: Timestamp,
}

impl Lease {
    /// Whether the lease has expired at `now`.
    pub fn is_expired_at(&self, now: Timestamp) -> bool {
        now >= self.expires_at
    }

    /// Time left at `now` (zero when expired).
    pub fn remaining_at(&self, now: Timestamp) -> Duration {
        self.expires_at.since(now)
    }
}

/// Shortest accepted lease TTL.
pub const MIN_TTL: Duration = Duration::from_millis(1);
/// Longest accepted lease TTL.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// Validate a lease TTL against [`MIN_TTL`] and [`MAX_TTL`].
pub fn validate_ttl(ttl: Duration) -> Result<()> {
    if ttl < MIN_TTL || ttl > MAX_TTL {
        return Err(crate::Error::invalid(format!("lease ttl {ttl:?} outside {MIN_TTL:?}..={MAX_TTL:?}")));
    }
    Ok(())
}

/// Leases with fencing tokens: at most one holder per object at a time.
///
/// # Contract
///
/// * **Mutual exclusion.** At any instant of the guard's clock at most one unexpired lease exists
///   per object.
/// * **Tokens.** Every successful [`acquire`](ConsistencyGuard::acquire) issues a token strictly
///   greater than every token ever issued for that object, by any holder, across restarts,
///   releases and expiry, and than every token a co-located [`HotStore`](crate::HotStore)
///   accepted for it (an acquire once [`FencingToken::MAX`] is used is `LimitExceeded`). Tokens are never reused. [`refresh`](ConsistencyGuard::refresh) keeps the
///   token.
/// * **Acquire** succeeds if the object has no lease, or its lease expired or was released;
///   otherwise it fails with `LeaseHeld { holder, expires_at }` — also when the caller itself holds
///   it (a holder extends with `refresh`; re-acquiring would fence its own writes).
/// * **Refresh** extends an unexpired lease whose token is still current and held by
///   `lease.holder` to `now + ttl`; otherwise `Fenced` if a newer lease token exists, else
///   `LeaseLost` (also for an object never leased). A holder should refresh at about TTL/3 and
///   stop writing by itself when a refresh cannot succeed before expiry.
/// * **Release** ends the lease if its token is still current (the object is available at once,
///   for every node whatever its clock: also a lease the releaser's clock sees run out);
///   releasing a lease that is no longer current is a no-op `Ok`. The token maximum is kept.
/// * **Validate** is `Ok` iff the token is current, held by `lease.holder` and unexpired;
///   `Fenced` if a newer lease token exists, else `LeaseLost` (also for an object never leased).
///   Only leases count here: a write a co-located store accepted under a higher token (which
///   fences every write under this lease's) leaves refresh and validate `Ok`.
/// * A lease passed to refresh, release or validate is its object, holder and token: its
///   `acquired_at` and `expires_at` are not compared with the stored lease's (a refresh whose
///   reply was lost is sent again with the lease from before it, whose expiry is older), and
///   "unexpired" is the stored lease's expiry.
/// * **Durability.** An `Ok` acquire is persisted before returning: after a crash of the
///   process, no lower or equal token is issued again (after a power loss, as durable as the
///   backend's configured durability: see dotdo-sqlite's `Durability`).
/// * TTLs outside [`MIN_TTL`]..=[`MAX_TTL`] are `InvalidInput`.
/// * **Unknown outcomes.** An acquire, refresh or release whose outcome is unknown (its COMMIT
///   failed with an I/O error, a remote reply was lost) → `AmbiguousOutcome`; ask
///   [`current`](ConsistencyGuard::current) whether this holder has the lease now (a refresh or
///   release may simply be sent again). A busy or unreachable backend → `Unavailable`. A call
///   whose future is dropped before it returns (a timeout around it) has an unknown outcome: an
///   acquire under way may still land, leaving a lease to this holder that its next acquire
///   finds `LeaseHeld` (the object runtime settles that itself).
#[async_trait]
pub trait ConsistencyGuard: Send + Sync + Debug + 'static {
    /// Acquire the lease on `object` for `holder` for `ttl`.
    async fn acquire(&self, object: &ObjectId, holder: &NodeId, ttl: Duration) -> Result<Lease>;

    /// Extend `lease` to `now + ttl`.
    async fn refresh(&self, lease: &Lease, ttl: Duration) -> Result<Lease>;

    /// End `lease`.
    async fn release(&self, lease: &Lease) -> Result<()>;

    /// Check that `lease` is still current and unexpired.
    async fn validate(&self, lease: &Lease) -> Result<()>;

    /// The current unexpired lease on `object`, if any.
    async fn current(&self, object: &ObjectId) -> Result<Option<Lease>>;

    /// Whether `object` can be acquired now (no unexpired lease).
    async fn is_available(&self, object: &ObjectId) -> Result<bool> {
        Ok(self.current(object).await?.is_none())
    }
}

#[async_trait]
impl<T: ConsistencyGuard + ?Sized> ConsistencyGuard for Arc<T> {
    async fn acquire(&self, object: &ObjectId, holder: &NodeId, ttl: Duration) -> Result<Lease> {
        (**self).acquire(object, holder, ttl).await
    }
    async fn refresh(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        (**self).refresh(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        (**self).release(lease).await
    }
    async fn validate(&self, lease: &Lease) -> Result<()> {
        (**self).validate(lease).await
    }
    async fn current(&self, object: &ObjectId) -> Result<Option<Lease>> {
        (**self).current(object).await
    }
    async fn is_available(&self, object: &ObjectId) -> Result<bool> {
        (**self).is_available(object).await
    }
}

/// The common lease decision logic, shared by backends so they agree exactly.
pub mod rules {
    use super::*;
    use crate::error::{Error, ErrorKind};

    /// The stored lease row of an object (also kept after release/expiry, to keep the token).
    #[derive(Clone, PartialEq, Eq, Debug)]
    pub struct LeaseRow {
        /// Last holder.
        pub holder: NodeId,
        /// Last token issued.
        pub token: FencingToken,
        /// When that token was issued.
        pub acquired_at: Timestamp,
        /// Expiry ([`RELEASED`] once released).
        pub expires_at: Timestamp,
    }

    impl LeaseRow {
        /// The row as a lease on `object`.
        pub fn to_lease(&self, object: &ObjectId) -> Lease {
            Lease {
                object: object.clone(),
                holder: self.holder.clone(),
                token: self.token,
                acquired_at: self.acquired_at,
                expires_at: self.expires_at,
            }
        }
    }

    /// The expiry a release writes: the earliest time there is, in the past on every node's
    /// clock, also one that reads before 1970 (a simulation's). (The releasing node's time was
    /// written before: a node whose clock is behind the releaser's saw the object as held for as
    /// long as the two clocks are apart; then the Unix epoch, still held on a clock before it.)
    /// Rows released at the epoch by earlier versions read as released on any clock after it.
    pub const RELEASED: Timestamp = Timestamp::from_micros(i64::MIN);

    /// Decide an acquire: the new row, or `LeaseHeld`.
    pub fn acquire(
        object: &ObjectId,
        row: Option<&LeaseRow>,
        holder: &NodeId,
        ttl: Duration,
        now: Timestamp,
    ) -> Result<LeaseRow> {
        validate_ttl(ttl)?;
        let token = match row {
            Some(r) if now < r.expires_at => {
                return Err(Error::new(
                    ErrorKind::LeaseHeld { object: object.clone(), holder: r.holder.clone(), expires_at: r.expires_at },
                    "the object is leased by another holder",
                ));
            }
            Some(r) => r.token.checked_next()?,
            None => FencingToken::new(1),
        };
        Ok(LeaseRow { holder: holder.clone(), token, acquired_at: now, expires_at: now.plus(ttl) })
    }

    /// Decide a validate/refresh precondition: `Ok` if `lease` is current and unexpired.
    pub fn check_current(lease: &Lease, row: Option<&LeaseRow>, now: Timestamp) -> Result<()> {
        match row {
            Some(r) if r.token > lease.token => Err(Error::fenced(&lease.object, lease.token, r.token)),
            Some(r) if r.token == lease.token && now < r.expires_at && r.holder == lease.holder => Ok(()),
            _ => Err(Error::new(ErrorKind::LeaseLost { object: lease.object.clone() }, "lease expired or released")),
        }
    }
}
