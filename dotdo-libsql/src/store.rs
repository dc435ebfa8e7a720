//! [`LibsqlStore`]: the hot store and the lease guard on one libSQL database (local file, remote
//! primary or embedded replica).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dotdo_core::guard::rules::LeaseRow;
use dotdo_core::{Clock, Error, ErrorKind, ObjectId, Result, SystemClock};
use futures::future::BoxFuture;
use futures::FutureExt;
use parking_lot::Mutex;

use crate::conn::{Conn, Program, Row, Step};
use crate::error::{self, class_of, is_transient, map_class};
use crate::schema;
use crate::settings::{AuthToken, Durability, LibsqlSettings, Target, Transport};
use crate::sql::eff_last;
use crate::sql::*;

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

pub(crate) type TxResult<T> = std::result::Result<T, TxError>;

/// Opens connections of one kind (local file, remote primary, replica file).
struct Pool {
    db: Arc<libsql::Database>,
    batch: bool,
    idle: Mutex<Vec<Conn>>,
    max_idle: usize,
    local_file: bool,
    /// Whether connections get `LibsqlSettings::cache_kib` (a local file, not a replica's: its
    /// connections refuse a `cache_size` with a value).
    page_cache: bool,
    pub(crate) settings: LibsqlSettings,
}

/// What every connection to a local or replica file gets: its busy timeout (a no-op on a
/// replica's: libsql 0.10's replica connections ignore it), and on a local file
/// (`page_cache`) its page cache and the writer's sync settings (the last connection to close
/// runs SQLite's final checkpoint, a reader's too: it must sync as the writer's would).
/// (libsql's replica connections parse each statement and refuse `PRAGMA cache_size = …` as
/// unsupported: every read of a replica would fail.)
async fn local_connection_settings(
    conn: &libsql::Connection,
    settings: &LibsqlSettings,
    page_cache: bool,
) -> libsql::Result<()> {
    conn.busy_timeout(settings.busy_timeout)?;
    if page_cache {
        let (sync, fullfsync) = sync_pragmas(settings.durability);
        conn.execute_batch(&format!(
            "PRAGMA cache_size = -{}; PRAGMA synchronous = {sync}; PRAGMA fullfsync = {fullfsync}; \
             PRAGMA checkpoint_fullfsync = ON;",
            settings.cache_kib
        ))
        .await?;
    }
    Ok(())
}

/// `synchronous` and `fullfsync` for a durability (macOS: a plain fsync does not flush the
/// drive's cache, as in dotdo-sqlite).
fn sync_pragmas(durability: Durability) -> (&'static str, &'static str) {
    match durability {
        Durability::Normal => ("NORMAL", "OFF"),
        Durability::Full => ("FULL", "ON"),
    }
}

impl Pool {
    async fn connect(&self) -> libsql::Result<Conn> {
        let conn = self.db.connect().map_err(|e| if self.local_file { error::local_open_failure(e) } else { e })?;
        if self.local_file {
            local_connection_settings(&conn, &self.settings, self.page_cache).await?;
        }
        let conn = Conn::new(conn, self.batch, !self.local_file);
        // A replica's reader (a local file whose writes go to the primary): no statement reuse.
        Ok(if self.local_file && !self.page_cache { conn.without_statement_reuse() } else { conn })
    }

    fn take(&self) -> Option<Conn> {
        self.idle.lock().pop()
    }

    /// Drop every idle connection.
    fn clear(&self) {
        self.idle.lock().clear();
    }

    fn give_back(&self, conn: Conn) {
        let mut idle = self.idle.lock();
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }
}

pub(crate) struct Inner {
    pub(crate) target: Target,
    settings: LibsqlSettings,
    pub(crate) clock: Arc<dyn Clock>,
    /// The one write connection (on the primary). Writers of this store serialize on it.
    /// Shared with the background checkpoint thread, which takes it for each round (see
    /// `checkpoint::start`).
    writer: Arc<tokio::sync::Mutex<Conn>>,
    /// Whether the write connection is a local file (its calls block; see `drive`).
    local_writes: bool,
    /// Read connections: the local file, the replica file, or the primary.
    readers: Pool,
    /// The embedded replica, pulled after each write so that reads see it.
    #[allow(dead_code)]
    replica: Option<Arc<libsql::Database>>,
    /// Keeps the primary's database handle (remote and replica modes) alive.
    _primary: Option<libsql::Database>,
    /// Set when a pull after a write failed: the replica may lack committed writes (another
    /// holder's, seen by an acquire), so reads pull first until a pull succeeds.
    replica_behind: ReplicaBehind,
    /// Completes when the replica's latest pull task ends: a pull that outlived its caller's
    /// `sync_timeout` is waited for, not joined by another (pulls do not pile up while the
    /// primary hangs).
    #[cfg(feature = "replica")]
    pull_done: parking_lot::Mutex<Option<PullDone>>,
    /// The background checkpoint thread of a local file, stopped when the last clone is dropped.
    /// It also finds the file deleted or replaced by another file (a restored backup renamed
    /// over it; a copy written into the same file is not seen): every call is refused then, as
    /// dotdo-sqlite does.
    checkpointer: std::sync::OnceLock<dotdo_core::sql_schema::CheckpointThread>,
    /// The bound of one remote change read or listing page, shrunk when the primary refuses one
    /// as too large.
    pub(crate) page_bound: crate::hot::PageBound,
}

/// See [`Inner::pull_done`].
#[cfg(feature = "replica")]
type PullDone = futures::future::Shared<BoxFuture<'static, ()>>;

/// Whether the embedded replica may be missing writes committed on the primary: pulls after
/// writes that failed (`marked`) against pulls that caught up since (`pulled`).
#[derive(Debug, Default)]
pub(crate) struct ReplicaBehind {
    marked: std::sync::atomic::AtomicU64,
    pulled: std::sync::atomic::AtomicU64,
    /// One catch-up pull at a time; readers arriving meanwhile wait for it.
    pulling: tokio::sync::Mutex<()>,
    /// Catch-up pulls that failed so far.
    failed: std::sync::atomic::AtomicU64,
    /// The last failed catch-up pull's error (its kind, whether a retry may help, its text), for
    /// the readers that waited for it.
    last_failure: parking_lot::Mutex<Option<(ErrorKind, bool, String)>>,
    /// Readers that passed the up-to-date check and went for the pull lock (test-only count).
    #[cfg(test)]
    queued: std::sync::atomic::AtomicUsize,
}

impl ReplicaBehind {
    /// The replica may miss a committed write (until a pull that starts after this): the mark's
    /// number, for [`pulled_through`](Self::pulled_through).
    pub(crate) fn mark(&self) -> u64 {
        self.marked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
    }

    /// A guard that marks the replica behind if it is dropped before [`MarkIfDropped::disarm`]:
    /// held across a write to the primary, whose caller may stop waiting (its future dropped)
    /// after the primary committed it. Unmarked, the next read used the replica without pulling
    /// and missed this store's own write.
    pub(crate) fn mark_if_dropped(&self) -> MarkIfDropped<'_> {
        MarkIfDropped(Some(self))
    }

    /// Run `pull`, a pull that starts when awaited (`sync_replica` waits for a pull still
    /// running, then starts its own): once it succeeds, the writes marked before it are local.
    pub(crate) async fn pull_now(&self, pull: impl std::future::Future<Output = Result<()>>) -> Result<()> {
        let through = self.marked.load(std::sync::atomic::Ordering::SeqCst);
        pull.await?;
        self.pulled_through(through);
        Ok(())
    }

    /// A pull that started after mark `m` succeeded: the writes of marks up to `m` are local.
    pub(crate) fn pulled_through(&self, m: u64) {
        self.pulled.fetch_max(m, std::sync::atomic::Ordering::SeqCst);
    }

    /// Before a read: if the replica may be behind, run `pull` (or wait for the pull another
    /// reader runs); an error leaves it behind and is returned, so nothing is read from a
    /// replica that may miss committed writes. A reader that waited for another's pull which
    /// failed fails with it (its kind, retryable or not) instead of pulling again: readers
    /// queued behind a hung replication endpoint each waited out a whole pull, one after another.
    pub(crate) async fn catch_up<F: std::future::Future<Output = Result<()>>>(&self, pull: F) -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.marked.load(SeqCst) <= self.pulled.load(SeqCst) {
            return Ok(());
        }
        let failed_before = self.failed.load(SeqCst);
        #[cfg(test)]
        self.queued.fetch_add(1, SeqCst);
        let _one = self.pulling.lock().await;
        let target = self.marked.load(SeqCst);
        if target <= self.pulled.load(SeqCst) {
            return Ok(()); // another reader caught up meanwhile
        }
        if self.failed.load(SeqCst) != failed_before {
            let (kind, retryable, text) = self.last_failure.lock().clone().unwrap_or((
                ErrorKind::Unavailable,
                true,
                "no error recorded".to_string(),
            ));
            return Err(Error::new(
                kind,
                format!(
                    "the replica missed writes committed on the primary, and the pull another read ran meanwhile \
                     failed: {text}"
                ),
            )
            .with_retryable(retryable));
        }
        if let Err(e) = pull.await {
            *self.last_failure.lock() = Some((e.kind().clone(), e.is_retryable(), e.to_string()));
            self.failed.fetch_add(1, SeqCst);
            return Err(e.context("the replica missed writes committed on the primary and could not pull them"));
        }
        self.pulled.fetch_max(target, SeqCst);
        Ok(())
    }
}

