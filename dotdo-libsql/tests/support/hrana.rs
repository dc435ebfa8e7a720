//! A minimal Hrana-over-HTTP server (the protocol sqld and Turso speak) backed by a local libSQL
//! file, for tests of the remote code path without a real server. It implements what the libsql
//! client sends for `execute_batch`: `POST /v3/pipeline` with `batch` (conditional steps),
//! `execute`, `sequence`, `get_autocommit` and `close` requests, streams with batons, and bearer
//! auth. It counts pipeline requests, i.e. HTTP round trips. Like sqld, it refuses an answer
//! over its response size limit (sqld's default `max_response_size`, 10 MB, counted as sqld
//! counts it) with `RESPONSE_TOO_LARGE`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::executor::block_on;
use libsql_hrana::proto::{
    BatchCond, BatchResult, BatchStreamResp, CloseStreamResp, Col, CursorEntry, CursorReqBody, CursorRespBody,
    DescribeCol, DescribeParam, DescribeResult, DescribeStreamResp, Error as HError, ExecuteStreamResp,
    GetAutocommitStreamResp, PipelineReqBody, PipelineRespBody, Row, SequenceStreamResp, StepBeginEntry, StepEndEntry,
    StepErrorEntry, Stmt, StmtResult, StreamRequest, StreamResponse, StreamResult, Value as HValue,
};

struct State {
    db: libsql::Database,
    token: String,
    streams: Mutex<HashMap<String, libsql::Connection>>,
    next_baton: AtomicUsize,
    requests: AtomicUsize,
    lose_replies: AtomicUsize,
    hang_replies: AtomicUsize,
    /// Requests to paths other than the Hrana ones (libsql's replication protocol, gRPC-web
    /// over HTTP/1.1) are never answered.
    hang_others: AtomicBool,
    /// A baton that names no stream gets sqld's answer for a baton it does not know (a stream
    /// cleaned up 5 minutes after it expired, or a server restarted): HTTP 400 with the protocol
    /// error as plain text, not `STREAM_EXPIRED`.
    unknown_batons: AtomicBool,
    /// sqld's `max_response_size`: the most bytes of one request's answers (a batch's steps
    /// together), as sqld estimates them.
    max_response: AtomicU64,
    /// Requests refused with `RESPONSE_TOO_LARGE`.
    too_large: AtomicUsize,
    /// TCP connections accepted.
    connections: AtomicUsize,
    stop: AtomicBool,
}

/// sqld's default `max_response_size` ("10MB").
pub const SQLD_MAX_RESPONSE_SIZE: u64 = 10_000_000;

/// A running fake server; stops accepting when dropped.
pub struct HranaServer {
    state: Arc<State>,
    port: u16,
}

