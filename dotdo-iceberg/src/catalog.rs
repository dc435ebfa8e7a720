//! Catalogs: where the table's current metadata pointer lives.
//!
//! * [`CatalogConfig::Sql`]: iceberg-rust's SQL catalog on SQLite, the durable embedded default
//!   (no server). For a `file://` warehouse the database defaults to `<warehouse>/catalog.db`.
//!   PyIceberg's `SqlCatalog` opens the same file. Feature `sql` (default). It uses sqlx's
//!   bundled SQLite (libsqlite3-sys 0.30), which is link-compatible with rusqlite 0.32 but
//!   **not** with libsql: a binary with dotdo-libsql builds dotdo-iceberg without `sql` (then
//!   `CatalogConfig::Sql` and a local warehouse's default are `InvalidInput`). dotdo switches the database to
//!   WAL (durable with `synchronous=FULL`, one fsync per commit). dotdo's commits move the
//!   table pointer themselves, with the same compare-and-swap `UPDATE` as iceberg-catalog-sql but
//!   without re-reading the table metadata first, and reporting errors of the SQL `COMMIT`,
//!   which iceberg-catalog-sql 0.10.1 ignores (apache/iceberg-rust#3061).
//! * [`CatalogConfig::Memory`]: iceberg's in-memory catalog, for tests (lost on restart).
//! * `CatalogConfig::Rest` (feature `rest`, on by default): an Iceberg REST catalog (R2 Data
//!   Catalog, Polaris, Lakekeeper) through `iceberg-catalog-rest`, by configuration.
//! * [`CatalogConfig::Custom`]: any other `iceberg::Catalog`, sharing the same object-store
//!   `StorageFactory`.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use iceberg::io::StorageFactory;
use iceberg::table::Table;
use iceberg::{Catalog, CatalogBuilder, Namespace, NamespaceIdent, TableCommit, TableCreation, TableIdent};

use dotdo_core::{Error, Result};

/// Builds a custom catalog given the storage factory of the warehouse.
pub type CustomCatalog =
    Arc<dyn Fn(Arc<dyn StorageFactory>) -> futures::future::BoxFuture<'static, Result<Arc<dyn Catalog>>> + Send + Sync>;

/// Which catalog to use.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum CatalogConfig {
    /// The default: SQL catalog on SQLite at `<warehouse dir>/catalog.db` for a `file://`
    /// warehouse, the in-memory catalog for `memory://`; other warehouses must name one.
    #[default]
    Default,
    /// SQL catalog on SQLite. `uri` is a sqlx URI (`sqlite:/abs/path/catalog.db`); the database
    /// is created if missing. An in-memory URI (`sqlite::memory:`, `mode=memory`) is
    /// `InvalidInput` (each pooled connection would be an empty catalog of its own: use
    /// `Memory`). A catalog of the older "v0" schema (PyIceberg's `SqlCatalog` without
    /// `schema_version` v1) gets the `iceberg_type` column added, as PyIceberg's own migration
    /// does.
    Sql {
        /// The sqlx SQLite URI.
        uri: String,
    },
    /// iceberg's in-memory catalog (tests).
    Memory,
    /// An Iceberg REST catalog (feature `rest`): R2 Data Catalog, Polaris, Lakekeeper, … Data
    /// files still go through this crate's object store (the warehouse URL and options).
    #[cfg(feature = "rest")]
    Rest {
        /// The catalog endpoint, e.g. `https://catalog.example/api/catalog`.
        uri: String,
        /// The catalog's warehouse name or location, if it needs one.
        warehouse: Option<String>,
        /// Further catalog properties (`token`, `credential`, `oauth2-server-uri`, `prefix`, …).
        /// Values are never printed.
        properties: std::collections::BTreeMap<String, String>,
    },
    /// A catalog built by the caller.
    Custom(CustomCatalog),
}

impl fmt::Debug for CatalogConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CatalogConfig::Default => f.write_str("Default"),
            CatalogConfig::Sql { uri } => f.debug_struct("Sql").field("uri", &without_password(uri)).finish(),
            CatalogConfig::Memory => f.write_str("Memory"),
            #[cfg(feature = "rest")]
            CatalogConfig::Rest { uri, warehouse, properties } => f
                .debug_struct("Rest")
                .field("uri", &without_credentials(uri))
                .field("warehouse", warehouse)
                .field("properties", &properties.keys().map(|k| (k.as_str(), "<redacted>")).collect::<Vec<_>>())
                .finish(),
            CatalogConfig::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// `uri` with the password of its user info (`https://user:pass@host`, which the HTTP client
/// sends as Basic auth) replaced, for messages and `Debug`. (A warehouse URL's user part is not
/// secret: `abfss://container@account…` names the container.)
/// A URI that does not parse is shown as its scheme alone if it may hold user info (an `@`:
/// the parser could not take a password apart from it).
pub(crate) fn without_password(uri: &str) -> String {
    match url::Url::parse(uri) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("redacted"));
            u.to_string()
        }
        // An `@` the parser did not take for user info (`s3://AKIA:/secret@bucket/wh` parses
        // as host `AKIA` and a path holding the secret): the scheme alone, as below.
        Ok(u) if u.username().is_empty() && uri.contains('@') => {
            format!("{}://…", uri.split_once("://").map_or("", |(s, _)| s))
        }
        Ok(_) => uri.to_string(),
        Err(_) if uri.contains('@') => format!("{}://…", uri.split_once("://").map_or("", |(s, _)| s)),
        Err(_) => uri.to_string(),
    }
}

/// A catalog URI for messages and `Debug`: [`without_password`], and a user name alone
/// redacted too (`https://TOKEN@host`: a token carried as the user name, with an empty
/// password, which the HTTP client sends as Basic auth).
#[cfg(feature = "rest")]
pub(crate) fn without_credentials(uri: &str) -> String {
    match url::Url::parse(uri) {
        Ok(mut u) if u.password().is_none() && !u.username().is_empty() => {
            let _ = u.set_username("redacted");
            u.to_string()
        }
        _ => without_password(uri),
    }
}

/// A REST catalog's base URI as iceberg-catalog-rest joins its paths to it: an `http://` or
/// `https://` URL, without a trailing `/` (with one, every request asked `…//v1/…`, which
/// servers answer 404, where the Java client and PyIceberg strip it). An empty URI (an unset
/// environment variable) or another scheme is `InvalidInput` (an empty one was `Corrupt`).
#[cfg(feature = "rest")]
fn rest_uri(uri: &str) -> Result<String> {
    let trimmed = uri.trim().trim_end_matches('/');
    let refused = |why: &str| {
        Error::invalid(format!(
            "REST catalog uri {:?} {why}: give its http:// or https:// URL",
            without_credentials(uri)
        ))
    };
    if trimmed.is_empty() {
        return Err(refused("is empty"));
    }
    match url::Url::parse(trimmed) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(trimmed.to_string()),
        Ok(_) => Err(refused("is not an HTTP URL")),
        Err(e) => Err(refused(&format!("is not a URL ({e})"))),
    }
}

/// The SQLite URI of the default catalog of a local warehouse directory (the path
/// percent-encoded where a URI needs it: a `?`, `#` or `%` in a directory name stays part of the
/// path).
pub fn default_sqlite_uri(warehouse_dir: &std::path::Path) -> String {
    let path = warehouse_dir.join("catalog.db");
    let path = percent_encoding::utf8_percent_encode(&path.to_string_lossy(), SQLITE_PATH_ESCAPES).to_string();
    format!("sqlite:{path}?mode=rwc")
}

/// What a path in a sqlx SQLite URI must escape: sqlx splits the options off at the first `?`
/// and percent-decodes the path.
const SQLITE_PATH_ESCAPES: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%').add(b'?').add(b'#');

#[cfg(feature = "sql")]
/// Reads the SQL catalog's table pointer directly, to confirm that a commit the catalog
/// acknowledged really is durable: iceberg-catalog-sql 0.10.1 ignores errors of the SQL `COMMIT`
/// (apache/iceberg-rust#3061), so an acknowledged commit might not have persisted.
#[derive(Debug)]
pub(crate) struct SqlVerifier {
    pool: sqlx::SqlitePool,
    catalog: String,
    /// A plain SQLite connection to the same file for the pointer read: a few µs instead of
    /// sqlx's round trip through its worker thread (~0.15 ms), which every read of a store
    /// with `refresh_reads` pays. `None` for in-memory databases; sqlx is the fallback.
    direct: Option<parking_lot::Mutex<rusqlite::Connection>>,
}

#[cfg(feature = "sql")]
const POINTER_SQL: &str = "SELECT metadata_location FROM iceberg_tables \
     WHERE catalog_name = ? AND table_namespace = ? AND table_name = ?";

