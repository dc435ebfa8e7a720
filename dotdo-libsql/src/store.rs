//! [`LibsqlStore`]: the hot store and the lease guard on one libSQL database (local file, remote
//! primary or embedded replica).

use std::ops::Bound;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dotdo_core::guard::rules::{self, LeaseRow};
use dotdo_core::ids::{validate_key, validate_value};
use dotdo_core::{
    ChangeRecord, Clock, ConsistencyGuard, Entry, Error, ErrorKind, FencingToken, HotStore, KeyRange, Lease, NodeId,
    ObjectId, ObjectInfo, Op, Result, Seq, SystemClock, Timestamp, WriteBatch, WriteOp, WriteReceipt,
};
use futures::future::BoxFuture;
use libsql::Value;
use parking_lot::Mutex;

use crate::conn::{Conn, Program, Row, Step};
use crate::error::{self, class_of, is_transient, map_class};
use crate::schema;
use crate::settings::{AuthToken, Durability, LibsqlSettings, Target, Transport};

/// An error inside a call: libsql's (classified and maybe retried) or a decided API error
/// (fenced, conflict, …) that ends the call.
pub(crate) enum TxError {
    Sql(libsql::Error),
    Api(Error),
}

impl From<libsql::Error> for TxError {
    fn from(e: libsql::Error) -> Self {
        TxError::Sql(e)
    }
}

impl From<Error> for TxError {
    fn from(e: Error) -> Self {
        TxError::Api(e)
    }
}

type TxResult<T> = std::result::Result<T, TxError>;

/// Opens connections of one kind (local file, remote primary, replica file).
struct Pool {
    db: Arc<libsql::Database>,
    batch: bool,
    idle: Mutex<Vec<Conn>>,
    max_idle: usize,
    local_file: bool,
    settings: LibsqlSettings,
}

impl Pool {
    async fn connect(&self) -> libsql::Result<Conn> {
        let conn = self.db.connect()?;
        if self.local_file {
            conn.busy_timeout(self.settings.busy_timeout)?;
        }
        Ok(Conn::new(conn, self.batch))
    }

    fn take(&self) -> Option<Conn> {
        self.idle.lock().pop()
    }

    fn give_back(&self, conn: Conn) {
        let mut idle = self.idle.lock();
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }
}

struct Inner {
    target: Target,
    settings: LibsqlSettings,
    clock: Arc<dyn Clock>,
    /// The one write connection (on the primary). Writers of this store serialize on it.
    writer: tokio::sync::Mutex<Conn>,
    /// Whether the write connection is a local file (its calls block; see `drive`).
    local_writes: bool,
    /// Read connections: the local file, the replica file, or the primary.
    readers: Pool,
    /// The embedded replica, pulled after each write so that reads see it.
    #[allow(dead_code)]
    replica: Option<Arc<libsql::Database>>,
    /// Keeps the primary's database handle (remote and replica modes) alive.
    _primary: Option<libsql::Database>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibsqlStore").field("target", &self.target).field("settings", &self.settings).finish()
    }
}

/// [`HotStore`] + [`ConsistencyGuard`] on one libSQL database: a local file, a remote primary
/// (Turso / sqld) or an embedded replica of one.
///
/// Same schema and semantics as dotdo-sqlite. The lease table (`do_locks`), per-object counters,
/// state and change log share one database, so the fencing-token check and the write are a single
/// transaction **on the primary**; a fenced write is one round trip to a remote primary. Cheap to
/// clone; clones share connections.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> dotdo_core::Result<()> {
/// use std::time::Duration;
/// use dotdo_core::{ConsistencyGuard, HotStore, HotStoreExt, NodeId, ObjectId};
/// use dotdo_libsql::LibsqlStore;
///
/// let dir = tempfile::tempdir().expect("tempdir");
/// let store = LibsqlStore::local(dir.path().join("hot.db")).open().await?;
/// let obj = ObjectId::new("user:1")?;
/// let lease = store.acquire(&obj, &NodeId::new("node-a")?, Duration::from_secs(10)).await?;
/// store.put(&obj, lease.token, "User", "name", "Ada".into()).await?;
/// assert_eq!(store.get(&obj, "name").await?.as_deref(), Some(&b"Ada"[..]));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct LibsqlStore {
    inner: Arc<Inner>,
}

/// Builds a [`LibsqlStore`]: a [`Target`] plus settings and an optional clock.
#[derive(Debug)]
pub struct LibsqlStoreBuilder {
    target: Target,
    settings: LibsqlSettings,
    clock: Option<Arc<dyn Clock>>,
}

impl LibsqlStoreBuilder {
    /// Use these settings (default: [`LibsqlSettings::default`]).
    pub fn with_settings(mut self, settings: LibsqlSettings) -> Self {
        self.settings = settings;
        self
    }

    /// Read time from `clock` (default: [`SystemClock`]). Every process and node sharing a
    /// database must use clocks that agree (the system clock) for lease expiry to be meaningful.
    /// Retry backoff sleeps on this clock too.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The target this builder opens.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Validate the configuration (no I/O): URL scheme and host, token shape, settings.
    pub fn validate(&self) -> Result<()> {
        self.settings.validate()?;
        self.target.validate()
    }

