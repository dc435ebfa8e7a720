//! [`HotStore`] on [`LibsqlStore`]: the fenced write path (one program per call) and the reads.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use dotdo_core::ids::validate_key;
use dotdo_core::{
    ChangeRecord, Entry, Error, FencingToken, HotStore, KeyRange, ObjectId, ObjectInfo, Result, Seq, WriteBatch,
    WriteOp, WriteReceipt,
};
use libsql::Value;

use crate::conn::{DirectWrite, Program, Step};
use crate::sql::eff_last;
use crate::sql::*;
use crate::store::LibsqlStore;

/// The most bytes of one change read or one page of a remote listing (at least one row): of
/// values on a local file, of estimated answer (`answer_size!`) from a remote primary (there,
/// the start of [`PageBound`]).
const BOUND: usize = dotdo_core::sql_schema::READ_CHANGES_BYTES;

/// The least a remote page's bound shrinks to (see [`PageBound`]).
const MIN_PAGE_BOUND: usize = 64 << 10;

/// Reads in a row at a page bound under [`BOUND`] after which it is doubled again (see
/// [`PageBound`]).
const GROW_AFTER: u32 = 32;

/// The bound of estimated answer of one remote change read or listing page: [`BOUND`] at first,
/// halved (down to [`MIN_PAGE_BOUND`]) each time the primary refuses such a read as too large
/// (sqld run with a `--max-response-size` under about 8.4 MB, or its total of answers in flight
/// passed under load), and the read retried (it failed every retry at the fixed 8 MiB; with
/// `retries: 0` the next read uses the smaller pages). After [`GROW_AFTER`] reads in a row at a
/// smaller bound that carried at least half of it (reads that did not test the bound do not
/// count), it is doubled again (up to [`BOUND`]): a refusal under load, or a row too large for
/// the primary's limit whatever the page, does not keep every later read on small pages (a
/// long listing of small pages may not fit one `request_timeout`). Under a primary's lower
/// limit that costs one refused read per [`GROW_AFTER`] reads near the bound. Shared by the
/// store's clones.
#[derive(Debug)]
pub(crate) struct PageBound {
    bound: std::sync::atomic::AtomicUsize,
    /// Reads at `bound` that carried at least half of it since it last changed (counted under
    /// [`BOUND`] only).
    reads: std::sync::atomic::AtomicU32,
}

impl Default for PageBound {
    fn default() -> Self {
        PageBound { bound: std::sync::atomic::AtomicUsize::new(BOUND), reads: std::sync::atomic::AtomicU32::new(0) }
    }
}

