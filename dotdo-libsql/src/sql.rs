//! The SQL of the store: statements with `?N` parameters, shared by every transport, and the
//! decoding of result values. Mutating statements are conditional on the fencing check so that a
//! whole call is one program (see [`Program`](crate::conn::Program)).

use dotdo_core::guard::rules::LeaseRow;
use dotdo_core::{Error, FencingToken, KeyRange, NodeId, Result, Timestamp};
use libsql::Value;
use std::ops::Bound;

use crate::conn::Row;

/// A text column as the store reads it: its bytes as a blob (decoded by [`text`]), or NULL if
/// it holds no text. libsql reads a text value as a C string: it ended at a NUL (a damaged key
/// `a\0b` read as `a`) and panicked on bytes that are not UTF-8; a blob would pass for text.
macro_rules! text_column {
    ($c:literal) => {
        concat!("CASE WHEN typeof(", $c, ") = 'text' THEN CAST(", $c, " AS BLOB) END")
    };
}
pub(crate) use text_column;

/// A value column as the store reads it: a blob; text, an integer or a real (not a value any
/// writer stores) reads as NULL, which [`blob`] refuses (`Corrupt`, as dotdo-sqlite, whose
/// rusqlite reads a blob only; text's bytes were read as the value).
macro_rules! value_column {
    ($c:literal) => {
        concat!("CASE WHEN typeof(", $c, ") = 'blob' THEN ", $c, " END")
    };
}
pub(crate) use value_column;

/// The `SELECT` list of a change read: seq, key, op, value, token, ts, type.
macro_rules! change_columns {
    () => {
        concat!(
            "SELECT seq, ",
            text_column!("key"),
            ", op, ",
            value_column!("value"),
            ", token, ts, ",
            text_column!("type")
        )
    };
}
pub(crate) use change_columns;

/// The effective last sequence number of object row `o`: `do_objects.last_seq` is a floor kept for
/// truncated and restored changes; the newest change still in the log may be above it.
macro_rules! eff_last {
    ($o:literal) => {
        concat!(
            "max(",
            $o,
            ".last_seq, coalesce((SELECT max(seq) FROM do_changes c WHERE c.do_id = ",
            $o,
            ".do_id), 0))"
        )
    };
}
pub(crate) use eff_last;
/// The rows of object `?1` hold values dotdo never writes (a token maximum, sequence floor or
/// lease token that is not an integer from 0 to `MAX_SEQ` = `FencingToken::MAX`): another tool's or damaged rows, which
/// dotdo-sqlite reads as `Corrupt`. SQL would compare or compute with them (a text token is
/// above every integer and reads as 0 in arithmetic), so every fenced program writes nothing
/// then and answers [`DAMAGED_ROWS`](crate::conn::DAMAGED_ROWS).
/// `MAX_SEQ` = `FencingToken::MAX` (2^44 - 1) as an SQL literal, the largest sequence number
/// or token a row may hold (checked by a test).
macro_rules! max_seq {
    () => {
        "17592186044415"
    };
}
macro_rules! damaged {
    () => {
        concat!(
            "(EXISTS (SELECT 1 FROM do_objects d WHERE d.do_id = ?1 AND (typeof(d.max_token) <> 'integer' \
             OR d.max_token NOT BETWEEN 0 AND ",
            max_seq!(),
            " OR typeof(d.last_seq) <> 'integer' OR d.last_seq NOT BETWEEN 0 AND ",
            max_seq!(),
            " OR typeof(d.truncated_through) <> 'integer' OR d.truncated_through NOT BETWEEN 0 AND ",
            max_seq!(),
            ")) OR EXISTS (SELECT 1 FROM do_locks l WHERE l.do_id = ?1 AND (typeof(l.fencing_token) <> 'integer' \
             OR l.fencing_token NOT BETWEEN 0 AND ",
            max_seq!(),
            ")) OR EXISTS (SELECT 1 FROM do_changes c WHERE c.do_id = ?1 AND c.seq > ",
            max_seq!(),
            "))"
        )
    };
}
/// [`damaged!`] as a constant.
pub(crate) const DAMAGED: &str = damaged!();
/// [`DAMAGED_ROWS`](crate::conn::DAMAGED_ROWS) as an SQL literal (checked by a test).
macro_rules! damaged_code {
    () => {
        "17592186044416"
    };
}
/// The first arm of a fenced program's result `CASE`: damaged rows answer
/// [`DAMAGED_ROWS`](crate::conn::DAMAGED_ROWS).
pub(crate) const DAMAGED_CASE: &str = concat!("WHEN ", damaged!(), " THEN ", damaged_code!());

