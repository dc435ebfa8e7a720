//! [`ConsistencyGuard`] on [`LibsqlStore`]: leases in `do_locks`, decided by the SQL form of
//! [`rules`] in one program on the primary; refusals explained with `rules` itself.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dotdo_core::guard::rules;
use dotdo_core::{ConsistencyGuard, Error, FencingToken, Lease, NodeId, ObjectId, Result, Timestamp};
use libsql::Value;

use crate::conn::{Program, Step};
use crate::sql::*;
use crate::store::LibsqlStore;

/// A refresh program's result when it changed no row (below every lease age it reports).
const REFRESH_MISSED: i64 = -(1 << 45);
/// The largest lease age (µs, about 203 days) a refresh program's result carries; a lease
/// granted longer ago (or later, by a clock that went back) is read back after the refresh.
const REFRESH_AGE_CAP: i64 = 1 << 44;

#[async_trait]
impl ConsistencyGuard for LibsqlStore {
    async fn acquire(&self, object: &ObjectId, holder: &NodeId, ttl: Duration) -> Result<Lease> {
        dotdo_core::guard::validate_ttl(ttl)?;
        // A refusal whose explanation finds the lease free means it was freed in between: try
        // again, a few times (the row and the rules cannot disagree for longer unless damaged).
        // The rows those explanations read: different ones mean contention, not damage.
        let mut seen: Vec<Option<rules::LeaseRow>> = Vec::new();
        for _ in 0..4 {
            // The time is read once the writer is this call's (as `refresh` does): read before
            // queueing, a lease granted after a long wait was short or already over, and a
            // lease released meanwhile was refused as held.
            let (clock, object_, holder_) = (self.inner.clock.clone(), object.clone(), holder.clone());
            let (token, now, expires) = self
                .write_call("acquire lease", move |c| {
                    let now = clock.now();
                    let expires = now.plus(ttl);
                    // The same decision as `rules::acquire`, in SQL so that it is one round
                    // trip: take the lease if it is free (expired or released), with a token
                    // above every token issued.
                    let p = vec![
                        t(object_.as_str()),
                        t(holder_.as_str()),
                        Value::Integer(now.as_micros()),
                        Value::Integer(expires.as_micros()),
                        i(FencingToken::MAX.get()),
                    ];
                    let batch = c.is_batch();
                    Box::pin(async move {
                        if batch {
                            // Remote (one batch): the upsert, then `changes()` says whether it
                            // took the lease.
                            let program = Program {
                                steps: vec![Step::exec(ACQUIRE, p.clone())],
                                result: Some(Step::new(
                                    "SELECT CASE WHEN changes() = 1 THEN (SELECT fencing_token FROM do_locks WHERE do_id = ?1) ELSE -1 END",
                                    p,
                                )),
                            };
                            return Ok((c.run_program(program).await?.unwrap_or(-1), now, expires));
                        }
                        // A local file: the upsert alone, one autocommit statement returning the
                        // token it granted (no row if refused). Either way the lease row alone is
                        // written: fenced calls fold its token into `do_objects` themselves
                        // (`FOLD_LEASE`), so an acquire dirties one page, not two. An I/O error
                        // may be its commit's, which WAL recovery can still apply
                        // (AmbiguousOutcome, as a COMMIT's).
                        let returning = Step::new(format!("{ACQUIRE} RETURNING fencing_token"), p);
                        let rows = c.query(returning).await.map_err(crate::conn::commit_failure)?;
                        Ok((rows.first().map(|r| int(r.first())).transpose()?.unwrap_or(-1), now, expires))
                    })
                })
                .await?;
            if token > 0 {
                return Ok(Lease {
                    object: object.clone(),
                    holder: holder.clone(),
                    token: FencingToken::new(token.unsigned_abs()),
                    acquired_at: now,
                    expires_at: expires,
                });
            }
            // Refused: explain with the shared rules (`LeaseHeld`). If the lease was freed in
            // between, try again.
            // At the time the refusal was decided by (a time read now is later: a lease that
            // ran out meanwhile read as free, and a wall clock stepped back and forth read the
            // same row both ways).
            let current = self.lease_row_on_primary(object).await?;
            rules::acquire(object, current.as_ref(), holder, ttl, now)?;
            // Free, yet refused: every token up to FencingToken::MAX has been used (by leases
            // or by writes), so no new one may be issued.
            self.max_token_on_primary(object).await?.checked_next()?;
            seen.push(current);
        }
        if seen.windows(2).any(|w| w[0] != w[1]) {
            // The lease changed hands between each refusal and its explanation (a lease taken
            // and released again by other nodes each time): contention, to try again later.
            return Err(Error::unavailable(format!(
                "acquiring the lease of {object}: it changed hands between each of 4 tries and their explanations"
            )));
        }
        Err(Error::corrupt(format!(
            "the lease row of {object} refuses every acquire but reads as free (damaged holder or token?)"
        )))
    }