impl PageBound {
    /// The bound to read the next page with.
    pub(crate) fn get(&self) -> usize {
        self.bound.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A read with pages of `used` bytes ended (`out`, whose answer comes to `size` bytes as
    /// [`answer_size!`] estimates them): if the primary refused its answer as too large, halve
    /// the bound (once per refused size: reads racing with the same bound halve it once); if it
    /// succeeded at a bound under [`BOUND`], carrying at least half of it, for the
    /// [`GROW_AFTER`]th time in a row, double it.
    fn ended<T>(&self, used: usize, out: &libsql::Result<T>, size: impl Fn(&T) -> usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let change = |to: usize| {
            if self.bound.compare_exchange(used, to, Relaxed, Relaxed).is_ok() {
                self.reads.store(0, Relaxed);
            }
        };
        match out {
            Err(e) if crate::error::class_of(e) == crate::error::Class::ResponseTooLarge => {
                change((used / 2).max(MIN_PAGE_BOUND));
            }
            Err(_) => {}
            Ok(v) if used < BOUND && size(v) >= used / 2 && self.reads.fetch_add(1, Relaxed) + 1 >= GROW_AFTER => {
                change(used.saturating_mul(2).min(BOUND));
            }
            Ok(_) => {}
        }
    }
}

#[async_trait]
impl HotStore for LibsqlStore {
    async fn write(&self, object: &ObjectId, token: FencingToken, batch: WriteBatch) -> Result<WriteReceipt> {
        batch.validate()?;
        token.validate()?;
        let clock = self.inner.clock.clone();
        let n = batch.ops.len() as u64;
        let (o, tk) = (t(object.as_str()), i(token.get()));
        let type_name = t(&batch.type_name);
        let direct = Arc::new(DirectWrite {
            object: o.clone(),
            token: i64::try_from(token.get()).map_err(|_| Error::invalid("fencing token above i64::MAX"))?,
            type_name: type_name.clone(),
            ops: batch
                .ops
                .iter()
                .map(|op| match op {
                    WriteOp::Put { key, value } => (t(key), Some(Value::Blob(value.to_vec()))),
                    WriteOp::Delete { key } => (t(key), None),
                })
                .collect(),
        });
        let object = object.clone();
        // The largest last seq before this batch that leaves room for all of it below MAX_SEQ.
        let room = Value::Integer(i64::try_from(dotdo_core::MAX_SEQ.saturating_sub(n)).unwrap_or(0));
        // A panic of the caller's clock in a program's attempt, kept to go on with once the call
        // is out of the remote driver (which takes a panic inside a call for libsql's HTTP
        // client failing on an answer: "sent, no reply", an unknown outcome, where nothing was
        // sent). As on a local file (`write_direct`), the panic goes on in the caller's task.
        type Panic = Box<dyn std::any::Any + Send>;
        let clock_panic: Arc<parking_lot::Mutex<Option<Panic>>> = Arc::default();
        let panicked = clock_panic.clone();
        let r = self
            .write_call("write", move |c| {
                let direct = direct.clone();
                let (o, tk, type_name, room) = (o.clone(), tk.clone(), type_name.clone(), room.clone());
                let clock = clock.clone();
                let panicked = panicked.clone();
                Box::pin(async move {
                    if !c.is_batch() {
                        // The changes' time is read inside the transaction (after `BEGIN
                        // IMMEDIATE` and its busy wait), as dotdo-sqlite reads it: read before
                        // the wait, a change committed after another could carry an earlier time.
                        return Ok(Some(c.write_direct(&direct, &*clock).await?));
                    }
                    // A program (a remote primary's, or a local file's over the batch transport)
                    // carries its time from here: read at each attempt, before it is sent.
                    let now = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| clock.now())) {
                        Ok(now) => now.as_micros(),
                        Err(panic) => {
                            *panicked.lock() = Some(panic);
                            return Err(Error::backend("the store's clock panicked").with_retryable(false).into());
                        }
                    };
                    // One program, one transaction, one round trip: fold the lease's token into
                    // the token maximum, raise the maximum if the token is newer, apply every
                    // operation only if the token equals the maximum, report the outcome.
                    let mut steps = Vec::with_capacity(3 + 2 * direct.ops.len());
                    steps.push(Step::exec(FOLD_LEASE, vec![o.clone()]));
                    steps.push(Step::exec(RAISE_IF_CURRENT, vec![o.clone(), tk.clone(), room.clone()]));
                    steps.push(Step::exec(PIN_LAST, vec![o.clone(), tk.clone()]));
                    for (k, value) in &direct.ops {
                        let (code, v) = match value {
                            Some(v) => (0, v.clone()),
                            None => (1, Value::Blob(Vec::new())),
                        };
                        let log = vec![
                            o.clone(),
                            tk.clone(),
                            k.clone(),
                            Value::Integer(code),
                            v.clone(),
                            Value::Integer(now),
                            type_name.clone(),
                            room.clone(),
                        ];
                        steps.push(Step::exec(LOG, log));
                        steps.push(match value {
                            Some(_) => Step::exec(PUT, vec![o.clone(), tk.clone(), k.clone(), v, room.clone()]),
                            None => Step::exec(DEL, vec![o.clone(), tk.clone(), k.clone(), room.clone()]),
                        });
                    }
                    let result = Step::new(WRITE_RESULT, vec![o, tk, room, Value::Integer(crate::conn::SEQ_EXHAUSTED)]);
                    let program = Program { steps, result: Some(result) };
                    Ok(c.run_program(program).await?)
                })
            })
            .await;
        if let Some(panic) = clock_panic.lock().take() {
            std::panic::resume_unwind(panic);
        }
        let r = r?.unwrap_or_default();
        if r == crate::conn::DAMAGED_ROWS {
            return Err(self.damaged_rows(&object, "write"));
        }
        if r == crate::conn::SEQ_EXHAUSTED {
            // The sequence number the batch would have ended at, as the other stores report it
            // (the program answers only that there is no room: read the last one).
            let last = match self.object_info(&object).await {
                Ok(Some(info)) => info.last_seq,
                _ => dotdo_core::MAX_SEQ,
            };
            return Err(Error::limit("sequence number", dotdo_core::MAX_SEQ, last.saturating_add(n)));
        }
        if r < 0 {
            return Err(Error::fenced(&object, token, FencingToken::new(r.unsigned_abs())));
        }
        let last = r.unsigned_abs();
        if last < n {
            return Err(Error::backend(format!("write to {object}: inconsistent result {r} for {n} operations")));
        }
        Ok(WriteReceipt { first_seq: last + 1 - n, last_seq: last })
    }

