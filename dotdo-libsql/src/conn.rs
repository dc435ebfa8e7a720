//! One libsql connection and how statements travel on it.
//!
//! Every store call is a list of [`Step`]s (SQL with `?N` parameters). On a local file they run as
//! cached prepared statements with bound parameters. Towards a remote primary each round trip is
//! rendered as **one** SQL batch with inlined literals (`execute_batch`: one HTTP request, each
//! statement runs only if the previous one succeeded, and the results of every statement come
//! back), because libsql's remote transactions otherwise cost one request per statement. The SQL is
//! the same in both cases; [`Transport::Batch`](crate::Transport::Batch) forces the rendered form on
//! a local file, which is how the remote path is tested without a server.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;

use libsql::params::Params;
use libsql::Value;

/// One result row.
pub(crate) type Row = Vec<Value>;

/// One SQL statement and its positional parameters (`?1`, `?2`, …).
#[derive(Clone, Debug)]
pub(crate) struct Step {
    pub sql: Cow<'static, str>,
    pub params: Vec<Value>,
    /// Whether the caller reads the statement's rows (otherwise it is run for its effect only).
    pub rows: bool,
}

impl Step {
    /// A statement whose rows the caller reads.
    pub(crate) fn new(sql: impl Into<Cow<'static, str>>, params: Vec<Value>) -> Self {
        Step { sql: sql.into(), params, rows: true }
    }

    /// A statement run for its effect only.
    pub(crate) fn exec(sql: impl Into<Cow<'static, str>>, params: Vec<Value>) -> Self {
        Step { sql: sql.into(), params, rows: false }
    }
}

/// A libsql connection with its statement cache.
pub(crate) struct Conn {
    conn: libsql::Connection,
    batch: bool,
    /// Whether statements go to a remote primary (Hrana), not a local file.
    remote: bool,
    /// Prepared statements by SQL text (hashed with xxh3: the texts run to hundreds of bytes and
    /// are looked up several times per call).
    cache: HashMap<Cow<'static, str>, libsql::Statement, xxhash_rust::xxh3::Xxh3DefaultBuilder>,
    /// Whether a statement may be run again: not on an embedded replica's connection, whose
    /// statements (libsql 0.10's `RemoteStatement` over a local one) cannot be reset. A cached
    /// one ran on from where the previous call left it: a point read answered `None`, then the
    /// previous call's key, and a list re-ran the first object's query.
    reuse: bool,
    nonce: i64,
}

impl Conn {
    /// `batch`: render programs as one SQL batch; `remote`: the connection is to a remote
    /// primary (a local one reports `last_insert_rowid` itself).
    pub(crate) fn new(conn: libsql::Connection, batch: bool, remote: bool) -> Self {
        Conn { conn, batch, remote, cache: HashMap::default(), reuse: true, nonce: 0 }
    }

    /// A connection whose statements are prepared for each call and dropped after it (an
    /// embedded replica's: see `reuse`).
    pub(crate) fn without_statement_reuse(mut self) -> Self {
        self.reuse = false;
        self
    }

    /// Run one statement through the statement cache, collecting its rows.
    async fn prepared(&mut self, step: Step) -> libsql::Result<Vec<Row>> {
        self.prepared_within(step, None).await
    }

    /// [`prepared`](Self::prepared), its rows collected within `bound` (see [`collect`]).
    async fn prepared_within(&mut self, step: Step, bound: Option<(usize, usize)>) -> libsql::Result<Vec<Row>> {
        let stmt = self.statement(&step.sql).await?;
        stmt.reset();
        let params = Params::Positional(step.params);
        let out = if step.rows {
            collect(stmt.query(params).await, bound).await
        } else {
            stmt.execute(params).await.map(|_| Vec::new())
        };
        stmt.reset();
        if out.is_err() || !self.reuse {
            // A statement that failed may be in a bad state; prepare it afresh next time.
            self.cache.remove(&step.sql);
        }
        out
    }

    /// The cached prepared statement of `sql` (prepared on first use).
    async fn statement(&mut self, sql: &str) -> libsql::Result<&libsql::Statement> {
        if !self.cache.contains_key(sql) {
            let stmt = self.conn.prepare(sql).await?;
            self.cache.insert(Cow::Owned(sql.to_owned()), stmt);
        }
        self.cache.get(sql).ok_or_else(|| libsql::Error::Misuse("statement cache lost an entry".into()))
    }