/// The file path of a sqlx SQLite URI (`sqlite:/p`, `sqlite:///p`, `sqlite://p`, options after
/// `?`, the path percent-decoded as sqlx does), `None` for in-memory databases (and for a path
/// that does not decode to UTF-8, which sqlx refuses too).
#[cfg(feature = "sql")]
fn sqlite_path(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" || query.split('&').any(|kv| kv == "mode=memory") {
        return None;
    }
    percent_encoding::percent_decode_str(path).decode_utf8().ok().map(|p| p.into_owned())
}

#[cfg(feature = "sql")]
fn open_direct(uri: &str) -> Option<parking_lot::Mutex<rusqlite::Connection>> {
    use rusqlite::OpenFlags;
    let path = sqlite_path(uri)?;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    match rusqlite::Connection::open_with_flags(&path, flags) {
        Ok(c) => {
            // Never wait on a lock on an async worker thread: a busy read falls back to sqlx.
            let _ = c.busy_timeout(std::time::Duration::ZERO);
            Some(parking_lot::Mutex::new(c))
        }
        Err(e) => {
            tracing::debug!(path = %path, error = %e, "no direct SQLite connection for pointer reads; using sqlx");
            None
        }
    }
}

/// A catalog another engine created with the older "v0" schema (PyIceberg's `SqlCatalog` without
/// `schema_version` v1, Java's JDBC catalog by default) has no `iceberg_type` column in
/// `iceberg_tables`, which iceberg-catalog-sql's queries and dotdo's pointer swap filter on (every
/// open failed with "no such column"). Added here as PyIceberg's own v1 migration does: a
/// nullable column, rows without a value read as tables by both. Two processes adding it at once
/// are fine: the loser finds it there.
#[cfg(feature = "sql")]
async fn add_record_type_column(pool: &sqlx::SqlitePool) -> std::result::Result<(), sqlx::Error> {
    const HAS_TABLE: &str = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'iceberg_tables'";
    const HAS_COLUMN: &str = "SELECT count(*) FROM pragma_table_info('iceberg_tables') WHERE name = 'iceberg_type'";
    if sqlx::query_scalar::<_, i64>(HAS_TABLE).fetch_one(pool).await? == 0
        || sqlx::query_scalar::<_, i64>(HAS_COLUMN).fetch_one(pool).await? > 0
    {
        return Ok(());
    }
    tracing::info!("dotdo: adding the iceberg_type column to a SQL catalog of the older (v0) schema");
    match sqlx::query("ALTER TABLE iceberg_tables ADD COLUMN iceberg_type VARCHAR(5)").execute(pool).await {
        Ok(_) => Ok(()),
        Err(_) if sqlx::query_scalar::<_, i64>(HAS_COLUMN).fetch_one(pool).await? > 0 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(feature = "sql")]
impl SqlVerifier {
    async fn connect(uri: &str, catalog: &str) -> Result<Self> {
        // A busy or unreachable database is `Unavailable`; one that cannot be opened as
        // configured (a missing directory, a bad option, read-only for the WAL switch) is not.
        let unavailable = |e: sqlx::Error| {
            let message = format!("opening the SQL catalog: {e}");
            crate::error::to_error(crate::error::cause_of(&e), uri, message).with_source(e)
        };
        // The pointer swaps commit on this connection: on macOS a plain fsync leaves them in the
        // drive's cache, so F_FULLFSYNC, as the SQL hot stores (no effect elsewhere).
        let options = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(uri)
            .map_err(unavailable)?
            .pragma("fullfsync", "ON")
            .pragma("checkpoint_fullfsync", "ON");
        // No idle timeout nor lifetime (one connection to a local file): then sqlx runs no
        // maintenance task, whose sweep could spin a core for ever (sqlx#3645; see
        // vendor/sqlx-core/VENDORED.md).
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        // WAL: one fsync per commit instead of the rollback journal's several (same durability
        // with synchronous=FULL, sqlx's default). Persistent in the file; PyIceberg's SqlCatalog
        // reads WAL databases transparently.
        sqlx::query("PRAGMA journal_mode=WAL").execute(&pool).await.map_err(unavailable)?;
        add_record_type_column(&pool).await.map_err(unavailable)?;
        Ok(SqlVerifier { pool, catalog: catalog.to_string(), direct: open_direct(uri) })
    }

    /// The durable metadata location of `ident` (None if the table is not in the catalog).
    pub(crate) async fn metadata_location(&self, ident: &TableIdent) -> Result<Option<String>> {
        if let Some(c) = &self.direct {
            use rusqlite::OptionalExtension;
            let c = c.lock();
            let got = c.prepare_cached(POINTER_SQL).and_then(|mut st| {
                st.query_row((&self.catalog, ident.namespace().join("."), ident.name()), |r| {
                    r.get::<_, Option<String>>(0)
                })
                .optional()
            });
            match got {
                Ok(v) => return Ok(v.flatten()),
                // e.g. the catalog table does not exist yet; sqlx reports errors properly.
                Err(e) => tracing::debug!(error = %e, "direct pointer read failed; using sqlx"),
            }
        }
        sqlx::query_scalar::<_, Option<String>>(POINTER_SQL)
            .bind(&self.catalog)
            .bind(ident.namespace().join("."))
            .bind(ident.name())
            .fetch_optional(&self.pool)
            .await
            .map(Option::flatten)
            .map_err(|e| {
                let cause = crate::error::cause_of(&e);
                crate::error::to_error(cause, "reading the SQL catalog pointer", e.to_string())
            })
    }
}

#[cfg(feature = "sql")]
impl SqlVerifier {
    /// For each of `locations`, the other tables of this catalog database (under any catalog
    /// name) whose metadata lives in that location's `metadata/` directory, each as
    /// `namespace.name (catalog c)` (the catalog's tables are read once). Locations are compared
    /// as `root` maps them to keys of the store (so `file:/x`, `file:///x` and `/x`, or `s3a://`
    /// and `s3://`, are one place), without regard to case (a case-insensitive file system keeps
    /// `Changes` and `changes` in one directory). Two tables at one location share their `data/`
    /// and `metadata/` directories: each one's cleanup would delete the other's files.
    pub(crate) async fn tables_at(
        &self,
        ident: &TableIdent,
        locations: &[&str],
        root: &crate::StoreRoot,
    ) -> Result<Vec<Vec<String>>> {
        let rows: Vec<(String, String, String, Option<String>)> =
            sqlx::query_as("SELECT catalog_name, table_namespace, table_name, metadata_location FROM iceberg_tables")
                .fetch_all(&self.pool)
                .await
                .map_err(|e| {
                    let cause = crate::error::cause_of(&e);
                    crate::error::to_error(cause, "listing the SQL catalog's tables", e.to_string())
                })?;
        // A location the store cannot map is no place of this store: nothing there to share.
        let key = |l: &str| root.key(l).ok().map(|k| k.to_string().to_lowercase());
        let ns = ident.namespace().join(".");
        let others: Vec<_> =
            rows.iter().filter(|(c, n, t, _)| !(c == &self.catalog && n == &ns && t == ident.name())).collect();
        Ok(locations
            .iter()
            .map(|location| {
                let Some(own) = key(location) else { return Vec::new() };
                let dir = format!("{own}/metadata/");
                others
                    .iter()
                    .filter(|(_, _, _, m)| {
                        m.as_deref()
                            .and_then(key)
                            .is_some_and(|m| m.strip_prefix(&dir).is_some_and(|f| !f.contains('/')))
                    })
                    .map(|(c, n, t, _)| format!("{n}.{t} (catalog {c:?})"))
                    .collect()
            })
            .collect())
    }

    /// Move the table pointer of `ident` from `expected` to `new` in one conditional `UPDATE`
    /// (the same compare-and-swap iceberg-catalog-sql's own commits use). `Ok(false)`: the
    /// pointer was not `expected` (another commit landed first). A failing `COMMIT` is an error
    /// here, unlike in iceberg-catalog-sql 0.10.1.
    pub(crate) async fn swap(&self, ident: &TableIdent, expected: &str, new: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE iceberg_tables SET metadata_location = ?, previous_metadata_location = ? \
             WHERE catalog_name = ? AND table_namespace = ? AND table_name = ? \
             AND (iceberg_type = 'TABLE' OR iceberg_type IS NULL) AND metadata_location = ?",
        )
        .bind(new)
        .bind(expected)
        .bind(&self.catalog)
        .bind(ident.namespace().join("."))
        .bind(ident.name())
        .bind(expected)
        .execute(&self.pool)
        .await
        .map_err(swap_failure)?;
        Ok(done.rows_affected() == 1)
    }
}