/// Take the lease if it is free (expired or released), with a token above every token issued
/// (the larger of the lease's and `do_objects.max_token`, at most `?5`): the same decision as
/// `rules::acquire`, as one statement. `?1` object, `?2` holder, `?3` now, `?4` expiry (µs).
/// A lease row or token maximum that does not decode (a token that is not a non-negative
/// integer, times that are not integers, a holder that is no valid node id) is never taken over:
/// SQL arithmetic would read a text token as 0 and issue a token that was issued before. The
/// refusal's explanation then reads the row as dotdo-sqlite does: `Corrupt`.
pub(crate) const ACQUIRE: &str = concat!(
    "INSERT INTO do_locks (do_id, node_id, acquired_at, expires_at, fencing_token) \
     SELECT ?1, ?2, ?3, ?4, next FROM (SELECT 1 + max(coalesce((SELECT fencing_token FROM do_locks WHERE do_id = ?1), 0), \
     coalesce((SELECT max_token FROM do_objects WHERE do_id = ?1), 0)) AS next) WHERE next <= ?5 \
     AND NOT EXISTS (SELECT 1 FROM do_objects WHERE do_id = ?1 AND (typeof(max_token) <> 'integer' OR max_token < 0)) \
     ON CONFLICT (do_id) DO UPDATE SET node_id = excluded.node_id, acquired_at = excluded.acquired_at, \
     expires_at = excluded.expires_at, fencing_token = excluded.fencing_token WHERE do_locks.expires_at <= ?3 \
     AND typeof(do_locks.expires_at) = 'integer' AND typeof(do_locks.acquired_at) = 'integer' \
     AND typeof(do_locks.fencing_token) = 'integer' AND do_locks.fencing_token BETWEEN 0 AND ",
    max_seq!(),
    " AND typeof(do_locks.node_id) = 'text' AND length(CAST(do_locks.node_id AS BLOB)) BETWEEN 1 AND 128 \
     AND do_locks.node_id NOT GLOB '*[^A-Za-z0-9._:-]*' AND instr(CAST(do_locks.node_id AS BLOB), X'00') = 0"
);
/// The first step of every fenced program: fold the lease's token into `do_objects.max_token`
/// (raise only), so that the steps after it may fence against `do_objects` alone. An acquire
/// writes the lease row only; the object's fencing floor is the larger of the two.
pub(crate) const FOLD_LEASE: &str = concat!(
    "INSERT INTO do_objects (do_id, last_seq, truncated_through, max_token) \
     SELECT do_id, 0, 0, fencing_token FROM do_locks WHERE do_id = ?1 AND typeof(fencing_token) = 'integer' \
     AND fencing_token BETWEEN 0 AND ",
    max_seq!(),
    " ON CONFLICT (do_id) DO UPDATE SET max_token = excluded.max_token WHERE excluded.max_token > do_objects.max_token \
     AND NOT ",
    damaged!()
);
/// `?2` (the presented token) is below the object's maximum (after [`FOLD_LEASE`]).
pub(crate) const FENCED: &str = "EXISTS (SELECT 1 FROM do_objects f WHERE f.do_id = ?1 AND f.max_token > ?2)";
/// The object's effective last sequence number (0 if unknown).
pub(crate) const LAST: &str =
    concat!("coalesce((SELECT ", eff_last!("o"), " FROM do_objects o WHERE o.do_id = ?1), 0)");
