//! [`IcebergColdStore`]: the builder, table setup, and the exactly-once, fenced append path.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use iceberg::spec::{DataFile, DataFileFormat, Literal, PartitionKey, PrimitiveLiteral, SnapshotRef, Struct};
use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::location_generator::{DefaultFileNameGenerator, DefaultLocationGenerator};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::{IcebergWriter, IcebergWriterBuilder};
use iceberg::{Catalog, NamespaceIdent, TableCreation, TableIdent};
use object_store::ObjectStore;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{BloomFilterPosition, EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use dotdo_core::ids::validate_value;
use dotdo_core::{
    AsOf, ChangeRecord, Clock, ColdBatch, ColdCommit, ColdSink, ColdState, Error, ErrorKind, ObjectId, Result, Seq,
    SnapshotId, SnapshotInfo, SystemClock, Timestamp, Watermark,
};

use crate::catalog::CatalogConfig;
use crate::error::{classify, classify_write};
use crate::read::FileCache;
use crate::read::SnapshotMarks;
use crate::schema::{self, Bucketer};
use crate::storage::StoreRoot;
use crate::summary::{self, Watermarks};

/// When writing a commit's files began, on the store's clock: its monotonic time and its wall
/// clock. Their age before the commit is the larger of the two measures. Monotonic time stops
/// while the machine is suspended (`Instant` is CLOCK_MONOTONIC on Linux, CLOCK_UPTIME_RAW on
/// macOS), and a cleanup on another node judges the files by wall time meanwhile: by the
/// monotonic age alone, files written before a suspend of hours were committed after that
/// cleanup had deleted them. (A wall clock stepped forward makes files look older: they are
/// written again, never committed late.)
#[derive(Clone, Copy, Debug)]
pub(crate) struct WriteStart {
    monotonic: Duration,
    wall: Timestamp,
}

/// A table's namespace and name become directories of the warehouse, so parts of the table's
/// location URI that other engines parse, and segments of REST catalog URLs (which iceberg's
/// REST client joins in without percent-encoding): each part must be non-empty, not `.` or
/// `..`, and free of `/`, backslashes, `#`, `?`, `%` and control characters, whatever the
/// catalog. (`events#x` was sent as `…/tables/events`: another table's.)
pub(crate) fn validate_table_name<'a>(namespace: impl IntoIterator<Item = &'a str>, name: &str) -> Result<()> {
    let bad = |part: &str| {
        part.is_empty()
            || part == "."
            || part == ".."
            || part.chars().any(|c| matches!(c, '/' | '\\' | '#' | '?' | '%') || c.is_control())
    };
    let mut parts = 0;
    for part in namespace {
        parts += 1;
        if bad(part) {
            return Err(Error::invalid(format!(
                "table namespace part {part:?} must be non-empty, not '.' or '..', and free of '/', '\\', '#', '?', '%' \
                 and control characters"
            )));
        }
    }
    if parts == 0 {
        return Err(Error::invalid("a table namespace needs at least one part"));
    }
    if bad(name) {
        return Err(Error::invalid(format!(
            "table name {name:?} must be non-empty, not '.' or '..', and free of '/', '\\', '#', '?', '%' and control \
             characters"
        )));
    }
    Ok(())
}

/// The largest [`Settings::min_cleanup_retention`] a store accepts (30 days).
pub const MAX_CLEANUP_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// The largest [`Settings::max_commit_attempts`] a store accepts (100): an append against an
/// unreachable store must fail in bounded time, not retry for days.
pub const MAX_COMMIT_ATTEMPTS: u32 = 100;

/// The lowest bloom filter false-positive rate a store accepts (1e-9, about 13 bytes per
/// distinct value): below it a filter's size per value grows steeply (about 316 bytes at 1e-20)
/// up to parquet's 128 MiB cap, which extreme rates (1e-100) reach at any row count.
pub const MIN_BLOOM_FPP: f64 = 1e-9;

/// The largest [`Settings::catalog_timeout`] a store accepts (10 minutes).
pub const MAX_CATALOG_TIMEOUT: Duration = Duration::from_secs(600);

/// The most `bucket(do_id)` partitions [`Settings::buckets`] accepts (65,536).
pub const MAX_BUCKETS: u32 = 1 << 16;

/// Tunables of an [`IcebergColdStore`]. Plain data with documented defaults.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Number of `bucket(do_id)` partitions of a newly created table (default 16; 1 to
    /// [`MAX_BUCKETS`]). An existing table keeps its own spec.
    pub buckets: u32,
    /// ZSTD level of data files (default 1; 1 to 22).
    pub zstd_level: i32,
    /// Rows per Parquet row group (default 32 Ki); smaller groups prune finer. Applies to the
    /// change table and to user tables (`arrow_table`) alike.
    pub row_group_rows: usize,
    /// Target bytes of one row group (default 4 MiB): with large values a row group holds fewer
    /// rows than `row_group_rows`, so a point lookup, which reads only the row groups whose
    /// `do_id`/`key` statistics match, decodes a few MiB instead of a whole file. User tables
    /// cap their row groups at about this many bytes too (parquet's estimate of the encoded
    /// size: compressible data decodes to more).
    pub row_group_bytes: usize,
    /// Target data file size in bytes before rolling to a new file (default 256 MiB), for the
    /// change table and user tables (a large batch is written in slices, so it rolls too).
    pub target_file_size: usize,
    /// Commit attempts of one append, conflicts and unknown outcomes included (default 16; 1 to
    /// [`MAX_COMMIT_ATTEMPTS`]).
    pub max_commit_attempts: u32,
    /// Base delay of the backoff between attempts (default 10 ms, at most 1 s). Appends double
    /// it per attempt up to 1 s; compaction and collapse wait it times the attempt number between
    /// commit attempts (at most 20 times it) and double it, up to 128 times it, between retries
    /// of transient store errors while planning and rewriting; snapshot expiry waits it between
    /// attempts, and user-table appends double it up to 64 times it. Each wait is a random
    /// length between half of its nominal value and all of it (jitter).
    pub retry_base_delay: Duration,
    /// Reload the table from the catalog before each read and `watermark` call (default true),
    /// so reads see other writers' commits (with a SQL catalog only the table pointer is read
    /// when nothing changed). With `false` a store sees only its own commits until it commits
    /// again or [`IcebergColdStore::refresh`] is called; if another process's maintenance
    /// expires the state it holds and cleans up its files (after the cleanup retention), a read
    /// that finds a file missing refreshes: a read of the latest state is then made again on the
    /// current table, a read of the expired snapshot (by id or time) is `NotFound`. Keep it on where
    /// another node drains the same objects: an object evicted there whose changes this store
    /// does not see yet is refused with `Corrupt` by the runtime here.
    pub refresh_reads: bool,
    /// Name of the catalog (the SQL catalog's `catalog_name` column; default `"dotdo"`).
    pub catalog_name: String,
    /// The longest one request to a REST catalog may take, connecting included (default 30 s,
    /// as object_store's requests; at most [`MAX_CATALOG_TIMEOUT`]); connecting alone is bounded
    /// by the smaller of this and 10 s. A catalog that accepts connections and never answers (a
    /// hung server or proxy) then fails the call as `Unavailable` (a commit: an unknown outcome,
    /// read back) instead of holding the append, and every append queued behind it, for ever.
    pub catalog_timeout: Duration,
    /// No effect (kept so that settings naming it still build). It re-read an SQL catalog's
    /// table pointer after each acknowledged commit, because iceberg-catalog-sql 0.10.1 ignores
    /// errors of the SQL `COMMIT`; every commit dotdo makes on an SQL catalog now moves the
    /// pointer with its own compare-and-swap, which reports them. (The re-read also took a
    /// commit as unconfirmed whenever another writer's commit had followed it at once.)
    #[deprecated(note = "no effect: dotdo's own pointer swap reports SQL COMMIT errors")]
    pub verify_commits: bool,
    /// Watermarks of at most this many objects are kept inline in a snapshot summary (default
    /// 1000), and at most about [`INLINE_WATERMARK_BYTES`](crate::summary::INLINE_WATERMARK_BYTES)
    /// of them; beyond that a checkpoint file with all of them is written (see
    /// [`summary`](crate::summary)), as it is once the snapshots since the last checkpoint have
    /// repeated more inline watermarks than that and than a checkpoint would take. Keeps table
    /// metadata small with many objects.
    pub watermark_checkpoint_objects: usize,
    /// Write Parquet bloom filters on the `do_id` and `key` columns of every row group, and use
    /// them on reads to skip row groups (and whole files) that cannot hold the object or key
    /// (default true). Files written without filters are read as before.
    pub bloom_filters: bool,
    /// Target false-positive rate of those bloom filters (default 0.01; must be in
    /// `[MIN_BLOOM_FPP, 1)`, see [`MIN_BLOOM_FPP`]).
    /// Filters are sized for the rows of a row group at this rate, then folded down to the
    /// smallest size that keeps it, so lower rates cost a few bytes per distinct value.
    pub bloom_filter_fpp: f64,
    /// Per-column bloom filter settings overriding `bloom_filter_fpp`: `"do_id"` or `"key"`
    /// mapped to `Some(rate)` (a rate in `[MIN_BLOOM_FPP, 1)`) or to `None` (no filter on that
    /// column).
    /// Default empty: both columns at `bloom_filter_fpp`.
    pub bloom_filter_columns: BTreeMap<String, Option<f64>>,
    /// The shortest `retention` that
    /// [`remove_unreferenced_files`](IcebergColdStore::remove_unreferenced_files) accepts
    /// (default 1 hour). A file an append or compaction has written but not yet committed is
    /// unreferenced until its commit lands; a shorter retention could delete it while that
    /// commit is in flight (Spark's `remove_orphan_files` refuses under 24 hours for the same
    /// reason). Lower it only where no writer can be running, e.g. in tests. Before it commits,
    /// a compaction (of the change table or a user table) checks that its new files are all still there and that
    /// none was written more than half of this ago (a cleanup running meanwhile could judge an older one
    /// unreferenced and delete it after the commit); otherwise it fails with `Conflict`, nothing
    /// committed. A compaction that needs longer: fewer partitions per run, or a larger minimum.
    /// An append whose commit is retried past half of it writes new files. Opening the change
    /// table or a user table records the largest minimum of its stores in the table ([`MIN_CLEANUP_PROP`]), and
    /// every cleanup keeps to it, whatever its own setting. The ages are taken by the store's
    /// clock against the object store's last-modified times. At most [`MAX_CLEANUP_RETENTION`]
    /// (30 days; it only protects files of commits in flight, not snapshots to time-travel to).
    pub min_cleanup_retention: Duration,
    /// On a `file://` warehouse that dotdo opens itself (not one given with
    /// [`object_store`](IcebergColdStoreBuilder::object_store)), fsync every data, manifest and
    /// metadata file, its directory, and once each any new directory up to the warehouse's
    /// parent, before its write reports success (default false).
    /// The SQL catalog always fsyncs its commit; without this a local warehouse's files are as
    /// durable as the file system's page cache: an acknowledged commit survives a process kill,
    /// and after a power loss or OS crash its files may be missing or empty (`Corrupt` on read).
    /// With it a commit also survives a power loss, at about one more fsync round per file
    /// written (see `docs/durability.md`). Object stores (S3, R2, GCS, Azure) are durable on
    /// their own.
    pub sync_local_files: bool,
}

impl Settings {
    /// The oldest a file this store wrote may be when a commit names it:
    /// half of `min_cleanup_retention` (a cleanup running meanwhile may judge an older
    /// unreferenced file deletable and take it after the commit). `None` when that is zero: no
    /// writer runs beside a cleanup, by the setting's contract.
    pub(crate) fn max_uncommitted_age(&self) -> Option<Duration> {
        Some(self.min_cleanup_retention / 2).filter(|age| !age.is_zero())
    }

    /// The minimum this store records in the tables it writes ([`MIN_CLEANUP_PROP`]), in
    /// milliseconds; `None` for zero (nothing to record).
    pub(crate) fn cleanup_minimum_ms(&self) -> Option<u64> {
        Some(u64::try_from(self.min_cleanup_retention.as_millis()).unwrap_or(u64::MAX)).filter(|ms| *ms > 0)
    }

    /// The bloom filter target of `column`, `None` if it gets no filter.
    pub(crate) fn bloom_fpp(&self, column: &str) -> Option<f64> {
        if !self.bloom_filters {
            return None;
        }
        match self.bloom_filter_columns.get(column) {
            Some(per_column) => *per_column,
            None => Some(self.bloom_filter_fpp),
        }
    }
}