    /// Open (creating if needed) the database and its schema. Bad URLs or tokens give
    /// `InvalidInput` before any I/O; a file that is not a database gives `Corrupt`; an
    /// unreachable primary gives a retryable `Unavailable` after the bounded retries; a rejected
    /// token gives a non-retryable `Backend` error.
    pub async fn open(self) -> Result<LibsqlStore> {
        self.validate()?;
        let clock = self.clock.unwrap_or_else(|| Arc::new(SystemClock::new()));
        let settings = self.settings;
        let target = self.target;
        let doing = format!("opening {}", target.describe());
        let batch_everywhere = settings.transport == Transport::Batch;
        let (write_db, read_db, replica, local_file) = match &target {
            Target::Local { path } => {
                let db = libsql::Builder::new_local(path).build().await.map_err(|e| error::map(e, &doing, false))?;
                (None, Arc::new(db), None, true)
            }
            Target::Remote { url, auth_token } => {
                let db = open_remote(url, auth_token, &doing).await?;
                (None, Arc::new(db), None, false)
            }
            Target::Replica { path, url, auth_token, sync_interval } => {
                let (replica, primary) =
                    open_replica(path, url, auth_token, *sync_interval, &settings, &*clock, &doing).await?;
                let replica = Arc::new(replica);
                (Some(primary), replica.clone(), Some(replica), true)
            }
        };
        let remote_writes = write_db.is_some() || !local_file;
        let local_writes = !remote_writes;
        let readers = Pool {
            db: read_db,
            batch: batch_everywhere || !local_file,
            idle: Mutex::new(Vec::new()),
            max_idle: settings.read_connections,
            local_file,
            settings: settings.clone(),
        };
        let writer_conn = {
            let db = write_db.as_ref().unwrap_or(&*readers.db);
            let conn = db.connect().map_err(|e| error::map(e, &doing, false))?;
            if matches!(target, Target::Local { .. }) {
                conn.busy_timeout(settings.busy_timeout).map_err(|e| error::map(e, &doing, false))?;
            }
            Conn::new(conn, batch_everywhere || remote_writes)
        };
        let inner = Inner {
            target,
            settings,
            clock,
            writer: tokio::sync::Mutex::new(writer_conn),
            local_writes,
            readers,
            replica,
            _primary: write_db,
        };
        let store = LibsqlStore { inner: Arc::new(inner) };
        store.init(&doing).await?;
        Ok(store)
    }
}

async fn open_remote(url: &str, token: &AuthToken, doing: &str) -> Result<libsql::Database> {
    #[cfg(feature = "remote")]
    {
        libsql::Builder::new_remote(url.to_string(), token.expose().to_string())
            .build()
            .await
            .map_err(|e| error::map(e, doing, false))
    }
    #[cfg(not(feature = "remote"))]
    {
        let _ = (url, token);
        Err(Error::invalid(format!(
            "{doing}: remote primaries need dotdo-libsql's `remote` feature (it is not enabled in this build)"
        )))
    }
}