/// The error of a failed pointer swap. An SQLite I/O error (`SQLITE_IOERR*`, e.g. a failed WAL
/// fsync at commit) is `AmbiguousOutcome` whatever a read-back shows: the transaction's frames
/// may be in the WAL already, and a recovery after a crash replays them, moving the pointer to
/// the new metadata after all. Its files must then not be deleted (a read-back at the old
/// location judged "not landed", and the commit's files were deleted).
#[cfg(feature = "sql")]
fn swap_failure(e: sqlx::Error) -> Error {
    let io = match &e {
        sqlx::Error::Database(db) => db.code().and_then(|c| c.parse::<i32>().ok()).is_some_and(|c| c & 0xff == 10),
        _ => false,
    };
    if io {
        return Error::new(
            dotdo_core::ErrorKind::AmbiguousOutcome,
            format!("moving the SQL catalog pointer: an I/O error at commit, which a recovery may still apply: {e}"),
        );
    }
    let cause = crate::error::cause_of(&e);
    crate::error::to_error(cause, "moving the SQL catalog pointer", e.to_string())
}

/// How a pointer swap ended (see [`SqlVerifier::swap_resolved`]).
#[cfg_attr(not(feature = "sql"), allow(dead_code))] // made by the SQL catalog's swap only
pub(crate) enum Swapped {
    /// The pointer moved to the new metadata: committed.
    Landed,
    /// The pointer was not at the base: another commit landed first; nothing was committed.
    Lost,
}

#[cfg(feature = "sql")]
impl SqlVerifier {
    /// [`swap`](Self::swap), and if the swap itself failed, a read of the pointer to learn
    /// whether it landed anyway. The error of a swap that did not land keeps its kind
    /// (`Unavailable` for a busy or unreachable database); `AmbiguousOutcome` if the pointer
    /// could not be read or points at neither version (ours may have landed and been built on).
    pub(crate) async fn swap_resolved(&self, ident: &TableIdent, base: &str, new: &str) -> Result<Swapped> {
        match self.swap(ident, base, new).await {
            Ok(true) => Ok(Swapped::Landed),
            Ok(false) => Ok(Swapped::Lost),
            Err(e) => match self.metadata_location(ident).await {
                Ok(Some(now)) if now == new => Ok(Swapped::Landed),
                Ok(Some(now)) if now == base => Err(e),
                _ => Err(Error::new(
                    dotdo_core::ErrorKind::AmbiguousOutcome,
                    format!(
                        "moving the catalog pointer of {ident} failed and its outcome could not be established: {e}"
                    ),
                )),
            },
        }
    }
}

/// An opened catalog and, for SQL catalogs, its commit verifier.
pub(crate) struct Opened {
    pub(crate) catalog: Arc<dyn Catalog>,
    pub(crate) verifier: Option<SqlVerifier>,
    /// The catalog runs in this process (the in-memory one): a commit it did not apply when it
    /// answered never lands later.
    pub(crate) in_process: bool,
}

/// Open the configured catalog. `settings.catalog_name` is the catalog name recorded in the SQL
/// catalog's rows (PyIceberg's `SqlCatalog(name, ...)` must use the same); a REST catalog's
/// requests are bounded by `settings.catalog_timeout`.
pub(crate) async fn open(
    config: &CatalogConfig,
    settings: &crate::Settings,
    warehouse: &str,
    factory: Arc<dyn StorageFactory>,
) -> Result<Opened> {
    let name = settings.catalog_name.as_str();
    let plain = |catalog| Ok(Opened { catalog, verifier: None, in_process: false });
    let in_process = |catalog| Ok(Opened { catalog, verifier: None, in_process: true });
    match config {
        CatalogConfig::Default => {
            if let Some(rest) = warehouse.strip_prefix("file://") {
                // The warehouse URL's path is percent-encoded; the catalog file is at the plain path.
                let dir = percent_encoding::percent_decode_str(rest).decode_utf8_lossy();
                let uri = default_sqlite_uri(std::path::Path::new(&*dir));
                open_sql(&uri, name, warehouse, factory).await
            } else if warehouse.starts_with("memory://") {
                in_process(open_memory(name, warehouse, factory).await?)
            } else {
                let options = match (cfg!(feature = "sql"), cfg!(feature = "rest")) {
                    (true, true) => "CatalogConfig::Sql (an SQLite file), Rest, Memory (not durable) or Custom",
                    (true, false) => "CatalogConfig::Sql (an SQLite file), Memory (not durable) or Custom",
                    (false, true) => "CatalogConfig::Rest, Memory (not durable) or Custom",
                    (false, false) => "CatalogConfig::Memory (not durable) or Custom",
                };
                Err(Error::invalid(format!("warehouse {warehouse} has no default catalog: configure {options}")))
            }
        }
        CatalogConfig::Sql { uri } => open_sql(uri, name, warehouse, factory).await,
        CatalogConfig::Memory => in_process(open_memory(name, warehouse, factory).await?),
        #[cfg(feature = "rest")]
        CatalogConfig::Rest { uri, warehouse: wh, properties } => {
            let uri = &rest_uri(uri)?;
            let mut props: HashMap<String, String> = properties.clone().into_iter().collect();
            props.insert(iceberg_catalog_rest::REST_CATALOG_PROP_URI.to_string(), uri.clone());
            if let Some(w) = wh {
                props.insert(iceberg_catalog_rest::REST_CATALOG_PROP_WAREHOUSE.to_string(), w.clone());
            }
            check_rest_headers(&props)?;
            // An OAuth credential without a fixed token: the token it was exchanged for is
            // exchanged anew when the catalog says it expired (iceberg-catalog-rest keeps the
            // first one for good).
            let renews = props.contains_key("credential") && !props.contains_key("token");
            let secrets: Vec<String> = props
                .iter()
                .filter(|(k, v)| is_secret_property(k) && !v.trim().is_empty())
                .map(|(_, v)| v.trim().to_string())
                .collect();
            let catalog = iceberg_catalog_rest::RestCatalogBuilder::default()
                .with_client(rest_client(settings.catalog_timeout)?)
                .with_storage_factory(factory.clone())
                .load(name.to_string(), props)
                .await
                .map_err(|e| {
                    // iceberg-catalog-rest puts some values in its messages ("Invalid header
                    // value: …"): the secret ones never reach dotdo's error (nor its logs).
                    let e = crate::error::classify(e, &format!("opening REST catalog {}", without_credentials(uri)));
                    let msg = crate::error::redact(e.message(), &secrets);
                    dotdo_core::Error::new(e.kind().clone(), msg).with_retryable(e.is_retryable())
                })?;
            plain(Arc::new(Redacted::new(catalog, without_credentials(uri), renews, factory)))
        }
        CatalogConfig::Custom(build) => {
            plain(build(factory).await.map_err(|e| e.context(format!("opening catalog {name}")))?)
        }
    }
}

/// Without the `sql` feature (a build that links no SQLite, e.g. beside dotdo-libsql): no SQL
/// catalog, the default of a local warehouse included.
#[cfg(not(feature = "sql"))]
async fn open_sql(_uri: &str, _name: &str, warehouse: &str, _factory: Arc<dyn StorageFactory>) -> Result<Opened> {
    Err(Error::invalid(format!(
        "warehouse {warehouse}: the SQL catalog (also the default of a local warehouse) needs dotdo-iceberg's `sql` \
         feature; configure CatalogConfig::Rest, Memory or Custom"
    )))
}

/// Without the `sql` feature there is no SQL catalog to verify or swap through: never
/// constructed (every `Option<SqlVerifier>` is `None`), so these are never called.
#[cfg(not(feature = "sql"))]
#[derive(Debug)]
pub(crate) enum SqlVerifier {}

#[cfg(not(feature = "sql"))]
impl SqlVerifier {
    pub(crate) async fn metadata_location(&self, _ident: &TableIdent) -> Result<Option<String>> {
        match *self {}
    }
    pub(crate) async fn tables_at(
        &self,
        _ident: &TableIdent,
        _locations: &[&str],
        _root: &crate::StoreRoot,
    ) -> Result<Vec<Vec<String>>> {
        match *self {}
    }
    pub(crate) async fn swap_resolved(&self, _ident: &TableIdent, _base: &str, _new: &str) -> Result<Swapped> {
        match *self {}
    }
    pub(crate) async fn swap_or_clean(
        &self,
        _io: &iceberg::io::FileIO,
        _ident: &TableIdent,
        _base: &str,
        _new: &str,
        _written: Vec<String>,
    ) -> iceberg::Result<()> {
        match *self {}
    }
}