#[allow(deprecated)] // `verify_commits`, kept for old settings
impl Default for Settings {
    fn default() -> Self {
        Settings {
            buckets: schema::DEFAULT_BUCKETS,
            zstd_level: 1,
            row_group_rows: 32 * 1024,
            row_group_bytes: 4 << 20,
            target_file_size: 256 << 20,
            max_commit_attempts: 16,
            retry_base_delay: Duration::from_millis(10),
            refresh_reads: true,
            catalog_name: "dotdo".to_string(),
            catalog_timeout: Duration::from_secs(30),
            verify_commits: true,
            watermark_checkpoint_objects: 1000,
            bloom_filters: true,
            bloom_filter_fpp: 0.01,
            bloom_filter_columns: BTreeMap::new(),
            min_cleanup_retention: Duration::from_secs(3600),
            sync_local_files: false,
        }
    }
}

/// Builds an [`IcebergColdStore`]; see [`IcebergColdStore::builder`].
pub struct IcebergColdStoreBuilder {
    warehouse: String,
    options: Vec<(String, String)>,
    store: Option<Arc<dyn ObjectStore>>,
    catalog: CatalogConfig,
    namespace: Vec<String>,
    table: String,
    clock: Arc<dyn Clock>,
    settings: Settings,
}

impl std::fmt::Debug for IcebergColdStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Option values may be credentials: print keys only.
        f.debug_struct("IcebergColdStoreBuilder")
            .field("warehouse", &crate::storage::shown_warehouse(&self.warehouse))
            .field("options", &self.options.iter().map(|(k, _)| (k.as_str(), "<redacted>")).collect::<Vec<_>>())
            .field("store", &self.store.as_ref().map(|s| s.to_string()))
            .field("catalog", &self.catalog)
            .field("namespace", &self.namespace)
            .field("table", &self.table)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl IcebergColdStoreBuilder {
    /// An object-store option for the warehouse URL (e.g. `aws_endpoint`,
    /// `aws_access_key_id`, `aws_allow_http`). Values are never printed.
    pub fn option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.push((key.into(), value.into()));
        self
    }

    /// Several object-store options.
    pub fn options<K: Into<String>, V: Into<String>>(mut self, opts: impl IntoIterator<Item = (K, V)>) -> Self {
        self.options.extend(opts.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Use this object store instead of opening one from the URL; its root corresponds to the
    /// warehouse URL's scheme and authority (for a local store: the file system root).
    pub fn object_store(mut self, store: Arc<dyn ObjectStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Which catalog to use (default: see [`CatalogConfig::Default`]).
    pub fn catalog(mut self, catalog: CatalogConfig) -> Self {
        self.catalog = catalog;
        self
    }

    /// The table's namespace (dot-free parts) and name (default `dotdo.changes`).
    pub fn table<I, S>(mut self, namespace: I, name: impl Into<String>) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.namespace = namespace.into_iter().map(Into::into).collect();
        self.table = name.into();
        self
    }

    /// The clock for commit times and query timing (default: the system clock); retries always
    /// back off in real time.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Tunables.
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// Open the warehouse and catalog, create the namespace and table if missing, and check
    /// that an existing table has dotdo's columns, readable by name (another engine may have
    /// added or reordered columns, or partitioned it otherwise: it is read, and its appends are
    /// `InvalidInput`). Must run inside a tokio runtime with time enabled (iceberg uses tokio).
    pub async fn build(self) -> Result<IcebergColdStore> {
        validate_table_name(self.namespace.iter().map(String::as_str), &self.table)?;
        if self.settings.max_commit_attempts == 0 || self.settings.buckets == 0 {
            return Err(Error::invalid("max_commit_attempts and buckets must be at least 1"));
        }
        if self.settings.buckets > MAX_BUCKETS {
            return Err(Error::invalid(format!(
                "buckets {} is above {MAX_BUCKETS}: each bucket is a partition, and a commit writes a file per \
                 partition it touches (engines evaluate bucket[N] only for N up to 2^31 - 1)",
                self.settings.buckets
            )));
        }
        if self.settings.max_commit_attempts > MAX_COMMIT_ATTEMPTS {
            return Err(Error::invalid(format!(
                "max_commit_attempts {} is above {MAX_COMMIT_ATTEMPTS}: an append against an unreachable store \
                 would retry for hours",
                self.settings.max_commit_attempts
            )));
        }
        if self.settings.catalog_name.trim().is_empty() {
            return Err(Error::invalid("catalog_name must not be empty"));
        }
        if self.settings.catalog_timeout.is_zero() || self.settings.catalog_timeout > MAX_CATALOG_TIMEOUT {
            return Err(Error::invalid(format!(
                "catalog_timeout {:?} must be positive and at most {MAX_CATALOG_TIMEOUT:?}",
                self.settings.catalog_timeout
            )));
        }
        if self.store.is_some() && !self.options.is_empty() {
            // They configure a store this builder would open; a given store is used as it is.
            return Err(Error::invalid(format!(
                "options {:?} were given with an object store of your own, which ignores them",
                self.options.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>()
            )));
        }
        // Checked here, not at the first append: a level parquet refuses (zstd's own "0 means
        // default" included) or a zero size would fail or degrade every append after a
        // successful open (a runtime's automatic flush only logs its failures).
        if let Err(e) = ZstdLevel::try_new(self.settings.zstd_level) {
            return Err(Error::invalid(format!("zstd_level {}: {e}", self.settings.zstd_level)));
        }
        if self.settings.row_group_rows == 0
            || self.settings.row_group_bytes == 0
            || self.settings.target_file_size == 0
        {
            return Err(Error::invalid("row_group_rows, row_group_bytes and target_file_size must be at least 1"));
        }
        if self.settings.min_cleanup_retention > MAX_CLEANUP_RETENTION {
            // Recorded in the table as the least every store's cleanup keeps, and only ever
            // raised: a unit slip would block every cleanup of the table for good.
            return Err(Error::invalid(format!(
                "min_cleanup_retention {:?} is above {:?}",
                self.settings.min_cleanup_retention, MAX_CLEANUP_RETENTION
            )));
        }
        if self.settings.retry_base_delay > Duration::from_secs(1) {
            // Maintenance multiplies it (up to 128 times): a larger base would stall for hours.
            return Err(Error::invalid(format!("retry_base_delay {:?} is above 1 s", self.settings.retry_base_delay)));
        }
        let fpp = self.settings.bloom_filter_fpp;
        if self.settings.bloom_filters && !(MIN_BLOOM_FPP..1.0).contains(&fpp) {
            return Err(Error::invalid(format!("bloom_filter_fpp must be in [{MIN_BLOOM_FPP:e}, 1), got {fpp}")));
        }
        for (col, rate) in &self.settings.bloom_filter_columns {
            if !schema::BLOOM_COLUMNS.contains(&col.as_str()) {
                return Err(Error::invalid(format!(
                    "bloom_filter_columns: {col:?} is not one of {:?}",
                    schema::BLOOM_COLUMNS
                )));
            }
            if let Some(r) = rate {
                if !(MIN_BLOOM_FPP..1.0).contains(r) {
                    return Err(Error::invalid(format!(
                        "bloom filter rate of {col} must be in [{MIN_BLOOM_FPP:e}, 1), got {r}"
                    )));
                }
            }
        }
        let root = match self.store {
            Some(store) => StoreRoot::from_store(store, &self.warehouse)?,
            None => StoreRoot::open(&self.warehouse, self.options.iter().map(|(k, v)| (k.as_str(), v.clone())))?,
        };
        let synced = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let factory = root.factory_syncing(self.settings.sync_local_files.then(|| synced.clone()))?;
        let crate::catalog::Opened { catalog, verifier, in_process } =
            crate::catalog::open(&self.catalog, &self.settings, &root.warehouse, factory).await?;
        let ns = NamespaceIdent::from_vec(self.namespace.clone())
            .map_err(|e| classify(e, "table namespace").with_retryable(false))?;
        let ident = TableIdent::new(ns.clone(), self.table.clone());
        let placing = Placing { verifier: verifier.as_ref(), root: &root };
        let table = open_table(&*catalog, &ident, &self.settings, placing).await?;
        // A table another engine partitioned otherwise is still read (without pruning by
        // bucket); its appends are refused.
        let bucketer = match table_bucketer(&table) {
            Ok(b) => Some(Arc::new(b)),
            Err(e) if e.kind() == &ErrorKind::InvalidInput => None,
            // A bucket transform no engine could have written (`bucket[0]`): damaged metadata.
            Err(e) => return Err(e),
        };
        let table_uuid = table.metadata().uuid();
        Ok(IcebergColdStore {
            inner: Arc::new(Inner {
                catalog,
                read_back_settles: verifier.is_some() || in_process,
                verifier,
                ident,
                root,
                clock: self.clock,
                settings: self.settings,
                table: parking_lot::Mutex::new(table),
                tickets: std::sync::atomic::AtomicU64::new(0),
                installed: std::sync::atomic::AtomicU64::new(0),
                commit_lock: tokio::sync::Mutex::new(()),
                bucketer,
                table_uuid,
                cache: FileCache::default(),
                runtime: iceberg::Runtime::try_current()
                    .map_err(|e| classify(e, "building the store (no tokio runtime)").with_retryable(false))?,
                synced_files: synced,
            }),
        })
    }
}

/// The bucketer of the table's default partition spec: its `bucket(do_id)` field. Only a bucket
/// field counts: a v1 table keeps a removed partition field as `void(do_id)` (a spec evolved
/// from bucket[16] to bucket[32] by another engine starts with one), and another engine may
/// partition by `identity` or `truncate` of do_id, which dotdo cannot prune by.
fn table_bucketer(table: &Table) -> Result<Bucketer> {
    table_bucketer_in(table).map_err(|e| {
        let at = table.metadata_location().unwrap_or("no metadata file");
        e.context(format!(
            "table {} ({at}), partition spec {}",
            table.identifier(),
            table.metadata().default_partition_spec().spec_id()
        ))
    })
}

fn table_bucketer_in(table: &Table) -> Result<Bucketer> {
    let spec = table.metadata().default_partition_spec();
    let do_id = table
        .metadata()
        .current_schema()
        .field_id_by_name("do_id")
        .ok_or_else(|| Error::invalid("table has no do_id column"))?;
    let (position, field) = spec
        .fields()
        .iter()
        .enumerate()
        .find(|(_, f)| f.source_id == do_id && matches!(f.transform, iceberg::spec::Transform::Bucket(_)))
        .ok_or_else(|| Error::invalid("table is not partitioned by bucket(do_id)"))?;
    Ok(Bucketer::new(&field.transform)?.with_spec(spec.spec_id(), position))
}

/// What a new table's location is chosen with (the SQL catalog's verifier, to see the tables
/// already there, and the store the catalog places tables in).
#[derive(Clone, Copy)]
pub(crate) struct Placing<'a> {
    pub(crate) verifier: Option<&'a crate::catalog::SqlVerifier>,
    pub(crate) root: &'a StoreRoot,
}

async fn open_table(
    catalog: &dyn Catalog,
    ident: &TableIdent,
    settings: &Settings,
    placing: Placing<'_>,
) -> Result<Table> {
    let what = format!("table {ident}");
    let table = match crate::error::load_table(catalog, ident).await {
        Ok(t) => t,
        Err(e) if matches!(e.kind(), iceberg::ErrorKind::TableNotFound | iceberg::ErrorKind::NamespaceNotFound) => {
            create_table(catalog, ident, settings, placing).await?
        }
        Err(e) => return Err(load_failure(placing.verifier, ident, e, &what).await),
    };
    // What reads need: appends check the whole layout each time (another engine may change it
    // while a store is open, and a store opened after such a change still reads the table).
    schema::check_readable_table(table.metadata(), &what)?;
    set_dotdo_properties(catalog, placing.verifier, ident, table, settings, true).await
}

/// `e`, from loading `ident`'s table, classified; a `Corrupt` one names the metadata file the
/// SQL catalog points at (iceberg's error for metadata JSON it cannot parse names no file).
pub(crate) async fn load_failure(
    verifier: Option<&crate::catalog::SqlVerifier>,
    ident: &TableIdent,
    e: iceberg::Error,
    what: &str,
) -> Error {
    let err = classify(e, what);
    if err.kind() != &ErrorKind::Corrupt {
        return err;
    }
    match verifier {
        Some(v) => match v.metadata_location(ident).await {
            Ok(Some(location)) if !err.to_string().contains(&location) => {
                err.context(format!("metadata file {location}"))
            }
            _ => err,
        },
        None => err,
    }
}

