//! Compaction (bin-packing small files, a `replace` snapshot) and collapsing superseded
//! versions (an explicit `overwrite`).
//!
//! A streaming writer makes one small file per partition per commit; readers pay per file.
//! [`IcebergColdStore::compact`] rewrites the small files of each `bucket(do_id)` partition into
//! files near a target size, rows sorted by `do_id, key, seq` (the table's sort order, which the
//! accelerator's min/max and bloom pruning rely on), and commits one snapshot with operation
//! `replace` that deletes the old files and adds the new ones atomically. Row content and count
//! are unchanged. [`IcebergColdStore::collapse`] additionally drops versions of a key that were
//! superseded at or before a horizon; it changes what [`read_changes`](dotdo_core::ColdSink::read_changes)
//! returns for those keys and is therefore a separate, explicit operation (operation
//! `overwrite`). Neither changes any object's latest state.
//!
//! ## Concurrency
//!
//! Both build their commit on the snapshot they read. If another writer (an append) commits
//! first, the catalog's compare-and-swap fails, dotdo reloads the table, checks that every file
//! it replaces is still live, and rebuilds only the manifests on the new head (the rewritten data
//! files stay valid), so a concurrent append is never lost or duplicated. If a replaced file is
//! gone (another compaction or an overwrite won), the operation fails with `Conflict` and its
//! new files are deleted. The snapshot carries the parent's watermarks, so exactly-once appends
//! continue across it. Old files stay referenced by older snapshots until those are expired
//! ([`expire_snapshots`](IcebergColdStore::expire_snapshots), then
//! [`remove_unreferenced_files`](IcebergColdStore::remove_unreferenced_files)).
//!
//! These commits need the SQL catalog (the default for `file://` warehouses): see
//! `commit.rs` in the sources for why iceberg-rust 0.10.1 cannot send them through others.
//!
//! ## Example
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> dotdo_core::Result<()> {
//! use dotdo_core::{AsOf, ColdBatch, ColdSink, FencingToken, ObjectId};
//! use dotdo_iceberg::{CompactOptions, IcebergColdStore};
//!
//! let dir = tempfile::tempdir().expect("tempdir");
//! let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8 path"))
//!     .table(["app"], "changes")
//!     .build()
//!     .await?;
//! let obj = ObjectId::new("counter:1")?;
//! for seq in 1..=5 {
//!     let rec = dotdo_core::ChangeRecord {
//!         object: obj.clone(),
//!         seq,
//!         key: "n".into(),
//!         op: dotdo_core::Op::Put,
//!         value: seq.to_string().into(),
//!         token: FencingToken::new(1),
//!         timestamp: dotdo_core::Timestamp::from_millis(seq as i64),
//!         type_name: "Counter".into(),
//!     };
//!     // One small file per commit.
//!     cold.append(ColdBatch::single(obj.clone(), FencingToken::new(1), vec![rec])).await?;
//! }
//! let report = cold.compact(CompactOptions::default()).await?;
//! assert_eq!((report.files_removed, report.files_added), (5, 1));
//! assert_eq!(cold.read_changes(&obj, 0, AsOf::Latest).await?.len(), 5);
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use iceberg::spec::{DataFile, Operation};
use iceberg::table::Table;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use dotdo_core::{ChangeRecord, ColdBatch, Error, ErrorKind, ObjectChanges, Op, Result, SnapshotId, Timestamp};

use dotdo_core::retry::{retry_idempotent, RetryPolicy};

use crate::error::{classify, classify_object_store};
use crate::store::IcebergColdStore;
use crate::{commit, schema, summary};

/// Ends the message of a rewrite refused because its plan went stale (its files replaced by
/// another compaction, the table replaced, its partition spec changed): not retryable within
/// the rewrite, retryable to its caller ([`replan`]).
pub(crate) const REPLAN: &str = "; running it again plans from the files live then";

/// Whether `e` is a rewrite's refusal of a stale plan (see [`REPLAN`]).
fn replan(e: &Error) -> bool {
    e.kind() == &ErrorKind::Conflict && !e.is_retryable() && e.message().ends_with(REPLAN)
}

/// A callback receiving progress events of a maintenance run.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// A progress event of [`IcebergColdStore::compact`] or [`IcebergColdStore::collapse`] (also
/// emitted as `tracing` events at INFO level).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Progress {
    /// The plan: `groups` groups of `files` files (`bytes` bytes) will be rewritten.
    Planned {
        /// Groups to rewrite.
        groups: usize,
        /// Input files.
        files: usize,
        /// Input bytes.
        bytes: u64,
    },
    /// Group `done` of `of` was rewritten.
    GroupWritten {
        /// Groups rewritten so far.
        done: usize,
        /// Groups in the plan.
        of: usize,
        /// The group's partition (`bucket(do_id)` value).
        partition: i32,
        /// Files read.
        files_in: usize,
        /// Files written.
        files_out: usize,
        /// Bytes read.
        bytes_in: u64,
        /// Bytes written.
        bytes_out: u64,
    },
    /// A commit attempt conflicted with another writer; the manifests are rebuilt on the new head.
    Retrying {
        /// The attempt that failed (1-based).
        attempt: u32,
    },
    /// The snapshot was committed.
    Committed {
        /// The new snapshot.
        snapshot: SnapshotId,
    },
}

/// Options of [`IcebergColdStore::compact`].
#[derive(Clone)]
pub struct CompactOptions {
    /// Target size of the files written (default 128 MiB).
    pub target_file_size: u64,
    /// Files smaller than this are compacted (default: three quarters of `target_file_size`).
    pub small_file_size: Option<u64>,
    /// A partition is rewritten only if at least this many of its files are small (default 2;
    /// at least 2).
    pub min_input_files: usize,
    /// Compact only these `bucket(do_id)` partitions (default: all).
    pub partitions: Option<BTreeSet<i32>>,
    /// Progress callback (default none).
    pub progress: Option<ProgressFn>,
}

impl Default for CompactOptions {
    fn default() -> Self {
        CompactOptions {
            target_file_size: 128 << 20,
            small_file_size: None,
            min_input_files: 2,
            partitions: None,
            progress: None,
        }
    }
}

impl fmt::Debug for CompactOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompactOptions")
            .field("target_file_size", &self.target_file_size)
            .field("small_file_size", &self.small_file_size)
            .field("min_input_files", &self.min_input_files)
            .field("partitions", &self.partitions)
            .field("progress", &self.progress.as_ref().map(|_| "<callback>"))
            .finish()
    }
}