    async fn get(&self, object: &ObjectId, key: &str) -> Result<Option<Bytes>> {
        validate_key(key)?;
        let step = Step::new(
            concat!("SELECT ", value_column!("value"), " FROM do_state WHERE do_id = ?1 AND key = ?2"),
            vec![t(object.as_str()), t(key)],
        );
        self.read("get", move |c| {
            let step = step.clone();
            Box::pin(async move {
                // The row's value moves into the answer (one copy out of SQLite, as a raw read).
                let value = c.query_first(step).await?;
                Ok(value.map(blob_owned).transpose()?.map(Bytes::from))
            })
        })
        .await
    }

    async fn list(&self, object: &ObjectId, range: KeyRange, limit: Option<usize>) -> Result<Vec<Entry>> {
        let limit = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let (sql, args) = range_sql(&range);
        let mut params = vec![t(object.as_str())];
        params.extend(args);
        params.push(Value::Integer(limit));
        let step = Step::new(sql, params);
        let (object, range) = (t(object.as_str()), Arc::new(range));
        let inner = self.inner.clone();
        self.read("list", move |c| {
            let (step, object, range, inner) = (step.clone(), object.clone(), range.clone(), inner.clone());
            Box::pin(async move {
                if c.is_remote() {
                    let bound = inner.page_bound.get();
                    let out = list_remote(c, object, range, limit, bound).await;
                    inner.page_bound.ended(bound, &out, |entries: &Vec<Entry>| {
                        entries.iter().map(|e| e.key.len() + e.value.len() + 256).sum()
                    });
                    return Ok(out?);
                }
                let rows = c.query(step).await?;
                let out: libsql::Result<Vec<Entry>> = rows.iter().map(entry).collect();
                Ok(out?)
            })
        })
        .await
    }

