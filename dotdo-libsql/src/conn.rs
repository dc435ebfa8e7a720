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
    cache: HashMap<Cow<'static, str>, libsql::Statement>,
}

impl Conn {
    pub(crate) fn new(conn: libsql::Connection, batch: bool) -> Self {
        Conn { conn, batch, cache: HashMap::new() }
    }

    /// Run one statement through the statement cache, collecting its rows.
    async fn prepared(&mut self, step: Step) -> libsql::Result<Vec<Row>> {
        if !self.cache.contains_key(&step.sql) {
            let stmt = self.conn.prepare(&step.sql).await?;
            self.cache.insert(step.sql.clone(), stmt);
        }
        let Some(stmt) = self.cache.get(&step.sql) else {
            return Err(libsql::Error::Misuse("statement cache lost an entry".into()));
        };
        stmt.reset();
        let params = Params::Positional(step.params);
        let out = if step.rows {
            collect(stmt.query(params).await).await
        } else {
            stmt.execute(params).await.map(|_| Vec::new())
        };
        stmt.reset();
        if out.is_err() {
            // A statement that failed may be in a bad state; prepare it afresh next time.
            self.cache.remove(&step.sql);
        }
        out
    }

    /// Send `steps` as one rendered batch; the rows of each statement, in order.
    async fn rendered(&mut self, steps: &[Step]) -> libsql::Result<Vec<Vec<Row>>> {
        let mut sql = String::new();
        for s in steps {
            render_into(&mut sql, &s.sql, &s.params);
            sql.push_str(";\n");
        }
        let mut batch = self.conn.execute_batch(&sql).await?;
        let mut out = Vec::with_capacity(steps.len());
        while let Some(rows) = batch.next_stmt_row() {
            out.push(match rows {
                Some(rows) => collect(Ok(rows)).await?,
                None => Vec::new(),
            });
        }
        out.resize(steps.len(), Vec::new());
        Ok(out)
    }

    /// A read outside any explicit transaction (one round trip remotely).
    pub(crate) async fn query(&mut self, step: Step) -> libsql::Result<Vec<Row>> {
        if self.batch {
            let mut rows = self.rendered(std::slice::from_ref(&step)).await?;
            Ok(rows.pop().unwrap_or_default())
        } else {
            self.prepared(step).await
        }
    }

    /// Several statements outside any explicit transaction (e.g. pragmas), one round trip.
    pub(crate) async fn run_all(&mut self, steps: Vec<Step>) -> libsql::Result<Vec<Vec<Row>>> {
        if self.batch {
            self.rendered(&steps).await
        } else {
            let mut out = Vec::with_capacity(steps.len());
            for s in steps {
                out.push(self.prepared(s).await?);
            }
            Ok(out)
        }
    }

    /// Begin a write transaction (`BEGIN IMMEDIATE`). Remotely nothing is sent yet: the `BEGIN`
    /// travels with the first query or the commit.
    pub(crate) async fn begin(&mut self) -> libsql::Result<Tx<'_>> {
        if !self.batch {
            self.prepared(Step::exec("BEGIN IMMEDIATE", vec![])).await?;
        }
        Ok(Tx { conn: self, pending: vec![Step::new("BEGIN IMMEDIATE", vec![])], sent_begin: false })
    }

    /// Run `steps` as one transaction (one round trip remotely) and return every step's rows.
    pub(crate) async fn transaction(&mut self, steps: Vec<Step>) -> libsql::Result<Vec<Vec<Row>>> {
        let mut tx = self.begin().await?;
        let n = steps.len();
        let mut out = Vec::with_capacity(n);
        if tx.conn.batch {
            tx.pending.extend(steps);
            let r = tx.flush(true).await;
            return match r {
                Ok(mut rows) => {
                    // BEGIN first, COMMIT last.
                    rows.truncate(n + 1);
                    Ok(rows.into_iter().skip(1).collect())
                }
                Err(e) => {
                    tx.rollback().await;
                    Err(e)
                }
            };
        }
        for s in steps {
            match tx.conn.prepared(s).await {
                Ok(rows) => out.push(rows),
                Err(e) => {
                    tx.rollback().await;
                    return Err(e);
                }
            }
        }
        match tx.commit().await {
            Ok(()) => Ok(out),
            Err(e) => Err(e),
        }
    }
}

/// An open write transaction. Drop without commit leaves it open: always end it with
/// [`commit`](Tx::commit) or [`rollback`](Tx::rollback).
pub(crate) struct Tx<'a> {
    conn: &'a mut Conn,
    pending: Vec<Step>,
    sent_begin: bool,
}

impl Tx<'_> {
    /// Send what is pending (remote only), optionally with `COMMIT`; every statement's rows.
    async fn flush(&mut self, commit: bool) -> libsql::Result<Vec<Vec<Row>>> {
        if commit {
            self.pending.push(Step::new("COMMIT", vec![]));
        }
        let steps = std::mem::take(&mut self.pending);
        let out = self.conn.rendered(&steps).await;
        self.sent_begin = true;
        out
    }

    /// A statement whose rows are not needed before the commit (buffered remotely).
    pub(crate) async fn exec(&mut self, step: Step) -> libsql::Result<()> {
        if self.conn.batch {
            self.pending.push(step);
            Ok(())
        } else {
            self.conn.prepared(step).await.map(|_| ())
        }
    }

    /// A statement whose rows are needed now (remotely: one round trip with what is pending).
    pub(crate) async fn query(&mut self, step: Step) -> libsql::Result<Vec<Row>> {
        if self.conn.batch {
            self.pending.push(step);
            let mut rows = self.flush(false).await?;
            Ok(rows.pop().unwrap_or_default())
        } else {
            self.conn.prepared(step).await
        }
    }

    /// Commit (remotely: one round trip with what is pending).
    pub(crate) async fn commit(mut self) -> libsql::Result<()> {
        let r = if self.conn.batch {
            self.flush(true).await.map(|_| ())
        } else {
            self.conn.prepared(Step::exec("COMMIT", vec![])).await.map(|_| ())
        };
        if r.is_err() {
            self.rollback().await;
        }
        r
    }

    /// Roll back; nothing of the transaction stays applied. Errors are ignored (a transaction
    /// that failed remotely is already rolled back when its stream closed).
    pub(crate) async fn rollback(self) {
        if self.conn.batch && !self.sent_begin {
            return;
        }
        if !self.conn.batch && self.conn.conn.is_autocommit() {
            return;
        }
        let _ = self.conn.conn.execute("ROLLBACK", ()).await;
    }
}

async fn collect(rows: libsql::Result<libsql::Rows>) -> libsql::Result<Vec<Row>> {
    let mut rows = rows?;
    let n = rows.column_count();
    let mut out = Vec::new();
    while let Some(row) = rows.next().await? {
        let mut values = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        for i in 0..n {
            values.push(row.get_value(i)?);
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn text_with_nul_is_cast_from_hex_and_unknown_placeholders_stay() {
        assert_eq!(render("?1", &[Value::Text("a\0b".into())]), "CAST(X'610062' AS TEXT)");
        assert_eq!(render("? ?3", &[Value::Integer(1)]), "? ?3");
    }
}