#[cfg(feature = "sql")]
async fn open_sql(uri: &str, name: &str, warehouse: &str, factory: Arc<dyn StorageFactory>) -> Result<Opened> {
    // `mode=` among the URI's options, not anywhere in it (a directory may be named `mode=prod`).
    let has_mode = uri.split_once('?').is_some_and(|(_, q)| q.split('&').any(|kv| kv.starts_with("mode=")));
    let uri = if uri.starts_with("sqlite:") && !has_mode {
        format!("{uri}{}mode=rwc", if uri.contains('?') { '&' } else { '?' })
    } else {
        uri.to_string()
    };
    // An in-memory SQLite database is private to its connection: iceberg-catalog-sql's pool
    // opens several and closes idle ones, each a new empty catalog (tables vanished after 10 s
    // idle, or as soon as two calls overlapped).
    if uri.starts_with("sqlite:") && sqlite_path(&uri).is_none() {
        return Err(Error::invalid(format!(
            "SQL catalog {uri}: an in-memory SQLite catalog loses its tables (each pooled connection is a \
             database of its own); use CatalogConfig::Memory for a catalog in memory, or a file"
        )));
    }
    let verifier = if uri.starts_with("sqlite:") { Some(SqlVerifier::connect(&uri, name).await?) } else { None };
    let catalog = iceberg_catalog_sql::SqlCatalogBuilder::default()
        .uri(uri.clone())
        .warehouse_location(warehouse.to_string())
        .sql_bind_style(iceberg_catalog_sql::SqlBindStyle::QMark)
        .with_storage_factory(factory)
        .load(name.to_string(), HashMap::new())
        .await
        .map_err(|e| crate::error::classify(e, &format!("opening SQL catalog {}", without_password(&uri))))?;
    Ok(Opened { catalog: Arc::new(catalog), verifier, in_process: false })
}

async fn open_memory(name: &str, warehouse: &str, factory: Arc<dyn StorageFactory>) -> Result<Arc<dyn Catalog>> {
    let catalog = iceberg::memory::MemoryCatalogBuilder::default()
        .with_storage_factory(factory)
        .load(
            name.to_string(),
            HashMap::from([(iceberg::memory::MEMORY_CATALOG_WAREHOUSE.to_string(), warehouse.to_string())]),
        )
        .await
        .map_err(|e| crate::error::classify(e, "opening memory catalog"))?;
    Ok(Arc::new(catalog))
}

/// A catalog view whose `load_table` returns a fixed table for one identifier.
///
/// iceberg's `Transaction::commit` reloads the table and silently rebases the commit onto a newer
/// head, which would skip dotdo's watermark check and drop other writers' watermarks from the
/// cumulative summary. Committing through this view pins the base to the table the watermarks
/// were read from: if the head moved, the catalog's `RefSnapshotIdMatch` requirement fails with a
/// conflict, and dotdo re-reads the watermarks before retrying.
///
/// With the SQL catalog (`swap` set), a commit to the pinned table is applied to the pinned
/// table itself and lands by moving the catalog pointer from the pinned table's metadata
/// location, in one conditional `UPDATE`. iceberg-catalog-sql's own `update_table` first reads
/// and parses the current metadata JSON again, which holds every retained snapshot: that read
/// made each commit slower the more snapshots a table had. The compare-and-swap is on the exact
/// metadata location, which is stricter than iceberg's requirement checks: any commit that
/// landed since the pinned version (also one that changed only properties, the schema or the
/// partition spec, which iceberg-catalog-sql would have rebased onto) makes it a conflict, and
/// the caller reloads and retries.
#[derive(Debug)]
pub(crate) struct PinnedCatalog<'a> {
    inner: &'a dyn Catalog,
    table: Table,
    swap: Option<&'a SqlVerifier>,
    /// Whether a commit reached the catalog (its `update_table`, or the SQL pointer swap): an
    /// error before that (writing manifests or the metadata file) is one of a commit not sent.
    sent: std::sync::atomic::AtomicBool,
    /// Before a commit is sent through another catalog than SQL, the table is read again and a
    /// table at another metadata location than the pinned one is a conflict (see
    /// [`unmoved_checked`](Self::unmoved_checked)).
    check_unmoved: bool,
}

impl<'a> PinnedCatalog<'a> {
    /// A view of `inner` pinned to `table`; `swap` is the SQL catalog's pointer access, if the
    /// catalog is the SQL catalog.
    pub(crate) fn new(inner: &'a dyn Catalog, table: Table, swap: Option<&'a SqlVerifier>) -> Self {
        PinnedCatalog { inner, table, swap, sent: false.into(), check_unmoved: false }
    }

    /// This view, checking before a commit through another catalog than SQL that the table is
    /// still at the pinned version. iceberg's commits require only what their action names
    /// (an expiry: the main branch's head), so another engine's tag or branch made on a
    /// snapshot the commit removes would be removed with it; with the check, only what moves
    /// between this read and the commit goes unseen (the SQL catalog's pointer swap needs no
    /// check: it is on the exact metadata location).
    pub(crate) fn unmoved_checked(mut self) -> Self {
        self.check_unmoved = true;
        self
    }

    /// Whether a commit was sent to the catalog through this view.
    pub(crate) fn was_sent(&self) -> bool {
        self.sent.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `e` of a commit through this view: marked not sent ([`NotSent`]) if it failed before
    /// reaching the catalog, unless already marked.
    pub(crate) fn mark(&self, e: iceberg::Error) -> iceberg::Error {
        if self.was_sent() || did_not_land(&e) {
            e
        } else {
            not_sent_error(crate::error::classify(e, "preparing a commit"))
        }
    }

    /// Commit `commit` on the pinned table through the SQL catalog's pointer swap.
    async fn swap_commit(&self, swap: &SqlVerifier, commit: TableCommit) -> iceberg::Result<Table> {
        let ident = commit.identifier().clone();
        let base = self.table.metadata_location_result()?.to_string();
        let what = format!("committing to {ident}");
        let unreadable = |e: Error, why: String| {
            iceberg::Error::new(
                iceberg::ErrorKind::Unexpected,
                format!("the commit's metadata would be unreadable{why}"),
            )
            .with_source(e)
        };
        // iceberg's builder refuses a version stamped over a minute before the table's last
        // snapshot (iceberg's own append stamps the wall clock): this host's clock, not the
        // table, is the trouble (a retryable refusal; the builder's error is kept in the message).
        // Damaged or foreign metadata iceberg's builder would number past `i32::MAX` or panic
        // on is refused, as on dotdo's own commit path (`commit::staged`).
        crate::commit::refuse_last_version(&base)?;
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| commit.apply(self.table.clone())))
            .map_err(|p| crate::commit::builder_panicked(&base, p))?;
        let staged =
            applied.map_err(|e| match crate::commit::refuse_if_clock_behind(self.table.metadata(), &what) {
                Err(clock) => unreadable(clock, format!(" ({e})")),
                Ok(()) => e,
            })?;
        // (A new schema's id past `i32::MAX` wrapped in a release build; the table's own schemas
        // are not judged here.)
        let base_md = self.table.metadata();
        if staged.metadata().schemas_iter().any(|s| s.schema_id() < 0 && base_md.schema_by_id(s.schema_id()).is_none())
        {
            return Err(iceberg::Error::new(
                iceberg::ErrorKind::DataInvalid,
                format!("table metadata at {base}: no schema id left for another schema"),
            ));
        }
        crate::commit::check_update_time(staged.metadata(), &what).map_err(|e| unreadable(e, String::new()))?;
        let location = iceberg::MetadataLocation::from_str(staged.metadata_location_result()?)?;
        let new = location.to_string();
        // A metadata file whose write failed is deleted (it may be there; nothing names it).
        if let Err(e) = staged.metadata().write_to(staged.file_io(), &location).await {
            let _ = staged.file_io().delete(&new).await;
            return Err(e);
        }
        self.sent.store(true, std::sync::atomic::Ordering::SeqCst);
        let swapped = swap.swap_or_clean(staged.file_io(), &ident, &base, &new, vec![new.clone()]).await;
        if let Err(e) = &swapped {
            // Lost, or failed for certain: the files iceberg's own commit wrote before it (the
            // new snapshot's manifest list and the manifests it added; iceberg deletes neither)
            // go with the metadata file. (Read only then: a commit that lands reads nothing
            // more.)
            if e.kind() == iceberg::ErrorKind::CatalogCommitConflicts || did_not_land(e) {
                delete_new_snapshot_files(&staged, base_md).await;
            }
        }
        swapped?;
        Ok(staged)
    }
}

/// Delete the manifest list of each snapshot of `staged` that `base` lacks, and the manifests
/// that snapshot added (best effort: a list that cannot be read leaves its manifests to a
/// cleanup), for a commit that certainly did not land.
async fn delete_new_snapshot_files(staged: &Table, base: &iceberg::spec::TableMetadata) {
    let mut files = Vec::new();
    for snap in staged.metadata().snapshots().filter(|s| base.snapshot_by_id(s.snapshot_id()).is_none()) {
        if let Ok(list) = staged.manifest_list_reader(snap).load().await {
            files.extend(
                list.entries()
                    .iter()
                    .filter(|m| m.added_snapshot_id == snap.snapshot_id())
                    .map(|m| m.manifest_path.clone()),
            );
        }
        files.push(snap.manifest_list().to_string());
    }
    delete_quietly(staged.file_io(), files).await;
}