/// Set the table properties a store with `settings` needs on `table` (the change table, or a
/// user table: see [`properties_to_set`]) if they are not set yet, and return the table after.
///
/// On the SQL catalog the commit moves the pointer with dotdo's own compare-and-swap, as every
/// dotdo commit does (`verifier`): iceberg-catalog-sql's own commit ignores a failed SQL
/// `COMMIT` and reports the table it staged, so an open could go on as if a raised cleanup
/// minimum were recorded while the catalog kept the old one.
pub(crate) async fn set_dotdo_properties(
    catalog: &dyn Catalog,
    verifier: Option<&crate::catalog::SqlVerifier>,
    ident: &TableIdent,
    table: Table,
    settings: &Settings,
    change_table: bool,
) -> Result<Table> {
    let what = format!("setting dotdo's properties of table {ident}");
    let mut table = table;
    let mut attempt = 0;
    loop {
        let set = properties_to_set(&table, settings, change_table);
        if set.is_empty() {
            return Ok(table);
        }
        // Stamped with this host's wall clock (no snapshot): refused while it is over a minute
        // behind the table's last update, as dotdo's own commits are. (Also on a REST catalog:
        // iceberg builds the new metadata here before it sends the commit, and refuses it.)
        crate::commit::refuse_if_clock_behind(table.metadata(), &what)?;
        crate::commit::refuse_v1_refs(&table, &what).await?;
        let tx = Transaction::new(&table);
        let mut props = tx.update_table_properties();
        for (k, v) in set {
            props = props.set(k.to_string(), v);
        }
        let tx = props.apply(tx).map_err(|e| classify(e, &what))?;
        // (A panic of iceberg's commit on damaged metadata is `Corrupt`, not the caller's panic.)
        let committed = match verifier {
            Some(v) => {
                let pinned = crate::catalog::PinnedCatalog::new(catalog, table.clone(), Some(v));
                crate::error::iceberg_panic_is_corrupt(&table, tx.commit(&pinned)).await
            }
            None => crate::error::iceberg_panic_is_corrupt(&table, tx.commit(catalog)).await,
        };
        match committed {
            Ok(t) => return Ok(t),
            // Another store set them first (nodes opening a table together after an upgrade),
            // or the commit landed and its reply was lost: read the table again and decide anew.
            // (Logged classified: a REST catalog's raw error may carry its response body.)
            // (Damaged metadata is no race: refused at once, not read and committed three more
            // times.)
            Err(e) => {
                let e = classify(e, &what);
                if attempt >= 3 || e.kind() == &ErrorKind::Corrupt {
                    return Err(e);
                }
                tracing::debug!(table = %ident, error = %e, "setting dotdo's table properties failed; reading again");
                attempt += 1;
                table = crate::error::load_table(catalog, ident).await.map_err(|e| classify(e, &what))?;
            }
        }
    }
}

/// The table properties a store with `settings` needs set on a table it writes (the change
/// table, or a user table: the cleanup minimum alone, other engines' writers of a user table
/// keep their own retry settings), given its current ones.
fn properties_to_set(table: &Table, settings: &Settings, change_table: bool) -> Vec<(&'static str, String)> {
    let mut set = Vec::new();
    // dotdo retries commits itself after re-reading the watermarks; iceberg's internal retry
    // would re-apply the same summary on a stale base. (dotdo's appends, to the change table and
    // to user tables, also go through a catalog wrapper whose errors iceberg never retries, for
    // tables whose property another engine set; property updates and expiries on non-SQL
    // catalogs take iceberg's retry, which re-applies the same idempotent change.)
    if change_table && table.metadata().properties().get(RETRY_PROP).map(String::as_str) != Some("0") {
        set.push((RETRY_PROP, "0".to_string()));
    }
    // Every cleanup of the table, whatever its own settings, keeps to the largest minimum a
    // writer opened it with: a compaction of this store commits files up to half of it old.
    // (An unreadable value, another engine's edit, is replaced.)
    if let Some(own) = settings.cleanup_minimum_ms() {
        if recorded_cleanup_minimum(table.metadata()).map_or(true, |r| r.as_millis() < u128::from(own)) {
            set.push((MIN_CLEANUP_PROP, own.to_string()));
        }
    }
    set
}

pub(crate) const RETRY_PROP: &str = "commit.retry.num-retries";

/// The table property recording the largest `min_cleanup_retention` (milliseconds) a store
/// opened the table (the change table, or a user table through
/// [`arrow_table`](IcebergColdStore::arrow_table)) with. Stores only raise it; to lower it (no writer with a larger
/// minimum runs any more), set the property with any Iceberg client.
pub const MIN_CLEANUP_PROP: &str = "dotdo.min-cleanup-retention-ms";

/// The cleanup minimum the table records ([`MIN_CLEANUP_PROP`]): zero if absent, `Err` (the
/// value) if not a number of milliseconds (another engine's edit).
pub(crate) fn recorded_cleanup_minimum(md: &iceberg::spec::TableMetadata) -> std::result::Result<Duration, String> {
    match md.properties().get(MIN_CLEANUP_PROP) {
        None => Ok(Duration::ZERO),
        Some(v) => v.trim().parse::<u64>().map(Duration::from_millis).map_err(|_| v.clone()),
    }
}

/// A namespace about to be created: its parts may not contain '.'. The SQL catalog stores a
/// namespace as its parts joined with '.', so ["a.b"] and ["a", "b"] would be one namespace
/// there and two directories in the warehouse. (Existing namespaces open as they are.)
pub(crate) fn check_new_namespace(ns: &NamespaceIdent) -> Result<()> {
    match ns.iter().find(|p| p.contains('.')) {
        Some(part) => Err(Error::invalid(format!(
            "namespace {ns:?}: part {part:?} contains '.', which catalogs use between parts; not created"
        ))),
        None => Ok(()),
    }
}

/// The location the SQL catalog gives a new table `ident` (its namespace's `location`
/// property, else `<warehouse>/<namespace parts>`, then `/<name>`), or, if another table
/// (another catalog name's, or a name differing only in case) already lives there, that
/// location with `-<catalog name>` appended: two tables in one directory would each see the
/// other's files as unreferenced in a cleanup.
pub(crate) async fn new_table_location(
    catalog: &dyn Catalog,
    ident: &TableIdent,
    catalog_name: &str,
    placing: Placing<'_>,
) -> Result<Option<String>> {
    let Some(verifier) = placing.verifier else { return Ok(None) };
    let what = format!("placing table {ident}");
    let ns = catalog.get_namespace(ident.namespace()).await.map_err(|e| classify(e, &what))?;
    let ns_location = match ns.properties().get("location") {
        Some(l) => l.clone(),
        None => format!("{}/{}", placing.root.warehouse, ident.namespace().join("/")),
    };
    // A namespace location written with a trailing `/` (as PyIceberg accepts it): the SQL
    // catalog would append `/<name>` to it as it is, and `…//<name>` is no valid object path
    // (every create failed); the table goes where PyIceberg puts it, `…/<name>`.
    let trailing = ns_location.ends_with('/');
    let default = format!("{}/{}", ns_location.trim_end_matches('/'), ident.name());
    let tag: String =
        catalog_name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '-' }).collect();
    let own = format!("{default}-{tag}");
    let found = verifier.tables_at(ident, &[&default, &own], placing.root).await?;
    if found[0].is_empty() {
        return Ok(trailing.then_some(default));
    }
    if !found[1].is_empty() {
        return Err(Error::invalid(format!(
            "{what}: both {default} and {own} hold other tables' metadata; create the namespace with a location \
             of its own"
        )));
    }
    Ok(Some(own))
}

async fn create_table(
    catalog: &dyn Catalog,
    ident: &TableIdent,
    settings: &Settings,
    placing: Placing<'_>,
) -> Result<Table> {
    let what = format!("creating table {ident}");
    let ns = ident.namespace();
    match catalog.namespace_exists(ns).await {
        Ok(true) => {}
        Ok(false) => {
            check_new_namespace(ns)?;
            match catalog.create_namespace(ns, HashMap::new()).await {
                Ok(_) => {}
                Err(e) if e.kind() == iceberg::ErrorKind::NamespaceAlreadyExists => {}
                // Another process created it meanwhile (the SQL catalog reports the unique-key
                // clash as an unexpected error, not NamespaceAlreadyExists).
                Err(e) => {
                    if !catalog.namespace_exists(ns).await.unwrap_or(false) {
                        return Err(classify(e, &what));
                    }
                }
            }
        }
        Err(e) => return Err(classify(e, &what)),
    }
    let schema = schema::table_schema()?;
    let order = schema::sort_order(&schema)?;
    let creation = TableCreation::builder()
        .name(ident.name().to_string())
        .schema(schema)
        .partition_spec(schema::partition_spec(settings.buckets)?)
        .sort_order(order);
    let mut props = HashMap::from([
        (RETRY_PROP.to_string(), "0".to_string()),
        ("write.format.default".to_string(), "parquet".to_string()),
        ("write.parquet.compression-codec".to_string(), "zstd".to_string()),
        ("write.metadata.previous-versions-max".to_string(), "20".to_string()),
        ("dotdo.format".to_string(), "1".to_string()),
    ]);
    if let Some(min) = settings.cleanup_minimum_ms() {
        props.insert(MIN_CLEANUP_PROP.to_string(), min.to_string());
    }
    let creation = match new_table_location(catalog, ident, &settings.catalog_name, placing).await? {
        Some(location) => creation.location(location).properties(props).build(),
        None => creation.properties(props).build(),
    };
    match catalog.create_table(ns, creation).await {
        Ok(t) => confirm_created(catalog, placing.verifier, ident, t, &what).await,
        Err(e) if e.kind() == iceberg::ErrorKind::TableAlreadyExists => {
            crate::error::load_table(catalog, ident).await.map_err(|e| classify(e, &what))
        }
        // Another process created it meanwhile (the SQL catalog reports the unique-key clash as
        // an unexpected error): the table is there, use it. (The loser's metadata file is left
        // unreferenced, for `remove_unreferenced_files`.)
        Err(e) => match crate::error::load_table(catalog, ident).await {
            Ok(t) => Ok(t),
            Err(_) => Err(classify(e, &what)),
        },
    }
}

/// Where new data files of the table `md` go: as iceberg's `DefaultLocationGenerator` places
/// them (`write.data.path`, else `write.folder-storage.path`, else `<table location>/data`),
/// without a trailing `/`. Another engine may set the property with one (`s3://b/archive/`),
/// as Iceberg-Java accepts and trims; iceberg-rust keeps it, and every file location then had an
/// empty path segment no object store accepts (each append failed, not retryable).
pub(crate) fn data_locations(md: &iceberg::spec::TableMetadata) -> DefaultLocationGenerator {
    let props = md.properties();
    let data = match props.get("write.data.path").or_else(|| props.get("write.folder-storage.path")) {
        Some(configured) => configured.clone(),
        None => format!("{}/data", md.location()),
    };
    let trimmed = data.trim_end_matches('/');
    // (All slashes, `file:///` say: kept as it is, for the store to refuse by name.)
    let data = if trimmed.is_empty() || trimmed.ends_with(':') { data.clone() } else { trimmed.to_string() };
    DefaultLocationGenerator::with_data_location(data)
}

/// `table`, which the catalog reported created as `ident`, once the SQL catalog holds it
/// (`verifier`: read back). iceberg-catalog-sql ignores a failed SQL `COMMIT` of its `INSERT`
/// and reports the table created all the same: then the catalog has no such table (a retryable
/// `Unavailable`: nothing was created, the next open creates it), or another process's
/// creation won meanwhile (that table, loaded). Other catalogs report their own failures.
pub(crate) async fn confirm_created(
    catalog: &dyn Catalog,
    verifier: Option<&crate::catalog::SqlVerifier>,
    ident: &TableIdent,
    table: Table,
    what: &str,
) -> Result<Table> {
    let Some(v) = verifier else { return Ok(table) };
    match v.metadata_location(ident).await? {
        Some(l) if Some(l.as_str()) == table.metadata_location() => Ok(table),
        Some(_) => crate::error::load_table(catalog, ident).await.map_err(|e| classify(e, what)),
        None => Err(Error::unavailable(format!(
            "{what}: the SQL catalog reported the table created but does not hold it (its transaction did not \
             commit); nothing was created"
        ))),
    }
}

pub(crate) struct Inner {
    pub(crate) catalog: Arc<dyn Catalog>,
    /// Confirms acknowledged commits of SQL catalogs (see [`crate::catalog`]).
    pub(crate) verifier: Option<crate::catalog::SqlVerifier>,
    /// Whether a read of the table after a commit of unknown outcome settles it: through the
    /// SQL catalog (its pointer swap is settled before it answers) and the in-memory one. Through
    /// another (a REST server still at a request its client gave up on) an attempt not found may
    /// land yet.
    pub(crate) read_back_settles: bool,
    pub(crate) ident: TableIdent,
    pub(crate) root: StoreRoot,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) settings: Settings,
    /// The newest table state this store knows.
    pub(crate) table: parking_lot::Mutex<Table>,
    /// Tickets of the table's installs: a reload takes one before it asks the catalog (outside
    /// `table`'s lock), an own commit one under that lock as it installs what it committed
    /// (`remember`); their order is what counts.
    tickets: std::sync::atomic::AtomicU64,
    /// The ticket of the install `table` holds: a reload installs its answer only if it took
    /// its ticket after (the catalog's answer to a later question wins; one to an earlier
    /// question, arriving late, does not undo it).
    installed: std::sync::atomic::AtomicU64,
    /// Serialises this process's appends (other processes are handled optimistically).
    commit_lock: tokio::sync::Mutex<()>,
    /// The `bucket(do_id)` transform of the table as opened (see [`IcebergColdStore::bucketer_for`]);
    /// `None` if another engine had partitioned it otherwise.
    bucketer: Option<Arc<Bucketer>>,
    /// The uuid of the table as opened: a table dropped and created again under the same name
    /// may be partitioned differently.
    table_uuid: uuid::Uuid,
    pub(crate) cache: FileCache,
    /// The runtime of table handles dotdo builds after its own commits: the one the store was
    /// built on, which lives as long as the store is used (a call's runtime may not).
    pub(crate) runtime: iceberg::Runtime,
    /// Files fsynced so far ([`Settings::sync_local_files`]).
    pub(crate) synced_files: Arc<std::sync::atomic::AtomicU64>,
}