    /// The first column of the first row of one statement, outside any explicit transaction
    /// (`None`: no row): a point read, without collecting rows as [`Conn::query`] does.
    pub(crate) async fn query_first(&mut self, step: Step) -> libsql::Result<Option<Value>> {
        let stmt = self.statement(&step.sql).await?;
        stmt.reset();
        let params = Params::Positional(step.params);
        let out = async {
            match stmt.query(params).await?.next().await? {
                Some(row) => value_at(&row, 0).map(Some),
                None => Ok(None),
            }
        }
        .await;
        // Not stepped to its end: reset, so that the read ends here (dropped where a reset does
        // nothing, which also ends the read).
        stmt.reset();
        if out.is_err() || !self.reuse {
            self.cache.remove(&step.sql);
        }
        out
    }

    /// One statement outside any explicit transaction, its rows collected: a cached prepared
    /// statement (remotely: described once per connection, then one round trip per call). Reads,
    /// and on a local file the acquire's single `INSERT … RETURNING`.
    pub(crate) async fn query(&mut self, step: Step) -> libsql::Result<Vec<Row>> {
        self.prepared(step).await
    }

    /// [`query`](Self::query), its rows collected until the blobs of column `col` come to more
    /// than `max_bytes` (at least one row): the rest is never stepped to.
    pub(crate) async fn query_bounded(&mut self, step: Step, col: usize, max_bytes: usize) -> libsql::Result<Vec<Row>> {
        self.prepared_within(step, Some((col, max_bytes))).await
    }

    /// Several statements outside any explicit transaction (e.g. pragmas).
    pub(crate) async fn run_all(&mut self, steps: Vec<Step>) -> libsql::Result<Vec<Vec<Row>>> {
        let mut out = Vec::with_capacity(steps.len());
        for s in steps {
            out.push(self.prepared(s).await?);
        }
        Ok(out)
    }

    /// Run a [`Program`] as one `BEGIN IMMEDIATE` … `COMMIT` transaction and return its result
    /// (on a local file, a program of one statement and no result runs as that statement alone).
    ///
    /// On a local file: cached prepared statements, the result read with a query inside the
    /// transaction. Remotely: **one** batch (one HTTP round trip). libsql's remote batches return
    /// no rows (it asks the server for none), so the result travels as the connection's
    /// `last_insert_rowid`, which the primary reports with the batch: inside the transaction a
    /// `do_locks` row with a negative rowid encoding the result (and a per-call nonce) is inserted
    /// and deleted again, so nothing of it is ever committed or visible to others. The batch ends
    /// with an INSERT that inserts nothing, because sqld reports `last_insert_rowid` only for
    /// INSERT statements and libsql's client reads it from the batch's last statement only.
    pub(crate) async fn run_program(&mut self, program: Program) -> libsql::Result<Option<i64>> {
        let out = if self.batch { self.program_rendered(program).await } else { self.program_prepared(program).await };
        // Nothing of a failed transaction may stay applied. A remote batch closes its own server
        // stream, which rolls back whatever failed (libsql still reads the connection as inside
        // a transaction: its answer was taken before the close): a `ROLLBACK` then went as a
        // second request, on a new stream, within the write's own time budget.
        if out.is_err() && !(self.remote && self.batch) {
            self.roll_back_if_open().await;
        }
        out
    }