/// Options of [`IcebergColdStore::collapse`].
#[derive(Clone)]
pub struct CollapseOptions {
    /// Versions superseded at or before this time (the newer version's record timestamp) are
    /// dropped; so is a delete at or before it together with every older version of its key.
    /// Only a prefix of a key's history goes: everything before its newest version stamped at
    /// or before the horizon (where clocks went backwards, that can take a version superseded
    /// after the horizon).
    pub horizon: Timestamp,
    /// Target size of the files written (default 128 MiB).
    pub target_file_size: u64,
    /// Collapse only these `bucket(do_id)` partitions (default: all).
    pub partitions: Option<BTreeSet<i32>>,
    /// Progress callback (default none).
    pub progress: Option<ProgressFn>,
}

impl CollapseOptions {
    /// Collapse everything superseded at or before `horizon`, other options at their defaults.
    pub fn new(horizon: Timestamp) -> Self {
        CollapseOptions { horizon, target_file_size: 128 << 20, partitions: None, progress: None }
    }
}

impl fmt::Debug for CollapseOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CollapseOptions")
            .field("horizon", &self.horizon)
            .field("target_file_size", &self.target_file_size)
            .field("partitions", &self.partitions)
            .field("progress", &self.progress.as_ref().map(|_| "<callback>"))
            .finish()
    }
}

/// What a [`compact`](IcebergColdStore::compact) or [`collapse`](IcebergColdStore::collapse) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RewriteReport {
    /// The snapshot committed (`None`: nothing to do).
    pub snapshot: Option<SnapshotId>,
    /// Groups (partition bins) rewritten.
    pub groups: usize,
    /// Data files removed from the table.
    pub files_removed: u64,
    /// Data files added.
    pub files_added: u64,
    /// Bytes of the files removed.
    pub bytes_read: u64,
    /// Bytes of the files added.
    pub bytes_written: u64,
    /// Records read.
    pub records_read: u64,
    /// Records written (equal to `records_read` for a compaction).
    pub records_written: u64,
    /// Commit attempts (more than 1 when concurrent commits forced a rebuild).
    pub attempts: u32,
    /// Time taken, on the store's clock.
    pub elapsed: Duration,
}

/// One live data file of the current snapshot.
#[derive(Clone, Debug)]
pub(crate) struct LiveFile {
    pub(crate) path: String,
    pub(crate) size: u64,
    partition: Option<i32>,
    /// The partition spec `partition` is a bucket of (`None` with it).
    pub(crate) spec: Option<i32>,
}

enum Mode {
    Compact,
    Collapse(Timestamp),
    /// Compaction of a user table ([`ArrowTable`](crate::ArrowTable)): rows read through
    /// iceberg's reader (old files projected to this schema; rows of one file stay in order,
    /// files may interleave) and written with it.
    User(arrow_schema::SchemaRef),
}

impl IcebergColdStore {
    /// Bin-pack the small files of each partition into files near
    /// [`CompactOptions::target_file_size`], sorted by `do_id, key, seq`, and commit them as one
    /// `replace` snapshot (see the [module docs](crate::compact)). Content is unchanged.
    /// Nothing to do gives a report with `snapshot: None`.
    pub async fn compact(&self, options: CompactOptions) -> Result<RewriteReport> {
        if options.target_file_size == 0 {
            return Err(Error::invalid("compact: target_file_size must be positive"));
        }
        let (table, live) = self.current_files(&self.inner.ident.clone()).await?;
        let groups = plan_bins(live, &options);
        self.rewrite(table, groups, Mode::Compact, options.target_file_size, options.progress).await
    }

    /// Compact the user table `table` (see [`ArrowTable::compact`](crate::ArrowTable::compact)).
    pub(crate) async fn compact_user_table(&self, table: Table, options: CompactOptions) -> Result<RewriteReport> {
        if options.target_file_size == 0 {
            return Err(Error::invalid("compact: target_file_size must be positive"));
        }
        let (table, live) = self.current_files(table.identifier()).await?;
        // The schema of the table as loaded here, not as any handle opened it: another handle
        // may have added or widened a column since (the scan reads through the current schema).
        let what = format!("compacting {}", table.identifier());
        let schema = Arc::new(
            iceberg::arrow::schema_to_arrow_schema(table.metadata().current_schema())
                .map_err(|e| classify(e, &what))?,
        );
        let groups = plan_bins(live, &options);
        self.rewrite(table, groups, Mode::User(schema), options.target_file_size, options.progress).await
    }

    /// Drop versions of keys superseded at or before [`CollapseOptions::horizon`] (and deletes
    /// at or before it with everything older), rewriting every file of the chosen partitions,
    /// and commit an `overwrite` snapshot. Every object's latest state is unchanged;
    /// `read_changes` no longer returns the dropped versions. One partition's rows are held in
    /// memory at a time.
    pub async fn collapse(&self, options: CollapseOptions) -> Result<RewriteReport> {
        if options.target_file_size == 0 {
            return Err(Error::invalid("collapse: target_file_size must be positive"));
        }
        let (table, live) = self.current_files(&self.inner.ident.clone()).await?;
        let specs: std::collections::BTreeSet<Option<i32>> = live.iter().map(|f| f.spec).collect();
        if specs.len() > 1 {
            // Files of an older partition spec (evolved by another engine) hold the same objects
            // as the current spec's buckets: collapsing the groups apart could keep a put in one
            // and drop the delete that supersedes it in the other. (Also when the files of both
            // specs have bucket numbers, as for a store whose bucketer follows the table's
            // current spec: grouped by number alone, bucket 3 of one spec went with bucket 3 of
            // the other, which holds other objects.)
            return Err(Error::invalid(format!(
                "collapse of {}: live files were written under more than one partition spec; \
                 rewrite them under the current spec first",
                table.identifier()
            )));
        }
        // A partition with files in another format (another engine's ORC or Avro, which dotdo
        // cannot decode) may hold puts that a delete dropped here supersedes: every other
        // engine's fold of the table would show the key again.
        let foreign = self.foreign_format_files(&table).await?;
        // (One of an unknown partition, written under another spec, may hold any object's rows.)
        if let Some(f) = foreign.iter().find(|(_, p)| p.is_none() || selected(&options.partitions, *p)) {
            return Err(Error::invalid(format!(
                "collapse of {}: the partition of {} also holds data files dotdo cannot read (not Parquet); \
                 a delete dropped by the collapse could let their older versions show again",
                table.identifier(),
                f.0
            )));
        }
        let mut by_partition: BTreeMap<Option<i32>, Vec<LiveFile>> = BTreeMap::new();
        for f in live {
            if selected(&options.partitions, f.partition) {
                by_partition.entry(f.partition).or_default().push(f);
            }
        }
        let groups = by_partition.into_values().collect();
        self.rewrite(table, groups, Mode::Collapse(options.horizon), options.target_file_size, options.progress).await
    }