/// See [`ReplicaBehind::mark_if_dropped`].
pub(crate) struct MarkIfDropped<'a>(Option<&'a ReplicaBehind>);

impl MarkIfDropped<'_> {
    /// The write ended (its outcome is handled by the caller): nothing to mark.
    pub(crate) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for MarkIfDropped<'_> {
    fn drop(&mut self) {
        if let Some(behind) = self.0 {
            behind.mark();
        }
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibsqlStore")
            .field("target", &self.target)
            .field("settings", &self.settings)
            .field("background_checkpoints", &self.checkpointer.get().is_some())
            .finish()
    }
}

/// [`HotStore`](dotdo_core::HotStore) + [`ConsistencyGuard`](dotdo_core::ConsistencyGuard) on one libSQL database: a local file, a remote primary
/// (Turso / sqld) or an embedded replica of one.
///
/// Same schema and semantics as dotdo-sqlite. The lease table (`do_locks`), per-object counters,
/// state and change log share one database, so the fencing-token check and the write are a single
/// transaction **on the primary**; a fenced write is one round trip to a remote primary. Cheap to
/// clone; clones share connections.
///
/// Dropping the last clone stops the background checkpoint thread and closes the database on
/// the dropping thread (SQLite's closing checkpoint and fsync included): drop it outside the
/// async executor's threads (in `spawn_blocking`, or after the runtime) if that matters.
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
    pub(crate) inner: Arc<Inner>,
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
    /// Retry backoff always sleeps in real time, not on this clock.
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
        if let Target::Local { .. } = self.target {
            // Checkpointing is this store's to do on a local file (a replica's is libsql's).
            let s = &self.settings;
            dotdo_core::sql_schema::validate_checkpointing(s.wal_autocheckpoint_pages, s.background_checkpoint)?;
            dotdo_core::sql_schema::validate_cache_kib(s.cache_kib)?;
        }
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
        // `opened`: a local target's file, by the absolute name it was opened by.
        // `creating`: a local file's database as its writer opens it (creating the file).
        let mut creating = None;
        let (write_db, read_db, replica, local_file, opened) = match &target {
            Target::Local { path } => {
                // Absolute: read connections open lazily, and must open the writer's file even if
                // the process changes its working directory meanwhile.
                let path = dotdo_core::sql_schema::absolute_database_path(path)?;
                let failed = |e| error::map(error::local_open_failure(e), &doing, false);
                creating = Some(libsql::Builder::new_local(&path).build().await.map_err(failed)?);
                // Readers (and the checkpoint connection) open the file the writer made, never
                // create one: a read opening a connection after the file was deleted created an
                // empty database in its place and failed on its missing tables (`Backend`), where
                // dotdo-sqlite's answers the file cannot be opened.
                let no_create = dotdo_core::sql_schema::without_create_mode(&path);
                let db = libsql::Builder::new_local(&no_create)
                    .flags(libsql::OpenFlags::SQLITE_OPEN_READ_WRITE)
                    .build()
                    .await
                    .map_err(failed)?;
                (None, Arc::new(db), None, true, Some(path))
            }
            Target::Remote { url, auth_token } => {
                // The validated form: trimmed, scheme in lower case (libsql needs both).
                let db = open_remote(&crate::validate_url(url)?, auth_token, &settings, &doing).await?;
                (None, Arc::new(db), None, false, None)
            }
            Target::Replica { path, url, auth_token, sync_interval } => {
                let path = dotdo_core::sql_schema::absolute_database_path(path)?;
                let (replica, primary) =
                    open_replica(&path, &crate::validate_url(url)?, auth_token, *sync_interval, &settings, &doing)
                        .await?;
                let replica = Arc::new(replica);
                (Some(primary), replica.clone(), Some(replica), true, None)
            }
        };
        let remote_writes = write_db.is_some() || !local_file;
        // Exactly the `Target::Local` case (a replica writes to its primary).
        let local_writes = !remote_writes;
        let readers = Pool {
            db: read_db,
            batch: batch_everywhere || !local_file,
            idle: Mutex::new(Vec::new()),
            max_idle: settings.read_connections,
            local_file,
            page_cache: local_writes,
            settings: settings.clone(),
        };
        let writer_conn = {
            let db = write_db.as_ref().or(creating.as_ref()).unwrap_or(&*readers.db);
            let local = local_writes;
            let conn = db
                .connect()
                .map_err(|e| error::map(if local { error::local_open_failure(e) } else { e }, &doing, false))?;
            if local {
                // Its pragmas read the schema: they wait on another process holding the file
                // (recovering a large WAL after a crash), retried as every statement is (they
                // failed the open after one busy timeout, where dotdo-sqlite's retries).
                let mut attempt = 0;
                loop {
                    match local_connection_settings(&conn, &settings, true).await {
                        Ok(()) => break,
                        Err(e) if is_transient(class_of(&e), false) && attempt < settings.retries => {
                            attempt += 1;
                            retry_pause(settings.backoff(attempt)).await;
                        }
                        Err(e) => return Err(error::map(e, &doing, false)),
                    }
                }
            }
            Conn::new(conn, batch_everywhere || remote_writes, remote_writes)
        };
        let inner = Inner {
            target,
            settings,
            clock,
            writer: Arc::new(tokio::sync::Mutex::new(writer_conn)),
            local_writes,
            readers,
            replica,
            _primary: write_db,
            replica_behind: ReplicaBehind::default(),
            #[cfg(feature = "replica")]
            pull_done: parking_lot::Mutex::new(None),
            checkpointer: std::sync::OnceLock::new(),
            page_bound: crate::hot::PageBound::default(),
        };
        let store = LibsqlStore { inner: Arc::new(inner) };
        store.init(&doing).await?;
        // After init: the file is in WAL mode with dotdo's schema.
        let inner = &store.inner;
        if let (Target::Local { path }, Some(opened), Some(every)) =
            (&inner.target, &opened, inner.settings.background_checkpoint)
        {
            if !every.is_zero() && !dotdo_core::sql_schema::is_private_database(path) {
                let shown = path.display().to_string();
                // By the absolute name the file was opened by: a relative one would be looked up
                // in whatever the working directory is by then.
                let watch = dotdo_core::sql_schema::FileWatch::new(opened);
                let started = crate::checkpoint::start(
                    &inner.readers.db,
                    inner.settings.busy_timeout,
                    every,
                    shown,
                    watch,
                    inner.writer.clone(),
                )
                .await?;
                let _ = inner.checkpointer.set(started);
            }
        }
        Ok(store)
    }
}