impl HranaServer {
    /// Serve the database at `path`, requiring `Authorization: Bearer <token>` (none if empty).
    pub fn start(path: &Path, token: &str) -> HranaServer {
        let db = block_on(libsql::Builder::new_local(path).build()).expect("server database");
        {
            let c = db.connect().expect("connect");
            let mut rows = block_on(c.query("PRAGMA journal_mode = WAL", ())).expect("wal");
            while block_on(rows.next()).expect("row").is_some() {}
        }
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let state = Arc::new(State {
            db,
            token: token.to_string(),
            streams: Mutex::new(HashMap::new()),
            next_baton: AtomicUsize::new(1),
            requests: AtomicUsize::new(0),
            lose_replies: AtomicUsize::new(0),
            hang_replies: AtomicUsize::new(0),
            hang_others: AtomicBool::new(false),
            unknown_batons: AtomicBool::new(false),
            max_response: AtomicU64::new(SQLD_MAX_RESPONSE_SIZE),
            too_large: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                s.connections.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                std::thread::spawn(move || serve(conn, &s));
            }
        });
        HranaServer { state, port }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Execute the next `n` requests but close the connection instead of replying (a reply lost
    /// on the way back).
    pub fn lose_replies(&self, n: usize) {
        self.state.lose_replies.store(n, Ordering::SeqCst);
    }

    /// Execute the next `n` requests but never reply (a primary that goes silent without
    /// closing the connection); the connection stays open until the server stops.
    pub fn hang_replies(&self, n: usize) {
        self.state.hang_replies.store(n, Ordering::SeqCst);
    }

    /// Never answer requests outside the Hrana endpoints (an embedded replica's pulls): a
    /// primary whose replication stops answering without closing the connection.
    #[allow(dead_code)] // used by the replica test only, not by every test binary
    pub fn hang_replication(&self) {
        self.state.hang_others.store(true, Ordering::SeqCst);
    }

    /// Forget every open stream, as sqld does with streams left idle too long: a request
    /// naming one gets `STREAM_EXPIRED`.
    pub fn expire_streams(&self) -> usize {
        let mut streams = self.state.streams.lock().expect("streams");
        let n = streams.len();
        streams.clear();
        n
    }

    /// Forget every open stream as sqld does once an expired stream is cleaned up or after a
    /// restart (a new baton key): from then on a request naming a stream it does not know gets
    /// HTTP 400 "Received an invalid baton".
    #[allow(dead_code)] // used by the remote tests only, not by every test binary
    pub fn forget_streams(&self) -> usize {
        self.state.unknown_batons.store(true, Ordering::SeqCst);
        self.expire_streams()
    }

    /// Set the response size limit (sqld's `--max-response-size`), in bytes.
    #[allow(dead_code)] // used by the remote tests only, not by every test binary
    pub fn set_max_response(&self, bytes: u64) {
        self.state.max_response.store(bytes, Ordering::SeqCst);
    }

    /// Requests refused so far for an answer over the response size limit.
    #[allow(dead_code)] // used by the remote tests only, not by every test binary
    pub fn refused_as_too_large(&self) -> usize {
        self.state.too_large.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    #[allow(dead_code)] // used by the remote tests only, not by every test binary
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Pipeline requests (HTTP round trips) served so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }
}

impl Drop for HranaServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Acknowledge at once: the client writes a request's headers and body separately without
/// TCP_NODELAY, so a delayed ACK here would stall every request by tens of milliseconds.
#[cfg(target_os = "linux")]
fn quickack(stream: &TcpStream) {
    use std::os::linux::net::TcpStreamExt;
    let _ = stream.set_quickack(true);
}

#[cfg(not(target_os = "linux"))]
fn quickack(_: &TcpStream) {}

fn serve(stream: TcpStream, state: &State) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = stream.set_nodelay(true);
    quickack(&stream);
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut out = stream;
    loop {
        let mut line = String::new();
        quickack(&out);
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        quickack(&out);
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let (mut len, mut auth) = (0usize, String::new());
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap_or(0),
                    "authorization" => auth = v.trim().to_string(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; len];
        quickack(&out);
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let hrana = path.ends_with("/pipeline") || path.ends_with("/cursor");
        if !hrana && state.hang_others.load(Ordering::SeqCst) {
            while !state.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            return;
        }
        let unknown_baton = || {
            let baton = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("baton").and_then(|b| b.as_str().map(str::to_string)));
            baton.is_some_and(|b| !state.streams.lock().expect("streams").contains_key(&b))
        };
        let (status, reply) = if !state.token.is_empty() && auth != format!("Bearer {}", state.token) {
            ("401 Unauthorized", "{\"error\":\"Unauthorized\"}".to_string())
        } else if hrana && state.unknown_batons.load(Ordering::SeqCst) && unknown_baton() {
            // sqld: `ProtocolError::BatonInvalid`, answered as text before anything runs.
            state.requests.fetch_add(1, Ordering::SeqCst);
            ("400 Bad Request", "Received an invalid baton".to_string())
        } else if path.ends_with("/cursor") {
            state.requests.fetch_add(1, Ordering::SeqCst);
            match serde_json::from_slice::<CursorReqBody>(&body) {
                // A baton that names no stream (expired) is refused before the cursor starts, as
                // sqld does: HTTP 400 with the error as the body.
                Ok(req) => match cursor(state, req) {
                    Ok(lines) => ("200 OK", lines),
                    Err(e) => ("400 Bad Request", serde_json::to_string(&e).expect("json")),
                },
                Err(e) => ("400 Bad Request", format!("{{\"error\":{:?}}}", e.to_string())),
            }
        } else if !path.ends_with("/pipeline") {
            ("404 Not Found", "{\"error\":\"not supported by the test server\"}".to_string())
        } else {
            state.requests.fetch_add(1, Ordering::SeqCst);
            match serde_json::from_slice::<PipelineReqBody>(&body) {
                // A baton that names no stream (expired) is refused before anything runs, as
                // sqld does: HTTP 400 with the error (`STREAM_EXPIRED`) as the body.
                Ok(req) => match pipeline(state, req) {
                    Ok(resp) => ("200 OK", serde_json::to_string(&resp).expect("json")),
                    Err(e) => ("400 Bad Request", serde_json::to_string(&e).expect("json")),
                },
                Err(e) => ("400 Bad Request", format!("{{\"error\":{:?}}}", e.to_string())),
            }
        };
        if state.hang_replies.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            while !state.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            return;
        }
        if state.lose_replies.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            let _ = out.shutdown(std::net::Shutdown::Both);
            return;
        }
        let resp = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
            reply.len()
        );
        if out.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// The connection of the stream named by `baton` (a new one if none).