/// `-max_token` if `?2` is stale (a fenced call), for result codes.
pub(crate) const MINUS_MAX: &str = "-(SELECT max_token FROM do_objects WHERE do_id = ?1)";
/// Raise only (never lower), only when the token is not stale and only if the batch fits below
/// `MAX_SEQ` (`?3`: the largest last seq before the batch that leaves room): a write refused
/// for room changes nothing, its token included. The step of a write after [`FOLD_LEASE`].
pub(crate) const RAISE_IF_CURRENT: &str = concat!(
    "INSERT INTO do_objects (do_id, last_seq, truncated_through, max_token) SELECT ?1, 0, 0, ?2 WHERE NOT ",
    damaged!(),
    " ON CONFLICT (do_id) DO UPDATE SET max_token = excluded.max_token WHERE excluded.max_token > do_objects.max_token \
     AND ",
    eff_last!("do_objects"),
    " <= ?3 AND NOT ",
    damaged!()
);
/// The step of a write after [`RAISE_IF_CURRENT`]: pin the object's `last_seq` floor to its effective last
/// sequence number (which it never changes), so the steps after it can test the room left below
/// `MAX_SEQ` against a value the batch's own inserts do not move. Only with a current token.
pub(crate) const PIN_LAST: &str = concat!(
    "UPDATE do_objects AS o SET last_seq = ",
    eff_last!("o"),
    " WHERE o.do_id = ?1 AND o.max_token = ?2 AND NOT ",
    damaged!()
);
/// Append one change with the next sequence number, only if the token is current and the whole
/// batch fits below `MAX_SEQ` (`?8`: the largest last seq before the batch that leaves room).
pub(crate) const LOG: &str = concat!(
    "INSERT INTO do_changes (do_id, seq, key, op, value, token, ts, type) SELECT ?1, ",
    eff_last!("o"),
    " + 1, ?3, ?4, ?5, ?2, ?6, ?7 FROM do_objects o WHERE o.do_id = ?1 AND o.max_token = ?2 AND o.last_seq <= ?8 AND NOT ",
    damaged!()
);
/// Upsert the state of the change just logged, under the same conditions as [`LOG`] (`?5`).
pub(crate) const PUT: &str = concat!(
    "INSERT INTO do_state (do_id, key, value, seq) \
     SELECT ?1, ?3, ?4, (SELECT max(seq) FROM do_changes c WHERE c.do_id = ?1) \
     FROM do_objects o WHERE o.do_id = ?1 AND o.max_token = ?2 AND o.last_seq <= ?5 AND NOT ",
    damaged!(),
    " ON CONFLICT (do_id, key) DO UPDATE SET value = excluded.value, seq = excluded.seq"
);
/// Delete a key's state, under the same conditions as [`LOG`] (`?4`).
pub(crate) const DEL: &str = concat!(
    "DELETE FROM do_state WHERE do_id = ?1 AND key = ?3 \
     AND EXISTS (SELECT 1 FROM do_objects o WHERE o.do_id = ?1 AND o.max_token = ?2 AND o.last_seq <= ?4) AND NOT ",
    damaged!()
);
/// The direct (local) write path's one read, always one row: the lease's token (0 without a
/// lease), `do_objects.max_token`, the effective last seq, whether the object has a
/// `do_objects` row, and its `truncated_through` (read only to refuse a value dotdo never
/// writes, as dotdo-sqlite does); 0 for the columns of an object without a row. A value that is
/// no integer (a NULL in a table made without `NOT NULL`, text) reads as -1, which the caller
/// refuses as damage: read as 0, a NULL `last_seq` logged the next change under a sequence
/// number cold storage already held, never to be drained.
pub(crate) const DIRECT_READ: &str = concat!(
    "SELECT coalesce((SELECT CASE WHEN typeof(fencing_token) = 'integer' THEN fencing_token ELSE -1 END \
     FROM do_locks WHERE do_id = x.id), 0), \
     CASE WHEN o.do_id IS NULL THEN 0 WHEN typeof(o.max_token) = 'integer' THEN o.max_token ELSE -1 END, \
     CASE WHEN o.do_id IS NULL THEN 0 WHEN typeof(o.last_seq) = 'integer' THEN ",
    eff_last!("o"),
    " ELSE -1 END, o.do_id IS NOT NULL, \
     CASE WHEN o.do_id IS NULL THEN 0 WHEN typeof(o.truncated_through) = 'integer' THEN o.truncated_through \
     ELSE -1 END \
     FROM (SELECT ?1 AS id) x LEFT JOIN do_objects o ON o.do_id = x.id"
);
/// The direct path's change-log insert, sequence number given.
pub(crate) const DIRECT_LOG: &str = "INSERT INTO do_changes (do_id, seq, key, op, value, token, ts, type) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
/// The direct path's state upsert.
pub(crate) const DIRECT_PUT: &str = "INSERT INTO do_state (do_id, key, value, seq) VALUES (?1, ?2, ?3, ?4) \
     ON CONFLICT (do_id, key) DO UPDATE SET value = excluded.value, seq = excluded.seq";
/// The direct path's state delete.
pub(crate) const DIRECT_DEL: &str = "DELETE FROM do_state WHERE do_id = ?1 AND key = ?2";
/// The result of a write: `-max_token` if fenced, `?4` if the batch did not fit below `MAX_SEQ`
/// (the maximum is still below a newer token: [`RAISE_IF_CURRENT`] refused it for room; or the
/// pinned floor is past the room `?3`), else the effective last sequence number.
pub(crate) const WRITE_RESULT: &str = concat!(
    "SELECT CASE WHEN ",
    damaged!(),
    " THEN ",
    damaged_code!(),
    " ELSE coalesce((SELECT CASE WHEN o.max_token > ?2 THEN -o.max_token WHEN o.max_token < ?2 OR o.last_seq > ?3 \
     THEN ?4 ELSE ",
    eff_last!("o"),
    " END FROM do_objects o WHERE o.do_id = ?1), 0) END"
);
/// The object has changes cold storage has not acknowledged.
pub(crate) const PENDING: &str =
    concat!("EXISTS (SELECT 1 FROM do_objects p WHERE p.do_id = ?1 AND ", eff_last!("p"), " > p.truncated_through)");