async fn open_remote(url: &str, token: &AuthToken, settings: &LibsqlSettings, doing: &str) -> Result<libsql::Database> {
    #[cfg(feature = "remote")]
    {
        libsql::Builder::new_remote(url.to_string(), token.expose().to_string())
            .connector(connector(url, settings, doing)?)
            .build()
            .await
            .map_err(|e| error::map(e, doing, false))
    }
    #[cfg(not(feature = "remote"))]
    {
        let _ = (url, token, settings);
        Err(Error::invalid(format!(
            "{doing}: remote primaries need dotdo-libsql's `remote` feature (it is not enabled in this build)"
        )))
    }
}

/// The HTTP connector of remote primaries: libsql's own (native root certificates, HTTP/1,
/// `TCP_NODELAY`, `http://` allowed) with a TCP connect timeout of half of `request_timeout`
/// (DNS and the TLS handshake are not bounded by it).
/// libsql's has none: a primary that drops packets (a firewall, a host gone) kept a connect
/// waiting until `request_timeout`, whose error cannot tell an unsent request from a sent one,
/// so every write was `AmbiguousOutcome`. A connect that times out is "error trying to
/// connect": nothing was sent, a retryable `Unavailable`.
#[cfg(feature = "remote")]
fn connector(
    url: &str,
    settings: &LibsqlSettings,
    doing: &str,
) -> Result<hyper_rustls_025::HttpsConnector<hyper_014::client::HttpConnector>> {
    let mut http = hyper_014::client::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some((settings.request_timeout / 2).max(Duration::from_millis(1))));
    let config = rustls_022::ClientConfig::builder()
        .with_root_certificates(root_certificates(url, doing)?)
        .with_no_client_auth();
    Ok(hyper_rustls_025::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

/// The platform's root certificates (`SSL_CERT_FILE` / `SSL_CERT_DIR` when set), loaded here:
/// hyper-rustls 0.25's `with_native_roots` panics when those name a path it cannot read (an
/// `open` that panicked). A plain `http://` primary needs none: it opens without them (a local
/// sqld in an image with no certificate store failed to open). For a TLS primary, none found
/// is a non-retryable `Backend` error naming the variables.
#[cfg(feature = "remote")]
fn root_certificates(url: &str, doing: &str) -> Result<rustls_022::RootCertStore> {
    let mut roots = rustls_022::RootCertStore::empty();
    if url.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("http://")) {
        return Ok(roots);
    }
    let failure = match rustls_native_certs_07::load_native_certs() {
        Ok(certs) => {
            // Certificates the store cannot parse are skipped, as hyper-rustls does.
            for cert in certs {
                let _ = roots.add(cert);
            }
            None
        }
        Err(e) => Some(e.to_string()),
    };
    if roots.is_empty() {
        let why = failure.unwrap_or_else(|| "none found".to_string());
        return Err(Error::backend(format!(
            "{doing}: the platform's root certificates could not be loaded ({why}); install a CA \
             certificate store, or point SSL_CERT_FILE / SSL_CERT_DIR at one"
        ))
        .with_retryable(false));
    }
    Ok(roots)
}