fn stream_conn(state: &State, baton: &Option<String>) -> Result<libsql::Connection, HError> {
    match baton {
        Some(b) => state.streams.lock().expect("streams").remove(b).ok_or_else(|| HError {
            message: "The stream has expired due to inactivity".into(),
            code: "STREAM_EXPIRED".into(),
        }),
        None => {
            let c = state.db.connect().expect("connect");
            c.busy_timeout(Duration::from_secs(2)).expect("busy timeout");
            block_on(c.execute_batch("PRAGMA synchronous = NORMAL")).expect("synchronous");
            Ok(c)
        }
    }
}

fn keep(state: &State, conn: libsql::Connection) -> String {
    let b = format!("baton-{}", state.next_baton.fetch_add(1, Ordering::SeqCst));
    state.streams.lock().expect("streams").insert(b.clone(), conn);
    b
}

/// A cursor request: one JSON line with the baton, then one line per entry; the error of a
/// baton that names no stream.
fn cursor(state: &State, req: CursorReqBody) -> Result<String, HError> {
    let mut lines = Vec::new();
    let conn = stream_conn(state, &req.baton)?;
    let mut entries = Vec::new();
    let mut result = BatchResult { step_results: Vec::new(), step_errors: Vec::new(), replication_index: None };
    let mut budget = Budget::new(state);
    for (i, step) in req.batch.steps.into_iter().enumerate() {
        let step_no = u32::try_from(i).expect("few steps");
        if !step.condition.as_ref().is_none_or(|c| cond(c, &result, &conn)) {
            result.step_results.push(None);
            result.step_errors.push(None);
            continue;
        }
        match exec(&conn, &step.stmt).and_then(|r| budget.spend(r)) {
            Ok(r) => {
                entries.push(CursorEntry::StepBegin(StepBeginEntry { step: step_no, cols: r.cols.clone() }));
                for row in &r.rows {
                    entries.push(CursorEntry::Row { row: row.clone() });
                }
                entries.push(CursorEntry::StepEnd(StepEndEntry {
                    affected_row_count: r.affected_row_count,
                    last_insert_rowid: r.last_insert_rowid,
                }));
                result.step_results.push(Some(r));
                result.step_errors.push(None);
            }
            Err(error) => {
                entries.push(CursorEntry::StepError(StepErrorEntry { step: step_no, error: error.clone() }));
                result.step_results.push(None);
                result.step_errors.push(Some(error));
            }
        }
    }
    let baton = keep(state, conn);
    lines.push(serde_json::to_string(&CursorRespBody { baton: Some(baton), base_url: None }).expect("json"));
    for e in entries {
        lines.push(serde_json::to_string(&e).expect("json"));
    }
    Ok(lines.join("\n") + "\n")
}

fn describe(conn: &libsql::Connection, sql: &str) -> Result<DescribeResult, HError> {
    let stmt = block_on(conn.prepare(sql)).map_err(herr)?;
    let cols = stmt.columns().iter().map(|c| DescribeCol { name: c.name().to_string(), decltype: None }).collect();
    let params = (0..stmt.parameter_count()).map(|_| DescribeParam { name: None }).collect();
    Ok(DescribeResult { params, cols, is_explain: false, is_readonly: false })
}