    async fn refresh(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        dotdo_core::guard::validate_ttl(ttl)?;
        // The time is read once the writer is this call's, as dotdo-sqlite reads it inside its
        // transaction: read before queueing, a refresh that waited past the expiry would
        // extend a lease that had ended meanwhile. (On a local file SQLite's own busy wait, for
        // another process's lock, still follows the read: a lease that ends during it may be
        // extended, which takes nothing from anyone: a lease taken meanwhile has another token
        // or holder, and the update matches no row.)
        let clock = self.inner.clock.clone();
        let (acquired, now, expires) = self
            .lease_write_call("refresh lease", move |c| {
                let now = clock.now();
                let expires = now.plus(ttl);
                let step = Step::exec(
                    // Times that are not integers are damage: `Corrupt` below, as every other
                    // guard call answers (SQL compares text above any integer).
                    "UPDATE do_locks SET expires_at = ?4 WHERE do_id = ?1 AND fencing_token = ?2 AND node_id = ?3 \
                     AND expires_at > ?5 AND typeof(expires_at) = 'integer' AND typeof(acquired_at) = 'integer'",
                    vec![
                        t(lease.object.as_str()),
                        i(lease.token.get()),
                        t(lease.holder.as_str()),
                        Value::Integer(expires.as_micros()),
                        Value::Integer(now.as_micros()),
                    ],
                );
                // The stored grant time comes back (the lease passed in is only its object,
                // holder and token: its `acquired_at` may be anything), as the lease's age at
                // `now`: a program result is a small number (see `conn::RESULT_BITS`).
                let result = Step::new(
                    "SELECT CASE WHEN changes() = 1 THEN \
                     max(-?2, min(?1 - (SELECT acquired_at FROM do_locks WHERE do_id = ?3), ?2)) ELSE ?4 END",
                    vec![
                        Value::Integer(now.as_micros()),
                        Value::Integer(REFRESH_AGE_CAP),
                        t(lease.object.as_str()),
                        Value::Integer(REFRESH_MISSED),
                    ],
                );
                let program = Program { steps: vec![step], result: Some(result) };
                Box::pin(async move { Ok((c.run_program(program).await?, now, expires)) })
            })
            .await?;
        match acquired {
            Some(REFRESH_MISSED) | None => {}
            Some(age) if age.abs() < REFRESH_AGE_CAP => {
                let acquired_at = Timestamp::from_micros(now.as_micros().saturating_sub(age));
                return Ok(Lease { acquired_at, expires_at: expires, ..lease.clone() });
            }
            // Granted more than ~200 days before `now` (or after it): read back.
            Some(_) => {
                let row = self.lease_row_on_primary(&lease.object).await?;
                let acquired_at = row.filter(|r| r.token == lease.token).map_or(lease.acquired_at, |r| r.acquired_at);
                return Ok(Lease { acquired_at, expires_at: expires, ..lease.clone() });
            }
        }
        let row = self.lease_row_on_primary(&lease.object).await?;
        rules::check_current(lease, row.as_ref(), now)?;
        Err(Error::backend("lease refresh changed no row although the lease is current"))
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        // Ended for every node's clock (`rules::RELEASED`), not at this node's time, also when
        // this node's clock sees it ended already (another node's may be behind).
        let steps = Arc::new(vec![Step::exec(
            "UPDATE do_locks SET expires_at = ?3 WHERE do_id = ?1 AND fencing_token = ?2 AND expires_at > ?3",
            vec![t(lease.object.as_str()), i(lease.token.get()), Value::Integer(rules::RELEASED.as_micros())],
        )]);
        // Safe to repeat (a second run finds the lease already ended), so retried after an
        // unknown outcome.
        self.idempotent_write_call("release lease", move |c| {
            let program = Program { steps: steps.to_vec(), result: None };
            Box::pin(async move { Ok(c.run_program(program).await.map(|_| ())?) })
        })
        .await
    }

    async fn validate(&self, lease: &Lease) -> Result<()> {
        let step = Step::new(LEASE_ROW, vec![t(lease.object.as_str())]);
        let row = self
            .read_primary_in_replica("validate lease", move |c| {
                let step = step.clone();
                Box::pin(async move { Ok(lease_row(&c.query(step).await?)?) })
            })
            .await
            .map_err(|e| self.named(e.context(format!("lease of {}", lease.object))))?;
        rules::check_current(lease, row.as_ref(), self.inner.clock.now())
    }

    async fn current(&self, object: &ObjectId) -> Result<Option<Lease>> {
        let step = Step::new(LEASE_ROW, vec![t(object.as_str())]);
        let row = self
            .read_primary_in_replica("read lease", move |c| {
                let step = step.clone();
                Box::pin(async move { Ok(lease_row(&c.query(step).await?)?) })
            })
            .await
            .map_err(|e| self.named(e.context(format!("lease of {object}"))))?;
        let now = self.inner.clock.now();
        Ok(row.filter(|r| now < r.expires_at).map(|r| r.to_lease(object)))
    }
}