    async fn read_changes(&self, object: &ObjectId, after: Seq, limit: usize) -> Result<Vec<ChangeRecord>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // Over HTTP unless local: to a remote primary, or (`read_primary_in_replica`) a replica's primary.
        // At most READ_CHANGES_BYTES of values per read (at least one change); a drain reads on.
        // Over HTTP, one answer must also arrive within `request_timeout` (a drain's read of
        // 100 000 changes of large values would time out on every attempt) and stay under the
        // primary's `max_response_size` (10 MB by default, which counts keys and the other
        // columns too: 9 000 changes of 1 KiB keys and small values passed it): the primary cuts
        // it at READ_CHANGES_BYTES of estimated answer (`answer_size!`). A local file's rows are
        // stepped through until the bound.
        let local = self.inner.target_is_local();
        let remote_step = move |bound: usize| {
            Step::new(
                concat!(
                    change_columns!(),
                    " FROM (SELECT seq, key, op, value, token, ts, type, ",
                    answer_size!("type"),
                    " AS size, sum(",
                    answer_size!("type"),
                    ") OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING) AS upto \
                     FROM do_changes WHERE do_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3) \
                     WHERE upto = size OR upto <= ?4 ORDER BY seq"
                ),
                vec![
                    t(object.as_str()),
                    i(after),
                    Value::Integer(page_rows(bound, limit)),
                    Value::Integer(bound as i64),
                ],
            )
        };
        let local_step = Step::new(
            concat!(change_columns!(), " FROM do_changes WHERE do_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"),
            vec![t(object.as_str()), i(after), Value::Integer(limit)],
        );
        let inner = self.inner.clone();
        let rows = self
            .read_primary_in_replica("read changes", move |c| {
                let (local_step, inner) = (local_step.clone(), inner.clone());
                let bound = inner.page_bound.get();
                let step = (!local).then(|| remote_step(bound));
                Box::pin(async move {
                    match step {
                        None => Ok(c.query_bounded(local_step, 3, BOUND).await?),
                        Some(step) => {
                            let out = c.query(step).await;
                            inner.page_bound.ended(bound, &out, |rows: &Vec<crate::conn::Row>| {
                                rows.iter().flatten().map(value_bytes).sum::<usize>() + 256 * rows.len()
                            });
                            Ok(out?)
                        }
                    }
                })
            })
            .await?;
        let describe = self.inner.target.describe();
        rows.iter()
            .map(|r| {
                let decode = || -> libsql::Result<dotdo_core::sql_schema::ChangeRow> {
                    Ok((
                        uint(r.first())?,
                        text(r.get(1))?,
                        int_not_null(r.get(2))?,
                        blob(r.get(3))?,
                        uint(r.get(4))?,
                        int_not_null(r.get(5))?,
                        text(r.get(6))?,
                    ))
                };
                let row = decode().map_err(|e| {
                    Error::corrupt(format!("{describe}: undecodable change of {object}")).with_source(e)
                })?;
                dotdo_core::sql_schema::change_record(object, row, &describe)
            })
            .collect()
    }

    async fn truncate_changes(&self, object: &ObjectId, token: FencingToken, through: Seq) -> Result<()> {
        token.validate()?;
        let (o, tk, th) = (t(object.as_str()), i(token.get()), i(through));
        let p = vec![o, tk, th];
        // Valid: not fenced and `through` not beyond the last sequence number.
        let ok = format!("NOT {FENCED} AND ?3 <= {LAST} AND NOT {DAMAGED}");
        let steps = vec![
            Step::exec(FOLD_LEASE, vec![p[0].clone()]),
            Step::exec(
                format!(
                    "UPDATE do_objects SET truncated_through = ?3, last_seq = max(last_seq, {last}) WHERE do_id = ?1 \
                     AND max_token <= ?2 AND ?3 > truncated_through AND ?3 <= {last} AND NOT {DAMAGED}",
                    last = eff_last!("do_objects")
                ),
                p.clone(),
            ),
            Step::exec(
                format!(
                    "DELETE FROM do_changes WHERE do_id = ?1 AND seq <= ?3 AND EXISTS \
                     (SELECT 1 FROM do_objects o WHERE o.do_id = ?1 AND o.max_token <= ?2 AND o.truncated_through >= ?3) \
                     AND NOT {DAMAGED}"
                ),
                p.clone(),
            ),
            Step::exec(
                format!(
                    "INSERT INTO do_objects (do_id, last_seq, truncated_through, max_token) SELECT ?1, 0, 0, ?2 WHERE {ok} \
                     ON CONFLICT (do_id) DO UPDATE SET max_token = max(max_token, excluded.max_token)"
                ),
                p.clone(),
            ),
        ];
        // 0: done; < 0: fenced by -code; 1: `through` is beyond the last seq. (Not the last seq
        // itself: at MAX_SEQ, last + 1 is outside the range a program result can carry.)
        let result = Step::new(
            format!("SELECT CASE {DAMAGED_CASE} WHEN {FENCED} THEN {MINUS_MAX} WHEN ?3 > {LAST} THEN 1 ELSE 0 END"),
            p,
        );
        let code = self.program(object, "truncate changes", steps, result).await?;
        match code {
            0 => Ok(()),
            c if c < 0 => Err(Error::fenced(object, token, FencingToken::new(c.unsigned_abs()))),
            _ => {
                let last = match self.object_info(object).await {
                    Ok(info) => info.map_or("0".to_string(), |i| i.last_seq.to_string()),
                    Err(_) => "unknown".to_string(),
                };
                Err(Error::invalid(format!("cannot truncate {object} through seq {through}: last seq is {last}")))
            }
        }
    }

    async fn object_info(&self, object: &ObjectId) -> Result<Option<ObjectInfo>> {
        let step = Step::new(dotdo_core::sql_schema::SQL_OBJECT_INFO, vec![t(object.as_str())]);
        self.read_primary_in_replica("object info", move |c| {
            let step = step.clone();
            Box::pin(async move {
                let rows = c.query(step).await?;
                let info = rows
                    .first()
                    .map(|r| -> libsql::Result<ObjectInfo> {
                        Ok(ObjectInfo {
                            last_seq: stored(r.first())?,
                            truncated_through: stored(r.get(1))?,
                            max_token: FencingToken::new(stored(r.get(2))?.max(stored(r.get(6))?)),
                            keys: uint(r.get(3))?,
                            value_bytes: uint(r.get(4))?,
                            resident: uint(r.get(5))? != 0,
                        })
                    })
                    .transpose()?;
                // A row created only by a lease is not yet an object.
                Ok(info.filter(|i| i.last_seq > 0 || i.keys > 0))
            })
        })
        .await
    }

    async fn objects_with_pending_changes(&self, after: Option<&ObjectId>, limit: usize) -> Result<Vec<ObjectId>> {
        let after = after.map(|a| a.as_str().to_string()).unwrap_or_default();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let step = Step::new(
            concat!(
                "SELECT ",
                text_column!("d"),
                " FROM (SELECT DISTINCT do_id AS d FROM do_changes WHERE do_id > ?1 ORDER BY do_id LIMIT ?2) ORDER BY d"
            ),
            vec![Value::Text(after), Value::Integer(limit)],
        );
        let rows = self
            .read_primary_in_replica("pending objects", move |c| {
                let step = step.clone();
                Box::pin(async move { Ok(c.query(step).await?) })
            })
            .await?;
        rows.iter()
            .map(|r| {
                let id = text(r.first())
                    .map_err(|e| self.named(Error::corrupt("undecodable object id in database").with_source(e)))?;
                ObjectId::new(&id)
                    .map_err(|e| self.named(Error::corrupt(format!("invalid object id {id:?} in database: {e}"))))
            })
            .collect()
    }

    async fn evict(&self, object: &ObjectId, token: FencingToken) -> Result<()> {
        token.validate()?;
        let p = vec![t(object.as_str()), i(token.get())];
        let ok = format!("NOT {FENCED} AND NOT {PENDING} AND NOT {DAMAGED}");
        let steps = vec![
            Step::exec(FOLD_LEASE, vec![p[0].clone()]),
            Step::exec(format!("DELETE FROM do_state WHERE do_id = ?1 AND {ok}"), p.clone()),
            // Told apart from an object whose keys were all deleted until a restore (not one never
            // written: nothing in cold to restore, and the runtime never restores it).
            Step::exec(
                format!("INSERT INTO do_evicted (do_id) SELECT ?1 WHERE {ok} AND {LAST} > 0 ON CONFLICT (do_id) DO NOTHING"),
                p.clone(),
            ),
            Step::exec(
                format!(
                    "INSERT INTO do_objects (do_id, last_seq, truncated_through, max_token) SELECT ?1, 0, 0, ?2 WHERE {ok} \
                     ON CONFLICT (do_id) DO UPDATE SET max_token = max(max_token, excluded.max_token)"
                ),
                p.clone(),
            ),
        ];
        let result = Step::new(
            format!("SELECT CASE {DAMAGED_CASE} WHEN {FENCED} THEN {MINUS_MAX} WHEN {PENDING} THEN 1 ELSE 0 END"),
            p,
        );
        match self.program(object, "evict", steps, result).await? {
            0 => Ok(()),
            c if c < 0 => Err(Error::fenced(object, token, FencingToken::new(c.unsigned_abs()))),
            _ => Err(self.pending_conflict(object, "evict").await),
        }
    }

    async fn restore(
        &self,
        object: &ObjectId,
        token: FencingToken,
        entries: Vec<Entry>,
        through_seq: Seq,
    ) -> Result<()> {
        token.validate()?;
        dotdo_core::record::validate_restore(&entries, through_seq)?;
        let p = vec![t(object.as_str()), i(token.get()), i(through_seq)];
        // Conflict: pending changes, or a last seq above `through_seq`.
        let conflict = format!("({PENDING} OR {LAST} > ?3)");
        let ok = format!("NOT {FENCED} AND NOT {conflict} AND NOT {DAMAGED}");
        let mut steps = vec![
            Step::exec(FOLD_LEASE, vec![p[0].clone()]),
            Step::exec(
                format!(
                    "INSERT INTO do_objects (do_id, last_seq, truncated_through, max_token) SELECT ?1, 0, 0, ?2 WHERE {ok} \
                     ON CONFLICT (do_id) DO UPDATE SET max_token = max(max_token, excluded.max_token)"
                ),
                p.clone(),
            ),
            Step::exec(format!("DELETE FROM do_state WHERE do_id = ?1 AND {ok}"), p.clone()),
        ];
        let insert = format!("INSERT INTO do_state (do_id, key, value, seq) SELECT ?1, ?4, ?5, ?6 WHERE {ok}");
        for e in &entries {
            let mut q = p.clone();
            q.extend([t(&e.key), Value::Blob(e.value.to_vec()), i(e.seq)]);
            steps.push(Step::exec(insert.clone(), q));
        }
        steps.push(Step::exec(format!("DELETE FROM do_evicted WHERE do_id = ?1 AND {ok}"), p.clone()));
        steps.push(Step::exec(
            format!("UPDATE do_objects SET last_seq = ?3, truncated_through = ?3 WHERE do_id = ?1 AND {ok}"),
            p.clone(),
        ));
        let result = Step::new(
            format!(
                "SELECT CASE {DAMAGED_CASE} WHEN {FENCED} THEN {MINUS_MAX} WHEN {LAST} > ?3 THEN 2 WHEN {PENDING} THEN 1 ELSE 0 END"
            ),
            p,
        );
        match self.program(object, "restore", steps, result).await? {
            0 => Ok(()),
            c if c < 0 => Err(Error::fenced(object, token, FencingToken::new(c.unsigned_abs()))),
            2 => Err(dotdo_core::record::restore_behind_hot(object, through_seq, None)),
            _ => Err(self.pending_conflict(object, &format!("restore through seq {through_seq}")).await),
        }
    }
}