fn pipeline(state: &State, req: PipelineReqBody) -> Result<PipelineRespBody, HError> {
    let conn = stream_conn(state, &req.baton)?;
    let mut closed = false;
    let mut results = Vec::new();
    for r in req.requests {
        let resp = match r {
            StreamRequest::Batch(b) => {
                let mut result =
                    BatchResult { step_results: Vec::new(), step_errors: Vec::new(), replication_index: None };
                let mut budget = Budget::new(state);
                let mut too_large = None;
                for step in b.batch.steps {
                    let run = step.condition.as_ref().is_none_or(|c| cond(c, &result, &conn));
                    if !run {
                        result.step_results.push(None);
                        result.step_errors.push(None);
                        continue;
                    }
                    match exec(&conn, &step.stmt) {
                        Ok(r) => match budget.spend(r) {
                            Ok(r) => {
                                result.step_results.push(Some(r));
                                result.step_errors.push(None);
                            }
                            // sqld stops the whole batch there: the request fails.
                            Err(e) => {
                                too_large = Some(e);
                                break;
                            }
                        },
                        Err(e) => {
                            result.step_results.push(None);
                            result.step_errors.push(Some(e));
                        }
                    }
                }
                match too_large {
                    Some(e) => Err(e),
                    None => Ok(StreamResponse::Batch(BatchStreamResp { result })),
                }
            }
            StreamRequest::Execute(e) => exec(&conn, &e.stmt)
                .and_then(|r| Budget::new(state).spend(r))
                .map(|result| StreamResponse::Execute(ExecuteStreamResp { result })),
            StreamRequest::Sequence(s) => block_on(conn.execute_batch(s.sql.as_deref().unwrap_or("")))
                .map(|_| StreamResponse::Sequence(SequenceStreamResp {}))
                .map_err(herr),
            StreamRequest::Describe(d) => describe(&conn, d.sql.as_deref().unwrap_or(""))
                .map(|result| StreamResponse::Describe(DescribeStreamResp { result })),
            StreamRequest::GetAutocommit(_) => {
                Ok(StreamResponse::GetAutocommit(GetAutocommitStreamResp { is_autocommit: conn.is_autocommit() }))
            }
            StreamRequest::Close(_) => {
                closed = true;
                Ok(StreamResponse::Close(CloseStreamResp {}))
            }
            other => Err(HError { message: format!("unsupported request {other:?}"), code: "UNSUPPORTED".into() }),
        };
        results.push(match resp {
            Ok(response) => StreamResult::Ok { response },
            Err(error) => StreamResult::Error { error },
        });
    }
    let baton = if closed {
        // Closing a stream rolls back what it left open, as sqld does.
        if !conn.is_autocommit() {
            let _ = block_on(conn.execute("ROLLBACK", ()));
        }
        None
    } else {
        Some(keep(state, conn))
    };
    Ok(PipelineRespBody { baton, base_url: None, results })
}

fn cond(c: &BatchCond, r: &BatchResult, conn: &libsql::Connection) -> bool {
    let ok = |s: u32| r.step_results.get(s as usize).is_some_and(|x| x.is_some());
    let err = |s: u32| r.step_errors.get(s as usize).is_some_and(|x| x.is_some());
    match c {
        BatchCond::None => true,
        BatchCond::Ok { step } => ok(*step),
        BatchCond::Error { step } => err(*step),
        BatchCond::Not { cond: inner } => !cond(inner, r, conn),
        BatchCond::And(l) => l.conds.iter().all(|x| cond(x, r, conn)),
        BatchCond::Or(l) => l.conds.iter().any(|x| cond(x, r, conn)),
        BatchCond::IsAutocommit {} => conn.is_autocommit(),
    }
}

fn herr(e: libsql::Error) -> HError {
    let (code, message) = match &e {
        libsql::Error::SqliteFailure(code, msg) => (*code, msg.clone()),
        other => (1, other.to_string()),
    };
    let name = match code & 0xff {
        5 => "SQLITE_BUSY",
        6 => "SQLITE_LOCKED",
        11 => "SQLITE_CORRUPT",
        19 => "SQLITE_CONSTRAINT",
        26 => "SQLITE_NOTADB",
        _ => "SQLITE_ERROR",
    };
    HError { message, code: name.into() }
}

/// The first SQL keyword of `sql`, upper-cased (comments are not expected here).
fn first_keyword(sql: &str) -> String {
    sql.trim_start().chars().take_while(|c| c.is_ascii_alphabetic()).collect::<String>().to_ascii_uppercase()
}