    /// The live data files of `table` in a format other than Parquet, with their partitions.
    async fn foreign_format_files(&self, table: &Table) -> Result<Vec<(String, Option<i32>)>> {
        let Some(head) = table.metadata().current_snapshot() else { return Ok(Vec::new()) };
        let (files, _) = self.files_of(table, head, None).await?;
        Ok(files.iter().filter(|f| !f.is_parquet()).map(|f| (f.path.clone(), f.partition.map(|(_, b)| b))).collect())
    }

    /// Reload table `ident` (this store's own table or another one in its catalog).
    async fn reload(&self, ident: &iceberg::TableIdent) -> Result<Table> {
        if ident == &self.inner.ident {
            return self.refresh().await;
        }
        match crate::error::load_table(&*self.inner.catalog, ident).await {
            Ok(t) => Ok(t),
            Err(e) => {
                let what = format!("loading table {ident}");
                Err(crate::store::load_failure(self.inner.verifier.as_ref(), ident, e, &what).await)
            }
        }
    }

    /// Table `ident` as the catalog has it now and its live data files, retrying transient
    /// store errors (planning reads every manifest).
    async fn current_files(&self, ident: &iceberg::TableIdent) -> Result<(Table, Vec<LiveFile>)> {
        retry_idempotent(&dotdo_core::SystemClock::new(), self.transient_retries(), || async {
            let t = self.reload(ident).await?;
            let live = self.live_files(&t).await?;
            Ok((t, live))
        })
        .await
        .map_err(|e| e.context(format!("planning the maintenance of {ident}")))
    }

    /// How planning and group rewrites retry transient store errors (backing off in real time,
    /// like every retry of the store).
    fn transient_retries(&self) -> RetryPolicy {
        let s = &self.inner.settings;
        RetryPolicy { retries: s.max_commit_attempts.max(1) - 1, base: s.retry_base_delay }
    }

    /// The file scan tasks `scan` (a scan of `table`'s current snapshot) plans, checked against
    /// the live data files dotdo's own (panic-guarded) manifest reads list: iceberg plans on tasks
    /// of its own, and one that panics decoding a damaged manifest (apache-avro 0.21 unwraps a
    /// damaged schema name) ends the plan short, without an error; a read of it answered part of
    /// the table as the whole.
    pub(crate) async fn planned_tasks(
        &self,
        table: &Table,
        scan: &iceberg::scan::TableScan,
        what: &str,
    ) -> Result<Vec<iceberg::scan::FileScanTask>> {
        use futures::TryStreamExt;
        // Planning reads the manifest list (on this task: a decoder panic is caught here) and
        // the manifests: a file iceberg cannot decode is damage (`Corrupt`), as in dotdo's own
        // reads of them.
        // (The callers plan only tables with a snapshot: `read_all` answers an empty table itself,
        // and compaction has no files to rewrite there.)
        let Some(head) = table.metadata().current_snapshot() else { return Ok(Vec::new()) };
        let read = crate::error::head_metadata_files(table);
        // A damaged manifest list's error names no file (iceberg's decoder does not): the head's
        // metadata files are named then.
        let metadata_read = |e| {
            let err = crate::error::classify_metadata_read(e, what);
            if err.kind() == &dotdo_core::ErrorKind::Corrupt && !err.to_string().contains(".avro") {
                err.context(read.clone())
            } else {
                err
            }
        };
        let plan = async { scan.plan_files().await.map_err(metadata_read)?.try_collect().await.map_err(metadata_read) };
        let tasks: Vec<iceberg::scan::FileScanTask> = crate::error::panic_is_corrupt(&read, plan).await?;
        // Data files only: a user table's delete files (another engine's) are iceberg's reader's
        // to apply, and compared with nothing here.
        let (live, _) = self.data_files_of(table, head, None).await?;
        let planned: HashSet<&str> = tasks.iter().map(|t| t.data_file_path.as_str()).collect();
        if let Some(missing) = live.iter().find(|f| !planned.contains(f.path.as_str())) {
            return Err(Error::corrupt(format!(
                "{what}: iceberg's scan planned {} of the {} live data files of snapshot {} (not {}): a manifest \
                 it could not decode",
                planned.len(),
                live.iter().map(|f| f.path.as_str()).collect::<HashSet<_>>().len(),
                head.snapshot_id(),
                missing.path
            )));
        }
        Ok(tasks)
    }

    /// The live data files of `table`'s current snapshot (through the accelerator's cached
    /// manifest reads).
    pub(crate) async fn live_files(&self, table: &Table) -> Result<Vec<LiveFile>> {
        let Some(head) = table.metadata().current_snapshot() else { return Ok(Vec::new()) };
        if self.manifests_of(table, head).await?.iter().any(crate::read::lists_live_deletes) {
            return Err(Error::invalid(format!(
                "{}: tables with delete files are not supported by dotdo's maintenance",
                table.identifier()
            )));
        }
        let (files, _) = self.files_of(table, head, None).await?;
        // Files in formats dotdo cannot decode (another engine's ORC or Avro) are left as they are.
        // (A file another engine added twice is one input: `files_of` lists it once.)
        Ok(files
            .iter()
            .filter(|f| f.is_parquet())
            .map(|f| LiveFile {
                path: f.path.clone(),
                size: f.size,
                partition: f.partition.map(|(_, b)| b),
                spec: f.partition.map(|(s, _)| s),
            })
            .collect())
    }