/// Best-effort deletion of a failed commit's files through `io` (nothing references them; one
/// that cannot be deleted is left to a cleanup).
async fn delete_quietly(io: &iceberg::io::FileIO, files: Vec<String>) {
    for f in files {
        if let Err(e) = io.delete(&f).await {
            tracing::debug!(file = %f, error = %e, "could not delete an unreferenced commit file");
        }
    }
}

#[cfg(feature = "sql")]
impl SqlVerifier {
    /// Move `ident`'s pointer from `base` to `new` for an iceberg-style commit whose attempt
    /// wrote the files `written` (the new metadata JSON among them). Landed: `Ok`. Lost to
    /// another commit: the files are deleted (nothing references them) and the error is
    /// [`lost_swap`]'s conflict. The swap failed: the files are deleted unless the outcome is
    /// unknown, and the error, with dotdo's error as its source (`classify` keeps its kind), is
    /// an unknown outcome for the caller, which reads the table back.
    pub(crate) async fn swap_or_clean(
        &self,
        io: &iceberg::io::FileIO,
        ident: &TableIdent,
        base: &str,
        new: &str,
        written: Vec<String>,
    ) -> iceberg::Result<()> {
        let delete = |written: Vec<String>| delete_quietly(io, written);
        match self.swap_resolved(ident, base, new).await {
            Ok(Swapped::Landed) => Ok(()),
            Ok(Swapped::Lost) => {
                delete(written).await;
                Err(lost_swap(ident, base))
            }
            Err(e) => {
                let failed = iceberg::Error::new(
                    iceberg::ErrorKind::Unexpected,
                    format!("moving the catalog pointer of {ident} to {new}"),
                );
                if e.kind() != &dotdo_core::ErrorKind::AmbiguousOutcome {
                    // The pointer was read back at the base: nothing references these files.
                    delete(written).await;
                    return Err(failed.with_source(NotLanded(e)));
                }
                Err(failed.with_source(e))
            }
        }
    }
}

/// The source of a commit's error when its pointer swap failed and the pointer was read back at
/// its base: the commit certainly did not land (its files are deleted), so it is no unknown
/// outcome; the error inside says why (`Unavailable` for a busy catalog).
#[derive(Debug)]
pub(crate) struct NotLanded(pub(crate) Error);

impl std::fmt::Display for NotLanded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the commit did not land: {}", self.0)
    }
}

impl std::error::Error for NotLanded {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Whether `e` is a commit error whose pointer swap certainly did not land ([`NotLanded`],
/// [`Throttled`], or [`NotSent`]: never sent).
pub(crate) fn did_not_land(e: &iceberg::Error) -> bool {
    in_chain::<NotLanded>(e) || in_chain::<NotSent>(e) || in_chain::<Throttled>(e)
}

/// The source of a commit's error when the catalog refused it for now, applying nothing (a REST
/// 408 or 429): sent again while the append's attempts last, not counted as a catalog failing
/// commits (a throttling catalog ended an append after two refusals).
#[derive(Debug)]
pub(crate) struct Throttled(pub(crate) Error);

impl std::fmt::Display for Throttled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the catalog refused the commit for now: {}", self.0)
    }
}

impl std::error::Error for Throttled {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Whether `e` is a commit error that does not count as a catalog failing commits: never sent
/// ([`NotSent`]), or refused for now ([`Throttled`]).
pub(crate) fn not_counted(e: &iceberg::Error) -> bool {
    in_chain::<NotSent>(e) || in_chain::<Throttled>(e)
}

/// Whether `e` or one of its sources is a `T`.
fn in_chain<T: std::error::Error + 'static>(e: &iceberg::Error) -> bool {
    crate::error::chain(e).any(|err| err.is::<T>())
}

/// The source of a commit's error when it failed before anything was sent to the catalog
/// (writing its manifests or metadata file): it certainly did not land, and no catalog refused
/// it either, so it does not count as a failed commit (a store in trouble is retried as long as
/// the append's attempts last).
#[derive(Debug)]
pub(crate) struct NotSent(pub(crate) Error);

impl std::fmt::Display for NotSent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the commit was not sent: {}", self.0)
    }
}

impl std::error::Error for NotSent {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// `e` as the iceberg error of a commit that failed before it was sent.
pub(crate) fn not_sent_error(e: Error) -> iceberg::Error {
    iceberg::Error::new(iceberg::ErrorKind::Unexpected, "the commit was not sent").with_source(NotSent(e))
}

/// The error of a pointer swap that lost to another commit: a conflict for dotdo (which
/// reloads and retries), not retryable for iceberg's own commit retry (a retry on the same
/// pinned table would lose again).
#[cfg_attr(not(feature = "sql"), allow(dead_code))] // the SQL catalog's swap only
pub(crate) fn lost_swap(ident: &TableIdent, base: &str) -> iceberg::Error {
    iceberg::Error::new(
        iceberg::ErrorKind::CatalogCommitConflicts,
        format!("commit conflicted for table {ident}: the catalog no longer points at {base}"),
    )
    .with_retryable(false)
}

/// `impl Catalog for $ty` passing every call to `self.$inner`, except `load_table` and
/// `update_table`, whose bodies are given (with `self` named by the caller).
macro_rules! forwarding_catalog {
    ($ty:ty, $inner:ident,
     load_table($s1:ident, $table:ident) $load:expr,
     update_table($s2:ident, $commit:ident) $update:expr) => {
        #[async_trait]
        impl Catalog for $ty {
            async fn list_namespaces(&self, parent: Option<&NamespaceIdent>) -> iceberg::Result<Vec<NamespaceIdent>> {
                self.$inner.list_namespaces(parent).await
            }
            async fn create_namespace(
                &self,
                namespace: &NamespaceIdent,
                properties: HashMap<String, String>,
            ) -> iceberg::Result<Namespace> {
                self.$inner.create_namespace(namespace, properties).await
            }
            async fn get_namespace(&self, namespace: &NamespaceIdent) -> iceberg::Result<Namespace> {
                self.$inner.get_namespace(namespace).await
            }
            async fn namespace_exists(&self, namespace: &NamespaceIdent) -> iceberg::Result<bool> {
                self.$inner.namespace_exists(namespace).await
            }
            async fn update_namespace(
                &self,
                namespace: &NamespaceIdent,
                properties: HashMap<String, String>,
            ) -> iceberg::Result<()> {
                self.$inner.update_namespace(namespace, properties).await
            }
            async fn drop_namespace(&self, namespace: &NamespaceIdent) -> iceberg::Result<()> {
                self.$inner.drop_namespace(namespace).await
            }
            async fn list_tables(&self, namespace: &NamespaceIdent) -> iceberg::Result<Vec<TableIdent>> {
                self.$inner.list_tables(namespace).await
            }
            async fn create_table(
                &self,
                namespace: &NamespaceIdent,
                creation: TableCreation,
            ) -> iceberg::Result<Table> {
                self.$inner.create_table(namespace, creation).await
            }
            async fn load_table(&self, $table: &TableIdent) -> iceberg::Result<Table> {
                let $s1 = self;
                $load
            }
            async fn drop_table(&self, table: &TableIdent) -> iceberg::Result<()> {
                self.$inner.drop_table(table).await
            }
            async fn purge_table(&self, table: &TableIdent) -> iceberg::Result<()> {
                self.$inner.purge_table(table).await
            }
            async fn table_exists(&self, table: &TableIdent) -> iceberg::Result<bool> {
                self.$inner.table_exists(table).await
            }
            async fn rename_table(&self, src: &TableIdent, dest: &TableIdent) -> iceberg::Result<()> {
                self.$inner.rename_table(src, dest).await
            }
            async fn register_table(&self, table: &TableIdent, metadata_location: String) -> iceberg::Result<Table> {
                self.$inner.register_table(table, metadata_location).await
            }
            async fn update_table(&self, $commit: TableCommit) -> iceberg::Result<Table> {
                let $s2 = self;
                $update
            }
        }
    };
}

forwarding_catalog!(PinnedCatalog<'_>, inner,
    load_table(this, table) if table == this.table.identifier() {
        Ok(this.table.clone())
    } else {
        this.inner.load_table(table).await
    },
    update_table(this, commit) match this.swap {
        Some(swap) if commit.identifier() == this.table.identifier() => this.swap_commit(swap, commit).await,
        // Every dotdo attempt is one catalog call: an error iceberg would retry by itself (a
        // REST 409, a custom catalog's "retry" after a broken connection) would re-send the
        // commit on the same pinned base, which loses to the commit itself if that landed, and
        // a conflict then reads as "did not land". dotdo reloads and decides.
        _ => {
            if this.check_unmoved && commit.identifier() == this.table.identifier() {
                let now = this.inner.load_table(commit.identifier()).await?;
                if now.metadata_location() != this.table.metadata_location() {
                    return Err(iceberg::Error::new(
                        iceberg::ErrorKind::CatalogCommitConflicts,
                        format!("commit conflicted for table {}: the table moved since it was read", commit.identifier()),
                    )
                    .with_retryable(false));
                }
            }
            this.sent.store(true, std::sync::atomic::Ordering::SeqCst);
            this.inner.update_table(commit).await.map_err(|e| {
                // A REST catalog that could not be reached (connection refused): the commit was
                // never sent, so it certainly did not land (not an unknown outcome to read back,
                // which with the catalog down ended `AmbiguousOutcome`).
                #[cfg(feature = "rest")]
                if failed_to_connect(&e) {
                    return not_sent_error(crate::error::classify(e, "sending a commit to the REST catalog"));
                }
                // Refused before anything was applied (a REST 3xx or 4xx answer, a table that
                // is not there): no unknown outcome to read back and send again, up to every
                // attempt (a 403 ended `AmbiguousOutcome` after 16 commits).
                // A 408 or 429 (the catalog busy: retryable) is sent again while the append's
                // attempts last, not counted as a catalog failing commits.
                if crate::error::refused_unapplied(&e) {
                    let refused = crate::error::classify(e, "a commit the catalog refused");
                    let outer = iceberg::Error::new(iceberg::ErrorKind::Unexpected, "the catalog refused the commit");
                    return if refused.is_retryable() {
                        outer.with_source(Throttled(refused))
                    } else {
                        outer.with_source(NotLanded(refused))
                    };
                }
                e.with_retryable(false)
            })
        }
    }
);

/// The HTTP client of a REST catalog: each request bounded by `timeout` (connecting by at most
/// 10 s of it). iceberg-catalog-rest's own default client has no timeout at all: a catalog that
/// accepts connections and never answers held a commit (and the appends queued behind it) for
/// ever. Only redirects that keep the method and body (307, 308) are followed: reqwest's default
/// follows a 301, 302 or 303 by sending a commit's POST again as a GET, whose answer (the table
/// as it is) parsed as the commit's: a commit never applied was acknowledged. Such an answer is
/// returned as it is (`InvalidInput`: configure the URI it points to).
#[cfg(feature = "rest")]
fn rest_client(timeout: std::time::Duration) -> Result<reqwest::Client> {
    let redirects = reqwest::redirect::Policy::custom(|attempt| {
        let keeps_method = matches!(attempt.status().as_u16(), 307 | 308);
        if keeps_method && attempt.previous().len() < 10 {
            attempt.follow()
        } else {
            attempt.stop()
        }
    });
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(std::time::Duration::from_secs(10)))
        .redirect(redirects)
        .build()
        .map_err(|e| Error::backend(format!("building the REST catalog's HTTP client: {e}")).with_retryable(false))
}