fn exec(conn: &libsql::Connection, stmt: &Stmt) -> Result<StmtResult, HError> {
    let sql = stmt.sql.clone().unwrap_or_default();
    let args: Vec<libsql::Value> = stmt
        .args
        .iter()
        .map(|v| match v {
            HValue::Integer { value } => libsql::Value::Integer(*value),
            HValue::Float { value } => libsql::Value::Real(*value),
            HValue::Text { value } => libsql::Value::Text(value.to_string()),
            HValue::Blob { value } => libsql::Value::Blob(value.to_vec()),
            _ => libsql::Value::Null,
        })
        .collect();
    block_on(async {
        let before = conn.total_changes();
        let mut rows = conn.query(&sql, args).await.map_err(herr)?;
        let n = rows.column_count();
        let cols = (0..n).map(|i| Col { name: rows.column_name(i).map(str::to_string), decltype: None }).collect();
        let mut out = Vec::new();
        while let Some(row) = rows.next().await.map_err(herr)? {
            let mut values = Vec::new();
            for i in 0..n {
                values.push(match row.get_value(i).map_err(herr)? {
                    libsql::Value::Null => HValue::Null,
                    libsql::Value::Integer(value) => HValue::Integer { value },
                    libsql::Value::Real(value) => HValue::Float { value },
                    libsql::Value::Text(s) => HValue::Text { value: s.into() },
                    libsql::Value::Blob(b) => HValue::Blob { value: b.into() },
                });
            }
            out.push(Row { values });
        }
        drop(rows);
        // As sqld reports them (libsql-server `connection/program.rs`): the affected row count
        // only for INSERT / UPDATE / DELETE, and `last_insert_rowid` only for an INSERT (null for
        // every other statement, COMMIT included). A client that reads a batch's result from
        // `last_insert_rowid` must therefore end the batch with an INSERT.
        let kind = first_keyword(&sql);
        let is_insert = matches!(kind.as_str(), "INSERT" | "REPLACE");
        let is_iud = is_insert || matches!(kind.as_str(), "UPDATE" | "DELETE");
        Ok(StmtResult {
            cols,
            rows: if stmt.want_rows == Some(false) { Vec::new() } else { out },
            affected_row_count: if is_iud { conn.total_changes().saturating_sub(before) } else { 0 },
            last_insert_rowid: is_insert.then(|| conn.last_insert_rowid()),
            replication_index: None,
            rows_read: 0,
            rows_written: 0,
            query_duration_ms: 0.0,
        })
    })
}

/// What is left of one request's answer size limit.
struct Budget<'s> {
    left: u64,
    state: &'s State,
}

impl<'s> Budget<'s> {
    fn new(state: &'s State) -> Budget<'s> {
        Budget { left: state.max_response.load(Ordering::SeqCst), state }
    }

    /// `r`, if its answer fits in what is left (then taken from it); else sqld's error.
    fn spend(&mut self, r: StmtResult) -> Result<StmtResult, HError> {
        let size = answer_size(&r);
        if size > self.left {
            self.state.too_large.fetch_add(1, Ordering::SeqCst);
            return Err(HError { message: "Response is too large".into(), code: "RESPONSE_TOO_LARGE".into() });
        }
        self.left -= size;
        Ok(r)
    }
}

/// The size of a statement's answer as sqld estimates it (libsql-server `hrana/result_builder.rs`:
/// each column's `{"name":…,"decltype":…}`, each value's JSON, a blob by its length).
fn answer_size(r: &StmtResult) -> u64 {
    let cols: usize = r
        .cols
        .iter()
        .map(|c| {
            format!(
                r#"{{"name":"{}","decltype":"{}"}}"#,
                c.name.as_deref().unwrap_or(""),
                c.decltype.as_deref().unwrap_or("null")
            )
            .len()
        })
        .sum();
    let values: usize = r
        .rows
        .iter()
        .flat_map(|row| row.values.iter())
        .map(|v| match v {
            HValue::Null => r#"{"type":"null"}"#.len(),
            HValue::Integer { value } => format!(r#"{{"type":"integer", "value": "{value}"}}"#).len(),
            HValue::Float { value } => format!(r#"{{"type":"integer","value": {value}"}}"#).len(),
            HValue::Text { value } => format!(r#"{{"type":"text","value":"{value}"}}"#).len(),
            HValue::Blob { value } => value.len(),
            _ => 0,
        })
        .sum();
    (cols + values) as u64
}