    /// Roll back the transaction open on this connection, if any; whether one is still open
    /// afterwards (the rollback failed).
    pub(crate) async fn roll_back_if_open(&self) -> bool {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute("ROLLBACK", ()).await;
        }
        !self.conn.is_autocommit()
    }

    /// Roll back a transaction an earlier call left open on this connection (a panic between
    /// its `BEGIN` and `COMMIT`, or a failed rollback), as dotdo-sqlite does before each write:
    /// never build on it (an autocommit acquire run inside it would answer a token that is
    /// never committed, and issued again).
    pub(crate) async fn roll_back_leftover(&mut self) -> libsql::Result<()> {
        if !self.remote && self.roll_back_if_open().await {
            return Err(libsql::Error::Misuse(
                "the write connection is still inside a transaction an earlier call left open".into(),
            ));
        }
        Ok(())
    }

    /// Whether this connection renders programs as one SQL batch (remote, or forced).
    pub(crate) fn is_batch(&self) -> bool {
        self.batch
    }

    /// Whether statements go to a remote primary (whose answers have a size limit).
    pub(crate) fn is_remote(&self) -> bool {
        self.remote
    }

    /// Run `read` inside one read transaction (`BEGIN` … `COMMIT`), so that the statements it
    /// runs see one snapshot; rolled back if it fails.
    pub(crate) async fn in_read_transaction<T>(
        &mut self,
        read: impl for<'c> FnOnce(&'c mut Conn) -> futures::future::BoxFuture<'c, libsql::Result<T>>,
    ) -> libsql::Result<T> {
        self.roll_back_leftover().await?;
        self.prepared(Step::exec("BEGIN", vec![])).await?;
        let out = read(self).await;
        let out = match out {
            Ok(v) => self.prepared(Step::exec("COMMIT", vec![])).await.map(|_| v),
            Err(e) => Err(e),
        };
        if out.is_err() {
            self.roll_back_if_open().await;
        }
        out
    }

    /// The fenced write of a local, prepared-statement connection: the same transaction as the
    /// [`Program`] of `HotStore::write`, but the token check and the next sequence number come
    /// from one read, so the changes go in with plain, subquery-free statements (five statements
    /// for one put instead of six). The changes' time is read from `clock` once the transaction
    /// holds the write lock. Returns `-max_token` if fenced, else the last sequence number.
    pub(crate) async fn write_direct(&mut self, w: &DirectWrite, clock: &dyn dotdo_core::Clock) -> libsql::Result<i64> {
        let out = self.write_direct_tx(w, clock).await;
        if out.is_err() || out.as_ref().is_ok_and(|r| *r < 0) {
            // Fenced (nothing written) or failed: nothing may stay applied.
            self.roll_back_if_open().await;
        }
        out
    }

    async fn write_direct_tx(&mut self, w: &DirectWrite, clock: &dyn dotdo_core::Clock) -> libsql::Result<i64> {
        use crate::sql::{DIRECT_DEL, DIRECT_LOG, DIRECT_PUT, DIRECT_READ, RAISE_IF_CURRENT};
        self.prepared(Step::exec("BEGIN IMMEDIATE", vec![])).await?;
        // The clock is the caller's code: if it panics, the transaction is rolled back before the
        // panic goes on (left open, it would hold the file's write lock, and every other
        // process's writers would wait on it, until this store's next write).
        let now = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| clock.now())) {
            Ok(now) => now.as_micros(),
            Err(panic) => {
                self.roll_back_if_open().await;
                std::panic::resume_unwind(panic)
            }
        };
        let rows = self.prepared(Step::new(DIRECT_READ, vec![w.object.clone()])).await?;
        let (leased, max, last, known, truncated) = match rows.first() {
            Some(r) => (
                crate::sql::int_not_null(r.first())?,
                crate::sql::int_not_null(r.get(1))?,
                crate::sql::int_not_null(r.get(2))?,
                crate::sql::int_not_null(r.get(3))? != 0,
                crate::sql::int_not_null(r.get(4))?,
            ),
            None => (0, 0, 0, false, 0),
        };
        let most = dotdo_core::MAX_SEQ as i64;
        if [leased, max, last, truncated].iter().any(|v| !(0..=most).contains(v)) {
            // Not a value dotdo writes (tokens and sequence numbers run from 1 to MAX_SEQ =
            // FencingToken::MAX): a damaged row, or another tool's. Corrupt, with nothing written (a negative result would read
            // as "fenced" after a committed write), as dotdo-sqlite reads the same row.
            return Err(libsql::Error::InvalidColumnType);
        }
        // The fencing floor: the larger of the object's token maximum and its lease's token.
        let max = max.max(leased);
        if w.token < max {
            return Ok(-max);
        }
        let n = i64::try_from(w.ops.len()).unwrap_or(i64::MAX);
        if last.checked_add(n).is_none_or(|end| end > most) {
            return Ok(SEQ_EXHAUSTED);
        }
        // Raise `do_objects.max_token` only for a token above the floor (the lease's own token
        // needs no write), and create the object's row on its first write.
        if w.token > max || !known {
            // (The room was checked above; the statement checks it too, for the batch path.)
            let room = Value::Integer(most - n);
            self.prepared(Step::exec(RAISE_IF_CURRENT, vec![w.object.clone(), Value::Integer(w.token), room])).await?;
            // It raises (or creates) the row unless the object's rows are damaged (the room was
            // checked above), which the read above refuses already: a second line of defence.
            // Corrupt, rolled back; writing the changes without their object row would lose them.
            if self.conn.changes() == 0 {
                return Err(libsql::Error::InvalidColumnType);
            }
        }
        for (i, (key, value)) in w.ops.iter().enumerate() {
            let seq = Value::Integer(last + 1 + i as i64);
            let (code, v) = match value {
                Some(v) => (0, v.clone()),
                None => (1, Value::Blob(Vec::new())),
            };
            self.prepared(Step::exec(
                DIRECT_LOG,
                vec![
                    w.object.clone(),
                    seq.clone(),
                    key.clone(),
                    Value::Integer(code),
                    v.clone(),
                    Value::Integer(w.token),
                    Value::Integer(now),
                    w.type_name.clone(),
                ],
            ))
            .await?;
            match value {
                Some(_) => self.prepared(Step::exec(DIRECT_PUT, vec![w.object.clone(), key.clone(), v, seq])).await?,
                None => self.prepared(Step::exec(DIRECT_DEL, vec![w.object.clone(), key.clone()])).await?,
            };
        }
        self.commit().await?;
        Ok(last + w.ops.len() as i64)
    }

    async fn program_prepared(&mut self, mut program: Program) -> libsql::Result<Option<i64>> {
        if program.result.is_none() && program.steps.len() == 1 {
            // One statement is atomic by itself: no `BEGIN` and `COMMIT` around it (two
            // statements fewer, e.g. for a lease release). A busy snapshot is retried like any
            // busy failure, and nothing of a failed statement is applied. Its implicit commit
            // can fail on I/O as a COMMIT can: an unknown outcome, as for the local acquire.
            if let Some(step) = program.steps.pop() {
                self.prepared(step).await.map_err(commit_failure)?;
            }
            return Ok(None);
        }
        self.prepared(Step::exec("BEGIN IMMEDIATE", vec![])).await?;
        for s in program.steps {
            self.prepared(s).await?;
        }
        let result = match program.result {
            Some(r) => Some(result_of(&self.prepared(r).await?)?),
            None => None,
        };
        self.commit().await?;
        Ok(result)
    }

    /// `COMMIT` the open transaction (see [`commit_failure`]).
    async fn commit(&mut self) -> libsql::Result<()> {
        #[cfg(test)]
        if FAIL_NEXT_COMMIT.with(|f| f.replace(false)) {
            // As SQLite leaves a COMMIT whose sync failed: rolled back here.
            self.prepared(Step::exec("ROLLBACK", vec![])).await?;
            return Err(commit_failure(libsql::Error::SqliteFailure(
                1034, // SQLITE_IOERR_FSYNC
                "an I/O error at the COMMIT (test)".into(),
            )));
        }
        self.prepared(Step::exec("COMMIT", vec![])).await.map(|_| ()).map_err(commit_failure)
    }

    async fn program_rendered(&mut self, program: Program) -> libsql::Result<Option<i64>> {
        self.nonce = (self.nonce + 1) % (1 << NONCE_BITS);
        let base = RESULT_FLOOR + (self.nonce << RESULT_BITS) + RESULT_BIAS;
        let mut sql = String::from("BEGIN IMMEDIATE;\n");
        // Where each statement (or the result's pair) ends in `sql`.
        let mut ends = vec![sql.len()];
        for s in &program.steps {
            render_into(&mut sql, &s.sql, &s.params);
            sql.push_str(";\n");
            ends.push(sql.len());
        }
        if let Some(r) = &program.result {
            // A row that lives only inside this transaction: its rowid carries the result.
            let _ = write!(
                sql,
                "INSERT INTO do_locks (rowid, do_id, node_id, acquired_at, expires_at, fencing_token) \
                 SELECT {base} + ("
            );
            render_into(&mut sql, &r.sql, &r.params);
            sql.push_str("), '', '', 0, 0, 0;\nDELETE FROM do_locks WHERE do_id = '';\n");
            ends.push(sql.len());
        }
        // On a local file the COMMIT runs on its own, so that an I/O error is known to be the
        // COMMIT's (see `commit_failure`) and not a body statement's (which rolls back).
        if self.remote {
            sql.push_str("COMMIT;\n");
        }
        // Remote only: on a local file the connection's rowid is read directly, and a statement
        // after COMMIT that failed (busy) would make a committed program look failed, and be
        // retried.
        if program.result.is_some() && self.remote {
            // libsql's client keeps the `last_insert_rowid` of a batch's *last* statement only, and
            // sqld reports one for INSERTs only (none for COMMIT): end with an INSERT that inserts
            // nothing (the connection's rowid stays the one the transaction left, and the primary
            // reports it). It changes no row; like any INSERT it takes the write lock for an
            // instant. (libsql's client refuses temp tables, which would have avoided that.)
            sql.push_str(
                "INSERT INTO do_locks (do_id, node_id, acquired_at, expires_at, fencing_token) \
                 SELECT '', '', 0, 0, 0 WHERE 0;\n",
            );
        }
        if self.remote {
            self.conn.execute_batch(&sql).await?;
        } else {
            // Statement by statement, each stopping the program if it fails, as a batch does:
            // libsql's local `execute_batch` copies the rest of the text for every statement it
            // prepares (quadratic; a batch of 2 000 puts with 12 MiB of values took minutes).
            let mut start = 0;
            for end in ends {
                self.conn.execute_batch(&sql[start..end]).await?;
                start = end;
            }
            self.commit().await?;
        }
        if program.result.is_none() {
            return Ok(None);
        }
        decode_result(self.conn.last_insert_rowid(), self.nonce).map(Some)
    }
}