    async fn rewrite(
        &self,
        base: Table,
        groups: Vec<Vec<LiveFile>>,
        mode: Mode,
        target: u64,
        progress: Option<ProgressFn>,
    ) -> Result<RewriteReport> {
        let started = self.inner.clock.now();
        let (op_name, operation) = match mode {
            Mode::Compact | Mode::User(_) => ("compact", Operation::Replace),
            Mode::Collapse(_) => ("collapse", Operation::Overwrite),
        };
        let ident = base.identifier().clone();
        let what = format!("{op_name} of {ident}");
        let emit = |p: Progress| {
            tracing::info!(table = %ident, operation = op_name, event = ?p, "maintenance progress");
            if let Some(cb) = &progress {
                cb(&p);
            }
        };
        let mut report = RewriteReport::default();
        // Fail before rewriting anything: the catalog, the table's format (only version 2
        // tables are rewritten) and, for a user table, its partitioning. (A v1 or partitioned
        // user table had every group read and written, then the commit refused.)
        self.sql_catalog(&what)?;
        let version = base.metadata().format_version();
        if version != iceberg::spec::FormatVersion::V2 {
            return Err(Error::invalid(format!(
                "{what}: only format version 2 tables are rewritten (the table is {version:?}); nothing written"
            )));
        }
        if matches!(mode, Mode::User(_)) {
            crate::user_table::check_unpartitioned(&base, &what)?;
        } else {
            // A change table another engine changed is not rewritten (its files' columns are
            // found by field id, which a column dropped and added again no longer matches).
            schema::check_change_table(base.metadata(), &format!("{what}: table {ident}"))?;
        }
        if groups.is_empty() {
            report.elapsed = elapsed(started, self.inner.clock.now());
            return Ok(report);
        }
        emit(Progress::Planned {
            groups: groups.len(),
            files: groups.iter().map(Vec::len).sum(),
            bytes: groups.iter().flatten().fold(0u64, |a, f| a.saturating_add(f.size)),
        });
        let target = usize::try_from(target).unwrap_or(usize::MAX);
        let mut removed: HashSet<String> = HashSet::new();
        let mut added: Vec<DataFile> = Vec::new();
        let n = groups.len();
        // A cleanup (`remove_unreferenced_files`) judges the table's files meanwhile: the
        // rewrite must commit files younger than half of the cleanup minimum (see
        // `added_files_present`), and one that cannot stops early.
        let max_age = self.max_uncommitted_age_on(base.metadata());
        let mut first_written: Option<dotdo_core::Timestamp> = None;
        for (i, group) in groups.into_iter().enumerate() {
            if let (Some(t), Some(max_age)) = (first_written, max_age) {
                let age = self.inner.clock.now().since(t);
                if age > max_age {
                    self.delete_files(added.iter().map(|f| f.file_path().to_string()).collect()).await;
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "{what}: its first files were written {age:?} ago, more than half of \
                             min_cleanup_retention ({max_age:?}), with {} of {n} groups to go: a cleanup could \
                             delete them after the commit; nothing committed (compact fewer partitions per run, \
                             or raise min_cleanup_retention)",
                            n - i
                        ),
                    )
                    .with_retryable(false));
                }
            }
            // Transient store errors while reading or writing one group are retried. (A failed
            // writer deletes the files other writer tasks finished; files its own rolling writer
            // closed before the failure are not handed back by iceberg's writer and stay until
            // `remove_unreferenced_files` takes them: nothing references them.)
            let (b, g, m) = (&base, &group, &mode);
            let result = retry_idempotent(&dotdo_core::SystemClock::new(), self.transient_retries(), || async move {
                match m {
                    Mode::User(schema) => self.rewrite_user_group(b, g, schema, target).await,
                    _ => self.rewrite_group(b, g, m, target).await,
                }
            })
            .await;
            let (files, read) = match result {
                Ok(r) => r,
                Err(e) => {
                    self.delete_files(added.iter().map(|f| f.file_path().to_string()).collect()).await;
                    if e.kind() == &ErrorKind::Corrupt {
                        if let Some(gone) = self.replaced_meanwhile(&ident, &group).await {
                            return Err(Error::new(
                                ErrorKind::Conflict,
                                format!("{what}: input file {gone} left the table while it was read; plan again"),
                            )
                            .with_source(e));
                        }
                    }
                    return Err(e.context(&what));
                }
            };
            // Sizes come from manifests: saturate rather than overflow on damaged ones.
            let bytes_in: u64 = group.iter().fold(0u64, |a, f| a.saturating_add(f.size));
            let bytes_out: u64 = files.iter().map(|f| f.file_size_in_bytes()).sum();
            report.records_read += read;
            report.records_written += files.iter().map(|f| f.record_count()).sum::<u64>();
            emit(Progress::GroupWritten {
                done: i + 1,
                of: n,
                partition: group.first().and_then(|f| f.partition).unwrap_or(-1),
                files_in: group.len(),
                files_out: files.len(),
                bytes_in,
                bytes_out,
            });
            removed.extend(group.into_iter().map(|f| f.path));
            added.extend(files);
            first_written.get_or_insert_with(|| self.inner.clock.now());
        }
        report.groups = n;
        if !matches!(mode, Mode::Collapse(_)) && report.records_read != report.records_written {
            self.delete_files(added.iter().map(|f| f.file_path().to_string()).collect()).await;
            return Err(Error::backend(format!(
                "{what}: read {} records but wrote {}; nothing committed",
                report.records_read, report.records_written
            )));
        }
        let commit_id = uuid::Uuid::new_v4().to_string();
        let extra = vec![
            (summary::COMMIT_ID.to_string(), commit_id.clone()),
            (summary::MAINTENANCE.to_string(), op_name.to_string()),
        ];
        let written_under = base.metadata().default_partition_spec_id();
        let base_uuid = base.metadata().uuid();
        let mut table = base;
        let attempts = self.inner.settings.max_commit_attempts.max(1);
        let mut last_err = None;
        // Once an attempt's outcome was unknown, the data files may be referenced by a committed
        // snapshot: they are deleted only after the table shows that no attempt landed.
        let mut maybe_landed = false;
        // Whether a refusal for good was judged once more on the catalog's current table.
        let mut judged = false;
        let landed = |s: i64, mut report: RewriteReport| {
            report.snapshot = Some(s);
            report.files_added = added.len() as u64;
            report.bytes_written = added.iter().fold(0u64, |a, f| a.saturating_add(f.file_size_in_bytes()));
            report.elapsed = elapsed(started, self.inner.clock.now());
            emit(Progress::Committed { snapshot: s });
            report
        };
        // (Raised once for a rebuild on a stale table, which is no attempt of its own.)
        let mut limit = attempts;
        let mut attempt = 0;
        while attempt < limit {
            attempt += 1;
            report.attempts = attempt;
            let sid = commit::new_snapshot_id(&table);
            let seq = match commit::next_sequence_number(table.metadata()) {
                Ok(seq) => seq,
                // (Not `?`: the new files are deleted below.)
                Err(e) => {
                    last_err = Some(e);
                    break;
                }
            };
            // The new files carry partition values of the spec they were written under: never
            // file them under another (an engine evolved the spec meanwhile).
            let spec_now = table.metadata().default_partition_spec_id();
            let rewritten = if spec_now == written_under {
                async {
                    self.added_files_present(&added, table.metadata(), &what).await?;
                    self.rewrite_manifests(&table, sid, seq, &removed, &added).await
                }
                .await
            } else {
                Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "{what}: the partition spec changed from {written_under} to {spec_now} during the rewrite{REPLAN}"
                    ),
                )
                .with_retryable(false))
            };
            let outcome = match rewritten {
                Ok(rw) => {
                    report.files_removed = rw.removed_files;
                    report.bytes_read = rw.removed_bytes;
                    self.commit_snapshot(&table, sid, operation.clone(), rw, &added, extra.clone(), &what).await
                }
                Err(e) => Err(e),
            };
            match outcome {
                // Landed as snapshot `sid` (the handle returned may be the table before it, if
                // the committed one could be neither built nor reloaded).
                Ok(_) => return Ok(landed(sid, report)),
                Err(e) if e.kind() == &ErrorKind::AmbiguousOutcome || e.is_retryable() => {
                    maybe_landed |= e.kind() == &ErrorKind::AmbiguousOutcome;
                    emit(Progress::Retrying { attempt });
                    crate::store::retry_pause(self.inner.settings.retry_base_delay.saturating_mul(attempt.min(20)))
                        .await;
                    match self.reload(&ident).await {
                        Ok(t) if t.metadata().uuid() != base_uuid => {
                            // Dropped and created again under the same name: the planned files
                            // belong to a table that is gone (the new one lists none of them).
                            last_err = Some(
                                Error::new(
                                    ErrorKind::Conflict,
                                    format!(
                                        "{what}: the table was replaced (dropped and created again) meanwhile{REPLAN}"
                                    ),
                                )
                                .with_retryable(false),
                            );
                            break;
                        }
                        Ok(t) => {
                            if let Some(s) = IcebergColdStore::find_commit(&t, &commit_id, None) {
                                return Ok(landed(s.snapshot_id(), report));
                            }
                            table = t;
                        }
                        Err(re) if re.is_retryable() => {}
                        Err(re) => {
                            last_err = Some(re);
                            break;
                        }
                    }
                    last_err = Some(e);
                }
                // Prepared on the table as planned, which may be stale: its manifests may be gone
                // to another store's expiry and cleanup (`Corrupt`: missing). Judged once on the
                // catalog's current table: if that moved on, the rewrite is built again on it
                // (every replaced file must still be live there), as an append does.
                Err(e) if !judged && e.kind() == &ErrorKind::Corrupt => {
                    judged = true;
                    match self.reload(&ident).await {
                        Ok(t)
                            if t.metadata_location() != table.metadata_location()
                                && t.metadata().uuid() == base_uuid =>
                        {
                            tracing::debug!(error = %e, "{what}: prepared on a stale table; building again on the current one");
                            table = t;
                            last_err = Some(e);
                            // Not counted: with no attempt left, the stale table's `Corrupt`
                            // was the answer for a healthy table.
                            limit = limit.saturating_add(1);
                        }
                        _ => {
                            last_err = Some(e);
                            break;
                        }
                    }
                }
                Err(e) => {
                    last_err = Some(e);
                    break;
                }
            }
        }
        let err = last_err.unwrap_or_else(|| Error::unavailable(format!("{what}: no attempt left")));
        if maybe_landed {
            // Look for the commit in the ancestry of the head. Not found there does not prove
            // that no attempt landed: a concurrent writer can append on top of it and expire it
            // meanwhile, with its files live in the head. So after an unknown outcome the files
            // are never deleted here; cleanup removes them once no snapshot references them.
            let mut resolved = None;
            for i in 0..4u32 {
                match self.reload(&ident).await {
                    Ok(t) => {
                        resolved = Some(t);
                        break;
                    }
                    Err(_) => {
                        crate::store::retry_pause(self.inner.settings.retry_base_delay.saturating_mul(i + 1)).await
                    }
                }
            }
            let Some(t) = resolved else {
                return Err(Error::new(
                    ErrorKind::AmbiguousOutcome,
                    format!("{what}: an attempt's outcome is unknown and the table cannot be read: {err}"),
                ));
            };
            if let Some(s) = IcebergColdStore::find_commit(&t, &commit_id, None) {
                return Ok(landed(s.snapshot_id(), report));
            }
            // Not found: the attempt may still have landed (a concurrent writer on top of it and
            // an expiry of it): the outcome is unknown, whatever the last attempt's error says
            // (it was reported, a non-retryable `Conflict` among them, as the compaction's
            // failure, when the compaction may have been committed).
            return Err(Error::new(
                ErrorKind::AmbiguousOutcome,
                format!(
                    "{what}: an attempt's outcome was unknown and the table's history does not show it (a later \
                     snapshot and an expiry may hide it); its {} new files are left to cleanup; the last attempt: \
                     {err}",
                    added.len()
                ),
            )
            .with_source(err));
        }
        self.delete_files(added.iter().map(|f| f.file_path().to_string()).collect()).await;
        // Not retryable within this rewrite (its plan is stale), but a run again plans from the
        // files live then: retryable to the caller. (Refused as "no retry can succeed", while
        // calling it again did, as two nodes running maintenance at once meet.)
        Err(if replan(&err) { err.with_retryable(true) } else { err })
    }

    /// A file of `group` the current table no longer lists (another engine's compaction replaced
    /// it, and an expiry and cleanup may have deleted it, while this rewrite read it): read as
    /// missing or damaged, it is a conflict, not damage. `None` if every file is still live, or
    /// the table cannot be read now.
    async fn replaced_meanwhile(&self, ident: &iceberg::TableIdent, group: &[LiveFile]) -> Option<String> {
        let table = self.reload(ident).await.ok()?;
        let live = self.live_files(&table).await.ok()?;
        let paths: HashSet<&str> = live.iter().map(|f| f.path.as_str()).collect();
        group.iter().find(|f| !paths.contains(f.path.as_str())).map(|f| f.path.clone())
    }

    /// Whether every file this rewrite wrote is still in the store. A cleanup of unreferenced
    /// files whose retention is shorter than the rewrite has taken so far finds them
    /// unreferenced and may delete them; a snapshot naming them would be unreadable, and once
    /// the replaced files were cleaned up too, their rows lost. `Conflict` if one is gone.
    async fn added_files_present(
        &self,
        added: &[DataFile],
        md: &iceberg::spec::TableMetadata,
        what: &str,
    ) -> Result<()> {
        use futures::{StreamExt, TryStreamExt};
        // A cleanup deletes unreferenced files older than its retention (by its clock against
        // the store's last-modified time), at least `min_cleanup_retention`, and one that runs
        // while this commit lands may already have judged these files unreferenced: safe only
        // while they are younger than that by a wide margin. (Zero: no writer runs alongside a
        // cleanup, by the setting's contract.)
        let max_age = self.max_uncommitted_age_on(md);
        let now = self.inner.clock.now();
        let heads = added.iter().map(|f| async move {
            let key = self.inner.root.key(f.file_path())?;
            match self.inner.root.store.head(&key).await {
                Ok(meta) => {
                    let written = dotdo_core::Timestamp::from_micros(meta.last_modified.timestamp_micros());
                    let age = now.since(written);
                    let Some(max_age) = max_age.filter(|max| age > *max) else { return Ok(()) };
                    Err(Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "{what}: {} was written {age:?} ago, more than half of min_cleanup_retention \
                             ({max_age:?}): a cleanup running now could delete it after the commit; nothing \
                             committed (compact fewer partitions per run, or raise min_cleanup_retention)",
                            f.file_path()
                        ),
                    )
                    .with_retryable(false))
                }
                Err(object_store::Error::NotFound { .. }) => Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "{what}: {} written by this rewrite was deleted before the commit (a cleanup of \
                         unreferenced files with a retention shorter than the rewrite?); nothing committed",
                        f.file_path()
                    ),
                )
                .with_retryable(false)),
                Err(e) => {
                    Err(crate::error::classify_object_store(e).context(format!("{what}: checking {}", f.file_path())))
                }
            }
        });
        futures::stream::iter(heads).buffer_unordered(8).try_collect::<Vec<()>>().await.map(|_| ())
    }

    /// Read one group's files, sort (and for a collapse, filter) the rows, write new files.
    /// Returns the files and the number of records read.
    async fn rewrite_group(
        &self,
        table: &Table,
        group: &[LiveFile],
        mode: &Mode,
        target: usize,
    ) -> Result<(Vec<DataFile>, u64)> {
        use futures::{StreamExt, TryStreamExt};
        // Data files' columns are found by their field ids in the current schema.
        let ids = schema::ColumnIds::of(table.metadata().current_schema());
        // Fetch and decode a few files at a time (small files are latency-bound).
        let parts: Vec<Vec<ChangeRecord>> = futures::stream::iter(group)
            .map(|f| async move {
                let key = self.inner.root.table_file_key(&f.path, "data file")?;
                let bytes = match self.inner.root.store.get(&key).await {
                    Ok(r) => r.bytes().await,
                    Err(e) => Err(e),
                }
                .map_err(|e| classify_object_store(e).context(format!("reading data file {}", f.path)))?;
                let path = f.path.clone();
                match tokio::task::spawn_blocking(move || decode(bytes, &path, &ids)).await {
                    Ok(decoded) => decoded,
                    // parquet 58 asserts on some damaged bytes: the file's damage, not a failure
                    // of the task.
                    Err(e) if e.is_panic() => {
                        Err(crate::error::panicked(&format!("data file {}", f.path), e.into_panic().as_ref()))
                    }
                    Err(e) => Err(Error::backend(format!("decoding {}: {e}", f.path))),
                }
            })
            .buffered(4)
            .try_collect()
            .await?;
        let mut records: Vec<ChangeRecord> = Vec::with_capacity(parts.iter().map(Vec::len).sum());
        for mut p in parts {
            records.append(&mut p);
        }
        let read = records.len() as u64;
        records.sort_by(|a, b| (&a.object, &a.key, a.seq).cmp(&(&b.object, &b.key, b.seq)));
        if let Mode::Collapse(horizon) = mode {
            // Reads refuse two different records of one object with one seq (`Corrupt`); a
            // collapse would keep one of them, in no particular order, and erase the evidence
            // (and perhaps the acknowledged one). A compaction keeps both.
            different_records_with_one_seq(&records, group)?;
            records = collapse_sorted(records, *horizon);
        }
        if records.is_empty() {
            return Ok((Vec::new(), read));
        }
        let mut objects: Vec<ObjectChanges> = Vec::new();
        for r in records {
            match objects.last_mut() {
                Some(o) if o.object == r.object => o.records.push(r),
                _ => objects.push(ObjectChanges { object: r.object.clone(), token: r.token, records: vec![r] }),
            }
        }
        let parts: Vec<(usize, usize)> = (0..objects.len()).map(|i| (i, 0)).collect();
        let batch = Arc::new(ColdBatch { objects });
        let files = self.write_files(table, &batch, &parts, target).await?;
        Ok((files, read))
    }
}