async fn open_replica(
    path: &std::path::Path,
    url: &str,
    token: &AuthToken,
    sync_interval: Option<Duration>,
    settings: &LibsqlSettings,
    doing: &str,
) -> Result<(libsql::Database, libsql::Database)> {
    #[cfg(feature = "replica")]
    {
        let primary = open_remote(url, token, settings, doing).await?;
        let mut attempt = 0;
        loop {
            let mut b = libsql::Builder::new_remote_replica(path, url.to_string(), token.expose().to_string())
                .connector(connector(url, settings, doing)?)
                .read_your_writes(true);
            if let Some(d) = sync_interval {
                b = b.sync_interval(d);
            }
            // Bounded like a pull: nothing of a replica that is still being built is kept.
            let built =
                match futures::future::select(Box::pin(b.build()), SystemClock::new().sleep(settings.sync_timeout))
                    .await
                {
                    futures::future::Either::Left((r, _)) => r,
                    futures::future::Either::Right(_) => {
                        return Err(Error::unavailable(format!(
                            "{doing}: no answer from the primary within sync_timeout ({:?})",
                            settings.sync_timeout
                        )))
                    }
                };
            match built {
                Ok(replica) => return Ok((replica, primary)),
                Err(e) => {
                    let class = class_of(&e);
                    if is_transient(class, false) && attempt < settings.retries {
                        attempt += 1;
                        retry_pause(settings.backoff(attempt)).await;
                        continue;
                    }
                    let err = map_class(class, e, doing, false);
                    // A damaged replica file: name it, as every Corrupt error does.
                    return Err(if err.kind() == &ErrorKind::Corrupt { err.context(path.display()) } else { err });
                }
            }
        }
    }
    #[cfg(not(feature = "replica"))]
    {
        let _ = (path, url, token, sync_interval, settings);
        Err(Error::invalid(format!(
            "{doing}: embedded replicas need dotdo-libsql's `replica` feature (it is not enabled in this build)"
        )))
    }
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

    /// Run `PRAGMA integrity_check` (on the local file, or on the primary); `Corrupt` with
    /// SQLite's report if it is not `ok`. In remote mode it is a read like any other: each try
    /// is bounded by `request_timeout` and retried (a check of a large database may need a
    /// larger `request_timeout`, or ends `Unavailable`). In embedded-replica mode libsql sends
    /// the pragma to the primary whatever the connection, with no timeout: a check of a large
    /// database takes as long as it takes.
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
    /// Reads that were to pull first (a write's own pull failed) need not pull again after it.
    pub async fn sync(&self) -> Result<()> {
        self.inner.replica_behind.pull_now(self.sync_replica()).await
    }

    async fn sync_replica(&self) -> Result<()> {
        #[cfg(feature = "replica")]
        if let Some(db) = &self.inner.replica {
            let settings = &self.inner.settings;
            let mut attempt = 0;
            loop {
                // Not bounded by `request_timeout` (a pull is many requests; a long catch-up is
                // legitimate) but by `sync_timeout`, and never dropped midway (libsql's replicator
                // is not made for that): the pull runs as a task of its own, which a call that
                // stops waiting leaves running.
                let timed_out = || {
                    Error::unavailable(format!(
                        "syncing the replica: no answer from the primary within sync_timeout ({:?}); the pull goes \
                         on in the background",
                        settings.sync_timeout
                    ))
                };
                let pulled = match tokio::runtime::Handle::try_current() {
                    Ok(h) => {
                        let mut budget = SystemClock::new().sleep(settings.sync_timeout);
                        // A pull still running (one whose caller stopped waiting) ends first: this
                        // call's pull must start after its write, and pulls must not pile up. The
                        // check and the claim are one step under the lock.
                        let (done_tx, done_rx) = futures::channel::oneshot::channel::<()>();
                        let mut mine = Some(done_rx.map(|_| ()).boxed().shared());
                        loop {
                            let earlier = {
                                let mut slot = self.inner.pull_done.lock();
                                match slot.clone().filter(|d| d.peek().is_none()) {
                                    Some(running) => Some(running),
                                    None => {
                                        *slot = mine.take();
                                        None
                                    }
                                }
                            };
                            let Some(earlier) = earlier else { break };
                            if let futures::future::Either::Right(_) =
                                futures::future::select(earlier, &mut budget).await
                            {
                                return Err(Error::unavailable(format!(
                                    "syncing the replica: an earlier pull from the primary did not end within \
                                     sync_timeout ({:?}); it goes on in the background",
                                    settings.sync_timeout
                                )));
                            }
                        }
                        let db = db.clone();
                        let task = h.spawn(async move {
                            let r = db.sync().await.map(|_| ());
                            let _ = done_tx.send(());
                            r
                        });
                        match futures::future::select(task, budget).await {
                            futures::future::Either::Left((Ok(r), _)) => r,
                            futures::future::Either::Left((Err(_), _)) => {
                                Err(libsql::Error::Sync("the replica's pull failed (its task ended abnormally)".into()))
                            }
                            futures::future::Either::Right(_) => return Err(timed_out()),
                        }
                    }
                    Err(_) => db.sync().await.map(|_| ()),
                };
                match pulled {
                    Ok(_) => return Ok(()),
                    Err(e) => {
                        let class = class_of(&e);
                        if is_transient(class, false) && attempt < settings.retries {
                            attempt += 1;
                            retry_pause(settings.backoff(attempt)).await;
                            continue;
                        }
                        return Err(map_class(class, e, "syncing the replica", false));
                    }
                }
            }
        }
        Ok(())
    }

    /// Create the schema if needed; refuse a newer schema version, another application's
    /// database and (local files) one that cannot run in WAL mode, each left untouched.
    async fn init(&self, doing: &str) -> Result<()> {
        let describe = self.inner.target.describe();
        // Read-only checks first.
        let version = {
            let describe = describe.clone();
            self.with_writer(doing, false, move |c| {
                let describe = describe.clone();
                Box::pin(async move {
                    let version =
                        int(c.query(Step::new("PRAGMA user_version", vec![])).await?.first().and_then(|r| r.first()))?;
                    let columns = table_columns(c).await?;
                    dotdo_core::sql_schema::refuse_foreign(version, &columns, &describe)?;
                    if version > schema::VERSION {
                        return Err(Error::corrupt(format!(
                            "{describe}: schema version {version} is newer than this library's {}",
                            schema::VERSION
                        ))
                        .into());
                    }
                    // Another application's database is left as it is; a dotdo file must have
                    // dotdo's tables, and their unique keys.
                    dotdo_core::sql_schema::check_tables_before(version, &columns, &describe)?;
                    dotdo_core::sql_schema::check_keys(&table_keys(c).await?, &columns, &describe)?;
                    Ok(version)
                })
            })
            .await?
        };
        // After the read-only checks (the WAL switch persists in the file's header: another
        // application's database, or a newer dotdo file, refused above, is left untouched) and
        // before the schema is written (a file that cannot run in WAL mode is left untouched too).
        if let Target::Local { .. } = self.inner.target {
            let s = &self.inner.settings;
            // (The sync pragmas each connection gets when it opens: `local_connection_settings`.)
            let pragmas = vec![
                Step::new("PRAGMA journal_mode = WAL", vec![]),
                Step::new(format!("PRAGMA wal_autocheckpoint = {}", s.wal_autocheckpoint_pages), vec![]),
                Step::new(
                    format!(
                        "PRAGMA journal_size_limit = {}",
                        dotdo_core::sql_schema::wal_size_limit(s.wal_autocheckpoint_pages)
                    ),
                    vec![],
                ),
                Step::new("PRAGMA foreign_keys = OFF", vec![]),
            ];
            let answers = self
                .with_writer(doing, false, move |c| {
                    let pragmas = pragmas.clone();
                    Box::pin(async move { Ok(c.run_all(pragmas).await?) })
                })
                .await?;
            // SQLite answers with the mode it is in (see `not_wal_error`); as dotdo-sqlite: refused.
            let mode = answers.first().and_then(|rows| rows.first()).and_then(|row| row.first());
            let wal = matches!(mode, Some(libsql::Value::Text(m)) if m.eq_ignore_ascii_case("wal"));
            if !wal {
                return Err(dotdo_core::sql_schema::not_wal_error(doing, &mode, "dotdo-libsql"));
            }
            // SQLite opens a file it may not write (its permissions, a read-only mount) read-only
            // without an error, and a dotdo file already in WAL mode needs no write to open: every
            // write would then fail. A write (the version it has, set again) in a transaction
            // rolled back finds out (`BEGIN IMMEDIATE` alone succeeds on such a file); refused at
            // open as in dotdo-sqlite. Tried once, without the busy retries: another writer
            // holding the lock (busy) leaves it undecided, and the writes will tell.
            // (Through `drive`: SQLite's busy handler may wait, off the async threads.)
            let probe = {
                let mut c = self.inner.writer.lock().await;
                self.drive(
                    true,
                    Box::pin(async {
                        let steps = vec![
                            Step::exec("BEGIN IMMEDIATE", vec![]),
                            Step::exec(format!("PRAGMA user_version = {version}"), vec![]),
                        ];
                        let out = c.run_all(steps).await;
                        if c.roll_back_if_open().await {
                            // Left holding the write lock: no write of this store or any other
                            // process would get it.
                            return Err(TxError::Api(Error::unavailable(format!(
                                "{doing}: the write transaction begun to check the file could not be rolled back"
                            ))));
                        }
                        Ok(out?)
                    }),
                )
                .await
            };
            // SQLite's primary result code: SQLITE_READONLY (8), not its extended code for a file
            // moved or deleted meanwhile (SQLITE_READONLY_DBMOVED, 1032: another failure).
            let read_only = |e: &libsql::Error| matches!(e, libsql::Error::SqliteFailure(code, _) if code & 0xff == 8 && *code != 1032);
            match probe {
                Err(TxError::Sql(e)) if read_only(&e) => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!("{doing}: the file cannot be written (its permissions, or a read-only mount)"),
                    )
                    .with_retryable(false)
                    .with_source(e));
                }
                Err(TxError::Sql(e)) => {
                    let e = error::map(e, doing, false);
                    if !e.is_retryable() {
                        return Err(e);
                    }
                }
                Err(TxError::Api(e)) => return Err(e),
                Ok(_) => {}
            }
        }
        if version < schema::VERSION {
            // Safe to retry whatever its outcome (not `mutating`): the program re-reads the
            // version first and creates only what does not exist.
            self.with_writer(doing, false, move |c| {
                let describe = describe.clone();
                Box::pin(async move {
                    // The program's first step checks the version again under the write lock
                    // (another process may have upgraded the file meanwhile, maybe to a newer
                    // version): a newer one fails the program (`json()` of a non-JSON text),
                    // which is then reported as the newer file it is.
                    let mut steps = vec![Step::new(
                        format!(
                            "SELECT CASE WHEN v > {0} THEN json('newer:' || v) END FROM (SELECT user_version AS v FROM pragma_user_version)",
                            schema::VERSION
                        ),
                        vec![],
                    )];
                    steps.extend(
                        schema::CREATE
                            .split(';')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(|s| Step::exec(s.to_string(), vec![])),
                    );
                    steps.push(Step::new(format!("PRAGMA user_version = {}", schema::VERSION), vec![]));
                    if let Err(e) = c.run_program(Program { steps, result: None }).await {
                        let now = c.query(Step::new("PRAGMA user_version", vec![])).await?;
                        let now = int(now.first().and_then(|r| r.first()))?;
                        if now > schema::VERSION {
                            return Err(Error::corrupt(format!(
                                "{describe}: schema version {now} is newer than this library's {} (upgraded by \
                                 another process while this one opened the file)",
                                schema::VERSION
                            ))
                            .into());
                        }
                        return Err(e.into());
                    }
                    let columns = table_columns(c).await?;
                    dotdo_core::sql_schema::check_tables_after(&columns, &describe)?;
                    dotdo_core::sql_schema::check_keys(&table_keys(c).await?, &columns, &describe)?;
                    Ok(())
                })
            })
            .await
            .map_err(|e| {
                // An I/O error at the program's COMMIT: the storage failed, and opening again
                // is safe whatever the outcome (the program creates only what is missing). Not
                // the writes' `AmbiguousOutcome`, which tells a caller to take a new lease.
                if e.kind() == &ErrorKind::AmbiguousOutcome {
                    Error::unavailable(format!(
                        "{doing}: creating or upgrading the schema failed at its COMMIT (storage failure); opening \
                         again is safe"
                    ))
                    .with_source(e)
                } else {
                    e
                }
            })?;
        }
        if !self.inner.target_is_local() {
            self.sync_replica().await?;
        }
        Ok(())
    }

    /// Run `f` on the write connection, retrying transient failures with backoff (real time).
    pub(crate) async fn with_writer<T: Send>(
        &self,
        doing: &str,
        mutating: bool,
        f: impl for<'c> Fn(&'c mut Conn) -> BoxFuture<'c, TxResult<T>> + Send + Sync,
    ) -> Result<T> {
        self.with_writer_as(doing, mutating, false, f).await
    }

    /// [`with_writer`](Self::with_writer); `idempotent`: a write safe to repeat (a lease
    /// release), retried as a read is (`mutating` false), whose failure after an attempt that
    /// may have applied is `AmbiguousOutcome`, as the `ConsistencyGuard` contract has a release
    /// of unknown outcome (it was `Unavailable`, which says nothing was applied).
    async fn with_writer_as<T: Send>(
        &self,
        doing: &str,
        mutating: bool,
        idempotent: bool,
        f: impl for<'c> Fn(&'c mut Conn) -> BoxFuture<'c, TxResult<T>> + Send + Sync,
    ) -> Result<T> {
        self.check_unmoved(doing)?;
        // Whether an attempt failed in a way that may have applied it (retried only because the
        // call is safe to repeat).
        let mut maybe_applied = false;
        let settings = &self.inner.settings;
        let mut attempt = 0;
        // Writers of this store queue on one connection; waiting for it counts against the same
        // budget as the retries (every attempt's wait plus the backoff), so every queued caller
        // behind a locked database fails in bounded time. An attempt on a remote primary may
        // take up to `request_timeout` (a local one waits up to `busy_timeout` for a lock): a
        // queued writer must not give up before the request ahead of it could.
        let clock = SystemClock::new();
        let started = clock.monotonic();
        let attempt_wait = if self.inner.local_writes {
            settings.busy_timeout
        } else {
            settings.busy_timeout.max(settings.request_timeout)
        };
        let budget = attempt_wait
            .saturating_mul(settings.retries.saturating_add(1))
            .saturating_add(settings.max_total_backoff());
        let mut stream_renewed = false;
        loop {
            let out = {
                // A free connection is taken at once: arming the timer alone would wake the
                // timer thread on every call (a context switch per write).
                let mut conn = match self.inner.writer.try_lock() {
                    Ok(conn) => conn,
                    Err(_) => {
                        let left = budget.saturating_sub(clock.monotonic().saturating_sub(started));
                        let lock = self.inner.writer.lock();
                        match futures::future::select(Box::pin(lock), clock.sleep(left)).await {
                            futures::future::Either::Left((conn, _)) => conn,
                            futures::future::Either::Right(_) => {
                                let busy = Error::unavailable(format!(
                                    "{doing}: the store's write connection is still busy after {budget:?} (other \
                                     writers of this store are waiting for it); retry later"
                                ));
                                // A retry's wait: an earlier attempt may have applied.
                                return Err(if idempotent && maybe_applied {
                                    ambiguous_retry(doing).with_source(busy)
                                } else {
                                    busy
                                });
                            }
                        }
                    }
                };
                if let Err(e) = conn.roll_back_leftover().await {
                    return Err(self.named(error::map(e, doing, mutating)));
                }
                // Again once the connection is this call's, on every attempt: a call that waited
                // (behind this store's other writers, or another process's lock) must not write
                // into a file the checkpoint thread has meanwhile found replaced. (It may find it
                // only while this attempt waits for the lock: its rounds take the write connection
                // too. So a success is checked once more below.)
                self.check_unmoved(doing)?;
                let out = self.drive(self.inner.local_writes, f(&mut conn)).await;
                if matches!(out, Err(TxError::Sql(_))) && !self.inner.local_writes {
                    // A remote connection's server stream may be gone (expired while idle, or
                    // closed by the server), and libsql keeps using it: the next attempt or
                    // call starts on a new connection.
                    let db = self.inner._primary.as_ref().unwrap_or(&*self.inner.readers.db);
                    match db.connect() {
                        Ok(c) => *conn = Conn::new(c, true, true),
                        Err(e) => tracing::warn!(doing, error = %e, "could not open a new libsql connection"),
                    }
                }
                out
            };
            match out {
                // Committed, but into the old file if it was replaced meanwhile (found while the
                // attempt waited for another connection's lock): not acknowledged then, since no
                // other process opens that file (the error says the write may be in it).
                Ok(v) => return self.check_unmoved(doing).map(|()| v),
                Err(TxError::Api(e)) => return Err(e),
                Err(TxError::Sql(e)) => {
                    // The writer's server stream expired while idle: sqld refused the whole
                    // request before running any of it, and the connection was renewed above.
                    // Sent again at once, once per call, as a read is (it cost a retry and a
                    // backoff: with `retries: 0`, every call after an idle spell failed).
                    if !stream_renewed && !self.inner.local_writes && error::is_stream_expired(&e) {
                        stream_renewed = true;
                        continue;
                    }
                    let class = class_of(&e);
                    maybe_applied |= is_transient(class, false) && !is_transient(class, true);
                    if is_transient(class, mutating) && attempt < settings.retries {
                        attempt += 1;
                        tracing::debug!(doing, attempt, error = %e, "transient libsql failure; retrying");
                        retry_pause(settings.backoff(attempt)).await;
                        continue;
                    }
                    let err = if idempotent && maybe_applied && class != error::Class::CommitIo {
                        self.named(ambiguous_retry(doing).with_source(e))
                    } else {
                        self.named(map_class(class, e, doing, mutating))
                    };
                    return Err(if attempt > 0 { err.context(format!("after {attempt} retries")) } else { err });
                }
            }
        }
    }

    /// A mutating call: [`with_writer`](Self::with_writer), then pull the replica.
    pub(crate) async fn write_call<T: Send>(
        &self,
        doing: &str,
        f: impl for<'c> Fn(&'c mut Conn) -> BoxFuture<'c, TxResult<T>> + Send + Sync,
    ) -> Result<T> {
        self.write_call_as(doing, true, true, f).await
    }

    /// A write of lease rows only (a refresh): in embedded-replica mode no pull follows it, since
    /// lease rows are only ever read on the primary (`validate`, `current`, an acquire's
    /// explanation). A pull there waited up to `sync_timeout` on a stalled replication
    /// endpoint, and a refresh then came back with a lease already run out.
    pub(crate) async fn lease_write_call<T: Send>(
        &self,
        doing: &str,
        f: impl for<'c> Fn(&'c mut Conn) -> BoxFuture<'c, TxResult<T>> + Send + Sync,
    ) -> Result<T> {
        self.write_call_as(doing, true, false, f).await
    }

    /// A write of lease rows that is safe to apply twice (a lease release): retried like a read
    /// after an answer that leaves its outcome unknown; no replica pull follows it (see
    /// [`lease_write_call`](Self::lease_write_call)).
    pub(crate) async fn idempotent_write_call<T: Send>(
        &self,
        doing: &str,
        f: impl for<'c> Fn(&'c mut Conn) -> BoxFuture<'c, TxResult<T>> + Send + Sync,
    ) -> Result<T> {
        self.write_call_as(doing, false, false, f).await
    }

    /// A write; with `replica_reads_it`, in embedded-replica mode the replica pulls it before
    /// the call returns (the rows it writes are read on the replica).
    async fn write_call_as<T: Send>(
        &self,
        doing: &str,
        mutating: bool,
        replica_reads_it: bool,
        f: impl for<'c> Fn(&'c mut Conn) -> BoxFuture<'c, TxResult<T>> + Send + Sync,
    ) -> Result<T> {
        if !replica_reads_it {
            return self.with_writer_as(doing, mutating, !mutating, f).await;
        }
        // A caller that stops waiting mid-write (its future dropped, perhaps after the primary
        // committed) leaves the replica marked behind: the next read pulls first.
        let dropped = self.inner.replica.as_ref().map(|_| self.inner.replica_behind.mark_if_dropped());
        let out = self.with_writer_as(doing, mutating, !mutating, f).await;
        if let Some(guard) = dropped {
            guard.disarm();
        }
        // Also after an unknown outcome: the caller resolves it by reading back, and the read
        // must see the primary's answer, not a replica that was never pulled.
        // (A failure other than `AmbiguousOutcome` means nothing was applied: no pull.)
        let pull = out.as_ref().map_or_else(|e| e.kind() == &ErrorKind::AmbiguousOutcome, |_| true);
        if pull && self.inner.replica.is_some() {
            // Marked before the pull, cleared once it succeeds: a caller that stops waiting (its
            // future dropped mid-pull) leaves the replica marked behind, so the next read pulls
            // first. If the pull fails, the write is committed on the primary and only its local
            // visibility is late: the next read pulls first (or fails); after an acquire, a stale
            // read of the last holder's state would turn into a lost update.
            let mark = self.inner.replica_behind.mark();
            match self.sync_replica().await {
                Ok(()) => self.inner.replica_behind.pulled_through(mark),
                Err(e) => {
                    tracing::warn!(error = %e, "{doing}: committed on the primary, but the replica could not pull it yet")
                }
            }
        }
        out
    }

    /// Run `f` on a read connection, retrying transient failures with backoff (real time).
    pub(crate) async fn read<T: Send>(
        &self,
        doing: &str,
        f: impl for<'c> Fn(&'c mut Conn) -> BoxFuture<'c, TxResult<T>> + Send + Sync,
    ) -> Result<T> {
        self.check_unmoved(doing)?;
        if self.inner.replica.is_some() {
            self.inner.replica_behind.catch_up(self.sync_replica()).await.map_err(|e| e.context(doing))?;
        }
        let settings = &self.inner.settings;
        let pool = &self.inner.readers;
        let (mut attempt, mut pool_refreshed) = (0, false);
        loop {
            let mut conn = match pool.take() {
                Some(c) => c,
                // Its pragmas read the schema, and wait up to `busy_timeout` while another
                // process holds the database (recovering its WAL after a crash): driven as a
                // statement is (on a local file, not on the async worker), and retried as one.
                None => match self
                    .drive(pool.local_file, Box::pin(async { pool.connect().await.map_err(TxError::Sql) }))
                    .await
                {
                    Ok(c) => c,
                    Err(TxError::Sql(e)) if is_transient(class_of(&e), false) && attempt < settings.retries => {
                        attempt += 1;
                        retry_pause(settings.backoff(attempt)).await;
                        continue;
                    }
                    // Another reader of a local file this store already holds open: a failure to
                    // open it is the moment's (out of file descriptors: `CANTOPEN`, not retryable
                    // at `open`, where it means a bad path); the same call succeeds once one frees.
                    Err(TxError::Sql(e)) => {
                        let e = error::map(e, doing, false);
                        return Err(
                            if pool.local_file
                                && e.kind() == &ErrorKind::Unavailable
                                && !e.is_retryable()
                                && dotdo_core::sql_schema::out_of_file_descriptors()
                            {
                                e.context(format!(
                                    "{doing}: opening another reader connection (out of file descriptors?)"
                                ))
                                .with_retryable(true)
                            } else {
                                e
                            },
                        );
                    }
                    Err(TxError::Api(e)) => return Err(e),
                },
            };
            // After a timeout (a `TxError::Sql`) the connection is not given back: its stream is
            // in an unknown state.
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
                    // The primary expired this pooled connection's stream while it was idle: the
                    // other idle ones have most likely expired alike. Dropped all at once and the
                    // read sent again on a new connection, once per call, without a retry or a
                    // pause (nothing is wrong with the primary; one by one, each cost a retry and
                    // a backoff, and a pool larger than the retries failed the read).
                    if !pool_refreshed && error::is_stream_expired(&e) {
                        pool_refreshed = true;
                        pool.clear();
                        continue;
                    }
                    let class = class_of(&e);
                    if is_transient(class, false) && attempt < settings.retries {
                        attempt += 1;
                        retry_pause(settings.backoff(attempt)).await;
                        continue;
                    }
                    let err = self.named(map_class(class, e, doing, false));
                    return Err(if attempt > 0 { err.context(format!("after {attempt} retries")) } else { err });
                }
            }
        }
    }
}