pub(crate) const LEASE_ROW: &str = concat!(
    "SELECT ",
    text_column!("node_id"),
    ", fencing_token, acquired_at, expires_at FROM do_locks WHERE do_id = ?1"
);

pub(crate) fn text(v: Option<&Value>) -> libsql::Result<String> {
    match v {
        Some(Value::Text(s)) => Ok(s.clone()),
        Some(Value::Blob(b)) => String::from_utf8(b.clone()).map_err(|_| libsql::Error::InvalidColumnType),
        _ => Err(libsql::Error::InvalidColumnType),
    }
}

pub(crate) fn int(v: Option<&Value>) -> libsql::Result<i64> {
    match v {
        Some(Value::Integer(i)) => Ok(*i),
        Some(Value::Null) => Ok(0),
        _ => Err(libsql::Error::InvalidColumnType),
    }
}

pub(crate) fn uint(v: Option<&Value>) -> libsql::Result<u64> {
    u64::try_from(int(v)?).map_err(|_| libsql::Error::InvalidColumnType)
}

/// A sequence number or token as every writer stores them: an integer from 0 to `MAX_SEQ`
/// (= `FencingToken::MAX`); above it the row is damage, not a token never issued that fences
/// every write and makes every acquire `LimitExceeded`. A NULL (a table made without
/// `NOT NULL`) is damage too, not 0, as in dotdo-sqlite.
pub(crate) fn stored(v: Option<&Value>) -> libsql::Result<u64> {
    let n = u64::try_from(int_not_null(v)?).map_err(|_| libsql::Error::InvalidColumnType)?;
    if n > dotdo_core::MAX_SEQ {
        return Err(libsql::Error::InvalidColumnType);
    }
    Ok(n)
}

/// An integer of a column that must hold one (a NULL is not read as 0).
pub(crate) fn int_not_null(v: Option<&Value>) -> libsql::Result<i64> {
    match v {
        Some(Value::Integer(i)) => Ok(*i),
        _ => Err(libsql::Error::InvalidColumnType),
    }
}

/// A value column's bytes (a blob, as dotdo-sqlite reads it; see [`value_column`]). A NULL is
/// no value (a deletion's change stores an empty blob): damage, not an empty value (it was read
/// as one).
pub(crate) fn blob(v: Option<&Value>) -> libsql::Result<Vec<u8>> {
    match v {
        Some(Value::Blob(b)) => Ok(b.clone()),
        _ => Err(libsql::Error::InvalidColumnType),
    }
}

/// [`blob`] of an owned value: the bytes move, nothing is copied.
pub(crate) fn blob_owned(v: Value) -> libsql::Result<Vec<u8>> {
    match v {
        Value::Blob(b) => Ok(b),
        _ => Err(libsql::Error::InvalidColumnType),
    }
}

pub(crate) fn t(s: &str) -> Value {
    Value::Text(s.to_string())
}

pub(crate) fn i(v: u64) -> Value {
    Value::Integer(i64::try_from(v).unwrap_or(i64::MAX))
}

/// The lease row of a `LEASE_ROW` query. A row that does not decode (a holder that is not a valid
/// node id, a token or time that is not an integer, NULL included: a `do_locks` table a
/// predecessor created without NOT NULL) is `Corrupt`, never "no lease": reading a damaged live
/// lease as free would let anyone take it over.
pub(crate) fn lease_row(rows: &[Row]) -> Result<Option<LeaseRow>> {
    let Some(r) = rows.first() else { return Ok(None) };
    let bad = |what: &str, e: &dyn std::fmt::Display| Error::corrupt(format!("lease row: {what}: {e}"));
    let node = text(r.first()).map_err(|e| bad("holder", &e))?;
    let holder = NodeId::new(&node).map_err(|e| bad("holder", &e))?;
    Ok(Some(LeaseRow {
        holder,
        // An integer (not NULL) from 0 to `FencingToken::MAX`, as every writer stores it.
        token: FencingToken::new(stored(r.get(1)).map_err(|e| bad("fencing token", &e))?),
        acquired_at: Timestamp::from_micros(int_not_null(r.get(2)).map_err(|e| bad("acquired_at", &e))?),
        expires_at: Timestamp::from_micros(int_not_null(r.get(3)).map_err(|e| bad("expires_at", &e))?),
    }))
}