/// `tasks` read through `table`'s current schema (each of its top-level columns, by field id),
/// not the head snapshot's, which iceberg's scan plans them with: a schema change makes no
/// snapshot, so a column added, dropped, renamed or widened since the last append would be read
/// by the older schema (and a rewrite that pairs its columns with the current schema's by
/// position would write one column's values under another).
pub(crate) fn through_current_schema(table: &Table, tasks: &mut [iceberg::scan::FileScanTask]) {
    let schema = table.metadata().current_schema().clone();
    let ids: Vec<i32> = schema.as_struct().fields().iter().map(|f| f.id).collect();
    for t in tasks {
        t.schema = schema.clone();
        t.project_field_ids = ids.clone();
    }
}

/// The rows of `tasks` (planned on `table`), read through iceberg's reader (`what`: the
/// operation, for errors). iceberg decodes the Parquet files on this task, and parquet 58
/// asserts on some damaged bytes: a panic is `Corrupt` naming `files`.
pub(crate) async fn read_tasks(
    table: &Table,
    tasks: Vec<iceberg::scan::FileScanTask>,
    what: &str,
    files: &str,
) -> Result<Vec<arrow_array::RecordBatch>> {
    let e = match read_tasks_once(table, tasks.clone(), what, files).await {
        Ok(batches) => return Ok(batches),
        Err(e) => e,
    };
    // Damage found in one of several files, by an error that does not say which (iceberg's
    // "Failed to load Parquet metadata" of a damaged footer, a decoder's panic): each is read
    // alone to name it, as `Corrupt` must. Named only if others read well: an error every file
    // meets (a delete file they share, a schema they cannot be read through) is not one file's.
    if e.kind() != &ErrorKind::Corrupt || tasks.iter().any(|t| e.to_string().contains(&t.data_file_path)) {
        return Err(e);
    }
    let several = tasks.len() > 1;
    let (mut damaged, mut read_well) = (None, false);
    for t in tasks {
        if damaged.is_some() && read_well {
            break;
        }
        let path = t.data_file_path.clone();
        match read_tasks_once(table, vec![t], what, &format!("data file {path}")).await {
            Ok(_) => read_well = true,
            Err(alone) if alone.kind() == &ErrorKind::Corrupt && damaged.is_none() => damaged = Some((path, alone)),
            Err(_) => {}
        }
    }
    match damaged {
        Some((path, alone)) if read_well || !several => Err(alone.context(format!("data file {path}"))),
        _ => Err(e),
    }
}