/// Whether `e` failed to connect to a REST catalog (a refused connection, a name that does not
/// resolve, a connect timeout): its request was never sent.
#[cfg(feature = "rest")]
fn failed_to_connect(e: &iceberg::Error) -> bool {
    crate::error::chain(e).any(|err| err.downcast_ref::<reqwest::Error>().is_some_and(reqwest::Error::is_connect))
}

#[cfg(feature = "rest")]
/// Whether a REST catalog property holds a secret (a token, a credential, a header such as
/// `Authorization`).
fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.starts_with("header.") || k.contains("token") || k.contains("credential") || k.contains("secret")
}

/// Every `header.*` property and the `token` (sent as `Authorization: Bearer …`) must make a
/// valid HTTP header: iceberg-catalog-rest would find out on the first call, and report the
/// value in its message. `InvalidInput` naming the property, never its value.
#[cfg(feature = "rest")]
fn check_rest_headers(props: &HashMap<String, String>) -> dotdo_core::Result<()> {
    for (key, value) in props {
        let valid = if let Some(name) = key.strip_prefix("header.") {
            http::HeaderName::from_bytes(name.as_bytes()).is_ok() && http::HeaderValue::from_str(value).is_ok()
        } else if key == "token" {
            http::HeaderValue::from_str(&format!("Bearer {value}")).is_ok()
        } else {
            true
        };
        if !valid {
            return Err(dotdo_core::Error::invalid(format!(
                "REST catalog property {key:?}: not a valid HTTP header name and value (the value is not shown)"
            )));
        }
    }
    Ok(())
}

#[cfg(feature = "rest")]
/// A REST catalog whose `Debug` shows only where it is (iceberg-catalog-rest's derived `Debug`
/// prints its properties, token and credential included, to whoever prints the catalog), and
/// which renews an expired OAuth token.
struct Redacted {
    inner: Arc<iceberg_catalog_rest::RestCatalog>,
    uri: String,
    /// A credential is configured (not a fixed token): a token the catalog answers as expired
    /// (401, or 419 as the REST spec has it) is exchanged anew.
    renews: bool,
    /// A FileIO on dotdo's storage, and the runtime tables run on, for the tables handed out.
    file_io: iceberg::io::FileIO,
    runtime: iceberg::Runtime,
}

#[cfg(feature = "rest")]
impl Redacted {
    /// Wrap `inner` (call within the tokio runtime its tables are to use).
    fn new(
        inner: iceberg_catalog_rest::RestCatalog,
        uri: String,
        renews: bool,
        factory: Arc<dyn StorageFactory>,
    ) -> Self {
        let runtime = iceberg::Runtime::current();
        let file_io = iceberg::io::FileIOBuilder::new(factory).build();
        Redacted { inner: Arc::new(inner), uri, renews, file_io, runtime }
    }

    /// `table` with a FileIO of dotdo's storage alone. iceberg-catalog-rest builds each table's
    /// FileIO from the catalog's own properties (the OAuth credential, the token, headers) and
    /// the table's vended configuration (storage keys), and a table's `Debug` prints them all;
    /// dotdo's storage takes nothing from them.
    fn scrubbed(&self, table: iceberg::Result<Table>) -> iceberg::Result<Table> {
        let table = table?;
        let mut b = Table::builder()
            .metadata(table.metadata_ref())
            .identifier(table.identifier().clone())
            .file_io(self.file_io.clone())
            .readonly(table.readonly())
            .runtime(self.runtime.clone());
        if let Some(location) = table.metadata_location() {
            b = b.metadata_location(location);
        }
        b.build()
    }

    /// Whether the token was refused as expired and renewed (it is an error if it cannot be).
    async fn renewed(&self, e: &iceberg::Error) -> iceberg::Result<bool> {
        if !self.renews || !crate::error::token_refused(e) {
            return Ok(false);
        }
        self.inner.regenerate_token().await?;
        Ok(true)
    }

    /// `call`, and once more if its token was refused as expired and renewed: the refused
    /// request was not applied.
    async fn renewing<T, F, Fut>(&self, call: F) -> iceberg::Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = iceberg::Result<T>>,
    {
        match call().await {
            Err(e) if self.renewed(&e).await? => call().await,
            other => other,
        }
    }

    /// A call that cannot be sent again from here (its argument is consumed): after a renewal
    /// it fails retryably ([`TOKEN_RENEWED`](crate::error::TOKEN_RENEWED)) and the caller's
    /// next attempt carries the new token.
    async fn renewed_or<T>(&self, out: iceberg::Result<T>) -> iceberg::Result<T> {
        match out {
            Err(e) if self.renewed(&e).await? => {
                // Refused for its token: nothing was applied (a commit's files are no one's).
                let refused = crate::error::classify(e, "a call refused for its expired token");
                Err(iceberg::Error::new(iceberg::ErrorKind::Unexpected, crate::error::TOKEN_RENEWED)
                    .with_source(NotLanded(refused)))
            }
            other => other,
        }
    }
}

#[cfg(feature = "rest")]
impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RestCatalog").field("uri", &self.uri).finish_non_exhaustive()
    }
}