async fn open_replica(
    path: &std::path::Path,
    url: &str,
    token: &AuthToken,
    sync_interval: Option<Duration>,
    settings: &LibsqlSettings,
    clock: &dyn Clock,
    doing: &str,
) -> Result<(libsql::Database, libsql::Database)> {
    #[cfg(feature = "replica")]
    {
        let primary = open_remote(url, token, doing).await?;
        let mut attempt = 0;
        loop {
            let mut b = libsql::Builder::new_remote_replica(path, url.to_string(), token.expose().to_string())
                .read_your_writes(true);
            if let Some(d) = sync_interval {
                b = b.sync_interval(d);
            }
            match b.build().await {
                Ok(replica) => return Ok((replica, primary)),
                Err(e) => {
                    let class = class_of(&e);
                    if is_transient(class, false) && attempt < settings.retries {
                        attempt += 1;
                        clock.sleep(settings.backoff(attempt)).await;
                        continue;
                    }
                    return Err(map_class(class, e, doing, false));
                }
            }
        }
    }
    #[cfg(not(feature = "replica"))]
    {
        let _ = (path, url, token, sync_interval, settings, clock);
        Err(Error::invalid(format!(
            "{doing}: embedded replicas need dotdo-libsql's `replica` feature (it is not enabled in this build)"
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// SQL

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
/// `?2` (the presented token) is below the object's maximum.
const FENCED: &str = "EXISTS (SELECT 1 FROM do_objects f WHERE f.do_id = ?1 AND f.max_token > ?2)";
/// The object's effective last sequence number (0 if unknown).
const LAST: &str = concat!("coalesce((SELECT ", eff_last!("o"), " FROM do_objects o WHERE o.do_id = ?1), 0)");
/// `-max_token` if `?2` is stale (a fenced call), for result codes.
const MINUS_MAX: &str = "-(SELECT max_token FROM do_objects WHERE do_id = ?1)";
/// Raise only (never lower) and only when the token is not stale: the first step of a write.
const RAISE_IF_CURRENT: &str =
    "INSERT INTO do_objects (do_id, last_seq, truncated_through, max_token) VALUES (?1, 0, 0, ?2) \
     ON CONFLICT (do_id) DO UPDATE SET max_token = excluded.max_token WHERE excluded.max_token > do_objects.max_token";
/// Append one change with the next sequence number, only if the token is current.
const LOG: &str = concat!(
    "INSERT INTO do_changes (do_id, seq, key, op, value, token, ts, type) SELECT ?1, ",
    eff_last!("o"),
    " + 1, ?3, ?4, ?5, ?2, ?6, ?7 FROM do_objects o WHERE o.do_id = ?1 AND o.max_token = ?2"
);
/// Upsert the state of the change just logged, only if the token is current.
const PUT: &str = "INSERT INTO do_state (do_id, key, value, seq) \
     SELECT ?1, ?3, ?4, (SELECT max(seq) FROM do_changes c WHERE c.do_id = ?1) \
     FROM do_objects o WHERE o.do_id = ?1 AND o.max_token = ?2 \
     ON CONFLICT (do_id, key) DO UPDATE SET value = excluded.value, seq = excluded.seq";
const DEL: &str = "DELETE FROM do_state WHERE do_id = ?1 AND key = ?3 \
     AND EXISTS (SELECT 1 FROM do_objects o WHERE o.do_id = ?1 AND o.max_token = ?2)";
/// The result of a write: `-max_token` if fenced, else the effective last sequence number.
const WRITE_RESULT: &str = concat!(
    "SELECT coalesce((SELECT CASE WHEN o.max_token > ?2 THEN -o.max_token ELSE ",
    eff_last!("o"),
    " END FROM do_objects o WHERE o.do_id = ?1), 0)"
);
/// The object has changes cold storage has not acknowledged.
const PENDING: &str =
    concat!("EXISTS (SELECT 1 FROM do_objects p WHERE p.do_id = ?1 AND ", eff_last!("p"), " > p.truncated_through)");
const LEASE_ROW: &str = "SELECT node_id, fencing_token, acquired_at, expires_at FROM do_locks WHERE do_id = ?1";

fn text(v: Option<&Value>) -> libsql::Result<String> {
    match v {
        Some(Value::Text(s)) => Ok(s.clone()),
        Some(Value::Blob(b)) => String::from_utf8(b.clone()).map_err(|_| libsql::Error::InvalidColumnType),
        _ => Err(libsql::Error::InvalidColumnType),
    }
}

fn int(v: Option<&Value>) -> libsql::Result<i64> {
    match v {
        Some(Value::Integer(i)) => Ok(*i),
        Some(Value::Null) => Ok(0),
        _ => Err(libsql::Error::InvalidColumnType),
    }
}

fn uint(v: Option<&Value>) -> libsql::Result<u64> {
    u64::try_from(int(v)?).map_err(|_| libsql::Error::InvalidColumnType)
}

fn blob(v: Option<&Value>) -> libsql::Result<Vec<u8>> {
    match v {
        Some(Value::Blob(b)) => Ok(b.clone()),
        Some(Value::Text(s)) => Ok(s.clone().into_bytes()),
        Some(Value::Null) => Ok(Vec::new()),
        _ => Err(libsql::Error::InvalidColumnType),
    }
}

fn t(s: &str) -> Value {
    Value::Text(s.to_string())
}

fn i(v: u64) -> Value {
    Value::Integer(i64::try_from(v).unwrap_or(i64::MAX))
}

fn lease_row(rows: &[Row]) -> libsql::Result<Option<LeaseRow>> {
    let Some(r) = rows.first() else { return Ok(None) };
    let node = text(r.first())?;
    Ok(NodeId::new(node).ok().map(|holder| LeaseRow {
        holder,
        token: FencingToken::new(uint(r.get(1)).unwrap_or(0)),
        acquired_at: Timestamp::from_micros(int(r.get(2)).unwrap_or(0)),
        expires_at: Timestamp::from_micros(int(r.get(3)).unwrap_or(0)),
    }))
}

fn check_token_nonzero(token: FencingToken) -> Result<()> {
    if token == FencingToken::NONE {
        return Err(Error::invalid("fencing token NONE is never valid for a write"));
    }
    Ok(())
}

fn range_sql(range: &KeyRange) -> (String, Vec<Value>) {
    let mut sql = String::from("SELECT key, value, seq FROM do_state WHERE do_id = ?1");
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
    sql.push_str(&format!(" ORDER BY key LIMIT ?{}", args.len() + 2));
    (sql, args)
}

// ---------------------------------------------------------------------------------------------

impl LibsqlStore {
    /// A builder for a local database file at `path` (created if missing).
    pub fn local(path: impl Into<PathBuf>) -> LibsqlStoreBuilder {
        Self::builder(Target::Local { path: path.into() })
    }

    /// A builder for a remote primary: `libsql://<db>.turso.io` (or `https://…`, or `http://…`
    /// for a local sqld) with an auth token (empty for an sqld without auth). Needs the `remote`
    /// feature to open.
    pub fn remote(url: impl Into<String>, auth_token: impl Into<AuthToken>) -> LibsqlStoreBuilder {
        Self::builder(Target::Remote { url: url.into(), auth_token: auth_token.into() })
    }

    /// A builder for an embedded replica at `path` of the primary at `url`: reads are served from
    /// the local file, writes (with their fencing check) run on the primary, and the replica pulls
    /// after each write and every `sync_interval` (if given). Needs the `replica` feature to open.
    pub fn replica(
        path: impl Into<PathBuf>,
        url: impl Into<String>,
        auth_token: impl Into<AuthToken>,
        sync_interval: Option<Duration>,
    ) -> LibsqlStoreBuilder {
        Self::builder(Target::Replica {
            path: path.into(),
            url: url.into(),
            auth_token: auth_token.into(),
            sync_interval,
        })
    }

    /// A builder for any [`Target`].
    pub fn builder(target: Target) -> LibsqlStoreBuilder {
        LibsqlStoreBuilder { target, settings: LibsqlSettings::default(), clock: None }
    }

    /// Where the database lives.
    pub fn target(&self) -> &Target {
        &self.inner.target
    }

    /// The settings in force.
    pub fn settings(&self) -> &LibsqlSettings {
        &self.inner.settings
    }

    /// Run `PRAGMA integrity_check` (on the local file, the replica file, or the primary);
    /// `Corrupt` with SQLite's report if it is not `ok`.
    pub async fn integrity_check(&self) -> Result<()> {
        let report: Vec<Row> = self
            .read("integrity check", |c| {
                Box::pin(async move { Ok(c.query(Step::new("PRAGMA integrity_check", vec![])).await?) })
            })
            .await?;
        let lines: Vec<String> = report.iter().map(|r| text(r.first()).unwrap_or_else(|_| format!("{r:?}"))).collect();
        if lines == ["ok"] {
            Ok(())
        } else {
            Err(Error::corrupt(format!(
                "{}: integrity check failed: {}",
                self.inner.target.describe(),
                lines.join("; ")
            )))
        }
    }

    /// Pull the embedded replica up to date with the primary now (a no-op in the other modes).
    pub async fn sync(&self) -> Result<()> {
        self.sync_replica().await
    }

    async fn sync_replica(&self) -> Result<()> {
        #[cfg(feature = "replica")]
        if let Some(db) = &self.inner.replica {
            let settings = &self.inner.settings;
            let mut attempt = 0;
            loop {
                match db.sync().await {
                    Ok(_) => return Ok(()),
                    Err(e) => {
                        let class = class_of(&e);
                        if is_transient(class, false) && attempt < settings.retries {
                            attempt += 1;
                            self.inner.clock.sleep(settings.backoff(attempt)).await;
                            continue;
                        }
                        return Err(map_class(class, e, "syncing the replica", false));
                    }
                }
            }
        }
        Ok(())
    }

    /// Create the schema if needed; refuse a newer schema version.
    async fn init(&self, doing: &str) -> Result<()> {
        if let Target::Local { .. } = self.inner.target {
            let s = &self.inner.settings;
            let sync = match s.durability {
                Durability::Normal => "NORMAL",
                Durability::Full => "FULL",
            };
            let pragmas = vec![
                Step::new("PRAGMA journal_mode = WAL", vec![]),
                Step::new(format!("PRAGMA synchronous = {sync}"), vec![]),
                Step::new(format!("PRAGMA wal_autocheckpoint = {}", s.wal_autocheckpoint_pages), vec![]),
                Step::new("PRAGMA foreign_keys = OFF", vec![]),
            ];
            self.with_writer(doing, false, move |c| {
                let pragmas = pragmas.clone();
                Box::pin(async move { Ok(c.run_all(pragmas).await.map(|_| ())?) })
            })
            .await?;
        }
        let describe = self.inner.target.describe();
        self.with_writer(doing, true, move |c| {
            let describe = describe.clone();
            Box::pin(async move {
                let version =
                    int(c.query(Step::new("PRAGMA user_version", vec![])).await?.first().and_then(|r| r.first()))?;
                if version > schema::VERSION {
                    return Err(Error::corrupt(format!(
                        "{describe}: schema version {version} is newer than this library's {}",
                        schema::VERSION
                    ))
                    .into());
                }
                if version < schema::VERSION {
                    let mut steps: Vec<Step> = schema::CREATE
                        .split(';')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| Step::exec(s.to_string(), vec![]))
                        .collect();
                    steps.push(Step::new(format!("PRAGMA user_version = {}", schema::VERSION), vec![]));
                    c.run_program(Program { steps, result: None }).await?;
                }
                Ok(())
            })
        })
        .await?;
        if !self.inner.target_is_local() {
            self.sync_replica().await?;
        }
        Ok(())
    }

    /// Run `f` on the write connection, retrying transient failures with backoff on the clock.
    async fn with_writer<T: Send>(
        &self,
        doing: &str,
        mutating: bool,
        f: impl for<'c> Fn(&'c mut Conn) -> BoxFuture<'c, TxResult<T>> + Send + Sync,
    ) -> Result<T> {
        let settings = &self.inner.settings;
        let mut attempt = 0;
        loop {
            let out = {
                let mut conn = self.inner.writer.lock().await;
                self.drive(self.inner.local_writes, f(&mut conn)).await
            };
            match out {
                Ok(v) => return Ok(v),
                Err(TxError::Api(e)) => return Err(e),
                Err(TxError::Sql(e)) => {
                    let class = class_of(&e);
                    if is_transient(class, mutating) && attempt < settings.retries {
                        attempt += 1;
                        tracing::debug!(doing, attempt, error = %e, "transient libsql failure; retrying");
                        self.inner.clock.sleep(settings.backoff(attempt)).await;
                        continue;
                    }
                    let err = map_class(class, e, doing, mutating);
                    return Err(if attempt > 0 { err.context(format!("after {attempt} retries")) } else { err });
                }
            }
        }
    }

    /// A mutating call: [`with_writer`](Self::with_writer), then pull the replica.
    async fn write_call<T: Send>(
        &self,
        doing: &str,
        f: impl for<'c> Fn(&'c mut Conn) -> BoxFuture<'c, TxResult<T>> + Send + Sync,
    ) -> Result<T> {
        let out = self.with_writer(doing, true, f).await;
        if out.is_ok() && self.inner.replica.is_some() {
            if let Err(e) = self.sync_replica().await {
                // The write is committed on the primary; only its local visibility is late.
                tracing::warn!(error = %e, "{doing}: committed on the primary, but the replica could not pull it yet");
            }
        }
        out
    }

    /// Run `f` on a read connection, retrying transient failures with backoff on the clock.
    async fn read<T: Send>(
        &self,
        doing: &str,
        f: impl for<'c> Fn(&'c mut Conn) -> BoxFuture<'c, TxResult<T>> + Send + Sync,
    ) -> Result<T> {
        let settings = &self.inner.settings;
        let pool = &self.inner.readers;
        let mut attempt = 0;
        loop {
            let mut conn = match pool.take() {
                Some(c) => c,
                None => pool.connect().await.map_err(|e| error::map(e, doing, false))?,
            };
            let out = self.drive(pool.local_file, f(&mut conn)).await;
            match out {
                Ok(v) => {
                    pool.give_back(conn);
                    return Ok(v);
                }
                Err(TxError::Api(e)) => {
                    pool.give_back(conn);
                    return Err(e);
                }
                Err(TxError::Sql(e)) => {
                    let class = class_of(&e);
                    if is_transient(class, false) && attempt < settings.retries {
                        attempt += 1;
                        self.inner.clock.sleep(settings.backoff(attempt)).await;
                        continue;
                    }
                    let err = map_class(class, e, doing, false);
                    return Err(if attempt > 0 { err.context(format!("after {attempt} retries")) } else { err });
                }
            }
        }
    }
}

impl LibsqlStore {
    /// Await `fut`. Calls on a local file run SQLite on the calling thread (libsql's local API is
    /// synchronous inside its async functions, and may wait up to `busy_timeout` for a lock), so
    /// on a multi-threaded tokio runtime they run under `block_in_place`: tokio moves the
    /// worker's other tasks elsewhere instead of stalling them. Remote calls are truly async.
    async fn drive<T>(&self, local: bool, fut: BoxFuture<'_, T>) -> T {
        use tokio::runtime::{Handle, RuntimeFlavor};
        if local {
            if let Ok(h) = Handle::try_current() {
                if h.runtime_flavor() == RuntimeFlavor::MultiThread {
                    return tokio::task::block_in_place(move || h.block_on(fut));
                }
            }
        }
        fut.await
    }
}

impl Inner {
    fn target_is_local(&self) -> bool {
        matches!(self.target, Target::Local { .. })
    }
}

#[async_trait]
impl HotStore for LibsqlStore {
    async fn write(&self, object: &ObjectId, token: FencingToken, batch: WriteBatch) -> Result<WriteReceipt> {
        batch.validate()?;
        check_token_nonzero(token)?;
        let now = self.inner.clock.now().as_micros();
        let n = batch.ops.len() as u64;
        // One program, one transaction, one round trip: raise the token maximum if the token is
        // newer, apply every operation only if the token equals the maximum, report the outcome.
        let (o, tk) = (t(object.as_str()), i(token.get()));
        let mut steps = Vec::with_capacity(1 + 2 * batch.ops.len());
        steps.push(Step::exec(RAISE_IF_CURRENT, vec![o.clone(), tk.clone()]));
        let type_name = t(&batch.type_name);
        for op in &batch.ops {
            let (key, code, value) = match op {
                WriteOp::Put { key, value } => (key, 0, Value::Blob(value.to_vec())),
                WriteOp::Delete { key } => (key, 1, Value::Blob(Vec::new())),
            };
            let k = t(key);
            let log = vec![
                o.clone(),
                tk.clone(),
                k.clone(),
                Value::Integer(code),
                value.clone(),
                Value::Integer(now),
                type_name.clone(),
            ];
            steps.push(Step::exec(LOG, log));
            steps.push(match op {
                WriteOp::Put { .. } => Step::exec(PUT, vec![o.clone(), tk.clone(), k, value]),
                WriteOp::Delete { .. } => Step::exec(DEL, vec![o.clone(), tk.clone(), k]),
            });
        }
        let result = Step::new(WRITE_RESULT, vec![o, tk]);
        let steps = Arc::new(steps);
        let object = object.clone();
        let r = self
            .write_call("write", move |c| {
                let program = Program { steps: steps.to_vec(), result: Some(result.clone()) };
                Box::pin(async move { Ok(c.run_program(program).await?) })
            })
            .await?
            .unwrap_or_default();
        if r < 0 {
            return Err(Error::fenced(&object, token, FencingToken::new(r.unsigned_abs())));
        }
        let last = r.unsigned_abs();
        if last + 1 < n {
            return Err(Error::backend(format!("write to {object}: inconsistent result {r} for {n} operations")));
        }
        Ok(WriteReceipt { first_seq: last + 1 - n, last_seq: last })
    }

    async fn get(&self, object: &ObjectId, key: &str) -> Result<Option<Bytes>> {
        validate_key(key)?;
        let step =
            Step::new("SELECT value FROM do_state WHERE do_id = ?1 AND key = ?2", vec![t(object.as_str()), t(key)]);
        self.read("get", move |c| {
            let step = step.clone();
            Box::pin(async move {
                let rows = c.query(step).await?;
                Ok(rows.first().map(|r| blob(r.first())).transpose()?.map(Bytes::from))
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
        self.read("list", move |c| {
            let step = step.clone();
            Box::pin(async move {
                let rows = c.query(step).await?;
                let out: libsql::Result<Vec<Entry>> = rows
                    .iter()
                    .map(|r| {
                        Ok(Entry { key: text(r.first())?, value: Bytes::from(blob(r.get(1))?), seq: uint(r.get(2))? })
                    })
                    .collect();
                Ok(out?)
            })
        })
        .await
    }

    async fn read_changes(&self, object: &ObjectId, after: Seq, limit: usize) -> Result<Vec<ChangeRecord>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let step = Step::new(
            "SELECT seq, key, op, value, token, ts, type FROM do_changes WHERE do_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            vec![t(object.as_str()), i(after), Value::Integer(limit)],
        );
        let rows = self
            .read("read changes", move |c| {
                let step = step.clone();
                Box::pin(async move { Ok(c.query(step).await?) })
            })
            .await?;
        let describe = self.inner.target.describe();
        rows.iter()
            .map(|r| {
                let decode = || -> libsql::Result<(u64, String, i64, Vec<u8>, u64, i64, String)> {
                    Ok((
                        uint(r.first())?,
                        text(r.get(1))?,
                        int(r.get(2))?,
                        blob(r.get(3))?,
                        uint(r.get(4))?,
                        int(r.get(5))?,
                        text(r.get(6))?,
                    ))
                };
                let (seq, key, op, value, token, ts, type_name) = decode().map_err(|e| {
                    Error::corrupt(format!("{describe}: undecodable change of {object}")).with_source(e)
                })?;
                let op = match op {
                    0 => Op::Put,
                    1 => Op::Delete,
                    other => {
                        return Err(Error::corrupt(format!(
                            "{describe}: change {seq} of {object} has unknown op code {other}"
                        )))
                    }
                };
                Ok(ChangeRecord {
                    object: object.clone(),
                    seq,
                    key,
                    op,
                    value: Bytes::from(value),
                    token: FencingToken::new(token),
                    timestamp: Timestamp::from_micros(ts),
                    type_name,
                })
            })
            .collect()
    }

    async fn truncate_changes(&self, object: &ObjectId, token: FencingToken, through: Seq) -> Result<()> {
        check_token_nonzero(token)?;
        let (o, tk, th) = (t(object.as_str()), i(token.get()), i(through));
        let p = vec![o, tk, th];
        // Valid: not fenced and `through` not beyond the last sequence number.
        let ok = format!("NOT {FENCED} AND ?3 <= {LAST}");
        let steps = vec![
            Step::exec(
                concat!(
                    "UPDATE do_objects SET truncated_through = ?3, last_seq = max(last_seq, ",
                    eff_last!("do_objects"),
                    ") WHERE do_id = ?1 AND max_token <= ?2 AND ?3 > truncated_through AND ?3 <= ",
                    eff_last!("do_objects")
                ),
                p.clone(),
            ),
            Step::exec(
                "DELETE FROM do_changes WHERE do_id = ?1 AND seq <= ?3 AND EXISTS \
                 (SELECT 1 FROM do_objects o WHERE o.do_id = ?1 AND o.max_token <= ?2 AND o.truncated_through >= ?3)",
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
        // 0: done; < 0: fenced by -code; > 0: `through` is beyond last seq code - 1.
        let result = Step::new(
            format!("SELECT CASE WHEN {FENCED} THEN {MINUS_MAX} WHEN ?3 > {LAST} THEN {LAST} + 1 ELSE 0 END"),
            p,
        );
        let code = self.program("truncate changes", steps, result).await?;
        match code {
            0 => Ok(()),
            c if c < 0 => Err(Error::fenced(object, token, FencingToken::new(c.unsigned_abs()))),
            c => Err(Error::invalid(format!("cannot truncate {object} through seq {through}: last seq is {}", c - 1))),
        }
    }

    async fn object_info(&self, object: &ObjectId) -> Result<Option<ObjectInfo>> {
        let step = Step::new(
            "SELECT max(o.last_seq, coalesce((SELECT max(seq) FROM do_changes c WHERE c.do_id = o.do_id), 0)), \
               o.truncated_through, max(o.max_token, coalesce(l.fencing_token, 0)), \
               (SELECT count(*) FROM do_state s WHERE s.do_id = o.do_id), \
               (SELECT coalesce(sum(length(value)), 0) FROM do_state s WHERE s.do_id = o.do_id) \
             FROM do_objects o LEFT JOIN do_locks l ON l.do_id = o.do_id WHERE o.do_id = ?1",
            vec![t(object.as_str())],
        );
        self.read("object info", move |c| {
            let step = step.clone();
            Box::pin(async move {
                let rows = c.query(step).await?;
                let info = rows
                    .first()
                    .map(|r| -> libsql::Result<ObjectInfo> {
                        Ok(ObjectInfo {
                            last_seq: uint(r.first())?,
                            truncated_through: uint(r.get(1))?,
                            max_token: FencingToken::new(uint(r.get(2))?),
                            keys: uint(r.get(3))?,
                            value_bytes: uint(r.get(4))?,
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
            "SELECT DISTINCT do_id FROM do_changes WHERE do_id > ?1 ORDER BY do_id LIMIT ?2",
            vec![Value::Text(after), Value::Integer(limit)],
        );
        let rows = self
            .read("pending objects", move |c| {
                let step = step.clone();
                Box::pin(async move { Ok(c.query(step).await?) })
            })
            .await?;
        rows.iter()
            .map(|r| {
                let id =
                    text(r.first()).map_err(|e| Error::corrupt("undecodable object id in database").with_source(e))?;
                ObjectId::new(&id).map_err(|e| Error::corrupt(format!("invalid object id {id:?} in database: {e}")))
            })
            .collect()
    }

    async fn evict(&self, object: &ObjectId, token: FencingToken) -> Result<()> {
        check_token_nonzero(token)?;
        let p = vec![t(object.as_str()), i(token.get())];
        let ok = format!("NOT {FENCED} AND NOT {PENDING}");
        let steps = vec![
            Step::exec(format!("DELETE FROM do_state WHERE do_id = ?1 AND {ok}"), p.clone()),
            Step::exec(
                format!(
                    "INSERT INTO do_objects (do_id, last_seq, truncated_through, max_token) SELECT ?1, 0, 0, ?2 WHERE {ok} \
                     ON CONFLICT (do_id) DO UPDATE SET max_token = max(max_token, excluded.max_token)"
                ),
                p.clone(),
            ),
        ];
        let result =
            Step::new(format!("SELECT CASE WHEN {FENCED} THEN {MINUS_MAX} WHEN {PENDING} THEN 1 ELSE 0 END"), p);
        match self.program("evict", steps, result).await? {
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
        check_token_nonzero(token)?;
        for e in &entries {
            validate_key(&e.key)?;
            validate_value(&e.value)?;
        }
        let p = vec![t(object.as_str()), i(token.get()), i(through_seq)];
        // Conflict: pending changes, or a last seq above `through_seq`.
        let conflict = format!("({PENDING} OR {LAST} > ?3)");
        let ok = format!("NOT {FENCED} AND NOT {conflict}");
        let mut steps = vec![
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
        steps.push(Step::exec(
            format!("UPDATE do_objects SET last_seq = ?3, truncated_through = ?3 WHERE do_id = ?1 AND {ok}"),
            p.clone(),
        ));
        let result =
            Step::new(format!("SELECT CASE WHEN {FENCED} THEN {MINUS_MAX} WHEN {conflict} THEN 1 ELSE 0 END"), p);
        match self.program("restore", steps, result).await? {
            0 => Ok(()),
            c if c < 0 => Err(Error::fenced(object, token, FencingToken::new(c.unsigned_abs()))),
            _ => Err(self.pending_conflict(object, &format!("restore through seq {through_seq}")).await),
        }
    }
}

impl LibsqlStore {
    /// Run a program with a result on the primary (a mutating call).
    async fn program(&self, doing: &str, steps: Vec<Step>, result: Step) -> Result<i64> {
        let steps = Arc::new(steps);
        self.write_call(doing, move |c| {
            let program = Program { steps: steps.to_vec(), result: Some(result.clone()) };
            Box::pin(async move { Ok(c.run_program(program).await?) })
        })
        .await?
        .ok_or_else(|| Error::backend(format!("{doing}: the program returned no result")))
    }

    /// A read on the primary (the write connection), for explaining a refusal.
    async fn read_primary(&self, doing: &str, step: Step) -> Result<Vec<Row>> {
        self.with_writer(doing, false, move |c| {
            let step = step.clone();
            Box::pin(async move { Ok(c.query(step).await?) })
        })
        .await
    }

    /// The `Conflict` error of an evict or restore refused for pending changes.
    async fn pending_conflict(&self, object: &ObjectId, doing: &str) -> Error {
        let step = Step::new(
            concat!("SELECT ", eff_last!("o"), ", o.truncated_through FROM do_objects o WHERE o.do_id = ?1"),
            vec![t(object.as_str())],
        );
        let detail = match self.read_primary("read object", step).await {
            Ok(rows) => match rows.first() {
                Some(r) => format!(
                    "hot last seq {} (truncated through {})",
                    uint(r.first()).unwrap_or(0),
                    uint(r.get(1)).unwrap_or(0)
                ),
                None => String::from("unknown state"),
            },
            Err(e) => format!("state unreadable: {e}"),
        };
        Error::new(ErrorKind::Conflict, format!("cannot {doing} {object}: changes not yet in cold storage; {detail}"))
    }

    async fn lease_row_on_primary(&self, object: &ObjectId) -> Result<Option<LeaseRow>> {
        let rows = self.read_primary("read lease", Step::new(LEASE_ROW, vec![t(object.as_str())])).await?;
        lease_row(&rows).map_err(|e| Error::corrupt(format!("undecodable lease row of {object}")).with_source(e))
    }
}

#[async_trait]
impl ConsistencyGuard for LibsqlStore {
    async fn acquire(&self, object: &ObjectId, holder: &NodeId, ttl: Duration) -> Result<Lease> {
        dotdo_core::guard::validate_ttl(ttl)?;
        loop {
            let now = self.inner.clock.now();
            let expires = now.plus(ttl);
            // The same decision as `rules::acquire`, in SQL so that it is one round trip: take the
            // lease if it is free (expired or released), with a token above every token issued.
            let p = vec![
                t(object.as_str()),
                t(holder.as_str()),
                Value::Integer(now.as_micros()),
                Value::Integer(expires.as_micros()),
            ];
            let steps = vec![
                Step::exec(
                    "INSERT INTO do_locks (do_id, node_id, acquired_at, expires_at, fencing_token) \
                     VALUES (?1, ?2, ?3, ?4, 1 + max(coalesce((SELECT fencing_token FROM do_locks WHERE do_id = ?1), 0), \
                     coalesce((SELECT max_token FROM do_objects WHERE do_id = ?1), 0))) \
                     ON CONFLICT (do_id) DO UPDATE SET node_id = excluded.node_id, acquired_at = excluded.acquired_at, \
                     expires_at = excluded.expires_at, fencing_token = excluded.fencing_token WHERE do_locks.expires_at <= ?3",
                    p.clone(),
                ),
                // Runs right after the upsert: `changes()` says whether it took the lease.
                Step::exec(
                    "INSERT INTO do_objects (do_id, last_seq, truncated_through, max_token) \
                     SELECT ?1, 0, 0, fencing_token FROM do_locks WHERE do_id = ?1 AND changes() = 1 \
                     ON CONFLICT (do_id) DO UPDATE SET max_token = max(max_token, excluded.max_token)",
                    p.clone(),
                ),
            ];
            let result = Step::new(
                "SELECT CASE WHEN changes() = 1 THEN (SELECT fencing_token FROM do_locks WHERE do_id = ?1) ELSE -1 END",
                p,
            );
            let token = self.program("acquire lease", steps, result).await?;
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
            let current = self.lease_row_on_primary(object).await?;
            rules::acquire(object, current.as_ref(), holder, ttl, self.inner.clock.now())?;
        }
    }

    async fn refresh(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        dotdo_core::guard::validate_ttl(ttl)?;
        let now = self.inner.clock.now();
        let expires = now.plus(ttl);
        let steps = vec![Step::exec(
            "UPDATE do_locks SET expires_at = ?4 WHERE do_id = ?1 AND fencing_token = ?2 AND node_id = ?3 AND expires_at > ?5",
            vec![
                t(lease.object.as_str()),
                i(lease.token.get()),
                t(lease.holder.as_str()),
                Value::Integer(expires.as_micros()),
                Value::Integer(now.as_micros()),
            ],
        )];
        if self.program("refresh lease", steps, Step::new("SELECT changes()", vec![])).await? == 1 {
            return Ok(Lease { expires_at: expires, ..lease.clone() });
        }
        let row = self.lease_row_on_primary(&lease.object).await?;
        rules::check_current(lease, row.as_ref(), now)?;
        Err(Error::backend("lease refresh changed no row although the lease is current"))
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let now = self.inner.clock.now().as_micros();
        let steps = Arc::new(vec![Step::exec(
            "UPDATE do_locks SET expires_at = ?3 WHERE do_id = ?1 AND fencing_token = ?2 AND expires_at > ?3",
            vec![t(lease.object.as_str()), i(lease.token.get()), Value::Integer(now)],
        )]);
        self.write_call("release lease", move |c| {
            let program = Program { steps: steps.to_vec(), result: None };
            Box::pin(async move { Ok(c.run_program(program).await.map(|_| ())?) })
        })
        .await
    }

    async fn validate(&self, lease: &Lease) -> Result<()> {
        let step = Step::new(LEASE_ROW, vec![t(lease.object.as_str())]);
        let row = self
            .read("validate lease", move |c| {
                let step = step.clone();
                Box::pin(async move { Ok(lease_row(&c.query(step).await?)?) })
            })
            .await?;
        rules::check_current(lease, row.as_ref(), self.inner.clock.now())
    }

    async fn current(&self, object: &ObjectId) -> Result<Option<Lease>> {
        let step = Step::new(LEASE_ROW, vec![t(object.as_str())]);
        let row = self
            .read("read lease", move |c| {
                let step = step.clone();
                Box::pin(async move { Ok(lease_row(&c.query(step).await?)?) })
            })
            .await?;
        let now = self.inner.clock.now();
        Ok(row.filter(|r| now < r.expires_at).map(|r| r.to_lease(object)))
    }
}