/// The error of a call safe to repeat whose attempts failed after one that may have applied
/// (see `LibsqlStore::with_writer_as`).
fn ambiguous_retry(doing: &str) -> Error {
    Error::new(
        ErrorKind::AmbiguousOutcome,
        format!(
            "{doing}: an attempt failed after the request may have reached the primary; it may have been applied \
             (it is safe to repeat)"
        ),
    )
}

thread_local! {
    /// tokio refused `block_in_place` on this thread (inside a `LocalSet`): local calls run inline.
    static BLOCK_IN_PLACE_REFUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A remote request that did not answer within `request_timeout`, as the error libsql reports
/// for a connection that broke off after the request was sent (it may have run).
fn timed_out(timeout: Duration) -> libsql::Error {
    libsql::Error::Hrana(format!("stream closed: `no answer within the request timeout ({timeout:?})`").into())
}

impl LibsqlStore {
    /// Await `fut`. Calls on a local file run SQLite on the calling thread (libsql's local API is
    /// synchronous inside its async functions, and may wait up to `busy_timeout` for a lock), so
    /// on a multi-threaded tokio runtime they run under `block_in_place`: tokio moves the
    /// worker's other tasks elsewhere instead of stalling them. Remote calls are truly async,
    /// and abandoned after `request_timeout` (libsql's HTTP client has no timeout of its own).
    async fn drive<T>(&self, local: bool, fut: BoxFuture<'_, TxResult<T>>) -> TxResult<T> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        if local {
            if let Ok(h) = Handle::try_current() {
                if h.runtime_flavor() == RuntimeFlavor::MultiThread && !BLOCK_IN_PLACE_REFUSED.get() {
                    // tokio refuses `block_in_place` inside a `LocalSet` (on the runtime's
                    // `block_on` thread), by panicking before it runs anything: caught, the call
                    // (and the thread's later ones) runs inline instead.
                    let job = std::sync::Mutex::new(Some(fut));
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        tokio::task::block_in_place(|| {
                            let fut = job.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
                            fut.map(|fut| h.block_on(fut))
                        })
                    }));
                    match ran {
                        Ok(Some(out)) => return out,
                        Ok(None) => return Err(TxError::Sql(libsql::Error::Misuse("a call ran twice".into()))),
                        Err(panic) => match job.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
                            Some(fut) => {
                                BLOCK_IN_PLACE_REFUSED.set(true);
                                return fut.await;
                            }
                            None => std::panic::resume_unwind(panic),
                        },
                    }
                }
            }
            return fut.await;
        }
        let timeout = self.inner.settings.request_timeout;
        // libsql 0.10's HTTP client panics on an error answer whose body is not UTF-8 (a
        // gateway's binary or Latin-1 page): caught, it is an exchange that broke off after the
        // request was sent, not a panic in the caller's task.
        let fut = std::panic::AssertUnwindSafe(fut).catch_unwind();
        match futures::future::select(fut, SystemClock::new().sleep(timeout)).await {
            futures::future::Either::Left((Ok(out), _)) => out,
            futures::future::Either::Left((Err(_), _)) => Err(TxError::Sql(libsql::Error::Hrana(
                "stream closed: `the client failed on the server's answer (an error body that is not UTF-8?)`"
                    .to_string()
                    .into(),
            ))),
            futures::future::Either::Right(_) => Err(TxError::Sql(timed_out(timeout))),
        }
    }
}