#[cfg(feature = "rest")]
#[async_trait]
impl Catalog for Redacted {
    async fn list_namespaces(&self, parent: Option<&NamespaceIdent>) -> iceberg::Result<Vec<NamespaceIdent>> {
        self.renewing(|| self.inner.list_namespaces(parent)).await
    }
    async fn create_namespace(
        &self,
        namespace: &NamespaceIdent,
        properties: HashMap<String, String>,
    ) -> iceberg::Result<Namespace> {
        self.renewing(|| self.inner.create_namespace(namespace, properties.clone())).await
    }
    async fn get_namespace(&self, namespace: &NamespaceIdent) -> iceberg::Result<Namespace> {
        self.renewing(|| self.inner.get_namespace(namespace)).await
    }
    async fn namespace_exists(&self, namespace: &NamespaceIdent) -> iceberg::Result<bool> {
        self.renewing(|| self.inner.namespace_exists(namespace)).await
    }
    async fn update_namespace(
        &self,
        namespace: &NamespaceIdent,
        properties: HashMap<String, String>,
    ) -> iceberg::Result<()> {
        self.renewing(|| self.inner.update_namespace(namespace, properties.clone())).await
    }
    async fn drop_namespace(&self, namespace: &NamespaceIdent) -> iceberg::Result<()> {
        self.renewing(|| self.inner.drop_namespace(namespace)).await
    }
    async fn list_tables(&self, namespace: &NamespaceIdent) -> iceberg::Result<Vec<TableIdent>> {
        self.renewing(|| self.inner.list_tables(namespace)).await
    }
    async fn create_table(&self, namespace: &NamespaceIdent, creation: TableCreation) -> iceberg::Result<Table> {
        let out = self.inner.create_table(namespace, creation).await;
        self.scrubbed(self.renewed_or(out).await)
    }
    async fn load_table(&self, table: &TableIdent) -> iceberg::Result<Table> {
        self.scrubbed(self.renewing(|| self.inner.load_table(table)).await)
    }
    async fn drop_table(&self, table: &TableIdent) -> iceberg::Result<()> {
        self.renewing(|| self.inner.drop_table(table)).await
    }
    async fn purge_table(&self, table: &TableIdent) -> iceberg::Result<()> {
        self.renewing(|| self.inner.purge_table(table)).await
    }
    async fn table_exists(&self, table: &TableIdent) -> iceberg::Result<bool> {
        self.renewing(|| self.inner.table_exists(table)).await
    }
    async fn rename_table(&self, src: &TableIdent, dest: &TableIdent) -> iceberg::Result<()> {
        self.renewing(|| self.inner.rename_table(src, dest)).await
    }
    async fn register_table(&self, table: &TableIdent, metadata_location: String) -> iceberg::Result<Table> {
        self.scrubbed(self.renewing(|| self.inner.register_table(table, metadata_location.clone())).await)
    }
    async fn update_table(&self, commit: TableCommit) -> iceberg::Result<Table> {
        let out = self.inner.update_table(commit).await;
        self.scrubbed(self.renewed_or(out).await)
    }
}

#[cfg(test)]
mod tests {
    #[cfg(feature = "sql")]
    use super::{default_sqlite_uri, sqlite_path, swap_failure};

    /// A REST catalog server for one test: a token endpoint that issues `t1`, `t2`, …, a config
    /// endpoint, and catalog endpoints that refuse the odd tokens as expired (401: a catalog's
    /// first token, the renewed one is even) and answer the others. Returns its port and the
    /// requests seen (request line and authorization).
    #[cfg(feature = "rest")]
    fn expiring_token_server() -> (u16, std::sync::Arc<parking_lot::Mutex<Vec<String>>>) {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let log = seen.clone();
        // Table `ns.t`, with storage keys vended in its configuration.
        let creation = iceberg::TableCreation::builder()
            .name("t".to_string())
            .location("memory://rest/ns/t".to_string())
            .schema(iceberg::spec::Schema::builder().build().expect("schema"))
            .build();
        let metadata = iceberg::spec::TableMetadataBuilder::from_table_creation(creation)
            .and_then(|b| b.build())
            .expect("table metadata")
            .metadata;
        let table = serde_json::json!({
            "metadata-location": "memory://rest/ns/t/metadata/00000-x.metadata.json",
            "metadata": metadata,
            "config": {"s3.secret-access-key": "vended-s3cr3t"},
        })
        .to_string();
        std::thread::spawn(move || {
            let mut issued = 0;
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let Some((line, headers, _)) = dotdo_core::testkit::read_http_request(&conn) else { continue };
                let auth = headers
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case("authorization"))
                    .map_or_else(String::new, |(_, value)| value.clone());
                log.lock().push(format!("{line} [{auth}]"));
                let (status, answer) = if line.starts_with("POST /v1/oauth/tokens") {
                    issued += 1;
                    let token = format!(r#"{{"access_token":"t{issued}","token_type":"bearer"}}"#);
                    ("200 OK", token)
                } else if line.starts_with("GET /v1/config") {
                    ("200 OK", r#"{"defaults":{},"overrides":{}}"#.to_string())
                } else if auth.strip_prefix("Bearer t").and_then(|n| n.parse::<u32>().ok()).is_some_and(|n| n % 2 == 1)
                {
                    let expired = r#"{"error":{"message":"token expired","type":"NotAuthorizedException","code":401}}"#;
                    ("401 Unauthorized", expired.to_string())
                } else if line.starts_with("GET /v1/namespaces/ns/tables/t ") {
                    ("200 OK", table.clone())
                } else if line.starts_with("GET /v1/namespaces") {
                    ("200 OK", r#"{"namespaces":[]}"#.to_string())
                } else {
                    let gone =
                        r#"{"error":{"message":"no such namespace","type":"NoSuchNamespaceException","code":404}}"#;
                    ("404 Not Found", gone.to_string())
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = conn.write_all(reply.as_bytes());
            }
        });
        (port, seen)
    }

    /// A REST catalog whose OAuth token expires gets a new one for the credential: a call the
    /// catalog refused as unauthorized is sent again with it, and a commit or table creation
    /// (whose argument is consumed) fails retryably (`Unavailable`), its next attempt carrying
    /// the new token. iceberg-catalog-rest kept the first token for good: after its expiry every
    /// call failed until the process restarted.
    #[cfg(feature = "rest")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_rest_token_is_renewed() {
        use iceberg::{Catalog, CatalogBuilder, NamespaceIdent, TableCreation};
        let (port, seen) = expiring_token_server();
        let open = |renews: bool| async move {
            let mut props = std::collections::HashMap::from([
                (iceberg_catalog_rest::REST_CATALOG_PROP_URI.to_string(), format!("http://127.0.0.1:{port}")),
                ("credential".to_string(), "client:secret".to_string()),
            ]);
            if !renews {
                props.insert("token".to_string(), "t1".to_string());
            }
            let factory: std::sync::Arc<dyn iceberg::io::StorageFactory> =
                std::sync::Arc::new(iceberg::io::LocalFsStorageFactory);
            let catalog = iceberg_catalog_rest::RestCatalogBuilder::default()
                .with_storage_factory(factory.clone())
                .load("rest", props)
                .await
                .expect("catalog");
            super::Redacted::new(catalog, String::new(), renews, factory)
        };
        let c = open(true).await;
        assert_eq!(c.list_namespaces(None).await.expect("listed with a renewed token"), vec![]);
        let tokens = seen.lock().iter().filter(|l| l.starts_with("POST /v1/oauth/tokens")).count();
        assert_eq!(tokens, 2, "{:?}", seen.lock());
        assert!(seen.lock().last().is_some_and(|l| l.ends_with("[Bearer t2]")), "{:?}", seen.lock());
        // A creation refused for its token: retryable, the next attempt has the new token.
        let c = open(true).await;
        let schema = iceberg::spec::Schema::builder().build().expect("schema");
        let ns = NamespaceIdent::new("ns".to_string());
        let creation = TableCreation::builder().name("t".to_string()).schema(schema).build();
        let e = c.create_table(&ns, creation).await.expect_err("refused for its token");
        let e = crate::error::classify(e, "creating t");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Unavailable, "{e}");
        assert!(e.is_retryable(), "{e}");
        assert!(seen.lock().last().is_some_and(|l| l.starts_with("POST /v1/oauth/tokens")), "{:?}", seen.lock());
        // Refused for its token, the call was not applied: a commit's files are no one's.
        let c = open(true).await;
        let e = c
            .create_table(
                &ns,
                TableCreation::builder()
                    .name("u".to_string())
                    .schema(iceberg::spec::Schema::builder().build().expect("schema"))
                    .build(),
            )
            .await
            .expect_err("refused for its token");
        assert!(super::did_not_land(&e), "{e}");
        // A loaded table prints neither the catalog's credential nor the storage keys the
        // catalog vended for it (iceberg-catalog-rest puts both in the table's FileIO).
        let t = c.load_table(&iceberg::TableIdent::new(ns.clone(), "t".to_string())).await.expect("load");
        let shown = format!("{t:?}");
        assert!(!shown.contains("secret") && !shown.contains("s3cr3t"), "{shown}");
        assert_eq!(t.metadata().location(), "memory://rest/ns/t");
        // A fixed token is not exchanged: its refusal is the caller's to see.
        let before = seen.lock().len();
        let e = open(false).await.list_namespaces(None).await.expect_err("a fixed, expired token");
        assert!(crate::error::token_refused(&e), "{e}");
        assert!(!seen.lock()[before..].iter().any(|l| l.starts_with("POST /v1/oauth/tokens")), "{:?}", seen.lock());
    }