/// Bits of a program result carried in a rowid: results lie in `[-2^45, 2^45)`.
const RESULT_BITS: u32 = 46;
const RESULT_BIAS: i64 = 1 << (RESULT_BITS - 1);
/// Bits of the per-call nonce that proves the rowid came from this call.
const NONCE_BITS: u32 = 16;
/// All result rowids are negative, so they never collide with a real row (SQLite assigns
/// positive rowids).
const RESULT_FLOOR: i64 = -(1 << 62);

#[cfg(test)]
thread_local! {
    /// Fail the next `COMMIT` on this thread as one whose sync failed (tests).
    pub(crate) static FAIL_NEXT_COMMIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How the `Misuse` error of an unreadable program result starts: the batch had run through its
/// `COMMIT`, so the program was applied (classified as a maybe-applied failure).
pub(crate) const UNREADABLE_RESULT: &str = "unreadable program result: ";

/// Marks a `COMMIT` that failed with an I/O error or out of memory (see [`commit_failure`]).
pub(crate) const COMMIT_IO_ERROR: &str = "COMMIT failed on I/O: ";

/// The error of a failed `COMMIT`. An I/O error (`SQLITE_IOERR*`: a WAL write or its fsync
/// failed) may leave the transaction's frames in the WAL, which recovery after a crash applies,
/// and so may running out of memory (`SQLITE_NOMEM`: SQLite indexes the WAL after writing its
/// frames): marked so that it maps to `AmbiguousOutcome` (as in dotdo-sqlite), not to an
/// `Unavailable` whose retry could apply the write twice.
///
/// The file system reporting damage (`SQLITE_IOERR_CORRUPTFS`) stays `Corrupt`, as anywhere
/// else: taken for an unknown outcome, the runtime took a new lease and went on writing into
/// the damaged file.
pub(crate) fn commit_failure(e: libsql::Error) -> libsql::Error {
    const SQLITE_NOMEM: i32 = 7;
    const SQLITE_IOERR: i32 = 10;
    match &e {
        libsql::Error::SqliteFailure(code, _)
            if matches!(code & 0xff, SQLITE_IOERR | SQLITE_NOMEM) && *code != crate::error::SQLITE_IOERR_CORRUPTFS =>
        {
            libsql::Error::Misuse(format!("{COMMIT_IO_ERROR}{e}"))
        }
        _ => e,
    }
}

fn decode_result(rowid: i64, nonce: i64) -> libsql::Result<i64> {
    let x = rowid.wrapping_sub(RESULT_FLOOR);
    if !(0..(1 << 62)).contains(&x) || x >> RESULT_BITS != nonce {
        return Err(libsql::Error::Misuse(format!(
            "{UNREADABLE_RESULT}the primary did not report this batch's last_insert_rowid (got {rowid}); it cannot carry program results"
        )));
    }
    Ok((x & ((1 << RESULT_BITS) - 1)) - RESULT_BIAS)
}

/// The result of a write (rolled back, or made a no-op) that would pass [`dotdo_core::MAX_SEQ`]:
/// `-2^44`, below every `-max_token` (tokens end at 2^44 - 1) and still inside the range a
/// remote program result can carry.
pub(crate) const SEQ_EXHAUSTED: i64 = -(1 << 44);

/// The result of a fenced program that found the object's rows damaged (see
/// [`damaged!`](crate::sql::damaged)) and wrote nothing: `2^44`, above every sequence number
/// (they end at 2^44 - 1) and inside the range a remote program result can carry.
pub(crate) const DAMAGED_ROWS: i64 = 1 << 44;

/// The parameters of [`Conn::write_direct`]: `ops` are `(key, Some(value))` puts and
/// `(key, None)` deletes, in order.
pub(crate) struct DirectWrite {
    pub object: Value,
    pub token: i64,
    pub type_name: Value,
    pub ops: Vec<(Value, Option<Value>)>,
}

/// A write transaction: statements run for their effect, then an optional result query that
/// returns exactly one row with one non-NULL integer (computed inside the transaction).
pub(crate) struct Program {
    pub steps: Vec<Step>,
    pub result: Option<Step>,
}

fn result_of(rows: &[Row]) -> libsql::Result<i64> {
    match rows.first().and_then(|r| r.first()) {
        Some(Value::Integer(i)) => Ok(*i),
        _ => Err(libsql::Error::InvalidColumnType),
    }
}

/// The rows of a query; with `bound` `(col, max_bytes)`, only until the blobs of column `col`
/// come to more than `max_bytes` (at least one row), the rest never stepped to (the statement
/// is reset after).
async fn collect(rows: libsql::Result<libsql::Rows>, bound: Option<(usize, usize)>) -> libsql::Result<Vec<Row>> {
    let mut rows = rows?;
    let n = rows.column_count();
    let (mut out, mut bytes) = (Vec::new(), 0usize);
    while let Some(row) = rows.next().await? {
        let mut values = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        for i in 0..n {
            values.push(value_at(&row, i)?);
        }
        if let Some((col, max_bytes)) = bound {
            if let Some(Value::Blob(b)) = values.get(col) {
                bytes = bytes.saturating_add(b.len());
            }
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
        }
        out.push(values);
    }
    Ok(out)
}

/// Append `sql` with every `?N` replaced by the SQL literal of `params[N-1]`.
pub(crate) fn render_into(out: &mut String, sql: &str, params: &[Value]) {
    let mut chars = sql.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        if c != '?' {
            out.push(c);
            continue;
        }
        let mut n = 0usize;
        let mut digits = 0;
        while let Some(&(_, d)) = chars.peek() {
            match d.to_digit(10) {
                Some(v) => {
                    n = n.saturating_mul(10).saturating_add(v as usize);
                    digits += 1;
                    chars.next();
                }
                None => break,
            }
        }
        match params.get(n.wrapping_sub(1)).filter(|_| digits > 0) {
            Some(v) => literal_into(out, v),
            // Not one of ours: leave it for SQLite to report.
            None => {
                out.push('?');
                if digits > 0 {
                    let _ = write!(out, "{n}");
                }
            }
        }
    }
}