/// The unique keys of the schema's tables ([`SQL_UNIQUE_KEYS`](dotdo_core::sql_schema::SQL_UNIQUE_KEYS)).
async fn table_keys(c: &mut Conn) -> TxResult<Vec<(String, String, String)>> {
    let rows = c.query(Step::new(dotdo_core::sql_schema::SQL_UNIQUE_KEYS, vec![])).await?;
    Ok(rows
        .iter()
        .map(|r| Ok((crate::sql::text(r.first())?, crate::sql::text(r.get(1))?, crate::sql::text(r.get(2))?)))
        .collect::<libsql::Result<Vec<_>>>()?)
}

/// The database's tables and their columns ([`SQL_TABLE_COLUMNS`](dotdo_core::sql_schema::SQL_TABLE_COLUMNS)).
async fn table_columns(c: &mut Conn) -> TxResult<Vec<(String, String)>> {
    let rows = c.query(Step::new(dotdo_core::sql_schema::SQL_TABLE_COLUMNS, vec![])).await?;
    Ok(rows
        .iter()
        .map(|r| Ok((crate::sql::text(r.first())?, crate::sql::text(r.get(1))?)))
        .collect::<libsql::Result<Vec<_>>>()?)
}

impl LibsqlStore {
    /// `Corrupt` once the checkpoint thread found the local file deleted or replaced.
    fn check_unmoved(&self, doing: &str) -> Result<()> {
        if self.inner.checkpointer.get().is_some_and(dotdo_core::sql_schema::CheckpointThread::replaced) {
            return Err(dotdo_core::sql_schema::replaced_file_error(doing, &self.inner.target.describe()));
        }
        Ok(())
    }