/// A [`ColdSink`] and [`IndexAccelerator`](dotdo_core::IndexAccelerator) on an Apache Iceberg
/// table (Parquet, ZSTD) in any object store. Cheap to clone; clones share state.
///
/// See the [crate docs](crate) for the table layout and the exactly-once protocol.
#[derive(Clone)]
pub struct IcebergColdStore {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for IcebergColdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IcebergColdStore")
            .field("warehouse", &self.inner.root.warehouse)
            .field("table", &self.inner.ident.to_string())
            .finish_non_exhaustive()
    }
}

/// Which records of a batch are new, and the watermarks after committing them.
struct Plan {
    /// Per object with new records: (index of the object in the batch, index of its first new
    /// record).
    parts: Vec<(usize, usize)>,
    /// Number of new records.
    fresh: u64,
    skipped: u64,
    /// Per object of the batch: new records' seq range (first, last), for reusing written files.
    ranges: Vec<(ObjectId, Seq, Seq)>,
    /// The batch's objects' watermarks after it.
    batch_marks: BTreeMap<ObjectId, Watermark>,
    /// The batch's objects' watermarks before it: what a commit of nothing reports.
    durable_marks: BTreeMap<ObjectId, Watermark>,
}

fn plan(batch: &ColdBatch, prev: &SnapshotMarks) -> Result<Plan> {
    let mut batch_marks = BTreeMap::new();
    let mut parts = Vec::new();
    let mut fresh = 0u64;
    let mut skipped = 0u64;
    let mut ranges = Vec::new();
    for (i, oc) in batch.objects.iter().enumerate() {
        let wm = prev.get(&oc.object).unwrap_or_default();
        if oc.token < wm.token {
            return Err(Error::fenced(&oc.object, oc.token, wm.token));
        }
        // Records are validated contiguous and increasing: the new ones are a suffix.
        let from = oc.records.partition_point(|r| r.seq <= wm.through);
        // The new records' keys and type names are checked while they are converted to Arrow;
        // the skipped replays are never converted, and a bad one among them must refuse the
        // batch as well (the `ColdSink` contract: nothing of it is committed).
        for r in &oc.records[..from] {
            dotdo_core::ids::validate_key(&r.key)
                .and_then(|()| dotdo_core::ids::validate_type_name(&r.type_name))
                .map_err(|e| e.context(format!("change record {} of {}", r.seq, oc.object)))?;
        }
        let new = &oc.records[from..];
        skipped += from as u64;
        if let Some(first) = new.first() {
            if first.seq != wm.through + 1 {
                return Err(Error::invalid(format!(
                    "cold batch for {} starts at seq {} but cold storage has seq {}: the records in between would be lost",
                    oc.object, first.seq, wm.through
                )));
            }
        }
        let through = new.last().map_or(wm.through, |r| r.seq);
        if let (Some(f), Some(l)) = (new.first(), new.last()) {
            ranges.push((oc.object.clone(), f.seq, l.seq));
            parts.push((i, from));
            fresh += new.len() as u64;
        }
        batch_marks.insert(oc.object.clone(), Watermark { through, token: oc.token.max(wm.token) });
    }
    let durable_marks =
        batch.objects.iter().map(|oc| (oc.object.clone(), prev.get(&oc.object).unwrap_or_default())).collect();
    Ok(Plan { parts, fresh, skipped, ranges, batch_marks, durable_marks })
}

/// Data files written for an attempt: the per-object seq ranges they hold, the partition spec
/// they were written under, the files, and when their writing began (the store clock's
/// monotonic time: a wall clock set back must not make old files look young).
type Written = (Vec<(ObjectId, Seq, Seq)>, (uuid::Uuid, i32), Vec<DataFile>, WriteStart);

/// The error of a commit refused because its data files are `age` old, past half of
/// `min_cleanup_retention`: a conflict, so the caller re-plans and writes new files.
pub(crate) fn too_old_to_commit(age: Duration) -> iceberg::Error {
    iceberg::Error::new(
        iceberg::ErrorKind::CatalogCommitConflicts,
        format!(
            "the append's data files are {age:?} old, {TOO_OLD}: a cleanup may have deleted them; writing them \
             again"
        ),
    )
}

/// What [`too_old_to_commit`] says.
const TOO_OLD: &str = "past half of min_cleanup_retention";

/// Whether `e` is [`too_old_to_commit`]'s refusal.
fn is_too_old(e: &iceberg::Error) -> bool {
    e.kind() == iceberg::ErrorKind::CatalogCommitConflicts && e.message().contains(TOO_OLD)
}

/// An append's attempts in a row refused by [`too_old_to_commit`] (see [`too_slow_to_commit`]).
#[derive(Debug, Default)]
pub(crate) struct TooOldStreak(u32);

impl TooOldStreak {
    /// Count attempt error `e` (of an append doing `what`): the append's final error once two
    /// attempts in a row were refused for files too old to commit.
    pub(crate) fn after(&mut self, e: &iceberg::Error, what: &str) -> Option<Error> {
        self.0 = if is_too_old(e) { self.0 + 1 } else { 0 };
        (self.0 >= 2).then(|| too_slow_to_commit(what, e))
    }
}

/// The error of an append whose attempts, twice in a row, took longer from writing their own new
/// data files to their catalog swap than half of `min_cleanup_retention` (`e`: the second
/// refusal): the store is that slow for this append, so no retry commits it (a retryable
/// `Conflict` had the caller write the files again and again). Not retryable.
fn too_slow_to_commit(what: &str, e: &impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Conflict,
        format!(
            "{what}: two attempts in a row took longer from writing their data files to their commit than half of \
             min_cleanup_retention ({e}); raise min_cleanup_retention (and the table's recorded minimum), write \
             smaller batches, or use a faster store"
        ),
    )
    .with_retryable(false)
}

/// How the last commit attempt ended.
enum Attempt {
    First,
    Conflict,
    Unknown(Error),
    /// The commit failed and certainly did not land (its catalog pointer was read back at the
    /// base): the error says why.
    Failed(Error),
}

/// Attempts of one append whose commits certainly failed (a busy or failing catalog) before the
/// append gives up with that error: each already waited out the catalog's busy timeout.
const MAX_FAILED_COMMITS: u32 = 2;

impl IcebergColdStore {
    /// Start building a store on the warehouse at `warehouse_url` (`file:///path`, `/path`, a
    /// relative path from the working directory, `memory://name`, `s3://bucket/prefix`,
    /// `gs://…`, `az://…`). A warehouse other than a local directory or `memory://` needs a
    /// catalog ([`catalog`](IcebergColdStoreBuilder::catalog): `CatalogConfig::Sql`, `Rest`,
    /// `Memory` or `Custom`).
    pub fn builder(warehouse_url: impl Into<String>) -> IcebergColdStoreBuilder {
        IcebergColdStoreBuilder {
            warehouse: warehouse_url.into(),
            options: Vec::new(),
            store: None,
            catalog: CatalogConfig::Default,
            namespace: vec!["dotdo".to_string()],
            table: "changes".to_string(),
            clock: Arc::new(SystemClock::new()),
            settings: Settings::default(),
        }
    }

    /// The table identifier.
    pub fn table_ident(&self) -> &TableIdent {
        &self.inner.ident
    }

    /// The warehouse location URL.
    pub fn warehouse(&self) -> &str {
        &self.inner.root.warehouse
    }