/// The SQL literal of a value.
pub(crate) fn literal_into(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("NULL"),
        Value::Integer(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Real(f) if f.is_finite() => {
            let _ = write!(out, "{f:e}");
        }
        Value::Real(_) => out.push_str("NULL"),
        Value::Text(s) if !s.contains('\0') => {
            out.push('\'');
            for c in s.chars() {
                if c == '\'' {
                    out.push('\'');
                }
                out.push(c);
            }
            out.push('\'');
        }
        Value::Text(s) => {
            out.push_str("CAST(");
            hex_into(out, s.as_bytes());
            out.push_str(" AS TEXT)");
        }
        Value::Blob(b) => hex_into(out, b),
    }
}

fn hex_into(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.reserve(bytes.len() * 2 + 3);
    out.push_str("X'");
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xf)] as char);
    }
    out.push('\'');
}

/// Column `i` of `row`. libsql converts a text value with `CStr::to_str().unwrap()`: text that is
/// not UTF-8 (damage, or another program's write) panicked in the caller's task. Such a value is
/// `InvalidColumnType` here, which the store reports as `Corrupt`. (Text columns are read as
/// blobs anyway, see `text_column!`; this covers the others, integers stored as text.)
fn value_at(row: &libsql::Row, i: i32) -> libsql::Result<Value> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| row.get_value(i)))
        .unwrap_or(Err(libsql::Error::InvalidColumnType))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An embedded replica's connection answers every read with its own parameters: its
    /// statements cannot be reset, and a cached one ran on from the previous call (a point read
    /// answered `None`, then the previous key's value; a query re-ran the first parameters).
    #[cfg(feature = "replica")]
    #[tokio::test]
    async fn replica_reads_answer_their_own_parameters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = libsql::Builder::new_local_replica(dir.path().join("r.db")).build().await.expect("replica");
        let mut c = Conn::new(db.connect().expect("connect"), false, false).without_statement_reuse();
        for n in 1..=3i64 {
            let got = c.query_first(Step::new("SELECT ?1", vec![Value::Integer(n)])).await.expect("read");
            assert_eq!(got, Some(Value::Integer(n)), "point read {n}");
        }
        for n in 1..=2i64 {
            let got = c.query(Step::new("SELECT ?1 AS x", vec![Value::Integer(n)])).await.expect("query");
            assert_eq!(got, vec![vec![Value::Integer(n)]], "query {n}");
        }
    }

    fn render(sql: &str, params: &[Value]) -> String {
        let mut s = String::new();
        render_into(&mut s, sql, params);
        s
    }

    #[test]
    fn parameters_become_escaped_literals() {
        let sql = render(
            "INSERT INTO t VALUES (?1, ?2, ?3, ?10, ?4)",
            &[
                Value::Text("it's".into()),
                Value::Integer(-7),
                Value::Blob(vec![0, 0xab, 0xff]),
                Value::Null,
                Value::Integer(1),
                Value::Integer(2),
                Value::Integer(3),
                Value::Integer(4),
                Value::Integer(5),
                Value::Integer(10),
            ],
        );
        assert_eq!(sql, "INSERT INTO t VALUES ('it''s', -7, X'00ABFF', 10, NULL)");
    }

    #[test]
    fn results_round_trip_through_a_negative_rowid_with_the_nonce() {
        let codes = [(DAMAGED_ROWS, 5), (SEQ_EXHAUSTED, 6), (-(dotdo_core::FencingToken::MAX.get() as i64), 8)];
        for (r, nonce) in [(0, 1), (1, 7), (-1, 65_535), (RESULT_BIAS - 1, 3), (-RESULT_BIAS, 9), (123_456_789, 42)]
            .into_iter()
            .chain(codes)
        {
            let rowid = RESULT_FLOOR + (nonce << RESULT_BITS) + RESULT_BIAS + r;
            assert!(rowid < 0, "{r} {nonce}");
            assert_eq!(decode_result(rowid, nonce).expect("decodes"), r);
            assert!(decode_result(rowid, nonce + 1).is_err(), "a stale rowid is detected");
        }
        assert!(decode_result(0, 0).is_err());
        assert!(decode_result(17, 1).is_err());
        // The damaged-rows code is above every sequence number, and the SQL says the same.
        assert!(DAMAGED_ROWS > dotdo_core::MAX_SEQ as i64);
        assert!(crate::sql::DAMAGED_CASE.ends_with(&format!(" THEN {DAMAGED_ROWS}")));
        assert!(crate::sql::WRITE_RESULT.contains(&format!(" THEN {DAMAGED_ROWS} ELSE")));
        // The SQL's bound of stored tokens and sequence numbers is MAX_SEQ = FencingToken::MAX.
        assert_eq!(dotdo_core::MAX_SEQ, dotdo_core::FencingToken::MAX.get());
        let most = dotdo_core::MAX_SEQ.to_string();
        assert_eq!(crate::sql::DAMAGED.matches(&most).count(), 5, "{}", crate::sql::DAMAGED);
        assert!(crate::sql::ACQUIRE.contains(&format!("BETWEEN 0 AND {most}")));
        assert!(crate::sql::FOLD_LEASE.contains(&format!("BETWEEN 0 AND {most}")));
    }

    #[test]
    fn text_with_nul_is_cast_from_hex_and_unknown_placeholders_stay() {
        assert_eq!(render("?1", &[Value::Text("a\0b".into())]), "CAST(X'610062' AS TEXT)");
        assert_eq!(render("? ?3", &[Value::Integer(1)]), "? ?3");
    }
}