/// [`read_tasks`], all at once.
async fn read_tasks_once(
    table: &Table,
    tasks: Vec<iceberg::scan::FileScanTask>,
    what: &str,
    files: &str,
) -> Result<Vec<arrow_array::RecordBatch>> {
    use futures::TryStreamExt;
    let read = async {
        let stream = table
            .reader_builder()
            .build()
            .read(Box::pin(futures::stream::iter(tasks.into_iter().map(Ok))))
            .map_err(|e| classify(e, what))?
            .stream();
        stream.try_collect().await.map_err(|e| classify(e, what))
    };
    crate::error::panic_is_corrupt(files, read).await
}

impl IcebergColdStore {
    /// Read one group of a user table's files through iceberg's reader (projected to the
    /// current schema) and write them, in order, as files of about `target` bytes.
    async fn rewrite_user_group(
        &self,
        table: &Table,
        group: &[LiveFile],
        schema: &arrow_schema::SchemaRef,
        target: usize,
    ) -> Result<(Vec<DataFile>, u64)> {
        let what = format!("compacting {}", table.identifier());
        let wanted: HashSet<&str> = group.iter().map(|f| f.path.as_str()).collect();
        let scan = table.scan().select_all().build().map_err(|e| classify(e, &what))?;
        let tasks = self.planned_tasks(table, &scan, &what).await?;
        let mut tasks: Vec<_> = tasks.into_iter().filter(|t| wanted.contains(t.data_file_path.as_str())).collect();
        // A file listed twice (another engine added it again) is read twice by every engine's
        // scan: compacting it once would change the table's rows. Refused, naming it (as a
        // retryable conflict, it was retried for good).
        let mut seen = HashSet::new();
        let twice: Vec<&str> = tasks.iter().map(|t| t.data_file_path.as_str()).filter(|p| !seen.insert(*p)).collect();
        if !twice.is_empty() {
            return Err(Error::invalid(format!(
                "{what}: data files listed twice in the table: {twice:?}; remove the second entry with the engine \
                 that added it"
            )));
        }
        if tasks.len() != group.len() {
            return Err(Error::new(ErrorKind::Conflict, format!("{what}: files to compact changed while planning")));
        }
        through_current_schema(table, &mut tasks);
        let files: Vec<&str> = group.iter().map(|f| f.path.as_str()).collect();
        let batches = read_tasks(table, tasks, &what, &format!("one of the data files {files:?}")).await?;
        let read: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        let batches = batches
            .into_iter()
            .map(|b| {
                arrow_array::RecordBatch::try_new(schema.clone(), b.columns().to_vec())
                    .map_err(|e| Error::backend(format!("{what}: a batch does not match the table schema: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let files = crate::user_table::write_user_files(self, table, &batches, target, false, &what).await?;
        Ok((files, read))
    }
}

/// Bin-pack the small live files of each partition (see [`CompactOptions`]).
fn plan_bins(live: Vec<LiveFile>, options: &CompactOptions) -> Vec<Vec<LiveFile>> {
    let small = options.small_file_size.unwrap_or(options.target_file_size / 4 * 3);
    let min_files = options.min_input_files.max(2);
    let mut by_partition: BTreeMap<Option<i32>, Vec<LiveFile>> = BTreeMap::new();
    for f in live {
        if f.size < small && selected(&options.partitions, f.partition) {
            by_partition.entry(f.partition).or_default().push(f);
        }
    }
    let mut groups = Vec::new();
    for (_, files) in by_partition {
        if files.len() < min_files {
            continue;
        }
        let mut bin: Vec<LiveFile> = Vec::new();
        let mut bytes = 0u64;
        for f in files {
            if !bin.is_empty() && bytes.saturating_add(f.size) > options.target_file_size {
                groups.push(std::mem::take(&mut bin));
                bytes = 0;
            }
            bytes = bytes.saturating_add(f.size);
            bin.push(f);
        }
        groups.push(bin);
    }
    groups.retain(|g| g.len() >= 2);
    groups
}

/// Decode every row of a dotdo data file.
fn decode(bytes: Bytes, path: &str, ids: &schema::ColumnIds) -> Result<Vec<ChangeRecord>> {
    let corrupt = |e: parquet::errors::ParquetError| Error::corrupt(format!("data file {path}: {e}"));
    let size = bytes.len() as u64;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(corrupt)?;
    crate::read::check_footer_ranges(builder.metadata().row_groups(), size, path)?;
    let reader = builder.with_batch_size(8192).build();
    let mut out = Vec::new();
    for b in reader.map_err(corrupt)? {
        let b = b.map_err(|e| Error::corrupt(format!("data file {path}: {e}")))?;
        schema::from_batch(&b, path, ids, |_, _| true, &mut out)?;
    }
    Ok(out)
}

/// `Corrupt` if `records` (read from the files of `group`) hold two different change records of
/// one object with one seq.
fn different_records_with_one_seq(records: &[ChangeRecord], group: &[LiveFile]) -> Result<()> {
    let mut by_seq: Vec<(&dotdo_core::ObjectId, u64, usize)> =
        records.iter().enumerate().map(|(i, r)| (&r.object, r.seq, i)).collect();
    by_seq.sort_unstable();
    let clash = by_seq.windows(2).find(|w| w[0].0 == w[1].0 && w[0].1 == w[1].1 && records[w[0].2] != records[w[1].2]);
    match clash {
        None => Ok(()),
        Some(w) => {
            let (a, b) = (&records[w[0].2], &records[w[1].2]);
            let files: Vec<&str> = group.iter().map(|f| f.path.as_str()).collect();
            Err(Error::corrupt(format!(
                "two different change records of {} with seq {} (keys {:?} and {:?}) are in the data files {}; \
                 nothing was collapsed",
                a.object,
                a.seq,
                a.key,
                b.key,
                files.join(", ")
            )))
        }
    }
}

/// Keep, of each key's versions (sorted by object, key, seq), those not superseded at or before
/// `horizon`; drop a delete at or before `horizon` that is the key's latest version, with
/// everything before it.
///
/// Only ever a *prefix* of a key's history is dropped: everything before its newest version (by
/// seq) stamped at or before the horizon. Timestamps come from writers' wall clocks and can go
/// backwards (a failover to a node whose clock is behind); deciding version by version could then
/// drop a delete but keep an older put, bringing a deleted key back.
fn collapse_sorted(records: Vec<ChangeRecord>, horizon: Timestamp) -> Vec<ChangeRecord> {
    let mut out: Vec<ChangeRecord> = Vec::with_capacity(records.len());
    let mut group: Vec<ChangeRecord> = Vec::new();
    let flush = |group: &mut Vec<ChangeRecord>, out: &mut Vec<ChangeRecord>| {
        let from = group.iter().rposition(|r| r.timestamp <= horizon).unwrap_or(0);
        let last_is_old_delete =
            from + 1 == group.len() && group[from].op == Op::Delete && group[from].timestamp <= horizon;
        if !last_is_old_delete {
            out.extend(group.drain(from..));
        }
        group.clear();
    };
    for r in records {
        if group.last().is_some_and(|g| g.object != r.object || g.key != r.key) {
            flush(&mut group, &mut out);
        }
        group.push(r);
    }
    if !group.is_empty() {
        flush(&mut group, &mut out);
    }
    out
}

fn selected(partitions: &Option<BTreeSet<i32>>, p: Option<i32>) -> bool {
    match (partitions, p) {
        (None, _) => true,
        (Some(set), Some(p)) => set.contains(&p),
        (Some(_), None) => false,
    }
}

/// Saturating: a clock far from now (a custom or manual one) must not overflow the difference.
fn elapsed(from: Timestamp, to: Timestamp) -> Duration {
    to.since(from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dotdo_core::{FencingToken, ObjectId};

    /// Clocks at the ends of time (a custom or manual clock) give a saturated duration, not an
    /// overflow (a panic in debug builds).
    #[test]
    fn elapsed_saturates() {
        let (min, max) = (Timestamp::from_micros(i64::MIN), Timestamp::from_micros(i64::MAX));
        assert_eq!(elapsed(min, max), Duration::from_micros(i64::MAX as u64));
        assert_eq!(elapsed(max, min), Duration::ZERO);
    }

    /// A store whose bucketer follows the table's own spec (its table was dropped and created
    /// again with other buckets), after another engine evolved the spec from bucket[4] to
    /// bucket[8]: puts written under the first spec, their deletes under the second. A collapse
    /// is refused (`InvalidInput`) and every delete stays: grouped by bucket number alone, an
    /// object of bucket 1 under bucket[4] and bucket 5 under bucket[8] had its delete dropped in
    /// one group and its put kept in the other, so the deleted key came back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_collapse_over_files_of_two_partition_specs_is_refused() {
        use dotdo_core::{AsOf, ColdBatch, ColdSink, ObjectChanges};
        use iceberg::spec::{Transform, UnboundPartitionSpec};
        let dir = tempfile::tempdir().expect("tempdir");
        let open = |buckets: u32| {
            IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
                .table(["t"], "changes")
                .settings(crate::Settings { buckets, ..Default::default() })
                .build()
        };
        let a = open(16).await.expect("open");
        let ident = iceberg::TableIdent::from_strs(["t", "changes"]).expect("ident");
        a.catalog().drop_table(&ident).await.expect("drop");
        let _b = open(4).await.expect("the table again, with 4 buckets");
        let ids: Vec<ObjectId> = (0..8).map(|i| ObjectId::new(format!("obj-{i}")).expect("id")).collect();
        let change = |o: &ObjectId, seq: u64, op: Op| ChangeRecord {
            object: o.clone(),
            seq,
            key: "k".into(),
            op,
            value: Bytes::from_static(b"v"),
            token: FencingToken::new(1),
            timestamp: Timestamp::from_millis(seq as i64),
            type_name: "T".into(),
        };
        let one_each = |seq: u64, op: Op| ColdBatch {
            objects: ids
                .iter()
                .map(|o| ObjectChanges {
                    object: o.clone(),
                    token: FencingToken::new(1),
                    records: vec![change(o, seq, op)],
                })
                .collect(),
        };
        a.append(one_each(1, Op::Put)).await.expect("puts under bucket[4]");
        for o in &ids {
            assert_eq!(a.load_state(o, AsOf::Latest).await.expect("state").entries.len(), 1);
        }
        let t = a.refresh().await.expect("table");
        let do_id = t.metadata().current_schema().field_id_by_name("do_id").expect("do_id");
        let spec = UnboundPartitionSpec::builder()
            .add_partition_field(do_id, "do_id_bucket_8", Transform::Bucket(8))
            .expect("field")
            .build();
        let evolve = vec![iceberg::TableUpdate::AddSpec { spec }, iceberg::TableUpdate::SetDefaultSpec { spec_id: -1 }];
        a.commit_updates(&t, evolve, vec![], "another engine evolves the spec").await.expect("evolve");
        a.append(one_each(2, Op::Delete)).await.expect("deletes under bucket[8]");
        let specs: std::collections::BTreeSet<Option<i32>> =
            a.live_files(&a.refresh().await.expect("table")).await.expect("files").iter().map(|f| f.spec).collect();
        assert_eq!(specs.len(), 2, "files of both specs: {specs:?}");
        let e = a.collapse(CollapseOptions::new(Timestamp::from_millis(1000))).await.expect_err("two specs");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{e}");
        for o in &ids {
            assert!(a.load_state(o, AsOf::Latest).await.expect("state").entries.is_empty(), "{o}: deleted");
        }
    }

    fn rec(key: &str, seq: u64, op: Op, at: i64) -> ChangeRecord {
        ChangeRecord {
            object: ObjectId::new("o:1").expect("id"),
            seq,
            key: key.into(),
            op,
            value: Bytes::from(format!("v{seq}")),
            token: FencingToken::new(1),
            timestamp: Timestamp::from_millis(at),
            type_name: "T".into(),
        }
    }

    #[test]
    fn collapse_keeps_latest_and_versions_after_the_horizon() {
        let input = vec![
            rec("a", 1, Op::Put, 10),
            rec("a", 2, Op::Put, 20),
            rec("a", 5, Op::Put, 50),
            rec("b", 3, Op::Put, 30),
            rec("b", 4, Op::Delete, 40),
            rec("c", 6, Op::Put, 10),
            rec("c", 7, Op::Delete, 60),
        ];
        let out = collapse_sorted(input, Timestamp::from_millis(45));
        let kept: Vec<(String, u64)> = out.iter().map(|r| (r.key.clone(), r.seq)).collect();
        // a: 1 superseded at 20 <= 45 (dropped), 2 superseded at 50 > 45 (kept), 5 latest.
        // b: delete at 40 <= 45 is latest: key gone entirely.
        // c: put superseded at 60 > 45 kept; delete after the horizon kept.
        assert_eq!(kept, vec![("a".into(), 2), ("a".into(), 5), ("c".into(), 6), ("c".into(), 7)]);
    }

    #[test]
    fn collapse_drops_only_a_prefix_when_clocks_go_backwards() {
        // A writer whose clock was behind stamped the delete before the put it supersedes.
        let input = vec![rec("k", 1, Op::Put, 5), rec("k", 2, Op::Put, 100), rec("k", 3, Op::Delete, 10)];
        assert!(collapse_sorted(input, Timestamp::from_millis(50)).is_empty(), "the key stays deleted");
        let input = vec![rec("k", 1, Op::Put, 5), rec("k", 2, Op::Put, 100), rec("k", 3, Op::Put, 10)];
        let kept: Vec<u64> = collapse_sorted(input, Timestamp::from_millis(50)).iter().map(|r| r.seq).collect();
        assert_eq!(kept, [3], "the latest version survives");
        let input = vec![rec("k", 1, Op::Put, 60), rec("k", 2, Op::Put, 10), rec("k", 3, Op::Put, 70)];
        let kept: Vec<u64> = collapse_sorted(input, Timestamp::from_millis(50)).iter().map(|r| r.seq).collect();
        assert_eq!(kept, [2, 3]);
    }

    #[test]
    fn partition_selection() {
        let set: BTreeSet<i32> = [1, 2].into();
        assert!(selected(&None, Some(5)));
        assert!(selected(&Some(set.clone()), Some(1)));
        assert!(!selected(&Some(set.clone()), Some(3)));
        assert!(!selected(&Some(set), None));
    }
}