    /// `e`, naming the database (the file, or the primary's URL without its token) unless it
    /// does already: an operator needs to know which one is damaged, unreachable or refusing.
    pub(crate) fn named(&self, e: Error) -> Error {
        let target = self.inner.target.describe();
        if e.to_string().contains(&target) {
            e
        } else {
            e.context(target)
        }
    }
}

impl Inner {
    pub(crate) fn target_is_local(&self) -> bool {
        matches!(self.target, Target::Local { .. })
    }
}

impl LibsqlStore {
    /// Run a program with a result on the primary (a mutating call). A fenced program that
    /// found the object's rows damaged (it wrote nothing) is `Corrupt`.
    pub(crate) async fn program(&self, object: &ObjectId, doing: &str, steps: Vec<Step>, result: Step) -> Result<i64> {
        let steps = Arc::new(steps);
        let code = self
            .write_call(doing, move |c| {
                let program = Program { steps: steps.to_vec(), result: Some(result.clone()) };
                Box::pin(async move { Ok(c.run_program(program).await?) })
            })
            .await?
            .ok_or_else(|| Error::backend(format!("{doing}: the program returned no result")))?;
        if code == crate::conn::DAMAGED_ROWS {
            return Err(self.damaged_rows(object, doing));
        }
        Ok(code)
    }

    /// The `Corrupt` error of a fenced call that found `object`'s rows damaged and wrote nothing.
    pub(crate) fn damaged_rows(&self, object: &ObjectId, doing: &str) -> Error {
        Error::corrupt(format!(
            "{}: {doing}: the rows of {object} hold values dotdo never writes (a token or sequence number \
             that is not a non-negative integer; damaged, or written by another tool); nothing was written",
            self.inner.target.describe()
        ))
    }

    /// A read something is decided on (the drain's `object_info`, `objects_with_pending_changes`
    /// and `read_changes`; the guard's `validate` and `current`): on the primary in
    /// embedded-replica mode, where the replica is pulled only after this store's own writes (or
    /// every `sync_interval`) and would not show another node's changes: a flush would find
    /// nothing pending, an eviction nothing to drain, a lease another node took since would read
    /// as still this node's (the runtime flushes under a lease `validate` passed). (Reads over
    /// HTTP then, with the byte bound of a remote `read_changes`.) Elsewhere, [`read`](Self::read).
    pub(crate) async fn read_primary_in_replica<T: Send>(
        &self,
        doing: &str,
        f: impl for<'c> Fn(&'c mut Conn) -> BoxFuture<'c, TxResult<T>> + Send + Sync,
    ) -> Result<T> {
        if self.inner.replica.is_some() {
            self.with_writer(doing, false, f).await
        } else {
            self.read(doing, f).await
        }
    }

    /// A read on the primary (the write connection), for explaining a refusal.
    pub(crate) async fn read_primary(&self, doing: &str, step: Step) -> Result<Vec<Row>> {
        self.with_writer(doing, false, move |c| {
            let step = step.clone();
            Box::pin(async move { Ok(c.query(step).await?) })
        })
        .await
    }

    /// The `Conflict` error of an evict or restore refused for pending changes.
    pub(crate) async fn pending_conflict(&self, object: &ObjectId, doing: &str) -> Error {
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

    pub(crate) async fn lease_row_on_primary(&self, object: &ObjectId) -> Result<Option<LeaseRow>> {
        let rows = self.read_primary("read lease", Step::new(LEASE_ROW, vec![t(object.as_str())])).await?;
        lease_row(&rows).map_err(|e| e.context(format!("lease of {object}")))
    }

    /// The highest token the primary knows for `object`, from leases and writes (0 if none).
    pub(crate) async fn max_token_on_primary(&self, object: &ObjectId) -> Result<dotdo_core::FencingToken> {
        let rows = self
            .read_primary(
                "read token maximum",
                Step::new(
                    "SELECT max(coalesce((SELECT max_token FROM do_objects WHERE do_id = ?1), 0), \
                     coalesce((SELECT fencing_token FROM do_locks WHERE do_id = ?1), 0))",
                    vec![t(object.as_str())],
                ),
            )
            .await?;
        let v = rows
            .first()
            .map(|r| crate::sql::stored(r.first()))
            .transpose()
            .map_err(|e| Error::corrupt(format!("token maximum of {object} does not decode")).with_source(e))?;
        Ok(dotdo_core::FencingToken::new(v.unwrap_or(0)))
    }
}