    /// How many files this store has fsynced so far (data, manifest and metadata files, with
    /// [`Settings::sync_local_files`] on a local warehouse; 0 otherwise).
    pub fn synced_files(&self) -> u64 {
        self.inner.synced_files.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The iceberg catalog (for interop and maintenance beyond what this type offers).
    pub fn catalog(&self) -> Arc<dyn Catalog> {
        self.inner.catalog.clone()
    }

    /// The newest table state this store knows (no I/O).
    pub fn table(&self) -> Table {
        self.inner.table.lock().clone()
    }

    /// Reload the table from the catalog; what the catalog says is the known table from then
    /// on, also when it is older than the one known (a catalog pointer an operator moved back,
    /// a backup restored): a known table newer than the catalog's would overstate what is
    /// durable (a watermark past the catalog's, by which a runtime truncates its hot log).
    /// Except that a table this store learnt while the reload was under way (its own commit,
    /// acknowledged meanwhile, or the answer of a reload that asked the catalog later) is kept:
    /// the reload's answer may predate it. Of concurrent reloads, the one that asked last wins.
    pub async fn refresh(&self) -> Result<Table> {
        use std::sync::atomic::Ordering;
        let ticket = self.inner.tickets.fetch_add(1, Ordering::SeqCst) + 1;
        let t = match crate::error::load_table(&*self.inner.catalog, &self.inner.ident).await {
            Ok(t) => t,
            Err(e) => {
                let what = format!("loading table {}", self.inner.ident);
                return Err(load_failure(self.inner.verifier.as_ref(), &self.inner.ident, e, &what).await);
            }
        };
        // Installed unless something was installed since this reload took its ticket: an own
        // commit acknowledged meanwhile, or the answer of a reload that asked later (another
        // reload's answer to an earlier question, a pointer moved back or a table dropped and
        // created again since, was installed over it).
        let mut cur = self.inner.table.lock();
        if ticket > self.inner.installed.load(Ordering::SeqCst) {
            *cur = t.clone();
            self.inner.installed.store(ticket, Ordering::SeqCst);
        }
        Ok(t)
    }

    /// The `bucket(do_id)` transform of `table` (reads prune by it, writes partition by it when
    /// its spec is the default one): the one of open time, or,
    /// for a table dropped and created again since, that table's own (`None`: it is not
    /// partitioned by `do_id`, and nothing is pruned by partition).
    pub(crate) fn bucketer_for(&self, table: &Table) -> Option<Arc<Bucketer>> {
        match &self.inner.bucketer {
            Some(b) if table.metadata().uuid() == self.inner.table_uuid => Some(b.clone()),
            _ => table_bucketer(table).ok().map(Arc::new),
        }
    }

    /// Keep `t`, which this store's commit just made current in the catalog, as the known
    /// table unless a newer version of the same table is already known. A different table (the
    /// known one dropped and created again after the commit landed, learnt by a reload) is left
    /// to the reloads: the commit's table is the dropped one.
    pub(crate) fn remember(&self, t: &Table) {
        use std::sync::atomic::Ordering;
        let mut cur = self.inner.table.lock();
        if t.metadata().uuid() == cur.metadata().uuid() && version_key(t) >= version_key(&cur) {
            *cur = t.clone();
            let ticket = self.inner.tickets.fetch_add(1, Ordering::SeqCst) + 1;
            self.inner.installed.store(ticket, Ordering::SeqCst);
        }
    }

    /// The table to read: reloaded from the catalog if `refresh_reads` is on.
    pub(crate) async fn read_table(&self) -> Result<Table> {
        if !self.inner.settings.refresh_reads {
            return Ok(self.table());
        }
        // SQL catalogs: one indexed SELECT tells whether the known table is still current,
        // which saves reading and parsing the metadata JSON on every read.
        if self.inner.verifier.is_some() {
            let known = self.table();
            if self.is_current(&known).await? {
                return Ok(known);
            }
        }
        self.refresh().await
    }

    /// Reload, retrying transient failures a few times (resolving an unknown outcome).
    async fn reload_for_resolution(&self) -> Result<Table> {
        let mut last = None;
        for i in 0..self.inner.settings.max_commit_attempts.max(4) {
            match self.refresh().await {
                Ok(t) => return Ok(t),
                Err(e) if e.is_retryable() => {
                    last = Some(e);
                    retry_pause(self.backoff(i)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::unavailable("reloading the table failed")))
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.inner.settings.retry_base_delay;
        base.saturating_mul(1u32 << attempt.min(7)).min(Duration::from_secs(1))
    }

    /// Resolve which snapshot `as_of` selects in `table` (`None`: before any snapshot).
    pub(crate) fn resolve(table: &Table, as_of: AsOf) -> Result<Option<SnapshotRef>> {
        let md = table.metadata();
        match as_of {
            AsOf::Latest => match md.current_snapshot() {
                Some(s) => Ok(Some(s.clone())),
                None => summary::refuse_lost_head(md).map(|()| None),
            },
            AsOf::Snapshot(id) => {
                md.snapshot_by_id(id).cloned().map(Some).ok_or_else(|| {
                    Error::new(ErrorKind::NotFound, format!("snapshot {id} does not exist (or expired)"))
                })
            }
            AsOf::Timestamp(ts) => {
                let Some(head) = md.current_snapshot_id() else { return summary::refuse_lost_head(md).map(|()| None) };
                let md = table.metadata_ref();
                let chain = ancestors(&md, head)?;
                // A snapshot's time for this purpose is the latest commit time on its chain
                // (its own or an ancestor's): another engine's snapshot carries its own clock's
                // `timestamp-ms`, which can be behind dotdo's, and a child stamped before its
                // parent must not be chosen for a time at which the parent did not exist yet.
                let at = summary::effective_committed_at(&md);
                let mut oldest: Option<SnapshotRef> = None;
                for s in chain {
                    if at(&s) <= ts {
                        return Ok(Some(s));
                    }
                    oldest = Some(s);
                }
                // The walk ended before `ts`. If the oldest retained ancestor still has a parent,
                // the history before it was expired: the state at `ts` is unknown, not empty.
                let Some(root) = oldest.as_ref() else { return Ok(None) };
                match root.parent_snapshot_id() {
                    Some(parent) => Err(Error::new(
                        ErrorKind::NotFound,
                        format!("no retained snapshot at or before {ts:?}: history before snapshot {parent}'s child was expired"),
                    )),
                    // A history that another engine started anew after dotdo's commits: what
                    // was there at `ts` is dotdo's old history, not nothing (reads of the
                    // latest state and appends are `Corrupt` on such a table too).
                    None if summary::replaced_history(&md, root) => Err(Error::corrupt(format!(
                        "table {}: the history of snapshot {head} starts at snapshot {} after dotdo's commits (the \
                         table was replaced by another engine?): the state at {ts:?} is not in it",
                        md.location(),
                        root.snapshot_id()
                    ))),
                    _ => Ok(None),
                }
            }
        }
    }

    /// The snapshot of `table` created by commit `commit_id`, searching from the head back to
    /// (excluding) `since`.
    pub(crate) fn find_commit(table: &Table, commit_id: &str, since: Option<i64>) -> Option<SnapshotRef> {
        let head = table.metadata().current_snapshot_id()?;
        iceberg::util::snapshot::ancestors_of(&table.metadata_ref(), head)
            // Bounded: a parent cycle in damaged metadata must not walk forever.
            .take(table.metadata().snapshots().len())
            .take_while(|s| Some(s.snapshot_id()) != since)
            .find(|s| summary::commit_id(s) == Some(commit_id))
    }

    /// Write the data files of the new records (`parts`, see [`Plan`]) of `batch`: one or more
    /// files per `bucket(do_id)` partition, rows sorted by `do_id, key, seq`; partitions are
    /// converted to Arrow and encoded in parallel tasks.
    pub(crate) async fn write_files(
        &self,
        table: &Table,
        batch: &Arc<ColdBatch>,
        parts: &[(usize, usize)],
        target_file_size: usize,
    ) -> Result<Vec<DataFile>> {
        let md = table.metadata_ref();
        let schema = md.current_schema().clone();
        // Checked at open, and again here: another engine may have changed it since.
        schema::check_change_table(&md, &format!("table {}", table.identifier()))?;
        let spec = md.default_partition_spec().clone();
        let arrow = Arc::new(
            iceberg::arrow::schema_to_arrow_schema(&schema).map_err(|e| classify(e, "arrow schema of the table"))?,
        );
        // Partition values by the spec the files are written under: if another engine evolved
        // the spec since this store opened, the bucketer of open time no longer applies.
        let bucketer = match self.bucketer_for(table) {
            Some(b) if b.spec.is_some_and(|(id, _)| id == spec.spec_id()) => b,
            _ => Arc::new(table_bucketer(table)?),
        };
        if spec.fields().len() != 1 {
            return Err(Error::invalid(format!(
                "{}: partition spec {} has {} fields; dotdo writes tables partitioned by bucket(do_id) alone",
                table.identifier(),
                spec.spec_id(),
                spec.fields().len()
            )));
        }
        let mut groups: BTreeMap<i32, Vec<(usize, usize)>> = BTreeMap::new();
        for &(i, from) in parts {
            groups.entry(bucketer.bucket(batch.objects[i].object.as_str())?).or_default().push((i, from));
        }
        let level = ZstdLevel::try_new(self.inner.settings.zstd_level)
            .map_err(|e| Error::invalid(format!("zstd level {}: {e}", self.inner.settings.zstd_level)))?;
        // Cap row groups by bytes as well as rows (large values make few rows per group).
        let (n, value_bytes) = parts.iter().fold((0usize, 0usize), |(n, b), &(i, from)| {
            let recs = &batch.objects[i].records[from..];
            (n + recs.len(), b + recs.iter().map(|r| r.value.len() + r.key.len() + 64).sum::<usize>())
        });
        let avg_row = value_bytes.checked_div(n).unwrap_or(0).max(1);
        let rows_per_group =
            (self.inner.settings.row_group_bytes / avg_row).clamp(1, self.inner.settings.row_group_rows.max(1));
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_max_row_group_row_count(Some(rows_per_group))
            .set_statistics_truncate_length(None)
            // Row-group statistics drive pruning; page-level ones would only cost encode time.
            .set_statistics_enabled(EnabledStatistics::Chunk)
            .set_column_statistics_enabled(ColumnPath::from("value"), EnabledStatistics::None);
        // The sorted, dictionary-encoded string columns gain little from ZSTD, the integer
        // columns are delta-encoded, and every ZSTD column chunk a reader decodes costs it a
        // fresh ZSTD context (parquet 58 creates one per column chunk, ~9 us): a point lookup
        // decodes 8 column chunks, only `value` with a codec.
        for col in schema::UNCOMPRESSED_COLUMNS {
            props = props.set_column_compression(ColumnPath::from(col), Compression::UNCOMPRESSED);
        }
        for col in schema::DELTA_COLUMNS {
            props = props
                .set_column_compression(ColumnPath::from(col), Compression::UNCOMPRESSED)
                .set_column_dictionary_enabled(ColumnPath::from(col), false)
                .set_column_encoding(ColumnPath::from(col), parquet::basic::Encoding::DELTA_BINARY_PACKED);
        }
        if self.inner.settings.bloom_filters {
            // Sized for a row group of distinct values, folded down to the target rate once the
            // group is written; kept together before the footer so a reader's fetches are close.
            for col in schema::BLOOM_COLUMNS {
                let Some(fpp) = self.inner.settings.bloom_fpp(col) else { continue };
                props = props
                    .set_column_bloom_filter_enabled(ColumnPath::from(col), true)
                    .set_column_bloom_filter_fpp(ColumnPath::from(col), fpp)
                    // At most the rows written: a small append gets a small filter.
                    .set_column_bloom_filter_ndv(ColumnPath::from(col), rows_per_group.min(n).max(1) as u64);
            }
            props = props.set_bloom_filter_position(BloomFilterPosition::End);
        }
        let props = props.build();
        let location = data_locations(&md);
        let prefix = uuid::Uuid::new_v4().to_string();
        let ident = self.inner.ident.to_string();
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::backend("dotdo-iceberg must run inside a tokio runtime (iceberg-rust needs one)"))?;
        let mut tasks = Vec::with_capacity(groups.len());
        let chunk = write_chunk_bytes(target_file_size as u64);
        for (bucket, mut members) in groups {
            let pk = PartitionKey::new(
                spec.as_ref().clone(),
                schema.clone(),
                Struct::from_iter([Some(Literal::Primitive(PrimitiveLiteral::Int(bucket)))]),
            );
            let builder = DataFileWriterBuilder::new(RollingFileWriterBuilder::new(
                ParquetWriterBuilder::new(props.clone(), schema.clone()),
                target_file_size,
                table.file_io().clone(),
                location.clone(),
                DefaultFileNameGenerator::new(prefix.clone(), None, DataFileFormat::Parquet),
            ));
            let (batch, arrow, ident) = (batch.clone(), arrow.clone(), ident.clone());
            tasks.push(rt.spawn(async move {
                // Objects in id order; each object's records by key, then seq (a stable sort of
                // records already in seq order).
                members.sort_by(|a, b| batch.objects[a.0].object.cmp(&batch.objects[b.0].object));
                let mut rows: Vec<&ChangeRecord> = Vec::new();
                for (i, from) in members {
                    let start = rows.len();
                    rows.extend(&batch.objects[i].records[from..]);
                    rows[start..].sort_by(|a, b| a.key.cmp(&b.key));
                }
                let what = format!("writing data files of {ident}");
                let mut w = builder.build(Some(pk)).await.map_err(|e| classify_write(e, &what))?;
                // Arrow batches of at most `chunk` bytes: a string column holds at most 2 GiB
                // (32-bit offsets), and a partition of a large append or collapse can hold more;
                // and the rolling writer starts a new file only between batches, so a batch of a
                // whole partition made one file of it whatever `target_file_size` said.
                for range in write_chunks(&rows, chunk) {
                    let rb = schema::to_batch(&arrow, &rows[range])?;
                    w.write(rb).await.map_err(|e| classify_write(e, &what))?;
                }
                drop(rows);
                w.close().await.map_err(|e| classify_write(e, &what))
            }));
        }
        let mut results = Vec::with_capacity(tasks.len());
        for t in tasks {
            results.push(t.await);
        }
        self.files_of_writers(results, "writing data files").await
    }

    /// Delete the data files an append attempt wrote (`written`) when no attempt that named them
    /// can have committed: the last one certainly did not (`Conflict`, `Failed`) and none before
    /// had an unknown outcome. Otherwise they stay for the cleanup (a request that timed out may
    /// still land).
    async fn discard_unlanded(&self, written: Option<Written>, last: &Attempt, maybe_landed: bool) {
        // (`First`: the files were written and no commit naming them was sent, a checkpoint that
        // could not be written.)
        if let (Some((_, _, files, _)), false, false) = (written, matches!(last, Attempt::Unknown(_)), maybe_landed) {
            self.delete_files(files.iter().map(|f| f.file_path().to_string()).collect()).await;
        }
    }

    /// The data files parallel writer tasks wrote (`results`, in order), or the first failure,
    /// with every file the others wrote deleted (nothing references them).
    pub(crate) async fn files_of_writers(
        &self,
        results: impl IntoIterator<Item = std::result::Result<Result<Vec<DataFile>>, tokio::task::JoinError>>,
        what: &str,
    ) -> Result<Vec<DataFile>> {
        let (mut files, mut first_err) = (Vec::new(), None);
        for r in results {
            match r {
                Ok(Ok(f)) => files.extend(f),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(join) => {
                    first_err.get_or_insert_with(|| {
                        Error::backend(format!("{what}: a data file writer task failed: {join}"))
                    });
                }
            }
        }
        match first_err {
            None => Ok(files),
            Some(e) => {
                self.delete_files(files.iter().map(|f| f.file_path().to_string()).collect()).await;
                Err(e)
            }
        }
    }

    /// Best-effort deletion of files that no commit references (failed attempts).
    pub(crate) async fn delete_files(&self, paths: Vec<String>) {
        for p in paths {
            if let Ok(key) = self.inner.root.key(&p) {
                if let Err(e) = self.inner.root.store.delete(&key).await {
                    tracing::debug!(file = %p, error = %e, "could not delete an unreferenced data file");
                }
            }
        }
    }

    /// One append attempt of `files` with summary `props` on the pinned base `table` (this
    /// store's change table or one of its catalog's user tables): dotdo's fast append on the SQL
    /// catalog, iceberg's otherwise.
    pub(crate) async fn try_commit(
        &self,
        table: &Table,
        files: Vec<DataFile>,
        props: HashMap<String, String>,
        written_at: Option<WriteStart>,
    ) -> iceberg::Result<Table> {
        if let Some(swap) = &self.inner.verifier {
            if table.metadata().format_version() == iceberg::spec::FormatVersion::V2 {
                return self.fast_append(swap, table, files, props, written_at).await;
            }
        }
        // Only a v1 table reaches here with another engine's refs iceberg would drop.
        crate::commit::refuse_v1_refs(table, &format!("appending to {}", table.identifier()))
            .await
            .map_err(crate::commit::not_landed)?;
        // iceberg numbers the snapshot last-sequence-number + 1, unchecked (the fast append
        // checks it itself).
        let seq = crate::commit::next_sequence_number(table.metadata()).map_err(crate::commit::not_landed)?;
        // The snapshot's dotdo state, also as a table property (`summary::LAST_COMMIT`; the
        // snapshot id iceberg picks is not known here), in the same commit.
        let last_commit = summary::last_commit_property(&props, None, seq);
        // As dotdo's fast append checks just before its swap: files past half of
        // `min_cleanup_retention` may already be gone to a cleanup.
        if let Some(age) = written_at.and_then(|at| self.uncommitted_age_past(at, table.metadata())) {
            return Err(too_old_to_commit(age));
        }
        let tx = Transaction::new(table);
        let mut tx = tx
            .fast_append()
            .add_data_files(files)
            .set_snapshot_properties(props)
            .with_check_duplicate(false)
            .apply(tx)?;
        if let Some((k, v)) = last_commit {
            tx = tx.update_table_properties().set(k, v).apply(tx)?;
        }
        let pinned = self.pinned(table);
        crate::error::iceberg_panic_is_corrupt(table, tx.commit(&pinned)).await.map_err(|e| pinned.mark(e))
    }

    /// The time a commit on top of `md`'s current snapshot records (`dotdo.committed-at-us`):
    /// this store's clock, but not before the time reads give the parent (its chain's latest
    /// commit, which may be a dotdo commit under another engine's earlier-stamped one), so the
    /// stored time does not depend on that ancestor staying in the metadata.
    pub(crate) fn commit_time(&self, md: &iceberg::spec::TableMetadata) -> Timestamp {
        let parent_at = md.current_snapshot().map_or(Timestamp::EPOCH, |s| summary::parent_time(md, s));
        self.inner.clock.now().max(parent_at)
    }

    /// When writing files begins, on this store's clock (see [`WriteStart`]).
    pub(crate) fn write_start(&self) -> WriteStart {
        WriteStart { monotonic: self.inner.clock.monotonic(), wall: self.inner.clock.now() }
    }

    /// The oldest a file this store wrote may be when a commit on the table `md` names it:
    /// [`Settings::max_uncommitted_age`] (half of `min_cleanup_retention`; none if that is zero),
    /// or half the minimum the table records ([`MIN_CLEANUP_PROP`]) if that is smaller: a table
    /// dropped and created again by a store with a smaller minimum (or another engine's edit, a
    /// catalog pointer moved back) lets a cleanup use that retention, and a file older than half
    /// of it may already be gone when the commit lands (this store raises the property only when
    /// it opens the table).
    pub(crate) fn max_uncommitted_age_on(&self, md: &iceberg::spec::TableMetadata) -> Option<Duration> {
        let own = self.inner.settings.max_uncommitted_age()?;
        let recorded = recorded_cleanup_minimum(md).ok().filter(|r| !r.is_zero());
        Some(recorded.map_or(own, |r| own.min(r / 2)))
    }

    /// The age of files whose writing began at `written_at`, if past
    /// [`max_uncommitted_age_on`](Self::max_uncommitted_age_on) the table `md`: the larger of
    /// its monotonic and its wall-clock age (see [`WriteStart`]).
    pub(crate) fn uncommitted_age_past(
        &self,
        written_at: WriteStart,
        md: &iceberg::spec::TableMetadata,
    ) -> Option<Duration> {
        let max = self.max_uncommitted_age_on(md)?;
        let clock = &self.inner.clock;
        let age = clock.monotonic().saturating_sub(written_at.monotonic).max(clock.now().since(written_at.wall));
        (age > max).then_some(age)
    }

    /// Whether `table` is the catalog's current version of the change table (the SQL catalog's
    /// pointer read; with other catalogs, not known: `false`).
    async fn is_current(&self, table: &Table) -> Result<bool> {
        let Some(v) = &self.inner.verifier else { return Ok(false) };
        let current = v.metadata_location(&self.inner.ident).await?;
        Ok(current.is_some() && current.as_deref() == table.metadata_location())
    }

    /// The result of our commit `s`, found in `table` after an unknown outcome: planned against
    /// its parent's watermarks, or, if the parent was expired meanwhile (its watermarks unknown),
    /// taken from `s` itself (its added records and its watermarks of the batch's objects). A
    /// commit that landed is never reported as failed.
    async fn landed_result(&self, table: &Table, s: &SnapshotRef, batch: &ColdBatch) -> Result<ColdCommit> {
        let md = table.metadata();
        let parent = s.parent_snapshot_id().and_then(|p| md.snapshot_by_id(p)).cloned();
        if parent.is_some() || s.parent_snapshot_id().is_none() {
            // The parent's watermarks may be unknown too (a foreign parent whose dotdo base was
            // expired): fall back as below rather than report a landed commit as failed.
            if let Ok(parent_wm) = self.watermarks_of(md, parent.as_ref()).await {
                if let Ok(p) = plan(batch, &parent_wm) {
                    return Ok(Self::commit_result(s, &p));
                }
            }
        }
        let marks = self.watermarks_of(md, Some(s)).await?;
        let written = summary::added_records(s);
        Ok(ColdCommit {
            snapshot: Some(s.snapshot_id()),
            records_written: written,
            records_skipped: (batch.record_count() as u64).saturating_sub(written),
            watermarks: batch
                .objects
                .iter()
                .filter_map(|oc| marks.get(&oc.object).map(|w| (oc.object.clone(), w)))
                .collect(),
        })
    }

    fn commit_result(snapshot: &SnapshotRef, plan: &Plan) -> ColdCommit {
        ColdCommit {
            snapshot: Some(snapshot.snapshot_id()),
            records_written: plan.fresh,
            records_skipped: plan.skipped,
            watermarks: plan.batch_marks.clone(),
        }
    }
}

impl IcebergColdStore {
    /// The catalog's current table, to judge `verdict` (about `what`, reached on a known table
    /// that may be stale) once more: `None` if it cannot be read for good (the verdict stands).
    /// A retryable failure to read it is the answer (with the verdict as context): the current
    /// table cannot be read just now, and the verdict may blame a stale one (a `Corrupt` an
    /// operator would be called for, "records would be lost" blaming the batch).
    async fn judged_again(&self, verdict: &Error, what: &str) -> Result<Option<Table>> {
        match self.reload_for_resolution().await {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.is_retryable() => {
                Err(e.context(format!("checking {what} against the current table ({verdict})")))
            }
            Err(_) => Ok(None),
        }
    }

    /// The append protocol (see the crate docs) for a validated batch. Once an attempt's outcome
    /// was unknown, every later failure (to read the table back, or to go on: a reload refused
    /// for good, a verdict on a table that may not show the attempt yet) but `Fenced` is
    /// `AmbiguousOutcome` until a read-back settles it: that attempt may have landed, or still
    /// land (see [`unsettled`]).
    async fn append_validated(&self, batch: &Arc<ColdBatch>) -> Result<ColdCommit> {
        let (mut maybe_landed, mut written) = (false, None);
        let out = self.append_attempts(batch, &mut maybe_landed, &mut written).await;
        // An early exit (fenced on a fresher table after a lost swap, a reload refused for good, a
        // batch found committed meanwhile by another store) left the files of attempts that all
        // certainly did not land: nobody's. (After an unknown outcome they stay; once a commit
        // naming them was acknowledged or found, `written` is empty.)
        if !maybe_landed {
            if let Some((_, _, files, _)) = written.take() {
                self.delete_files(files.iter().map(|f| f.file_path().to_string()).collect()).await;
            }
        }
        out.map_err(|e| unsettled(e, maybe_landed, "", ""))
    }

    /// The attempts of [`append_validated`](Self::append_validated); `maybe_landed` is set while
    /// an attempt of unknown outcome is unsettled (cleared once a read-back found it absent);
    /// `written` holds the data files of the latest attempt until a commit naming them is known
    /// to have landed.
    async fn append_attempts(
        &self,
        batch: &Arc<ColdBatch>,
        maybe_landed: &mut bool,
        written: &mut Option<Written>,
    ) -> Result<ColdCommit> {
        let _serial = self.inner.commit_lock.lock().await;
        let commit_id = uuid::Uuid::new_v4().to_string();
        let mut table = self.table();
        // The head of the table when the first attempt was made: a landed attempt of ours
        // can only be newer than it.
        let mut first_head: Option<Option<i64>> = None;
        let mut last = Attempt::First;
        // Once an attempt's outcome was unknown, every later round first looks for it.
        let mut reloaded = false;
        let mut failed_commits = 0u32;
        // Attempts in a row refused for files too old to commit (see `too_slow_to_commit`).
        let mut too_old = TooOldStreak::default();
        let attempts = self.inner.settings.max_commit_attempts;
        // Rounds run: at most `attempts`, and one more after a refusal judged again on the
        // catalog's current table (that round is the same attempt on a fresher table).
        let (mut rounds, mut round_limit) = (0, attempts);
        while rounds < round_limit {
            let attempt = rounds;
            rounds += 1;
            let head = table.metadata().current_snapshot().cloned();
            if *maybe_landed {
                let since = first_head.flatten();
                if let Some(s) = Self::find_commit(&table, &commit_id, since) {
                    // An attempt whose reply was lost did land; report it.
                    *written = None;
                    return self.landed_result(&table, &s, batch).await;
                }
            }
            first_head.get_or_insert(head.as_ref().map(|s| s.snapshot_id()));
            let mut head = head;
            let (prev, p) = loop {
                let prev = match self.watermarks_of(table.metadata(), head.as_ref()).await {
                    Ok(w) => w,
                    // The known table may be stale, and the checkpoint its head names cleaned up
                    // since (another store expired it): judge once more against the catalog's
                    // current table; if its watermarks cannot be read either, that error stands.
                    Err(e) if !reloaded && !e.is_retryable() => {
                        reloaded = true;
                        let Some(t) = self.judged_again(&e, "the batch").await? else { return Err(e) };
                        table = t;
                        head = table.metadata().current_snapshot().cloned();
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                match plan(batch, &prev) {
                    // A batch with nothing new is answered without a commit: from the current
                    // table, not a known one that may be stale (a higher token committed since,
                    // which fences this writer; or another engine rolled the table back, and the
                    // records reported durable would be truncated from the hot store).
                    Ok(p) if p.fresh == 0 && !reloaded && !self.is_current(&table).await? => {
                        reloaded = true;
                        table = self.reload_for_resolution().await?;
                        head = table.metadata().current_snapshot().cloned();
                    }
                    Ok(p) => break (prev, p),
                    // The known table may be stale (another store committed since): a batch that
                    // looks like it skips records is judged once more against the catalog's
                    // current table (not counted as an attempt); if it still does, or the
                    // table cannot be read, the plan's error stands.
                    Err(plan_err) if !reloaded => {
                        reloaded = true;
                        let Some(t) = self.judged_again(&plan_err, "the batch").await? else { return Err(plan_err) };
                        table = t;
                        head = table.metadata().current_snapshot().cloned();
                    }
                    Err(e) => return Err(e),
                }
            };
            if p.fresh == 0 {
                // Nothing is committed, so nothing (a higher token included) becomes durable.
                return Ok(ColdCommit {
                    snapshot: None,
                    records_written: 0,
                    records_skipped: p.skipped,
                    watermarks: p.durable_marks,
                });
            }
            // Files are reused by a later attempt only in the table and under the spec they were
            // written for: another engine may have evolved the table's partition spec meanwhile,
            // or dropped the table and created it again under the same name (spec ids start
            // over at 0 there: files of the old table's buckets, perhaps purged with it).
            let spec_id = (table.metadata().uuid(), table.metadata().default_partition_spec_id());
            // Nor once they are older than half of `min_cleanup_retention` (retries after slow
            // stores, conflicts and unknown outcomes add up): a cleanup running meanwhile may
            // judge them unreferenced and delete them after the commit lands (a snapshot naming
            // missing files). New files are written instead, as a compaction's check refuses.
            let young = |at: &WriteStart| self.uncommitted_age_past(*at, table.metadata()).is_none();
            let files = match &*written {
                Some((ranges, spec, files, at)) if *ranges == p.ranges && *spec == spec_id && young(at) => {
                    // As `write_files` checks for new files: another engine may have changed the
                    // schema since these were written (the attempt lost its swap to that change).
                    schema::check_change_table(table.metadata(), &format!("table {}", table.identifier()))?;
                    files.clone()
                }
                _ => {
                    self.discard_unlanded(written.take(), &last, *maybe_landed).await;
                    let started = self.write_start();
                    let files =
                        match self.write_files(&table, batch, &p.parts, self.inner.settings.target_file_size).await {
                            Ok(f) => f,
                            Err(e) if e.is_retryable() && attempt + 1 < attempts => {
                                retry_pause(self.backoff(attempt)).await;
                                last = Attempt::First;
                                continue;
                            }
                            // A refusal of the table's layout, judged on a known table that may
                            // be stale (another engine changed it back since): judged once
                            // more on the catalog's current table, as a plan's verdict is.
                            Err(e) if !e.is_retryable() && !reloaded => {
                                reloaded = true;
                                match self.judged_again(&e, "the batch").await? {
                                    Some(t) if t.metadata_location() != table.metadata_location() => {
                                        table = t;
                                        // Not counted: with one attempt allowed, a refusal
                                        // for the batch itself (a bad key) ended as a
                                        // retryable "could not be prepared" instead.
                                        round_limit = attempts.saturating_add(1);
                                        continue;
                                    }
                                    _ => return Err(e),
                                }
                            }
                            Err(e) => return Err(e),
                        };
                    *written = Some((p.ranges.clone(), spec_id, files.clone(), started));
                    files
                }
            };
            let at = self.commit_time(table.metadata());
            let mut inline = prev.inline.clone();
            inline.extend(p.batch_marks.iter().map(|(k, v)| (k.clone(), *v)));
            // The inline watermarks this snapshot repeats from its parent (not its own batch's).
            let repeated = summary::inline_bytes(prev.inline.keys().filter(|id| !p.batch_marks.contains_key(*id)));
            let carried = prev.carried.saturating_add(repeated);
            // The checkpoint this attempt writes, if any: deleted if the attempt certainly did not
            // land (nothing else names it; it stayed until a cleanup, tens of MB at a million
            // objects, per lost attempt).
            let mut own_checkpoint: Option<String> = None;
            let props = if inline.len() > self.inner.settings.watermark_checkpoint_objects
                || summary::inline_too_large(&inline)
                || summary::carried_too_much(carried, prev.full_bytes())
            {
                let cp = match self.write_checkpoint(&table, &prev.full_with(&p.batch_marks)).await {
                    Ok(cp) => cp,
                    Err(e) if e.is_retryable() && attempt + 1 < attempts => {
                        retry_pause(self.backoff(attempt)).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                own_checkpoint = Some(cp.clone());
                summary::properties(&Watermarks::new(), Some(&cp), 0, &commit_id, at)
            } else {
                summary::properties(&inline, prev.checkpoint.as_deref(), carried, &commit_id, at)
            };
            let written_at = written.as_ref().map(|(_, _, _, at)| *at);
            let committed = self.try_commit(&table, files, props, written_at).await;
            let lost = |e: &iceberg::Error| {
                e.kind() == iceberg::ErrorKind::CatalogCommitConflicts || crate::catalog::did_not_land(e)
            };
            if committed.as_ref().is_err_and(lost) {
                // This attempt certainly did not land: its checkpoint is nobody's.
                self.delete_files(own_checkpoint.into_iter().collect()).await;
            }
            match committed {
                Ok(t) => {
                    // Acknowledged: the files are the table's now.
                    *written = None;
                    self.remember(&t);
                    let snap = t
                        .metadata()
                        .current_snapshot()
                        .filter(|s| summary::commit_id(s) == Some(commit_id.as_str()))
                        .cloned();
                    return match snap {
                        Some(s) => Ok(Self::commit_result(&s, &p)),
                        None => Err(Error::new(
                            ErrorKind::AmbiguousOutcome,
                            "the catalog acknowledged the commit but its head is not the new snapshot",
                        )),
                    };
                }
                Err(e) if e.kind() == iceberg::ErrorKind::CatalogCommitConflicts => {
                    if let Some(slow) = too_old.after(&e, &format!("committing to {}", self.inner.ident)) {
                        last = Attempt::Failed(slow);
                        break;
                    }
                    tracing::debug!(attempt, "cold commit conflict; re-reading watermarks");
                    last = Attempt::Conflict;
                    retry_pause(self.backoff(attempt)).await;
                    table = match self.reload_for_resolution().await {
                        Ok(t) => t,
                        Err(e) => return Err(e.context("reloading the table after a commit conflict")),
                    };
                }
                Err(e) if crate::catalog::did_not_land(&e) => {
                    let counted = !crate::catalog::not_counted(&e);
                    let err = classify(e, &format!("committing to {}", self.inner.ident));
                    tracing::debug!(attempt, error = %err, "cold commit failed and did not land");
                    // Failed before it was sent (a store in trouble while writing the manifests),
                    // or refused for now (a REST 408 or 429): retried while attempts last, as an
                    // unknown outcome was, not counted as a catalog failing commits.
                    failed_commits += u32::from(counted);
                    // Prepared on a known table that may be stale: its head's manifest list,
                    // which the commit reads, may be gone to another store's cleanup (`Corrupt`).
                    // Judged once against the catalog's current table: if that moved on, this
                    // is a conflict, planned again on it.
                    if !err.is_retryable() && !reloaded {
                        reloaded = true;
                        let current = self.judged_again(&err, "the failed commit").await?;
                        if let Some(t) = current.filter(|t| t.metadata_location() != table.metadata_location()) {
                            tracing::debug!(attempt, error = %err, "cold commit prepared on a stale table; planning again");
                            last = Attempt::Conflict;
                            table = t;
                            continue;
                        }
                    }
                    let give_up = !err.is_retryable() || failed_commits >= MAX_FAILED_COMMITS;
                    last = Attempt::Failed(err);
                    if give_up {
                        break;
                    }
                    retry_pause(self.backoff(attempt)).await;
                    table = match self.reload_for_resolution().await {
                        Ok(t) => t,
                        Err(e) => return Err(e.context("reloading the table after a failed commit")),
                    };
                }
                Err(e) => {
                    let err = classify(e, &format!("committing to {}", self.inner.ident));
                    tracing::debug!(attempt, error = %err, "cold commit outcome unknown; reading back");
                    // A pause first, as after a conflict or a failed commit: an unknown outcome
                    // is mostly a store or catalog in trouble (a throttled REST catalog, an
                    // object store slowing down), which back-to-back attempts only load more.
                    // Set before the read-back, which may end the append: the files stay.
                    *maybe_landed = true;
                    retry_pause(self.backoff(attempt)).await;
                    table = match self.reload_for_resolution().await {
                        Ok(t) => t,
                        Err(reload) => {
                            return Err(Error::new(
                                ErrorKind::AmbiguousOutcome,
                                format!("commit failed ({err}) and the table could not be read back ({reload})"),
                            )
                            .with_source(err))
                        }
                    };
                    last = Attempt::Unknown(err);
                }
            }
        }
        if *maybe_landed {
            // A final read-back: did an attempt land after all? (Unreadable: the outcome stays
            // unknown.)
            let t = self.reload_for_resolution().await.map_err(|e| {
                Error::new(
                    ErrorKind::AmbiguousOutcome,
                    format!("cold commit outcome unknown after {attempts} attempts, and the table could not be read back ({e})"),
                )
            })?;
            if let Some(s) = Self::find_commit(&t, &commit_id, first_head.flatten()) {
                *written = None;
                return self.landed_result(&t, &s, batch).await;
            }
        }
        // Read back above and not found: no attempt landed where the read-back settles it (the
        // last error is the answer); otherwise an attempt whose outcome was unknown may land yet:
        // the outcome stays unknown (it was reported as failed).
        if self.inner.read_back_settles {
            *maybe_landed = false;
        }
        self.discard_unlanded(written.take(), &last, *maybe_landed).await;
        match last {
            Attempt::Unknown(e) => Err(e.context(format!("cold commit failed after {attempts} attempts"))),
            Attempt::Failed(e) => Err(e.context("the cold commit did not land")),
            Attempt::Conflict => Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "cold commit to {} still conflicting after {attempts} attempts (other writers kept \
                         committing first; Settings::max_commit_attempts)",
                    self.inner.ident
                ),
            )),
            Attempt::First => {
                Err(Error::unavailable(format!("cold commit could not be prepared in {attempts} attempts")))
            }
        }
    }
}

/// The error `e` of an append one of whose attempts had an outcome still unknown
/// (`maybe_landed`): `AmbiguousOutcome` naming `e` (which says nothing about that attempt),
/// unless it is one already or `Fenced` (a higher token committed since: that attempt, made on
/// an older head, landed before it or never lands). `what` (if not empty) names the append,
/// `retry` tells the caller how to find out.
pub(crate) fn unsettled(e: Error, maybe_landed: bool, what: &str, retry: &str) -> Error {
    if !maybe_landed || e.kind() == &ErrorKind::AmbiguousOutcome || e.is_fenced() {
        return e;
    }
    let message = format!("an earlier attempt's outcome is unknown, and the append then failed ({e}){retry}");
    let e = Error::new(ErrorKind::AmbiguousOutcome, message).with_source(e);
    if what.is_empty() {
        e
    } else {
        e.context(what)
    }
}

/// Structural checks, value sizes and record tokens up front; keys and type names are checked
/// while the records are converted to Arrow (in parallel, in the same pass over the data), before
/// any commit. Together: [`ColdBatch::validate_records`].
fn validate_records(batch: &ColdBatch) -> Result<()> {
    batch.validate()?;
    for r in batch.objects.iter().flat_map(|o| o.records.iter()) {
        let named = |e: Error| e.context(format!("change record {} of {}", r.seq, r.object));
        validate_value(&r.value).map_err(named)?;
        r.token.validate().map_err(named)?;
    }
    Ok(())
}

/// Free a large batch off the caller's path (millions of small allocations take tens of
/// milliseconds to free); small batches are dropped in place.
fn drop_batch(batch: Arc<ColdBatch>, records: u64) {
    if records >= 100_000 {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            drop(rt.spawn_blocking(move || drop(batch)));
        }
    }
}

impl IcebergColdStore {
    /// The current snapshot and the watermarks of `objects` recorded in it, from one table read
    /// (read once more if the snapshot read was expired meanwhile).
    async fn head_watermarks(&self, objects: &[ObjectId]) -> Result<(Option<SnapshotId>, Vec<Watermark>)> {
        latest_once_more(AsOf::Latest, || async {
            let table = self.read_table().await?;
            let Some(s) = table.metadata().current_snapshot() else {
                summary::refuse_lost_head(table.metadata())?;
                return Ok((None, vec![Watermark::default(); objects.len()]));
            };
            let watermarks = self.read_at(Some(s), self.watermarks_in(table.metadata(), s, objects)).await?;
            Ok((Some(s.snapshot_id()), watermarks))
        })
        .await
    }
}

#[async_trait]
impl ColdSink for IcebergColdStore {
    async fn append(&self, batch: ColdBatch) -> Result<ColdCommit> {
        validate_records(&batch)?;
        let n = batch.record_count() as u64;
        let batch = Arc::new(batch);
        let result = self.append_validated(&batch).await;
        drop_batch(batch, n);
        result
    }

    async fn watermark(&self, object: &ObjectId) -> Result<Watermark> {
        Ok(self.watermarks(std::slice::from_ref(object)).await?.pop().unwrap_or_default())
    }

    /// One table read for all of `objects`; each is looked up in the snapshot's inline part
    /// and (cached) checkpoint, never by copying every object's watermark. As the other reads of
    /// the latest state: read once more if the snapshot read was expired meanwhile (on a stale
    /// known table, its checkpoint may be gone to another store's cleanup).
    async fn watermarks(&self, objects: &[ObjectId]) -> Result<Vec<Watermark>> {
        Ok(self.head_watermarks(objects).await?.1)
    }

    /// One table read: the current snapshot and the object's watermark recorded in it.
    async fn head(&self, object: &ObjectId) -> Result<(Option<SnapshotId>, Watermark)> {
        let (snapshot, mut wm) = self.head_watermarks(std::slice::from_ref(object)).await?;
        Ok((snapshot, wm.pop().unwrap_or_default()))
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let table = self.read_table().await?;
        let Some(head) = table.metadata().current_snapshot_id() else {
            // A table whose head another engine removed after dotdo's commits is `Corrupt`, as
            // to every other read (not "nothing committed").
            summary::refuse_lost_head(table.metadata())?;
            return Ok(Vec::new());
        };
        // The time `AsOf::Timestamp` goes by (another engine's snapshot may be stamped before
        // its parent), so that a read as of a reported time finds that snapshot.
        let at = summary::effective_committed_at(table.metadata());
        let mut out: Vec<SnapshotInfo> = ancestors(&table.metadata_ref(), head)?
            .into_iter()
            .map(|s| SnapshotInfo {
                id: s.snapshot_id(),
                parent: s.parent_snapshot_id(),
                committed_at: at(&s),
                added_records: summary::added_records(&s),
            })
            .collect();
        out.reverse();
        Ok(out)
    }

    async fn load_state(&self, object: &ObjectId, as_of: AsOf) -> Result<ColdState> {
        latest_once_more(as_of, || self.load_state_once(object, as_of)).await
    }

    async fn read_changes(&self, object: &ObjectId, after: Seq, as_of: AsOf) -> Result<Vec<ChangeRecord>> {
        latest_once_more(as_of, || self.changes_between(object, after, None, as_of)).await
    }

    async fn read_changes_through(
        &self,
        object: &ObjectId,
        after: Seq,
        through: Seq,
        as_of: AsOf,
    ) -> Result<Vec<ChangeRecord>> {
        if through <= after {
            return Ok(Vec::new());
        }
        latest_once_more(as_of, || self.changes_between(object, after, Some(through), as_of)).await
    }
}

impl IcebergColdStore {
    async fn load_state_once(&self, object: &ObjectId, as_of: AsOf) -> Result<ColdState> {
        let table = self.read_table().await?;
        let snap = Self::resolve(&table, as_of)?;
        let read = async {
            let (records, _) = self.records_of(&table, snap.as_ref(), object, &crate::read::Filter::default()).await?;
            let (entries, mut through) = dotdo_core::cold::fold_changes(&records);
            if let Some(s) = &snap {
                // The snapshot's watermark, not only the highest seq still stored: a collapse may
                // have dropped an object's newest records (a delete and what it deleted), and a
                // restore must continue after the watermark, never reuse its sequence numbers.
                let md = table.metadata();
                let wm = self.watermark_in(md, s, object).await.map_err(|e| history_error(md, s, e))?;
                through = through.max(wm.through);
            }
            Ok::<_, Error>((entries, through))
        };
        let (entries, through) = self.read_at(snap.as_ref(), read).await?;
        Ok(ColdState { entries, through, snapshot: snap.map(|s| s.snapshot_id()) })
    }

    /// The changes of `object` with `seq > after` (and `seq <= through`), as of a snapshot (whose
    /// history must be dotdo's: [`check_history`]). Files
    /// whose sequence bounds lie outside the range are not opened; rows outside it are dropped as
    /// each batch is decoded.
    async fn changes_between(
        &self,
        object: &ObjectId,
        after: Seq,
        through: Option<Seq>,
        as_of: AsOf,
    ) -> Result<Vec<ChangeRecord>> {
        let table = self.read_table().await?;
        let snap = Self::resolve(&table, as_of)?;
        if let Some(s) = &snap {
            check_history(table.metadata(), s)?;
        }
        let filter =
            crate::read::Filter { min_seq: Some(after.saturating_add(1)), max_seq: through, ..Default::default() };
        let read = self.records_of(&table, snap.as_ref(), object, &filter);
        Ok(self.read_at(snap.as_ref(), read).await?.0)
    }

    /// Run `read` of snapshot `snap`'s files. If it found one of them missing (`Corrupt`) and
    /// maintenance expired the snapshot meanwhile (between resolving it and reading its files;
    /// it is not in the current table), the read is `NotFound` as for any expired snapshot, so
    /// a reader pinned to it re-pins; if the table cannot be loaded to tell (the catalog busy or
    /// unreachable), it is that retryable error, naming the read's error (a retry decides);
    /// otherwise its error stands.
    pub(crate) async fn read_at<T>(
        &self,
        snap: Option<&SnapshotRef>,
        read: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let e = match read.await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let Some(id) = snap.map(|s| s.snapshot_id()).filter(|_| e.kind() == &ErrorKind::Corrupt) else {
            return Err(e);
        };
        match self.refresh().await {
            Ok(t) if t.metadata().snapshot_by_id(id).is_none() => {
                Err(Error::new(ErrorKind::NotFound, format!("snapshot {id} expired while it was read ({e})"))
                    .with_source(ExpiredWhileRead(e)))
            }
            // The table was dropped meanwhile: `NotFound`, as for any read of a missing table
            // (its files went with it; they are not damaged).
            Err(re) if re.kind() == &ErrorKind::NotFound => {
                Err(re.context(format!("a read of snapshot {id} failed ({e}): the table is gone")))
            }
            // `Corrupt` is for good: it must not stand for a snapshot that may just have expired.
            Err(re) if re.is_retryable() => Err(re.context(format!(
                "a read of snapshot {id} failed ({e}); whether the snapshot expired meanwhile could not be checked"
            ))),
            _ => Err(e),
        }
    }
}

/// The source of [`read_at`](IcebergColdStore::read_at)'s `NotFound`: the snapshot read expired
/// meanwhile (the error inside is the read's, a file found missing).
#[derive(Debug)]
struct ExpiredWhileRead(Error);

impl std::fmt::Display for ExpiredWhileRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ExpiredWhileRead {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// `read`, and once more if it asked for the latest state and found the snapshot it read
/// expired meanwhile (`NotFound` from [`read_at`](IcebergColdStore::read_at), which has refreshed the
/// table): a caller of `AsOf::Latest` has nothing to re-pin. Only for `Latest`: a read of a
/// given snapshot or time keeps its `NotFound`. If the second read finds its snapshot
/// expired too (another store expiring and cleaning up with a very short retention), a
/// retryable `Unavailable`: `NotFound` would say the caller's read can never be answered.
pub(crate) async fn latest_once_more<T, F, Fut>(as_of: AsOf, read: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    match read().await {
        Err(e) if as_of == AsOf::Latest && expired_while_read(&e) => match read().await {
            Err(again) if expired_while_read(&again) => Err(Error::unavailable(
                "the latest snapshot expired (and its files were cleaned up) while it was read, twice in a row: \
                 another store expires snapshots with a very short retention; retry",
            )
            .with_source(again)),
            other => other,
        },
        other => other,
    }
}

/// Whether `e` is [`read_at`](IcebergColdStore::read_at)'s answer for a snapshot that expired
/// while it was read (that `NotFound`, or [`latest_once_more`]'s `Unavailable` over a second
/// one; a missing table is not read again).
fn expired_while_read(e: &Error) -> bool {
    crate::error::chain(e).any(|x| x.is::<ExpiredWhileRead>())
}

/// Most bytes per Arrow batch handed to the Parquet writer; well under the 2 GiB a
/// 32-bit-offset string column can hold.
const WRITE_CHUNK_BYTES: usize = 256 << 20;

/// The bytes per Arrow batch handed to a Parquet writer rolling files at `target_file_size`: an
/// eighth of it (a file ends about that far past the target at most), at least 1 MiB (so a
/// target under 8 MiB may be passed by up to 1 MiB), at most [`WRITE_CHUNK_BYTES`].
pub(crate) fn write_chunk_bytes(target_file_size: u64) -> usize {
    usize::try_from(target_file_size / 8).unwrap_or(usize::MAX).clamp(1 << 20, WRITE_CHUNK_BYTES)
}

/// Consecutive ranges of `rows` covering all of them, each with at most `max_bytes` of data
/// (object id, type name, key, op, value) unless a single row alone has more.
fn write_chunks(rows: &[&ChangeRecord], max_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (i, r) in rows.iter().enumerate() {
        let b = r.object.as_str().len() + r.type_name.len() + r.key.len() + r.value.len() + 8;
        if i > start && bytes + b > max_bytes {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += b;
    }
    if start < rows.len() {
        out.push(start..rows.len());
    }
    out
}

/// The ancestors of snapshot `head`, head first. A parent chain longer than the table's snapshot
/// count (a cycle in damaged metadata, which iceberg's own walk would follow forever) is
/// `Corrupt`.
pub(crate) fn ancestors(md: &iceberg::spec::TableMetadataRef, head: i64) -> Result<Vec<SnapshotRef>> {
    let cap = md.snapshots().len();
    let chain: Vec<SnapshotRef> = iceberg::util::snapshot::ancestors_of(md, head).take(cap + 1).collect();
    if chain.len() > cap {
        return Err(Error::corrupt(format!(
            "table metadata at {}: the parent chain of snapshot {head} loops",
            md.location()
        )));
    }
    Ok(chain)
}

/// How new a table version is: its last sequence number (every snapshot raises it), then the
/// version number of its metadata file (every commit raises it, metadata-only ones too), then
/// its last-updated time. Wall-clock times alone can order versions wrongly: another writer's
/// clock may lag (iceberg allows a minute) and two commits can share a millisecond.
fn version_key(t: &Table) -> (i64, i64, i64) {
    let md = t.metadata();
    (md.last_sequence_number(), metadata_version(t.metadata_location()).unwrap_or(-1), md.last_updated_ms())
}

/// The version number `NNNNN` of a metadata file `.../metadata/NNNNN-<uuid>.metadata.json`.
fn metadata_version(location: Option<&str>) -> Option<i64> {
    let name = location?.rsplit('/').next()?;
    name.split('-').next()?.parse().ok()
}

/// Wait `d` (jittered) before a retry: always real time, never the store's clock, which may be a test's
/// `ManualClock` that moves only when told to (a retry would then wait forever; the conformance
/// kit's rule for backends).
pub(crate) async fn retry_pause(d: Duration) {
    dotdo_core::SystemClock::new().sleep(dotdo_core::retry::jittered(d)).await;
}

/// Refuse a read of snapshot `s` whose history is not dotdo's to read, as the watermark reads of
/// [`load_state`](dotdo_core::ColdSink::load_state) do ([`crate::summary::dotdo_base`]): a history
/// another engine replaced, or a broken or looping parent chain, is `Corrupt`; an older snapshot
/// whose dotdo base another engine's expiry removed is `NotFound` ([`history_error`]). Reads of
/// records alone (lookups, scans, change reads) answered from such a history without a word.
pub(crate) fn check_history(md: &iceberg::spec::TableMetadata, s: &iceberg::spec::SnapshotRef) -> Result<()> {
    crate::summary::dotdo_base(md, s).map(|_| ()).map_err(|e| history_error(md, s, e))
}

/// The error of a read of snapshot `s` whose watermarks could not be read (`e`): an older
/// snapshot another engine wrote over a dotdo snapshot its expiry removed (the table's
/// last-commit property names a later one) has an expired history, as any expired snapshot,
/// not damage: `NotFound`. Damaged watermarks (a checkpoint, the property itself) stay `Corrupt`.
fn history_error(md: &iceberg::spec::TableMetadata, s: &iceberg::spec::SnapshotRef, e: Error) -> Error {
    if e.kind() == &ErrorKind::Corrupt
        && md.current_snapshot_id() != Some(s.snapshot_id())
        && crate::summary::history_expired_below(md, s)
    {
        return Error::new(
            ErrorKind::NotFound,
            format!(
                "snapshot {}: the dotdo snapshot below it was expired, so its watermarks are unknown (its \
                 history is expired); read a later snapshot",
                s.snapshot_id()
            ),
        )
        .with_source(e);
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A latest-state read whose snapshot expired while it was read is read once more; if that
    /// read's snapshot expired too, the answer is a retryable `Unavailable` (it was a `NotFound`
    /// that said the read could never be answered). A given snapshot keeps its `NotFound`.
    #[tokio::test]
    async fn a_latest_read_expired_twice_is_retryable() {
        let expired = || {
            Error::new(ErrorKind::NotFound, "snapshot 7 expired while it was read")
                .with_source(ExpiredWhileRead(Error::corrupt("s3://b/t/metadata/snap-7.avro: not found")))
        };
        let reads = std::sync::atomic::AtomicU32::new(0);
        let read = || {
            let n = reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err::<u32, _>(expired())
                } else {
                    Ok(n)
                }
            }
        };
        let e = latest_once_more(AsOf::Latest, read).await.expect_err("expired twice");
        assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
        assert!(e.is_retryable() && expired_while_read(&e), "{e}");
        assert_eq!(latest_once_more(AsOf::Latest, read).await.expect("the third read"), 2);
        reads.store(1, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(latest_once_more(AsOf::Latest, read).await.expect("read once more"), 2);
        reads.store(0, std::sync::atomic::Ordering::SeqCst);
        let e = latest_once_more(AsOf::Snapshot(7), read).await.expect_err("a given snapshot");
        assert_eq!(e.kind(), &ErrorKind::NotFound, "{e}");
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1, "read once");
    }

    #[test]
    fn metadata_versions_are_read_from_the_file_name() {
        assert_eq!(metadata_version(Some("file:///w/t/metadata/00012-3f2a.metadata.json")), Some(12));
        assert_eq!(metadata_version(Some("s3://b/t/metadata/v3.metadata.json")), None);
        assert_eq!(metadata_version(None), None);
    }

    #[test]
    fn write_chunks_cover_every_row_in_order_within_the_budget() {
        let o = ObjectId::new("obj").expect("id");
        let rec = |key: &str| ChangeRecord {
            object: o.clone(),
            seq: 1,
            key: key.to_string(),
            op: dotdo_core::Op::Put,
            value: bytes::Bytes::new(),
            token: dotdo_core::FencingToken::new(1),
            timestamp: Timestamp::from_micros(0),
            type_name: "T".into(),
        };
        // Each row: 3 (id) + 1 (type) + key + 8.
        let records: Vec<ChangeRecord> = ["a", "bb", "c", "dddddddddddddddddddddddddddddd", "e"].map(rec).into();
        let rows: Vec<&ChangeRecord> = records.iter().collect();
        assert_eq!(write_chunks(&rows, usize::MAX), std::iter::once(0..5).collect::<Vec<_>>());
        assert_eq!(write_chunks(&rows, 27), [0..2, 2..3, 3..4, 4..5], "a row over the budget goes alone");
        assert_eq!(write_chunks(&rows, 40), [0..3, 3..4, 4..5]);
        assert!(write_chunks(&[], 10).is_empty());
        // Values count: four rows of 100-byte values in chunks of about 250 bytes.
        let big: Vec<ChangeRecord> = (0..4)
            .map(|i| ChangeRecord { value: bytes::Bytes::from(vec![b'v'; 100]), ..rec(&format!("k{i}")) })
            .collect();
        let rows: Vec<&ChangeRecord> = big.iter().collect();
        assert_eq!(write_chunks(&rows, 250), [0..2, 2..4]);
        assert_eq!(super::write_chunk_bytes(256 << 20), 32 << 20);
        assert_eq!(super::write_chunk_bytes(1), 1 << 20);
        assert_eq!(super::write_chunk_bytes(u64::MAX), super::WRITE_CHUNK_BYTES);
    }
}