pub(crate) fn range_sql(range: &KeyRange) -> (String, Vec<Value>) {
    let (filter, args) = range_filter(range);
    let sql = format!(
        concat!(
            "SELECT ",
            text_column!("key"),
            ", ",
            value_column!("value"),
            ", seq FROM do_state WHERE do_id = ?1{} ORDER BY key LIMIT ?{}"
        ),
        filter,
        args.len() + 2
    );
    (sql, args)
}

/// The bytes a remote primary counts in its answer for a row of a listing or a change read
/// (sqld's `max_response_size` check): its key's and value's bytes, those of the text columns
/// named, and 256 for the rest (sqld counts an integer as `{"type":"integer", "value": "N"}`, a
/// text as `{"type":"text","value":"…"}`, a blob by its length): a generous estimate.
/// (A blob's length is read from its header: `length(value)` of a blob loads none of it, where
/// a CAST would load every value of the range.)
macro_rules! answer_size {
    ($($text:literal),*) => {
        concat!(
            // (A NULL key, damage, counts 0: the row is answered, and refused as `Corrupt`; a
            // NULL size left it out of the page without a word.)
            "(ifnull(length(CAST(key AS BLOB)), 0) + CASE typeof(value) WHEN 'blob' THEN length(value) \
             ELSE ifnull(length(CAST(value AS BLOB)), 0) END",
            $(" + ifnull(length(CAST(", $text, " AS BLOB)), 0)",)*
            " + 256)"
        )
    };
}

/// The most rows of one page of a remote listing or change read that can fit its bound (each
/// counts at least 256 bytes, [`answer_size!`]), plus the one that does not: the rows a page's
/// query steps through (without it, every page summed the sizes of the whole rest of the range).
pub(crate) fn page_rows(bound: usize, limit: i64) -> i64 {
    let most = i64::try_from(bound / 256 + 1).unwrap_or(i64::MAX);
    if limit < 0 {
        most
    } else {
        limit.min(most)
    }
}
pub(crate) use answer_size;

/// A page of a remote listing (sqld refuses an answer over its `max_response_size`, 10 MB by
/// default): the rows of [`range_sql`] (same parameters) until their estimated answer size would
/// pass `?{n + 3}` bytes (at least one row), then the next row, if any, with `fits` 0 and no
/// value: the listing goes on after the last row that fits. Columns: key, value, seq, fits.
/// (The second row is always sent: after a first row over the bound on its own, whose size
/// puts every later row past it, it is the one that says the listing goes on; without it such
/// a page looked like the last, and the listing ended there.)
pub(crate) fn range_page_sql(range: &KeyRange) -> (String, Vec<Value>) {
    let (filter, args) = range_filter(range);
    let size = answer_size!();
    let sql = format!(
        concat!(
            "SELECT k, CASE WHEN fits THEN v END, seq, fits FROM (",
            "SELECT k, v, seq, sk, before, rn, (before = 0 OR before + size <= ?{bound}) AS fits FROM (",
            "SELECT ",
            text_column!("key"),
            " AS k, ",
            value_column!("value"),
            " AS v, seq, key AS sk, {size} AS size, ",
            "sum({size}) OVER (ORDER BY key ROWS UNBOUNDED PRECEDING) - {size} AS before, ",
            "row_number() OVER (ORDER BY key) AS rn ",
            "FROM do_state WHERE do_id = ?1{filter} ORDER BY key LIMIT ?{limit})) ",
            "WHERE before <= ?{bound} OR rn = 2 ORDER BY sk"
        ),
        size = size,
        filter = filter,
        limit = args.len() + 2,
        bound = args.len() + 3,
    );
    (sql, args)
}

/// The `AND key …` conditions of `range` on `?2`, `?3` (after the object's `?1`) and their values.
fn range_filter(range: &KeyRange) -> (String, Vec<Value>) {
    let mut sql = String::new();
    let mut args = Vec::new();
    for (b, inc, exc) in [(&range.start, ">=", ">"), (&range.end, "<=", "<")] {
        match b {
            Bound::Included(k) => {
                args.push(t(k));
                sql.push_str(&format!(" AND key {inc} ?{}", args.len() + 1));
            }
            Bound::Excluded(k) => {
                args.push(t(k));
                sql.push_str(&format!(" AND key {exc} ?{}", args.len() + 1));
            }
            Bound::Unbounded => {}
        }
    }
    (sql, args)
}