/// Wait `d` (jittered) before a retry: always real time, never the store's clock, which may be a test's
/// `ManualClock` that moves only when told to (a retry would then wait forever; the conformance
/// kit's rule for backends).
async fn retry_pause(d: std::time::Duration) {
    SystemClock::new().sleep(dotdo_core::retry::jittered(d)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An I/O error at the COMMIT of the schema program while opening is a retryable
    /// `Unavailable` (the program is safe to run again: opening again works), not the writes'
    /// `AmbiguousOutcome`, which told an opening caller to take a new lease.
    #[tokio::test]
    async fn an_io_error_at_the_schema_commit_fails_open_retryably() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("h.db");
        crate::conn::FAIL_NEXT_COMMIT.with(|f| f.set(true));
        let e = LibsqlStore::local(&path).open().await.expect_err("the schema's COMMIT failed");
        assert!(!crate::conn::FAIL_NEXT_COMMIT.with(|f| f.get()), "the fault fired");
        assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
        assert!(e.is_retryable(), "{e}");
        let s = LibsqlStore::local(&path).open().await.expect("opening again");
        let o = ObjectId::new("o").expect("id");
        let node = dotdo_core::NodeId::new("n").expect("node");
        let l = dotdo_core::ConsistencyGuard::acquire(&s, &o, &node, std::time::Duration::from_secs(5));
        l.await.expect("the schema is there");
    }

    /// A write dropped by its caller mid-way (perhaps after the primary committed it) leaves
    /// the replica marked behind, so the next read pulls first; one that ends does not.
    #[tokio::test]
    async fn a_write_dropped_midway_marks_the_replica_behind() {
        let behind = ReplicaBehind::default();
        use std::sync::atomic::Ordering;
        let pulls = std::sync::atomic::AtomicU32::new(0);
        let pull = || async {
            pulls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        behind.mark_if_dropped().disarm();
        behind.catch_up(pull()).await.expect("up to date");
        assert_eq!(pulls.load(Ordering::SeqCst), 0, "an ended write marks nothing");
        {
            let write = async {
                let _guard = behind.mark_if_dropped();
                futures::future::pending::<()>().await;
            };
            assert!(tokio::time::timeout(Duration::from_millis(10), write).await.is_err(), "dropped");
        }
        behind.catch_up(pull()).await.expect("pulled");
        assert_eq!(pulls.load(Ordering::SeqCst), 1, "the next read pulled first");
        behind.catch_up(pull()).await.expect("up to date again");
        assert_eq!(pulls.load(Ordering::SeqCst), 1);
    }

    /// A pull on demand (`LibsqlStore::sync`) that succeeds brings the writes marked before it:
    /// the next read does not pull again (it did, and failed with `Unavailable` if the
    /// replication endpoint flapped meanwhile); one that fails leaves the replica behind.
    #[tokio::test]
    async fn a_pull_on_demand_catches_the_replica_up() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let behind = ReplicaBehind::default();
        let pulls = AtomicU32::new(0);
        let pull = || async {
            pulls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        behind.mark();
        let e = behind.pull_now(async { Err(Error::unavailable("no answer (test)")) }).await.expect_err("failed");
        assert_eq!(e.kind(), &ErrorKind::Unavailable);
        behind.mark();
        behind.pull_now(pull()).await.expect("pulled");
        assert_eq!(pulls.load(Ordering::SeqCst), 1);
        behind.catch_up(async { Err(Error::unavailable("no answer (test)")) }).await.expect("no pull needed");
        behind.mark();
        behind.catch_up(pull()).await.expect("a write marked after it: pulled");
        assert_eq!(pulls.load(Ordering::SeqCst), 2);
    }

    /// Readers queued behind a catch-up pull that fails fail with its error, without each
    /// running a pull of its own (each waited out a whole pull, one after another).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::disallowed_methods)] // real time: the readers queue up
    async fn readers_queued_behind_a_failed_pull_fail_with_it() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let behind = Arc::new(ReplicaBehind::default());
        behind.mark();
        let pulls = Arc::new(AtomicU32::new(0));
        let (release, gate) = tokio::sync::watch::channel(false);
        let started = Arc::new(tokio::sync::Barrier::new(6));
        let readers: Vec<_> = (0..5)
            .map(|_| {
                let (behind, pulls, mut gate) = (behind.clone(), pulls.clone(), gate.clone());
                let started = started.clone();
                tokio::spawn(async move {
                    started.wait().await;
                    behind
                        .catch_up(async move {
                            pulls.fetch_add(1, Ordering::SeqCst);
                            let _ = gate.wait_for(|open| *open).await;
                            Err(Error::corrupt("the replica file is damaged (test)"))
                        })
                        .await
                })
            })
            .collect();
        started.wait().await;
        // Every reader is at the lock (one of them pulling) before the pull fails.
        while behind.queued.load(Ordering::SeqCst) < 5 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(pulls.load(Ordering::SeqCst), 1);
        release.send(true).expect("release");
        for r in readers {
            let e = r.await.expect("join").expect_err("behind");
            // The pull's own failure, for every reader: a damaged replica is no outage.
            assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
            assert!(!e.is_retryable(), "{e}");
        }
        assert_eq!(pulls.load(Ordering::SeqCst), 1, "one pull for the readers that queued behind it");
        // A later read pulls again.
        behind.catch_up(async { Ok(()) }).await.expect("a new pull");
    }

    /// After a failed pull, a read pulls first; while pulling fails the read fails (nothing is
    /// read from a replica that may miss committed writes); once a pull succeeds, reads go
    /// straight to the replica again.
    #[tokio::test]
    async fn a_replica_that_missed_a_pull_catches_up_before_it_is_read() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let behind = ReplicaBehind::default();
        let pulls = AtomicU32::new(0);
        let pull = |ok: bool| {
            let pulls = &pulls;
            async move {
                pulls.fetch_add(1, Ordering::SeqCst);
                if ok {
                    Ok(())
                } else {
                    Err(Error::unavailable("primary unreachable"))
                }
            }
        };
        behind.catch_up(pull(true)).await.expect("up to date: no pull");
        assert_eq!(pulls.load(Ordering::SeqCst), 0);
        behind.mark();
        let e = behind.catch_up(pull(false)).await.expect_err("cannot catch up");
        assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
        assert!(e.to_string().contains("missed writes"), "{e}");
        behind.catch_up(pull(true)).await.expect("caught up");
        behind.catch_up(pull(false)).await.expect("no pull needed any more");
        assert_eq!(pulls.load(Ordering::SeqCst), 2);
    }

    /// A reader arriving while another reader's catch-up pull runs waits for it instead of
    /// reading the replica that may still be behind; a failed pull marked during a pull makes
    /// the next read pull again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_reader_waits_for_the_catch_up_pull_in_flight() {
        let behind = Arc::new(ReplicaBehind::default());
        behind.mark();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let first = {
            let behind = behind.clone();
            tokio::spawn(async move {
                behind
                    .catch_up(async move {
                        let _ = released.await;
                        Ok(())
                    })
                    .await
            })
        };
        // Let the first reader start its pull.
        while behind.pulling.try_lock().is_ok() {
            tokio::task::yield_now().await;
        }
        let second = {
            let behind = behind.clone();
            tokio::spawn(async move { behind.catch_up(async { Err(Error::unavailable("must not pull")) }).await })
        };
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert!(!second.is_finished(), "the second reader waits for the pull in flight");
        release.send(()).expect("release the pull");
        first.await.expect("join").expect("first caught up");
        second.await.expect("join").expect("the second reader sees the caught-up replica");
        behind.mark();
        let e = behind.catch_up(async { Err(Error::unavailable("down")) }).await.expect_err("behind again");
        assert_eq!(e.kind(), &ErrorKind::Unavailable);
    }

    /// The durability setting is what reaches SQLite on the connection that writes: FULL (2)
    /// fsyncs every commit, NORMAL (1) does not (reopening in one process cannot tell them apart).
    #[tokio::test]
    async fn the_writer_gets_the_configured_synchronous_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (durability, want) in [(Durability::Normal, 1i64), (Durability::Full, 2)] {
            let s = LibsqlStore::local(dir.path().join(format!("s{want}.db")))
                .with_settings(LibsqlSettings { durability, ..Default::default() })
                .open()
                .await
                .expect("open");
            let got = s
                .with_writer("reading synchronous", false, |c| {
                    Box::pin(async move {
                        let mut got = Vec::new();
                        for p in ["synchronous", "fullfsync", "checkpoint_fullfsync", "journal_size_limit"] {
                            let rows = c.query(Step::new(format!("PRAGMA {p}"), vec![])).await?;
                            got.push(int(rows.first().and_then(|r| r.first()))?);
                        }
                        Ok(got)
                    })
                })
                .await
                .expect("pragma");
            // And macOS's full syncs: a FULL commit's, and every checkpoint's.
            // The WAL is cut back to 64 MiB (the autocheckpoint size) when it starts over.
            assert_eq!(got, [want, i64::from(want == 2), 1, 64 << 20], "{durability:?}");
        }
    }

    /// A replica file's connections parse every statement and refuse a `cache_size` with a
    /// value: they get the busy timeout only (with the pragma, every replica read failed).
    #[cfg(feature = "replica")]
    #[tokio::test]
    async fn replica_connections_get_no_page_cache_pragma() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = libsql::Builder::new_local_replica(dir.path().join("r.db")).build().await.expect("replica");
        let conn = db.connect().expect("connect");
        let settings = LibsqlSettings::default();
        local_connection_settings(&conn, &settings, false).await.expect("replica connection settings");
        assert!(
            local_connection_settings(&conn, &settings, true).await.is_err(),
            "libsql now takes the pragma on a replica: it can be given there too"
        );
    }

    /// Every connection to a local file, the writer and the readers, gets the page cache.
    #[tokio::test]
    async fn local_connections_get_the_configured_page_cache() {
        fn pragma<'c>(c: &'c mut Conn, name: &'static str) -> BoxFuture<'c, TxResult<i64>> {
            Box::pin(async move {
                Ok(int(c.query(Step::new(format!("PRAGMA {name}"), vec![])).await?.first().and_then(|r| r.first()))?)
            })
        }
        let dir = tempfile::tempdir().expect("tempdir");
        for (cache_kib, durability) in [(2048u32, Durability::Normal), (96 * 1024, Durability::Full)] {
            let s = LibsqlStore::local(dir.path().join(format!("c{cache_kib}.db")))
                .with_settings(LibsqlSettings { cache_kib, durability, ..Default::default() })
                .open()
                .await
                .expect("open");
            let writer = s.with_writer("reading cache_size", false, |c| pragma(c, "cache_size")).await.expect("writer");
            let reader = s.read("reading cache_size", |c| pragma(c, "cache_size")).await.expect("reader");
            assert_eq!((writer, reader), (-i64::from(cache_kib), -i64::from(cache_kib)));
            // The sync settings too: the last connection to close, a reader's included, runs
            // SQLite's final checkpoint.
            let (sync, full) = if durability == Durability::Full { (2, 1) } else { (1, 0) };
            for (name, want) in [("synchronous", sync), ("fullfsync", full), ("checkpoint_fullfsync", 1)] {
                let w = s.with_writer(name, false, |c| pragma(c, name)).await.expect("writer");
                let r = s.read(name, |c| pragma(c, name)).await.expect("reader");
                assert_eq!((w, r), (want, want), "{name} with {durability:?}");
            }
        }
    }
}