    /// An SQLite error with a result code, as sqlx reports one.
    #[cfg(feature = "sql")]
    #[derive(Debug)]
    struct Sqlite(&'static str);

    #[cfg(feature = "sql")]
    impl std::fmt::Display for Sqlite {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "sqlite error {}", self.0)
        }
    }

    #[cfg(feature = "sql")]
    impl std::error::Error for Sqlite {}

    #[cfg(feature = "sql")]
    impl sqlx::error::DatabaseError for Sqlite {
        fn message(&self) -> &str {
            "sqlite error"
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    /// The connection the pointer swaps commit on asks for F_FULLFSYNC (a plain fsync on macOS
    /// leaves a commit in the drive's cache), as the SQL hot stores do.
    #[cfg(feature = "sql")]
    #[tokio::test]
    async fn the_swap_connection_syncs_fully() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uri = super::default_sqlite_uri(dir.path());
        let v = super::SqlVerifier::connect(&uri, "dotdo").await.expect("connect");
        for pragma in ["fullfsync", "checkpoint_fullfsync"] {
            let on: i64 = sqlx::query_scalar(&format!("PRAGMA {pragma}")).fetch_one(&v.pool).await.expect("pragma");
            assert_eq!(on, 1, "{pragma}");
        }
    }

    /// A REST catalog's secret property values never reach dotdo's error (iceberg-catalog-rest
    /// puts an invalid header's value in its message), and the catalog prints without them.
    #[cfg(feature = "rest")]
    #[tokio::test]
    async fn rest_catalog_secrets_stay_out_of_errors_and_debug() {
        use iceberg::CatalogBuilder;
        let props =
            std::collections::BTreeMap::from([("header.Authorization".to_string(), "Bearer s3cr3t\n".to_string())]);
        let config =
            super::CatalogConfig::Rest { uri: "http://127.0.0.1:1".into(), warehouse: None, properties: props };
        let factory =
            crate::storage::StoreRoot::open("memory://rest", Vec::<(String, String)>::new()).expect("store").factory();
        let e = super::open(&config, &crate::Settings::default(), "memory://rest", factory.clone())
            .await
            .err()
            .expect("a bad header");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{e}");
        assert!(e.message().contains("header.Authorization"), "names the property: {e}");
        assert!(!format!("{e} {e:?}").contains("s3cr3t"), "{e:?}");
        for (key, value) in [("token", "s3cr3t\r\n"), ("header.bad name", "s3cr3t")] {
            let props = std::collections::BTreeMap::from([(key.to_string(), value.to_string())]);
            let config =
                super::CatalogConfig::Rest { uri: "http://127.0.0.1:1".into(), warehouse: None, properties: props };
            let e = super::open(&config, &crate::Settings::default(), "memory://rest", factory.clone())
                .await
                .err()
                .expect("refused");
            assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{key}: {e}");
            assert!(!format!("{e} {e:?}").contains("s3cr3t"), "{e:?}");
        }
        let props = std::collections::BTreeMap::from([("token".to_string(), "s3cr3t".to_string())]);
        let config =
            super::CatalogConfig::Rest { uri: "http://127.0.0.1:1".into(), warehouse: None, properties: props };
        let opened = super::open(&config, &crate::Settings::default(), "memory://rest", factory)
            .await
            .expect("a good token opens");
        assert!(!format!("{:?}", opened.catalog).contains("s3cr3t"));
        let props = std::collections::HashMap::from([
            (iceberg_catalog_rest::REST_CATALOG_PROP_URI.to_string(), "http://127.0.0.1:1".to_string()),
            ("token".to_string(), "s3cr3t".to_string()),
        ]);
        let inner = iceberg_catalog_rest::RestCatalogBuilder::default().load("r", props).await.expect("a lazy catalog");
        let factory: std::sync::Arc<dyn iceberg::io::StorageFactory> =
            std::sync::Arc::new(iceberg::io::LocalFsStorageFactory);
        let shown = format!("{:?}", super::Redacted::new(inner, "https://catalog".into(), false, factory));
        assert_eq!(shown, "RestCatalog { uri: \"https://catalog\", .. }");
        let config = super::CatalogConfig::Rest {
            uri: "https://user:s3cr3t@catalog/api".into(),
            warehouse: None,
            properties: Default::default(),
        };
        assert!(!format!("{config:?}").contains("s3cr3t"), "{config:?}");
        assert_eq!(super::without_password("https://user:s3cr3t@catalog/api"), "https://user:redacted@catalog/api");
        // A token carried as the user name alone.
        assert_eq!(super::without_credentials("https://t0k3n@catalog/api"), "https://redacted@catalog/api");
        assert_eq!(super::without_credentials("https://user:s3cr3t@catalog/api"), "https://user:redacted@catalog/api");
        // One that does not parse (port out of range) is shown as its scheme only: the parser
        // could not take its password apart.
        let bad = "https://user:s3cr3t@catalog:99999/api";
        assert_eq!(super::without_password(bad), "https://…");
        let config = super::CatalogConfig::Rest { uri: bad.into(), warehouse: None, properties: Default::default() };
        assert!(!format!("{config:?}").contains("s3cr3t"), "{config:?}");
        let builder = crate::IcebergColdStore::builder("s3://AKIA:s3cr3t@bucket/wh");
        assert!(!format!("{builder:?}").contains("s3cr3t"), "{builder:?}");
        // A warehouse URL's user part names a container: kept.
        assert_eq!(
            super::without_password("abfss://data@acct.dfs.core.windows.net/wh"),
            "abfss://data@acct.dfs.core.windows.net/wh"
        );
    }

    /// A swap failing with an SQLite I/O error (here `SQLITE_IOERR_FSYNC`, 1034) may still be
    /// applied by WAL recovery: `AmbiguousOutcome`, so its files are kept. Busy stays
    /// `Unavailable`, a full disk (nothing written) is not ambiguous.
    #[cfg(feature = "sql")]
    #[test]
    fn a_swap_failing_on_an_io_error_is_ambiguous() {
        use dotdo_core::ErrorKind;
        let err = |code| swap_failure(sqlx::Error::Database(Box::new(Sqlite(code))));
        assert_eq!(err("1034").kind(), &ErrorKind::AmbiguousOutcome);
        assert_eq!(err("10").kind(), &ErrorKind::AmbiguousOutcome);
        assert_eq!(err("5").kind(), &ErrorKind::Unavailable);
        assert_ne!(err("13").kind(), &ErrorKind::AmbiguousOutcome);
    }

    /// A catalog read failing on an I/O error (SQLITE_IOERR_READ, 266) is a retryable
    /// `Unavailable`, as the same errno from the object store is; a full disk is not.
    #[cfg(feature = "sql")]
    #[test]
    fn a_catalog_read_failing_on_an_io_error_is_unavailable() {
        use dotdo_core::ErrorKind;
        let err = |code| {
            let e = sqlx::Error::Database(Box::new(Sqlite(code)));
            crate::error::to_error(crate::error::cause_of(&e), "reading the SQL catalog pointer", e.to_string())
        };
        // (15: SQLITE_PROTOCOL, a WAL lock race SQLite gave up on: busy, as in the hot stores.)
        for code in ["10", "266", "522", "15"] {
            let e = err(code);
            assert_eq!(e.kind(), &ErrorKind::Unavailable, "{code}: {e}");
            assert!(e.is_retryable(), "{code}: {e}");
        }
        assert_ne!(err("13").kind(), &ErrorKind::Unavailable);
    }

    #[cfg(feature = "sql")]
    #[test]
    fn sqlite_paths_of_sqlx_uris() {
        assert_eq!(sqlite_path("sqlite:/a/b.db?mode=rwc").as_deref(), Some("/a/b.db"));
        assert_eq!(sqlite_path("sqlite:///a/b.db").as_deref(), Some("/a/b.db"));
        assert_eq!(sqlite_path("sqlite://rel.db").as_deref(), Some("rel.db"));
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("sqlite:/x.db?mode=memory&cache=shared"), None);
        assert_eq!(sqlite_path("postgres://h/db"), None);
        assert_eq!(sqlite_path("sqlite:/a/my%20lake%20%231/c.db?mode=rwc").as_deref(), Some("/a/my lake #1/c.db"));
        // A directory name with every character a URI treats specially round-trips.
        let dir = std::path::Path::new("/data/what? #1 50%25 a&b=c");
        let uri = default_sqlite_uri(dir);
        assert_eq!(sqlite_path(&uri).as_deref(), Some("/data/what? #1 50%25 a&b=c/catalog.db"), "{uri}");
        assert!(uri.ends_with("?mode=rwc"), "{uri}");
    }
}