/// The bytes of a value as [`answer_size!`] counts them (a text's or blob's length, nothing
/// for the rest: their row's 256).
fn value_bytes(v: &Value) -> usize {
    match v {
        Value::Text(t) => t.len(),
        Value::Blob(b) => b.len(),
        _ => 0,
    }
}

/// One listed entry: key, value, seq.
fn entry(r: &crate::conn::Row) -> libsql::Result<Entry> {
    Ok(Entry { key: text(r.first())?, value: Bytes::from(blob(r.get(1))?), seq: stored(r.get(2))? })
}

/// A listing from a remote primary, whose answers have a size limit (sqld's
/// `max_response_size`, 10 MB by default; an object's entries may come to far more): read in
/// pages of at most `bound` bytes of estimated answer ([`PageBound`]). A listing that fits in one page is that one round trip; a longer one is
/// read again, every page inside one read transaction, so that the pages are one snapshot (no
/// batch seen half-applied). The whole listing runs within one `request_timeout`.
async fn list_remote(
    c: &mut crate::conn::Conn,
    object: Value,
    range: Arc<KeyRange>,
    limit: i64,
    bound: usize,
) -> libsql::Result<Vec<Entry>> {
    let (first, more) = list_page(c, &object, &range, limit, bound).await?;
    if !more {
        return Ok(first);
    }
    drop(first);
    c.in_read_transaction(|c| {
        Box::pin(async move {
            let mut out: Vec<Entry> = Vec::new();
            let mut page_range = (*range).clone();
            loop {
                let left = if limit < 0 { -1 } else { limit - i64::try_from(out.len()).unwrap_or(i64::MAX) };
                if left == 0 {
                    return Ok(out);
                }
                let (page, more) = list_page(c, &object, &page_range, left, bound).await?;
                out.extend(page);
                match (more, out.last()) {
                    (true, Some(last)) => page_range.start = std::ops::Bound::Excluded(last.key.clone()),
                    _ => return Ok(out),
                }
            }
        })
    })
    .await
}

/// One page of [`list_remote`]: its entries, and whether the listing goes on after them.
async fn list_page(
    c: &mut crate::conn::Conn,
    object: &Value,
    range: &KeyRange,
    limit: i64,
    bound: usize,
) -> libsql::Result<(Vec<Entry>, bool)> {
    let (sql, args) = range_page_sql(range);
    let mut params = vec![object.clone()];
    params.extend(args);
    params.push(Value::Integer(page_rows(bound, limit)));
    params.push(Value::Integer(bound as i64));
    let rows = c.query(Step::new(sql, params)).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        if int(r.get(3))? == 0 {
            // The row after the last one that fits: the listing goes on.
            return Ok((out, true));
        }
        out.push(entry(r)?);
    }
    Ok((out, false))
}
